"""The command line: help texts, one-line errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMANDS = [
    "init",
    "run",
    "generate",
    "filter",
    "train",
    "evaluate",
    "report",
    "export",
    "dedup",
    "demo",
]


def tutelage(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tutelage.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={
            "COLUMNS": "200",
            "PATH": "/usr/bin:/bin",
            "HOME": "/tmp",
            "PYTHONPATH": ":".join(sys.path),
        },
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    r = tutelage(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Example" in r.stdout and f"tutelage {command}" in r.stdout


def test_init_writes_a_config_that_loads(tmp_path):
    r = tutelage("init", str(tmp_path / "proj"))
    assert r.returncode == 0, r.stderr
    from tutelage.config import load_config

    assert load_config(tmp_path / "proj" / "tutelage.yaml").generation.target == 40
    again = tutelage("init", str(tmp_path / "proj"))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_bad_config_is_one_line_naming_file_and_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("generation:\n  targett: 5\n")
    r = tutelage("generate", "-c", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "generation.targett" in lines[0]


def test_malformed_seeds_name_the_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "ok", "output": "x"}\n{"instruction": \n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"seeds:\n  path: {seeds}\n")
    r = tutelage("generate", "-c", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "seeds.jsonl:2: not valid JSON" in r.stderr


def test_export_needs_a_run_folder(tmp_path):
    r = tutelage("export", str(tmp_path), "-o", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "not a run folder" in r.stderr


def test_dedup_command(tmp_path):
    rows = [
        {"instruction": "Describe the water cycle in simple words."},
        {"instruction": "Describe the water cycle in simple words please."},
        {"instruction": "List three uses of copper in modern homes."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = tutelage(
        "dedup",
        str(src),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--rejected",
        str(tmp_path / "rej.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    assert "read 3, kept 2, rejected 1" in r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == [rows[0], rows[2]]


def test_the_cli_starts_without_the_model_libraries():
    heavy = ("torch", "transformers", "matplotlib", "datasets", "accelerate", "peft", "spacy")
    code = f"import sys, tutelage.cli; print([m for m in {heavy!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    shown = tutelage("--help")
    assert shown.returncode == 0, shown.stderr
    assert all(command in shown.stdout for command in COMMANDS)


@pytest.mark.parametrize(
    ("raised", "code", "traceback"),
    [
        (ValueError("no such split"), 1, False),
        (KeyError("unexpected"), 1, True),  # not a stage's error type: always the traceback
        (KeyboardInterrupt(), 130, False),
    ],
)
@pytest.mark.parametrize("debug", [False, True])
def test_one_line_errors_and_debug(monkeypatch, tmp_path, raised, code, traceback, debug):
    from typer.testing import CliRunner

    from tutelage import cli

    def fails(*args, **kwargs):
        raise raised

    monkeypatch.setattr(cli, "resolve_config", fails)
    args = ["--debug"] * debug + ["report", str(tmp_path)]
    r = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert r.exit_code == code, r.output
    shows_traceback = "Traceback" in r.output
    if isinstance(raised, KeyboardInterrupt):
        assert "interrupted" in r.output and not shows_traceback
    else:
        assert f"error: {raised}" in r.output
        assert shows_traceback == (traceback or debug)


def fake_stages(monkeypatch, generated):
    """Every stage of `run` replaced by one returning a fixed declared result."""
    from tutelage import pipeline
    from tutelage.stage_results import EvaluateResult, FilterResult, ReportResult, TrainResult

    funnel = {"generated": 3, "kept": 2, "rejected": {"too_long": 1}}
    evaluated = EvaluateResult(
        sets={
            "held_out": {
                "n_items": 2,
                "metrics": {
                    "rouge_l": {"tuned": {"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75}},
                    "win_rate": {"tuned": {"mean": 0.5, "ci_low": 0.0, "ci_high": 1.0}},
                },
            }
        },
        notes=["a note"],
    )
    results = {
        "generate": generated,
        "filter": FilterResult(funnel=funnel, splits={"train": 1, "valid": 1, "test": 0}),
        "train": TrainResult(steps=4, train_loss=1.23456, gguf_error="no converter"),
        "evaluate": evaluated,
        "report": ReportResult(markdown="r/report.md", html="r/report.html"),
    }
    for name, result in results.items():
        monkeypatch.setattr(pipeline, f"{name}_stage", lambda *a, result=result, **k: result)


def test_run_prints_each_stage_outcome(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from tutelage.cli import app
    from tutelage.stage_results import GenerateResult
    from tutelage.store import Store

    done = GenerateResult(kept=2, target=2, stop_reason="target", message="kept 2 of 2")
    fake_stages(monkeypatch, done)
    r = CliRunner().invoke(app, ["run", "-r", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for line in (
        "generate: kept 2 of 2",
        "filter: 3 generated, 2 kept (train 1, valid 1, test 0); rejected: too_long 1",
        "train: steps 4, train_loss 1.235",
        "warning: no student.gguf: no converter",
        "note: a note",
        "report: r/report.html  r/report.md",
    ):
        assert line in r.output
    assert "0.500 [0.250, 0.750]" in r.output and "50% [0%, 100%]" in r.output
    with Store(tmp_path / "run") as store:
        stages = store.stages()
    assert {name: row["status"] for name, row in stages.items()} == {
        name: "done" for name in ("generate", "filter", "train", "evaluate", "report")
    }
    assert stages["train"]["result"].train_loss == 1.23456


def test_run_stops_when_generation_kept_nothing(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from tutelage.cli import app
    from tutelage.stage_results import GenerateResult

    fake_stages(monkeypatch, GenerateResult(stop_reason="stalled", message="kept 0 of 2"))
    r = CliRunner().invoke(app, ["run", "-r", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    assert "generate: kept 0 of 2" in r.output and "generation kept no task" in r.output
    assert "filter:" not in r.output


def test_the_command_runs_the_cycle_collector_less_often():
    # The teacher client's requests in flight would otherwise be walked every 700 new objects.
    import gc

    from typer.testing import CliRunner

    from tutelage import cli

    thresholds = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        r = CliRunner().invoke(cli.app, ["--version"])
        assert r.exit_code == 0 and gc.get_threshold() == (50_000, 10, 10)
    finally:
        gc.set_threshold(*thresholds)
