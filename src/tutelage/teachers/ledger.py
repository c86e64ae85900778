"""The request ledger: every teacher request goes through here.

A request is recorded in the store before it is sent and its answer when it comes, and a request
whose answer is stored is answered from the store, so a killed or repeated run never pays twice.
The ledger also keeps the budget (no request starts that could pass it), live totals, and gathers
concurrent requests into batches for local backends that generate several sequences at once.

Its writes are committed in groups (`GroupCommits`): the requests that start, finish or are
answered from the store at about the same moment share one SQLite transaction instead of one each.
A group commits before any of its requests is sent or its answer handed back, so an answer is on
disk (in the WAL: a killed process loses nothing committed) before the caller can act on it.

Requests go out through `concurrency` workers. A worker that has an answer sends its next request
at once and leaves the answer to be stored after: at high concurrency answers come in bursts, and
a request that waited for the bookkeeping of the whole burst would go out that much later. So the
next requests must be on disk before then: up to `concurrency` waiting requests are recorded ahead
(their records commit with the group of the moment), and their worst case is held against the
budget from then on.
Several ledgers of one run (the teacher's, the responder's, a judge's) share one `Account`: one
budget caps what they spend together.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from ..config import Price
from ..store import Store
from .base import Completion, Request, Teacher, request_key
from .prices import cost_usd, worst_case_cost

if TYPE_CHECKING:
    from .scoring import Scored, ScoreRequest


@dataclass
class LedgerResult:
    key: str
    completion: Completion
    cached: bool  # answered from the store, not asked again
    cost_usd: float


@dataclass(eq=False)
class _Waiting:
    """A request queued for the ledger's workers."""

    key: str
    body: str
    request: Request
    purpose: str
    remote: str | None  # the remote batch that carries it, if one does
    answer: asyncio.Future  # its caller's LedgerResult; cancelled if the caller was
    worst: float = 0.0  # its worst-case cost, held against the budget once recorded
    recorded: asyncio.Future | None = None  # its record's commit, once queued
    worker: asyncio.Task | None = None  # the worker asking the teacher, while it does


def _settle(
    answer: asyncio.Future,
    committed: asyncio.Future,
    result: LedgerResult | None = None,
    error: BaseException | None = None,
) -> None:
    """Give `answer` its result, or `error`, once `committed` is done: the record first. A
    failed commit is the answer's error."""

    def give(_: asyncio.Future) -> None:
        if answer.done():
            return
        if committed.cancelled():
            answer.cancel()
        elif (failed := committed.exception()) is not None:
            answer.set_exception(failed)
        elif error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    committed.add_done_callback(give)


class BudgetExceeded(RuntimeError):
    """The next request could pass the budget, so it was not sent."""


class Account:
    """The run's spending and its budget, shared by every ledger that pays from it.

    Totals (`spent_usd`, `tokens_in`, `tokens_out`) start from what the store holds, every
    backend's requests together, so they are the run's totals; each ledger adds what it sends.
    """

    def __init__(self, store: Store, budget_usd: float | None = None):
        totals = store.request_totals()
        self.budget_usd = budget_usd
        self.spent_usd: float = totals["cost_usd"]
        self.tokens_in: int = totals["tokens_in"]
        self.tokens_out: int = totals["tokens_out"]
        # Of spent_usd, what answers without the server's token counts cost (counted here).
        self.estimated_usd: float = totals.get("estimated_usd", 0.0)
        self.reserved_usd = 0.0  # the worst-case cost of the requests in flight, of every ledger

    def reserve(self, worst_usd: float) -> None:
        """Hold `worst_usd` for a request about to be sent, or raise BudgetExceeded."""
        committed = self.spent_usd + self.reserved_usd  # spent, plus the worst case in flight
        if self.budget_usd is not None and committed + worst_usd > self.budget_usd:
            raise BudgetExceeded(
                f"budget: ${committed:.4f} of the ${self.budget_usd:g} cap spent or in flight, and "
                f"the next request could cost up to ${worst_usd:.4f}; raise generation.budget_usd "
                "and rerun to go on (stored answers are free)"
            )
        self.reserved_usd += worst_usd

    def release(self, worst_usd: float) -> None:
        self.reserved_usd -= worst_usd

    def charge(self, cost_usd: float, tokens_in: int, tokens_out: int, estimated: bool) -> None:
        self.spent_usd += cost_usd
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        if estimated:
            self.estimated_usd += cost_usd


class GroupCommits:
    """The ledger's writes, committed in groups. `write(op)` queues a store call and returns once
    a transaction holding it has committed; every write queued meanwhile commits in the same one.

    A group commits as soon as it stops growing: once a turn of the event loop has added nothing
    to it (answers that arrive together join it, a lone one waits a single turn), or once it has
    waited `max_wait_s` or holds `max_rows`. `grouped=False` commits each write on its own, as
    before (kept to measure the difference)."""

    def __init__(
        self,
        store: Store,
        *,
        grouped: bool = True,
        max_wait_s: float = 0.002,
        max_rows: int = 512,
    ):
        self.store = store
        self.grouped = grouped
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.commits = 0  # transactions committed, for tests and benchmarks
        self._queue: list[tuple[Callable[[], None], asyncio.Future]] = []
        self._check: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the queued writes
        self._opened = 0.0  # the loop time of the group's first write
        self._seen = 0  # the group's size at the last check

    async def write(self, op: Callable[[], None]) -> None:
        """Run `op` (a store write) in a transaction, and return once that has committed."""
        # A caller cancelled meanwhile cancels only its wait: the write stays queued and commits.
        await self.queue(op)

    def queue(self, op: Callable[[], None]) -> asyncio.Future:
        """Queue `op` (a store write); the future is done once a transaction holding it has
        committed (its exception if that failed)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.grouped:
            try:
                op()
            except Exception as e:  # noqa: BLE001 - the waiter's to raise
                future.set_exception(e)
            else:
                future.set_result(None)
                self.commits += 1
            return future
        if loop is not self._loop:
            # Writes an earlier event loop left queued (it ended first, cancelled): nobody waits
            # for them any more, but what they record happened. Committed here, before the new.
            if self._check is not None:
                self._check.cancel()
                self._check = None
            if self._queue:
                self._commit([op for op, _ in self._queue])
                self._queue = []
            self._loop = loop
        self._queue.append((op, future))
        if self._check is None:
            self._opened, self._seen = loop.time(), len(self._queue)
            self._check = loop.call_soon(self._commit_when_whole)
        return future

    def _commit_when_whole(self) -> None:
        loop = asyncio.get_running_loop()
        size = len(self._queue)
        still_growing = size > self._seen and size < self.max_rows
        if still_growing and loop.time() - self._opened < self.max_wait_s:
            self._seen = size
            self._check = loop.call_soon(self._commit_when_whole)
            return
        self._check = None
        group, self._queue = self._queue, []
        try:
            self._commit([op for op, _ in group])
        except BaseException as e:  # every write of the group failed with it: each caller learns
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for _, future in group:
            if not future.done():
                future.set_result(None)

    def _commit(self, ops: list[Callable[[], None]]) -> None:
        with self.store.transaction():
            for op in ops:
                op()
        self.commits += 1


class Ledger:
    """Sends requests to `teacher` through `store`. One Ledger lives inside one event loop.

    Totals (`spent_usd`, `tokens_in`, `tokens_out`) are its account's: the run's, what the store
    held at the start included. `requests_sent` and `cache_hits` count this ledger's calls only
    (the store counts every hit of the run: `store.request_totals()["cache_hits"]`).

    `account`: the one shared with the run's other ledgers (its budget caps them together);
    None opens one of its own, capped at `budget_usd`. `group_commits=False` commits every write
    on its own (the old way, kept to measure against).
    """

    def __init__(
        self,
        teacher: Teacher,
        store: Store,
        *,
        price: Price | None = None,
        budget_usd: float | None = None,
        account: Account | None = None,
        concurrency: int = 8,
        batch_window_s: float = 0.005,
        group_commits: bool = True,
    ):
        if account is not None and budget_usd is not None:
            raise ValueError("a shared account carries the budget: pass budget_usd to it")
        self.teacher = teacher
        self.store = store
        self.price = price or Price()
        self.account = account or Account(store, budget_usd)
        self.commits = GroupCommits(store, grouped=group_commits)
        self.max_batch = getattr(teacher, "max_batch", 1)
        self.batch_window_s = batch_window_s
        self.requests_sent = 0
        self.cache_hits = 0
        self.concurrency = concurrency
        # Requests to send wait in order: unrecorded, then recorded (at most `concurrency`).
        self._unrecorded: deque[_Waiting] = deque()
        self._ready: deque[_Waiting] = deque()
        self._workers: set[asyncio.Task] = set()
        # One lock per key: the same request asked twice at once is sent once, then read back.
        # A key's lock lives while someone holds or waits for it (a run of a million requests
        # would otherwise keep a million locks): key -> [lock, holders and waiters].
        self._key_locks: dict[str, list] = {}
        self._queue: list[tuple[Request, asyncio.Future]] = []
        self._batcher: asyncio.Task | None = None
        # Batch API teachers: requests wait in remote batches the ledger submits and polls.
        self.remote = getattr(teacher, "remote", False)
        self.on_remote_update: Callable[[dict], None] | None = None
        self._remote_queue: list[tuple[str, Request, str | None, asyncio.Future]] = []
        self._remote_tasks: set[asyncio.Task] = set()
        if self.remote:  # a remote batch holds many requests: enough workers not to split it
            self.concurrency = max(concurrency, 4 * self.max_batch)
            self.batch_window_s = max(batch_window_s, 0.05)

    @property
    def budget_usd(self) -> float | None:
        return self.account.budget_usd

    @property
    def spent_usd(self) -> float:
        return self.account.spent_usd

    @property
    def estimated_usd(self) -> float:
        return self.account.estimated_usd

    @property
    def tokens_in(self) -> int:
        return self.account.tokens_in

    @property
    def tokens_out(self) -> int:
        return self.account.tokens_out

    def key(self, request: Request) -> str:
        return request.key(self.teacher.backend, self.teacher.model)

    async def complete(self, request: Request, purpose: str = "generate") -> LedgerResult:
        """The stored answer to `request` if there is one, else the teacher's (recorded first)."""
        # The canonical JSON, made once: hashed for the key, and stored as the request's body.
        body = request.canonical_json(self.teacher.backend, self.teacher.model)
        key = request_key(body)
        entry = self._key_locks.get(key)
        if entry is None:
            entry = self._key_locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                return await self._complete_locked(key, body, request, purpose)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._key_locks[key]

    async def _complete_locked(
        self, key: str, body: str, request: Request, purpose: str
    ) -> LedgerResult:
        row = self.store.get_request(key)
        if row is not None and row["status"] == "done":
            self.cache_hits += 1
            # The run's count, across restarts: committed with the group of this moment.
            await self.commits.write(functools.partial(self.store.count_cache_hit, key))
            return LedgerResult(key, completion_from_row(row), True, row["cost_usd"])
        # A request a remote batch carries is waited for, not sent again.
        remote = row["remote_batch"] if row and row["status"] == "pending" else None
        return await self._send(key, body, request, purpose, remote)

    async def complete_many(
        self, requests: Sequence[Request], purpose: str = "generate"
    ) -> list[LedgerResult]:
        """Answers in request order, at most `concurrency` in flight. On a failure, every request
        still goes (what is sent is paid for and stored), then the first error raises.

        Twice `concurrency` callers take the requests in turn, so a long list is keyed and looked
        up in the store as it is worked through, not all before the first request goes."""
        results: list = [None] * len(requests)
        todo = iter(enumerate(requests))

        async def caller() -> None:
            for i, request in todo:
                try:
                    results[i] = await self.complete(request, purpose)
                except Exception as e:  # noqa: BLE001 - raised below, in request order
                    results[i] = e

        await asyncio.gather(*(caller() for _ in range(min(2 * self.concurrency, len(requests)))))
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def projection(self, done_fraction: float) -> float:
        """The run's total cost if the rest costs what the part done so far did."""
        return self.spent_usd / done_fraction if done_fraction > 0 else float("inf")

    # -- given answers scored (teacher forcing: the capture stage) -------------------------------
    async def score_many(
        self,
        requests: Sequence[ScoreRequest],
        save: Callable[[int, str, Scored], None],
        purpose: str = "capture",
    ) -> list[Scored]:
        """Score `requests` in one call to the teacher (`teachers.scoring`), recorded as every
        request is: in the ledger before it is sent, its worst case held against the budget, its
        tokens and cost stored once answered. The answer (arrays) is the caller's to keep:
        `save(i, key, scored)` stores request i's before its ledger row is marked done, so a
        capture killed in between has it and does not ask again. Nothing is answered from the
        ledger here: the caller skips what it has saved."""
        backend, model = self.teacher.backend, self.teacher.model
        bodies = [r.canonical_json(backend, model) for r in requests]
        keys = [request_key(body) for body in bodies]
        worst = sum(cost_usd(self.price, r.estimated_tokens(), 0) for r in requests)
        self.account.reserve(worst)
        try:
            for key, body in zip(keys, bodies, strict=True):
                self.store.begin_request(key, backend, model, body, purpose)
            self.requests_sent += len(requests)
            start = time.perf_counter()
            try:
                scored = await self.teacher.score(list(requests))
            except Exception as e:
                for key in keys:
                    error = str(e) or type(e).__name__
                    self.store.fail_request(key, error, getattr(e, "attempts", 1))
                raise
            latency_s = (time.perf_counter() - start) / max(len(requests), 1)
            for i, (key, answer) in enumerate(zip(keys, scored, strict=True)):
                save(i, key, answer)
                cost = cost_usd(self.price, answer.tokens_in, 0)
                self.store.finish_request(
                    key,
                    text="",
                    finish_reason="scored",
                    tokens_in=answer.tokens_in,
                    tokens_out=0,
                    cost_usd=cost,
                    latency_s=latency_s,
                    attempts=1,
                    response={"answer_tokens": len(answer.answer_ids)},
                )
                self.account.charge(cost, answer.tokens_in, 0, False)
        finally:
            self.account.release(worst)
        return scored

    async def _send(
        self, key: str, body: str, request: Request, purpose: str, remote: str | None = None
    ) -> LedgerResult:
        """Queue the request for the ledger's workers; its answer comes once stored."""
        answer = asyncio.get_running_loop().create_future()
        item = _Waiting(key, body, request, purpose, remote, answer)
        self._unrecorded.append(item)
        self._record_ahead()
        self._start_workers(len(self._ready) + len(self._unrecorded))
        try:
            return await answer
        except asyncio.CancelledError:  # the wait cancelled `answer` too
            if item.worker is not None:  # in flight: nobody waits for its answer any more
                item.worker.cancel()
            raise

    def _start_workers(self, wanted: int) -> None:
        for _ in range(min(self.concurrency - len(self._workers), wanted)):
            worker = asyncio.create_task(self._work())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    def _record(self, item: _Waiting, refuse: bool) -> bool:
        """Hold the request's worst case against the budget and queue its record (it commits with
        the group of the moment). False if it could pass the budget: then, if `refuse`, its caller
        gets BudgetExceeded, and it leaves no row."""
        worst = worst_case_cost(item.request, self.price)
        try:
            self.account.reserve(worst)
        except BudgetExceeded as e:
            if refuse:
                item.answer.set_exception(e)
            return False
        item.worst = worst
        # Only the canonical request (`body`) is stored: never headers, keys or settings.
        begin = functools.partial(
            self.store.begin_request,
            item.key,
            self.teacher.backend,
            self.teacher.model,
            item.body,
            item.purpose,
        )
        item.recorded = self.commits.queue(begin)
        return True

    def _record_ahead(self) -> None:
        """Record waiting requests while fewer than `concurrency` recorded ones wait for a worker,
        so that a worker that has handled an answer sends the next request at once. Ahead of its
        turn, a request is only recorded while the budget has room for it; else a worker decides
        on it when it is next."""
        while self._unrecorded and len(self._ready) < self.concurrency:
            item = self._unrecorded[0]
            if not item.answer.done() and not self._record(item, refuse=False):
                return
            self._unrecorded.popleft()
            if not item.answer.done():  # else its caller has gone
                self._ready.append(item)

    async def _work(self) -> None:
        """A worker: send the next recorded request and wait for its answer, hand that to be
        stored, repeat. Its caller has the answer once its record has committed; the worker does
        not wait for that, and sends its next request first."""
        while self._ready or self._unrecorded:
            if self._ready:
                item = self._ready.popleft()
                self._record_ahead()
            else:  # none recorded ahead (the budget had no room): this one now, or refused
                item = self._unrecorded.popleft()
                if item.answer.done() or not self._record(item, refuse=True):
                    continue
            if not item.answer.done():
                try:
                    await item.recorded  # committed already, unless it was just recorded
                except Exception as e:  # noqa: BLE001 - the record failed: not sent
                    item.answer.set_exception(e)
            if item.answer.done():  # its caller has gone, or its record failed: not sent
                self.account.release(item.worst)
                if item.recorded.done() and not item.recorded.cancelled():
                    item.recorded.exception()  # seen: a failed record it never needed is no news
                continue
            self.requests_sent += 1
            start = time.perf_counter()
            item.worker = asyncio.current_task()
            try:
                if self.remote:
                    completion = await self._ask_remote(item.key, item.request, item.remote)
                else:
                    completion = await self._ask(item.request)
                attempts = attempts_of(completion)
            except asyncio.CancelledError:
                self.account.release(item.worst)
                # Its caller was cancelled, and took this worker with it: a new one goes on.
                if item.answer.cancelled():
                    self._workers.discard(asyncio.current_task())  # type: ignore[arg-type]
                    waiting = chain(self._ready, self._unrecorded)
                    self._start_workers(sum(not w.answer.done() for w in waiting))
                raise
            except Exception as e:  # noqa: BLE001 - stored, then raised in the caller
                self.account.release(item.worst)
                error, attempts = str(e) or type(e).__name__, getattr(e, "attempts", 1)
                fail = functools.partial(self.store.fail_request, item.key, error, attempts)
                _settle(item.answer, self.commits.queue(fail), error=e)
                continue
            finally:
                item.worker = None
            latency_s = time.perf_counter() - start
            cost = cost_usd(self.price, completion.tokens_in, completion.tokens_out)
            # Charged before the reservation goes: the budget never sees this request as free.
            self.account.charge(
                cost, completion.tokens_in, completion.tokens_out, completion.usage_estimated
            )
            self.account.release(item.worst)
            # Stored once this worker has sent its next request: of answers that come together,
            # each is followed by a request first, and their writes by the next group.
            loop = asyncio.get_running_loop()
            loop.call_soon(self._store_answer, item, completion, cost, latency_s, attempts)

    def _store_answer(
        self, item: _Waiting, completion: Completion, cost: float, latency_s: float, attempts: int
    ) -> None:
        finish = functools.partial(
            self.store.finish_request,
            item.key,
            text=completion.text,
            finish_reason=completion.finish_reason,
            tokens_in=completion.tokens_in,
            tokens_out=completion.tokens_out,
            cost_usd=cost,
            latency_s=latency_s,
            attempts=attempts,
            response=completion.raw,
        )
        result = LedgerResult(item.key, completion, False, cost)
        _settle(item.answer, self.commits.queue(finish), result=result)  # stored, then used

    async def _ask(self, request: Request) -> Completion:
        if self.max_batch <= 1:
            [completion] = await self.teacher.complete([request])
            return completion
        future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._run_batches())
        return await future

    async def _run_batches(self) -> None:
        """Send the queue in batches of up to max_batch, one batch at a time: a local backend
        computes one batch at a time anyway, and requests arriving meanwhile form the next one."""
        while self._queue:
            await asyncio.sleep(self.batch_window_s)  # let requests launched together join
            batch = [(r, f) for r, f in self._queue[: self.max_batch] if not f.cancelled()]
            del self._queue[: self.max_batch]
            if not batch:
                continue
            try:
                completions = await self.teacher.complete([r for r, _ in batch])
                answered = list(zip(batch, completions, strict=True))  # one answer per request
            except Exception as e:  # noqa: BLE001 - raised again in each waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future), completion in answered:
                    if not future.done():
                        future.set_result(completion)

    # -- remote batches (the Batch API) ---------------------------------------------------------
    async def _ask_remote(self, key: str, request: Request, remote: str | None) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self._remote_queue.append((key, request, remote, future))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._run_remote())
        return await future

    async def _run_remote(self) -> None:
        """Gather queued requests; those a recorded remote batch carries wait on it, the rest go
        out in new remote batches (one endpoint and at most max_batch requests each)."""
        while self._remote_queue:
            await asyncio.sleep(self.batch_window_s)
            queued, self._remote_queue = self._remote_queue, []
            waits: dict[str, list] = defaultdict(list)
            fresh: dict[str, list] = defaultdict(list)
            for item in queued:
                _, request, remote, _ = item
                if remote:
                    waits[remote].append(item)
                else:
                    fresh[self.teacher.endpoint(request)].append(item)
            for items in fresh.values():
                for start in range(0, len(items), self.max_batch):
                    chunk = items[start : start + self.max_batch]
                    try:
                        batch = await self.teacher.submit(
                            [r for _, r, _, _ in chunk], [k for k, _, _, _ in chunk]
                        )
                    except Exception as e:  # noqa: BLE001 - raised again in each waiting request
                        for *_, future in chunk:
                            if not future.done():
                                future.set_exception(e)
                        continue
                    self.store.put_remote_batch(batch, [k for k, _, _, _ in chunk])
                    self._notify(batch)
                    waits[batch["id"]].extend(chunk)
            for batch_id, items in waits.items():
                task = asyncio.create_task(self._await_remote(batch_id, items))
                self._remote_tasks.add(task)
                task.add_done_callback(self._remote_tasks.discard)

    async def _await_remote(self, batch_id: str, items: list) -> None:
        try:
            batch = await self.teacher.wait(batch_id, self._on_remote)
            answers = await self.teacher.collect(batch, [k for k, _, _, _ in items])
        except Exception as e:  # noqa: BLE001 - raised again in each waiting request
            answers = {k: e for k, _, _, _ in items}
        for key, _, _, future in items:
            if future.done():
                continue
            answer = answers[key]
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

    def _on_remote(self, batch: dict) -> None:
        self.store.update_remote_batch(batch)
        self._notify(batch)

    def _notify(self, batch: dict) -> None:
        if self.on_remote_update:
            self.on_remote_update(batch)


def completion_from_row(row: dict) -> Completion:
    raw = json.loads(row["response_json"]) if row["response_json"] else None
    return Completion(row["text"], row["finish_reason"], row["tokens_in"], row["tokens_out"], raw)


def attempts_of(completion: Completion) -> int:
    """HTTP backends report their attempts in `raw`; local ones make exactly one."""
    return (completion.raw or {}).get("attempts", 1)
