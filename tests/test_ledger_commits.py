"""The ledger's grouped commits: answers and cache hits that come together share one transaction,
every answer is on disk before its caller gets it, and a kill -9 in the middle of a burst of
answers and cache hits loses no answer that was handed out."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tutelage.store import Store
from tutelage.teachers import Completion, Ledger, Request
from tutelage.teachers.ledger import GroupCommits

SRC = str(Path(__file__).resolve().parents[1] / "src")


def ask(i: int) -> Request:
    return Request.make(messages=[{"role": "user", "content": f"task {i}"}], sampling={})


class BurstTeacher:
    """Answers every request after the same short wait, so the requests in flight answer
    together; counts what it was asked."""

    backend = "burst"
    model = "burst-1"

    def __init__(self, wait_s: float = 0.01):
        self.wait_s = wait_s
        self.calls = 0

    async def complete(self, requests):
        await asyncio.sleep(self.wait_s)
        self.calls += len(requests)
        return [Completion(f"answer to {r.messages[0][1]}", "stop", 3, 4) for r in requests]

    async def aclose(self):
        pass


def count_commits(store: Store) -> list[int]:
    """A live count of the COMMITs the store's connection runs."""
    seen = [0]

    def trace(statement: str) -> None:
        seen[0] += statement.strip().upper() == "COMMIT"

    store.db.set_trace_callback(trace)
    return seen


def stored(path: Path, key: str) -> tuple[str, str] | None:
    """(status, text) of a request row, read through a connection of its own (what another
    process, or this one after a crash, would see)."""
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT status, text FROM requests WHERE key=?", (key,)).fetchone()
    db.close()
    return row


def test_every_answer_is_committed_before_its_caller_gets_it(store):
    ledger = Ledger(BurstTeacher(), store, concurrency=16)

    async def use(i: int) -> None:
        result = await ledger.complete(ask(i))
        # The moment the caller has the answer, another connection sees it stored.
        assert stored(store.path, result.key) == ("done", f"answer to task {i}")

    async def main() -> None:
        await asyncio.gather(*(use(i) for i in range(48)))

    asyncio.run(main())
    assert store.request_totals()["done"] == 48


def test_answers_and_hits_that_come_together_share_a_commit(store):
    commits = count_commits(store)
    teacher = BurstTeacher()
    ledger = Ledger(teacher, store, concurrency=64)
    results = asyncio.run(ledger.complete_many([ask(i) for i in range(64)]))
    assert [r.completion.text for r in results] == [f"answer to task {i}" for i in range(64)]
    assert store.request_totals()["done"] == 64
    # One commit recorded the 64 requests before they went, a few stored their answers: far
    # fewer than the 128 of a commit for each.
    answered_with = commits[0]
    assert 2 <= answered_with <= 8, answered_with

    commits[0] = 0
    again = Ledger(teacher, store, concurrency=64)
    hits = asyncio.run(again.complete_many([ask(i) for i in range(64)]))
    assert all(r.cached for r in hits) and teacher.calls == 64  # nothing asked twice
    assert store.request_totals()["cache_hits"] == 64  # every hit counted, and on disk
    assert commits[0] <= 2, commits[0]


def test_without_grouping_every_write_commits_on_its_own(store):
    commits = count_commits(store)
    ledger = Ledger(BurstTeacher(), store, concurrency=16, group_commits=False)
    asyncio.run(ledger.complete_many([ask(i) for i in range(16)]))
    asyncio.run(ledger.complete_many([ask(i) for i in range(16)]))
    assert commits[0] == 16 * 2 + 16  # begin and finish each, then one per hit


def test_a_failed_group_fails_every_caller_in_it(store, monkeypatch):
    """A write that cannot commit (the disk full, say) reaches each request of its group as an
    error: none returns an answer that is not stored."""
    ledger = Ledger(BurstTeacher(), store, concurrency=8)

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "finish_request", full)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        asyncio.run(ledger.complete_many([ask(i) for i in range(8)]))
    assert store.request_totals()["done"] == 0


def test_writes_an_ended_event_loop_left_queued_commit_with_the_next_write(store):
    commits = GroupCommits(store)
    loop = asyncio.new_event_loop()

    async def queue_and_leave():
        # The write is queued; the loop stops before its commit turn comes.
        asyncio.ensure_future(commits.write(lambda: store.set_meta("left", 1)))

    loop.run_until_complete(queue_and_leave())  # ends as the write is queued, not committed
    assert store.get_meta("left") is None
    loop.close()
    asyncio.run(commits.write(lambda: store.set_meta("next", 2)))
    assert (store.get_meta("left"), store.get_meta("next")) == (1, 2)


# -- workers: the next request goes before the last answer's bookkeeping --------------------------
class WatchingTeacher:
    """Notes, as each request arrives, what another connection sees in the store: the request's
    own row, and how many answers are stored. `hold` keeps the requests of those tasks waiting
    until released; a held request that is cancelled is noted too."""

    backend = "watch"
    model = "watch-1"

    def __init__(self, path: Path, wait_s: float = 0.01):
        self.path, self.wait_s = path, wait_s
        self.seen: list[tuple[str, tuple | None, int]] = []  # task, its row, answers stored
        self.hold: dict[str, asyncio.Event] = {}
        self.cancelled: list[str] = []

    async def complete(self, requests):
        [request] = requests
        task = request.messages[0][1]
        with sqlite3.connect(self.path) as db:
            own = db.execute(
                "SELECT status FROM requests WHERE body_json LIKE ?", (f"%{task}%",)
            ).fetchone()
            done = db.execute("SELECT COUNT(*) FROM requests WHERE status='done'").fetchone()[0]
        db.close()
        self.seen.append((task, own, done))
        try:
            if task in self.hold:
                await self.hold[task].wait()
            await asyncio.sleep(self.wait_s)
        except asyncio.CancelledError:
            self.cancelled.append(task)
            raise
        return [Completion(f"answer to {task}", "stop", 3, 4)]

    async def aclose(self):
        pass


def test_a_worker_sends_its_next_request_before_the_answer_it_got_is_stored(store):
    teacher = WatchingTeacher(store.path)
    ledger = Ledger(teacher, store, concurrency=1)
    results = asyncio.run(ledger.complete_many([ask(i) for i in range(4)]))
    assert [r.completion.text for r in results] == [f"answer to task {i}" for i in range(4)]
    # Each request was on disk before it went, and went before the answer just before it was
    # stored (which was stored before its caller had it: the tests above).
    assert [own for _, own, _ in teacher.seen] == [("pending",)] * 4
    assert [done for _, _, done in teacher.seen] == [0, 0, 1, 2]


def test_at_most_concurrency_requests_wait_recorded_and_the_budget_holds_them(store):
    teacher = WatchingTeacher(store.path)
    ledger = Ledger(teacher, store, concurrency=4)
    pending: list[int] = []

    async def watch() -> None:
        while True:
            with sqlite3.connect(store.path) as db:
                pending.append(
                    db.execute("SELECT COUNT(*) FROM requests WHERE status='pending'").fetchone()[0]
                )
            db.close()
            await asyncio.sleep(0.002)

    async def main() -> list:
        watching = asyncio.ensure_future(watch())
        results = await ledger.complete_many([ask(i) for i in range(40)])
        watching.cancel()
        return results

    assert len(asyncio.run(main())) == 40
    # 4 in flight and 4 recorded ahead, never the 40 (nor 2 * 4 callers' worth more)
    assert 4 < max(pending) <= 8
    assert ledger.account.reserved_usd == 0  # every reservation released


def test_a_cancelled_caller_stops_its_request_in_flight_and_the_others_go_on(store):
    teacher = WatchingTeacher(store.path)
    teacher.hold["task 0"] = asyncio.Event()  # never set: only cancelling ends it
    ledger = Ledger(teacher, store, concurrency=2)

    async def main() -> list:
        first = asyncio.ensure_future(ledger.complete(ask(0)))
        others = [asyncio.ensure_future(ledger.complete(ask(i))) for i in range(1, 6)]
        while not teacher.seen:
            await asyncio.sleep(0.001)
        first.cancel()
        return await asyncio.gather(*others)

    results = asyncio.run(main())
    assert [r.completion.text for r in results] == [f"answer to task {i}" for i in range(1, 6)]
    assert teacher.cancelled == ["task 0"]
    # sent and not answered: its row stays pending, to be asked again by the next run
    totals = store.request_totals()
    assert (totals["requests"], totals["done"]) == (6, 5)
    assert ledger.account.reserved_usd == 0 and not ledger._workers


# -- kill -9 in the middle of bursts --------------------------------------------------------------
USER = textwrap.dedent("""
    import asyncio, random, sys
    sys.path.insert(0, sys.argv[2])
    from tutelage.store import Store
    from tutelage.teachers import Completion, Ledger, Request

    class BurstTeacher:
        backend, model = "burst", "burst-1"

        async def complete(self, requests):
            await asyncio.sleep(0.005)
            return [Completion(f"answer to {r.messages[0][1]}", "stop", 3, 4) for r in requests]

    async def main(store):
        # Every run asks from the start: what earlier runs stored comes back as cache hits,
        # mixed with new requests; 32 in flight answer in bursts.
        ledger = Ledger(BurstTeacher(), store, concurrency=32)

        async def use(i):
            await asyncio.sleep(random.random() * 0.05)
            request = Request.make(messages=[{"role": "user", "content": f"task {i}"}])
            result = await ledger.complete(request)
            print(result.key, int(result.cached), result.completion.text, sep="\\t", flush=True)

        await asyncio.gather(*(use(i) for i in range(5000)))

    asyncio.run(main(Store(sys.argv[1])))
""")


def test_kill_9_during_bursts_of_answers_and_hits_loses_nothing_used(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(USER)
    rng = random.Random(0)
    used: dict[str, str] = {}
    hits_used = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "run"), SRC],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Kill it after it has used some hundreds of answers, wherever it is then.
        for _ in range(rng.randint(200, 1000)):
            key, cached, text = proc.stdout.readline().rstrip("\n").split("\t")
            assert used.setdefault(key, text) == text
            hits_used += int(cached)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert hits_used > 0  # the later runs replayed stored answers in their bursts
    with Store(tmp_path / "run") as store:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {
            r["key"]: r for r in store._all("SELECT key, status, text, cache_hits FROM requests")
        }
        for key, text in used.items():  # every answer handed out is stored, as it was
            assert rows[key]["status"] == "done" and rows[key]["text"] == text
        # every cache hit handed out was counted first (more may be: counted, then killed)
        assert sum(r["cache_hits"] for r in rows.values()) >= hits_used


def test_a_request_the_budget_held_back_still_goes_when_the_only_worker_is_cancelled(store):
    # Room for one request's worst case at a time: the second waits unrecorded. Its worker must
    # not be the one cancelled with the first request's caller.
    from tutelage.config import Price
    from tutelage.teachers.prices import worst_case_cost

    price = Price(input=0.0, output=1_000.0)
    teacher = WatchingTeacher(store.path)
    teacher.hold["task 0"] = asyncio.Event()  # never set: only cancelling ends it
    budget = 1.5 * worst_case_cost(ask(0), price)
    ledger = Ledger(teacher, store, concurrency=1, price=price, budget_usd=budget)

    async def main():
        first = asyncio.ensure_future(ledger.complete(ask(0)))
        second = asyncio.ensure_future(ledger.complete(ask(1)))
        while not teacher.seen:
            await asyncio.sleep(0.001)
        first.cancel()
        return await asyncio.wait_for(second, 10)

    assert asyncio.run(main()).completion.text == "answer to task 1"
    assert teacher.cancelled == ["task 0"] and ledger.account.reserved_usd == 0
