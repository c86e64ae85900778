"""Generation: ask the teacher for new tasks until enough of them survive the filter.

The loop keeps `generation.concurrency` requests in flight and ingests their answers strictly in
request order, so the filter sees candidates in the same order on every run: with a deterministic
teacher, a killed and resumed run ends with exactly the dataset of an uninterrupted one. Each answer
and every record parsed from it commit in one transaction (`Store.put_batch`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import EMBEDDED, Config
from ..filter.screen import Screen
from ..store import Store
from ..teachers import Ledger
from ..teachers.base import Teacher
from ..teachers.ledger import BudgetExceeded
from ..teachers.prices import price_for
from . import alpaca

RECIPES = {alpaca.NAME: alpaca}


@dataclass
class GenerationResult:
    kept: int
    target: int
    requests: int  # batches ingested in total, this run and earlier ones
    new_requests: int  # batches ingested by this call
    stop_reason: str  # target, budget, stalled, max_requests
    message: str
    cost_usd: float = 0.0
    funnel: dict = field(default_factory=dict)


def uses_chat(config: Config) -> bool:
    if config.teacher.chat is not None:
        return config.teacher.chat
    return config.teacher.model != EMBEDDED


def generate(store: Store, config: Config, teacher: Teacher,
             progress: Callable[[int, int, dict], None] | None = None) -> GenerationResult:
    return asyncio.run(_generate(store, config, teacher, progress))


async def _generate(store: Store, config: Config, teacher: Teacher, progress) -> GenerationResult:
    gen = config.generation
    recipe = RECIPES[gen.recipe]
    seeds = store.seeds()
    if not seeds:
        raise ValueError("no seed tasks in the store: the run must be initialised with seeds first")
    chat = uses_chat(config)
    screen = Screen.from_config(config.filter)

    # Rebuild the novelty pool as it stood: seeds, then every kept machine task in order.
    for s in seeds:
        screen.add_reference(s["instruction"], ("id", s["id"]))
    past = store.machine_records()
    for r in past:
        if r["status"] == "kept" and r["instance_status"] == "kept":
            screen.add_reference(r["instruction"], ("id", r["id"]))
    kept = store.count_kept_examples()
    start = store.next_batch_index()
    idle = 0  # requests in a row that added nothing
    for b in store.recent_batches(gen.stall_requests):
        if b["n_kept"]:
            break
        idle += 1

    price = price_for(config.teacher.backend, teacher.model, config.teacher.price,
                      batch=config.teacher.batch)
    ledger = Ledger(teacher, store, price=price, budget_usd=gen.budget_usd,
                    concurrency=config.teacher.concurrency)
    # A Batch API teacher answers a whole wave at once, hours later: launch the next wave only
    # when this one is ingested, so the filter sees the wave's tasks before asking for more.
    remote = getattr(teacher, "remote", False)
    window = config.teacher.batch_size if remote else gen.concurrency
    in_flight: dict[int, asyncio.Task] = {}
    next_launch = idx = start
    stop_reason = ""
    remote_status = ""

    def report() -> None:
        if progress:
            # The cost of reaching the target, if the rest keeps tasks at the rate so far.
            projected = ledger.projection(kept / gen.target) if kept else None
            progress(kept, gen.target, {"requests": idx, "cost_usd": ledger.spent_usd,
                                        "projected_usd": projected,
                                        "cache_hits": ledger.cache_hits, "remote": remote_status})

    def on_remote(batch: dict) -> None:
        nonlocal remote_status
        counts = batch.get("request_counts") or {}
        remote_status = (f"batch {batch.get('status')} {counts.get('completed', 0)}/"
                         f"{counts.get('total', '?')}")
        report()

    ledger.on_remote_update = on_remote

    report()
    try:
        while True:
            if kept >= gen.target:
                stop_reason = "target"
                break
            if idx >= gen.max_requests:
                stop_reason = "max_requests"
                break
            if idle >= gen.stall_requests:
                stop_reason = "stalled"
                break
            topping_up = not (remote and in_flight)  # a wave waits until the last one is ingested
            while topping_up and len(in_flight) < window and next_launch < gen.max_requests:
                request = recipe.build_request(next_launch, seeds, config, chat, config.seed)
                in_flight[next_launch] = asyncio.create_task(
                    ledger.complete(request, purpose="generate"))
                next_launch += 1
            try:
                result = await in_flight.pop(idx)
            except BudgetExceeded:
                stop_reason = "budget"
                break
            records = _screen_response(recipe, result, screen, idx, chat, gen.demonstrations)
            ids = store.put_batch(idx, result.key, recipe.NAME, records)
            for pos, rec in enumerate(records):
                if rec["status"] == "kept":
                    screen.rekey(("new", idx, pos), ("id", ids[pos]))
            n_new = sum(r["status"] == "kept" for r in records)
            kept += n_new
            idle = 0 if n_new else idle + 1
            idx += 1
            report()
    except BaseException:
        for task in in_flight.values():
            task.cancel()
        raise
    finally:
        # At a normal stop, requests already sent are paid for: let them finish so the ledger
        # stores their answers for the next run. A remote batch may take hours: its id is in
        # the store, and the next run collects it.
        if remote:
            for task in in_flight.values():
                task.cancel()
        await asyncio.gather(*in_flight.values(), return_exceptions=True)
        await teacher.aclose()

    messages = {
        "target": f"reached the target of {gen.target} kept tasks",
        "max_requests": f"stopped at generation.max_requests={gen.max_requests} with {kept} of "
                        f"{gen.target} kept; raise it to go on",
        "stalled": f"stalled: {gen.stall_requests} requests in a row added no kept task "
                   f"({kept} of {gen.target} kept). Try a stronger teacher, a higher "
                   "temperature, other seeds or topics, or a looser filter.rouge_threshold",
        "budget": f"stopped before passing generation.budget_usd={gen.budget_usd} "
                  f"(spent ${ledger.spent_usd:.4f}); raise it and rerun to go on",
    }
    return GenerationResult(kept, gen.target, idx, idx - start, stop_reason,
                            messages[stop_reason], ledger.spent_usd, store.funnel())


def _screen_response(recipe, result, screen: Screen, idx: int, chat: bool,
                     n_demos: int) -> list[dict]:
    """Parse one answer and judge every task in it; returns the records for `Store.put_batch`."""
    completion = result.completion
    records = []
    for pos, task in enumerate(recipe.parse(completion.text, completion.finish_reason,
                                            continued=not chat, first_number=n_demos + 1)):
        if task.error:
            records.append({"text": task.instruction, "status": "rejected", "reason": task.error,
                            "raw": task.raw, "instances": []})
            continue
        verdict = screen.check(task.instruction, task.input, task.output, key=("new", idx, pos))
        rec = {"text": task.instruction, "status": verdict.status, "reason": verdict.reason,
               "nearest_score": verdict.nearest_score,
               "instances": [{"input": task.input, "output": task.output,
                              "status": verdict.status, "reason": verdict.reason}]}
        if verdict.nearest_key is not None:
            kind, *where = verdict.nearest_key
            if kind == "id":
                rec["nearest_id"] = where[0]
            else:  # a task kept earlier in this same answer
                rec["nearest_pos"] = where[1]
        records.append(rec)
    return records
