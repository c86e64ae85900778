"""The judge at work over the evaluation sets: every pair of roles judged in both orders, and every
graded role's answer graded, per item, through the run's ledger (the prompts and the parsing of
the judge's replies are in `judge`). Pairs are judged from log-probs or from written verdicts
(`judge_mode`); IFEval sets are not judged: their constraints are checked instead."""

from __future__ import annotations

import hashlib
import json

from ..config import Config
from ..store import Store
from ..teachers import Teacher, make_teacher, speaks_chat
from ..templating import TEMPLATE_DIR
from .judge import LOGPROBS_TEMPLATE, grade_answer, judge_pair, judge_pair_logprobs
from .sets import EvalItem
from .teacher import gather_all, ledger_for


async def judge_answers(
    store: Store,
    config: Config,
    sets: dict[str, list[EvalItem]],
    pairs: list[str],
    graded_roles: list[str],
    progress,
    teacher: Teacher | None = None,
) -> None:
    """Every pair judged in both orders, and every graded role's answer graded, per item; each
    decision stored as soon as it is made."""
    ev = config.evaluation
    judge_config = ev.judge or config.teacher
    chat = speaks_chat(judge_config)
    logprobs = judge_mode(config) == "logprobs"
    answers = {(r["set_name"], r["item_key"], r["model_role"]): r for r in store.eval_items()}
    stored = {(r["set_name"], r["item_key"], r["kind"], r["subject"]) for r in store.judgements()}
    work = []
    for name, items in judged_sets(sets).items():
        for item in items:
            # Only the answers there are: the teacher's may have stopped at the budget.
            for pair in pairs:
                done = (name, item.key, "pairwise", pair) in stored
                if not done and all((name, item.key, r) in answers for r in pair.split(":")):
                    work.append((name, item, "pairwise", pair))
            for role in graded_roles:
                done = (name, item.key, "rubric", role) in stored
                if not done and (name, item.key, role) in answers:
                    work.append((name, item, "rubric", role))
    if not work:
        return
    owned = teacher is None
    teacher = teacher or make_teacher(judge_config)
    try:
        ledger = ledger_for(store, config, judge_config, teacher)
        done = 0
        common = {"chat": chat, "retries": ev.judge_retries, "max_tokens": ev.judge_max_tokens}

        async def decide(name: str, item: EvalItem, kind: str, subject: str) -> None:
            nonlocal done
            task = {
                "instruction": item.instruction,
                "input": item.input,
                "reference": item.reference,
            }
            if kind == "pairwise":
                first, second = (
                    answers[name, item.key, role]["answer"] for role in subject.split(":")
                )
                if logprobs:
                    verdict = await judge_pair_logprobs(
                        ledger, chat=chat, first=first, second=second, **task
                    )
                else:
                    verdict = await judge_pair(ledger, first=first, second=second, **task, **common)
                store.put_judgement(
                    name,
                    item.key,
                    kind,
                    subject,
                    "failed" if verdict.score is None else "done",
                    verdict.score,
                    None,
                    verdict.to_dict(),
                )
            else:
                grade = await grade_answer(
                    ledger, answer=answers[name, item.key, subject]["answer"], **task, **common
                )
                store.put_judgement(
                    name,
                    item.key,
                    kind,
                    subject,
                    "failed" if grade.grade is None else "done",
                    None,
                    grade.grade,
                    grade.to_dict(),
                )
            done += 1
            if progress:
                progress(done, len(work), "judge")

        await gather_all(decide(*w) for w in work)
    finally:
        if owned:
            await teacher.aclose()


def judge_mode(config: Config) -> str:
    """How pairs are judged: `evaluation.judge_mode`, else "logprobs" for a local judge (its
    log-probs are free) and "text" for an OpenAI-compatible server (not every one gives them)."""
    ev = config.evaluation
    if ev.judge_mode is not None:
        return ev.judge_mode
    return "text" if (ev.judge or config.teacher).backend == "openai" else "logprobs"


def judged_sets(sets: dict[str, list[EvalItem]]) -> dict[str, list[EvalItem]]:
    """The sets a judge sees: all but IFEval's, whose answers are checked by program."""
    return {name: items for name, items in sets.items() if not any(i.ifeval for i in items)}


def judge_fingerprint(config: Config) -> str:
    """What stored judgements depend on: the judge, how it is asked, and the prompt texts."""
    ev = config.evaluation
    judge = ev.judge or config.teacher
    templates = [
        (TEMPLATE_DIR / "evaluate" / f"{name}.jinja").read_text(encoding="utf-8")
        for name in ("pairwise", "rubric")
    ]
    blob = [
        judge.backend,
        judge.model,
        speaks_chat(judge),
        ev.judge_retries,
        ev.judge_max_tokens,
        templates,
    ]
    if judge_mode(config) == "logprobs":  # text-mode stores keep the fingerprint they had
        blob.append(["logprobs", LOGPROBS_TEMPLATE.read_text(encoding="utf-8")])
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()


def judge_label(config: Config) -> str:
    judge = config.evaluation.judge or config.teacher
    return f"{judge.backend}:{judge.model}"
