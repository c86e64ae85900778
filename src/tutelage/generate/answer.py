"""The `answer` recipe: the teacher answers your own prompts (distillation on your own data, as
in OpenAI's distillation guide; Alpaca-GPT4 re-answered Alpaca's 52K instructions this way).

Request idx answers prompt idx of `generation.prompts` (a file, a `datasets` folder, a Hub dataset
or another run's kept instructions: `prompt_sources.load_prompts`, which asks exact repeats once;
unset, the run's seed tasks),
in file order, as one chat turn; the run ends when the prompts run out (or at the target). Since a
request is known by its number, a resumed run needs the same prompts: a prompt file may only grow at
its end between runs of one run folder. Each prompt is screened before its answer counts:
- the rules written for generated instructions (too_short, blacklisted_word, write_a_program, ...)
  do not apply, since the user chose these prompts; only control characters reject one;
- the novelty filter judges the prompt's whole text (instruction and input: a file may hold one
  instruction with many inputs) against the prompts before it, not against the seed tasks;
  `filter.rouge_threshold: null` switches it off.
The answer then meets the answer rules (`filter.answers`: refusal, unfinished, repetition,
off_topic, empty_output). With `generation.samples` = n > 1 the teacher answers n times
(sample_index 0..n-1, sampled at teacher.sampling's temperature, else 1.0, as greedy samples would
be identical) and the judge (`answering.judge_config`) picks the best of those that pass the rules;
without a judge the first that passes is kept. The others are stored too, rejected as `not_best`
or with the rule they failed; the kept answer comes first.

Store shape: one instruction per prompt, its answers as instances. The instruction is "kept" when
the prompt passed its screen (it is then in the novelty pool); the example is kept when its first
instance is too.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Hashable
from pathlib import Path

from ..config import Config, ConfigError
from ..filter.answers import NOT_BEST
from ..filter.quality import QualityRules, control_characters
from ..filter.screen import Screen, Verdict
from ..prompt_sources import Prompt, load_prompts
from ..seeds import seed_file
from ..teachers import speaks_chat
from ..teachers.base import Request
from ..teachers.ledger import LedgerResult
from ..templating import render_template
from .answering import (
    ChatAnswer,
    answer_request,
    answer_sampling,
    ask_answer,
    judge_config,
    screen_answer,
    user_content,
)
from .recipe import GENERATE_TEMPLATES, Context, Screened, make_request, new_key, record_from

NAME = "answer"
JUDGE_TEMPLATE = GENERATE_TEMPLATES / "answer" / "pick_best.jinja"
SEEDS_IN_POOL = False  # the novelty filter compares prompts with each other only
# The answer recipe screens prompts with the novelty filter alone (control characters aside).
_NO_RULES = QualityRules(
    min_words=0,
    max_words=2**31,
    blacklist=(),
    check_write_a_program=False,
    check_punctuation_start=False,
    check_non_ascii_start=False,
    check_output=False,
    check_list_markers=False,
    check_control_chars=False,
)
_BEST = re.compile(r"\bbest\b\W*(\d+)", re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"^\W*(\d+)\b")
# Our reply tags inside an answer or a prompt would let it pose as another reply: break them.
_TAGS = re.compile(r"<(\s*/?\s*(?:request|request_input|reply_\d+)\s*)>", re.IGNORECASE)

# The prompts of generation.prompts as check() last read them (once per generate call).
_loaded: dict[Path, list[Prompt]] = {}


def prompts_path(config: Config) -> Path:
    """generation.prompts, or, when unset, the run's seed tasks (seeds.path; the built-in ones
    when that is unset too): one prompt per seed instance, its input included."""
    if config.generation.prompts is not None:
        return Path(config.generation.prompts)
    return seed_file(config.seeds.path)


def check(config: Config) -> None:
    """Fail in one line, before any request, on missing or unreadable prompts or a responder."""
    gen = config.generation
    if gen.responder is not None:
        raise ConfigError(
            "generation.responder: the answer recipe's teacher writes the answers; "
            "make that model the teacher instead"
        )
    path = prompts_path(config)
    if path.resolve() == Path(config.run_dir).resolve():
        raise ConfigError(f"generation.prompts: {path} is this run's own folder")
    try:
        _loaded[path] = load_prompts(path, "generation.prompts")
    except ValueError as e:
        raise ConfigError(f"generation.prompts: {e}") from None
    if gen.samples > 1:
        # the judge's template is rendered once now, so that an error shows before any request
        render_template(JUDGE_TEMPLATE, instruction="", input="", answers=["", ""], chat=True)


def prompts(config: Config) -> list[Prompt]:
    path = prompts_path(config)
    if path not in _loaded:
        check(config)
    return _loaded[path]


def in_pool(row: dict) -> bool:
    """A prompt that passed its screen is in the novelty pool, whatever its answers became."""
    return row["status"] == "kept"


def pool_text(row: dict) -> str:
    """What the novelty filter compares: the prompt's whole text."""
    return user_content(row["instruction"], row["input"] or "")


def sampling(config: Config) -> dict:
    """The answers' sampling: generation.answer_sampling, at a temperature above 0 when several
    answers are asked for (greedy ones would all be the same)."""
    values = answer_sampling(config)
    if config.generation.samples > 1:
        values["temperature"] = config.teacher.sampling.temperature or 1.0
    return values


def _request_options(config: Config, sample_index: int) -> dict:
    return {
        "system": config.generation.system_prompt,
        "sample_index": sample_index,
        "sampling": sampling(config),
    }


def build_request(idx: int, ctx: Context) -> Request | None:
    """The chat request for prompt idx's first answer; None once the prompts have run out."""
    all_prompts = prompts(ctx.config)
    if idx >= len(all_prompts):
        return None
    prompt = all_prompts[idx]
    return answer_request(ctx, prompt.instruction, prompt.input, **_request_options(ctx.config, 0))


def screen(idx: int, result: LedgerResult, ctx: Context) -> Screened:
    """Screen prompt idx (control characters, then novelty); a prompt that passes waits in
    `finish` for its other answers, if any, and the choice of the best."""
    prompt = prompts(ctx.config)[idx]
    answer = screen_answer(ctx, prompt.instruction, prompt.input, result)
    verdict = screen_prompt(ctx.screen, prompt, new_key(idx, 0))
    if verdict.status != "kept":
        instance = _instance(prompt, answer, "rejected", verdict.reason)
        return Screened(idx, result.key, [record_from(prompt.instruction, verdict, **instance)])
    ctx.pool.append((idx, prompt.instruction))
    record = record_from(prompt.instruction, verdict, instances=[])
    return Screened(idx, result.key, [record], pending=[answer])


def screen_prompt(screen: Screen, prompt: Prompt, key: Hashable) -> Verdict:
    """A user's prompt through `screen`: control characters, then the novelty of its whole text
    (the filter stage can re-decide a stored prompt with it)."""
    if screen.rules.check_control_chars and control_characters(prompt.instruction, prompt.input):
        return Verdict("rejected", "control_characters")
    text = user_content(prompt.instruction, prompt.input)
    screen.prepare([text])
    return Screen(_NO_RULES, screen.index, screen.extra).check_instruction(text, key)


def _instance(prompt: Prompt, answer: ChatAnswer, status: str, reason: str | None) -> dict:
    return {
        "instances": [
            {"input": prompt.input, "output": answer.text, "status": status, "reason": reason}
        ]
    }


async def finish(screened: Screened, ctx: Context) -> list[dict]:
    """The other samples, then the best answer first (kept) and the rest rejected."""
    [record] = screened.records
    if not screened.pending:
        return screened.records  # the prompt was rejected: its one answer is stored with it
    prompt = prompts(ctx.config)[screened.idx]
    first: ChatAnswer = screened.pending[0]
    n = ctx.config.generation.samples
    outcomes = await asyncio.gather(
        *(
            ask_answer(
                ctx,
                prompt.instruction,
                prompt.input,
                ledger=ctx.ledger,  # the teacher answers, as it did sample 0
                **_request_options(ctx.config, k),
            )
            for k in range(1, n)
        ),
        return_exceptions=True,
    )
    for outcome in outcomes:  # each request sent was stored: a rerun will not pay for it
        if isinstance(outcome, BaseException):
            raise outcome
    answers = [first, *outcomes]
    best = await pick_best(ctx, prompt, answers)
    order = ([best] if best is not None else []) + [k for k in range(n) if k != best]
    record["instances"] = []
    for k in order:
        answer = answers[k]
        if k == best:
            status, reason = "kept", None
        else:
            status, reason = "rejected", answer.reason or NOT_BEST
        record["instances"] += _instance(prompt, answer, status, reason)["instances"]
    return screened.records


async def pick_best(ctx: Context, prompt: Prompt, answers: list[ChatAnswer]) -> int | None:
    """The index of the best answer among those that pass the answer rules (None: none passes):
    the judge's choice when there is a judge and a choice, else the first that passes."""
    passing = [k for k, a in enumerate(answers) if a.reason is None]
    judge = getattr(ctx, "judge", None)
    if len(passing) <= 1 or judge is None:
        return passing[0] if passing else None
    chat = speaks_chat(judge_config(ctx.config) or ctx.config.teacher)
    text = render_template(
        JUDGE_TEMPLATE,
        instruction=_fence(prompt.instruction),
        input=_fence(prompt.input),
        answers=[_fence(answers[k].text) for k in passing],
        chat=chat,
    )
    sampling_values = {
        "temperature": 0.0,
        "max_tokens": ctx.config.evaluation.judge_max_tokens,
    }
    result = await judge.complete(make_request(text, chat, sampling_values), purpose="judge")
    choice = parse_choice(result.completion.text, len(passing))
    # An unreadable verdict keeps the first answer that passes, as without a judge.
    return passing[choice - 1] if choice else passing[0]


def parse_choice(text: str, n: int) -> int | None:
    """The reply number (1..n) a judge named: its last "Best: N", else a number it starts with
    (a completion judge continues "Best:")."""
    found = _BEST.findall(text) or _LEADING_NUMBER.findall(text)
    if not found:
        return None
    choice = int(found[-1])
    return choice if 1 <= choice <= n else None


def _fence(text: str) -> str:
    return _TAGS.sub(r"‹\1›", text or "")
