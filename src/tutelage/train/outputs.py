"""What a finished run leaves in its folder: RUN/student (a plain HF folder, LoRA merged, with its
tutelage.json) and RUN/student-adapter, each swapped in whole: a kill never leaves half of one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def save_student(model, tokenizer, run_dir: Path, info: dict) -> Path:
    """run_dir/student: a plain HF folder (LoRA merged), loadable without tutelage or peft; with
    LoRA, the adapter alone goes to run_dir/student-adapter."""
    adapter = run_dir / "student-adapter"
    if hasattr(model, "merge_and_unload"):
        write_atomically(adapter, model.save_pretrained)
        model = model.merge_and_unload()
    else:
        shutil.rmtree(adapter, ignore_errors=True)  # an older LoRA run's, stale now

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tutelage.json").write_text(json.dumps(info, indent=2) + "\n")

    write_atomically(run_dir / "student", write)
    return run_dir / "student"


def student_info(run_dir: Path) -> dict | None:
    """The run's student's tutelage.json (its run id and fingerprint), None before there is one."""
    path = run_dir / "student" / "tutelage.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder with `write`, then swap it in: a kill never leaves half a folder
    under `target` (at worst the old one stays as `NAME.old`, or `target` is briefly missing)."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    swap_in(tmp, target)


def swap_in(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in the place of `target`, replacing whatever was there."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
