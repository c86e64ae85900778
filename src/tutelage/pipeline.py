"""The stages in order, each reading from and writing to the run's store.

`run` is nothing more than the stages one after another; each skips the work already stored, which
is what makes a killed run resumable: generation asks the ledger (stored answers are free), the
filter re-decides deterministically, training finds a finished run with the same fingerprint or
resumes from its last checkpoint, evaluation skips stored answers, and the report is redrawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .seeds import load_seeds
from .store import Store

STAGES = ("generate", "filter", "train", "evaluate", "report")

# Nothing may reach a model hub: everything runs from installed packages and local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Our own rich progress bars replace the libraries' tqdm bars and deprecation chatter.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


class RunError(ValueError):
    """A run that cannot go on as asked, phrased as one line."""


def open_run(config: Config) -> Store:
    """Open (or create) the run folder's store and make sure it holds the seed tasks."""
    run_dir = Path(config.run_dir)
    store = Store(run_dir)
    seeds = load_seeds(config.seeds.path)
    digest = hashlib.sha256(json.dumps(seeds, sort_keys=True).encode()).hexdigest()
    stored = store.get_meta("seeds_sha256")
    if stored is None:
        store.put_seeds(seeds)
        store.set_meta("seeds_sha256", digest)
        store.set_meta("seeds_source", str(config.seeds.path or "built-in"))
    elif stored != digest:
        raise RunError(
            f"{run_dir}: this run was started with other seed tasks "
            f"({store.get_meta('seeds_source')}); use a new --run-dir for {config.seeds.path or 'the built-in seeds'}"
        )
    store.set_meta("config", config.model_dump(mode="json"))
    return store


def stored_config(run_dir: Path) -> dict | None:
    """The configuration a run folder was last run with, if it has one."""
    if not (Path(run_dir) / "tutelage.db").exists():
        return None
    with Store(run_dir) as store:
        return store.get_meta("config")


def staged(store: Store, name: str, fn: Callable[[], dict], status_of=None) -> dict:
    """Run one stage with its start, end and outcome recorded in the store."""
    store.stage_started(name)
    try:
        detail = fn()
    except BaseException as e:
        store.stage_finished(name, "failed", {"error": str(e) or type(e).__name__})
        raise
    store.stage_finished(name, status_of(detail) if status_of else "done", detail)
    return detail


def generate_stage(store: Store, config: Config, progress=None) -> dict:
    from .generate import generate
    from .teachers import make_teacher

    teacher = make_teacher(config.teacher)
    result = generate(store, config, teacher, progress)
    return {
        "kept": result.kept,
        "target": result.target,
        "requests": result.requests,
        "new_requests": result.new_requests,
        "stop_reason": result.stop_reason,
        "message": result.message,
        "cost_usd": result.cost_usd,
        "funnel": result.funnel,
    }


def generation_status(detail: dict) -> str:
    return "done" if detail["stop_reason"] == "target" else "stopped"


def filter_stage(store: Store, config: Config) -> dict:
    """Re-decide every machine task in generation order with the current filter settings, then
    split the kept ones into train / valid / test.

    An Alpaca task is re-judged whole. A Self-Instruct instruction is re-judged alone, as it was
    generated: if it passes it stays in the novelty pool whatever its instances became, and it
    is kept iff generation kept one of its instances (the instance filters are the recipe's own
    step). All kept instances of an instruction share its split."""
    from .generate.steering import screen_for

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
    return {"funnel": store.funnel(), "splits": counts}


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


def train_stage(store: Store, config: Config, progress=None) -> dict:
    from .train import train

    return train(store, config, Path(config.run_dir), progress=progress)


def evaluate_stage(store: Store, config: Config, progress=None) -> dict:
    from .evaluate import evaluate

    return evaluate(store, config, Path(config.run_dir), progress=progress)


def report_stage(store: Store, config: Config) -> dict:
    from .report import write_report

    md, html = write_report(store, Path(config.run_dir))
    return {"markdown": str(md), "html": str(html)}
