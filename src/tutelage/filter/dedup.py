"""Deduplicate an instruction file with the ROUGE-L novelty filter (`tutelage dedup`).

Reads JSONL or a JSON list of Alpaca ({instruction, input, output}), Self-Instruct ({instruction,
instances, ...}) or bare {instruction} rows, and writes the kept rows unchanged, in input order, in
the input's format. Only the instruction is compared, as in Self-Instruct and Alpaca.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .rouge import RougeNoveltyIndex


@dataclass(frozen=True)
class DedupSummary:
    read: int
    kept: int
    rejected: int
    seconds: float


@dataclass(frozen=True)
class _Row:
    data: dict
    line: int  # 1-based line in JSONL, 1-based position in a JSON list
    text: str | None  # the JSONL line as read, so a kept row is written back byte for byte


def _json_error(e: json.JSONDecodeError) -> str:
    return f"not valid JSON ({e.msg}, column {e.colno})"


def _read_rows(path: Path) -> tuple[list[_Row], bool]:
    """The rows of path and whether it is a JSON list (else JSONL); ValueError names file:line."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    is_list = content.lstrip().startswith("[")
    if is_list:
        try:
            items = json.loads(content)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: {_json_error(e)}") from None
        rows = [_Row(item, i, None) for i, item in enumerate(items, 1)]
    else:
        rows = []
        # split on "\n" only: str.splitlines would also split inside strings at U+2028 and kin
        for number, line in enumerate(content.split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            try:
                rows.append(_Row(json.loads(line), number, line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: {_json_error(e)}") from None
    for row in rows:
        if not isinstance(row.data, dict) or not isinstance(row.data.get("instruction"), str):
            where = f"item {row.line}" if is_list else str(row.line)
            # a bad value in the user's file: ValueError, one line (TypeError would be a bug)
            raise ValueError(f"{path}:{where}: row has no 'instruction' string")  # noqa: TRY004
    return rows, is_list


def _write_atomically(path: Path, text: str) -> None:
    # the output may replace the input: never leave it half-written
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def dedup_file(
    in_path: str | Path,
    out_path: str | Path,
    threshold: float = 0.7,
    against: str | Path | None = None,
    rejected_path: str | Path | None = None,
    unicode: bool = False,
    workers: int = 1,
) -> DedupSummary:
    """Keep each row iff its instruction's ROUGE-L F1 against every earlier kept one (and every
    instruction in `against`) is <= threshold. Rejected rows go to `rejected_path` (JSONL) as
    {"row", "line", "nearest", "score"}, nearest being the pool instruction scoring highest.
    `workers` > 1 shares the work of long inputs among that many processes; same output."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    start = time.perf_counter()
    rows, is_list = _read_rows(Path(in_path))
    index = RougeNoveltyIndex(threshold, unicode=unicode)
    if against is not None:
        index.add_references(row.data["instruction"] for row in _read_rows(Path(against))[0])
    decisions = index.add_many((row.data["instruction"] for row in rows), workers=workers)
    kept = [row for row, decision in zip(rows, decisions) if decision.kept]

    if is_list:
        body = json.dumps([row.data for row in kept], indent=2, ensure_ascii=False) + "\n"
    else:
        body = "".join(row.text + "\n" for row in kept)
    _write_atomically(Path(out_path), body)
    if rejected_path is not None:
        records = (
            {"row": row.data, "line": row.line, "nearest": d.nearest_text, "score": d.score}
            for row, d in zip(rows, decisions)
            if not d.kept
        )
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        _write_atomically(Path(rejected_path), body)
    return DedupSummary(len(rows), len(kept), len(rows) - len(kept), time.perf_counter() - start)
