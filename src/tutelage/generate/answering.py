"""Answers in the teacher's own voice: one chat request per task, screened by the answer rules.

Magpie, Evol-Instruct and `answer` always take their outputs from here, and so do Alpaca and
Self-Instruct with `generation.answer: chat` (Alpaca-GPT4's re-answering): a task's output is
what the teacher (or `generation.responder`) says when a user asks it in chat, not a list item.
The request goes through the ledger like any other (stored first, never paid twice), as a
follow-up of the request that produced the task, with purpose "answer".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Config, TeacherConfig
from ..filter.answers import AnswerRules
from ..teachers import speaks_chat
from ..teachers.base import Request
from ..teachers.ledger import Ledger, LedgerResult
from .recipe import Context


@dataclass
class ChatAnswer:
    text: str
    finish_reason: str | None
    request_key: str
    reason: str | None  # the answer rule it failed, or None


def user_content(instruction: str, task_input: str = "") -> str:
    """What the user says: the instruction, and its input below it when there is one."""
    return f"{instruction}\n\n{task_input}" if task_input else instruction


def answer_sampling(config: Config) -> dict:
    """`generation.answer_sampling` as request parameters (greedy unless the file says else)."""
    return config.generation.answer_sampling.model_dump(exclude_none=True)


def answer_request(
    ctx: Context,
    instruction: str,
    task_input: str = "",
    *,
    system: str | None = None,
    history: Sequence[dict] = (),
    sample_index: int = 0,
    sampling: dict | None = None,
) -> Request:
    """The chat request for a task's answer: an optional system turn, earlier turns, the task."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [*history, {"role": "user", "content": user_content(instruction, task_input)}]
    if sampling is None:
        sampling = answer_sampling(ctx.config)
    return Request.make(messages=messages, sampling=sampling, sample_index=sample_index)


async def ask_answer(
    ctx: Context,
    instruction: str,
    task_input: str = "",
    *,
    ledger: Ledger | None = None,
    **request_options,
) -> ChatAnswer:
    """Ask for the answer and screen it. `ledger`: who answers; None: the responder (else the
    teacher)."""
    ledger = ledger or ctx.responder or ctx.ledger
    assert ledger is not None, "the loop sets the ledger before any request"
    request = answer_request(ctx, instruction, task_input, **request_options)
    result = await ledger.complete(request, purpose="answer")
    return screen_answer(ctx, instruction, task_input, result)


def screen_answer(
    ctx: Context, instruction: str, task_input: str, result: LedgerResult
) -> ChatAnswer:
    """The answer in `result`, stripped, with the first answer rule it fails (or None)."""
    completion = result.completion
    text = completion.text.strip()
    reason = answer_rules(ctx).check(
        user_content(instruction, task_input), text, completion.finish_reason
    )
    return ChatAnswer(text, completion.finish_reason, result.key, reason)


def answer_rules(ctx: Context) -> AnswerRules:
    return AnswerRules.from_config(ctx.config.filter)


def judge_config(config: Config) -> TeacherConfig | None:
    """Who picks the best of `generation.samples` answers: `evaluation.judge`, else the teacher
    when it speaks chat. A completion-mode teacher (the embedded 135M one) is not asked to judge:
    without a judge the first answer that passes the answer rules is kept."""
    if config.evaluation.judge is not None:
        return config.evaluation.judge
    return config.teacher if speaks_chat(config.teacher) else None
