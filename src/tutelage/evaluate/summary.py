"""The evaluation's figures, from the stored answers and judgements: each answer metric's mean per
role with a bootstrap 95% interval, the paired tuned-minus-base delta with its own, IFEval's four
accuracies per role (and per constraint kind), win rates and position bias per judged pair, and
the rubric's share of acceptable answers per graded role.

No model is needed: `evaluate --compare` reads answers the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import Config
from ..filter.answers import is_refusal
from ..store import Store
from .ifeval import check_response, ifeval_scores
from .sets import EvalItem
from .stats import bootstrap_ci, grade_summary, length_controlled_win_rate, win_rate

# What each stored answer is measured by (kl_teacher: held-out answers the teacher's
# distributions were captured on, with logit distillation).
ANSWER_METRICS = ("rouge_l", "nll", "kl_teacher", "answer_words", "refusal")
# IFEval's accuracies, for the sets whose items carry checkable constraints.
IFEVAL_METRICS = (
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_instruction_strict",
    "ifeval_instruction_loose",
)


def summarise(
    store: Store,
    sets: dict[str, list[EvalItem]],
    roles: list[str],
    pairs: list[str],
    config: Config,
) -> dict:
    """{set: {"n_items", "metrics": {metric: {role: {"mean", "ci_low", "ci_high", "n", ...}}}}}.
    Answer metrics per role, where role "delta" is tuned minus base over the items both have a
    value for; IFEval's four accuracies per role for a set of IFEval prompts (and, beside the
    metrics, "ifeval_by_kind": {role: {kind: {"strict", "loose", "n"}}}); `win_rate` and
    `lc_win_rate` per judged pair ("tuned:base": how often the first wins, ties half) and
    `position_bias` (the share of items whose two orders disagreed); `rubric_acceptable` per
    graded role (the share graded A or B)."""
    n, seed = config.evaluation.bootstrap, config.seed
    out = {}
    for name, items in sets.items():
        stored = {(r["item_key"], r["model_role"]): r for r in store.eval_items(name)}
        metrics = {}
        for metric in ANSWER_METRICS:
            # One value (or None) per item, in item order, so tuned and base pair up by position.
            values = {
                role: [answer_metric(stored.get((i.key, role)), metric) for i in items]
                for role in roles
            }
            if "tuned" in values:
                values["delta"] = [
                    t - b if t is not None and b is not None else None
                    for t, b in zip(values["tuned"], values["base"])
                ]
            values = {role: [v for v in vals if v is not None] for role, vals in values.items()}
            if any(values.values()):  # e.g. no rouge_l or nll for a set without references
                metrics[metric] = {role: _ci(vals, config) for role, vals in values.items() if vals}
        by_kind = {}
        if any(i.ifeval for i in items):
            by_kind = _ifeval_metrics(metrics, items, stored, roles, config)
        judged = {(r["item_key"], r["kind"], r["subject"]): r for r in store.judgements(name)}
        for pair in pairs:
            first, second = pair.split(":")
            rows = [
                (
                    judged.get((i.key, "pairwise", pair)),
                    stored.get((i.key, first)),
                    stored.get((i.key, second)),
                )
                for i in items
            ]
            rows = [
                (j["score"], len(a["answer"].split()), len(b["answer"].split()))
                for j, a, b in rows
                if j is not None
            ]
            if not rows:
                continue
            scores, len_first, len_second = (list(col) for col in zip(*rows))
            metrics.setdefault("win_rate", {})[pair] = win_rate(scores, n, seed)
            metrics.setdefault("lc_win_rate", {})[pair] = length_controlled_win_rate(
                scores, len_first, len_second, n, seed
            )
            # Position bias: the share of decided items whose two orders preferred different
            # answers (the judge followed the position, not the answer).
            disagreed = [
                0.0 if j["detail"].get("consistent") else 1.0
                for i in items
                if (j := judged.get((i.key, "pairwise", pair))) is not None
                and j["score"] is not None
            ]
            if disagreed:
                metrics.setdefault("position_bias", {})[pair] = _ci(disagreed, config)
        for role in roles:
            grades = [j["grade"] for key, j in judged.items() if key[1:] == ("rubric", role)]
            if grades:
                metrics.setdefault("rubric_acceptable", {})[role] = grade_summary(grades, n, seed)
        out[name] = {"n_items": len(items), "metrics": metrics}
        if by_kind:
            out[name]["ifeval_by_kind"] = by_kind
    return out


def ifeval_checks(row: dict | None, item: EvalItem | None = None) -> dict | None:
    """A stored answer's IFEval verdicts, {instruction id: [strict, loose]}: as stored, or
    checked now from its text when it was stored without them. None: no answer, or no IFEval
    item."""
    if row is None:
        return None
    if "ifeval" in row["scores"]:
        return row["scores"]["ifeval"]
    if item is None or item.ifeval is None:
        return None
    return {k: list(v) for k, v in check_response(item.ifeval, row["answer"]).items()}


def ifeval_cis(checks: Sequence[dict], n_resamples: int, seed: int) -> tuple[dict, dict]:
    """({metric in IFEVAL_METRICS: interval}, the per-kind shares) over one model's verdicts on
    distinct prompts."""
    scores = ifeval_scores(checks, n_resamples, seed)
    cis = {metric: scores[metric.removeprefix("ifeval_")] for metric in IFEVAL_METRICS}
    return cis, scores["by_kind"]


def ifeval_deltas(
    first: Sequence[dict], second: Sequence[dict], n_resamples: int, seed: int
) -> dict:
    """{metric in IFEVAL_METRICS: interval} of second minus first, paired by prompt
    (`first[i]` and `second[i]` answer the same prompt). The prompt level is the mean of the
    per-prompt differences; the instruction level, the difference of the shares followed, on the
    same resampled prompts."""
    out = {}
    given = np.array([len(c) for c in first], dtype=float)
    for mode, column in (("strict", 0), ("loose", 1)):
        followed = [
            np.array([sum(bool(v[column]) for v in c.values()) for c in checks], dtype=float)
            for checks in (first, second)
        ]
        prompt_change = (followed[1] == given).astype(float) - (followed[0] == given)
        mean, low, high = bootstrap_ci(prompt_change, n_resamples, seed)
        out[f"ifeval_prompt_{mode}"] = {
            "mean": mean,
            "ci_low": low,
            "ci_high": high,
            "n": len(given),
        }

        def share_change(indices, axis=0, followed=followed):
            indices = np.asarray(indices).astype(int)
            change = followed[1][indices].sum(axis=axis) - followed[0][indices].sum(axis=axis)
            return change / given[indices].sum(axis=axis)

        mean, low, high = bootstrap_ci(np.arange(len(given)), n_resamples, seed, stat=share_change)
        out[f"ifeval_instruction_{mode}"] = {
            "mean": mean,
            "ci_low": low,
            "ci_high": high,
            "n": int(given.sum()),
        }
    return out


def _ifeval_metrics(
    metrics: dict, items: list[EvalItem], stored: dict, roles: list[str], config: Config
) -> dict:
    """Add IFEval's accuracies per role (and tuned minus base, paired by prompt) to `metrics`;
    return the per-kind shares by role."""
    n, seed = config.evaluation.bootstrap, config.seed
    checks = {
        role: [ifeval_checks(stored.get((i.key, role)), i) for i in items if i.ifeval]
        for role in roles
    }
    by_kind = {}
    for role, verdicts in checks.items():
        answered = [c for c in verdicts if c]
        if not answered:
            continue
        cis, by_kind[role] = ifeval_cis(answered, n, seed)
        for metric, ci in cis.items():
            metrics.setdefault(metric, {})[role] = ci
    if "tuned" in checks and "base" in checks:
        both = [(b, t) for b, t in zip(checks["base"], checks["tuned"]) if b and t]
        if both:
            base, tuned = zip(*both)
            for metric, ci in ifeval_deltas(base, tuned, n, seed).items():
                metrics[metric]["delta"] = ci
    return by_kind


def answer_metric(row: dict | None, metric: str) -> float | None:
    """One of ANSWER_METRICS for a stored answer row (None: no row, or no value for it)."""
    if row is None:
        return None
    if metric == "answer_words":
        return len(row["answer"].split())
    if metric == "refusal" and "refusal" not in row["scores"]:
        # An answer stored before the score existed: the same rule, from its text.
        return 1.0 if is_refusal(row["answer"]) else 0.0
    return row["scores"].get(metric)


def _ci(values: list[float], config: Config) -> dict:
    mean, low, high = bootstrap_ci(values, config.evaluation.bootstrap, config.seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": len(values)}
