"""The store's schema, as its history: an ordered list of migrations, one per schema version.

A store's `PRAGMA user_version` is the number of migrations it has had. Opening a store (`Store`)
applies the missing ones in order, each in its own transaction together with its version bump, so a
kill between two leaves a store at the earlier version, which the next open carries on from. A new
store runs them all; today's schema is what they add up to (`sqlite3 RUN/tutelage.db .schema`).

A migration is a function of the connection, registered with `@migration` and named `mNNN_what`
for its position. Never edit one that has shipped: stores in the wild have already run it. A
change to the schema is a new migration at the end.

Every migration is written so that running it on a store that already has its change is harmless
(CREATE ... IF NOT EXISTS, a column added only if missing): older tutelage built the schema with
separate statements outside any transaction and stamped the version last, so a store it was killed
while creating can hold tables that its version does not account for.

Every read and write of the run's state is in `store.py`; this module only holds the schema.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register `fn` as the next migration; its name's number must be its position."""
    position = len(MIGRATIONS) + 1
    if not fn.__name__.startswith(f"m{position:03d}_"):
        raise ValueError(f"migration {fn.__name__} registered as number {position}")
    MIGRATIONS.append(fn)
    return fn


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    """Run each statement of `script` in turn (executescript would first commit the migration's
    transaction, and could not be rolled back with it)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement: {statement.strip()[:60]}")


def _add_column(db: sqlite3.Connection, table: str, column: str, definition: str) -> None:
    """ALTER TABLE ... ADD COLUMN, unless the table already has the column."""
    if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


# -- the migrations, in order ---------------------------------------------------------------------
# Schema 1 as commit 084140b wrote it, word for word (the text inside each CREATE is what
# sqlite_master keeps), so a store that version wrote and a new one hold the same schema text.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The request ledger: one row per distinct teacher request, keyed by the hash of its canonical
-- form.
CREATE TABLE IF NOT EXISTS requests (
    key           TEXT PRIMARY KEY,
    backend       TEXT NOT NULL,
    model         TEXT NOT NULL,
    body_json     TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    text          TEXT,
    finish_reason TEXT,
    response_json TEXT,
    tokens_in     INTEGER NOT NULL DEFAULT 0,
    tokens_out    INTEGER NOT NULL DEFAULT 0,
    cost_usd      REAL NOT NULL DEFAULT 0,
    latency_s     REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    purpose       TEXT NOT NULL DEFAULT 'generate',
    created_at    REAL NOT NULL,
    completed_at  REAL
);
-- One row per generation request the loop has finished with, in loop order; its records commit
-- in the same transaction, so a batch is either wholly ingested or not at all.
CREATE TABLE IF NOT EXISTS batches (
    idx         INTEGER PRIMARY KEY,
    request_key TEXT NOT NULL REFERENCES requests(key),
    recipe      TEXT NOT NULL,
    n_records   INTEGER NOT NULL,
    n_kept      INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instructions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    text              TEXT NOT NULL,
    source            TEXT NOT NULL CHECK (source IN ('seed', 'machine')),
    is_classification INTEGER,
    status            TEXT NOT NULL CHECK (status IN ('kept', 'rejected')),
    reason            TEXT,
    nearest_id        INTEGER REFERENCES instructions(id),
    nearest_score     REAL,
    request_key       TEXT NOT NULL,
    position          INTEGER NOT NULL,
    raw               TEXT,
    created_at        REAL NOT NULL,
    UNIQUE (request_key, position)
);
CREATE TABLE IF NOT EXISTS instances (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    instruction_id INTEGER NOT NULL REFERENCES instructions(id),
    position       INTEGER NOT NULL,
    input          TEXT NOT NULL,
    output         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('kept', 'rejected')),
    reason         TEXT,
    split          TEXT CHECK (split IN ('train', 'valid', 'test')),
    UNIQUE (instruction_id, position)
);
CREATE TABLE IF NOT EXISTS train_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    base_model  TEXT NOT NULL,
    method      TEXT NOT NULL,
    config_json TEXT NOT NULL,
    output_dir  TEXT,
    n_train     INTEGER,
    n_valid     INTEGER,
    metrics_json TEXT,
    started_at  REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS train_steps (
    run_id       INTEGER NOT NULL REFERENCES train_runs(id),
    step         INTEGER NOT NULL,
    epoch        REAL,
    loss         REAL,
    eval_loss    REAL,
    lr           REAL,
    tokens       INTEGER,
    tokens_per_s REAL,
    elapsed_s    REAL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS eval_items (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    set_name    TEXT NOT NULL,
    item_key    TEXT NOT NULL,
    model_role  TEXT NOT NULL,
    instruction TEXT NOT NULL,
    input       TEXT NOT NULL DEFAULT '',
    reference   TEXT,
    answer      TEXT,
    scores_json TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    UNIQUE (set_name, item_key, model_role)
);
CREATE TABLE IF NOT EXISTS eval_summary (
    set_name   TEXT NOT NULL,
    model_role TEXT NOT NULL,
    metric     TEXT NOT NULL,
    value      REAL,
    ci_low     REAL,
    ci_high    REAL,
    n          INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (set_name, model_role, metric)
);
CREATE TABLE IF NOT EXISTS stages (
    name        TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'stopped', 'failed')),
    started_at  REAL NOT NULL,
    finished_at REAL,
    detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS instructions_status ON instructions(status, reason);
CREATE INDEX IF NOT EXISTS instances_instruction ON instances(instruction_id);
"""


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    """Schema 1 (084140b): the request ledger, seeds and generated records, training, evaluation
    and stages."""
    _execute_script(db, SCHEMA_1)


REMOTE_BATCHES = """
-- Remote batches (OpenAI's Batch API): recorded as soon as one exists, so a restart polls it.
CREATE TABLE IF NOT EXISTS remote_batches (
    id           TEXT PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    status       TEXT NOT NULL,
    n_requests   INTEGER NOT NULL,
    detail_json  TEXT NOT NULL DEFAULT '{}',
    submitted_at REAL NOT NULL,
    updated_at   REAL NOT NULL
);
"""


@migration
def m002_remote_batches(db: sqlite3.Connection) -> None:
    """Schema 2 (4b8e669): remote batches (OpenAI's Batch API), and the one carrying each
    request."""
    _add_column(db, "requests", "remote_batch", "TEXT")
    _execute_script(db, REMOTE_BATCHES)


EVAL_JUDGEMENTS = """
-- A judge's decision on one item: `pairwise` compares two roles' answers ("tuned:base"), score
-- for the first in [0, 1], both orders in detail_json; `rubric` grades one role's answer A-D.
CREATE TABLE IF NOT EXISTS eval_judgements (
    set_name    TEXT NOT NULL,
    item_key    TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('pairwise', 'rubric')),
    subject     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    score       REAL,
    grade       TEXT,
    detail_json TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    PRIMARY KEY (set_name, item_key, kind, subject)
);
"""


@migration
def m003_judgements_and_cache_hits(db: sqlite3.Connection) -> None:
    """Schema 3 (9d6ceaf): how often each stored answer was reused instead of paid for again (no
    hit was counted before: 0). Also the judge's decisions: `eval_judgements` came with 2dff77b
    while stores were still stamped 2, so a schema-2 store may have it already."""
    _execute_script(db, EVAL_JUDGEMENTS)
    _add_column(db, "requests", "cache_hits", "INTEGER NOT NULL DEFAULT 0")


@migration
def m004_task_details(db: sqlite3.Connection) -> None:
    """Schema 4: what the newer recipes know about a task beyond its text (`detail_json`: a
    Magpie task's category and input quality, an evolution's parent, round and operator, why a
    conversation stopped), and a multi-turn conversation's every turn (`messages_json`: user and
    assistant messages, null for a single exchange)."""
    _add_column(db, "instructions", "detail_json", "TEXT NOT NULL DEFAULT '{}'")
    _add_column(db, "instances", "messages_json", "TEXT")


CAPTURES = """
-- The teacher's top-k next-token log-probs over a kept instance's answer, scored under teacher
-- forcing (the capture stage; arrays as little-endian bytes, see tutelage.capture.storage):
-- answer_ids int32 [n_tokens], topk_ids int32 [n_tokens, top_k], topk_logprobs float16 likewise.
-- request_key: the ledger request that scored it (a changed teacher or k makes another key).
CREATE TABLE IF NOT EXISTS captures (
    instance_id   INTEGER PRIMARY KEY REFERENCES instances(id),
    request_key   TEXT NOT NULL,
    vocab_hash    TEXT NOT NULL,
    top_k         INTEGER NOT NULL,
    n_tokens      INTEGER NOT NULL,
    answer_ids    BLOB NOT NULL,
    topk_ids      BLOB NOT NULL,
    topk_logprobs BLOB NOT NULL,
    created_at    REAL NOT NULL
);
"""


@migration
def m005_captures(db: sqlite3.Connection) -> None:
    """Schema 5: the teacher's captured top-k distributions for logit distillation."""
    _execute_script(db, CAPTURES)


@migration
def m006_train_step_parts(db: sqlite3.Connection) -> None:
    """Schema 6: a distillation run's loss in its two parts per step (cross-entropy on the data
    and the divergence from the teacher's distributions, each per response token), and the
    divergence on the valid split; null for supervised runs."""
    _add_column(db, "train_steps", "ce_loss", "REAL")
    _add_column(db, "train_steps", "divergence", "REAL")
    _add_column(db, "train_steps", "eval_divergence", "REAL")


SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path | str, to_version: int = SCHEMA_VERSION) -> None:
    """Bring the store open on `db` (autocommit: isolation_level=None) up to `to_version`.

    Each step re-reads the version inside its own write transaction, so two processes opening
    one store at once apply every migration once. A store from a newer tutelage is refused."""
    while True:
        version = _user_version(db)
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: written by a newer tutelage (schema {version})")
        if version >= to_version:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(db)  # another process may have got here first
            if version < to_version:
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version={version + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def _user_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]
