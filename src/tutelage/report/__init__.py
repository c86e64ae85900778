"""The report: one run on one page, as `RUN/report.html` (self-contained) and `RUN/report.md`.

Everything comes from the store, so the report can be redrawn at any point of a run; a stage that
has not run yet gets a line saying so and the command that produces it.

Generated text is data from an untrusted model: the HTML template autoescapes everything and marks
nothing from the store as safe (only the SVG charts drawn here are inlined as markup); the Markdown
escapes table cells and puts generated text in code fences longer than any backtick run inside it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .. import __version__
from ..formats import TEMPLATES
from ..store import Store

STAGES = ("generate", "filter", "train", "evaluate")  # the report stage is this very page
N_KEPT_SAMPLES = 10
N_EVAL_SAMPLES = 3  # side-by-side answers per evaluation set
MAX_SAMPLE_CHARS = 1500  # a sample is an illustration; the full text stays in the store

# What each evaluation metric means, and which way is better (None: neither, it is descriptive).
METRICS = {
    "rouge_l": ("ROUGE-L F1 of the greedy answer against the reference", "higher"),
    "nll": ("mean negative log-likelihood per token of the reference answer", "lower"),
    "answer_words": ("words in the greedy answer", None),
}
ROLE_ORDER = ("base", "tuned", "teacher")


def write_report(store: Store, run_dir: Path) -> tuple[Path, Path]:
    """Write run_dir/report.md and run_dir/report.html from the store; returns (markdown, html)."""
    from .charts import funnel_chart, loss_chart

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    context = report_context(store, run_dir)
    charts = {
        "funnel": funnel_chart(context["funnel"]) if context["funnel"]["generated"] else None,
        "loss": loss_chart(context["training"]["steps"]) if context["training"] else None,
    }
    env = _environment()
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write(md_path, env.get_template("report.md.jinja").render(**context))
    _write(html_path, env.get_template("report.html.jinja").render(**context, charts=charts))
    return md_path, html_path


def report_context(store: Store, run_dir: Path) -> dict[str, Any]:
    """Everything both templates show, as plain values (numbers still unformatted)."""
    run = shlex.quote(str(run_dir))
    kept_rows = store.examples(status="kept")
    funnel = _funnel(store.funnel(), kept_rows, store.batch_stats())
    training = _training(store)
    evaluation = _evaluation(store.eval_summary())
    context = {
        "run_dir": str(run_dir),
        "written_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "version": __version__,
        "stages": _stage_rows(store.stages()),
        "config": _config_rows(store.get_meta("config")),
        "funnel": funnel,
        "kept_samples": [_clip_all(r) for r in kept_rows[:N_KEPT_SAMPLES]],
        "rejected_samples": [_clip_all(r) for r in store.rejected_samples(per_reason=1)],
        "cost": _cost(store.request_totals(), store.request_totals_by_purpose(), funnel["kept"]),
        "training": training,
        "evaluation": evaluation,
        "eval_samples": _eval_samples(store.eval_items()),
    }
    context["missing"] = _missing(context, run)
    context["glance"] = _glance(context)
    return context


# -- sections -----------------------------------------------------------------------------------
def _stage_rows(stages: dict[str, dict]) -> list[dict]:
    rows = []
    for name in STAGES:
        s = stages.get(name)
        if s is None:
            rows.append({"name": name, "status": "not run", "duration": None, "note": ""})
            continue
        end = s["finished_at"] or time.time()
        detail = s["detail"]
        note = detail.get("error") or detail.get("message") or ""
        if s["status"] == "running":
            note = "still running, or interrupted"
        rows.append({"name": name, "status": s["status"], "duration": end - s["started_at"],
                     "note": str(note)})
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
        return ", ".join(f"{label} {get(key)}".strip() for label, key in pairs
                         if get(key) is not None)

    def slashed(*keys: str) -> str:
        return " / ".join(str(get(key)) for key in keys if get(key))

    rows = [
        ("teacher", slashed("teacher.backend", "teacher.model")),
        ("teacher sampling", joined(*((k, f"teacher.sampling.{k}")
                                      for k in ("temperature", "top_p", "max_tokens")))),
        ("recipe", joined(("", "generation.recipe"),
                          ("tasks per request", "generation.tasks_per_request"),
                          *((("seed demonstrations", "generation.seed_demonstrations"),
                             ("machine demonstrations", "generation.machine_demonstrations"))
                            if get("generation.recipe") == "self-instruct" else
                            (("demonstrations", "generation.demonstrations"),)),
                          ("target", "generation.target"))),
        ("topics", get("generation.topics")),
        ("language", get("generation.language")),
        ("filter", joined(("ROUGE-L threshold", "filter.rouge_threshold"),
                          ("min words", "filter.min_words"), ("max words", "filter.max_words"))),
        ("student", slashed("student.model", "student.method")),
        ("training", joined(("epochs", "training.epochs"), ("max steps", "training.max_steps"),
                            ("learning rate", "training.learning_rate"),
                            ("batch size", "training.batch_size"),
                            ("prompt format", "training.prompt_format"))),
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
    return {**funnel, "rows": rows, "requests": batches["batches"],
            "splits": {s: splits.get(s, 0) for s in ("train", "valid", "test")},
            "unsplit": splits.get(None, 0)}


def _cost(totals: dict, by_purpose: list[dict], kept: int) -> dict:
    return {**totals, "by_purpose": by_purpose,
            "per_kept": totals["cost_usd"] / kept if kept else None}


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
            "useful tokens/s": first(metrics.get("useful_tokens_per_s"),
                                     metrics.get("tokens_per_s"), speeds[-1] if speeds else None),
            "time": first(metrics.get("seconds"), wall, steps[-1]["elapsed_s"] if steps else None),
            "first train loss": train_losses[0] if train_losses else None,
            "final train loss": first(train_losses[-1] if train_losses else None,
                                      metrics.get("train_loss")),
            "first eval loss": eval_losses[0] if eval_losses else None,
            "final eval loss": first(eval_losses[-1] if eval_losses else None,
                                     metrics.get("eval_loss")),
        },
    }


def _evaluation(summary: list[dict]) -> list[dict]:
    """One table per evaluation set: a row per metric, a column per model role, and the paired
    tuned-minus-base delta with its verdict."""
    sets: dict[str, dict[str, dict[str, dict]]] = {}
    for row in summary:
        sets.setdefault(row["set_name"], {}).setdefault(row["metric"], {})[row["model_role"]] = row
    known = list(METRICS)
    out = []
    for set_name, metrics in sets.items():
        roles = sorted({r for by_role in metrics.values() for r in by_role if r != "delta"},
                       key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 99, r))
        rows = []
        for metric in sorted(metrics, key=lambda m: (known.index(m) if m in known else 99, m)):
            by_role = metrics[metric]
            about, better = METRICS.get(metric, ("", None))
            delta = by_role.get("delta")
            rows.append({"metric": metric, "about": about, "better": better,
                         "cells": [by_role.get(role) for role in roles], "delta": delta,
                         "verdict": _verdict(delta, better),
                         "n": max(r["n"] for r in by_role.values())})
        out.append({"set_name": set_name, "roles": roles, "rows": rows,
                    "has_delta": any(r["delta"] for r in rows)})
    return out


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


def _eval_samples(items: list[dict]) -> list[dict]:
    """The first few items of each set with every model's answer side by side (items are stored in
    evaluation order, so this is no hand-picked selection)."""
    grouped: dict[tuple[str, str], dict] = {}
    for item in items:
        entry = grouped.setdefault((item["set_name"], item["item_key"]), {
            "set_name": item["set_name"], "instruction": _clip(item["instruction"]),
            "input": _clip(item["input"]), "reference": _clip(item["reference"]), "answers": {}})
        entry["answers"][item["model_role"]] = {"answer": _clip(item["answer"]),
                                                "rouge_l": item["scores"].get("rouge_l")}
    samples, per_set = [], Counter()
    for entry in grouped.values():
        if per_set[entry["set_name"]] < N_EVAL_SAMPLES:
            per_set[entry["set_name"]] += 1
            entry["answers"] = sorted(entry["answers"].items(), key=lambda kv: (
                ROLE_ORDER.index(kv[0]) if kv[0] in ROLE_ORDER else 99, kv[0]))
            samples.append(entry)
    return samples


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
        lack("the kept tasks are not split into train / valid / test yet",
             f"tutelage filter --run-dir {run}")
    if training is None:
        lack("no training yet", f"tutelage train --run-dir {run}")
    elif training["status"] == "running":
        lack("the latest training run has not finished (still running, or interrupted)",
             f"tutelage train --run-dir {run}")
    elif training["status"] != "done":
        lack(f"the latest training run {training['status']}", f"tutelage train --run-dir {run}")
    if not evaluation:
        lack("no evaluation yet", f"tutelage evaluate --run-dir {run}")
    elif not any("tuned" in s["roles"] for s in evaluation):
        lack("only the base model is evaluated (no tuned student yet)",
             f"tutelage train --run-dir {run} && tutelage evaluate --run-dir {run}")
    return missing


def _glance(context: dict) -> list[tuple[str, str]]:
    """The run's headline numbers, for the top of the page."""
    f, cost, training = context["funnel"], context["cost"], context["training"]
    glance = [("kept tasks", f"{f['kept']:,} of {f['generated']:,}"),
              ("teacher cost", usd(cost["cost_usd"]))]
    if training:
        figures = training["figures"]
        glance.append(("training steps", num(figures["steps"])))
        if figures["final eval loss"] is not None:
            glance.append(("final eval loss", num(figures["final eval loss"])))
    for s in context["evaluation"]:
        row = next((r for r in s["rows"] if r["metric"] == "rouge_l" and r["delta"]), None)
        if row:
            glance.append((f"{s['set_name']} ROUGE-L, tuned − base",
                           num(row["delta"]["value"], sign=True)))
    return glance


# -- formatting (shared by both templates) ------------------------------------------------------
def num(value: float | int | None, sign: bool = False) -> str:
    """A number as a person reads it: integers with separators, floats to 3 decimals (fewer once
    they are large)."""
    if value is None:
        return "–"
    plus = "+" if sign else ""
    if isinstance(value, int):
        return f"{value:{plus},}"
    if abs(value) >= 1000:
        return f"{value:{plus},.0f}"
    return f"{value:{plus}.{3 if abs(value) < 10 else 1}f}"


def ci(row: dict | None, sign: bool = False) -> str:
    """'0.231 [0.190, 0.270]': a mean and its 95% bootstrap interval."""
    if row is None:
        return "–"
    if row["ci_low"] is None or row["ci_high"] is None:
        return num(row["value"], sign)
    return f"{num(row['value'], sign)} [{num(row['ci_low'], sign)}, {num(row['ci_high'], sign)}]"


def usd(value: float | None) -> str:
    if value is None:
        return "–"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_SAMPLE_CHARS:
        return text
    return f"{text[:MAX_SAMPLE_CHARS]}\n[… {len(text) - MAX_SAMPLE_CHARS:,} more characters]"


def _clip_all(row: dict) -> dict:
    return {k: _clip(v) if isinstance(v, str) else v for k, v in row.items()}


# -- Markdown safety ----------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")


def md_inline(value: Any) -> str:
    """Text made inert inside a Markdown line or table cell: one line, and every character that
    could start markup (a link, raw HTML, a code span, a cell border) backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def md_code(value: Any) -> str:
    """An inline code span (content is literal in a code span) delimited by a backtick run longer
    than any inside it. Not for table cells: a pipe would still split the cell there."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def md_fence(text: str | None, info: str = "text") -> str:
    """`text` as a fenced code block whose fence is longer than any backtick run inside it, so no
    line of the text can close it."""
    text = text or ""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES / "report"),
        # *.html.jinja autoescapes; the Markdown template escapes through md_inline / md_fence.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.jinja",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(num=num, ci=ci, usd=usd, pct=pct, duration=duration, md=md_inline,
                       code=md_code, fence=md_fence)
    return env


def _write(path: Path, text: str) -> None:
    """Replace the file in one step: a reader (or a browser reloading) never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
