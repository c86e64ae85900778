"""The OpenAI Batch API teacher: submit, poll, collect through the ledger; failures inside a batch;
and a run restarted while a batch is pending (cancelled, or killed with -9) waits on that batch
instead of paying for a second one."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from fault_server import FaultServer

from tutelage.config import Price, TeacherConfig
from tutelage.store import Store
from tutelage.teachers import Ledger, Request, TeacherError, make_teacher, price_for
from tutelage.teachers.openai_batch import OpenAIBatchTeacher, fingerprint

SECRET = "sk-test-batch-DO-NOT-LEAK-77"
KEY_ENV = "TUTELAGE_TEST_KEY"


@pytest.fixture(autouse=True)
def fake_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def batch_teacher(server: FaultServer, **kw) -> OpenAIBatchTeacher:
    kw = {"api_key_env": KEY_ENV, "timeout_s": 5.0, "backoff_s": 0.01, "poll_s": 0.01, **kw}
    return OpenAIBatchTeacher("gpt-4o-mini", base_url=server.url, **kw)


def chat(text: str) -> Request:
    return Request.make(
        messages=[{"role": "user", "content": text}],
        sampling={"max_tokens": 10, "temperature": 0.0},
    )


def ask(ledger: Ledger, *requests: Request):
    return asyncio.run(ledger.complete_many(requests))


def calls(server: FaultServer, method: str, path: str) -> int:
    return sum(
        r["method"] == method and r["path"].split("?")[0].endswith(path) for r in server.requests
    )


def rows(store: Store) -> list[dict]:
    return store._all("SELECT * FROM requests ORDER BY created_at")


def test_a_batch_is_submitted_polled_collected_and_stored(server, store):
    server.batch_polls = 2
    requests = [chat(f"task {i}") for i in range(5)] + [Request.make(prompt="go on: 1.")]
    updates = []
    ledger = Ledger(batch_teacher(server), store, price=Price(input=1e6, output=1e6))
    ledger.on_remote_update = lambda b: updates.append(b["status"])
    results = ask(ledger, *requests)

    assert [r.completion.text for r in results] == [f"echo: task {i}" for i in range(5)] + [
        "echo: go on: 1."
    ]
    # Chat and completion requests go to two batches (one endpoint each), one upload apiece.
    assert calls(server, "POST", "/files") == 2 and calls(server, "POST", "/batches") == 2
    assert {b["endpoint"] for b in server.batches.values()} == {
        "/v1/chat/completions",
        "/v1/completions",
    }
    assert "in_progress" in updates and updates[-1] == "completed"
    stored = rows(store)
    assert all(r["status"] == "done" and r["remote_batch"] in server.batches for r in stored)
    assert sum(r["cost_usd"] for r in stored) == pytest.approx(
        sum(r.completion.tokens_in + r.completion.tokens_out for r in results)
    )
    assert [b["status"] for b in store.remote_batches()] == ["completed", "completed"]
    # The key went in the Authorization header only: not in the uploaded file or the store.
    assert all(SECRET.encode() not in f for f in server.files.values())
    assert SECRET.encode() not in store.path.read_bytes()

    hits = server.hits
    again = ask(Ledger(batch_teacher(server), store), *requests)
    assert server.hits == hits and all(r.cached for r in again)


def test_a_run_stopped_while_its_batch_is_pending_waits_on_it_after_a_restart(server, tmp_path):
    server.batch_polls = 10**6  # the batch never ends while the first run waits
    requests = [chat(f"task {i}") for i in range(4)]

    def recorded() -> int:  # requests the store already ties to a remote batch (own connection)
        with sqlite3.connect(tmp_path / "run" / "tutelage.db") as con:
            sql = "SELECT COUNT(*) FROM requests WHERE remote_batch IS NOT NULL"
            return con.execute(sql).fetchone()[0]

    async def first_run():
        with Store(tmp_path / "run") as store:
            ledger = Ledger(batch_teacher(server), store)
            waiting = asyncio.ensure_future(ledger.complete_many(requests))
            deadline = time.monotonic() + 60  # stopped once the batch is recorded, however slow
            while recorded() < len(requests) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

    asyncio.run(first_run())
    with Store(tmp_path / "run") as store:
        [batch_id] = server.batches
        assert [r["status"] for r in rows(store)] == ["pending"] * 4
        assert {r["remote_batch"] for r in rows(store)} == {batch_id}
        server.batch_polls = 0
        results = ask(Ledger(batch_teacher(server), store), *requests)
    assert [r.completion.text for r in results] == [f"echo: task {i}" for i in range(4)]
    assert calls(server, "POST", "/batches") == 1 and calls(server, "POST", "/files") == 1


def test_a_batch_created_but_not_recorded_is_found_not_resubmitted(server, store):
    teacher = batch_teacher(server)
    requests = [chat(f"task {i}") for i in range(3)]
    keys = [Ledger(teacher, store).key(r) for r in requests]
    # The run died right after creating the batch, before the store learnt its id.
    created = asyncio.run(teacher.submit(requests, keys))
    assert created["metadata"] == {"tutelage_requests": fingerprint(keys)}

    results = ask(Ledger(batch_teacher(server), store), *requests)
    assert [r.completion.text for r in results] == [f"echo: task {i}" for i in range(3)]
    assert list(server.batches) == [created["id"]] and calls(server, "POST", "/files") == 1


def test_a_failed_line_fails_its_request_only_and_a_rerun_resubmits_just_that_one(server, store):
    requests = [chat("task 0"), chat("task FAIL"), chat("task 2")]
    with pytest.raises(TeacherError, match=r"batch batch-\d+: HTTP 400: bad request line"):
        ask(Ledger(batch_teacher(server), store), *requests)
    assert [r["status"] for r in rows(store)] == ["done", "failed", "done"]

    with pytest.raises(TeacherError):
        ask(Ledger(batch_teacher(server), store), *requests)
    [_, second] = server.batches.values()
    assert b"task FAIL" in server.files[second["input_file_id"]]
    assert server.files[second["input_file_id"]].count(b"custom_id") == 1


def attempts(server: FaultServer) -> list[str | None]:
    """Each batch's attempt tag, oldest first (None: the first try)."""
    return [(b["metadata"] or {}).get("tutelage_attempt") for b in server.batches.values()]


def test_a_failing_line_goes_again_on_each_rerun_until_max_retries_then_stays_failed(
    server, tmp_path
):
    requests = [chat("task 0"), chat("task FAIL"), chat("task 2")]

    def rerun():
        with Store(tmp_path / "run") as store:
            with pytest.raises(TeacherError) as err:
                ask(Ledger(batch_teacher(server, max_retries=3), store), *requests)
            return str(err.value), {r["key"]: r for r in rows(store)}

    rerun()  # the first run: two answers, one failure
    for attempt in (1, 2, 3):  # three reruns in a row: the failed line, alone, tries again
        error, stored = rerun()
        assert len(server.batches) == 1 + attempt
        last = list(server.batches.values())[-1]
        assert server.files[last["input_file_id"]].count(b"custom_id") == 1
        assert "HTTP 400: bad request line" in error
    assert attempts(server) == [None, None, "2", "3"]
    failed = [r for r in stored.values() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 3

    # Failed in max_retries batches: its errors stand, and nothing more is paid for.
    error, stored = rerun()
    assert len(server.batches) == 4 and calls(server, "POST", "/files") == 4
    assert "failed in 3 batches, teacher.max_retries: not sent again" in error
    assert [r["status"] for r in stored.values()].count("done") == 2


def test_a_line_that_fails_twice_is_answered_on_the_second_rerun(server, store):
    server.flaky_failures = 2
    requests = [chat("task 0"), chat("task FLAKY")]
    for _ in range(2):
        with pytest.raises(TeacherError, match="bad request line"):
            ask(Ledger(batch_teacher(server), store), *requests)
    results = ask(Ledger(batch_teacher(server), store), *requests)
    assert [r.completion.text for r in results] == ["echo: task 0", "echo: task FLAKY"]
    assert [r.cached for r in results] == [True, False]
    assert attempts(server) == [None, None, "2"]


def test_a_batch_that_ended_before_it_was_collected_is_collected_not_resubmitted(server, store):
    """The run died after creating the batch; it ended, one line failed, while nobody waited."""
    teacher = batch_teacher(server)
    requests = [chat("task 0"), chat("task FAIL")]
    keys = [Ledger(teacher, store).key(r) for r in requests]
    created = asyncio.run(teacher.submit(requests, keys))
    asyncio.run(teacher.wait(created["id"]))  # completed, one answer and one failure

    with pytest.raises(TeacherError, match="bad request line"):
        ask(Ledger(batch_teacher(server), store), *requests)
    assert list(server.batches) == [created["id"]]
    assert [r["status"] for r in rows(store)] == ["done", "failed"]


def test_finalizing_is_waited_through(server, store):
    server.finalizing_polls = 2
    ledger = Ledger(batch_teacher(server), store)
    updates = []
    ledger.on_remote_update = lambda b: updates.append(b["status"])
    [result] = ask(ledger, chat("a"))
    assert result.completion.text == "echo: a"
    assert updates[-2:] == ["finalizing", "completed"]


def test_a_cancelled_batch_keeps_what_it_answered_and_the_rest_goes_again(server, store):
    server.batch_end = "cancelled"
    requests = [chat(f"task {i}") for i in range(4)]
    ledger = Ledger(batch_teacher(server), store)
    updates = []
    ledger.on_remote_update = lambda b: updates.append(b["status"])
    with pytest.raises(TeacherError, match="before the batch was cancelled"):
        ask(ledger, *requests)
    assert updates[-2:] == ["cancelling", "cancelled"]
    assert [r["status"] for r in rows(store)] == ["done", "done", "failed", "failed"]

    server.batch_end = "completed"
    results = ask(Ledger(batch_teacher(server), store), *requests)
    assert [r.cached for r in results] == [True, True, False, False]
    assert len(server.batches) == 2


def test_the_batch_list_is_paged_to_find_an_unrecorded_batch(server, store):
    teacher = batch_teacher(server)
    requests = [chat(f"task {i}") for i in range(2)]
    keys = [Ledger(teacher, store).key(r) for r in requests]
    created = asyncio.run(teacher.submit(requests, keys))  # the run died before recording it
    for i in range(250):  # then the account made 250 more batches
        server.add_batch("/v1/chat/completions", "file-x", metadata={"other": str(i)})

    results = ask(Ledger(batch_teacher(server), store), *requests)
    assert [r.completion.text for r in results] == ["echo: task 0", "echo: task 1"]
    assert calls(server, "POST", "/batches") == 1  # found on the third page, not sent again
    pages = [r["path"] for r in server.requests if r["path"].startswith("/v1/batches?")]
    assert len(pages) == 4  # 1 when it was made (the account was empty), 3 to find it again
    assert "after=batch-" in pages[-1]
    assert [r["remote_batch"] for r in rows(store)] == [created["id"]] * 2


def test_a_batch_answer_without_usage_is_counted_from_the_request_it_answers(server, store):
    server.send_usage = False
    [result] = ask(Ledger(batch_teacher(server), store), chat("twelve chars"))
    c = result.completion
    assert c.usage_estimated and c.raw["usage_estimated"] and c.raw["batch"]
    assert c.tokens_in > 0 and c.tokens_out > 0


def test_an_expired_batch_keeps_what_it_answered_and_the_rest_goes_again(server, store):
    server.batch_end = "expired"
    requests = [chat(f"task {i}") for i in range(4)]
    with pytest.raises(TeacherError, match="completion window expired"):
        ask(Ledger(batch_teacher(server), store), *requests)
    assert [r["status"] for r in rows(store)] == ["done", "done", "failed", "failed"]

    server.batch_end = "completed"
    results = ask(Ledger(batch_teacher(server), store), *requests)
    assert [r.cached for r in results] == [True, True, False, False]
    assert [r.completion.text for r in results] == [f"echo: task {i}" for i in range(4)]


def test_a_batch_rejected_at_validation_fails_every_request_clearly(server, store):
    server.batch_end = "failed"
    with pytest.raises(TeacherError, match="ended failed without answering.*not valid"):
        ask(Ledger(batch_teacher(server), store), chat("a"), chat("b"))
    assert [r["status"] for r in rows(store)] == ["failed", "failed"]


def test_batch_endpoints_retry_and_a_lost_answer_to_create_makes_no_second_batch(server, store):
    # The listing fails, the upload drops, the batch is created but its answer is lost.
    server.faults += ["500", "ok", "drop", "ok", "lost"]
    [result] = ask(Ledger(batch_teacher(server), store), chat("a"))
    assert result.completion.text == "echo: a"
    assert calls(server, "POST", "/batches") == 1 and len(server.batches) == 1
    assert [r["remote_batch"] for r in rows(store)] == list(server.batches)

    server.faults.append("401")
    with pytest.raises(TeacherError, match="HTTP 401.*check the API key") as err:
        ask(Ledger(batch_teacher(server), store), chat("b"))
    assert SECRET not in str(err.value)


def test_the_protocol_call_without_a_ledger(server):
    teacher = batch_teacher(server)
    answers = asyncio.run(teacher.complete([chat("x"), Request.make(prompt="y")]))
    assert [a.text for a in answers] == ["echo: x", "echo: y"]


def test_config_and_prices_for_batch_mode(server):
    teacher = make_teacher(
        TeacherConfig(
            backend="openai",
            model="gpt-4o-mini",
            base_url=server.url,
            api_key_env=KEY_ENV,
            batch=True,
            batch_size=7,
        )
    )
    assert isinstance(teacher, OpenAIBatchTeacher) and teacher.max_batch == 7
    listed = price_for("openai", "gpt-4o-mini", None, batch=True)
    assert (listed.input, listed.output) == (0.075, 0.30)
    configured = price_for("openai", "gpt-4o-mini", Price(input=1, output=2), batch=True)
    assert (configured.input, configured.output) == (1, 2)  # as charged, not halved again
    with pytest.raises(ValueError, match="teacher.batch"):
        TeacherConfig(backend="llamacpp", batch=True)


def test_generation_in_batch_mode_asks_in_waves_and_a_kill_9_resumes_the_pending_wave(
    server, tmp_path
):
    """`tutelage generate` on a Batch API teacher, killed -9 while its first wave is pending."""
    config = {
        "teacher": {
            "backend": "openai",
            "model": "gpt-4o-mini",
            "base_url": server.url,
            "api_key_env": KEY_ENV,
            "chat": True,
            "batch": True,
            "batch_size": 3,
            "batch_poll_s": 0.05,
        },
        "generation": {"target": 1000, "max_requests": 6, "stall_requests": 100},
    }
    (tmp_path / "tutelage.yaml").write_text(yaml.safe_dump(config))
    server.batch_polls = 10**6
    command = [
        sys.executable,
        "-m",
        "tutelage.cli",
        "generate",
        "-c",
        "tutelage.yaml",
        "--run-dir",
        "run",
    ]
    env = {**os.environ, KEY_ENV: SECRET}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not any(b["polls"] >= 2 for b in server.batches.values()):
        assert time.monotonic() < deadline and proc.poll() is None, "no batch was submitted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    server.batch_polls = 1
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "max_requests=6" in done.stdout + done.stderr
    # Two waves of three requests: the pending wave was collected, not sent again.
    assert calls(server, "POST", "/batches") == 2
    assert [b["request_counts"]["total"] for b in server.batches.values()] == [3, 3]
    with Store(tmp_path / "run") as store:
        assert store.request_totals()["done"] == 6 and store.batch_stats()["batches"] == 6
    assert SECRET.encode() not in (tmp_path / "run" / "tutelage.db").read_bytes()
