"""Write a small run store with an old tutelage's own Store API: the fixtures that
tests/test_store_migrations.py opens with today's code.

Each fixture is made by the commit that introduced its schema (and one by the commit that added
`eval_judgements` while the schema was still stamped 2):

    schema1.db             084140b  the first schema
    schema2.db             4b8e669  + remote batches, requests.remote_batch
    schema2-judgements.db  2dff77b  + eval_judgements (no version bump)
    schema3.db             9d6ceaf  + requests.cache_hits

To regenerate one, check that commit out beside the repository and run this script with its
source first on the path (from the repository root):

    git worktree add --detach /tmp/store-v1 084140b
    PYTHONPATH=/tmp/store-v1/src .venv/bin/python tests/data/make_store_fixtures.py \\
        tests/data/schema1.db
    git worktree remove /tmp/store-v1

The script uses only what that version's Store has: it finds out by looking (remote batches,
judgements and cache hits where the version has them), and records each stage's detail as that
version's pipeline wrote it: a plain dict, with the version's `stage_finished(name, status,
detail)`.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import tutelage
from tutelage.store import Store


def record(text: str, status: str = "kept", reason: str | None = None, **extra) -> dict:
    """A generated task as `put_batch` takes it: one instruction with one instance."""
    instance = {"input": "", "output": f"Answer to: {text}", "status": status, "reason": reason}
    return {"text": text, "status": status, "reason": reason, "instances": [instance], **extra}


def finish(store: Store, key: str, purpose: str = "generate", cost: float = 0.002) -> None:
    store.begin_request(key, "openai", "gpt-test", {"prompt": key}, purpose)
    store.finish_request(
        key,
        text=f"the answer to {key}",
        finish_reason="stop",
        tokens_in=100,
        tokens_out=50,
        cost_usd=cost,
        latency_s=1.5,
        attempts=1,
    )


def write_store(path: Path) -> None:
    has_remote_batches = hasattr(Store, "put_remote_batch")
    has_judgements = hasattr(Store, "put_judgement")
    has_cache_hits = hasattr(Store, "count_cache_hit")
    with Store(path) as store:
        store.set_meta("config", {"seed": 0, "teacher": {"backend": "openai", "model": "gpt-test"}})
        store.set_meta("eval_fingerprint_tuned", "fp-tuned")
        store.put_seeds(
            [
                {
                    "instruction": "Give three tips for staying healthy.",
                    "is_classification": False,
                    "instances": [{"input": "", "output": "Eat well, sleep, move."}],
                },
                {
                    "instruction": "Is this review positive or negative?",
                    "is_classification": True,
                    "instances": [
                        {"input": "Great film.", "output": "Positive"},
                        {"input": "Dull.", "output": "Negative"},
                    ],
                },
            ]
        )

        # The ledger: two answered generation requests, a failed one, a pending one, a judge call.
        finish(store, "gen-0")
        finish(store, "gen-1")
        store.begin_request("gen-2", "openai", "gpt-test", {"prompt": "gen-2"}, "generate")
        store.fail_request("gen-2", "HTTP 500: server error", 3)
        store.begin_request("gen-3", "openai", "gpt-test", {"prompt": "gen-3"}, "generate")
        finish(store, "judge-0", purpose="judge", cost=0.001)

        # Two generated batches with kept and rejected records (a near duplicate, an unparsed one).
        store.put_batch(
            0,
            "gen-0",
            "alpaca",
            [
                record("Write a haiku about autumn leaves."),
                record("Explain photosynthesis to a child."),
                record(
                    "Write a haiku about autumn leaf.",
                    "rejected",
                    "rouge_duplicate",
                    nearest_pos=0,
                    nearest_score=0.82,
                ),
                {
                    "text": "",
                    "status": "rejected",
                    "reason": "parse_error",
                    "raw": "### garbled",
                    "instances": [],
                },
            ],
        )
        store.put_batch(
            1,
            "gen-1",
            "alpaca",
            [record("List the planets in order."), record("x" * 40, "rejected", "too_long")],
        )
        splits = iter(["train", "train", "test"])
        store.set_decisions(
            [
                {
                    "id": r["id"],
                    "status": r["status"],
                    "reason": r["reason"],
                    "nearest_id": r["nearest_id"],
                    "nearest_score": r["nearest_score"],
                    "instance_id": r["instance_id"],
                    "instance_status": r["instance_status"],
                    "instance_reason": r["instance_reason"],
                    "split": next(splits) if r["status"] == "kept" else None,
                }
                for r in store.machine_records()
                if r["instance_id"] is not None
            ]
        )

        if has_remote_batches:  # the pending request waits in a remote batch
            batch = {"id": "batch_1", "endpoint": "/v1/chat/completions", "status": "validating"}
            store.put_remote_batch(batch, ["gen-3"])
            store.update_remote_batch({**batch, "status": "in_progress"})
        if has_cache_hits:  # a rerun answered gen-0 twice from the store
            store.count_cache_hit("gen-0")
            store.count_cache_hit("gen-0")

        # A finished training run with its steps, and one that failed.
        config = {"learning_rate": 2e-5, "epochs": 1}
        run_id = store.start_train_run("fp-1", "SmolLM2-135M", "full", config, 2, 0)
        for step, loss in enumerate([2.5, 2.1, 1.8], start=1):
            store.log_train_step(
                run_id, step, epoch=step / 3, loss=loss, lr=2e-5, tokens=100 * step, elapsed_s=step
            )
        metrics = {
            "train_loss": 1.8,
            "train_loss_avg": 2.13,
            "eval_loss": None,
            "eval_loss_first": None,
            "steps": 3,
            "useful_tokens": 300,
            "tokens_per_s": 150.0,
            "seconds": 2.0,
            "peak_rss_mb": 900.0,
        }
        if has_judgements:  # by then training also reported packing and the GGUF export
            metrics.update(packed=False, gguf=None, gguf_error="no llama.cpp converter")
        store.finish_train_run(run_id, "done", "run/student", metrics)
        failed_id = store.start_train_run("fp-0", "SmolLM2-135M", "full", config, 2, 0)
        store.finish_train_run(failed_id, "failed", None, {"error": "interrupted"})

        # Evaluation: answers of two models on one item, the summary, the judge where there is one.
        for role, answer, score in (("base", "Leaves fall.", 0.2), ("tuned", "Red leaves.", 0.4)):
            store.put_eval_item(
                "self_instruct_eval",
                "item-0",
                role,
                "Write a haiku about autumn.",
                "",
                "Crisp leaves drift down",
                answer,
                {"rouge_l": score},
            )
        ci = {"mean": 0.4, "ci_low": 0.1, "ci_high": 0.7, "n": 1}
        store.put_eval_summary(
            [
                {
                    "set_name": "self_instruct_eval",
                    "model_role": "tuned",
                    "metric": "rouge_l",
                    "value": ci["mean"],
                    "ci_low": ci["ci_low"],
                    "ci_high": ci["ci_high"],
                    "n": ci["n"],
                }
            ]
        )
        summary = {
            "models": {"base": "SmolLM2-135M", "tuned": "run/student"},
            "notes": [],
            "sets": {"self_instruct_eval": {"n_items": 1, "metrics": {"rouge_l": {"tuned": ci}}}},
        }
        if has_judgements:
            store.put_judgement(
                "self_instruct_eval",
                "item-0",
                "pairwise",
                "tuned:base",
                "done",
                1.0,
                None,
                {"orders": ["AB", "BA"]},
            )
            store.put_judgement(
                "self_instruct_eval", "item-0", "rubric", "tuned", "failed", None, None, {}
            )
            summary.update(judge="openai:gpt-test", pairs=["tuned:base"])

        # Every stage as the pipeline recorded it: generation stopped short of its target, the
        # report failed.
        stage_rows = [
            (
                "generate",
                "stopped",
                {
                    "kept": 3,
                    "target": 10,
                    "requests": 2,
                    "new_requests": 2,
                    "stop_reason": "budget",
                    "message": "stopped: budget spent",
                    "cost_usd": 0.004,
                    "funnel": store.funnel(),
                },
            ),
            ("filter", "done", {"funnel": store.funnel(), "splits": {"train": 2, "test": 1}}),
            (
                "train",
                "done",
                {**metrics, "run_id": run_id, "output_dir": "run/student", "reused": False},
            ),
            ("evaluate", "done", summary),
            ("report", "failed", {"error": "disk full"}),
        ]
        for name, status, detail in stage_rows:
            store.stage_started(name)
            store.stage_finished(name, status, detail)

    # Small and self-contained: 1 KiB pages (settable only outside WAL), no free pages, and left
    # in rollback-journal mode so that reading the file leaves no -wal or -shm beside it (Store
    # turns WAL on again when it opens a copy).
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA page_size=1024")
    db.execute("VACUUM")
    db.close()


def main() -> None:
    path = Path(sys.argv[1])
    if path.exists():
        sys.exit(f"{path} exists: remove it first")
    write_store(path)
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    print(f"{path}: schema {version}, written by {Path(tutelage.__file__).parent}")


if __name__ == "__main__":
    main()
