"""Seed tasks: the built-in set and loaders for the formats users bring.

Accepted, decided by content rather than by extension:
- Self-Instruct JSONL: {"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}
- Alpaca: a JSON list of {"instruction", "input", "output"}
- JSONL of either row shape (or the JSON-list form of either).
Every task comes out as {"name", "instruction", "is_classification", "instances": [{"input", "output"}]}.
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_SEEDS = Path(__file__).parent / "data" / "seed_tasks.jsonl"


class SeedError(ValueError):
    """A malformed seed file, phrased as `file:line: what is wrong`."""


def load_seeds(path: Path | None = None) -> list[dict]:
    path = Path(path) if path is not None else BUILTIN_SEEDS
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SeedError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SeedError(f"{path}: not UTF-8 text") from None
    rows = list(_rows(path, text))
    if not rows:
        raise SeedError(f"{path}: no seed tasks in the file")
    return [_normalise(path, where, row) for where, row in rows]


def _rows(path: Path, text: str):
    """Yield (line number, row) pairs from a JSON list or JSON Lines."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SeedError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        # A JSON list has no line per row; report the row's index instead.
        for i, row in enumerate(data):
            yield f"row {i + 1}", row
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield str(n), json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _normalise(path: Path, where: str, row: object) -> dict:
    def fail(msg: str) -> SeedError:
        sep = ":" if where[0].isdigit() else ": "
        return SeedError(f"{path}{sep}{where}: {msg}")

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
        "instances": [{"input": i["input"].strip(), "output": i["output"].strip()} for i in instances],
    }
