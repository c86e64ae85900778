"""What a user out in the world meets: progress in a log file (no terminal), commands pointed at a
folder holding no run, an evaluation before training, and a reasoning model's settings reaching
the request."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tutelage import cli, display, pipeline
from tutelage.cli import app
from tutelage.config import ConfigError, TeacherConfig, load_config
from tutelage.stage_results import (
    EvaluateResult,
    FilterResult,
    GenerateResult,
    ReportResult,
    TrainResult,
)
from tutelage.store import Store
from tutelage.teachers import Ledger, Request, make_teacher

ENV = {"COLUMNS": "200"}


@pytest.fixture
def log(monkeypatch) -> io.StringIO:
    """What the CLI prints, as a log file receives it (no terminal)."""
    out = io.StringIO()
    console = Console(file=out, width=200)
    monkeypatch.setattr(display, "console", console)
    monkeypatch.setattr(cli, "console", console)  # the name the commands print through
    return out


def lines_of(log: io.StringIO) -> list[str]:
    return [line for line in log.getvalue().splitlines() if line.strip()]


# -- progress without a terminal ----------------------------------------------------------------
def test_plain_lines_at_every_tenth_of_the_way(log):
    with display.PlainLines("generate", total=40, info="requests 0") as lines:
        for done in range(1, 41):
            lines.update(completed=done, info=f"requests {done}")
    printed = lines_of(log)
    assert len(printed) == 1 + 10  # the start, then one a tenth
    assert printed[0].startswith("generate: 0/40 (0%) requests 0 [0m")
    assert printed[1].startswith("generate: 4/40 (10%) requests 4 [0m")
    assert printed[-1].startswith("generate: 40/40 (100%) requests 40 [0m")


def test_plain_lines_keep_beating_while_nothing_moves(log):
    with display.PlainLines("train", info="loading the student", interval_s=0.1):
        time.sleep(0.55)
    printed = lines_of(log)
    # The start, then one every 0.1 s (a loaded machine may skip some, never all).
    assert 3 <= len(printed) <= 7
    assert all(line.startswith("train: loading the student [0m00s]") for line in printed)


def test_a_new_phase_is_a_line_of_its_own(log):
    with display.PlainLines("evaluate", interval_s=60) as lines:
        lines.update(completed=1, total=100, info="base")  # a new total: a new phase
        lines.update(completed=2, total=100, info="base")  # not a tenth further
        lines.update(completed=1, total=3, info="teacher")
    assert [line.split(" [")[0] for line in lines_of(log)] == [
        "evaluate:",
        "evaluate: 1/100 (1%) base",
        "evaluate: 1/3 (33%) teacher",
    ]


def stages_that_report_progress(monkeypatch):
    """Each stage replaced by one that moves its progress once and returns a fixed result."""
    funnel = {"generated": 2, "kept": 2, "rejected": {}}

    def generate(store, config, progress):
        info = {"requests": 1, "cost_usd": 0.5, "estimated_usd": 0.25, "cache_hits": 0}
        progress(10, 100, info)  # the default target: 100
        return GenerateResult(
            kept=2, target=2, stop_reason="target", message="kept 2", cost_usd=0.5,
            estimated_usd=0.25,
        )  # fmt: skip

    def filter_stage(store, config, progress):
        progress(2, 2)
        return FilterResult(funnel=funnel, splits={"train": 2, "valid": 0, "test": 0})

    def train(store, config, progress):
        progress(3, 3, 1.5, 100.0)
        return TrainResult(steps=3)

    def evaluate(store, config, progress):
        progress(1, 1, "base")
        return EvaluateResult()

    for name, fake in (
        ("generate", generate),
        ("filter", filter_stage),
        ("train", train),
        ("evaluate", evaluate),
        ("report", lambda store, config: ReportResult(markdown="r.md", html="r.html")),
    ):
        monkeypatch.setattr(pipeline, f"{name}_stage", fake)


def test_every_stage_prints_plain_progress_in_a_log(monkeypatch, tmp_path, log):
    stages_that_report_progress(monkeypatch)
    r = CliRunner().invoke(app, ["run", "-r", str(tmp_path / "run")], env=ENV)
    assert r.exit_code == 0, r.output
    printed = lines_of(log)
    for start, moved in (
        ("generate: 0/100", "generate: 10/100 (10%) requests 1 $0.5000 ($0.2500 of it estim"),
        ("filter: re-deciding", "filter: 2/2 (100%)"),
        ("train: loading the student", "train: 3/3 (100%) loss 1.500  100 tok/s"),
        ("evaluate:", "evaluate: 1/1 (100%) base"),
        ("report: describing the kept data", None),
    ):
        assert any(line.startswith(start) for line in printed), (start, printed)
        assert moved is None or any(line.startswith(moved) for line in printed), (moved, printed)
    assert "teacher cost of the run: $0.5000 ($0.2500 of it estimated" in log.getvalue()


# -- a folder holding no run --------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["report", "{folder}"],
        ["report", "--run-dir", "{folder}"],
        ["evaluate", "{folder}"],
        ["export", "{folder}", "-o", "{out}"],
        ["export", "{folder}", "--model", "-o", "{out}"],
    ],
)
@pytest.mark.parametrize("exists", [False, True])
def test_a_folder_holding_no_run_is_one_line_and_nothing_is_created(tmp_path, log, args, exists):
    folder, out = tmp_path / "runs" / "frist", tmp_path / "out"
    if exists:
        folder.mkdir(parents=True)
    argv = [a.format(folder=folder, out=out) for a in args]
    r = CliRunner().invoke(app, argv, env=ENV)
    assert r.exit_code == 2, r.output
    [line] = lines_of(log)
    assert line == f"error: {folder}: not a run folder (no tutelage.db); give the folder of a run"
    assert sorted(tmp_path.rglob("*")) == ([tmp_path / "runs", folder] if exists else [])


def test_report_without_a_run_folder_looks_for_the_default_one_only(tmp_path, log, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["report"], env=ENV)
    assert r.exit_code == 2 and "runs/default: not a run folder" in log.getvalue()
    assert list(tmp_path.iterdir()) == []


# -- evaluating before training -----------------------------------------------------------------
def test_evaluate_without_a_trained_student_says_so_before_it_starts(tmp_path, log, monkeypatch):
    run_dir = tmp_path / "run"
    Store(run_dir).close()
    said_before = []

    def evaluate(store, config, progress):
        said_before.append(log.getvalue())
        return EvaluateResult(models={"base": "b", "teacher": "t"})

    monkeypatch.setattr(pipeline, "evaluate_stage", evaluate)
    r = CliRunner().invoke(app, ["evaluate", str(run_dir)], env=ENV)
    assert r.exit_code == 0, r.output
    [before] = said_before
    assert before.startswith(
        f"note: no trained student in {run_dir}/student yet: evaluating the base model and the "
        "teacher only"
    )

    (run_dir / "student").mkdir()
    (run_dir / "student" / "config.json").write_text("{}")
    log.truncate(0)
    said_before.clear()
    CliRunner().invoke(app, ["evaluate", str(run_dir)], env=ENV)
    assert "no trained student" not in said_before[0]


# -- a reasoning model's settings ---------------------------------------------------------------
def test_reasoning_effort_reaches_the_request_from_every_section(server, store):
    section = TeacherConfig(
        backend="openai", model="gpt-5-mini", base_url=server.url, reasoning_effort="low"
    )
    request = Request.make(
        messages=[{"role": "user", "content": "hi"}],
        sampling={"temperature": 0.7, "max_tokens": 20},
    )
    sent = {
        "model": "gpt-5-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 20,
        "reasoning_effort": "low",
    }
    asyncio_run(Ledger(make_teacher(section), store).complete(request))
    assert server.requests[0]["body"] == sent
    # In batch mode, each line of the uploaded file carries the same body.
    batch = section.model_copy(update={"batch": True, "batch_poll_s": 0.01})
    other = Request.make(
        messages=[{"role": "user", "content": "hello"}],
        sampling={"temperature": 0.7, "max_tokens": 20},
    )
    asyncio_run(Ledger(make_teacher(batch), store).complete(other))
    [upload] = [r["body"]["file"] for r in server.requests if r["path"].endswith("/files")]
    [line] = [json.loads(x) for x in upload.splitlines()]
    assert line["body"] == {**sent, "messages": [{"role": "user", "content": "hello"}]}
    # The judge and the responder are teacher sections: the same field, the same path.
    cfg = load_config(
        None,
        {
            "evaluation.judge": section.model_dump(mode="json"),
            "generation.responder": section.model_dump(mode="json"),
        },
    )
    assert make_teacher(cfg.evaluation.judge).reasoning_effort == "low"
    assert make_teacher(cfg.generation.responder).reasoning_effort == "low"


def test_reasoning_effort_is_only_for_openai():
    with pytest.raises(ConfigError, match=r"teacher\.reasoning_effort: only for backend: openai"):
        load_config(None, {"teacher.reasoning_effort": "high"})


def asyncio_run(coroutine):
    import asyncio

    return asyncio.run(coroutine)


def test_stored_results_hold_the_estimate(tmp_path):
    detail = GenerateResult(cost_usd=1.0, estimated_usd=0.5).to_detail()
    assert json.loads(json.dumps(detail))["estimated_usd"] == 0.5
    old = GenerateResult.from_detail({"cost_usd": 1.0})  # a row written before the field
    assert old.estimated_usd == 0.0
