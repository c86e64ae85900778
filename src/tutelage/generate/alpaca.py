"""The Stanford Alpaca batch recipe: one request asks for many numbered tasks at once.

The prompt lists the requirements and a few seed tasks as numbered Instruction/Input/Output blocks,
then opens the next block; the teacher continues the list. Parsing is tolerant on purpose: small or
sloppy teachers renumber blocks, drop the `###` separators or the Input field, and every piece that
cannot be read is still returned (as a parse error) so that nothing is dropped silently.

With `generation.answer: chat` (Alpaca-GPT4's re-answering) the list's outputs are not used: each
task is judged without its output (the instruction and input rules, then novelty), and a kept
task's output is the teacher's (or the responder's) answer in a chat turn of its own; an answer
that fails an answer rule rejects the task's instance with that rule's reason code, while its
instruction, which passed, stays in the novelty pool.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Hashable
from dataclasses import dataclass

from ..config import Config
from ..filter.quality import control_characters, leaked_list_marker
from ..filter.screen import Screen, Verdict
from ..teachers.base import Completion, Request
from ..teachers.ledger import LedgerResult
from .answering import ask_answer
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
from .steering import topic_for

NAME = "alpaca"
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 2048}
DEFAULT_TASKS = 20
NO_INPUT = "<noinput>"

# "12. Instruction:" at the start of a line (number optional, any case, markdown bold tolerated).
FIELD = re.compile(
    r"^[ \t]*(?:#+[ \t]*)?\**[ \t]*(?:\d+[ \t]*[.)][ \t]*)?\**[ \t]*(instruction|input|output)"
    r"[ \t]*\**[ \t]*:[ \t]*\**[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
LIST_NUMBER = re.compile(r"^\d+[.)]\s+")
SEPARATOR = re.compile(r"^[ \t]*#{2,}[ \t]*$", re.MULTILINE)


@dataclass
class Parsed:
    """One task read from a response, or the raw text of a piece that could not be read."""

    instruction: str
    input: str = ""
    output: str = ""
    error: str | None = None  # a reason code: parse_error, length_truncated
    raw: str | None = None


TEMPLATE_FILES = {"prompt_template": "alpaca.jinja"}


def check(config: Config) -> None:
    check_templates(config, TEMPLATE_FILES)


def build_request(idx: int, ctx: Context) -> Request:
    """Request number `idx` of the loop. Its demonstrations depend only on (seed, idx), so a
    rerun asks exactly the same request and the ledger answers it from the store."""
    config = ctx.config
    gen = config.generation
    rng = random.Random(f"{config.seed}:{NAME}:{idx}")
    demos = [
        {
            "instruction": s["instruction"],
            "input": s["instances"][0]["input"],
            "output": s["instances"][0]["output"],
        }
        for s in rng.sample(ctx.seeds, min(gen.demonstrations, len(ctx.seeds)))
    ]
    prompt = render(
        config,
        "prompt_template",
        TEMPLATE_FILES["prompt_template"],
        n_tasks=tasks_per_request(gen),
        demonstrations=demos,
        topics=topic_for(gen, idx),
        language=gen.language,
        chat=ctx.chat,
    )
    return make_request(
        prompt, ctx.chat, main_sampling(DEFAULT_SAMPLING, config.teacher.sampling), sample_index=idx
    )


def tasks_per_request(gen) -> int:
    return gen.tasks_per_request or DEFAULT_TASKS


def screen(idx: int, result: LedgerResult, ctx: Context) -> Screened:
    """Parse one answer and judge every task in it, in order: a kept task joins the pool."""
    completion = result.completion
    tasks = parse(
        completion.text,
        completion.finish_reason,
        continued=not ctx.chat,
        first_number=ctx.config.generation.demonstrations + 1,
    )
    ctx.screen.prepare([t.instruction for t in tasks if not t.error])  # embeds at once, if used
    chat_answers = ctx.config.generation.answer == "chat"
    records = []
    for pos, task in enumerate(tasks):
        if task.error:
            records.append(unparsed_record(task.instruction, task.error, task.raw))
            continue
        if chat_answers:  # the output comes later, from a chat turn: judge the task without it
            verdict = check_without_output(
                ctx.screen, task.instruction, task.input, new_key(idx, pos)
            )
        else:
            verdict = ctx.screen.check(task.instruction, task.input, task.output, new_key(idx, pos))
        records.append(
            record_from(
                task.instruction,
                verdict,
                instances=[
                    {
                        "input": task.input,
                        "output": task.output,
                        "status": verdict.status,
                        "reason": verdict.reason,
                    }
                ],
            )
        )
        if verdict.status == "kept":
            ctx.pool.append((idx, task.instruction))
    return Screened(idx, result.key, records)


def check_without_output(
    screen: Screen, instruction: str, task_input: str, key: Hashable
) -> Verdict:
    """The instruction rules, the input's rules, then novelty: every rule but the output's (the
    filter stage can re-decide a stored task answered in chat with it)."""
    rules = screen.rules
    reason = (
        rules.check_instruction(instruction)
        or (rules.check_list_markers and leaked_list_marker(task_input))
        or (rules.check_control_chars and control_characters(task_input))
    )
    if reason:
        return Verdict("rejected", reason)
    return screen.check_instruction(instruction, key)


async def finish(screened: Screened, ctx: Context) -> list[dict]:
    """With list answers a request gives whole tasks: nothing more to ask. With chat answers each
    kept task is asked again, alone, and its answer replaces the list's output."""
    if ctx.config.generation.answer != "chat":
        return screened.records
    kept = [rec for rec in screened.records if rec["status"] == "kept"]
    system = ctx.config.generation.system_prompt
    answers = await asyncio.gather(
        *(
            ask_answer(ctx, rec["text"], rec["instances"][0]["input"], system=system)
            for rec in kept
        ),
        return_exceptions=True,
    )
    for answer in answers:  # each request sent was stored: a rerun will not pay for it
        if isinstance(answer, BaseException):
            raise answer
    for rec, answer in zip(kept, answers):
        instance = rec["instances"][0]
        instance["output"] = answer.text
        if answer.reason:
            instance["status"], instance["reason"] = "rejected", answer.reason
    return screened.records


def in_pool(row: dict) -> bool:
    """A stored task is in the novelty pool iff its instruction was kept (with chat answers it
    stays there when an answer rule rejects its instance)."""
    return row["status"] == "kept"


def parse(text: str, finish_reason: str | None, continued: bool, first_number: int) -> list[Parsed]:
    """Read the numbered tasks out of one response.

    `continued`: the response continues a prompt that ended with "N. Instruction:" (completion
    teachers), so its first characters are the first instruction.
    """
    if finish_reason in Completion.EMPTY_REASONS:  # no text, and why: stored under that reason
        return [Parsed("", error=finish_reason, raw=text)]
    text = SEPARATOR.sub("", text)
    # A continuation starts inside the open block, unless the teacher restarted it with a marker.
    if continued and not FIELD.match(text.lstrip("\n")):
        text = f"{first_number}. Instruction: " + text
    markers = list(FIELD.finditer(text))
    # Split at every Instruction marker: one chunk per task, whatever the separators and numbers.
    starts = [m.start() for m in markers if m.group(1).lower() == "instruction"]
    chunks = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]
    tasks = [_parse_chunk(chunk) for chunk in chunks]
    if tasks and finish_reason == "length":
        # The teacher stopped mid-task: its last block may be cut anywhere.
        last = tasks[-1]
        tasks[-1] = Parsed(
            last.instruction, last.input, last.output, "length_truncated", chunks[-1].strip()
        )
    return tasks


def _parse_chunk(chunk: str) -> Parsed:
    fields: dict[str, str] = {}
    marks = list(FIELD.finditer(chunk))
    for m, nxt in zip(marks, [*marks[1:], None]):
        name = m.group(1).lower()
        value = chunk[m.end() : nxt.start() if nxt else len(chunk)].strip()
        if name in fields:  # a field twice in one task: the block is garbled
            return Parsed("", error="parse_error", raw=chunk.strip())
        fields[name] = value
    instruction = fields.get("instruction", "")
    if not instruction or "output" not in fields:
        return Parsed(instruction, error="parse_error", raw=chunk.strip())
    task_input = fields.get("input", "")
    if task_input.strip().lower() in (NO_INPUT, "<no input>", "none", "n/a", ""):
        task_input = ""
    return Parsed(_one_line(instruction), task_input, fields["output"])


def _one_line(text: str) -> str:
    """Instructions are one line; a list number the teacher repeated inside one is not content."""
    return LIST_NUMBER.sub("", re.sub(r"\s+", " ", text).strip())
