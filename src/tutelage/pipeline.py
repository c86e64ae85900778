"""The stages in order, each reading from and writing to the run's store.

`run` is nothing more than the stages one after another; each skips the work already stored, which
is what makes a killed run resumable: generation asks the ledger (stored answers are free), the
filter re-decides deterministically, the capture (with training.distill) scores only the answers
it has not stored, training finds a finished run with the same fingerprint or
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
    CaptureResult,
    EvaluateResult,
    FilterResult,
    GenerateResult,
    ReportResult,
    StageFailed,
    StageResult,
    TrainResult,
)
from .store import Store

# Offline mode is the user's choice (HF_HUB_OFFLINE=1): a Hub id is fetched once into the Hub
# cache, and read from it when the Hub cannot be reached (model_files.hub_snapshot).
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


def require_run(run_dir: Path) -> None:
    """Raise RunError, one line, unless `run_dir` holds a run (its store): commands that read a
    run (report, evaluate, export) must not create one where the user mistyped a folder."""
    if not (Path(run_dir) / "tutelage.db").is_file():
        raise RunError(f"{run_dir}: not a run folder (no tutelage.db); give the folder of a run")


def trained_student(run_dir: Path) -> Path | None:
    """The run's trained student (RUN/student), or None before training has written one."""
    folder = Path(run_dir) / "student"
    return folder if (folder / "config.json").is_file() else None


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
    from .teachers.prices import require_price

    require_price(config)  # a budget must know every hosted model's price
    return generate(store, config, make_teacher(config.teacher), progress)


def filter_stage(store: Store, config: Config, progress=None) -> FilterResult:
    from .filter.stage import filter_stage as run_filter

    return run_filter(store, config, progress)


def capture_stage(store: Store, config: Config, progress=None) -> CaptureResult:
    from .capture import capture

    return capture(store, config, progress)


def train_stage(store: Store, config: Config, progress=None) -> TrainResult:
    from .train import train

    return train(store, config, Path(config.run_dir), progress=progress)


def evaluate_stage(store: Store, config: Config, progress=None) -> EvaluateResult:
    from .evaluate import evaluate
    from .teachers.prices import require_price

    require_price(config)  # the teacher's answers and the judge's verdicts count too
    return evaluate(store, config, Path(config.run_dir), progress=progress)


def report_stage(store: Store, config: Config) -> ReportResult:
    from .report import write_report

    md, html = write_report(store, Path(config.run_dir))
    return ReportResult(markdown=str(md), html=str(html))
