"""The teacher's answers: each task asked once through the run's ledger (greedy, as long as the
students may answer), cut and scored like the students' answers."""

from __future__ import annotations

import asyncio
import hashlib
import json

from ..config import Config, TeacherConfig
from ..store import Store
from ..student_prompt import student_prompt
from ..teachers import Ledger, Request, Teacher, make_teacher, price_for, speaks_chat
from .answers import SECTION_MARKERS, cut_answer, reference_scores, unanswered
from .sets import EvalItem


def ledger_for(store: Store, config: Config, teacher_config: TeacherConfig, teacher) -> Ledger:
    """The ledger a teacher model (the teacher, or the judge) is asked through."""
    price = price_for(
        teacher_config.backend, teacher.model, teacher_config.price, batch=teacher_config.batch
    )
    # The run's budget covers evaluation too: the ledger's totals are the run's.
    return Ledger(
        teacher,
        store,
        price=price,
        budget_usd=config.generation.budget_usd,
        concurrency=teacher_config.concurrency,
    )


def answer_request(config: Config, item: EvalItem) -> Request:
    """What the teacher is asked: the task as a user message (chat teachers), or the student's
    Alpaca prompt to continue (completion teachers), greedy, as long as the students may be."""
    sampling = {"temperature": 0.0, "max_tokens": config.evaluation.max_new_tokens}
    if speaks_chat(config.teacher):
        content = f"{item.instruction}\n\n{item.input}" if item.input else item.instruction
        return Request.make(messages=[{"role": "user", "content": content}], sampling=sampling)
    return Request.make(
        prompt=student_prompt(item.instruction, item.input, "alpaca"),
        sampling={**sampling, "stop": ["\n" + m for m in SECTION_MARKERS]},
    )


async def answer_with_teacher(
    store: Store,
    config: Config,
    sets: dict[str, list[EvalItem]],
    progress,
    teacher: Teacher | None = None,
) -> None:
    work = unanswered(store, sets, "teacher")
    if not work:
        return
    owned = teacher is None
    teacher = teacher or make_teacher(config.teacher)
    try:
        ledger = ledger_for(store, config, config.teacher, teacher)
        done = 0

        async def answer(name: str, item: EvalItem) -> None:
            nonlocal done
            result = await ledger.complete(answer_request(config, item), purpose="evaluate")
            text = cut_answer(result.completion.text)
            store.put_eval_item(
                name,
                item.key,
                "teacher",
                item.instruction,
                item.input,
                item.reference,
                text,
                {**reference_scores(item, text, config), "nll": None, "request_key": result.key},
            )
            done += 1
            if progress:
                progress(done, len(work), "teacher")

        await gather_all(answer(name, item) for name, item in work)
    finally:
        if owned:
            await teacher.aclose()


async def gather_all(coroutines) -> None:
    """Run them together (the ledger bounds concurrency); every one finishes and is stored before
    the first error, if any, is raised."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def teacher_fingerprint(config: Config) -> str:
    """What the teacher's stored answers depend on."""
    t = config.teacher
    return hashlib.sha256(
        json.dumps([t.backend, t.model, speaks_chat(t), config.evaluation.max_new_tokens]).encode()
    ).hexdigest()
