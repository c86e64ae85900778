"""The request ledger: every teacher request goes through here.

A request is recorded in the store before it is sent and its answer when it comes, and a request
whose answer is stored is answered from the store, so a killed or repeated run never pays twice.
The ledger also keeps the budget (no request starts that could pass it), live totals, and gathers
concurrent requests into batches for local backends that generate several sequences at once.
Several ledgers of one run (the teacher's, the responder's, a judge's) share one `Account`: one
budget caps what they spend together.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import Price
from ..store import Store
from .base import Completion, Request, Teacher
from .prices import cost_usd, worst_case_cost


@dataclass
class LedgerResult:
    key: str
    completion: Completion
    cached: bool  # answered from the store, not asked again
    cost_usd: float


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

    def charge(self, cost_usd: float, tokens_in: int, tokens_out: int) -> None:
        self.spent_usd += cost_usd
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out


class Ledger:
    """Sends requests to `teacher` through `store`. One Ledger lives inside one event loop.

    Totals (`spent_usd`, `tokens_in`, `tokens_out`) are its account's: the run's, what the store
    held at the start included. `requests_sent` and `cache_hits` count this ledger's calls only
    (the store counts every hit of the run: `store.request_totals()["cache_hits"]`).

    `account`: the one shared with the run's other ledgers (its budget caps them together);
    None opens one of its own, capped at `budget_usd`.
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
    ):
        if account is not None and budget_usd is not None:
            raise ValueError("a shared account carries the budget: pass budget_usd to it")
        self.teacher = teacher
        self.store = store
        self.price = price or Price()
        self.account = account or Account(store, budget_usd)
        self.max_batch = getattr(teacher, "max_batch", 1)
        self.batch_window_s = batch_window_s
        self.requests_sent = 0
        self.cache_hits = 0
        self._slots = asyncio.Semaphore(concurrency)
        # One lock per key: the same request asked twice at once is sent once, then read back.
        self._key_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._queue: list[tuple[Request, asyncio.Future]] = []
        self._batcher: asyncio.Task | None = None
        # Batch API teachers: requests wait in remote batches the ledger submits and polls.
        self.remote = getattr(teacher, "remote", False)
        self.on_remote_update: Callable[[dict], None] | None = None
        self._remote_queue: list[tuple[str, Request, str | None, asyncio.Future]] = []
        self._remote_tasks: set[asyncio.Task] = set()
        if self.remote:  # a remote batch holds many requests: the semaphore must not split it
            self._slots = asyncio.Semaphore(max(concurrency, 4 * self.max_batch))
            self.batch_window_s = max(batch_window_s, 0.05)

    @property
    def budget_usd(self) -> float | None:
        return self.account.budget_usd

    @property
    def spent_usd(self) -> float:
        return self.account.spent_usd

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
        key = self.key(request)
        async with self._key_locks[key]:
            row = self.store.get_request(key)
            if row is not None and row["status"] == "done":
                self.cache_hits += 1
                self.store.count_cache_hit(key)  # the run's count, across restarts
                return LedgerResult(key, completion_from_row(row), True, row["cost_usd"])
            # A request a remote batch carries is waited for, not sent again.
            remote = row["remote_batch"] if row and row["status"] == "pending" else None
            async with self._slots:
                return await self._send(key, request, purpose, remote)

    async def complete_many(
        self, requests: Sequence[Request], purpose: str = "generate"
    ) -> list[LedgerResult]:
        """Answers in request order, at most `concurrency` in flight. On a failure, every request
        already sent still finishes and is stored (it is paid for), then the first error raises."""
        results = await asyncio.gather(
            *(self.complete(r, purpose) for r in requests), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def projection(self, done_fraction: float) -> float:
        """The run's total cost if the rest costs what the part done so far did."""
        return self.spent_usd / done_fraction if done_fraction > 0 else float("inf")

    async def _send(
        self, key: str, request: Request, purpose: str, remote: str | None = None
    ) -> LedgerResult:
        worst = worst_case_cost(request, self.price)
        self.account.reserve(worst)
        backend, model = self.teacher.backend, self.teacher.model
        # Only the canonical request is stored: never headers, keys or client settings.
        self.store.begin_request(key, backend, model, request.canonical(backend, model), purpose)
        self.requests_sent += 1
        start = time.perf_counter()
        try:
            if self.remote:
                completion = await self._ask_remote(key, request, remote)
            else:
                completion = await self._ask(request)
        except Exception as e:
            self.store.fail_request(key, str(e) or type(e).__name__, getattr(e, "attempts", 1))
            raise
        finally:
            self.account.release(worst)
        cost = cost_usd(self.price, completion.tokens_in, completion.tokens_out)
        self.store.finish_request(
            key,
            text=completion.text,
            finish_reason=completion.finish_reason,
            tokens_in=completion.tokens_in,
            tokens_out=completion.tokens_out,
            cost_usd=cost,
            latency_s=time.perf_counter() - start,
            attempts=attempts_of(completion),
            response=completion.raw,
        )
        self.account.charge(cost, completion.tokens_in, completion.tokens_out)
        return LedgerResult(key, completion, False, cost)

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
