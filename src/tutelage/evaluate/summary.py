"""The evaluation's figures, from the stored answers and judgements: each answer metric's mean per
role with a bootstrap 95% interval, the paired tuned-minus-base delta with its own, win rates per
judged pair, and the rubric's share of acceptable answers per graded role.

No model is needed: `evaluate --compare` reads answers the same way.
"""

from __future__ import annotations

from ..config import Config
from ..filter.answers import is_refusal
from ..store import Store
from .sets import EvalItem
from .stats import bootstrap_ci, grade_summary, length_controlled_win_rate, win_rate

# What each stored answer is measured by.
ANSWER_METRICS = ("rouge_l", "nll", "answer_words", "refusal")


def summarise(
    store: Store,
    sets: dict[str, list[EvalItem]],
    roles: list[str],
    pairs: list[str],
    config: Config,
) -> dict:
    """{set: {"n_items", "metrics": {metric: {role: {"mean", "ci_low", "ci_high", "n", ...}}}}}.
    Answer metrics per role, where role "delta" is tuned minus base over the items both have a
    value for; `win_rate` and `lc_win_rate` per judged pair ("tuned:base": how often the first
    wins, ties half); `rubric_acceptable` per graded role (the share graded A or B)."""
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
        for role in roles:
            grades = [j["grade"] for key, j in judged.items() if key[1:] == ("rubric", role)]
            if grades:
                metrics.setdefault("rubric_acceptable", {})[role] = grade_summary(grades, n, seed)
        out[name] = {"n_items": len(items), "metrics": metrics}
    return out


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
