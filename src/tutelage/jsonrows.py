"""Rows of a JSON list or a JSON Lines file (or of a Hugging Face Hub dataset), each with where it
came from, for one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_rows(path: Path | str, field: str = "") -> Iterator[tuple[str, object]]:
    """Yield (where, row): `where` is `file:line` for JSON Lines, `file: row N` for a JSON list
    (which has no line per row). Unreadable or invalid input raises ValueError naming the place.
    A Hub id (`org/name`, no such local path) is that dataset's rows (`model_files`); `field`, the
    setting that named it, leads its errors."""
    from .model_files import hub_dataset_rows, is_hub_id

    if is_hub_id(path):
        yield from hub_dataset_rows(str(path), field)
        return
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(data):
            yield f"{path}: row {i + 1}", row
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
