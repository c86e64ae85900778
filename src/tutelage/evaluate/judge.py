"""The LLM judge: pairwise verdicts between two answers, and a rubric grade for one answer.

Pairwise: the judge sees the task and two answers, shown as A and B, writes a short comparison and
ends with "Verdict: A", "Verdict: B" or "Verdict: tie". Judges favour a position (often the first),
so every pair is judged in both orders and the two verdicts are averaged: a judge that always says
"A" scores every pair 0.5, and its bias cancels instead of deciding the result.

Rubric: the judge grades one answer on the Self-Instruct paper's scale (A valid and satisfying, B
acceptable with minor flaws, C relevant but with significant errors, D irrelevant or invalid) and
ends with "Grade: X".

Every question goes through the ledger, so a rerun over the same store asks nothing new. An answer
that does not parse is asked again, and since identical requests are answered from the store, a
retry must be a different request: attempt k uses sample_index=k and a sampling temperature. What
still does not parse is a failed judgement (None), never a win, a loss or a grade.

Log-prob verdicts (`judge_pair_logprobs`, evaluation.judge_mode "logprobs"): the judge is asked
for one letter after a fixed prefix, and instead of reading what it wrote we read how likely it
found "A" and "B" as that token (its top log-probs, every variant of a letter summed: "A", " A").
Each order gives P(first better) = P(its letter) / (P("A") + P("B")), and the item scores the
mean of the two orders, a probability in [0, 1]. Nothing can fail to parse: a judge that puts no
mass on either letter is undecided (0.5). The two orders disagreeing (each preferring the answer
shown first, say) is the judge's position bias, which the summary reports.

Everything the models wrote is data: it is placed into the prompt between tags (tags inside it are
broken first) and only ever parsed with regular expressions.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..teachers.base import Request, TeacherError
from ..teachers.ledger import Ledger
from ..templating import TEMPLATE_DIR, render_template

PAIRWISE_TEMPLATE = TEMPLATE_DIR / "evaluate" / "pairwise.jinja"
RUBRIC_TEMPLATE = TEMPLATE_DIR / "evaluate" / "rubric.jinja"
LOGPROBS_TEMPLATE = TEMPLATE_DIR / "evaluate" / "pairwise_logprobs.jinja"
# How many of the verdict token's candidates are read: OpenAI's chat API gives at most 20.
TOP_LOGPROBS = 20
MAX_TOKENS = 512  # a few sentences and the verdict line; a judge that rambles past it is retried
RETRY_TEMPERATURE = 0.7  # a retry at temperature 0 would likely repeat the unparseable answer
GRADES = ("A", "B", "C", "D")


# -- parsing the judge's answer -----------------------------------------------------------------
_VERDICT_LABELS = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "tied": "tie", "equal": "tie"}
_GRADE_LABELS = {g.lower(): g for g in GRADES}
# Words that may stand before the label: "Verdict: Answer B", "Verdict: Assistant A".
_LEADING = re.compile(r"^(?:answer|response|assistant|output|option|grade)\s+")
# "A or B", "A/B", "B, C.": two labels at once is no decision ("B, a clearer answer" is one).
_SECOND_LABEL = re.compile(
    r"^\s*(?:(?:/|\||&|\bor\b|\band\b|\bvs\b\.?)\s*(?:answer\s+)?(\w+)\b"
    r"|,\s*(\w+)\s*(?:$|[.,;:!?]))"
)


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or "tie" from the judge's last verdict line ("Verdict: A", "**Verdict:** [[B]]",
    "verdict: Tie."), or None when there is no verdict line or the last one is ambiguous."""
    return _parse_label(text, "verdict", _VERDICT_LABELS)


def parse_grade(text: str) -> str | None:
    """ "A" to "D" from the judge's last grade line ("Grade: B", "**Grade:** C."), else None."""
    return _parse_label(text, "grade", _GRADE_LABELS)


def _parse_label(text: str, keyword: str, labels: dict[str, str]) -> str | None:
    """The label on the last line that gives one: "<keyword>: X" (or "<keyword> is X", with the
    label on the next line when this one stops at the colon), or a line holding only "[[X]]"."""
    line_re = re.compile(rf"\b{keyword}\b[\s*_]*(?::|=|[-–—](?=\s)|\bis\b)(.*)$", re.IGNORECASE)
    bare_re = re.compile(r"^\W*\[\[\s*(\w+)\s*\]\]\W*$")
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if (m := line_re.search(line)) is not None:
            # Two keywords on one line ('end with "Verdict: A" or "Verdict: B"') decide nothing.
            if len(re.findall(rf"\b{keyword}\b", line, re.IGNORECASE)) > 1:
                return None
            rest = m.group(1)
            if not _clean(rest):  # "**Verdict:**" then the label on the next non-empty line
                rest = next((nxt for nxt in lines[i + 1 :] if _clean(nxt)), "")
            return _label(rest, labels)
        if (m := bare_re.match(line)) is not None and m.group(1).lower() in labels:
            return labels[m.group(1).lower()]
    return None


def _clean(s: str) -> str:
    """Markdown emphasis, brackets and quotes out; lower case; spaces squeezed."""
    return " ".join(re.sub(r"[*_`\"'\[\](){}<>]", " ", s).lower().split())


def _label(rest: str, labels: dict[str, str]) -> str | None:
    s = _clean(rest)
    if labels is _VERDICT_LABELS and re.match(r"^(?:it s |it is )?a (?:tie|draw)\b", s):
        return "tie"  # "a tie": the article, not answer A
    s = _LEADING.sub("", s)
    m = re.match(r"^(\w+)\b(.*)$", s)
    if m is None or m.group(1) not in labels:
        return None
    second = _SECOND_LABEL.match(m.group(2))
    if second and (second.group(1) or second.group(2)) in labels:
        return None
    return labels[m.group(1)]


# -- asking -------------------------------------------------------------------------------------
def _both_orders(
    template, chat: bool, instruction: str, input: str, first: str, second: str, reference
) -> list[str]:
    """A pair's two prompts: `first` shown as answer A, then as answer B."""
    task = {
        "instruction": _fence(instruction),
        "input": _fence(input),
        "reference": _fence(reference) if reference else None,
        "chat": chat,
    }
    first, second = _fence(first), _fence(second)
    return [
        render_template(template, answer_a=a, answer_b=b, **task).rstrip()
        for a, b in ((first, second), (second, first))
    ]


def _fence(text: str | None) -> str:
    """Break our own tags inside model-written (or user-written) text, so that an answer cannot
    close its block and pose as the task or as the other answer."""
    tags = r"task|task_input|reference_answer|answer|answer_a|answer_b"
    return re.sub(rf"<(\s*/?\s*(?:{tags})\s*)>", r"‹\1›", text or "", flags=re.IGNORECASE)


def _request(
    prompt: str, chat: bool, attempt: int, temperature: float, max_tokens: int | None
) -> Request:
    sampling = {
        "temperature": temperature if attempt == 0 else max(temperature, RETRY_TEMPERATURE),
        "max_tokens": max_tokens or MAX_TOKENS,
    }
    if chat:
        return Request.make(
            messages=[{"role": "user", "content": prompt}], sampling=sampling, sample_index=attempt
        )
    # A completion model that is done judging goes on to invent the next task: stop it there.
    sampling["stop"] = ["\n<task>"]
    return Request.make(prompt=prompt, sampling=sampling, sample_index=attempt)


@dataclass
class Asked:
    """One judge question, asked until its answer parsed or the retries ran out."""

    label: str | None  # the parsed verdict or grade; None: never parsed
    rationale: str  # the judge's last answer, verdict line included
    keys: list[str] = field(default_factory=list)  # ledger keys, one per attempt

    @property
    def attempts(self) -> int:
        return len(self.keys)


async def _ask(
    ledger: Ledger,
    prompt: str,
    parse: Callable[[str], str | None],
    *,
    chat: bool,
    retries: int,
    temperature: float,
    max_tokens: int | None,
    purpose: str,
) -> Asked:
    asked = Asked(None, "")
    for attempt in range(1 + max(0, retries)):
        result = await ledger.complete(
            _request(prompt, chat, attempt, temperature, max_tokens), purpose=purpose
        )
        asked.keys.append(result.key)
        asked.rationale = result.completion.text
        asked.label = parse(asked.rationale)
        if asked.label is not None:
            break
    return asked


async def _gather(*coroutines):
    """All finish (what was sent is stored) before the first error, if any, is raised."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# -- pairwise -----------------------------------------------------------------------------------
@dataclass
class OrderVerdict:
    """The verdict with `first` shown in one position."""

    first_as: str  # "A" or "B": where the first answer was shown
    verdict: str | None  # "A", "B", "tie" as the judge said it; None: failed
    rationale: str
    keys: list[str]
    attempts: int

    @property
    def score(self) -> float | None:
        """1 the first answer won, 0.5 tie, 0 it lost; None when the judge never decided."""
        if self.verdict is None:
            return None
        return 0.5 if self.verdict == "tie" else float(self.verdict == self.first_as)


@dataclass
class PairJudgement:
    """Both orders of one pair. `score` is for the first answer: the mean over the two orders
    (0, .25, .5, .75 or 1), None when either order failed."""

    orders: tuple[OrderVerdict, OrderVerdict]

    @property
    def score(self) -> float | None:
        scores = [o.score for o in self.orders]
        return None if None in scores else sum(scores) / 2

    @property
    def consistent(self) -> bool:
        """The two orders agree once un-swapped (False when either failed)."""
        a, b = (o.score for o in self.orders)
        return a is not None and a == b

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "consistent": self.consistent,
            "orders": [asdict(o) | {"score": o.score} for o in self.orders],
        }


async def judge_pair(
    ledger: Ledger,
    *,
    chat: bool,
    instruction: str,
    input: str = "",
    first: str,
    second: str,
    reference: str | None = None,
    retries: int = 2,
    temperature: float = 0.0,
    max_tokens: int | None = MAX_TOKENS,
) -> PairJudgement:
    """Judge `first` against `second` in both orders (first shown as A, then as B)."""
    prompts = _both_orders(PAIRWISE_TEMPLATE, chat, instruction, input, first, second, reference)
    asked = await _gather(
        *(
            _ask(
                ledger,
                p,
                parse_verdict,
                chat=chat,
                retries=retries,
                temperature=temperature,
                max_tokens=max_tokens,
                purpose="judge",
            )
            for p in prompts
        )
    )
    return PairJudgement(
        tuple(
            OrderVerdict(position, a.label, a.rationale, a.keys, a.attempts)
            for position, a in zip(("A", "B"), asked)
        )
    )


# -- pairwise, from log-probs -------------------------------------------------------------------
# Around a letter in a token: "A", " A", "A.", "**A", "(A)". A lower-case "a" is the article.
_LETTER_WRAPPING = " \t\n*_`\"'()[]{}<>.,:;"


def letter_probabilities(top: list[tuple[str, float]]) -> tuple[float, float]:
    """P("A") and P("B") as the next token: the probabilities of every candidate token that is
    the letter, alone or wrapped in spaces, quotes, brackets or emphasis, summed."""
    p = {"A": 0.0, "B": 0.0}
    for token, logprob in top:
        letter = token.strip(_LETTER_WRAPPING)
        if letter in p:
            p[letter] += math.exp(logprob)
    return p["A"], p["B"]


@dataclass
class LogprobOrder:
    """The one-token verdict with `first` shown in one position."""

    first_as: str  # "A" or "B": where the first answer was shown
    p_a: float  # P("A") as the judge's next token, every variant summed
    p_b: float
    keys: list[str]  # the ledger key of the request

    @property
    def mass(self) -> float:
        """How much of the judge's next-token probability went to either letter."""
        return self.p_a + self.p_b

    @property
    def score(self) -> float:
        """P(the first answer is the better one), the two letters renormalised; 0.5 when the
        judge gave neither letter any mass (undecided, never unparseable)."""
        if self.mass <= 0:
            return 0.5
        return (self.p_a if self.first_as == "A" else self.p_b) / self.mass

    @property
    def verdict(self) -> str | None:
        """The more likely letter ("A" or "B"), None when both are equally likely."""
        return None if self.p_a == self.p_b else "A" if self.p_a > self.p_b else "B"


@dataclass
class LogprobPairJudgement:
    """Both orders of one pair. `score` is the mean of the orders' P(first better): a
    probability, never None."""

    orders: tuple[LogprobOrder, LogprobOrder]

    @property
    def score(self) -> float:
        return sum(o.score for o in self.orders) / 2

    @property
    def consistent(self) -> bool:
        """Both orders prefer the same answer (or both are undecided). False is position bias:
        the judge's choice followed where an answer was shown, not which answer it was."""
        a, b = (o.score for o in self.orders)
        return (a > 0.5 and b > 0.5) or (a < 0.5 and b < 0.5) or a == b == 0.5

    def to_dict(self) -> dict:
        return {
            "mode": "logprobs",
            "score": self.score,
            "consistent": self.consistent,
            "orders": [
                asdict(o) | {"mass": o.mass, "score": o.score, "verdict": o.verdict}
                for o in self.orders
            ],
        }


async def judge_pair_logprobs(
    ledger: Ledger,
    *,
    chat: bool,
    instruction: str,
    input: str = "",
    first: str,
    second: str,
    reference: str | None = None,
) -> LogprobPairJudgement:
    """Judge `first` against `second` in both orders (first shown as A, then as B), each a
    one-token greedy request for the top log-probs of the verdict letter."""
    prompts = _both_orders(LOGPROBS_TEMPLATE, chat, instruction, input, first, second, reference)
    asked = {"sampling": {"temperature": 0.0, "max_tokens": 1}, "top_logprobs": TOP_LOGPROBS}
    requests = [
        Request.make(messages=[{"role": "user", "content": p}], **asked)
        if chat
        else Request.make(prompt=p, **asked)
        for p in prompts
    ]
    results = await _gather(*(ledger.complete(r, purpose="judge") for r in requests))
    orders = []
    for position, result in zip(("A", "B"), results):
        top = result.completion.top_logprobs
        if top is None:
            teacher = ledger.teacher
            raise TeacherError(
                f"evaluation.judge_mode: logprobs, but the judge {teacher.backend}:{teacher.model} "
                "returned no log-probs; set evaluation.judge_mode: text"
            )
        orders.append(LogprobOrder(position, *letter_probabilities(top), [result.key]))
    return LogprobPairJudgement(tuple(orders))


# -- rubric -------------------------------------------------------------------------------------
@dataclass
class Grade:
    grade: str | None  # "A".."D"; None: the judge never gave a grade that parsed
    rationale: str
    keys: list[str]
    attempts: int

    @property
    def acceptable(self) -> bool | None:
        """A or B: the share Self-Instruct reports as acceptable."""
        return None if self.grade is None else self.grade in ("A", "B")

    def to_dict(self) -> dict:
        return asdict(self) | {"acceptable": self.acceptable}


async def grade_answer(
    ledger: Ledger,
    *,
    chat: bool,
    instruction: str,
    input: str = "",
    answer: str,
    reference: str | None = None,
    retries: int = 2,
    temperature: float = 0.0,
    max_tokens: int | None = MAX_TOKENS,
) -> Grade:
    """Grade `answer` A-D, retried like a verdict."""
    prompt = render_template(
        RUBRIC_TEMPLATE,
        instruction=_fence(instruction),
        input=_fence(input),
        answer=_fence(answer),
        chat=chat,
        reference=_fence(reference) if reference else None,
    ).rstrip()
    a = await _ask(
        ledger,
        prompt,
        parse_grade,
        chat=chat,
        retries=retries,
        temperature=temperature,
        max_tokens=max_tokens,
        purpose="grade",
    )
    return Grade(a.label, a.rationale, a.keys, a.attempts)
