"""The report stage: one run on one page, as `RUN/report.html` (self-contained) and `RUN/report.md`.

Everything comes from the store, so the report can be redrawn at any point of a run; a stage that
has not run yet gets a line saying so and the command that produces it.

Generated text is data from an untrusted model: the HTML template autoescapes everything and marks
nothing from the store as safe (only the SVG charts drawn here are inlined as markup); the Markdown
escapes table cells and puts generated text in code fences longer than any backtick run inside it
(`formatting`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from markupsafe import Markup

from .. import __version__
from ..config import is_english
from ..stage_results import PIPELINE
from ..store import Store
from ..templating import TEMPLATE_DIR
from .analysis import ParserMissing, empty_inputs, novelty, top_pairs, verb_objects, word_lengths
from .formatting import clip, clip_all, num, pct, template_environment, usd

N_KEPT_SAMPLES = 10
N_EVAL_SAMPLES = 3  # side-by-side answers per evaluation set in report.md
MAX_SAMPLE_CHARS = 1500  # a sample is an illustration; the full text stays in the store
# The page's browsers: every row up to these caps (the page stays a few MB for 52K-task runs).
BROWSE_LIMIT = 20_000  # kept tasks; rejected tasks per reason
BROWSE_CHARS = 8_000  # per text field
# ROUGE-L and the verb parse look at random samples of at most this many kept instructions (the
# parse runs at about 600 first sentences a second on 2 cores; 5,000 settle the top 20 verbs).
NOVELTY_LIMIT = 20_000
VERB_LIMIT = 5_000

# What each answer metric means, and which way is better (None: neither, it is descriptive).
METRIC_DESCRIPTIONS = {
    "rouge_l": ("ROUGE-L F1 of the greedy answer against the reference", "higher"),
    "nll": ("mean negative log-likelihood per token of the reference answer", "lower"),
    "kl_teacher": ("mean KL(teacher || student) per token of the teacher's answer", "lower"),
    "answer_words": ("words in the greedy answer", None),
    "refusal": ("share of answers that refuse or apologise", "lower"),
    "ifeval_prompt_strict": ("share of IFEval prompts whose every constraint is met", "higher"),
    "ifeval_prompt_loose": (
        "the same, forgiving a first or last line and markdown emphasis (IFEval's loose)",
        "higher",
    ),
    "ifeval_instruction_strict": ("share of all IFEval constraints met", "higher"),
    "ifeval_instruction_loose": ("share of all IFEval constraints met, loosely", "higher"),
}
# IFEval's per-kind shares: metrics "ifeval_kind_strict:KIND" and "ifeval_kind_loose:KIND".
IFEVAL_KIND = "ifeval_kind_"
# The judge's metrics: over pairs of roles ("tuned:base") or, for the rubric, over one role.
JUDGE_METRICS = {
    "win_rate": "share of items the judge preferred the first answer (ties count half), both "
    "orders averaged",
    "lc_win_rate": "win rate with the answers' length difference regressed out",
    "position_bias": "share of items whose two orders preferred different answers",
}
RUBRIC_METRIC = "rubric_acceptable"
ROLE_ORDER = ("base", "tuned", "teacher")


def write_report(store: Store, run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/report.html from the store; returns (markdown, html)."""
    from . import charts as draw

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    context = report_context(store, run_dir)
    data, training = context["data"], context["training"]
    charts = {
        "funnel": draw.funnel_chart(context["funnel"]) if context["funnel"]["generated"] else None,
        "lengths": draw.length_histograms(data["lengths"]) if data["lengths"] else None,
        "novelty": (
            draw.novelty_histograms(
                data["novelty"]["to_seed"], data["novelty"]["to_kept"], data["novelty"]["threshold"]
            )
            if data["novelty"]
            else None
        ),
        "verbs": draw.sunburst_chart(data["verbs"]["top"]) if data["verbs"]["top"] else None,
        "loss": draw.loss_chart(training["steps"]) if training else None,
    }
    env = template_environment()
    script = (TEMPLATE_DIR / "report" / "report.js").read_text(encoding="utf-8")
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write(md_path, env.get_template("report.md.jinja").render(**context))
    _write(
        html_path,
        env.get_template("report.html.jinja").render(
            **context,
            charts=charts,
            script=Markup(script),
            script_hash=_csp_hash(script),
            browse_json=_script_json(context["browse"]),
        ),
    )
    return md_path, html_path


def report_context(store: Store, run_dir: Path) -> dict[str, Any]:
    """Everything both templates show, as plain values (numbers still unformatted)."""
    run = shlex.quote(str(run_dir))
    config = store.get_meta("config")
    kept_rows = store.examples(status="kept")
    rejected_rows = store.rejected_samples(per_reason=BROWSE_LIMIT)
    funnel = _funnel(store.funnel(), kept_rows, store.batch_stats())
    training = _training(store)
    evaluation = _evaluation(store.eval_summary())
    judge_mode = store.get_meta("eval_judge_mode")
    data = _data(kept_rows, [s["instruction"] for s in store.seeds()], config)
    eval_items, judgements = store.eval_items(), store.judgements()
    context = {
        "run_dir": str(run_dir),
        "written_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "version": __version__,
        "stages": _stage_rows(store.stages()),
        "config": _config_rows(config),
        "funnel": funnel,
        "data": data,
        "kept_samples": [clip_all(r, MAX_SAMPLE_CHARS) for r in kept_rows[:N_KEPT_SAMPLES]],
        "rejected_samples": [
            clip_all(r, MAX_SAMPLE_CHARS) for r in _first_per(rejected_rows, "reason", 1)
        ],
        "browse": _browse(
            kept_rows,
            rejected_rows,
            data["novelty"],
            _answers(eval_items, judgements, BROWSE_CHARS),
        ),
        "cost": _cost(store.request_totals(), store.request_totals_by_purpose(), funnel["kept"]),
        "training": training,
        "evaluation": evaluation,
        "judge_mode": judge_mode if any(s["judge"] for s in evaluation) else None,
        "eval_samples": _first_per(
            _answers(eval_items, [], MAX_SAMPLE_CHARS), "set", N_EVAL_SAMPLES
        ),
    }
    context["missing"] = _missing(context, run)
    context["glance"] = _glance(context)
    return context


# -- sections -----------------------------------------------------------------------------------
def _stage_rows(stages: dict[str, dict]) -> list[dict]:
    rows = []
    for name in PIPELINE:
        if name == "report":  # this very page
            continue
        s = stages.get(name)
        if s is None:
            rows.append({"name": name, "status": "not run", "duration": None, "note": ""})
            continue
        end = s["finished_at"] or time.time()
        note = s["result"].note  # a failed stage's error, generation's stop message
        if s["status"] == "running":
            note = "still running, or interrupted"
        rows.append(
            {
                "name": name,
                "status": s["status"],
                "duration": end - s["started_at"],
                "note": str(note),
            }
        )
    return rows


def _config_rows(config: dict | None) -> list[tuple[str, str]]:
    """The generation recipe and models, from the resolved config the run stored (if any).

    Only chosen fields: the whole config would bury the few that matter (and base_url may be
    something a user would rather not publish)."""
    if not config:
        return []

    def get(dotted: str) -> Any:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def joined(*pairs: tuple[str, str]) -> str:
        return ", ".join(
            f"{label} {get(key)}".strip() for label, key in pairs if get(key) is not None
        )

    def slashed(*keys: str) -> str:
        return " / ".join(str(get(key)) for key in keys if get(key))

    rows = [
        ("teacher", slashed("teacher.backend", "teacher.model")),
        (
            "teacher sampling",
            joined(*((k, f"teacher.sampling.{k}") for k in ("temperature", "top_p", "max_tokens"))),
        ),
        (
            "recipe",
            joined(
                ("", "generation.recipe"),
                ("tasks per request", "generation.tasks_per_request"),
                *(
                    (
                        ("seed demonstrations", "generation.seed_demonstrations"),
                        ("machine demonstrations", "generation.machine_demonstrations"),
                    )
                    if get("generation.recipe") == "self-instruct"
                    else (("demonstrations", "generation.demonstrations"),)
                ),
                ("target", "generation.target"),
            ),
        ),
        ("topics", get("generation.topics")),
        ("language", get("generation.language")),
        (
            "filter",
            joined(
                ("ROUGE-L threshold", "filter.rouge_threshold"),
                ("min words", "filter.min_words"),
                ("max words", "filter.max_words"),
            ),
        ),
        ("student", slashed("student.model", "student.method")),
        (
            "training",
            joined(
                ("epochs", "training.epochs"),
                ("max steps", "training.max_steps"),
                ("learning rate", "training.learning_rate"),
                ("batch size", "training.batch_size"),
                ("prompt format", "training.prompt_format"),
            ),
        ),
        ("seed", get("seed")),
    ]
    return [(label, str(value)) for label, value in rows if value not in (None, "")]


def _funnel(funnel: dict, kept_rows: list[dict], batches: dict) -> dict:
    generated = funnel["generated"]
    rejected = sorted(funnel["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [{"label": "generated", "kind": "generated", "n": generated}]
    rows += [{"label": reason, "kind": "rejected", "n": n} for reason, n in rejected]
    rows.append({"label": "kept", "kind": "kept", "n": funnel["kept"]})
    for row in rows:
        row["share"] = row["n"] / generated if generated else None
    splits = Counter(r["split"] for r in kept_rows)
    return {
        **funnel,
        "rows": rows,
        "requests": batches["batches"],
        "splits": {s: splits.get(s, 0) for s in ("train", "valid", "test")},
        "unsplit": splits.get(None, 0),
    }


def _cost(totals: dict, by_purpose: list[dict], kept: int) -> dict:
    estimated = totals.get("estimated", 0)
    return {
        **totals,
        "by_purpose": by_purpose,
        "per_kept": totals["cost_usd"] / kept if kept else None,
        # Answers without the server's `usage`: their tokens were counted here (tiktoken, else
        # characters/4), so their cost is an estimate.
        "estimated_note": (
            f"{estimated:,} answers came without the server's token counts: their tokens were "
            f"counted here, so {usd(totals['estimated_usd'])} of the cost is an estimate."
            if estimated
            else None
        ),
    }


def _training(store: Store) -> dict | None:
    """The latest training run: its headline figures and its loss curve."""
    run = store.latest_train_run()
    if run is None:
        return None
    steps = store.train_steps(run["id"])
    metrics = json.loads(run["metrics_json"] or "{}")
    config = json.loads(run["config_json"] or "{}")
    train_losses = [s["loss"] for s in steps if s["loss"] is not None]
    eval_losses = [s["eval_loss"] for s in steps if s["eval_loss"] is not None]
    speeds = [s["tokens_per_s"] for s in steps if s["tokens_per_s"] is not None]
    wall = run["finished_at"] - run["started_at"] if run["finished_at"] else None

    def first(*values: Any) -> Any:
        return next((v for v in values if v is not None), None)

    return {
        "id": run["id"],
        "n_runs": len(store.train_runs()),
        "status": run["status"],
        "base_model": run["base_model"],
        "method": run["method"],
        "output_dir": run["output_dir"],
        "steps": steps,
        "figures": {
            "steps": first(metrics.get("steps"), steps[-1]["step"] if steps else None),
            "train examples": run["n_train"],
            "valid examples": run["n_valid"],
            "epochs": first(metrics.get("epochs"), config.get("epochs")),
            "useful tokens/s": first(
                metrics.get("useful_tokens_per_s"),
                metrics.get("tokens_per_s"),
                speeds[-1] if speeds else None,
            ),
            "time": first(metrics.get("seconds"), wall, steps[-1]["elapsed_s"] if steps else None),
            "first train loss": train_losses[0] if train_losses else None,
            "final train loss": first(
                train_losses[-1] if train_losses else None, metrics.get("train_loss")
            ),
            "first eval loss": eval_losses[0] if eval_losses else None,
            "final eval loss": first(
                eval_losses[-1] if eval_losses else None, metrics.get("eval_loss")
            ),
            # logit distillation only: the loss's parts (absent from supervised runs)
            **{
                label: value
                for label, value in (
                    ("final train cross-entropy", metrics.get("train_ce")),
                    (f"final train {metrics.get('distill')}", metrics.get("train_divergence")),
                    (f"final eval {metrics.get('distill')}", metrics.get("eval_divergence")),
                )
                if value is not None
            },
        },
    }


def _evaluation(summary: list[dict]) -> list[dict]:
    """One entry per evaluation set: a table of the reference metrics (a row per metric, a column
    per model role, and the paired tuned-minus-base delta with its verdict), the judge's win rates
    by pair of roles, and the rubric's share of acceptable answers by role."""
    sets: dict[str, dict[str, dict[str, dict]]] = {}
    for row in summary:
        sets.setdefault(row["set_name"], {}).setdefault(row["metric"], {})[row["model_role"]] = row
    known = list(METRIC_DESCRIPTIONS)
    out = []
    for set_name, metrics in sets.items():
        judged = {m: metrics.pop(m) for m in [*JUDGE_METRICS, RUBRIC_METRIC] if m in metrics}
        kinds = {m: metrics.pop(m) for m in list(metrics) if m.startswith(IFEVAL_KIND)}
        roles = sorted(
            {r for by_role in metrics.values() for r in by_role if r != "delta"}, key=_role_order
        )
        rows = []
        for metric in sorted(metrics, key=lambda m: (known.index(m) if m in known else 99, m)):
            by_role = metrics[metric]
            about, better = METRIC_DESCRIPTIONS.get(metric, ("", None))
            delta = by_role.get("delta")
            rows.append(
                {
                    "metric": metric,
                    "about": about,
                    "better": better,
                    "cells": [by_role.get(role) for role in roles],
                    "delta": delta,
                    "verdict": _verdict(delta, better),
                    "n": max(r["n"] for r in by_role.values()),
                }
            )
        pairs = sorted(
            {p for m in JUDGE_METRICS for p in judged.get(m, {})},
            key=lambda p: [_role_order(r) for r in p.split(":")],
        )
        judge = [
            {
                "pair": pair,
                "first": pair.split(":")[0],
                "second": pair.split(":")[-1],
                **{m: judged.get(m, {}).get(pair) for m in JUDGE_METRICS},
                "verdict": _win_verdict(judged.get("win_rate", {}).get(pair)),
                "n": max(
                    r["n"] for m in JUDGE_METRICS if (r := judged.get(m, {}).get(pair)) is not None
                ),
            }
            for pair in pairs
        ]
        rubric = [
            {"role": role, "acceptable": row, "n": row["n"]}
            for role, row in sorted(
                judged.get(RUBRIC_METRIC, {}).items(), key=lambda kv: _role_order(kv[0])
            )
        ]
        out.append(
            {
                "set_name": set_name,
                "roles": roles,
                "rows": rows,
                "has_delta": any(r["delta"] for r in rows),
                "judge": judge,
                "rubric": rubric,
                **_ifeval_kinds(kinds),
            }
        )
    return out


def _ifeval_kinds(metrics: dict[str, dict[str, dict]]) -> dict:
    """IFEval's shares per constraint kind: {"kind_roles": [role, ...], "kinds": [{"kind",
    "cells": [{"strict", "loose"} or None per role], "n"}]}, kinds by name."""
    if not metrics:
        return {"kind_roles": [], "kinds": []}
    shares: dict[str, dict[str, dict]] = {}
    for metric, by_role in metrics.items():
        level, kind = metric.removeprefix(IFEVAL_KIND).split(":", 1)
        for role, row in by_role.items():
            cell = shares.setdefault(kind, {}).setdefault(role, {"n": row["n"]})
            cell[level] = row["value"]
    roles = sorted({r for by_role in shares.values() for r in by_role}, key=_role_order)
    kinds = [
        {
            "kind": kind,
            "cells": [by_role.get(role) for role in roles],
            "n": max(c["n"] for c in by_role.values()),
        }
        for kind, by_role in sorted(shares.items())
    ]
    return {"kind_roles": roles, "kinds": kinds}


def _role_order(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else 99, role)


def _win_verdict(row: dict | None) -> str:
    """What a win rate's 95% interval says against 0.5 (a coin toss)."""
    if row is None or row["ci_low"] is None or row["ci_high"] is None:
        return ""
    if row["ci_low"] <= 0.5 <= row["ci_high"]:
        return "no clear winner"
    return "first wins" if row["ci_low"] > 0.5 else "second wins"


def _verdict(delta: dict | None, better: str | None) -> str:
    """What the delta's 95% interval says: a change only when it excludes zero."""
    if delta is None or delta["ci_low"] is None or delta["ci_high"] is None:
        return ""
    if delta["ci_low"] <= 0 <= delta["ci_high"]:
        return "no clear change"
    up = delta["ci_low"] > 0
    if better is None:
        return "higher" if up else "lower"
    return "better" if up == (better == "higher") else "worse"


def _data(kept_rows: list[dict], seeds: list[str], config: dict | None) -> dict:
    """The kept data described: word lengths, ROUGE-L novelty and the root verbs with their
    objects (the Self-Instruct paper's Figures 2 and 3)."""
    if not kept_rows:
        return {
            "lengths": None,
            "length_stats": [],
            "empty_inputs": 0,
            "novelty": None,
            "verbs": {"top": [], "missing": None},
        }
    filter_cfg = (config or {}).get("filter") or {}
    language = ((config or {}).get("generation") or {}).get("language") or "English"
    unicode = bool(filter_cfg.get("unicode")) or not is_english(language)
    seed = (config or {}).get("seed") or 0
    lengths = word_lengths(kept_rows)
    # One instruction may carry several kept instances (Self-Instruct): describe each once.
    instructions = list(dict.fromkeys(r["instruction"] for r in kept_rows))
    near = novelty(instructions, seeds, limit=NOVELTY_LIMIT, seed=seed, unicode=unicode)
    parsed = (
        verb_objects(instructions, limit=VERB_LIMIT, seed=seed)
        if is_english(language)
        else ParserMissing(f"the verb analysis parses English; this run's tasks are in {language}")
    )
    if isinstance(parsed, ParserMissing):
        verbs = {"top": [], "missing": parsed.message}
    else:
        verbs = {
            "top": top_pairs(parsed.pairs),
            "n_total": parsed.n_total,
            "n_parsed": parsed.n_parsed,
            "n_with_verb": parsed.n_with_verb,
            "n_with_object": parsed.n_with_object,
            "model": parsed.model,
            "spacy": parsed.spacy_version,
            "missing": None,
        }
    return {
        "lengths": lengths,
        "empty_inputs": empty_inputs(lengths),
        "length_stats": [
            {"field": field, **_describe(values)}
            for field, values in lengths.items()
            if isinstance(values, list)
        ],
        "novelty": {
            "to_seed": list(near.to_seed),
            "to_kept": list(near.to_kept),
            "n_kept": near.n_kept,
            "n_sampled": near.n_sampled,
            "n_seeds": near.n_seeds,
            "threshold": filter_cfg.get("rouge_threshold"),
            "stats": [
                {"against": "nearest seed", **_describe(near.to_seed)},
                {"against": "nearest other kept", **_describe(near.to_kept)},
            ],
            "bins": _bins(near.to_seed, near.to_kept),
            # each instruction's two scores, for the browser, when none was left out
            "by_instruction": (
                dict(zip(instructions, zip(near.to_seed, near.to_kept)))
                if near.n_sampled == near.n_kept
                else {}
            ),
        },
        "verbs": verbs,
    }


def _describe(values: list[float] | list[int]) -> dict:
    if not values:
        return {"n": 0, "median": None, "mean": None, "p90": None, "max": None}
    # inclusive: the percentile stays within the data (the default extrapolates past the maximum)
    p90 = (
        statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    )
    if all(isinstance(v, int) for v in values):  # word counts: a whole number of words
        p90 = round(p90)
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "p90": p90,
        "max": max(values),
    }


def _bins(to_seed: list[float], to_kept: list[float]) -> list[dict]:
    """Counts of both ROUGE-L distributions in tenths, for the Markdown table."""

    def tenth(v: float) -> int:
        return min(int(v * 10), 9)

    seed_n, kept_n = Counter(map(tenth, to_seed)), Counter(map(tenth, to_kept))
    return [
        {"range": f"{k / 10:.1f}–{(k + 1) / 10:.1f}", "to_seed": seed_n[k], "to_kept": kept_n[k]}
        for k in range(10)
    ]


def _browse(
    kept_rows: list[dict], rejected_rows: list[dict], near: dict | None, answers: list[dict]
) -> dict:
    """What the page's browsers show, as JSON-ready rows (the page's script renders them)."""
    index = near["by_instruction"] if near else {}
    kept = []
    for r in kept_rows[:BROWSE_LIMIT]:
        to_seed, to_kept = index.get(r["instruction"], (None, None))
        kept.append(
            {
                "instruction": clip(r["instruction"], BROWSE_CHARS),
                "input": clip(r["input"], BROWSE_CHARS),
                "output": clip(r["output"], BROWSE_CHARS),
                "split": r["split"],
                "to_seed": to_seed,
                "to_kept": to_kept,
            }
        )
    rejected = [
        {
            k: clip(r[k], BROWSE_CHARS) if isinstance(r[k], str) else r[k]
            for k in ("reason", "instruction", "input", "output", "raw", "nearest", "nearest_score")
        }
        for r in rejected_rows
    ]
    reasons = Counter(r["reason"] for r in rejected)
    return {
        "kept": kept,
        "kept_total": len(kept_rows),
        "rejected": rejected,
        "reasons": sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
        "answers": answers,
        "limit": BROWSE_LIMIT,
    }


def _answers(items: list[dict], judgements: list[dict], chars: int) -> list[dict]:
    """Every evaluation item with each model's answer side by side, and the judge's decisions on
    it (verdicts of both orders with their rationales; rubric grades); texts cut at `chars`."""
    judged: dict[tuple[str, str], list[dict]] = {}
    for j in judgements:
        judged.setdefault((j["set_name"], j["item_key"]), []).append(j)
    grouped: dict[tuple[str, str], dict] = {}
    for item in items:
        entry = grouped.setdefault(
            (item["set_name"], item["item_key"]),
            {
                "set": item["set_name"],
                "instruction": clip(item["instruction"], chars),
                "input": clip(item["input"], chars),
                "reference": clip(item["reference"], chars),
                "answers": [],
            },
        )
        checks = item["scores"].get("ifeval")
        entry["answers"].append(
            {
                "role": item["model_role"],
                "answer": clip(item["answer"], chars),
                "rouge_l": item["scores"].get("rouge_l"),
                # IFEval: how many of the prompt's constraints the answer met
                "ifeval": (
                    {"strict": sum(bool(s) for s, _ in checks.values()), "n": len(checks)}
                    if checks
                    else None
                ),
            }
        )
    out = []
    for key, entry in grouped.items():
        entry["answers"].sort(key=lambda a: _role_order(a["role"]))
        decisions = judged.get(key, [])
        entry["pairs"] = [
            {
                "pair": j["subject"],
                "status": j["status"],
                "score": j["score"],
                "orders": [
                    {
                        "first_as": o.get("first_as"),
                        "verdict": o.get("verdict"),
                        "rationale": clip(o.get("rationale") or "", chars),
                        # log-prob verdicts: the judge's P("A") and P("B") as its next token
                        "p_a": o.get("p_a"),
                        "p_b": o.get("p_b"),
                    }
                    for o in j["detail"].get("orders", [])
                ],
            }
            for j in decisions
            if j["kind"] == "pairwise"
        ]
        entry["grades"] = [
            {
                "role": j["subject"],
                "status": j["status"],
                "grade": j["grade"],
                "rationale": clip(j["detail"].get("rationale") or "", chars),
            }
            for j in decisions
            if j["kind"] == "rubric"
        ]
        out.append(entry)
    return out


def _first_per(rows: list[dict], key: str, n: int) -> list[dict]:
    """The first n rows of each value of row[key], in the rows' order (stored order: no
    hand-picked selection)."""
    seen: Counter = Counter()
    out = []
    for row in rows:
        seen[row[key]] += 1
        if seen[row[key]] <= n:
            out.append(row)
    return out


def _missing(context: dict, run: str) -> list[dict]:
    """What this run lacks, each with the command that produces it (earliest stage first)."""
    missing = []

    def lack(what: str, command: str | None) -> None:
        missing.append({"what": what, "command": command})

    funnel, training, evaluation = context["funnel"], context["training"], context["evaluation"]
    if not funnel["generated"]:
        lack("no data yet", f"tutelage generate --run-dir {run}")
    elif not funnel["kept"]:
        lack("no task was kept: nothing to train on (see the rejection reasons below)", None)
    elif funnel["unsplit"]:
        lack(
            "the kept tasks are not split into train / valid / test yet",
            f"tutelage filter --run-dir {run}",
        )
    if training is None:
        lack("no training yet", f"tutelage train --run-dir {run}")
    elif training["status"] == "running":
        lack(
            "the latest training run has not finished (still running, or interrupted)",
            f"tutelage train --run-dir {run}",
        )
    elif training["status"] != "done":
        lack(f"the latest training run {training['status']}", f"tutelage train --run-dir {run}")
    if not evaluation:
        lack("no evaluation yet", f"tutelage evaluate --run-dir {run}")
    elif not any("tuned" in s["roles"] for s in evaluation):
        lack(
            "only the base model is evaluated (no tuned student yet)",
            f"tutelage train --run-dir {run} && tutelage evaluate --run-dir {run}",
        )
    return missing


def _glance(context: dict) -> list[tuple[str, str]]:
    """The run's headline numbers, for the top of the page."""
    f, cost, training = context["funnel"], context["cost"], context["training"]
    glance = [
        ("kept tasks", f"{f['kept']:,} of {f['generated']:,}"),
        (
            "teacher cost, in part estimated" if cost["estimated_note"] else "teacher cost",
            usd(cost["cost_usd"]),
        ),
    ]
    if training:
        figures = training["figures"]
        glance.append(("training steps", num(figures["steps"])))
        if figures["final eval loss"] is not None:
            glance.append(("final eval loss", num(figures["final eval loss"])))
    for s in context["evaluation"]:
        row = next((r for r in s["rows"] if r["metric"] == "rouge_l" and r["delta"]), None)
        if row:
            glance.append(
                (f"{s['set_name']} ROUGE-L, tuned − base", num(row["delta"]["value"], sign=True))
            )
        row = next((r for r in s["rows"] if r["metric"] == "ifeval_prompt_strict"), None)
        if row:
            shown = [(role, c) for role, c in zip(s["roles"], row["cells"]) if c]
            glance.append(
                (
                    f"{s['set_name']} IFEval prompts followed (strict), "
                    + " / ".join(role for role, _ in shown),
                    " / ".join(pct(c["value"]) for _, c in shown),
                )
            )
        for j in s["judge"]:
            if j["first"] == "tuned" and j["win_rate"]:
                glance.append(
                    (
                        f"{s['set_name']} win rate, tuned vs {j['second']}",
                        pct(j["win_rate"]["value"]),
                    )
                )
    return glance


# -- the page's script and data -------------------------------------------------------------------
def _script_json(value: Any) -> Markup:
    """JSON to sit inside <script type="application/json">: every <, > and & written as a \\u
    escape, so no text in it (a "</script>" included) can end the element or open a tag."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


def _csp_hash(script: str) -> str:
    """The page's Content-Security-Policy source for its one inline script: with it, no other
    script can run, even one that got past the escaping."""
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()


def _write(path: Path, text: str) -> None:
    """Replace the file in one step: a reader (or a browser reloading) never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    # errors="replace": a lone surrogate a model wrote must not stop the report
    tmp.write_text(text, encoding="utf-8", errors="replace")
    os.replace(tmp, path)
