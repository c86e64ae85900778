"""Generation: ask the teacher for new tasks until enough of them survive the filter.

The loop keeps `generation.concurrency` main requests in flight (a recipe's further requests,
Self-Instruct's classification and instances, run alongside through the same ledger) and handles
answers in two ordered steps:
1. screen: the answer to request i is parsed and each new instruction judged against the seeds and
   the pool, strictly in request order, so the filter sees candidates in the same order on every
   run.
2. finish and store: the recipe's further requests for request i, then its answer and every record
   parsed from it commit in one transaction (`Store.put_batch`), again in request order; the stop
   conditions (target, max_requests, stalled, budget) are checked after each commit, and request
   i + window is launched only after request i is stored (so after it was screened: a prompt
   built from the pool sees the same pool on every run).
With a deterministic teacher, a killed and resumed run therefore ends with exactly the dataset of an
uninterrupted one: what was not committed is screened again, its answers read from the ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ..config import Config
from ..store import Store
from ..teachers import Ledger, speaks_chat
from ..teachers.base import Teacher
from ..teachers.ledger import BudgetExceeded
from ..teachers.prices import price_for
from . import alpaca, self_instruct
from .recipe import Context
from ..filter.screen import screen_for

RECIPES = {alpaca.NAME: alpaca, self_instruct.NAME: self_instruct}

# What to change when a run stalls, by the commonest reason of the stalled stretch.
STALL_ADVICE = {
    "parse_error": "the teacher's answers do not follow the list format: try a stronger teacher, "
    "teacher.chat true/false, or your own generation.prompt_template",
    "length_truncated": "answers hit the token limit: raise teacher.sampling.max_tokens",
    "rouge_duplicate": "new tasks repeat kept ones: raise the temperature, add seeds or "
    "generation.topics, or loosen filter.rouge_threshold",
    "no_valid_instances": "no instance survives the instance filters: try a stronger teacher or "
    "your own instance templates (generation.input_first_template, ...)",
}
DEFAULT_ADVICE = (
    "try a stronger teacher, a higher temperature, other seeds or topics, or a "
    "looser filter.rouge_threshold"
)


@dataclass
class GenerationResult:
    kept: int
    target: int
    requests: int  # main requests ingested in total, this run and earlier ones
    new_requests: int  # main requests ingested by this call
    stop_reason: str  # target, budget, stalled, max_requests
    message: str
    cost_usd: float = 0.0
    funnel: dict = field(default_factory=dict)


def generate(
    store: Store,
    config: Config,
    teacher: Teacher,
    progress: Callable[[int, int, dict], None] | None = None,
) -> GenerationResult:
    return asyncio.run(_generate(store, config, teacher, progress))


async def _generate(store: Store, config: Config, teacher: Teacher, progress) -> GenerationResult:
    gen = config.generation
    recipe = RECIPES[gen.recipe]
    recipe.check(config)
    seeds = store.seeds()
    if not seeds:
        raise ValueError("no seed tasks in the store: the run must be initialised with seeds first")
    # A Batch API teacher answers a whole wave at once, hours later: launch the next wave only
    # when this one is stored, so the filter sees the wave's tasks before asking for more.
    remote = getattr(teacher, "remote", False)
    window = config.teacher.batch_size if remote else gen.concurrency
    ctx = Context(
        config,
        speaks_chat(config.teacher),
        seeds,
        screen_for(config.filter, gen.language),
        window=window,
    )
    screen = ctx.screen

    # Rebuild the novelty pool as it stood: seeds, then the pooled machine tasks in order.
    past = [r for r in store.machine_records() if recipe.in_pool(r)]
    screen.prepare([s["instruction"] for s in seeds] + [r["instruction"] for r in past])
    for s in seeds:
        screen.add_reference(s["instruction"], ("id", s["id"]))
    for r in past:
        screen.add_reference(r["instruction"], ("id", r["id"]))
        ctx.pool.append((r["batch"], r["instruction"]))
    kept = store.funnel()["kept"]
    start = store.next_batch_index()
    idle = 0  # requests in a row that added nothing
    for b in store.recent_batches(gen.stall_requests):
        if b["n_kept"]:
            break
        idle += 1

    price = price_for(
        config.teacher.backend, teacher.model, config.teacher.price, batch=config.teacher.batch
    )
    ledger = Ledger(
        teacher,
        store,
        price=price,
        budget_usd=gen.budget_usd,
        concurrency=config.teacher.concurrency,
    )
    ctx.ledger = ledger
    launched: dict[int, asyncio.Task] = {}  # main requests not screened yet
    finishing: dict[int, asyncio.Task] = {}  # screened answers: the recipe's further steps
    stored_ids: dict[Hashable, int] = {}  # pool key of a stored record -> its id
    next_launch = screened = committed = start
    out_of_budget = False  # a main request hit the budget: store what is screened, then stop
    stop_reason = ""
    remote_status = ""

    def report() -> None:
        if progress:
            # The cost of reaching the target, if the rest keeps tasks at the rate so far.
            projected = ledger.projection(kept / gen.target) if kept else None
            progress(
                kept,
                gen.target,
                {
                    "requests": committed,
                    "cost_usd": ledger.spent_usd,
                    "projected_usd": projected,
                    "cache_hits": ledger.cache_hits,
                    "remote": remote_status,
                },
            )

    def on_remote(batch: dict) -> None:
        nonlocal remote_status
        counts = batch.get("request_counts") or {}
        remote_status = (
            f"batch {batch.get('status')} {counts.get('completed', 0)}/{counts.get('total', '?')}"
        )
        report()

    ledger.on_remote_update = on_remote

    def stop_now() -> str:
        if kept >= gen.target:
            return "target"
        if committed >= gen.max_requests:
            return "max_requests"
        if idle >= gen.stall_requests:
            return "stalled"
        return ""

    def commit(idx: int, request_key: str, records: list[dict]) -> int:
        rows = []
        for rec in records:
            rec = dict(rec)
            key = rec.pop("nearest_key", None)
            if key is not None and key[0] == "id":
                rec["nearest_id"] = key[1]
            elif key is not None and key[1] == idx:  # an earlier task of this same answer
                rec["nearest_pos"] = key[2]
            elif key is not None:
                rec["nearest_id"] = stored_ids[key]
            rows.append(rec)
        ids = store.put_batch(idx, request_key, recipe.NAME, rows)
        for pos, id_ in enumerate(ids):
            stored_ids[("new", idx, pos)] = id_
        return sum(r["status"] == "kept" for r in rows)

    report()
    try:
        while not (stop_reason := stop_now()):
            # A wave of a Batch API teacher waits until the last one is stored: it is whole then.
            if not out_of_budget and not (remote and (launched or finishing)):
                while next_launch < min(committed + window, gen.max_requests):
                    request = recipe.build_request(next_launch, ctx)
                    launched[next_launch] = asyncio.create_task(
                        ledger.complete(request, purpose="generate")
                    )
                    next_launch += 1
            can_screen = not out_of_budget and screened < next_launch
            waits = [launched[screened]] if can_screen else []
            if committed < screened:
                waits.append(finishing[committed])
            if not waits:
                stop_reason = "budget" if out_of_budget else "max_requests"
                break
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if can_screen and launched[screened].done():
                task = launched.pop(screened)
                try:
                    result = task.result()
                except BudgetExceeded:
                    out_of_budget = True
                else:
                    answer = recipe.screen(screened, result, ctx)
                    finishing[screened] = asyncio.create_task(_finished(recipe, answer, ctx))
                    screened += 1
            if committed < screened and finishing[committed].done():
                try:
                    request_key, records = finishing.pop(committed).result()
                except BudgetExceeded:
                    stop_reason = "budget"
                    break
                n_new = commit(committed, request_key, records)
                kept += n_new
                idle = 0 if n_new else idle + 1
                committed += 1
                report()
    except BaseException:
        for task in [*launched.values(), *finishing.values()]:
            task.cancel()
        raise
    finally:
        # At a normal stop, requests already sent are paid for: let them finish so the ledger
        # stores their answers for the next run. A remote batch may take hours: its id is in
        # the store, and the next run collects it.
        pending = [*launched.values(), *finishing.values()]
        if remote:
            for task in pending:
                task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await teacher.aclose()

    funnel = store.funnel()
    messages = {
        "target": f"reached the target of {gen.target} kept tasks",
        "max_requests": f"stopped at generation.max_requests={gen.max_requests} with {kept} of "
        f"{gen.target} kept; raise it to go on",
        "stalled": f"stalled: {gen.stall_requests} requests in a row added no kept task "
        f"({kept} of {gen.target} kept). {_stall_advice(store, gen.stall_requests)}",
        "budget": f"stopped before passing generation.budget_usd={gen.budget_usd} "
        f"(spent ${ledger.spent_usd:.4f}); raise it and rerun to go on",
    }
    return GenerationResult(
        kept,
        gen.target,
        committed,
        committed - start,
        stop_reason,
        messages[stop_reason],
        ledger.spent_usd,
        funnel,
    )


async def _finished(recipe, screened, ctx: Context) -> tuple[str, list[dict]]:
    return screened.request_key, await recipe.finish(screened, ctx)


def _stall_advice(store: Store, last: int) -> str:
    """What to change, from the commonest rejection of the last `last` requests."""
    reasons = store.recent_rejections(last)
    if not reasons:
        return "The teacher's answers held no task at all: " + STALL_ADVICE["parse_error"] + "."
    top, n = max(reasons.items(), key=lambda kv: (kv[1], kv[0]))
    advice = STALL_ADVICE.get(top, DEFAULT_ADVICE)
    return f"Most were {top} ({n}): {advice}."
