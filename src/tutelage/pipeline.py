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
from .stage_results import (
    EvaluateResult,
    FilterResult,
    GenerateResult,
    ReportResult,
    StageFailed,
    StageResult,
    TrainResult,
)
from .store import Store

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
            f"({store.get_meta('seeds_source')}); use a new --run-dir for "
            f"{config.seeds.path or 'the built-in seeds'}"
        )
    store.set_meta("config", config.model_dump(mode="json"))
    return store


def stored_config(run_dir: Path) -> dict | None:
    """The configuration a run folder was last run with, if it has one."""
    if not (Path(run_dir) / "tutelage.db").exists():
        return None
    with Store(run_dir) as store:
        return store.get_meta("config")


def staged(store: Store, name: str, fn: Callable[[], StageResult]) -> StageResult:
    """Run one stage with its start, end and declared result recorded in the store."""
    store.stage_started(name)
    try:
        result = fn()
    except BaseException as e:
        store.stage_finished(name, StageFailed(error=str(e) or type(e).__name__))
        raise
    store.stage_finished(name, result)
    return result


def generate_stage(store: Store, config: Config, progress=None) -> GenerateResult:
    from .generate import generate
    from .teachers import make_teacher

    return generate(store, config, make_teacher(config.teacher), progress)


def filter_stage(store: Store, config: Config) -> FilterResult:
    from .filter.stage import filter_stage as run_filter

    return run_filter(store, config)


def train_stage(store: Store, config: Config, progress=None) -> TrainResult:
    from .train import train

    return train(store, config, Path(config.run_dir), progress=progress)


def evaluate_stage(store: Store, config: Config, progress=None) -> EvaluateResult:
    from .evaluate import evaluate

    return evaluate(store, config, Path(config.run_dir), progress=progress)


def report_stage(store: Store, config: Config) -> ReportResult:
    from .report import write_report

    md, html = write_report(store, Path(config.run_dir))
    return ReportResult(markdown=str(md), html=str(html))
