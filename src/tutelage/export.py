"""Take the results out of a run folder: the kept dataset in common formats, or the student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .gguf import export_gguf, gguf_path
from .store import Store


def export_data(run_dir: Path, fmt: str, out: Path) -> int:
    """Write the kept examples as `alpaca` (a JSON list), `jsonl`, or `hf` (a `datasets` folder
    with one split per data split). Returns the number of examples written."""
    with Store(run_dir) as store:
        rows = store.examples(status="kept")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in rows
    ]
    if fmt == "alpaca":
        out.write_text(json.dumps(plain, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        with out.open("w", encoding="utf-8") as f:
            for r, p in zip(rows, plain):
                # a multi-turn conversation carries all its turns (OpenAI `messages` form)
                turns = {"messages": r["messages"]} if r["messages"] else {}
                f.write(json.dumps({**p, **turns, "split": r["split"]}, ensure_ascii=False) + "\n")
    elif fmt == "hf":
        from datasets import Dataset, DatasetDict

        names = {"train": "train", "valid": "validation", "test": "test"}
        splits = {}
        for split, name in names.items():
            part = [p for r, p in zip(rows, plain) if (r["split"] or "train") == split]
            if part:
                splits[name] = Dataset.from_list(part)
        if not splits:
            raise ValueError(f"{run_dir}: no kept examples to export")
        DatasetDict(splits).save_to_disk(str(out))
    else:
        raise ValueError(f"--format: {fmt!r} is not one of alpaca, jsonl, hf")
    return len(plain)


def export_model(run_dir: Path, out: Path, gguf: str | None = None) -> Path:
    """Copy the trained student (a plain HF folder, LoRA already merged) to `out`. With `gguf` (a
    GGUF type: f32, f16, bf16 or q8_0), also write it as one GGUF file beside that folder, at
    `gguf_path(out)`, for llama.cpp or Ollama."""
    source = Path(run_dir) / "student"
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no trained student yet; run `tutelage train` first")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    if gguf is not None:
        target = gguf_path(out)
        if target.exists():
            raise FileExistsError(f"{target}: exists")
        # First: the conversion is the step likely to fail, and then nothing is left half done.
        export_gguf(source, target, gguf)
    shutil.copytree(source, out, dirs_exist_ok=True)
    return out
