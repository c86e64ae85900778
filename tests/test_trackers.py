"""Experiment trackers (`training.report_to`): TensorBoard written offline and read back, a missing
tracker named before any work, and the `--report-to` flag."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import add_examples

from tutelage import train as tr
from tutelage.config import Config
from tutelage.store import Store

EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
]
VALID = [("Name a secondary colour.", "", "Green is a secondary colour.")]


def make_run(run_dir: Path, model: Path, **training) -> tuple[Store, Config]:
    store = Store(run_dir)
    add_examples(store, EXAMPLES, "train")
    add_examples(store, VALID, "valid")
    training = {"batch_size": 3, "threads": 1, "gguf": None, **training}
    return store, Config(run_dir=run_dir, student={"model": str(model)}, training=training)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files of `folder`, as (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_gets_loss_lr_speed_and_eval_loss_of_every_step(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    store, config = make_run(
        run_dir, tiny_model, max_steps=3, eval_every=2, report_to=["tensorboard"]
    )
    result = tr.train(store, config, run_dir)

    folder = run_dir / "logs" / f"train-{result.run_id}" / "tutelage"
    assert list(folder.glob("events.out.tfevents.*")), sorted(run_dir.rglob("*"))
    scalars = read_scalars(folder)
    rows = store.train_steps(result.run_id)
    for tag, column in [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/tokens_per_s", "tokens_per_s"),
        ("eval/loss", "eval_loss"),
    ]:
        stored = [(r["step"], r[column]) for r in rows if r[column] is not None]
        assert [s for s, _ in scalars[tag]] == [s for s, _ in stored], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in stored], rel=1e-6)
    assert [s for s, _ in scalars["eval/loss"]] == [0, 2, 3]  # before training, every 2, last
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    # The settings went along as hyperparameters (accelerate keeps a copy as YAML).
    (hparams,) = folder.glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text())["training.max_steps"] == 3


def test_trackers_change_no_fingerprint(tmp_path, tiny_model):
    store, config = make_run(tmp_path / "run", tiny_model)
    rows = store.examples(split="train"), store.examples(split="valid")
    tracked = config.model_copy(deep=True)
    tracked.training.report_to = ["tensorboard", "wandb"]
    assert tr.fingerprint(config, *rows) == tr.fingerprint(tracked, *rows)


def test_a_missing_tracker_is_named_before_any_training(tmp_path, tiny_model, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    store, config = make_run(tmp_path / "run", tiny_model, max_steps=1, report_to=["wandb"])
    with pytest.raises(
        ValueError, match=r"training.report_to: wandb .*pip install 'tutelage\[wandb"
    ):
        tr.train(store, config, tmp_path / "run")
    assert store.train_runs() == []  # stopped before a train run was even recorded
    assert not (tmp_path / "run" / "student").exists()


def test_report_to_flag_reaches_training(tmp_path, tiny_model, monkeypatch):
    import accelerate.utils
    from typer.testing import CliRunner

    from tutelage.cli import app

    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_model)[0].close()
    path = tmp_path / "tutelage.yaml"
    path.write_text(
        yaml.safe_dump({"student": {"model": str(tiny_model)}, "training": {"gguf": None}})
    )
    runner, env = CliRunner(), {"COLUMNS": "200"}
    args = ["train", "-c", str(path), "-r", str(run_dir), "--max-steps", "1"]
    r = runner.invoke(app, [*args, "--report-to", "tensorboard", "--report-to", "mlflow"], env=env)
    assert r.exit_code == 1, r.output
    assert "training.report_to: mlflow" in r.output and "pip install" in r.output
    r = runner.invoke(app, [*args, "--report-to", "tensorbored"], env=env)
    assert r.exit_code == 2 and "training.report_to" in r.output, r.output
