"""Instructions a user brings, for the recipes that start from prompts instead of seed tasks
(`answer`, and Evol-Instruct's starting pool).

Accepted, decided by content rather than by extension:
- a JSON Lines file or a JSON list whose rows are
  - plain strings, each one instruction;
  - Alpaca or plain rows: {"instruction", "input"?} ("output" is ignored: the teacher answers);
  - Self-Instruct rows: {"instruction", "instances": [{"input", ...}]}, one prompt per instance;
  - prompt rows: {"prompt"};
  - OpenAI `messages` rows ({"role", "content"}) or ShareGPT `conversations` rows
    ({"from", "value"}): the first user turn;
- a `datasets` folder (`Dataset.save_to_disk`, or a DatasetDict's "train" split) of such rows;
- a Hugging Face Hub dataset (`org/name`: its "train" split, or its only one) of such rows;
- a tutelage run folder (holding `tutelage.db`): its kept instructions with their inputs.
Prompts come back in file order with exact duplicates dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .jsonrows import read_rows

USER_ROLES = ("user", "human")


@dataclass(frozen=True)
class Prompt:
    instruction: str
    input: str = ""


def load_prompts(path: Path | str, field: str = "") -> list[Prompt]:
    """Every prompt in `path` (a file, a `datasets` folder, a Hub dataset or a run folder);
    ValueError names the file and row of anything unreadable (`field`: the setting that named a
    Hub dataset, for its errors)."""
    from .model_files import is_hub_id

    path = Path(path)
    if path.is_dir() and (path / "tutelage.db").exists():
        prompts = _run_prompts(path)
    elif path.is_dir():
        prompts = _dataset_prompts(path)
    elif path.is_file() or is_hub_id(path):
        prompts = [p for where, row in read_rows(path, field) for p in prompts_of_row(where, row)]
    else:
        raise ValueError(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise ValueError(f"{path}: no instructions in it")
    return unique


# A row of the wrong JSON type is a bad value in the user's file: ValueError like every other
# problem with it, so the CLI prints one line (hence the noqa: TRY004 would have TypeError).
def prompts_of_row(where: str, row: object) -> list[Prompt]:
    """The prompts of one row, whichever shape it has."""
    if isinstance(row, str):
        if not row.strip():
            raise ValueError(f"{where}: an empty instruction")
        return [Prompt(row.strip())]
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object or a string")  # noqa: TRY004
    if "messages" in row or "conversations" in row:
        return [Prompt(_first_user_turn(where, row))]
    text = row.get("instruction", row.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"{where}: needs an 'instruction' or 'prompt' string, or 'messages'/'conversations'"
        )
    instances = row.get("instances")
    if instances is not None:
        if not isinstance(instances, list) or not instances:
            raise ValueError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
        inputs = [i.get("input") or "" if isinstance(i, dict) else None for i in instances]
    else:
        inputs = [row.get("input") or ""]  # null, as some datasets write it, is no input
    if not all(isinstance(i, str) for i in inputs):
        raise ValueError(f"{where}: 'input' must be a string")
    return [Prompt(text.strip(), (i or "").strip()) for i in inputs]


def _first_user_turn(where: str, row: dict) -> str:
    turns = row.get("messages", row.get("conversations"))
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'messages' must be a list of turns")  # noqa: TRY004
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: a turn must be a JSON object")  # noqa: TRY004
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role in USER_ROLES:
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                content = "\n".join(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("text")
                )
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"{where}: the first user turn is empty")
            return content.strip()
    raise ValueError(f"{where}: no user turn in the conversation")


def _dataset_prompts(folder: Path) -> list[Prompt]:
    try:
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{folder}: not a `datasets` folder or a run folder ({e})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise ValueError(f"{folder}: a DatasetDict without a 'train' split")
        data = data["train"]
    return [p for i, row in enumerate(data) for p in prompts_of_row(f"{folder}: row {i + 1}", row)]


def _run_prompts(run: Path) -> list[Prompt]:
    from .store import Store

    with Store(run) as store:
        rows: Iterable[dict] = store.examples()
        return [Prompt(r["instruction"], r["input"]) for r in rows]
