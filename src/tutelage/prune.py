"""A student made from the teacher: the teacher with some of its decoder layers dropped.

This is the depth pruning of Minitron (Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation", arXiv 2407.14679). Ranking layers by how much dropping them
hurts, Minitron found the first and the last layers the most important, and that dropping one
contiguous block of late layers works better than dropping layers scattered by their individual
scores. Hence the rule here, deterministic and free of data:

- `first_and_last` (default): keep layers 0 .. N-2 and the teacher's last layer, that is, drop the
  contiguous block of layers just before the last one;
- `first`: keep layers 0 .. N-1, dropping the last block.

The surgery is the same for every family whose decoder layers are named `...layers.{i}.` (Llama,
Qwen2, Mistral, Gemma 3, ...): build the teacher's config with N layers (and its per-layer lists,
such as Gemma 3's `layer_types`, cut to the kept layers), create that model, and copy every tensor
by name, renumbering layer i to its new index. Embeddings, norms and head are copied as they are;
tied embeddings stay tied. The result is a plain HF folder (config, safetensors, tokenizer,
generation config) that trains like any student.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

KEEP_RULES = ("first_and_last", "first")
# The layer index in a tensor name: "model.layers.7.mlp.up_proj.weight" -> 7.
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Written into the pruned folder: what it was made from, so a changed teacher or rule rebuilds it.
PROVENANCE = "tutelage-from-teacher.json"


def kept_layers(total: int, layers: int, keep: str = "first_and_last") -> list[int]:
    """The teacher's layer indices that the student keeps, in order (see the module docstring)."""
    if keep not in KEEP_RULES:
        raise ValueError(f"student.from_teacher.keep: {keep!r} is not one of {KEEP_RULES}")
    if not 1 <= layers <= total:
        raise ValueError(
            f"student.from_teacher.layers: {layers} is not between 1 and the teacher's "
            f"{total} layers"
        )
    if keep == "first":
        return list(range(layers))
    return [*range(layers - 1), total - 1]


def pruned_config(config: dict, kept: list[int]) -> dict:
    """The teacher's config dict with `kept` layers: num_hidden_layers, and every per-layer list
    (a list under a key naming layers, one entry per layer) cut to the kept layers."""
    total = config["num_hidden_layers"]
    pruned = dict(config, num_hidden_layers=len(kept))
    for key, value in config.items():
        if "layer" not in key or not isinstance(value, list) or not value:
            continue
        if len(value) != total:
            # A list of layer indices (such as mlp_only_layers) would need renumbering, not cutting.
            raise ValueError(
                f"student.from_teacher: the teacher's config has {key}={value!r}, which is not one "
                f"entry per layer; pruning does not know how to cut it"
            )
        pruned[key] = [value[i] for i in kept]
    return pruned


def renumbered_tensors(state: dict, kept: list[int]) -> dict:
    """The teacher's tensors that the student keeps, under the student's names: layer kept[j]
    becomes layer j; tensors outside the layers (embeddings, final norm, head) keep their names."""
    new_index = {old: new for new, old in enumerate(kept)}
    renamed = {}
    for name, tensor in state.items():
        match = LAYER_INDEX.search(name)
        if match is None:
            renamed[name] = tensor
            continue
        old = int(match.group(1))
        if old in new_index:
            renamed[name[: match.start(1)] + str(new_index[old]) + name[match.end(1) :]] = tensor
    return renamed


def prune_teacher(
    teacher_dir: Path, out_dir: Path, layers: int, keep: str = "first_and_last"
) -> Path:
    """Write the teacher at `teacher_dir` with `layers` of its layers kept to `out_dir`, a plain
    HF folder, and return it. Built once: a folder made from the same teacher files by the same
    rule is reused. Atomic: built beside `out_dir` and renamed into place."""
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    teacher_config = _read_teacher_config(teacher_dir)
    if "num_hidden_layers" not in teacher_config:
        raise ValueError(
            f"student.from_teacher: {teacher_dir}/config.json has no num_hidden_layers "
            "(a multimodal or unusual model); use a text-only causal LM teacher"
        )
    total = teacher_config["num_hidden_layers"]
    kept = kept_layers(total, layers, keep)
    provenance = {
        "teacher": str(teacher_dir.resolve()),
        "teacher_files": _files_signature(teacher_dir),
        "teacher_layers": total,
        "kept_layers": kept,
    }
    if _provenance(out_dir) == provenance:
        return out_dir

    # Unique per process: ranks of a distributed launch may all build it; the first rename wins.
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_pruned(teacher_dir, partial, kept)
        (partial / PROVENANCE).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        if _provenance(out_dir) == provenance:  # another process finished first
            return out_dir
        if out_dir.exists():  # made from another teacher or rule: replace it
            stale = out_dir.with_name(f"{out_dir.name}.stale-{os.getpid()}")
            out_dir.replace(stale)
            shutil.rmtree(stale, ignore_errors=True)
        partial.replace(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _write_pruned(teacher_dir: Path, out_dir: Path, kept: list[int]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto")
    config = type(teacher.config).from_dict(pruned_config(teacher.config.to_dict(), kept))
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(
        renumbered_tensors(teacher.state_dict(), kept), strict=False
    )
    if missing or unexpected:  # a layout whose layers are not named `layers.{i}.`
        raise ValueError(
            f"student.from_teacher: {teacher_dir}: cannot prune this model's layout "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    student.tie_weights()
    student.generation_config = teacher.generation_config
    del teacher
    student.save_pretrained(out_dir)
    # The teacher's own tokenizer: the student must share its vocabulary to be distilled.
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)


def _read_teacher_config(teacher_dir: Path) -> dict:
    path = teacher_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"student.from_teacher: {path}: cannot read the teacher's config ({e})"
        ) from None


def _files_signature(folder: Path) -> list:
    """Names, sizes and modification times of the teacher's files: a changed teacher rebuilds."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _provenance(out_dir: Path) -> dict | None:
    if not (out_dir / "config.json").is_file():
        return None
    try:
        return json.loads((out_dir / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
