"""The answers as files other tools read: one AlpacaEval `model_outputs` JSON per model.

AlpacaEval (`alpaca_eval --model_outputs FILE`) reads a JSON list of objects with `instruction`
and `output`, names the model by `generator`, and keeps `dataset` as it is. Every model's file
lists the same items in the same order (set by set, each set in its own order), so one model's
file can be the other's reference: `alpaca_eval --model_outputs RUN/eval/tuned.json
--reference_outputs RUN/eval/teacher.json`. An item with an input carries it in `instruction`,
after a blank line: AlpacaEval's prompts show the instruction alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..store import Store
from .sets import EvalItem

OUTPUTS_DIR = "eval"  # under the run folder


def model_outputs(
    store: Store, sets: dict[str, list[EvalItem]], role: str, generator: str
) -> list[dict]:
    """AlpacaEval rows of `role`'s stored answers to `sets`, in set and item order (items it has
    not answered are left out)."""
    rows = []
    for name, items in sets.items():
        answers = {r["item_key"]: r for r in store.eval_items(name) if r["model_role"] == role}
        for item in items:
            if (row := answers.get(item.key)) is None:
                continue
            instruction = f"{item.instruction}\n\n{item.input}" if item.input else item.instruction
            rows.append(
                {
                    "instruction": instruction,
                    "output": row["answer"] or "",
                    "generator": generator,
                    "dataset": name,
                }
            )
    return rows


def write_model_outputs(
    store: Store, sets: dict[str, list[EvalItem]], roles: list[str], run_dir: Path
) -> dict[str, Path]:
    """RUN/eval/ROLE.json for every role with answers; returns {role: path}. The generator is
    `tutelage-RUN-ROLE` (RUN the run folder's name)."""
    folder = Path(run_dir) / OUTPUTS_DIR
    written = {}
    for role in roles:
        rows = model_outputs(store, sets, role, f"tutelage-{Path(run_dir).resolve().name}-{role}")
        if not rows:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{role}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a file
        written[role] = path
    return written
