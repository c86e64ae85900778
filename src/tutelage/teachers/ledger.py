"""The request ledger: every teacher request goes through here.

A request is recorded in the store before it is sent and its answer when it comes, and a request
whose answer is stored is answered from the store, so a killed or repeated run never pays twice.
The ledger also keeps the budget (no request starts that could pass it), live totals, and gathers
concurrent requests into batches for local backends that generate several sequences at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
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


class Ledger:
    """Sends requests to `teacher` through `store`. One Ledger lives inside one event loop.

    Totals (`spent_usd`, `tokens_in`, `tokens_out`) include what the store held at the start, so
    they are the run's totals; `requests_sent` and `cache_hits` count this ledger's calls only.
    """

    def __init__(self, teacher: Teacher, store: Store, *, price: Price | None = None,
                 budget_usd: float | None = None, concurrency: int = 8,
                 batch_window_s: float = 0.005):
        self.teacher = teacher
        self.store = store
        self.price = price or Price()
        self.budget_usd = budget_usd
        self.max_batch = getattr(teacher, "max_batch", 1)
        self.batch_window_s = batch_window_s
        totals = store.request_totals()
        self.spent_usd: float = totals["cost_usd"]
        self.tokens_in: int = totals["tokens_in"]
        self.tokens_out: int = totals["tokens_out"]
        self.requests_sent = 0
        self.cache_hits = 0
        self._reserved_usd = 0.0  # the worst-case cost of the requests in flight
        self._slots = asyncio.Semaphore(concurrency)
        # One lock per key: the same request asked twice at once is sent once, then read back.
        self._key_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._queue: list[tuple[Request, asyncio.Future]] = []
        self._batcher: asyncio.Task | None = None

    def key(self, request: Request) -> str:
        return request.key(self.teacher.backend, self.teacher.model)

    async def complete(self, request: Request, purpose: str = "generate") -> LedgerResult:
        """The stored answer to `request` if there is one, else the teacher's (recorded first)."""
        key = self.key(request)
        async with self._key_locks[key]:
            row = self.store.get_request(key)
            if row is not None and row["status"] == "done":
                self.cache_hits += 1
                return LedgerResult(key, completion_from_row(row), True, row["cost_usd"])
            async with self._slots:
                return await self._send(key, request, purpose)

    async def complete_many(self, requests: Sequence[Request],
                            purpose: str = "generate") -> list[LedgerResult]:
        """Answers in request order, at most `concurrency` in flight. On a failure, every request
        already sent still finishes and is stored (it is paid for), then the first error raises."""
        results = await asyncio.gather(*(self.complete(r, purpose) for r in requests),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def projection(self, done_fraction: float) -> float:
        """The run's total cost if the rest costs what the part done so far did."""
        return self.spent_usd / done_fraction if done_fraction > 0 else float("inf")

    async def _send(self, key: str, request: Request, purpose: str) -> LedgerResult:
        worst = worst_case_cost(request, self.price)
        committed = self.spent_usd + self._reserved_usd  # spent, plus the worst case in flight
        if self.budget_usd is not None and committed + worst > self.budget_usd:
            raise BudgetExceeded(
                f"budget: ${committed:.4f} of the ${self.budget_usd:g} cap spent or in flight, and "
                f"the next request could cost up to ${worst:.4f}; raise generation.budget_usd and "
                "rerun to go on (stored answers are free)")
        self._reserved_usd += worst
        backend, model = self.teacher.backend, self.teacher.model
        # Only the canonical request is stored: never headers, keys or client settings.
        self.store.begin_request(key, backend, model, request.canonical(backend, model), purpose)
        self.requests_sent += 1
        start = time.perf_counter()
        try:
            completion = await self._ask(request)
        except Exception as e:
            self.store.fail_request(key, str(e) or type(e).__name__, getattr(e, "attempts", 1))
            raise
        finally:
            self._reserved_usd -= worst
        cost = cost_usd(self.price, completion.tokens_in, completion.tokens_out)
        self.store.finish_request(
            key, text=completion.text, finish_reason=completion.finish_reason,
            tokens_in=completion.tokens_in, tokens_out=completion.tokens_out, cost_usd=cost,
            latency_s=time.perf_counter() - start, attempts=attempts_of(completion),
            response=completion.raw)
        self.spent_usd += cost
        self.tokens_in += completion.tokens_in
        self.tokens_out += completion.tokens_out
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
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future), completion in answered:
                    if not future.done():
                        future.set_result(completion)


def completion_from_row(row: dict) -> Completion:
    raw = json.loads(row["response_json"]) if row["response_json"] else None
    return Completion(row["text"], row["finish_reason"], row["tokens_in"], row["tokens_out"], raw)


def attempts_of(completion: Completion) -> int:
    """HTTP backends report their attempts in `raw`; local ones make exactly one."""
    return (completion.raw or {}).get("attempts", 1)
