"""Checkpoints a killed run resumes from: the trainable weights, optimizer, scheduler, every
process's RNG states (accelerate's save_state) and the loop's own state (the batch plan and the
counters), swapped in whole, the last KEEP_CHECKPOINTS kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .outputs import swap_in

KEEP_CHECKPOINTS = 2
CHECKPOINT_FORMAT = 2  # accelerate's save_state; format 1 (before it) cannot resume, it retrains


class LoopState:
    """What the loop needs besides weights, optimizer, scheduler and RNG to go on where it
    stopped: the batch plan and the counters. Checkpointed by accelerate as a custom object."""

    def __init__(self, **values):
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, values: dict) -> None:
        self.values = dict(values)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # The LoRA matrices, or every weight in full fine-tuning (a tied head appears once).
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_hooks(accelerator) -> None:
    """Checkpoints hold the trainable weights only, under their plain (unwrapped) names: a LoRA
    checkpoint of Gemma-270M is a few MB, not the whole model. Sharded engines (FSDP, DeepSpeed)
    keep their own formats: accelerate hands those hooks no weights."""

    def save(models, weights, output_dir):
        for model, state in zip(models, weights):
            state.clear()
            state.update(trainable_state(accelerator.unwrap_model(model)))

    def load(models, input_dir):
        from safetensors.torch import load_file

        file = Path(input_dir) / "model.safetensors"
        if models and file.exists():
            model = models.pop(0)  # loaded here, so accelerate skips it
            unexpected = (
                accelerator.unwrap_model(model)
                .load_state_dict(load_file(file, device=str(accelerator.device)), strict=False)
                .unexpected_keys
            )
            if unexpected:
                raise RuntimeError(f"{input_dir}: does not fit the model ({unexpected[0]})")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, meta: dict) -> None:
    """Every process writes its part (its RNG states; shards under FSDP/DeepSpeed) into
    `step-N.partial`; the main process then swaps the finished folder in."""
    target = ckpt_dir / f"step-{step}"
    tmp = target.with_name(target.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}))
        swap_in(tmp, target)
        for old in checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [
        p
        for p in ckpt_dir.glob("step-*")
        if (p / "meta.json").exists() and p.name.removeprefix("step-").isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))
