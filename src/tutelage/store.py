"""The run store: one SQLite file per run folder, `RUN/tutelage.db`.

Why SQLite: a kill -9 at any moment must leave the run consistent. WAL mode plus one transaction per
logical step (a response and every record parsed from it commit together) gives exactly that, and a
rerun reads back what is there instead of asking the teacher again.

Every read and write of the run's state lives here, in plain SQL; callers pass plain values.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .migrations import migrate
from .stage_results import StageResult, result_from_detail

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

DB_NAME = "tutelage.db"

# Only a done request is ever answered from the store, so its cost is what each hit saved.
_CACHE_TOTALS = (
    "COALESCE(SUM(cache_hits),0) AS cache_hits, COALESCE(SUM(cost_usd * cache_hits),0) AS saved_usd"
)
# Answers that came without the server's token counts (`usage`): counted here, so their cost is an
# estimate (the ledger stores response["usage_estimated"]).
_ESTIMATED = "json_extract(response_json, '$.usage_estimated') = 1"
_ESTIMATED_TOTALS = (
    f"COALESCE(SUM({_ESTIMATED}),0) AS estimated,"
    f" COALESCE(SUM(CASE WHEN {_ESTIMATED} THEN cost_usd END),0) AS estimated_usd"
)


class Store:
    """A handle on one run's database. Safe to share across threads (one lock around the
    connection)."""

    def __init__(self, path: Path | str):
        path = Path(path)
        if path.is_dir() or path.suffix != ".db":
            path = path / DB_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is one step.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against a killed process (not a power cut), and much faster than FULL.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        # Bring the schema up to date: a new store runs every migration, an older one the rest.
        try:
            migrate(self.db, path)
        except BaseException:  # a store from a newer tutelage, or a migration that failed
            self.db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction. A transaction opened inside another joins it: the outer one commits
        (or rolls back) both, which is how the ledger commits a group of writes at once."""
        with self._lock:
            if self.db.in_transaction:
                yield self.db
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _all(self, sql: str, params: Iterable[Any] = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, tuple(params)).fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    # -- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # -- request ledger -------------------------------------------------------------------------
    def get_request(self, key: str) -> dict | None:
        return self._one("SELECT * FROM requests WHERE key=?", (key,))

    def begin_request(
        self, key: str, backend: str, model: str, body: dict | str, purpose: str
    ) -> None:
        """Record a request before it is sent (a retry of a failed or pending one keeps its row).
        `body`: the canonical request, or its JSON text already made (the ledger hashes it too)."""
        # A dict is written as the ledger writes its text (sorted keys, characters as they are).
        body_json = (
            body if isinstance(body, str) else json.dumps(body, sort_keys=True, ensure_ascii=False)
        )
        with self.transaction() as db:
            db.execute(
                "INSERT INTO requests (key, backend, model, body_json, status, purpose, created_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET status='pending', error=NULL"
                " WHERE status != 'done'",
                (key, backend, model, body_json, purpose, time.time()),
            )

    def finish_request(
        self,
        key: str,
        *,
        text: str,
        finish_reason: str | None,
        tokens_in: int,
        tokens_out: int,
        cost_usd: float,
        latency_s: float,
        attempts: int,
        response: dict | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE requests SET status='done', text=?, finish_reason=?, response_json=?,"
                " tokens_in=?, tokens_out=?, cost_usd=?, latency_s=?, attempts=?, error=NULL,"
                " completed_at=? WHERE key=?",
                (
                    text,
                    finish_reason,
                    json.dumps(response) if response is not None else None,
                    tokens_in,
                    tokens_out,
                    cost_usd,
                    latency_s,
                    attempts,
                    time.time(),
                    key,
                ),
            )

    def count_cache_hit(self, key: str) -> None:
        """Record that the stored answer to `key` was used instead of asking the teacher again."""
        with self.transaction() as db:
            db.execute("UPDATE requests SET cache_hits = cache_hits + 1 WHERE key=?", (key,))

    def fail_request(self, key: str, error: str, attempts: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE requests SET status='failed', error=?, attempts=?, completed_at=?"
                " WHERE key=? AND status != 'done'",
                (error, attempts, time.time(), key),
            )

    def put_remote_batch(self, batch: dict, keys: list[str]) -> None:
        """Record a remote batch and mark the requests it carries, in one transaction."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO remote_batches (id, endpoint, status, n_requests, detail_json,"
                " submitted_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET status=excluded.status,"
                " detail_json=excluded.detail_json, updated_at=excluded.updated_at",
                (
                    batch["id"],
                    batch.get("endpoint", ""),
                    batch.get("status", "validating"),
                    len(keys),
                    json.dumps(batch),
                    now,
                    now,
                ),
            )
            db.executemany(
                "UPDATE requests SET remote_batch=? WHERE key=? AND status='pending'",
                [(batch["id"], k) for k in keys],
            )

    def update_remote_batch(self, batch: dict) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE remote_batches SET status=?, detail_json=?, updated_at=? WHERE id=?",
                (batch.get("status", ""), json.dumps(batch), time.time(), batch["id"]),
            )

    def remote_batches(self) -> list[dict]:
        return self._all("SELECT * FROM remote_batches ORDER BY submitted_at")

    def request_totals(self) -> dict:
        """The run's requests: counts by status, tokens, cost and latency of what was sent, plus
        `cache_hits` (answers reused from the store), `saved_usd` (what they would have cost
        had they been sent again), and `estimated` answers (without the server's token counts)
        with their cost, `estimated_usd`."""
        row = self._one(
            "SELECT COUNT(*) AS requests, SUM(status='done') AS done,"
            " SUM(status='failed') AS failed,"
            " COALESCE(SUM(tokens_in),0) AS tokens_in, COALESCE(SUM(tokens_out),0) AS tokens_out,"
            " COALESCE(SUM(cost_usd),0) AS cost_usd, COALESCE(SUM(latency_s),0) AS latency_s,"
            f" {_CACHE_TOTALS}, {_ESTIMATED_TOTALS} FROM requests"
        )
        return {k: (v or 0) for k, v in row.items()}

    def request_totals_by_purpose(self) -> list[dict]:
        """The done requests' totals by purpose, with the cache and estimate totals as above."""
        return self._all(
            "SELECT purpose, COUNT(*) AS requests, COALESCE(SUM(tokens_in),0) AS tokens_in,"
            " COALESCE(SUM(tokens_out),0) AS tokens_out, COALESCE(SUM(cost_usd),0) AS cost_usd,"
            f" COALESCE(SUM(latency_s),0) AS latency_s, {_CACHE_TOTALS}, {_ESTIMATED_TOTALS}"
            " FROM requests WHERE status='done' GROUP BY purpose ORDER BY purpose"
        )

    # -- seeds ----------------------------------------------------------------------------------
    SEEDS_KEY = "seeds"

    def put_seeds(self, seeds: list[dict]) -> int:
        """Store the seed tasks once (each {'instruction', 'is_classification', 'instances'})."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM instructions WHERE source='seed' LIMIT 1").fetchone():
                return 0
            now = time.time()
            for i, seed in enumerate(seeds):
                cur = db.execute(
                    "INSERT INTO instructions (text, source, is_classification, status,"
                    " request_key, position, created_at) VALUES (?, 'seed', ?, 'kept', ?, ?, ?)",
                    (
                        seed["instruction"],
                        int(bool(seed.get("is_classification"))),
                        self.SEEDS_KEY,
                        i,
                        now,
                    ),
                )
                for j, inst in enumerate(seed.get("instances", [])):
                    db.execute(
                        "INSERT INTO instances (instruction_id, position, input, output, status)"
                        " VALUES (?, ?, ?, ?, 'kept')",
                        (cur.lastrowid, j, inst.get("input", ""), inst.get("output", "")),
                    )
            return len(seeds)

    def seeds(self) -> list[dict]:
        rows = self._all(
            "SELECT i.id, i.text AS instruction, i.is_classification, n.input, n.output"
            " FROM instructions i LEFT JOIN instances n ON n.instruction_id = i.id"
            " WHERE i.source='seed' ORDER BY i.position, n.position"
        )
        out: dict[int, dict] = {}
        for r in rows:
            seed = out.setdefault(
                r["id"],
                {
                    "id": r["id"],
                    "instruction": r["instruction"],
                    "is_classification": bool(r["is_classification"]),
                    "instances": [],
                },
            )
            if r["output"] is not None:
                seed["instances"].append({"input": r["input"], "output": r["output"]})
        return list(out.values())

    # -- generation -----------------------------------------------------------------------------
    def next_batch_index(self) -> int:
        row = self._one("SELECT COALESCE(MAX(idx) + 1, 0) AS n FROM batches")
        return row["n"]

    def batch_stats(self) -> dict:
        return self._one(
            "SELECT COUNT(*) AS batches, COALESCE(SUM(n_records),0) AS records,"
            " COALESCE(SUM(n_kept),0) AS kept FROM batches"
        )

    def recent_batches(self, n: int) -> list[dict]:
        return self._all("SELECT * FROM batches ORDER BY idx DESC LIMIT ?", (n,))

    def put_batch(self, idx: int, request_key: str, recipe: str, records: list[dict]) -> list[int]:
        """Store every record parsed from one response, and the batch marker, atomically.

        A record: {'text', 'status', 'reason', 'nearest_id' (or 'nearest_pos' for an earlier
        record of the same batch), 'nearest_score', 'raw',
        'is_classification', 'instances': [{'input', 'output', 'status', 'reason'}]}.
        Returns the new instruction ids in record order.
        """
        ids = []
        now = time.time()
        with self.transaction() as db:
            for pos, rec in enumerate(records):
                cur = db.execute(
                    "INSERT INTO instructions (text, source, is_classification, status, reason,"
                    " nearest_id, nearest_score, request_key, position, raw, detail_json,"
                    " created_at) VALUES (?, 'machine', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec["text"],
                        rec.get("is_classification"),
                        rec["status"],
                        rec.get("reason"),
                        rec.get("nearest_id"),
                        rec.get("nearest_score"),
                        request_key,
                        pos,
                        rec.get("raw"),
                        json.dumps(rec.get("detail") or {}, ensure_ascii=False),
                        now,
                    ),
                )
                ids.append(cur.lastrowid)
                if rec.get("nearest_pos") is not None:  # nearest is an earlier record of this batch
                    db.execute(
                        "UPDATE instructions SET nearest_id=? WHERE id=?",
                        (ids[rec["nearest_pos"]], cur.lastrowid),
                    )
                for j, inst in enumerate(rec.get("instances", [])):
                    messages = inst.get("messages")
                    db.execute(
                        "INSERT INTO instances (instruction_id, position, input, output, status,"
                        " reason, messages_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            cur.lastrowid,
                            j,
                            inst["input"],
                            inst["output"],
                            inst["status"],
                            inst.get("reason"),
                            json.dumps(messages, ensure_ascii=False) if messages else None,
                        ),
                    )
            n_kept = sum(r["status"] == "kept" for r in records)
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                (idx, request_key, recipe, len(records), n_kept, now),
            )
        return ids

    def machine_records(self) -> list[dict]:
        """Every machine instruction with its first instance, in generation order."""
        return self._all(
            "SELECT i.id, b.idx AS batch, i.position, i.text AS instruction, i.status, i.reason,"
            " i.nearest_id, i.nearest_score, i.raw, i.is_classification, n.id AS instance_id,"
            " n.input, n.output, n.status AS instance_status, n.reason AS instance_reason, n.split"
            " FROM instructions i JOIN batches b ON b.request_key = i.request_key"
            " LEFT JOIN instances n ON n.instruction_id = i.id AND n.position = 0"
            " WHERE i.source='machine' ORDER BY b.idx, i.position"
        )

    def count_kept_examples(self) -> int:
        return self._one(
            "SELECT COUNT(*) AS n FROM instructions i JOIN instances n ON n.instruction_id=i.id"
            " WHERE i.source='machine' AND i.status='kept' AND n.status='kept'"
        )["n"]

    def set_decisions(self, decisions: list[dict]) -> None:
        """Rewrite filter decisions: [{'id', 'status', 'reason', 'nearest_id', 'nearest_score',
        'instance_id', 'instance_status', 'instance_reason', 'split'}]."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE instructions SET status=:status, reason=:reason, nearest_id=:nearest_id,"
                " nearest_score=:nearest_score WHERE id=:id",
                decisions,
            )
            db.executemany(
                "UPDATE instances SET status=:instance_status, reason=:instance_reason,"
                " split=:split WHERE id=:instance_id",
                [d for d in decisions if d.get("instance_id") is not None],
            )

    def funnel(self) -> dict:
        """Machine records by outcome: {'generated', 'kept', 'rejected': {reason: n}}."""
        rows = self._all(
            "SELECT i.status, i.reason, n.status AS istatus, n.reason AS ireason, COUNT(*) AS n"
            " FROM instructions i LEFT JOIN instances n ON n.instruction_id=i.id AND n.position=0"
            " WHERE i.source='machine' GROUP BY 1, 2, 3, 4"
        )
        return _tally(
            (
                r["n"],
                r["status"] == "kept" and r["istatus"] in ("kept", None),
                r["reason"] if r["status"] == "rejected" else r["ireason"],
            )
            for r in rows
        )

    def examples(
        self, split: str | None = None, status: str = "kept", limit: int = -1
    ) -> list[dict]:
        """Instruction/input/output rows. status='kept' is the dataset; 'rejected' the rest."""
        where = (
            "i.status='kept' AND n.status='kept'"
            if status == "kept"
            else "(i.status='rejected' OR n.status='rejected')"
        )
        params: list[Any] = []
        if split is not None:
            where += " AND n.split=?"
            params.append(split)
        params.append(limit)
        rows = self._all(
            "SELECT i.id, n.id AS instance_id, i.text AS instruction, n.input, n.output, n.split,"
            " COALESCE(i.reason, n.reason) AS reason, i.nearest_score,"
            " (SELECT text FROM instructions WHERE id=i.nearest_id) AS nearest,"
            " i.detail_json, n.messages_json"
            " FROM instructions i JOIN instances n ON n.instruction_id=i.id"
            " JOIN batches b ON b.request_key=i.request_key"
            f" WHERE i.source='machine' AND {where} ORDER BY b.idx, i.position, n.position LIMIT ?",
            params,
        )
        for r in rows:  # a multi-turn conversation, and what the recipe knew of the task
            messages = r.pop("messages_json")
            r["messages"] = json.loads(messages) if messages else None
            r["detail"] = json.loads(r.pop("detail_json"))
        return rows

    def rejected_unparsed(self, limit: int = -1) -> list[dict]:
        return self._all(
            "SELECT id, text, raw, reason FROM instructions WHERE source='machine'"
            " AND status='rejected' AND reason='parse_error' ORDER BY id LIMIT ?",
            (limit,),
        )

    def rejected_samples(self, per_reason: int = 1) -> list[dict]:
        """The first `per_reason` rejected machine tasks of every reason code (as in funnel()).
        A task that never parsed has no instance: its input and output are None, raw holds it."""
        return self._all(
            "SELECT id, instruction, input, output, raw, reason, nearest, nearest_score FROM ("
            " SELECT i.id, i.text AS instruction, n.input, n.output, i.raw, i.nearest_score,"
            " COALESCE(CASE WHEN i.status='rejected' THEN i.reason ELSE n.reason END, 'rejected')"
            "  AS reason,"
            " (SELECT text FROM instructions WHERE id=i.nearest_id) AS nearest,"
            " ROW_NUMBER() OVER (PARTITION BY COALESCE(CASE WHEN i.status='rejected'"
            "  THEN i.reason ELSE n.reason END, 'rejected') ORDER BY i.id) AS k"
            " FROM instructions i LEFT JOIN instances n ON n.instruction_id=i.id AND n.position=0"
            " WHERE i.source='machine' AND (i.status='rejected' OR n.status='rejected'))"
            " WHERE k <= ? ORDER BY reason, id",
            (per_reason,),
        )

    # -- training -------------------------------------------------------------------------------
    def start_train_run(
        self,
        fingerprint: str,
        base_model: str,
        method: str,
        config: dict,
        n_train: int,
        n_valid: int,
    ) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO train_runs (fingerprint, status, base_model, method, config_json,"
                " n_train, n_valid, started_at) VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
                (
                    fingerprint,
                    base_model,
                    method,
                    json.dumps(config, default=str),
                    n_train,
                    n_valid,
                    time.time(),
                ),
            )
            return cur.lastrowid

    def log_train_step(self, run_id: int, step: int, **values: Any) -> None:
        cols = ["run_id", "step", *values]
        with self.transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO train_steps ({', '.join(cols)})"
                f" VALUES ({', '.join('?' * len(cols))})",
                (run_id, step, *values.values()),
            )

    def finish_train_run(
        self, run_id: int, status: str, output_dir: str | None, metrics: dict | None = None
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE train_runs SET status=?, output_dir=?, metrics_json=?, finished_at=?"
                " WHERE id=?",
                (status, output_dir, json.dumps(metrics or {}), time.time(), run_id),
            )

    def train_runs(self) -> list[dict]:
        return self._all("SELECT * FROM train_runs ORDER BY id")

    def latest_train_run(
        self, status: str | None = None, fingerprint: str | None = None
    ) -> dict | None:
        sql, params = "SELECT * FROM train_runs WHERE 1=1", []
        if status:
            sql, params = sql + " AND status=?", [*params, status]
        if fingerprint:
            sql, params = sql + " AND fingerprint=?", [*params, fingerprint]
        return self._one(sql + " ORDER BY id DESC LIMIT 1", params)

    def train_steps(self, run_id: int) -> list[dict]:
        return self._all("SELECT * FROM train_steps WHERE run_id=? ORDER BY step", (run_id,))

    # -- evaluation -----------------------------------------------------------------------------
    def get_eval_item(self, set_name: str, item_key: str, model_role: str) -> dict | None:
        row = self._one(
            "SELECT * FROM eval_items WHERE set_name=? AND item_key=? AND model_role=?",
            (set_name, item_key, model_role),
        )
        if row:
            row["scores"] = json.loads(row.pop("scores_json"))
        return row

    def put_eval_item(
        self,
        set_name: str,
        item_key: str,
        model_role: str,
        instruction: str,
        input: str,
        reference: str | None,
        answer: str | None,
        scores: dict,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO eval_items (set_name, item_key, model_role, instruction,"
                " input, reference, answer, scores_json, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    set_name,
                    item_key,
                    model_role,
                    instruction,
                    input,
                    reference,
                    answer,
                    json.dumps(scores),
                    time.time(),
                ),
            )

    def eval_items(self, set_name: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM eval_items", []
        if set_name:
            sql, params = sql + " WHERE set_name=?", [set_name]
        rows = self._all(sql + " ORDER BY set_name, id", params)
        for r in rows:
            r["scores"] = json.loads(r.pop("scores_json"))
        return rows

    def clear_eval(self, model_role: str) -> None:
        """Forget a model's answers (its weights changed, so they are stale), and every judgement
        of them."""
        with self.transaction() as db:
            db.execute("DELETE FROM eval_items WHERE model_role=?", (model_role,))
            db.execute(
                "DELETE FROM eval_summary WHERE model_role=? OR model_role LIKE ?"
                " OR model_role LIKE ?",
                (model_role, f"{model_role}:%", f"%:{model_role}"),
            )
            db.execute(
                "DELETE FROM eval_judgements WHERE subject=? OR subject LIKE ? OR subject LIKE ?",
                (model_role, f"{model_role}:%", f"%:{model_role}"),
            )

    def clear_judgements(self) -> None:
        """Forget every judgement (the judge changed)."""
        with self.transaction() as db:
            db.execute("DELETE FROM eval_judgements")

    def put_judgement(
        self,
        set_name: str,
        item_key: str,
        kind: str,
        subject: str,
        status: str,
        score: float | None,
        grade: str | None,
        detail: dict,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO eval_judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    set_name,
                    item_key,
                    kind,
                    subject,
                    status,
                    score,
                    grade,
                    json.dumps(detail),
                    time.time(),
                ),
            )

    def judgements(self, set_name: str | None = None, kind: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM eval_judgements WHERE 1=1", []
        if set_name:
            sql, params = sql + " AND set_name=?", [*params, set_name]
        if kind:
            sql, params = sql + " AND kind=?", [*params, kind]
        rows = self._all(sql + " ORDER BY set_name, item_key, kind, subject", params)
        for r in rows:
            r["detail"] = json.loads(r.pop("detail_json"))
        return rows

    def put_eval_summary(self, rows: list[dict]) -> None:
        """rows: [{'set_name', 'model_role', 'metric', 'value', 'ci_low', 'ci_high', 'n'}]."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO eval_summary VALUES (:set_name, :model_role, :metric,"
                " :value, :ci_low, :ci_high, :n, :created_at)",
                [{**r, "created_at": now} for r in rows],
            )

    def eval_summary(self) -> list[dict]:
        return self._all("SELECT * FROM eval_summary ORDER BY set_name, metric, model_role")

    # -- captures (the teacher's top-k distributions, tutelage.capture) -------------------------
    def capture_keys(self) -> dict[int, str]:
        """The request key each stored capture was scored by, by instance id."""
        rows = self._all("SELECT instance_id, request_key FROM captures")
        return {r["instance_id"]: r["request_key"] for r in rows}

    def put_capture(
        self,
        instance_id: int,
        request_key: str,
        vocab_hash: str,
        top_k: int,
        n_tokens: int,
        blobs: tuple[bytes, bytes, bytes],
    ) -> None:
        """Store (or replace) one instance's capture: answer_ids, topk_ids, topk_logprobs."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO captures (instance_id, request_key, vocab_hash, top_k,"
                " n_tokens, answer_ids, topk_ids, topk_logprobs, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (instance_id, request_key, vocab_hash, top_k, n_tokens, *blobs, time.time()),
            )

    def drop_captures(self, instance_ids: Iterable[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM captures WHERE instance_id=?", [(i,) for i in instance_ids])

    def captures(self) -> list[dict]:
        """Every stored capture of a kept instance, blobs included, by instance id."""
        return self._all(
            "SELECT c.* FROM captures c JOIN instances n ON n.id = c.instance_id"
            " WHERE n.status='kept' ORDER BY c.instance_id"
        )

    def capture_totals(self) -> dict:
        """Stored captures of kept instances: count, answer tokens, and bytes of their arrays."""
        row = self._one(
            "SELECT COUNT(*) AS captures, COALESCE(SUM(c.n_tokens),0) AS tokens,"
            " COALESCE(SUM(LENGTH(c.answer_ids) + LENGTH(c.topk_ids) + LENGTH(c.topk_logprobs)),"
            "0) AS bytes FROM captures c JOIN instances n ON n.id = c.instance_id"
            " WHERE n.status='kept'"
        )
        return dict(row)

    # -- stages ---------------------------------------------------------------------------------
    def stage_started(self, name: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stages (name, status, started_at) VALUES (?, 'running', ?)",
                (name, time.time()),
            )

    def stage_finished(self, name: str, result: StageResult) -> None:
        """Record a stage's end: its status and its declared result (`stage_results`)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE stages SET status=?, finished_at=?, detail_json=? WHERE name=?",
                (result.status, time.time(), json.dumps(result.to_detail(), default=str), name),
            )

    def stages(self) -> dict[str, dict]:
        """Each recorded stage: status, started_at, finished_at and `result`, its declared result
        (rows written by older versions load too)."""
        rows = self._all("SELECT * FROM stages")
        for r in rows:
            detail = json.loads(r.pop("detail_json"))
            r["result"] = result_from_detail(r["name"], r["status"], detail)
        return {r["name"]: r for r in rows}

    # -- generation funnels by step (Self-Instruct, `generate --explain`) --------------------
    def recent_rejections(self, n_batches: int) -> dict[str, int]:
        """Rejected machine instructions of the last `n_batches` generation requests, by reason."""
        rows = self._all(
            "SELECT i.reason, COUNT(*) AS n FROM instructions i"
            " JOIN batches b ON b.request_key = i.request_key"
            " WHERE i.source='machine' AND i.status='rejected'"
            " AND b.idx >= (SELECT COALESCE(MAX(idx), 0) FROM batches) - ? + 1"
            " GROUP BY i.reason",
            (n_batches,),
        )
        return {r["reason"] or "rejected": r["n"] for r in rows}

    def instance_funnel(self) -> dict:
        """Every instance of a machine instruction, by outcome: {'generated', 'kept',
        'rejected': {reason: n}}. With Self-Instruct an instruction has several instances, each
        judged on its own; with Alpaca this repeats the instruction funnel."""
        rows = self._all(
            "SELECT n.status, n.reason, COUNT(*) AS n FROM instances n"
            " JOIN instructions i ON i.id = n.instruction_id"
            " WHERE i.source='machine' GROUP BY 1, 2"
        )
        return _tally((r["n"], r["status"] == "kept", r["reason"]) for r in rows)

    def rejected_instance_samples(self, per_reason: int = 1) -> list[dict]:
        """The first `per_reason` rejected instances of every reason, with their instruction."""
        return self._all(
            "SELECT instruction, input, output, reason FROM ("
            " SELECT i.text AS instruction, n.input, n.output,"
            " COALESCE(n.reason, 'rejected') AS reason, n.id,"
            " ROW_NUMBER() OVER (PARTITION BY COALESCE(n.reason, 'rejected') ORDER BY n.id) AS k"
            " FROM instances n JOIN instructions i ON i.id = n.instruction_id"
            " WHERE i.source='machine' AND n.status='rejected')"
            " WHERE k <= ? ORDER BY reason, id",
            (per_reason,),
        )

    def batch_recipes(self) -> dict[int, str]:
        """The recipe of every stored generation request, by its index (machine_records' batch)."""
        return {r["idx"]: r["recipe"] for r in self._all("SELECT idx, recipe FROM batches")}

    def set_instruction_splits(self, splits: dict[int, str | None]) -> None:
        """Give every kept instance of each instruction its instruction's split (None: none).
        One split per instruction: its instances never straddle train and test."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE instances SET split = CASE WHEN status='kept' THEN ? END"
                " WHERE instruction_id=?",
                [(split, id_) for id_, split in splits.items()],
            )


def _tally(rows: Iterable[tuple[int, bool, str | None]]) -> dict:
    """{'generated', 'kept', 'rejected': {reason: n}} from (count, kept, reason) groups."""
    out: dict = {"generated": 0, "kept": 0, "rejected": {}}
    for n, kept, reason in rows:
        out["generated"] += n
        if kept:
            out["kept"] += n
        else:
            reason = reason or "rejected"
            out["rejected"][reason] = out["rejected"].get(reason, 0) + n
    return out
