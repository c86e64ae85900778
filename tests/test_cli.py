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

    assert load_config(tmp_path / "proj" / "tutelage.yaml").generation.target == 50
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
