"""The statistics of the evaluation: bootstrap intervals, win rates, length control, grades.

numpy only. Every interval is a percentile bootstrap 95% interval over items, seeded, so the same
run reports the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GRADES = ("A", "B", "C", "D")


def bootstrap_ci(values, n_resamples: int, seed: int, stat=np.mean) -> tuple[float, float, float]:
    """`stat(values)` with a percentile bootstrap 95% interval. `stat` must take `axis=`."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    resamples = values[rng.integers(0, values.size, size=(n_resamples, values.size))]
    low, high = np.percentile(stat(resamples, axis=1), [2.5, 97.5])
    return float(stat(values)), float(low), float(high)


# -- pairwise win rate --------------------------------------------------------------------------
def win_rate(scores: Sequence[float | None], n_resamples: int, seed: int) -> dict:
    """The mean item score of the first model against the second, with its interval.

    An item's score is in [0, 1] (see judge.PairJudgement: 1 won in both orders, .5 tie or split).
    None is a failed judgement: it is left out of the mean and counted in `n_failed`, never taken
    as a win or a loss. wins/ties/losses count items scored above, at, or below one half.
    """
    valid = [float(s) for s in scores if s is not None]
    out = {
        "mean": None,
        "ci_low": None,
        "ci_high": None,
        "n": len(valid),
        "n_failed": len(scores) - len(valid),
        "wins": sum(s > 0.5 for s in valid),
        "ties": sum(s == 0.5 for s in valid),
        "losses": sum(s < 0.5 for s in valid),
    }
    if valid:
        out["mean"], out["ci_low"], out["ci_high"] = bootstrap_ci(valid, n_resamples, seed)
    return out


# -- length-controlled win rate -----------------------------------------------------------------
def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    l2: tuple[float, float] = (1e-4, 0.1),
    max_iter: int = 100,
    tol: float = 1e-8,
) -> np.ndarray:
    """Penalised logistic regression of fractional targets `y` in [0, 1] on the columns of `x`,
    by Newton's method (IRLS) with step halving. Minimises the summed cross-entropy plus
    `l2[j] / 2 * w[j]**2`. Returns the weights.

    Why a penalty: when length explains the outcomes completely, the data are separable and the
    unpenalised slope runs off to infinity. The intercept's penalty is tiny, just enough to keep it
    finite when every item is a win."""
    lam = np.asarray(l2, dtype=float)
    w = np.zeros(x.shape[1])

    def loss(w):
        z = x @ w
        # -(y log p + (1-y) log(1-p)) = logaddexp(0, z) - y z, stable for any z
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(lam * w * w))

    current = loss(w)
    for _ in range(max_iter):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + lam * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(lam)
        step = np.linalg.solve(hess, grad)
        t = 1.0  # the objective is strictly convex: a short enough step always goes down
        while loss(w - t * step) > current and t > 1e-8:
            t *= 0.5
        w = w - t * step
        current = loss(w)
        if np.max(np.abs(t * step)) < tol:
            break
    return w


def length_controlled_win_rate(
    scores: Sequence[float | None],
    len_first: Sequence[float],
    len_second: Sequence[float],
    n_resamples: int,
    seed: int,
) -> dict:
    """The win rate of the first model had both answers been equally long, with its interval.

    In the spirit of AlpacaEval 2.0's length-controlled win rate (Dubois et al., 2024): a logistic
    regression of each item's score (a fractional target in [0, 1]) on an intercept and
    tanh((len_first - len_second) / scale), scale the standard deviation of the differences; the
    controlled win rate is the predicted win probability at zero length difference,
    sigmoid(intercept). Judges tend to prefer longer answers; this removes the part of the win rate
    that the length difference explains. AlpacaEval's model also has a per-instruction difficulty
    term, fitted across many models answering the same instructions; one pair of models cannot
    estimate it, so ours has only the length term.

    When length decides every item outright (the data are separable), the slope is held finite
    only by its small L2 penalty and the intercept is poorly determined; a judge whose preference
    merely leans on length, as real judges do, is the case this model is for.

    Failed items (score None) are left out. The interval is a bootstrap over items, refitting the
    regression on each resample. `n_resamples` a few hundred is plenty.
    """
    if not len(scores) == len(len_first) == len(len_second):
        raise ValueError("length_controlled_win_rate: scores and lengths differ in number")
    keep = [i for i, s in enumerate(scores) if s is not None]
    y = np.array([scores[i] for i in keep], dtype=float)
    diff = np.array([len_first[i] - len_second[i] for i in keep], dtype=float)
    out = {"mean": None, "ci_low": None, "ci_high": None, "n": len(keep)}
    if not keep:
        return out
    scale = diff.std()
    # All lengths equal (or one item): nothing to control for, and no scale to divide by.
    x = np.column_stack([np.ones_like(diff), np.tanh(diff / scale) if scale > 0 else diff * 0])

    def lc(idx):
        return float(_sigmoid(fit_logistic(x[idx], y[idx])[0]))

    # The same resamples as bootstrap_ci draws: with equal lengths both intervals coincide.
    resamples = np.random.default_rng(seed).integers(0, len(y), size=(n_resamples, len(y)))
    boot = [lc(idx) for idx in resamples]
    low, high = np.percentile(boot, [2.5, 97.5])
    out.update(mean=lc(np.arange(len(y))), ci_low=float(low), ci_high=float(high))
    return out


# -- rubric grades ------------------------------------------------------------------------------
def grade_summary(grades: Sequence[str | None], n_resamples: int, seed: int) -> dict:
    """Shares of the Self-Instruct grades A-D over the graded items, and the share acceptable
    (A or B) as `mean` with its interval. None is a failed grading: counted in `n_failed`, left
    out of every share."""
    valid = [g for g in grades if g is not None]
    unknown = set(valid) - set(GRADES)
    if unknown:
        raise ValueError(f"grade_summary: unknown grades {sorted(unknown)}")
    n = len(valid)
    out = {
        "shares": {g: (valid.count(g) / n if n else None) for g in GRADES},
        "mean": None,
        "ci_low": None,
        "ci_high": None,
        "n": n,
        "n_failed": len(grades) - n,
    }
    if valid:
        acceptable = [float(g in ("A", "B")) for g in valid]
        out["mean"], out["ci_low"], out["ci_high"] = bootstrap_ci(acceptable, n_resamples, seed)
    return out
