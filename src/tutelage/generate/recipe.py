"""What the loop and the recipes share: the `Recipe` protocol, the run's context, a screened
answer, prompt templates and sampling parameters.

A recipe is a module (`alpaca`, `self_instruct`) that satisfies `Recipe` (a module can, PEP 544):
its NAME and the five functions the loop calls, declared once below. `generate.loop.RECIPES`
lists the registered ones by NAME.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jinja2

from ..config import Config, ConfigError, Sampling
from ..filter.screen import Screen, Verdict
from ..teachers.base import Request
from ..teachers.ledger import Ledger, LedgerResult
from ..templating import TEMPLATE_DIR, render_template

GENERATE_TEMPLATES = TEMPLATE_DIR / "generate"


@dataclass
class Context:
    config: Config
    chat: bool  # chat messages, or a raw prompt the teacher continues
    seeds: list[dict]
    screen: Screen
    ledger: Ledger | None = None
    # Who writes chat answers (generation.responder, else the teacher): see `answering`.
    responder: Ledger | None = None
    # Who judges between answers (several samples) or tags tasks (Magpie), when configured.
    judge: Ledger | None = None
    window: int = 1  # main requests in flight at most
    # Machine instructions in the novelty pool, in pool order: (request idx, text).
    pool: list[tuple[int, str]] = field(default_factory=list)
    # A recipe's own state across requests, under its NAME (Evol-Instruct's chains).
    state: dict = field(default_factory=dict)


@dataclass
class Screened:
    """One main answer after parsing and screening, before its records are stored."""

    idx: int
    request_key: str
    records: list[dict]  # store records; `nearest_key` is resolved to an id when stored
    pending: list = field(default_factory=list)  # recipe state for `finish`


class Recipe(Protocol):
    """Everything the generation loop calls on a recipe, in the order it calls it.

    Two optional members change how the novelty pool is rebuilt on resume: `SEEDS_IN_POOL =
    False` leaves the seed tasks out of it, and `pool_text(row)` gives the text compared (the
    answer recipe compares a prompt's instruction and input together)."""

    NAME: str  # generation.recipe names the recipe by this

    def check(self, config: Config) -> None:
        """Fail before the first request, in one line, on a configuration the recipe cannot run
        (a missing or broken template)."""
        ...

    def in_pool(self, row: dict) -> bool:
        """Whether a stored instruction is in the novelty pool, to rebuild the pool on resume."""
        ...

    def build_request(self, idx: int, ctx: Context) -> Request | None:
        """The main request number idx, built when it is launched; None when there is nothing
        more to ask (the prompts ran out, the last round is done): the loop stops, "exhausted"."""
        ...

    def screen(self, idx: int, result: LedgerResult, ctx: Context) -> Screened:
        """Parse the answer to request idx and judge each new instruction at once, in request
        order (the novelty pool grows here)."""
        ...

    async def finish(self, screened: Screened, ctx: Context) -> list[dict]:
        """Any further requests the recipe needs (Self-Instruct's classification and instances),
        returning the records to store."""
        ...


def record_from(text: str, verdict: Verdict, **extra) -> dict:
    rec = {
        "text": text,
        "status": verdict.status,
        "reason": verdict.reason,
        "nearest_key": verdict.nearest_key,
        "nearest_score": verdict.nearest_score,
    }
    return {**rec, **extra}


def unparsed_record(text: str, reason: str, raw: str | None) -> dict:
    return {"text": text, "status": "rejected", "reason": reason, "raw": raw, "instances": []}


def template_path(config: Config, field_name: str, default: str) -> Path:
    chosen = getattr(config.generation, field_name)
    return Path(chosen) if chosen else GENERATE_TEMPLATES / default


def check_templates(config: Config, defaults: dict[str, str]) -> None:
    """Fail before the first request, in one line naming the field, on a missing or broken
    user template (defaults: {config field: built-in template})."""
    for field_name, default in defaults.items():
        path = template_path(config, field_name, default)
        where = f"generation.{field_name}: {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
        try:
            jinja2.Environment().parse(text)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{where}:{e.lineno}: template error ({e.message})") from None


def render(config: Config, field_name: str, default: str, **values: object) -> str:
    path = template_path(config, field_name, default)
    try:
        return render_template(path, **values)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"generation.{field_name}: {path}: {e.message}") from None


def main_sampling(defaults: dict, teacher_sampling: Sampling) -> dict:
    """The recipe's sampling defaults, overridden by every teacher.sampling field that is set."""
    return {**defaults, **teacher_sampling.model_dump(exclude_none=True)}


def step_sampling(sampling: Sampling, stop: list[str]) -> dict:
    """A follow-up step's sampling from its config section, plus the stops its format needs."""
    values = sampling.model_dump(exclude_none=True)
    own = values.get("stop") or []
    values["stop"] = [*own, *(s for s in stop if s not in own)]
    return values


def make_request(prompt: str, chat: bool, sampling: dict, sample_index: int = 0) -> Request:
    if chat:
        return Request.make(
            messages=[{"role": "user", "content": prompt}],
            sampling=sampling,
            sample_index=sample_index,
        )
    return Request.make(prompt=prompt, sampling=sampling, sample_index=sample_index)


def new_key(idx: int, pos: int) -> Hashable:
    """The pool key of an instruction screened but not stored yet (its id comes when stored)."""
    return ("new", idx, pos)
