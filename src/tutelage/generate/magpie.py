"""The Magpie recipe (Xu et al. 2024): the teacher writes a user's request itself, then answers it.

An aligned model has seen countless conversations in its own chat template, so given the template's
text up to the header of a user turn (and nothing after it), it continues with something a user
would ask. Each request here is that raw text, sampled at temperature 1 and top_p 1 and stopped at
the token that ends a user turn; the request it writes is then answered in chat mode, greedily,
by the teacher or by `generation.responder`.

(a) Query: the user prefix of the teacher's chat template (`chat_template.py`), with the template's
    own default system turn, or `generation.system_prompt`, or a system turn that steers the topic
    (`generation.topics`, request i taking topics[i % len]) and the language (our own sentences,
    `templates/generate/magpie/system.jinja`). Request i carries sample_index i: the backends seed
    a request from its ledger key, and identical keys would be answered from the cache.
(b) Screen: the request's text is cleaned (an end-of-turn token a backend left in is cut, a role
    header the teacher repeated is dropped), then rejected as `empty_query`, `leaked_template`
    (template control tokens left in it) or `unfinished_query` (it hit the token limit); then the
    instruction rules and the novelty filter, in request order.
(c) Answer: `answering.ask_answer`; an answer that fails an answer rule rejects the task with that
    rule's reason code (refusal, unfinished, repetition, off_topic, empty_output).
(d) `generation.turns` > 1: the teacher writes the next user turn from the prefix that continues
    the conversation, which is then answered, and so on. A later turn that fails its checks ends
    the conversation there: the turns before it are kept (the task's instruction and output are the
    first exchange; `conversation` holds every turn, `conversation_stop` why it ended early).
(e) With a judge (the loop's `ctx.judge`, from evaluation.judge), each answered task is tagged as
    in the paper: a task category (its taxonomy) and the request's quality, very poor to
    excellent (`category`, `input_quality`; None when the verdict cannot be read). The tags are
    stored, not used to filter.

A query that passed (b) stays in the novelty pool whatever its answer becomes, as in Self-Instruct.
Magpie needs the raw text of the teacher's template, so a chat-only API (which applies the template
on its server) cannot be its teacher; `check` says so before the first request.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from ..chat_template import (
    ChatTemplate,
    load_chat_template,
    template_markers,
    user_prefix,
    user_turn_end,
)
from ..config import Config, ConfigError, is_english
from ..filter.answers import ANSWER_CODES
from ..teachers import speaks_chat
from ..teachers.base import Request
from ..teachers.ledger import LedgerResult
from ..templating import render_template
from .answering import ask_answer, judge_config
from .recipe import (
    GENERATE_TEMPLATES,
    Context,
    Screened,
    make_request,
    new_key,
    record_from,
    step_sampling,
    unparsed_record,
)
from .steering import topic_for

NAME = "magpie"
SYSTEM_TEMPLATE = GENERATE_TEMPLATES / "magpie" / "system.jinja"
TAG_TEMPLATE = GENERATE_TEMPLATES / "magpie" / "tag.jinja"
QUERY_CODES = ("empty_query", "leaked_template", "unfinished_query")
ROLE_WORDS = r"(?:user|human)"
# The paper's task taxonomy and input quality scale (worst first).
CATEGORIES = (
    "information seeking",
    "reasoning",
    "planning",
    "editing",
    "coding and debugging",
    "math",
    "role playing",
    "data analysis",
    "creative writing",
    "advice seeking",
    "brainstorming",
    "others",
)
QUALITY_LEVELS = ("very poor", "poor", "average", "good", "excellent")
_CATEGORY_LINE = re.compile(r"^[\s*#]*category[\s*]*:[\s*]*(.+)$", re.IGNORECASE | re.MULTILINE)
_QUALITY_LINE = re.compile(r"^[\s*#]*quality[\s*]*:[\s*]*(.+)$", re.IGNORECASE | re.MULTILINE)
_REQUEST_TAG = re.compile(r"<(/?request)>", re.IGNORECASE)


def check(config: Config) -> None:
    """Fail in one line on a teacher whose template cannot be had or rendered."""
    teacher = config.teacher
    if teacher.backend == "openai" and speaks_chat(teacher) and not teacher.chat_template:
        raise ConfigError(
            "teacher.chat: magpie writes raw prompts in the teacher's own chat template, which a "
            "chat API applies on its server; use a completions endpoint serving an open model "
            "(teacher.chat: false and teacher.chat_template) or a local backend"
        )
    template = load_chat_template(teacher)
    user_prefix(template, system_turn(config, 0))  # a template that refuses a system turn fails
    user_turn_end(template)
    template_markers(template)


def template_for(config: Config) -> ChatTemplate:
    return load_chat_template(config.teacher)


def system_turn(config: Config, idx: int) -> str | None:
    """Request idx's system turn: None keeps the template's own default."""
    gen = config.generation
    topic = topic_for(gen, idx)
    language = None if is_english(gen.language) else gen.language
    if not (topic or language):
        return gen.system_prompt
    return render_template(
        SYSTEM_TEMPLATE, system_prompt=gen.system_prompt, topic=topic, language=language
    ).strip()


def query_request(ctx: Context, idx: int, system: str | None, history: list[dict]) -> Request:
    """The raw prompt that has the teacher write the next user turn of conversation idx."""
    template = template_for(ctx.config)
    sampling = step_sampling(ctx.config.generation.query_sampling, user_turn_end(template))
    prompt = user_prefix(template, system, history)
    return Request.make(prompt=prompt, sampling=sampling, sample_index=idx)


def build_request(idx: int, ctx: Context) -> Request:
    return query_request(ctx, idx, system_turn(ctx.config, idx), [])


@cache
def _query_format(template: ChatTemplate) -> tuple[tuple[str, ...], tuple[str, ...], re.Pattern]:
    """(the tokens that end a user turn, every control token, a leading role header)."""
    ends = tuple(user_turn_end(template))
    markers = tuple(template_markers(template))
    alternatives = "|".join(re.escape(m) for m in markers) or r"(?!)"
    header = re.compile(rf"^\s*(?:(?:{alternatives})(?:\s*{ROLE_WORDS}\b)?[\s:]*)+", re.IGNORECASE)
    return ends, markers, header


def clean_query(
    text: str, finish_reason: str | None, template: ChatTemplate
) -> tuple[str, str | None]:
    """A user turn as the teacher wrote it, cleaned, and the reason code it is rejected with (or
    None)."""
    ends, markers, header = _query_format(template)
    for end in ends:  # a backend that keeps the end token in the text
        text = text.split(end, 1)[0]
    text = header.sub("", text).strip()
    if not text:
        return "", "empty_query"
    if any(m in text for m in markers):
        return text, "leaked_template"
    if finish_reason == "length":
        return text, "unfinished_query"
    return text, None


def screen(idx: int, result: LedgerResult, ctx: Context) -> Screened:
    """Clean and judge the user request: query checks, instruction rules, then novelty."""
    completion = result.completion
    query, reason = clean_query(completion.text, completion.finish_reason, template_for(ctx.config))
    if reason:
        return Screened(idx, result.key, [unparsed_record(query, reason, completion.text)])
    ctx.screen.prepare([query])
    verdict = ctx.screen.check_instruction(query, new_key(idx, 0))
    pending = []
    if verdict.status == "kept":
        ctx.pool.append((idx, query))
        pending.append(0)
    return Screened(idx, result.key, [record_from(query, verdict, instances=[])], pending)


async def finish(screened: Screened, ctx: Context) -> list[dict]:
    """Answer the request; with generation.turns > 1, go on with the conversation."""
    if not screened.pending:
        return screened.records
    rec = screened.records[0]
    query, idx = rec["text"], screened.idx
    system = system_turn(ctx.config, idx)
    answer = await ask_answer(ctx, query, system=system)
    rec["instances"] = [
        {
            "input": "",
            "output": answer.text,
            "status": "rejected" if answer.reason else "kept",
            "reason": answer.reason,
        }
    ]
    if answer.reason:
        rec["status"], rec["reason"] = "rejected", answer.reason
        return screened.records
    judge = getattr(ctx, "judge", None)
    if judge is not None:
        rec["category"], rec["input_quality"] = await _tags(ctx, judge, query)
    if ctx.config.generation.turns > 1:
        history = [
            {"role": "user", "content": query},
            {"role": "assistant", "content": answer.text},
        ]
        rec["conversation"], stop = await _more_turns(ctx, idx, system, history)
        if stop:
            rec["conversation_stop"] = stop
    return screened.records


async def _more_turns(
    ctx: Context, idx: int, system: str | None, history: list[dict]
) -> tuple[list[dict], str | None]:
    """The conversation after its first exchange, and the reason code it ended early with."""
    assert ctx.ledger is not None, "the loop sets the ledger before any request"
    template = template_for(ctx.config)
    for _ in range(ctx.config.generation.turns - 1):
        result = await ctx.ledger.complete(
            query_request(ctx, idx, system, history), purpose="user_turn"
        )
        completion = result.completion
        text, reason = clean_query(completion.text, completion.finish_reason, template)
        reason = reason or ctx.screen.rules.check_instruction(text)
        if reason:
            return history, reason
        answer = await ask_answer(ctx, text, system=system, history=history)
        if answer.reason:
            return history, answer.reason
        history = [
            *history,
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer.text},
        ]
    return history, None


async def _tags(ctx: Context, judge: Any, query: str) -> tuple[str | None, str | None]:
    """The judge's task category and input quality for a request."""
    chat = speaks_chat(judge_config(ctx.config) or ctx.config.teacher)
    prompt = render_template(
        TAG_TEMPLATE,
        request=_REQUEST_TAG.sub(r"‹\1›", query),
        categories=CATEGORIES,
        levels=QUALITY_LEVELS,
        chat=chat,
    )
    sampling = {"temperature": 0.0, "max_tokens": ctx.config.evaluation.judge_max_tokens}
    result = await judge.complete(make_request(prompt, chat, sampling), purpose="tag")
    text = result.completion.text
    if not chat:  # a completion judge continues "Category:"
        text = "Category:" + text
    return parse_tags(text)


def parse_tags(text: str) -> tuple[str | None, str | None]:
    """(category, quality) from a judge's verdict; None for a line missing or not on the list."""

    def read(line: re.Pattern, allowed: tuple[str, ...]) -> str | None:
        found = line.search(text)
        if not found:
            return None
        value = re.sub(r"[^a-z ]+", " ", found.group(1).lower().replace("&", " and "))
        value = " ".join(value.split())
        # the longest match first: "very poor" is not "poor"
        return next(
            (a for a in sorted(allowed, key=len, reverse=True) if value.startswith(a)), None
        )

    return read(_CATEGORY_LINE, CATEGORIES), read(_QUALITY_LINE, QUALITY_LEVELS)


def in_pool(row: dict) -> bool:
    """Requests that passed the query checks and the filter stay in the pool, answered or not."""
    return row["status"] == "kept" or row["reason"] in ANSWER_CODES
