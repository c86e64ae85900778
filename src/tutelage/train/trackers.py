"""Experiment trackers (`training.report_to`): TensorBoard, Weights & Biases, MLflow and Trackio,
through accelerate's trackers (`Accelerator(log_with=...)`, `init_trackers`, `log`,
`end_training`), which log from the main process only.

Each tracker is optional. accelerate drops a tracker whose package is missing with a warning; we
stop with one line naming the package instead, before any model loads: a run the user meant to
track must not go untracked.
"""

from __future__ import annotations

import json
from pathlib import Path

# tracker -> (the module accelerate looks for, the pip install that brings it)
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install 'tutelage[tensorboard]'"),
    "wandb": ("wandb", "pip install 'tutelage[wandb]'"),
    "mlflow": ("mlflow", "pip install 'tutelage[mlflow]'"),
    "trackio": ("trackio", "pip install 'tutelage[trackio]'"),
}
PROJECT = "tutelage"  # the W&B project, MLflow experiment and Trackio project
# What a step logs, as the store names it -> as the trackers show it.
TRACKED = {
    "loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "eval_loss": "eval/loss",
    "ce_loss": "train/ce_loss",
    "divergence": "train/divergence",
    "eval_divergence": "eval/divergence",
}


def check_trackers(names: list[str]) -> None:
    """One line naming the pip install, unless every tracker in `names` can be imported."""
    from accelerate.utils import (
        is_mlflow_available,
        is_tensorboard_available,
        is_trackio_available,
        is_wandb_available,
    )

    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
        "trackio": is_trackio_available,
    }
    for name in names:
        if not available[name]():
            module, install = TRACKERS[name]
            raise ValueError(
                f"training.report_to: {name} needs the {module} package, which is not installed; "
                f"{install}"
            )


def start_trackers(accelerator, config, run_dir: Path, run_id: int) -> None:
    """Start the trackers for train run `run_id`: TensorBoard writes to RUN/logs/train-ID/, the
    others name their run after the run folder and the train run."""
    if not accelerator.log_with:
        return
    # Known only now (the run id is decided after the accelerator exists): one folder per train
    # run, so a retrained student's curve never overlays the last one's.
    accelerator.project_configuration.logging_dir = str(Path(run_dir) / "logs" / f"train-{run_id}")
    name = f"{Path(run_dir).resolve().name}-train-{run_id}"
    accelerator.init_trackers(
        PROJECT,
        config=hyperparameters(config),
        init_kwargs={
            "wandb": {"name": name},
            "mlflow": {"run_name": name},
            "trackio": {"name": name},
        },
    )


def hyperparameters(config) -> dict:
    """The student and training settings as flat scalars (what every tracker's config accepts)."""
    flat = {"seed": config.seed}
    for section in ("student", "training"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            scalar = isinstance(value, (bool, int, float, str))
            flat[f"{section}.{key}"] = value if scalar else json.dumps(value)
    return flat


def log_step(accelerator, step: int, **values: float | None) -> None:
    """Log one step's figures (store names, see TRACKED) to every tracker; unset ones are left
    out."""
    if accelerator.trackers:
        logged = {TRACKED.get(k, k): v for k, v in values.items() if v is not None}
        accelerator.log(logged, step=step)
