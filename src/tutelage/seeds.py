"""Seed tasks: the built-in set and loaders for the formats users bring.

Accepted, decided by content rather than by extension:
- Self-Instruct JSONL: {"id", "name", "instruction", "instances": [{"input", "output"}],
  "is_classification"}
- Alpaca: a JSON list of {"instruction", "input", "output"}
- JSONL of either row shape (or the JSON-list form of either);
- a Hugging Face Hub dataset (`org/name`) of either row shape.
Every task comes out as {"name", "instruction", "is_classification",
"instances": [{"input", "output"}]}.
"""

from __future__ import annotations

from pathlib import Path

from .jsonrows import read_rows

BUILTIN_SEEDS = Path(__file__).parent / "data" / "seed_tasks.jsonl"


class SeedError(ValueError):
    """A malformed seed file, phrased as `file:line: what is wrong`."""


def seed_file(path: Path | str | None) -> Path:
    """The seed tasks' file: `seeds.path`, or the built-in seed tasks when it is unset."""
    return Path(path) if path is not None else BUILTIN_SEEDS


def load_seeds(path: Path | None = None) -> list[dict]:
    path = seed_file(path)
    try:
        rows = list(read_rows(path, "seeds.path"))
    except ValueError as e:
        raise SeedError(str(e)) from None
    if not rows:
        raise SeedError(f"{path}: no seed tasks in the file")
    return [_normalise(where, row) for where, row in rows]


def _normalise(where: str, row: object) -> dict:
    def fail(msg: str) -> SeedError:
        return SeedError(f"{where}: {msg}")

    if not isinstance(row, dict):
        raise fail("a seed task must be a JSON object")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise fail("missing or empty 'instruction'")
    if "instances" in row:
        instances = row["instances"]
        if not isinstance(instances, list) or not instances:
            raise fail("'instances' must be a non-empty list of {input, output}")
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict) or not isinstance(inst.get("output"), str):
                raise fail(f"instances[{j}] needs an 'output' string")
            if not isinstance(inst.get("input", ""), str):
                raise fail(f"instances[{j}].input must be a string")
        instances = [{"input": i.get("input", ""), "output": i["output"]} for i in instances]
    elif "output" in row:
        if not isinstance(row["output"], str) or not isinstance(row.get("input", ""), str):
            raise fail("'input' and 'output' must be strings")
        instances = [{"input": row.get("input", ""), "output": row["output"]}]
    else:
        raise fail("a seed task needs 'instances' (Self-Instruct) or 'output' (Alpaca)")
    is_cls = row.get("is_classification", False)
    if not isinstance(is_cls, bool):
        raise fail("'is_classification' must be true or false")
    return {
        "name": str(row.get("name") or row.get("id") or ""),
        "instruction": instruction.strip(),
        "is_classification": is_cls,
        "instances": [
            {"input": i["input"].strip(), "output": i["output"].strip()} for i in instances
        ],
    }
