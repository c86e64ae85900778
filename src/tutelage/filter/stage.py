"""The filter stage: re-decide every generated task with the current filter settings, in
generation order, then split the kept ones into train / valid / test.

Generation screens each task as it arrives (`filter.screen`); this stage runs the same screen again
over the stored tasks, so changing a threshold and rerunning `tutelage filter` re-decides the whole
run without asking the teacher anything.
"""

from __future__ import annotations

import hashlib

from ..config import Config
from ..stage_results import FilterResult
from ..store import Store
from .screen import screen_for


def filter_stage(store: Store, config: Config) -> FilterResult:
    """Re-decide every machine task in generation order with the current filter settings, then
    split the kept ones into train / valid / test.

    An Alpaca task is re-judged whole. A Self-Instruct instruction is re-judged alone, as it was
    generated: if it passes it stays in the novelty pool whatever its instances became, and it
    is kept iff generation kept one of its instances (the instance filters are the recipe's own
    step). All kept instances of an instruction share its split."""
    screen = screen_for(config.filter, config.generation.language)
    seeds, records = store.seeds(), store.machine_records()
    recipes = store.batch_recipes()
    screen.prepare(
        [s["instruction"] for s in seeds]
        + [r["instruction"] for r in records if r["instance_id"] is not None]
    )
    for s in seeds:
        screen.add_reference(s["instruction"], ("id", s["id"]))
    decisions = []
    for r in records:
        if r["instance_id"] is None:  # unparseable or truncated: nothing to re-judge
            continue
        if recipes[r["batch"]] == "self-instruct":
            v = screen.check_instruction(r["instruction"], key=("id", r["id"]))
            status, reason = v.status, v.reason
            if status == "kept" and r["instance_status"] != "kept":  # kept instances come first
                status, reason = "rejected", "no_valid_instances"
            instance_status, instance_reason = r["instance_status"], r["instance_reason"]
        else:
            v = screen.check(r["instruction"], r["input"], r["output"], key=("id", r["id"]))
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
    kept = [d for d in decisions if d["status"] == "kept"]
    texts = {r["id"]: (r["instruction"], r["input"]) for r in records}
    counts = assign_splits(kept, texts, config)
    store.set_decisions(decisions)
    store.set_instruction_splits({d["id"]: d["split"] for d in decisions})
    return FilterResult(funnel=store.funnel(), splits=counts)


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
