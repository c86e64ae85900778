"""The Self-Instruct recipe (Wang et al. 2022): bootstrap, classify, instances, filter.

(a) Bootstrap: a request shows 8 instructions, 6 sampled from the seeds and 2 from the machine
    instructions already in the pool (seeds fill in while the pool is short), shuffled, and the
    teacher continues the numbered list (temperature 0.7, top_p 0.5, presence penalty 2, up to
    1,024 tokens, stopping before item 16). Each new instruction is judged at once, in request
    order: instruction rules, then ROUGE-L novelty against the seeds and the pool.
(b) Classify: a few-shot prompt asks whether each new instruction is a classification task.
(c) Instances: input first for other tasks, output (class label) first for classification ones.
(d) Instance filters (`instances.py`); an instruction left with no instance is rejected as
    `no_valid_instances`.
With `generation.answer: chat` each instance that passed (d) gets its output from a chat turn of
its own, the teacher (or the responder) answering (instruction, input); an answer that fails an
answer rule rejects the instance with that rule's reason code.

Faithful to the paper, an instruction that passed (a) stays in the novelty pool and among the
machine demonstrations whatever its instances become: the paper filters instructions while
bootstrapping and generates instances afterwards.

Determinism under concurrency: request i's machine demonstrations are drawn, seeded by
(seed, i), from the pool entries of requests up to i - window (window: the requests in flight).
The loop launches request i only after request i - window has been screened, so every run, killed
or not, builds the same request i. The follow-up requests are keyed by their instruction alone, so
a rerun finds them in the ledger.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass

from ..config import Config
from ..teachers.base import Completion, Request
from ..teachers.ledger import LedgerResult
from .answering import ask_answer
from .instances import filter_instances, parse_input_first, parse_output_first
from .recipe import (
    Context,
    Screened,
    check_templates,
    main_sampling,
    make_request,
    new_key,
    record_from,
    render,
    step_sampling,
    unparsed_record,
)
from .steering import topic_for

NAME = "self-instruct"
DEFAULT_SAMPLING = {
    "temperature": 0.7,
    "top_p": 0.5,
    "presence_penalty": 2.0,
    "frequency_penalty": 0.0,
    "max_tokens": 1024,
}
DEFAULT_TASKS = 7  # items 9 to 15 after 8 demonstrations: the paper stops before "16."
TEMPLATE_FILES = {
    "prompt_template": "self_instruct/bootstrap.jinja",
    "classify_template": "self_instruct/classify.jinja",
    "input_first_template": "self_instruct/instances_input_first.jinja",
    "output_first_template": "self_instruct/instances_output_first.jinja",
}

# "12. text" (or "12) text", "Task 12: text") at the start of a line
_ITEM = re.compile(r"^[ \t*#]*(?:task[ \t]*)?(\d+)[ \t]*[.):][ \t*]*", re.IGNORECASE | re.MULTILINE)
_YES_NO = re.compile(r"[\s*\"'`]*(yes|no)\b", re.IGNORECASE)


@dataclass
class Parsed:
    instruction: str
    error: str | None = None  # parse_error, length_truncated
    raw: str | None = None


def check(config: Config) -> None:
    check_templates(config, TEMPLATE_FILES)


def tasks_per_request(gen) -> int:
    return gen.tasks_per_request or DEFAULT_TASKS


def build_request(idx: int, ctx: Context) -> Request:
    config, gen = ctx.config, ctx.config.generation
    rng = random.Random(f"{config.seed}:{NAME}:{idx}")
    machine = _machine_candidates(idx, ctx)
    demos = rng.sample(machine, min(gen.machine_demonstrations, len(machine)))
    seeds = [s["instruction"] for s in ctx.seeds]
    demos += rng.sample(seeds, _n_demos(idx, ctx) - len(demos))
    rng.shuffle(demos)
    demos = [one_line(d).rstrip(":") for d in demos]
    first_new = len(demos) + 1
    last = len(demos) + tasks_per_request(gen)
    prompt = render(
        config,
        "prompt_template",
        TEMPLATE_FILES["prompt_template"],
        demonstrations=demos,
        first_new=first_new,
        last=last,
        topics=topic_for(gen, idx),
        language=gen.language,
        chat=ctx.chat,
    )
    sampling = main_sampling(DEFAULT_SAMPLING, config.teacher.sampling)
    stops = [f"\n{last + 1}.", f"\n{last + 1} ."]
    if not ctx.chat:
        stops.insert(0, "\n\n")  # a completion teacher ends its list with a blank line
    sampling["stop"] = [*sampling.get("stop", []), *stops]
    return make_request(prompt, ctx.chat, sampling, sample_index=idx)


def _machine_candidates(idx: int, ctx: Context) -> list[str]:
    """The pool as request idx sees it: entries from requests up to idx - window."""
    return [text for batch, text in ctx.pool if batch <= idx - ctx.window]


def _n_demos(idx: int, ctx: Context) -> int:
    """Demonstrations in request idx: seeds make up for missing machine instructions."""
    gen = ctx.config.generation
    machine = min(gen.machine_demonstrations, len(_machine_candidates(idx, ctx)))
    return machine + min(
        gen.seed_demonstrations + gen.machine_demonstrations - machine, len(ctx.seeds)
    )


def parse(text: str, finish_reason: str | None, continued: bool, first_number: int) -> list[Parsed]:
    """The new instructions in one answer. A completion teacher continues "9." directly; a chat
    teacher's words before its first numbered item, and after a blank line that ends an item,
    are talk about the list, not part of it."""
    if finish_reason in Completion.EMPTY_REASONS:  # no text, and why: stored under that reason
        return [Parsed("", finish_reason, text)]
    if continued:
        text = f"{first_number}. " + text.lstrip(" \t")
    marks = list(_ITEM.finditer(text))
    if not marks:
        return [Parsed("", "parse_error", text.strip())] if text.strip() else []
    items = []
    for m, nxt in zip(marks, [*marks[1:], None]):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        body = re.split(r"\n[ \t]*\n", body.strip(), maxsplit=1)[0]  # an item is one paragraph
        items.append(body)
    parsed = []
    for body in items:
        instruction = one_line(body)
        if not instruction:
            parsed.append(Parsed("", "parse_error", body))
            continue
        parsed.append(Parsed(instruction[0].upper() + instruction[1:]))
    if parsed and finish_reason == "length":
        parsed[-1] = Parsed(parsed[-1].instruction, "length_truncated", items[-1].strip())
    return parsed


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def screen(idx: int, result: LedgerResult, ctx: Context) -> Screened:
    """Judge each new instruction alone (rules, then novelty); those that pass wait for `finish`."""
    completion = result.completion
    items = parse(
        completion.text,
        completion.finish_reason,
        continued=not ctx.chat,
        first_number=_n_demos(idx, ctx) + 1,
    )
    ctx.screen.prepare([p.instruction for p in items if not p.error])
    records, pending = [], []
    for pos, item in enumerate(items):
        if item.error:
            records.append(unparsed_record(item.instruction, item.error, item.raw))
            continue
        verdict = ctx.screen.check_instruction(item.instruction, new_key(idx, pos))
        records.append(record_from(item.instruction, verdict, instances=[]))
        if verdict.status == "kept":
            ctx.pool.append((idx, item.instruction))
            pending.append(pos)
    return Screened(idx, result.key, records, pending)


async def finish(screened: Screened, ctx: Context) -> list[dict]:
    """Classify every instruction that passed and ask for its instances, all at once."""
    outcomes = await asyncio.gather(
        *(_instances_for(screened.records[pos]["text"], ctx) for pos in screened.pending),
        return_exceptions=True,
    )
    for outcome in outcomes:  # each request sent was stored: a rerun will not pay for it
        if isinstance(outcome, BaseException):
            raise outcome
    gen = ctx.config.generation
    judged_all = []
    for pos, (is_classification, instances) in zip(screened.pending, outcomes):
        rec = screened.records[pos]
        judged = filter_instances(rec["text"], instances, ctx.screen.rules, gen.max_instances)
        rec["is_classification"] = int(is_classification)
        judged_all.append((rec, judged))
    if gen.answer == "chat":
        await _answer_in_chat(judged_all, ctx)
    for rec, judged in judged_all:
        judged.sort(key=lambda i: i.status != "kept")  # kept first, each group in answer order
        rec["instances"] = [i.as_record() for i in judged]
        if not any(i.status == "kept" for i in judged):
            rec["status"], rec["reason"] = "rejected", "no_valid_instances"
    return screened.records


async def _answer_in_chat(judged_all: list, ctx: Context) -> None:
    """Replace each kept instance's output with the chat answer to (instruction, input)."""
    kept = [(rec, inst) for rec, judged in judged_all for inst in judged if inst.status == "kept"]
    system = ctx.config.generation.system_prompt
    answers = await asyncio.gather(
        *(ask_answer(ctx, rec["text"], inst.input, system=system) for rec, inst in kept),
        return_exceptions=True,
    )
    for answer in answers:  # each request sent was stored: a rerun will not pay for it
        if isinstance(answer, BaseException):
            raise answer
    for (_, inst), answer in zip(kept, answers):
        inst.output = answer.text
        if answer.reason:
            inst.reject(answer.reason)


async def _instances_for(instruction: str, ctx: Context):
    config, gen, ledger = ctx.config, ctx.config.generation, ctx.ledger
    prompt = render(
        config,
        "classify_template",
        TEMPLATE_FILES["classify_template"],
        instruction=instruction,
        language=gen.language,
        chat=ctx.chat,
    )
    answer = await ledger.complete(
        make_request(prompt, ctx.chat, step_sampling(gen.classify_sampling, ["\n", "Task"])),
        purpose="classify",
    )
    is_classification = is_yes(answer.completion.text)
    field, parse_answer = (
        ("output_first_template", parse_output_first)
        if is_classification
        else ("input_first_template", parse_input_first)
    )
    prompt = render(
        config,
        field,
        TEMPLATE_FILES[field],
        instruction=instruction,
        max_instances=gen.max_instances,
        language=gen.language,
        chat=ctx.chat,
    )
    stops = [f"Example {gen.max_instances + 1}"] + ([] if ctx.chat else ["Task:"])
    answer = await ledger.complete(
        make_request(prompt, ctx.chat, step_sampling(gen.instance_sampling, stops)),
        purpose="instances",
    )
    completion = answer.completion
    return is_classification, parse_answer(completion.text, completion.finish_reason)


def is_yes(text: str) -> bool:
    """The classification answer. Anything but a leading "yes" counts as no, as in the paper."""
    m = _YES_NO.match(text)
    return bool(m) and m.group(1).lower() == "yes"


def in_pool(row: dict) -> bool:
    """Instructions that passed the instruction filter stay in the pool, instances or not."""
    return row["status"] == "kept" or row["reason"] == "no_valid_instances"
