"""The report's formatting, shared by both templates: numbers, money, shares and durations as a
person reads them, long texts clipped, and generated text made inert in Markdown (the HTML template
autoescapes). `template_environment` is the Jinja environment that offers them as filters.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2

from ..templating import TEMPLATE_DIR


def num(value: float | None, sign: bool = False) -> str:
    """A number as a person reads it: integers with separators, floats to 3 decimals (fewer once
    they are large)."""
    if value is None:
        return "–"
    plus = "+" if sign else ""
    if isinstance(value, int):
        return f"{value:{plus},}"
    if abs(value) >= 1000:
        return f"{value:{plus},.0f}"
    return f"{value:{plus}.{3 if abs(value) < 10 else 1}f}"


def ci(row: dict | None, sign: bool = False) -> str:
    """'0.231 [0.190, 0.270]': a mean and its 95% bootstrap interval."""
    if row is None:
        return "–"
    if row["ci_low"] is None or row["ci_high"] is None:
        return num(row["value"], sign)
    return f"{num(row['value'], sign)} [{num(row['ci_low'], sign)}, {num(row['ci_high'], sign)}]"


def usd(value: float | None) -> str:
    if value is None:
        return "–"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clip(text: str | None, limit: int) -> str | None:
    """`text` cut at `limit` characters, saying how many more there were."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}\n[… {len(text) - limit:,} more characters]"


def clip_all(row: dict, limit: int) -> dict:
    """Every text of a row clipped (see clip)."""
    return {k: clip(v, limit) if isinstance(v, str) else v for k, v in row.items()}


# -- Markdown safety ----------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")


def md_inline(value: Any) -> str:
    """Text made inert inside a Markdown line or table cell: one line, and every character that
    could start markup (a link, raw HTML, a code span, a cell border) backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def md_code(value: Any) -> str:
    """An inline code span (content is literal in a code span) delimited by a backtick run longer
    than any inside it. Not for table cells: a pipe would still split the cell there."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def md_fence(text: str | None, info: str = "text") -> str:
    """`text` as a fenced code block whose fence is longer than any backtick run inside it, so no
    line of the text can close it."""
    text = text or ""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


# -- the templates' environment -----------------------------------------------------------------
@lru_cache(maxsize=1)
def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR / "report"),
        # *.html.jinja autoescapes; the Markdown template escapes through md_inline / md_fence.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.jinja",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        num=num,
        ci=ci,
        usd=usd,
        pct=pct,
        duration=duration,
        md=md_inline,
        code=md_code,
        fence=md_fence,
    )
    return env
