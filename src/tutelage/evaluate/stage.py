"""The evaluation stage: the base and the tuned student answer the same tasks, and we measure how
they differ.

Sets: `held_out` (generated examples the filter set aside and training never saw; the reference is
the teacher's answer), `builtin` (our own evaluation instructions), `ifeval` (our own prompts with
constraints a program checks) and any file the user names (`sets`). Two scores per answer, both
against the item's reference when it has one: ROUGE-L and the reference's NLL (`students`); an
IFEval answer is checked against its constraints instead. Every answer is stored as soon as it is
made, so a killed evaluation resumes where it stopped. The summary gives each mean a bootstrap 95%
interval, and the paired tuned-minus-base delta its own (`summary`). The answers also go out as
AlpacaEval model_outputs files, RUN/eval/ROLE.json (`outputs`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..model_files import ModelNotFound, resolve_base_student
from ..stage_results import EvaluateResult
from ..store import Store
from ..teachers import BudgetExceeded, Teacher
from .judging import judge_answers, judge_fingerprint, judge_label, judge_mode
from .outputs import write_model_outputs
from .sets import eval_sets
from .students import answer_with_students, model_fingerprint
from .summary import summarise
from .teacher import answer_with_teacher, teacher_fingerprint


def evaluate(
    store: Store,
    config: Config,
    run_dir: Path,
    tuned_model: Path | None = None,
    progress: Callable | None = None,
    teacher: Teacher | None = None,
    judge: Teacher | None = None,
) -> EvaluateResult:
    """Answer every set with the base and the tuned student (and the teacher), score the
    answers, judge them in pairs (and grade them), then write the summary to the store and to
    `run_dir/evaluation.json`; returns that summary as the stage's result. Everything stored is
    reused.

    `teacher` and `judge`: backends to use instead of making them from the configuration (the
    judge defaults to the teacher when `evaluation.judge` is unset)."""
    run_dir = Path(run_dir)
    ev = config.evaluation
    sets = eval_sets(store, config)
    notes = [f"{name}: no items" for name, items in sets.items() if not items]
    sets = {name: items for name, items in sets.items() if items}

    models = {"base": resolve_base_student(config, run_dir)}
    tuned = Path(tuned_model) if tuned_model is not None else run_dir / "student"
    if (tuned / "config.json").exists():
        models["tuned"] = tuned
    elif tuned_model is not None:
        raise ModelNotFound(f"{tuned}: not an HF model folder (with config.json)")
    else:
        notes.append(f"no tuned student at {tuned}: evaluated the base model only")
        # Answers from weights that are gone can no longer be attributed to anything.
        store.clear_eval("tuned")
        store.clear_eval("delta")
    fingerprints = {role: model_fingerprint(path, config) for role, path in models.items()}
    if ev.include_teacher:
        fingerprints["teacher"] = teacher_fingerprint(config)
    for role, fingerprint in fingerprints.items():
        if store.get_meta(f"eval_fingerprint_{role}") != fingerprint:
            store.clear_eval(role)
            store.clear_eval("delta")
            store.set_meta(f"eval_fingerprint_{role}", fingerprint)
    roles = [*models, *(["teacher"] if ev.include_teacher else [])]
    pairs = [pair for pair in ev.pairs if set(pair.split(":")) <= set(roles)]
    judge_print = judge_fingerprint(config)
    if store.get_meta("eval_fingerprint_judge") != judge_print:
        store.clear_judgements()
        store.set_meta("eval_fingerprint_judge", judge_print)
    mode = judge_mode(config) if pairs else None
    store.set_meta("eval_judge_mode", mode)  # the report says how the verdicts were read

    if judge is None and ev.judge is None:
        judge = teacher
    answer_with_students(store, config, sets, models, progress)
    # The run's budget (generation.budget_usd) caps the teacher's answers and the judge's verdicts
    # too. At the cap the paid work stops; what is stored is summarised, and a note says so.
    paid = "the teacher's answers"
    try:
        if ev.include_teacher:
            asyncio.run(answer_with_teacher(store, config, sets, progress, teacher))
        paid = "judging"
        if pairs or ev.rubric:
            graded = roles if ev.rubric else []
            asyncio.run(judge_answers(store, config, sets, pairs, graded, progress, judge))
    except BudgetExceeded as e:
        notes.append(f"{paid} stopped at the {e}")

    table = summarise(store, sets, roles, pairs, config)
    store.put_eval_summary(
        [
            {
                "set_name": name,
                "model_role": role,
                "metric": metric,
                "value": ci["mean"],
                "ci_low": ci["ci_low"],
                "ci_high": ci["ci_high"],
                "n": ci["n"],
            }
            for name, s in table.items()
            for metric, by_role in s["metrics"].items()
            for role, ci in by_role.items()
            if ci.get("mean") is not None
        ]
        # IFEval's plain shares per constraint kind (no interval: a kind has few instructions).
        + [
            {
                "set_name": name,
                "model_role": role,
                "metric": f"ifeval_kind_{level}:{kind}",
                "value": shares[level],
                "ci_low": None,
                "ci_high": None,
                "n": shares["n"],
            }
            for name, s in table.items()
            for role, kinds in s.get("ifeval_by_kind", {}).items()
            for kind, shares in kinds.items()
            for level in ("strict", "loose")
        ]
    )
    result = EvaluateResult(
        models={role: str(path) for role, path in models.items()},
        notes=notes,
        judge=judge_label(config) if pairs or ev.rubric else None,
        judge_mode=mode,
        pairs=pairs,
        sets=table,
        outputs={
            role: str(path)
            for role, path in write_model_outputs(store, sets, roles, run_dir).items()
        },
    )
    if ev.include_teacher:
        result.models["teacher"] = f"{config.teacher.backend}:{config.teacher.model}"
    (run_dir / "evaluation.json").write_text(
        json.dumps(result.to_detail(), indent=2) + "\n", encoding="utf-8"
    )
    return result
