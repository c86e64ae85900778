"""The store's migrations, on stores written by the old tutelage versions themselves
(tests/data/, made by tests/data/make_store_fixtures.py)."""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tutelage import migrations
from tutelage.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from tutelage.stage_results import (
    EvaluateResult,
    FilterResult,
    GenerateResult,
    ReportResult,
    StageFailed,
    TrainResult,
)
from tutelage.store import Store

DATA = Path(__file__).parent / "data"
# Each fixture and the schema version its tutelage stamped it with.
OLD_STORES = {
    "schema1.db": 1,
    "schema2.db": 2,
    "schema2-judgements.db": 2,  # 2dff77b: eval_judgements, still stamped 2
    "schema3.db": 3,
}
FUNNEL = {
    "generated": 6,
    "kept": 3,
    "rejected": {"rouge_duplicate": 1, "parse_error": 1, "too_long": 1},
}


def copy_of(name: str, tmp_path: Path) -> Path:
    """A copy of a fixture to migrate (the committed file stays as the old version wrote it)."""
    path = tmp_path / "run" / "tutelage.db"
    path.parent.mkdir(parents=True)
    shutil.copy(DATA / name, path)
    return path


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection (autocommit, as Store's), closed on leaving."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def user_version(path: Path) -> int:
    with connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


def _normalised(sql: str | None) -> str | None:
    """CREATE text without comments and layout: a table built at once and one grown by ALTER TABLE
    ADD COLUMN read the same when their columns and constraints are the same."""
    if sql is None:
        return None
    sql = re.sub(r"--[^\n]*", "", sql)
    sql = re.sub(r"\s+", " ", sql)
    return re.sub(r"\s*([(),])\s*", r"\1", sql).strip()


def schema(path: Path) -> dict:
    """Everything the store's schema is: sqlite_master (CREATE text normalised) and, per table,
    its columns, indexes and foreign keys as SQLite reads them."""
    with connect(path) as db:
        master = sorted(
            (t, name, table, _normalised(sql))
            for t, name, table, sql in db.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master"
            )
        )
        tables = [r[1] for r in master if r[0] == "table"]
        return {
            "master": master,
            "columns": {t: db.execute(f"PRAGMA table_xinfo({t})").fetchall() for t in tables},
            "indexes": {
                t: [
                    (*ix, db.execute(f"PRAGMA index_xinfo({ix[1]})").fetchall())
                    for ix in db.execute(f"PRAGMA index_list({t})").fetchall()
                ]
                for t in tables
            },
            "foreign_keys": {
                t: db.execute(f"PRAGMA foreign_key_list({t})").fetchall() for t in tables
            },
        }


def raw_master(path: Path) -> list:
    with connect(path) as db:
        return db.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()


def dump(path: Path) -> list[str]:
    """The whole database as SQL: schema, rows and user_version."""
    with connect(path) as db:
        return [*db.iterdump(), f"user_version={db.execute('PRAGMA user_version').fetchone()[0]}"]


def columns(path: Path, table: str) -> set[str]:
    with connect(path) as db:
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def row_counts(path: Path) -> dict[str, int]:
    with connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}


@pytest.fixture
def fresh(tmp_path) -> Path:
    """A store made today, by running every migration."""
    with Store(tmp_path / "fresh") as store:
        return store.path


def test_the_migrations_are_numbered_in_order(fresh):
    assert SCHEMA_VERSION == len(MIGRATIONS) == 6
    assert [m.__name__[:4] for m in MIGRATIONS] == [
        "m001",
        "m002",
        "m003",
        "m004",
        "m005",
        "m006",
    ]
    assert user_version(fresh) == SCHEMA_VERSION


def test_the_fixtures_are_as_their_versions_wrote_them(tmp_path):
    for name, version in OLD_STORES.items():
        path = copy_of(name, tmp_path / name)
        assert user_version(path) == version, name
        assert ("cache_hits" in columns(path, "requests")) == (version >= 3)
        tables = row_counts(path)
        assert ("remote_batches" in tables) == (version >= 2)
        assert ("eval_judgements" in tables) == (name in ("schema2-judgements.db", "schema3.db"))


def test_a_schema_1_store_migrates_to_the_very_schema_text_of_a_new_one(tmp_path, fresh):
    """Schema 1's CREATE statements are m001's, so a migrated store matches byte for byte."""
    path = copy_of("schema1.db", tmp_path)
    Store(path).close()
    assert raw_master(path) == raw_master(fresh)


@pytest.mark.parametrize("name", OLD_STORES)
def test_an_old_store_migrates_and_keeps_its_rows(name, tmp_path, fresh):
    version = OLD_STORES[name]
    path = copy_of(name, tmp_path)
    before = row_counts(path)

    with Store(path) as store:
        assert user_version(path) == SCHEMA_VERSION
        assert schema(path) == schema(fresh)
        after = row_counts(path)
        assert {t: n for t, n in after.items() if t in before} == before
        assert after.get("remote_batches", 0) == (1 if version >= 2 else 0)
        assert after["eval_judgements"] == before.get("eval_judgements", 0)

        # The ledger: every request as it was, with the new columns' values (or defaults).
        requests = {r["key"]: r for r in store.db.execute("SELECT * FROM requests")}
        assert {k: r["status"] for k, r in requests.items()} == {
            "gen-0": "done",
            "gen-1": "done",
            "gen-2": "failed",
            "gen-3": "pending",
            "judge-0": "done",
        }
        gen0 = store.get_request("gen-0")
        assert gen0["text"] == "the answer to gen-0" and gen0["cost_usd"] == 0.002
        assert (gen0["tokens_in"], gen0["tokens_out"], gen0["attempts"]) == (100, 50, 1)
        assert store.get_request("gen-2")["error"] == "HTTP 500: server error"
        assert store.get_request("judge-0")["purpose"] == "judge"
        assert store.get_request("gen-3")["remote_batch"] == ("batch_1" if version >= 2 else None)
        assert store.get_request("gen-0")["cache_hits"] == (2 if version >= 3 else 0)
        assert {r["key"]: r["cache_hits"] for r in requests.values() if r["key"] != "gen-0"} == {
            k: 0 for k in ("gen-1", "gen-2", "gen-3", "judge-0")
        }
        if version >= 2:
            [batch] = store.remote_batches()
            assert (batch["id"], batch["status"], batch["n_requests"]) == (
                "batch_1",
                "in_progress",
                1,
            )

        # Seeds, generated records and the filter's splits.
        assert store.get_meta("config")["teacher"]["model"] == "gpt-test"
        seeds = store.seeds()
        assert [len(s["instances"]) for s in seeds] == [1, 2]
        assert seeds[1]["is_classification"] is True
        assert store.funnel() == FUNNEL
        assert store.next_batch_index() == 2
        assert [e["instruction"] for e in store.examples()] == [
            "Write a haiku about autumn leaves.",
            "Explain photosynthesis to a child.",
            "List the planets in order.",
        ]
        assert [e["split"] for e in store.examples()] == ["train", "train", "test"]
        [duplicate] = [r for r in store.examples(status="rejected") if r["nearest"]]
        assert duplicate["nearest"] == "Write a haiku about autumn leaves."
        assert duplicate["nearest_score"] == 0.82
        assert [r["raw"] for r in store.rejected_unparsed()] == ["### garbled"]

        # Training and evaluation.
        done = store.latest_train_run(status="done")
        assert done["fingerprint"] == "fp-1" and done["output_dir"] == "run/student"
        assert [s["loss"] for s in store.train_steps(done["id"])] == [2.5, 2.1, 1.8]
        assert [r["status"] for r in store.train_runs()] == ["done", "failed"]
        assert store.get_eval_item("self_instruct_eval", "item-0", "tuned")["scores"] == {
            "rouge_l": 0.4
        }
        [summary] = store.eval_summary()
        assert (summary["metric"], summary["value"], summary["n"]) == ("rouge_l", 0.4, 1)

        # Stage rows as the old version wrote them load as declared results.
        stages = {name: row["result"] for name, row in store.stages().items()}
        generate, filter_, train, evaluate, report = (
            stages[s] for s in ("generate", "filter", "train", "evaluate", "report")
        )
        assert isinstance(generate, GenerateResult) and generate.stop_reason == "budget"
        assert generate.status == "stopped" and generate.funnel == FUNNEL
        assert isinstance(filter_, FilterResult) and filter_.splits == {"train": 2, "test": 1}
        assert isinstance(train, TrainResult) and train.run_id == done["id"]
        assert train.steps == 3 and train.train_loss == 1.8 and train.reused is False
        assert isinstance(evaluate, EvaluateResult) and evaluate.models["tuned"] == "run/student"
        assert evaluate.pairs == (["tuned:base"] if "eval_judgements" in before else [])
        assert isinstance(report, StageFailed) and report.error == "disk full"

        # And today's API works on it.
        store.begin_request("new", "openai", "gpt-test", {"prompt": "new"}, "generate")
        store.finish_request(
            "new",
            text="a new answer",
            finish_reason="stop",
            tokens_in=10,
            tokens_out=5,
            cost_usd=0.5,
            latency_s=0.1,
            attempts=1,
        )
        store.count_cache_hit("new")
        totals = store.request_totals()
        assert (totals["requests"], totals["done"], totals["failed"]) == (6, 4, 1)
        assert totals["cache_hits"] == gen0["cache_hits"] + 1
        assert totals["saved_usd"] == pytest.approx(0.5 + 0.002 * gen0["cache_hits"])
        store.put_judgement("self_instruct_eval", "item-0", "rubric", "base", "done", None, "B", {})
        assert any(j["grade"] == "B" for j in store.judgements(kind="rubric"))
        store.stage_started("report")
        store.stage_finished("report", ReportResult(markdown="report.md", html="report.html"))
        assert store.stages()["report"]["result"] == ReportResult("report.md", "report.html")
        assert store.stages()["report"]["status"] == "done"


@pytest.mark.parametrize("name", OLD_STORES)
def test_reopening_a_migrated_store_changes_nothing(name, tmp_path):
    path = copy_of(name, tmp_path)
    Store(path).close()
    migrated = dump(path)
    Store(path).close()
    assert dump(path) == migrated


def test_a_store_from_a_newer_tutelage_is_refused(tmp_path):
    path = tmp_path / "tutelage.db"
    with connect(path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    before = dump(path)
    with pytest.raises(RuntimeError) as error:
        Store(path)
    assert str(error.value) == (
        f"{path}: written by a newer tutelage (schema {SCHEMA_VERSION + 1})"
    )
    assert dump(path) == before  # nothing was done to it


@pytest.mark.parametrize("k", range(SCHEMA_VERSION + 1))
def test_a_new_store_stopped_after_k_migrations_ends_as_a_new_one(k, tmp_path, fresh):
    """A kill between two migrations leaves the first k done; the next open runs the rest."""
    path = tmp_path / "tutelage.db"
    with connect(path) as db:
        migrate(db, path, to_version=k)
    assert user_version(path) == k
    Store(path).close()
    assert dump(path) == dump(fresh)


@pytest.mark.parametrize("k", range(1, SCHEMA_VERSION + 1))
def test_an_old_store_stopped_after_k_migrations_ends_identical(k, tmp_path):
    whole = copy_of("schema1.db", tmp_path / "whole")
    Store(whole).close()
    path = copy_of("schema1.db", tmp_path / "stepped")
    with connect(path) as db:
        migrate(db, path, to_version=k)
    assert user_version(path) == k
    Store(path).close()
    assert dump(path) == dump(whole)


def test_a_migration_that_fails_leaves_the_store_at_the_version_before(tmp_path, monkeypatch):
    """A migration and its version bump commit together: one that fails half-way undoes its part."""
    path = copy_of("schema1.db", tmp_path)
    before = dump(path)

    def half_done(db):
        db.execute("ALTER TABLE requests ADD COLUMN remote_batch TEXT")
        raise OSError("disk full")

    monkeypatch.setattr(migrations, "MIGRATIONS", [MIGRATIONS[0], half_done, *MIGRATIONS[2:]])
    with pytest.raises(OSError):
        Store(path)
    assert dump(path) == before


KILLED_MID_MIGRATION = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from tutelage import migrations
    from tutelage.store import Store

    real = migrations.MIGRATIONS[1]

    def killed(db):
        real(db)  # all of migration 2 is written, its version bump is not yet
        os.kill(os.getpid(), signal.SIGKILL)

    migrations.MIGRATIONS[1] = killed
    Store(sys.argv[1])
""")


def test_a_store_killed_mid_migration_is_carried_on_by_the_next_open(tmp_path):
    whole = copy_of("schema1.db", tmp_path / "whole")
    Store(whole).close()
    path = copy_of("schema1.db", tmp_path / "killed")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_MIGRATION)
    src = str(Path(__file__).resolve().parents[1] / "src")
    command = [sys.executable, str(script), str(path), src]
    run = subprocess.run(command, check=False, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert user_version(path) == 1  # migration 1 was already there; 2 never committed
    assert "remote_batch" not in columns(path, "requests")
    Store(path).close()
    assert dump(path) == dump(whole)
