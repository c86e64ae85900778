"""The evaluation sets: `held_out` (the test split of the kept examples), `builtin` (our own
evaluation instructions), `ifeval` (our own prompts with checkable constraints) and any file the
user names, each a list of EvalItem.

A user's file may have the Self-Instruct, Alpaca or AlpacaEval shape, or Google's IFEval shape
(see load_eval_file).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..jsonrows import read_rows
from ..model_files import is_hub_id
from ..store import Store
from .ifeval import IFEvalPrompt, builtin_ifeval_prompts, load_ifeval_file, looks_like_ifeval

BUILTIN_SET = Path(__file__).parent.parent / "data" / "eval_instructions.jsonl"
IFEVAL_SET = "ifeval"  # the name of the built-in IFEval set


@dataclass(frozen=True)
class EvalItem:
    instruction: str
    input: str = ""
    reference: str | None = None  # None: nothing to compare with (e.g. AlpacaEval instructions)
    # An IFEval prompt's constraints, which every answer is checked against (ifeval.py).
    ifeval: IFEvalPrompt | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """Stable across runs and files: the same task is the same item wherever it comes from."""
        return hashlib.sha256(f"{self.instruction}\0{self.input}".encode()).hexdigest()[:16]


def load_eval_file(path: Path) -> list[EvalItem]:
    """Read an evaluation set, whichever of these shapes its rows have (JSONL or a JSON list):
    Self-Instruct {"instruction", "instances": [{"input", "output"}]} (one item per instance),
    Alpaca {"instruction", "input", "output"}, AlpacaEval {"instruction"} (no reference), or
    Google's IFEval {"key", "prompt", "instruction_id_list", "kwargs"} (told by its first row's
    `instruction_id_list`; no reference, the constraints are checked instead)."""
    path = Path(path)
    if looks_like_ifeval(path):
        return ifeval_items(load_ifeval_file(path))
    rows = read_rows(path, "evaluation.sets")  # a file, or a Hub dataset (org/name)
    items = [item for where, row in rows for item in _row_items(where, row)]
    if not items:
        raise ValueError(f"{path}: no evaluation items in the file")
    return items


# A row of the wrong JSON type is a bad value in the user's file: ValueError like every other
# problem with it (hence the noqa: TRY004 would have TypeError).
def _row_items(where: str, row: object) -> list[EvalItem]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object")  # noqa: TRY004
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: missing or empty 'instruction'")
    pairs = row.get("instances", [row])
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
    items = []
    for pair in pairs:
        if not isinstance(pair, dict):
            raise ValueError(f"{where}: an instance must be a JSON object")  # noqa: TRY004
        task_input, output = pair.get("input", ""), pair.get("output")
        if not isinstance(task_input, str) or not isinstance(output, (str, type(None))):
            raise ValueError(f"{where}: 'input' and 'output' must be strings")  # noqa: TRY004
        items.append(EvalItem(instruction, task_input, output))
    return items


def ifeval_items(prompts: list[IFEvalPrompt]) -> list[EvalItem]:
    """IFEval prompts as evaluation items: the prompt is the instruction, and the item carries
    its constraints."""
    return [EvalItem(p.prompt, "", None, p) for p in prompts]


def eval_sets(store: Store, config: Config) -> dict[str, list[EvalItem]]:
    """Every set to evaluate, by name, each without duplicate tasks."""
    sets = {
        "held_out": [
            EvalItem(e["instruction"], e["input"], e["output"])
            for e in store.examples(split="test")
        ]
    }
    if config.evaluation.builtin_set:
        sets["builtin"] = load_eval_file(BUILTIN_SET)[: config.evaluation.builtin_limit]
    if config.evaluation.ifeval and config.evaluation.ifeval_limit:
        sets[IFEVAL_SET] = ifeval_items(builtin_ifeval_prompts()[: config.evaluation.ifeval_limit])
    for path in config.evaluation.sets:
        name = Path(path).name if is_hub_id(path) else Path(path).stem  # org/name: "name"
        if name in sets:
            raise ValueError(f"{path}: a set named '{name}' is already evaluated; rename the file")
        sets[name] = load_eval_file(path)
    return {name: list({item.key: item for item in items}.values()) for name, items in sets.items()}
