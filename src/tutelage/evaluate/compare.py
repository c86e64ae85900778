"""Two runs' evaluations side by side, item by item: did the second student do better?

Only the items both runs answered count, so a difference is never a difference in the sets. Each
answer metric gets the mean in both runs and the paired difference (second minus first) with a
bootstrap 95% interval; the judged win rates of both runs are shown as they were stored.
"""

from __future__ import annotations

from pathlib import Path

from ..store import Store
from .stats import bootstrap_ci
from .summary import ANSWER_METRICS, ifeval_checks, ifeval_cis, ifeval_deltas
from .summary import answer_metric as _value  # an answer's metric: the stage's own definition


def _store(run: Path) -> Store:
    if not (Path(run) / "tutelage.db").exists():
        raise FileNotFoundError(f"{run}: not a run folder (no tutelage.db)")
    return Store(run)


def compare_runs(
    run_a: Path,
    run_b: Path,
    role: str = "tuned",
    n_resamples: int = 1000,
    seed: int = 0,
    examples: int = 3,
) -> dict:
    """{"runs", "role", "sets": {set: {"n_items", "metrics": {metric: {"a", "b", "delta"}},
    "win_rates": {pair: {"a", "b"}}, "largest_changes": [...]}}}."""
    with _store(run_a) as a, _store(run_b) as b:
        rows_a = {
            (r["set_name"], r["item_key"]): r for r in a.eval_items() if r["model_role"] == role
        }
        rows_b = {
            (r["set_name"], r["item_key"]): r for r in b.eval_items() if r["model_role"] == role
        }
        wins = [
            {
                (r["set_name"], r["model_role"]): r
                for r in s.eval_summary()
                if r["metric"] == "win_rate"
            }
            for s in (a, b)
        ]
    if not rows_a or not rows_b:
        missing = run_a if not rows_a else run_b
        raise ValueError(
            f"{missing}: no {role} answers stored; run `tutelage evaluate` on it first"
        )
    common = sorted(rows_a.keys() & rows_b.keys())
    if not common:
        raise ValueError(f"{run_a} and {run_b}: no evaluation item in common")
    out = {}
    for set_name in sorted({s for s, _ in common}):
        keys = [k for k in common if k[0] == set_name]
        metrics = {}
        for metric in ANSWER_METRICS:
            pairs = [(_value(rows_a[k], metric), _value(rows_b[k], metric)) for k in keys]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if not pairs:
                continue
            xs, ys = zip(*pairs)
            metrics[metric] = {
                "a": _ci(xs, n_resamples, seed),
                "b": _ci(ys, n_resamples, seed),
                "delta": _ci([y - x for x, y in pairs], n_resamples, seed),
            }
        # IFEval's accuracies over the prompts both runs answered, from the stored verdicts.
        checked = [(ifeval_checks(rows_a[k]), ifeval_checks(rows_b[k])) for k in keys]
        checked = [(x, y) for x, y in checked if x and y]
        if checked:
            xs, ys = zip(*checked)
            (cis_a, _), (cis_b, _) = (ifeval_cis(c, n_resamples, seed) for c in (xs, ys))
            deltas = ifeval_deltas(xs, ys, n_resamples, seed)
            for metric, delta in deltas.items():
                metrics[metric] = {"a": cis_a[metric], "b": cis_b[metric], "delta": delta}
        judged = sorted(
            {pair for (s, pair) in wins[0] if s == set_name}
            | {pair for (s, pair) in wins[1] if s == set_name}
        )
        win_rates = {
            pair: {side: _row(w.get((set_name, pair))) for side, w in zip("ab", wins)}
            for pair in judged
        }
        # The items whose ROUGE-L moved most, to read side by side.
        scored = [
            k
            for k in keys
            if _value(rows_a[k], "rouge_l") is not None and _value(rows_b[k], "rouge_l") is not None
        ]
        scored.sort(key=lambda k: -abs(_value(rows_b[k], "rouge_l") - _value(rows_a[k], "rouge_l")))
        changes = [
            {
                "instruction": rows_a[k]["instruction"],
                "input": rows_a[k]["input"],
                "answer_a": rows_a[k]["answer"],
                "answer_b": rows_b[k]["answer"],
                "rouge_l_a": _value(rows_a[k], "rouge_l"),
                "rouge_l_b": _value(rows_b[k], "rouge_l"),
            }
            for k in scored[:examples]
        ]
        out[set_name] = {
            "n_items": len(keys),
            "metrics": metrics,
            "win_rates": win_rates,
            "largest_changes": changes,
        }
    return {"runs": [str(run_a), str(run_b)], "role": role, "sets": out}


def _ci(values, n_resamples: int, seed: int) -> dict:
    mean, low, high = bootstrap_ci(list(values), n_resamples, seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": len(values)}


def _row(row: dict | None) -> dict | None:
    return (
        None
        if row is None
        else {
            "mean": row["value"],
            "ci_low": row["ci_low"],
            "ci_high": row["ci_high"],
            "n": row["n"],
        }
    )
