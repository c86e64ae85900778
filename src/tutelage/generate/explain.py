"""`tutelage generate --explain RUN`: where the teacher's output went, reason by reason.

Plain text lines from the store: the requests by step, then the instruction funnel (every parsed or
unparseable piece, by outcome) and, where a task has several instances (Self-Instruct's instances,
the answer recipe's samples), the instance funnel, each reason with its count, its share and its
first example. A rejection by an answer rule (refusal, unfinished, ...) shows the answer.
"""

from __future__ import annotations

from ..filter.answers import ANSWER_CODES, NOT_BEST
from ..store import Store
from .evol_instruct import ANSWER_STAGE_CODES

WIDTH = 70  # characters of an example shown
# What a duplicate's nearest_score measures, by the filter that rejected it.
SCORE_NAMES = {
    "rouge_duplicate": "ROUGE-L",
    "minhash_duplicate": "Jaccard",
    "embedding_duplicate": "cosine",
    "no_information_gain": "ROUGE-L to its parent",
}
# About the answer: its example shows the answer.
ANSWER_REASONS = (*ANSWER_CODES, *ANSWER_STAGE_CODES, NOT_BEST)


def explain(store: Store) -> list[str]:
    recipes = sorted(set(store.batch_recipes().values()))
    if not recipes:
        return ["no generation request has been stored in this run yet"]
    totals = store.request_totals()
    by_purpose = ", ".join(
        f"{r['purpose']} {r['requests']}" for r in store.request_totals_by_purpose()
    )
    lines = [
        (
            f"recipe {', '.join(recipes)}; teacher requests: {by_purpose or 'none'}; "
            f"{totals['tokens_in']:,} tokens in, {totals['tokens_out']:,} out, "
            f"${totals['cost_usd']:.4f}"
        ),
        "",
    ]

    funnel = store.funnel()
    samples = {r["reason"]: r for r in store.rejected_samples(per_reason=1)}
    lines.append(
        f"instructions: {funnel['generated']} parsed or unparseable pieces -> {funnel['kept']} kept"
    )
    lines += _reasons(funnel, {k: _instruction_example(r) for k, r in samples.items()})

    inst = store.instance_funnel()
    if "self-instruct" in recipes or NOT_BEST in inst["rejected"]:
        isamples = {r["reason"]: r for r in store.rejected_instance_samples(per_reason=1)}
        what = (
            "answers of the prompts that passed the prompt filter"
            if recipes == ["answer"]
            else "instances of the instructions that passed the instruction filter"
        )
        lines += ["", f"{what}: {inst['generated']} -> {inst['kept']} kept"]
        lines += _reasons(inst, {k: _instance_example(r) for k, r in isamples.items()})
    return lines


def _reasons(funnel: dict, examples: dict[str, str]) -> list[str]:
    total = funnel["generated"] or 1
    rows = sorted(funnel["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))
    if not rows:
        return ["  nothing rejected"]
    width = max(len(reason) for reason, _ in rows)
    return [
        f"  {reason:<{width}} {n:>6} {n / total:>4.0%}  {examples.get(reason, '')}"
        for reason, n in rows
    ]


def _clip(text: str | None) -> str:
    text = " ".join((text or "").split())
    return repr(text if len(text) <= WIDTH else text[: WIDTH - 1] + "…")


def _instruction_example(row: dict) -> str:
    if row["reason"] in ("parse_error", "length_truncated") and row["raw"]:
        return f"e.g. raw {_clip(row['raw'])}"
    if row["reason"] in ANSWER_REASONS and row["output"] is not None:
        return f"e.g. {_clip(row['instruction'])}: answer {_clip(row['output'])}"
    text = f"e.g. {_clip(row['instruction'])}"
    measure = SCORE_NAMES.get(row["reason"])
    if row["nearest"] is not None and measure:
        text += f" ~ {_clip(row['nearest'])} ({measure} {row['nearest_score']:.2f})"
    return text


def _instance_example(row: dict) -> str:
    return (
        f"e.g. {_clip(row['instruction'])}: input {_clip(row['input'])}, "
        f"output {_clip(row['output'])}"
    )
