"""The filter stage: re-decide every generated task with the current filter settings, in
generation order, then split the kept ones into train / valid / test.

Generation screens each task as it arrives (`filter.screen`); this stage runs the same screen again
over the stored tasks, so changing a threshold and rerunning `tutelage filter` re-decides the whole
run without asking the teacher anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ..config import Config
from ..stage_results import FilterResult
from ..store import Store
from .answers import ANSWER_CODES, NOT_BEST
from .quality import QUALITY_CODES
from .screen import screen_for

# Answer-stage rejections of the recipes that answer in chat (Evol-Instruct adds its own two).
ANSWER_STAGE_CODES = frozenset((*ANSWER_CODES, NOT_BEST, "short_apology", "no_content"))


# What the screen itself decides: the only rejections this stage re-decides. A recipe's own
# rejections (an unreadable answer, a leaked template, an answer rule) stay as generation made them.
SCREEN_CODES = frozenset(
    (*QUALITY_CODES, "rouge_duplicate", "minhash_duplicate", "embedding_duplicate")
)
# Recipes whose outputs are chat answers: the screen judges the instruction (or the user's prompt),
# the answer rules judged the answer once, at generation.
CHAT_ANSWER_RECIPES = ("magpie", "evol-instruct", "answer")


def filter_stage(
    store: Store, config: Config, progress: Callable[[int, int], None] | None = None
) -> FilterResult:
    """Re-decide every machine task in generation order with the current filter settings, then
    split the kept ones into train / valid / test.

    An Alpaca task is re-judged whole. A Self-Instruct instruction is re-judged alone, as it was
    generated: if it passes it stays in the novelty pool whatever its instances became, and it
    is kept iff generation kept one of its instances (the instance filters are the recipe's own
    step). A task answered in chat (Magpie, Evol-Instruct, `answer`, and Alpaca with
    `generation.answer: chat`) has its instruction re-judged, and keeps its answer's verdict.
    All kept instances of an instruction share its split. `progress(done, total)` hears of each
    task re-decided."""
    # the recipe modules' screens for the user's prompts and for chat-answered Alpaca tasks
    from ..generate import alpaca
    from ..generate.answer import screen_prompt
    from ..prompt_sources import Prompt

    screen = screen_for(config.filter, config.generation.language)
    seeds, records = store.seeds(), store.machine_records()
    recipes = store.batch_recipes()
    chat_alpaca = config.generation.answer == "chat"
    only_prompts = bool(recipes) and set(recipes.values()) == {"answer"}
    if only_prompts:  # the answer recipe compares prompts with each other only
        seeds = []
    screen.prepare(
        [s["instruction"] for s in seeds]
        + [r["instruction"] for r in records if r["instance_id"] is not None]
    )
    for s in seeds:
        screen.add_reference(s["instruction"], ("id", s["id"]))
    decisions = []
    for done, r in enumerate(records, start=1):
        if progress:
            progress(done, len(records))
        if r["instance_id"] is None:  # unparseable or truncated: nothing to re-judge
            continue
        recipe, key = recipes[r["batch"]], ("id", r["id"])
        if recipe == "self-instruct":
            v = screen.check_instruction(r["instruction"], key=key)
            status, reason = v.status, v.reason
            if status == "kept" and r["instance_status"] != "kept":  # kept instances come first
                status, reason = "rejected", "no_valid_instances"
            instance_status, instance_reason = r["instance_status"], r["instance_reason"]
        elif recipe in CHAT_ANSWER_RECIPES or (recipe == "alpaca" and chat_alpaca):
            screened = r["status"] == "kept" or r["reason"] in SCREEN_CODES
            answer_rejected = r["status"] == "rejected" and r["reason"] not in SCREEN_CODES
            if not screened and not _answer_stage(r):
                continue  # rejected by the recipe before the screen saw it: stays as it is
            if recipe == "answer":
                v = screen_prompt(screen, Prompt(r["instruction"], r["input"]), key)
            elif recipe == "alpaca":
                v = alpaca.check_without_output(screen, r["instruction"], r["input"], key)
            else:
                v = screen.check_instruction(r["instruction"], key=key)
            status, reason = v.status, v.reason
            if status == "kept" and answer_rejected:  # the answer's verdict stands
                status, reason = r["status"], r["reason"]
            instance_status, instance_reason = r["instance_status"], r["instance_reason"]
        else:
            v = screen.check(r["instruction"], r["input"], r["output"], key=key)
            status, reason = instance_status, instance_reason = v.status, v.reason
        decisions.append(
            {
                "id": r["id"],
                "status": status,
                "reason": reason,
                "nearest_id": v.nearest_key[1] if v.nearest_key else None,
                "nearest_score": v.nearest_score,
                "instance_id": r["instance_id"],
                "instance_status": instance_status,
                "instance_reason": instance_reason,
                "split": None,
            }
        )
    kept = [
        d for d in decisions if d["status"] == "kept" and d["instance_status"] in ("kept", None)
    ]
    texts = {r["id"]: (r["instruction"], r["input"]) for r in records}
    counts = assign_splits(kept, texts, config)
    store.set_decisions(decisions)
    store.set_instruction_splits({d["id"]: d["split"] for d in decisions})
    return FilterResult(funnel=store.funnel(), splits=counts)


def _answer_stage(row: dict) -> bool:
    """Rejected on its answer: the instruction had passed the screen (and joined the pool)."""
    return row["status"] == "rejected" and row["reason"] in ANSWER_STAGE_CODES


def assign_splits(kept: list[dict], texts: dict, config: Config) -> dict:
    """A deterministic split: order the kept tasks by a seeded hash of their text, then take the
    test set, then the validation set, from the front. The same kept set always splits the same."""

    def rank(d: dict) -> str:
        instruction, task_input = texts[d["id"]]
        return hashlib.sha256(f"{config.seed}\0{instruction}\0{task_input}".encode()).hexdigest()

    f = config.filter
    n = len(kept)
    n_test = min(round(n * f.test_fraction), f.test_max)
    n_valid = round(n * f.valid_fraction)
    if n - n_test - n_valid < 1:  # tiny runs: training comes first
        n_test = n_valid = 0
    for i, d in enumerate(sorted(kept, key=rank)):
        d["split"] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return {"train": n - n_test - n_valid, "valid": n_valid, "test": n_test}
