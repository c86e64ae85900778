"""Configuration, seed loading and the run store."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tutelage.config import ConfigError, load_config
from tutelage.seeds import BUILTIN_SEEDS, SeedError, load_seeds
from tutelage.store import Store

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# -- configuration ------------------------------------------------------------------------------
def test_defaults_need_no_file():
    cfg = load_config(None)
    assert cfg.teacher.backend == "llamacpp" and cfg.student.method == "lora"
    assert cfg.filter.rouge_threshold == 0.7


def test_shipped_template_is_valid_and_commented():
    from tutelage.cli import DEFAULT_CONFIG

    text = DEFAULT_CONFIG.read_text()
    assert text.count("#") > 30
    cfg = load_config(DEFAULT_CONFIG)
    # the demo: the teacher answers the seed tasks (docs/benchmarks.md, "Recipes")
    assert cfg.generation.recipe == "answer" and cfg.generation.prompts is None
    assert cfg.generation.target == 40 and cfg.filter.rouge_threshold is None
    assert cfg.evaluation.max_new_tokens == 256


def test_unknown_field_names_file_and_field(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("teacher:\n  modle: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "teacher.modle" in msg and "unknown field" in msg
    assert "\n" not in msg


def test_bad_value_and_bad_yaml(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("generation:\n  target: -3\n")
    with pytest.raises(ConfigError, match=r"generation\.target"):
        load_config(p)
    p.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match=r"t\.yaml:\d+: not valid YAML"):
        load_config(p)


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "t.yaml"
    p.write_text("seeds:\n  path: my_seeds.jsonl\n")
    assert load_config(p).seeds.path == tmp_path / "sub" / "my_seeds.jsonl"


def test_openai_backend_needs_a_model_name(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("teacher:\n  backend: openai\n")
    with pytest.raises(ConfigError, match="openai backend needs a model name"):
        load_config(p)


# -- seeds --------------------------------------------------------------------------------------
def test_builtin_seeds_meet_the_brief():
    seeds = load_seeds()
    n = len(seeds)
    assert n >= 175
    cls = sum(s["is_classification"] for s in seeds) / n
    no_input = sum(s["instances"][0]["input"] == "" for s in seeds) / n
    assert 0.10 <= cls <= 0.20, cls
    assert 0.25 <= no_input <= 0.40, no_input
    assert len({s["instruction"] for s in seeds}) == n
    raw = [json.loads(line) for line in BUILTIN_SEEDS.read_text().splitlines()]
    assert all(
        set(r) == {"id", "name", "instruction", "instances", "is_classification"} for r in raw
    )


def test_builtin_seeds_are_novel_among_themselves():
    from tutelage.filter import RougeNoveltyIndex

    index = RougeNoveltyIndex(threshold=0.7)
    decisions = index.add_many([s["instruction"] for s in load_seeds()])
    assert all(d.kept for d in decisions), [d for d in decisions if not d.kept][:3]


@pytest.mark.skipif(
    not (SHARED / "self-instruct-seed-tasks.jsonl").exists(), reason="no shared data"
)
def test_self_instruct_seed_file_loads_as_is():
    seeds = load_seeds(SHARED / "self-instruct-seed-tasks.jsonl")
    assert len(seeds) == 175 and any(s["is_classification"] for s in seeds)


def test_alpaca_list_and_jsonl(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 3", "output": "5"}]))
    assert load_seeds(a)[0]["instances"] == [{"input": "2 3", "output": "5"}]
    j = tmp_path / "b.jsonl"
    j.write_text(
        '{"instruction": "Say hi.", "output": "Hi!"}\n\n'
        '{"instruction": "Say bye.", "output": "Bye."}\n'
    )
    assert [s["instruction"] for s in load_seeds(j)] == ["Say hi.", "Say bye."]


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            '{"instruction": "ok", "output": "x"}\n{"instruction": "bad"\n',
            r"s\.jsonl:2: not valid JSON",
        ),
        (
            '{"instruction": "ok", "output": "x"}\n{"output": "x"}\n',
            r"s\.jsonl:2: missing or empty 'instruction'",
        ),
        (
            '{"instruction": "ok", "instances": []}\n',
            r"s\.jsonl:1: 'instances' must be a non-empty",
        ),
        ('{"instruction": "ok"}\n', r"s\.jsonl:1: a seed task needs 'instances'"),
        (
            '{"instruction": "ok", "output": "x", "is_classification": "yes"}\n',
            r"s\.jsonl:1: 'is_classification'",
        ),
        ("", r"s\.jsonl: no seed tasks"),
    ],
)
def test_malformed_seed_file_names_the_line(tmp_path, body, expected):
    p = tmp_path / "s.jsonl"
    p.write_text(body)
    with pytest.raises(SeedError, match=expected):
        load_seeds(p)


# -- store --------------------------------------------------------------------------------------
def _finish(store: Store, key: str, text: str = "answer") -> None:
    store.begin_request(key, "test", "m", {"prompt": key}, "generate")
    store.finish_request(
        key,
        text=text,
        finish_reason="stop",
        tokens_in=3,
        tokens_out=5,
        cost_usd=0.01,
        latency_s=0.1,
        attempts=1,
    )


def _record(text: str, status: str = "kept", reason: str | None = None) -> dict:
    return {
        "text": text,
        "status": status,
        "reason": reason,
        "instances": [{"input": "", "output": f"out {text}", "status": status, "reason": reason}],
    }


def test_store_schema_wal_and_reopen(tmp_path):
    with Store(tmp_path) as s:
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.set_meta("x", {"a": 1})
    with Store(tmp_path / "tutelage.db") as s:
        assert s.get_meta("x") == {"a": 1}


def test_ledger_rows_are_not_duplicated_and_done_is_final(tmp_path):
    with Store(tmp_path) as s:
        _finish(s, "k1")
        s.begin_request("k1", "test", "m", {"prompt": "k1"}, "generate")  # a rerun asks again
        row = s.get_request("k1")
        assert row["status"] == "done" and row["text"] == "answer"
        s.fail_request("k1", "boom", 2)
        assert s.get_request("k1")["status"] == "done"
        assert s.request_totals()["requests"] == 1


def test_batch_is_atomic_and_funnel_counts(tmp_path):
    with Store(tmp_path) as s:
        s.put_seeds(
            [{"instruction": "Seed task one.", "instances": [{"input": "", "output": "o"}]}]
        )
        _finish(s, "k0")
        s.put_batch(
            0,
            "k0",
            "alpaca",
            [
                _record("a b c d"),
                _record("dup", "rejected", "rouge_duplicate"),
                {
                    "text": "",
                    "status": "rejected",
                    "reason": "parse_error",
                    "raw": "garbage",
                    "instances": [],
                },
            ],
        )
        _finish(s, "k1")
        # the same batch index twice: nothing of it may land
        with pytest.raises(sqlite3.IntegrityError):
            s.put_batch(0, "k1", "alpaca", [_record("other task here")])
        assert s.funnel() == {
            "generated": 3,
            "kept": 1,
            "rejected": {"rouge_duplicate": 1, "parse_error": 1},
        }
        assert s.next_batch_index() == 1
        assert [e["instruction"] for e in s.examples()] == ["a b c d"]
        assert s.count_kept_examples() == 1


def test_nearest_pos_links_within_a_batch(tmp_path):
    with Store(tmp_path) as s:
        _finish(s, "k0")
        dup = {
            **_record("a b c d e", "rejected", "rouge_duplicate"),
            "nearest_pos": 0,
            "nearest_score": 0.9,
        }
        ids = s.put_batch(0, "k0", "alpaca", [_record("a b c d"), dup])
        rej = s.examples(status="rejected")
        assert rej[0]["nearest"] == "a b c d" and rej[0]["nearest_score"] == 0.9
        assert len(ids) == 2


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tutelage.store import Store
    s = Store(sys.argv[1])
    i = s.next_batch_index()
    while True:
        key = f"k{i}"
        s.begin_request(key, "t", "m", {"i": i}, "generate")
        s.finish_request(key, text="x", finish_reason="stop", tokens_in=1, tokens_out=1,
                         cost_usd=0, latency_s=0, attempts=1)
        s.put_batch(i, key, "alpaca", [
            {"text": f"task {i} {j}", "status": "kept", "reason": None,
             "instances": [{"input": "", "output": "o", "status": "kept", "reason": None}]}
            for j in range(20)])
        print(i, flush=True)
        i += 1
""")


def test_kill_9_leaves_the_store_consistent(tmp_path):
    """Kill a writer mid-stream many times: every batch is whole, none is duplicated."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for _ in range(4):
        p = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), src], stdout=subprocess.PIPE, text=True
        )
        for _ in range(5):  # let it write a few batches, then kill it wherever it is
            p.stdout.readline()
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    with Store(tmp_path) as s:
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        batches = s.batch_stats()["batches"]
        assert batches >= 20
        rows = s.db.execute("SELECT request_key, COUNT(*) FROM instructions GROUP BY 1").fetchall()
        assert len(rows) == batches and all(n == 20 for _, n in rows)
        idx = [r[0] for r in s.db.execute("SELECT idx FROM batches ORDER BY idx")]
        assert idx == list(range(batches))
        orphans = s.db.execute(
            "SELECT COUNT(*) FROM requests WHERE status='done' AND key NOT IN "
            "(SELECT request_key FROM batches)"
        ).fetchone()[0]
        assert orphans <= 1  # at most the one answered but not yet ingested when killed
