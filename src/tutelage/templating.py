"""Where the package's Jinja templates live, and how a template file is rendered.

Prompts, the report and the shipped configuration are files under `templates/`, never strings in
code; a user's own template is rendered the same way as a built-in one.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"


@cache
def _template(path: str) -> jinja2.Template:
    import jinja2  # here, not at the top: the CLI imports TEMPLATE_DIR on every start

    env = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.from_string(Path(path).read_text(encoding="utf-8"))


def render_template(path: Path, **values: object) -> str:
    return _template(str(path)).render(**values)
