"""The Evol-Instruct recipe (WizardLM, Xu et al. 2023): a pool of instructions is rewritten round
after round into harder or rarer ones, and the teacher answers every rewrite that survives.

The pool starts as the seed tasks (an instruction with its input below it), a prompt file or
another run's kept tasks (`generation.pool`), and evolves `generation.rounds` times (4, as in
WizardLM). A round asks for one evolution of every pool member, its operator drawn uniformly from
`generation.operators`, seeded by (seed, round, member):
- in depth: one more constraint (`constraints`), a deeper or broader inquiry (`deepen`), general
  concepts made specific (`concretize`), explicit reasoning steps (`reasoning`), concrete input
  data to work on (`complicate_input`); a rewrite adds only 10 to 20 words, as in the paper;
- in breadth: a new, rarer task of the same domain, as long and as hard (`breadth`).
The evolution request samples as WizardLM did (temperature 1, top_p 0.95, up to 2,048 tokens);
each surviving rewrite is then answered in chat (`answering.ask_answer`, greedy by default).

An evolution is eliminated, with its reason code, when
- it cannot be read: parse_error (nothing left), length_truncated (cut at the token limit);
- it leaks the prompt's scaffolding ("#Rewritten Prompt#", "given prompt", our own "Starting
  task" ...): prompt_leak. A label the teacher put in front of its rewrite ("#Rewritten
  Prompt#:", "Rewritten task:", or such a line after a repeat of the starting task) is stripped
  first, with what comes before it: it labels the answer, it is not part of it;
- it gains no information over its parent: no_information_gain. The paper asks ChatGPT whether
  the two are equal; we count the rewrite's ROUGE tokens outside its longest common subsequence
  with the parent, and call fewer than 3 no gain (an identical text, one reworded by a word or
  two, or a merely shortened one). No judge is asked;
- it fails the quality rules or the novelty filter (`Screen.check_instruction`);
- its answer apologises and is short (short_apology: the refusal rule and under 80 words, the
  paper's "sorry" rule), holds only punctuation and stop words (no_content), or fails the answer
  rules (empty_output, unfinished, refusal, repetition, off_topic).
An eliminated evolution leaves its parent in the pool for the next round, as in the paper.

Rounds under concurrency: with N members, request i evolves member i % N in round i // N, so the
members evolve as N independent chains and request i depends only on request i - N, the same
chain's previous link. The loop launches request i once request i - window is stored, so with
window <= N that link's fate, answer included, is known whenever request i is built, on every
run (more in flight than N is refused). A resumed run rebuilds the chains from the stored
statuses, after checking that the starting pool is the one the run began with, and ends with the
same dataset. After the last round `build_request` returns None: the loop stops as "exhausted".
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from rapidfuzz.distance import LCSseq

from ..config import Config, ConfigError
from ..filter.answers import ANSWER_CODES, content_words, is_refusal
from ..filter.rouge import rouge_l_f1, tokenize
from ..prompt_sources import load_prompts
from ..teachers.base import Request
from ..teachers.ledger import LedgerResult
from .answering import ask_answer, user_content
from .recipe import (
    Context,
    Screened,
    check_templates,
    main_sampling,
    make_request,
    new_key,
    record_from,
    render,
    unparsed_record,
)

NAME = "evol-instruct"
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 2048}  # WizardLM's
TEMPLATE_FILES = {
    operator: f"evol_instruct/{operator}.jinja"
    for operator in (
        "constraints",
        "deepen",
        "concretize",
        "reasoning",
        "complicate_input",
        "breadth",
    )
}
# The prompts put the task between these; a completion teacher stops at the closing one.
OPEN, CLOSE = "<<<", ">>>"
MIN_NEW_TOKENS = 3  # a rewrite with fewer tokens outside its parent gained nothing
SHORT_ANSWER_WORDS = 80  # the paper's "sorry" rule: an apology shorter than this
# Reason codes this recipe adds to the shared vocabulary.
EVOLUTION_CODES = ("prompt_leak", "no_information_gain", "short_apology", "no_content")
# Rejections decided on the answer: the rewrite itself had passed the filter and joined the pool.
ANSWER_STAGE_CODES = ("short_apology", "no_content", *ANSWER_CODES)

# The paper's scaffolding words and our templates' own labels: a rewrite that copies one of them
# is talking about the prompt instead of being a task.
LEAK_MARKERS = (
    "given prompt",
    "rewritten prompt",
    "created prompt",
    "starting task",
    "rewritten task",
    "created task",
    OPEN,
    CLOSE,
)
# A label in front of the rewrite: "#Rewritten Prompt#:", "**Rewritten task:**", a label line.
_LABEL = re.compile(
    r"[#*\s]*(?:rewritten|created|new|evolved)[ \t]+(?:prompt|task)"
    r"(?:[ \t]*#[#*]*[ \t]*:?|[ \t]*\**[ \t]*:|[ \t]*(?=\n|$))[*#]*[ \t]*\n?",
    re.IGNORECASE,
)
# A label on a line of its own after some text (the teacher repeated the starting task first):
# the rewrite is what follows the last one.
_LABEL_LINE = re.compile(
    r"^[#*\t ]*(?:(?:rewritten|created|new|evolved)[ \t]+(?:prompt|task|version)|rewrite)"
    r"[#*\t ]*:?[#*\t ]*$",
    re.IGNORECASE | re.MULTILINE,
)
# A chat teacher's opening words about its reply ("Sure! Here is the rewritten task:").
_PREAMBLE = re.compile(r"(?:sure|certainly|of course|okay|ok|here)\b[^\n]*:[ \t]*\n", re.IGNORECASE)


@dataclass(frozen=True)
class Member:
    """A pool member: a starting instruction or the last surviving evolution of one."""

    text: str
    key: Hashable | None  # its novelty-pool key (a seed or a stored task); None: a file prompt


@dataclass(frozen=True)
class Evolution:
    """What request idx asked for: which member it rewrites, in which round, how."""

    round: int
    slot: int
    operator: str
    parent: Member

    def as_record(self) -> dict:
        """Stored with the task (`evolution` in its record)."""
        return {
            "round": self.round,
            "operator": self.operator,
            "parent": self.parent.text,
            "parent_key": self.parent.key,
        }


@dataclass
class Chains:
    """One run's evolution state: the pool as it stands (member j: the last survivor of chain j)
    and the requests built but not finished yet."""

    members: list[Member]
    asked: dict[int, Evolution] = field(default_factory=dict)


@dataclass
class Parsed:
    text: str
    error: str | None = None  # parse_error, length_truncated
    raw: str | None = None


def check(config: Config) -> None:
    for template in TEMPLATE_FILES.values():
        check_templates(config, {"prompt_template": template})
    if config.generation.pool is not None:
        _file_pool(config.generation.pool)  # fails now, in one line, on a bad file


def in_pool(row: dict) -> bool:
    """A rewrite that passed the instruction filter joined the novelty pool, whatever its answer
    became."""
    return row["status"] == "kept" or row["reason"] in ANSWER_STAGE_CODES


def build_request(idx: int, ctx: Context) -> Request | None:
    """Request idx evolves pool member idx % N in round idx // N; None once every round is
    asked (the loop stops as "exhausted")."""
    config, gen = ctx.config, ctx.config.generation
    chains = _chains(ctx)
    round_, slot = divmod(idx, len(chains.members))
    if round_ >= gen.rounds:
        return None
    evolution = Evolution(
        round_, slot, draw_operator(config.seed, round_, slot, gen.operators), chains.members[slot]
    )
    chains.asked[idx] = evolution
    prompt = render(
        config,
        "prompt_template",
        TEMPLATE_FILES[evolution.operator],
        task=evolution.parent.text,
        operator=evolution.operator,
        language=gen.language,
        chat=ctx.chat,
    )
    sampling = main_sampling(DEFAULT_SAMPLING, config.teacher.sampling)
    sampling["stop"] = [*sampling.get("stop", []), CLOSE]
    return make_request(prompt, ctx.chat, sampling, sample_index=idx)


def draw_operator(seed: int, round_: int, slot: int, operators: list[str]) -> str:
    """The operator for member `slot` in round `round_`: uniform, the same on every run."""
    return random.Random(f"{seed}:{NAME}:{round_}:{slot}").choice(operators)


def parse(text: str, finish_reason: str | None) -> Parsed:
    """The rewritten task in an answer: between the delimiters when the teacher wrote them,
    after the last label line, without a label or a chat preamble in front of it."""
    raw = text.strip()
    body = text.split(OPEN, 1)[1] if OPEN in text else text
    body = body.split(CLOSE, 1)[0].strip()
    labels = list(_LABEL_LINE.finditer(body))
    if labels:
        body = body[labels[-1].end() :].strip()
    body = _PREAMBLE.sub("", body, count=1) if _PREAMBLE.match(body) else body
    body = _LABEL.sub("", body, count=1).strip() if _LABEL.match(body) else body
    body = _tidy(body)
    if finish_reason == "length":
        return Parsed(body, "length_truncated", raw)
    if not body:
        return Parsed("", "parse_error", raw)
    return Parsed(body)


def _tidy(text: str) -> str:
    """Trailing spaces off every line, at most one blank line in a row."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def leaks_scaffolding(text: str) -> bool:
    flat = " ".join(text.lower().split())
    return any(marker in flat for marker in LEAK_MARKERS)


def information_gain(parent: str, evolved: str, unicode: bool = False) -> tuple[int, float]:
    """(tokens of `evolved` outside its longest common subsequence with `parent`, ROUGE-L F1)."""
    a, b = tokenize(parent, unicode), tokenize(evolved, unicode)
    chars: dict[str, str] = {}
    a_codes = "".join(chars.setdefault(t, chr(len(chars))) for t in a)
    b_codes = "".join(chars.setdefault(t, chr(len(chars))) for t in b)
    return len(b) - LCSseq.similarity(a_codes, b_codes), rouge_l_f1(a, b)


def screen(idx: int, result: LedgerResult, ctx: Context) -> Screened:
    """Read the rewrite and judge it: scaffolding, information gain, then the instruction filter
    (rules and novelty). A rewrite that passes joins the novelty pool and waits for its answer."""
    evolution = _chains(ctx).asked[idx]
    completion = result.completion
    parsed = parse(completion.text, completion.finish_reason)
    if parsed.error:
        record = unparsed_record(parsed.text, parsed.error, parsed.raw)
        return Screened(idx, result.key, [{**record, "evolution": evolution.as_record()}])
    record = _judged(idx, parsed.text, evolution.parent, ctx)
    record["evolution"] = evolution.as_record()
    pending = []
    if record["status"] == "kept":
        ctx.pool.append((idx, parsed.text))
        pending = [0]
    return Screened(idx, result.key, [record], pending)


def _judged(idx: int, text: str, parent: Member, ctx: Context) -> dict:
    """The rewrite's record: the recipe's own rules first, then the instruction filter."""
    if leaks_scaffolding(text):
        return _rejected(text, "prompt_leak")
    new_tokens, overlap = information_gain(parent.text, text, ctx.screen.index.unicode)
    if new_tokens < MIN_NEW_TOKENS:
        return _rejected(text, "no_information_gain", nearest_key=parent.key, nearest_score=overlap)
    ctx.screen.prepare([text])
    return record_from(text, ctx.screen.check_instruction(text, new_key(idx, 0)), instances=[])


def _rejected(text: str, reason: str, **nearest) -> dict:
    return {"text": text, "status": "rejected", "reason": reason, "instances": [], **nearest}


async def finish(screened: Screened, ctx: Context) -> list[dict]:
    """Ask for the answer to a rewrite that passed, judge it, and move the chain on if it
    survived (its parent stays otherwise)."""
    chains = _chains(ctx)
    evolution = chains.asked[screened.idx]
    [record] = screened.records
    if screened.pending:
        answer = await ask_answer(ctx, record["text"])
        reason = answer_elimination(answer.text) or answer.reason
        record["instances"] = [
            {
                "input": "",
                "output": answer.text,
                "status": "rejected" if reason else "kept",
                "reason": reason,
            }
        ]
        if reason:
            record["status"], record["reason"] = "rejected", reason
    if record["status"] == "kept":
        chains.members[evolution.slot] = Member(record["text"], new_key(screened.idx, 0))
    del chains.asked[screened.idx]
    return screened.records


def answer_elimination(answer: str) -> str | None:
    """The paper's own rules on an answer: an apology that is short, or no content at all."""
    if not answer.strip():
        return None  # the answer rules call it empty_output
    if is_refusal(answer) and len(answer.split()) < SHORT_ANSWER_WORDS:
        return "short_apology"
    if not content_words(answer):
        return "no_content"
    return None


# -- the pool --------------------------------------------------------------------------------------
def _chains(ctx: Context) -> Chains:
    """This run's chains, built on first use: the starting pool, moved on by every stored
    evolution that survived (the store holds exactly what was committed)."""
    chains = ctx.state.get(NAME)
    if chains is None:
        chains = _restore(ctx)
        # Context has no slot for a recipe's own state: kept on the object, one per loop.
        ctx.state[NAME] = chains
    return chains


def _restore(ctx: Context) -> Chains:
    gen = ctx.config.generation
    members = starting_pool(ctx)
    n = len(members)
    if ctx.window > n:
        field_name = "teacher.batch_size" if ctx.config.teacher.batch else "generation.concurrency"
        raise ConfigError(
            f"{field_name}: {ctx.window} requests in flight, but the evol-instruct pool holds "
            f"{n}: a round builds on the one before, so at most {n} can be in flight"
        )
    store = ctx.ledger.store if ctx.ledger is not None else None
    if store is None:
        return Chains(members)
    others = set(store.batch_recipes().values()) - {NAME}
    if others:
        raise ConfigError(
            f"generation.recipe: this run folder holds {', '.join(sorted(others))} requests; "
            "evol-instruct numbers its rounds from the first request: use a new run folder"
        )
    digest = hashlib.sha256(json.dumps([m.text for m in members]).encode()).hexdigest()
    stored = store.get_meta("evol_instruct_pool_sha256")
    if stored is None:
        store.set_meta("evol_instruct_pool_sha256", digest)
    elif stored != digest:
        raise ConfigError(
            f"generation.pool: not the starting pool this run began with ({gen.pool or 'the seeds'}"
            f" now holds {n} instructions); use a new run folder"
        )
    for row in store.machine_records():  # in request order
        if row["status"] == "kept":
            members[row["batch"] % n] = Member(row["instruction"], ("id", row["id"]))
    return Chains(members)


def starting_pool(ctx: Context) -> list[Member]:
    """Round 0's pool: the seed tasks (each with its first input), or generation.pool's prompts."""
    pool = ctx.config.generation.pool
    if pool is None:
        return [
            Member(user_content(s["instruction"], s["instances"][0]["input"]), ("id", s["id"]))
            for s in ctx.seeds
        ]
    return [Member(text, None) for text in _file_pool(pool)]


def _file_pool(path: Path) -> list[str]:
    """A prompt file's or run folder's instructions (each with its input below it)."""
    try:
        prompts = load_prompts(path)
    except ValueError as e:
        raise ConfigError(f"generation.pool: {e}") from None
    return list(dict.fromkeys(user_content(p.instruction, p.input) for p in prompts))
