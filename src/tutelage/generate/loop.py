"""The generation loop: ask the teacher for new tasks until enough of them survive the filter.

The loop keeps `generation.concurrency` main requests in flight (a recipe's further requests,
Self-Instruct's classification and instances, run alongside through the same ledger) and handles
answers in two ordered steps:
1. screen: the answer to request i is parsed and each new instruction judged against the seeds and
   the pool, strictly in request order, so the filter sees candidates in the same order on every
   run.
2. finish and store: the recipe's further requests for request i, then its answer and every record
   parsed from it commit in one transaction (`Store.put_batch`), again in request order; the stop
   conditions (target, max_requests, exhausted, stalled, budget) are checked after each commit,
   and request i + window is launched only after request i is stored (so after it was screened: a
   prompt built from the pool sees the same pool on every run).
With a deterministic teacher, a killed and resumed run therefore ends with exactly the dataset of an
uninterrupted one: what was not committed is screened again, its answers read from the ledger.

A recipe with a finite input (the answer recipe's prompts) returns None from `build_request` once it
has nothing more to ask: the loop launches nothing past that request and stops as "exhausted" when
every request before it is stored.

Chat answers come from `generation.responder` when it is set (its own model and ledger, its own
price), and the best of several answers is picked by a judge (`answering.judge_config`); every
ledger of the call pays from one account, so `generation.budget_usd` caps them together.

`GenerationLoop` holds one call's state; `run` is its steps in order: stop, launch, wait, screen,
commit, and at the end the pending requests settled and the teachers closed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Hashable

from ..config import Config, TeacherConfig
from ..filter.screen import screen_for
from ..stage_results import GenerateResult
from ..store import Store
from ..teachers import Ledger, make_teacher, speaks_chat
from ..teachers.base import Teacher
from ..teachers.ledger import Account, BudgetExceeded
from ..teachers.prices import price_for
from . import alpaca, answer, evol_instruct, magpie, self_instruct
from .answering import judge_config
from .recipe import Context, Recipe, Screened

RECIPES: dict[str, Recipe] = {
    alpaca.NAME: alpaca,
    self_instruct.NAME: self_instruct,
    evol_instruct.NAME: evol_instruct,
    magpie.NAME: magpie,
    answer.NAME: answer,
}

# Record keys recipes set that the store keeps in an instruction's `detail`.
RECORD_DETAILS = ("category", "input_quality", "conversation_stop", "evolution")

# What to change when a run stalls, by the commonest reason of the stalled stretch.
STALL_ADVICE = {
    "parse_error": "the teacher's answers do not follow the list format: try a stronger teacher, "
    "teacher.chat true/false, or your own generation.prompt_template",
    "length_truncated": "answers hit the token limit: raise teacher.sampling.max_tokens",
    "rouge_duplicate": "new tasks repeat kept ones: raise the temperature, add seeds or "
    "generation.topics, or loosen filter.rouge_threshold",
    "no_valid_instances": "no instance survives the instance filters: try a stronger teacher or "
    "your own instance templates (generation.input_first_template, ...)",
    "refusal": "the chat answers refuse or apologise: try another generation.responder, or a "
    "generation.system_prompt that asks for direct answers",
    "unfinished": "the chat answers hit the token limit: raise "
    "generation.answer_sampling.max_tokens",
    "repetition": "the chat answers loop: try a stronger generation.responder, or a "
    "frequency_penalty in generation.answer_sampling",
}
DEFAULT_ADVICE = (
    "try a stronger teacher, a higher temperature, other seeds or topics, or a "
    "looser filter.rouge_threshold"
)

Progress = Callable[[int, int, dict], None]  # (kept, target, {requests, cost_usd, ...})


def generate(
    store: Store,
    config: Config,
    teacher: Teacher,
    progress: Progress | None = None,
    *,
    responder: Teacher | None = None,
    judge: Teacher | None = None,
) -> GenerateResult:
    """`responder`, `judge`: backends to use instead of making them from generation.responder
    and evaluation.judge (closed at the end, like the teacher)."""
    return asyncio.run(_generate(store, config, teacher, progress, responder, judge))


async def _generate(
    store: Store,
    config: Config,
    teacher: Teacher,
    progress: Progress | None,
    responder: Teacher | None = None,
    judge: Teacher | None = None,
) -> GenerateResult:
    # Built inside the event loop: the ledger's futures and workers belong to it.
    loop = GenerationLoop(store, config, teacher, progress, responder=responder, judge=judge)
    return await loop.run()


class GenerationLoop:
    """One call of `generate`. Requests are numbered across runs: `start` is the first of this
    call, and `committed <= screened <= next_launch` are the next request to store, to screen and
    to launch."""

    def __init__(
        self,
        store: Store,
        config: Config,
        teacher: Teacher,
        progress: Progress | None = None,
        *,
        responder: Teacher | None = None,
        judge: Teacher | None = None,
    ):
        self.store, self.config, self.teacher, self.progress = store, config, teacher, progress
        self.gen = gen = config.generation
        self.recipe = RECIPES[gen.recipe]
        self.recipe.check(config)
        seeds = store.seeds()
        if not seeds:
            raise ValueError(
                "no seed tasks in the store: the run must be initialised with seeds first"
            )
        # A Batch API teacher answers a whole wave at once, hours later: launch the next wave only
        # when this one is stored, so the filter sees the wave's tasks before asking for more.
        self.remote = getattr(teacher, "remote", False)
        self.window = config.teacher.batch_size if self.remote else gen.concurrency
        self.ctx = Context(
            config,
            speaks_chat(config.teacher),
            seeds,
            screen_for(config.filter, gen.language),
            window=self.window,
        )
        self.stored_ids: dict[Hashable, int] = {}  # pool key of a stored record -> its id
        records = store.machine_records()
        self._rebuild_pool(records)

        # Resume where the store stands.
        self.kept = store.funnel()["kept"]
        self.start = store.next_batch_index()
        self.idle = self._idle_requests(records)  # requests in a row that added nothing

        # One account for every ledger of the call: generation.budget_usd caps them together.
        self.account = Account(store, gen.budget_usd)
        self.ledger = self._ledger(config.teacher, teacher)
        self.ctx.ledger = self.ledger
        self.ledgers = [self.ledger]
        self.side_teachers: list[Teacher] = []  # closed at the end, like the teacher
        # Alpaca and Self-Instruct ask for chat answers only with generation.answer: chat.
        list_answers = gen.answer == "list" and gen.recipe in (alpaca.NAME, self_instruct.NAME)
        if gen.responder is not None and not list_answers:
            responder = responder or make_teacher(gen.responder)
            self.side_teachers.append(responder)
            self.ctx.responder = self._ledger(gen.responder, responder)
            self.ledgers.append(self.ctx.responder)
        # The judge of several answers to one prompt: the teacher's own ledger when it judges.
        self.ctx.judge = None
        # Magpie also tags its tasks (category, input quality) when evaluation.judge is set.
        tags = gen.recipe == "magpie" and config.evaluation.judge is not None
        judge_section = judge_config(config) if gen.samples > 1 or tags else None
        if judge_section is config.teacher:
            self.ctx.judge = self.ledger
        elif judge_section is not None:
            judge = judge or make_teacher(judge_section)
            self.side_teachers.append(judge)
            self.ctx.judge = self._ledger(judge_section, judge)
            self.ledgers.append(self.ctx.judge)

        self.launched: dict[int, asyncio.Task] = {}  # main requests not screened yet
        self.finishing: dict[int, asyncio.Task] = {}  # screened answers: the recipe's further steps
        self.next_launch = self.screened = self.committed = self.start
        # The recipe has no request of this number, nor past it (its input ran out).
        self.exhausted_at: int | None = None
        # A main request hit the budget: store what is screened, then stop.
        self.out_of_budget = False
        # A recipe's further request hit the budget: stop at once.
        self.finish_out_of_budget = False
        self.stop_reason = ""
        self.remote_status = ""  # a Batch API wave's state, for the progress line
        self.ledger.on_remote_update = self._on_remote

    def _ledger(self, section: TeacherConfig, teacher: Teacher) -> Ledger:
        """A ledger for one of the call's models, at its own price, paying from the account."""
        price = price_for(section.backend, teacher.model, section.price, batch=section.batch)
        return Ledger(
            teacher,
            self.store,
            price=price,
            account=self.account,
            concurrency=section.concurrency,
        )

    def _rebuild_pool(self, records: list[dict]) -> None:
        """The novelty pool as it stood: seeds, then the pooled machine tasks in order.

        A recipe may leave the seeds out (SEEDS_IN_POOL = False) and compare another text than
        the instruction (`pool_text(row)`): the answer recipe compares whole prompts."""
        screen = self.ctx.screen
        seeds = self.ctx.seeds if getattr(self.recipe, "SEEDS_IN_POOL", True) else []
        pool_text = getattr(self.recipe, "pool_text", None) or (lambda row: row["instruction"])
        past = [r for r in records if self.recipe.in_pool(r)]
        texts = [s["instruction"] for s in seeds] + [pool_text(r) for r in past]
        screen.prepare(texts)
        screen.add_references(texts, [("id", row["id"]) for row in [*seeds, *past]])
        self.ctx.pool.extend((r["batch"], r["instruction"]) for r in past)

    def _idle_requests(self, records: list[dict]) -> int:
        """The stored requests in a row, up to the last one, that kept no example."""
        kept_in = {r["batch"] for r in records if _kept(r)}
        idle = 0
        for b in self.store.recent_batches(self.gen.stall_requests):
            if b["idx"] in kept_in:
                break
            idle += 1
        return idle

    async def run(self) -> GenerateResult:
        """Until a stop condition holds: launch, wait for the next answer or the next finished
        request, screen it, store it."""
        self.report()
        try:
            while not (stop_reason := self.stop()):
                self.launch()
                waits = self._awaited()
                if not waits:  # the recipe has just said it has nothing more: stop() tells
                    assert self.exhausted_at == self.committed, "nothing in flight, no stop"
                    continue
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                self.screen_next()
                self.commit_next()
            self.stop_reason = stop_reason
        except BaseException:
            for task in [*self.launched.values(), *self.finishing.values()]:
                task.cancel()
            raise
        finally:
            # At a normal stop, requests already sent are paid for: let them finish so the ledger
            # stores their answers for the next run. A remote batch may take hours: its id is in
            # the store, and the next run collects it.
            pending = [*self.launched.values(), *self.finishing.values()]
            if self.remote:
                for task in pending:
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for teacher in [self.teacher, *self.side_teachers]:
                await teacher.aclose()
        return self.result()

    def stop(self) -> str:
        """Why the loop stops now, or "" while it goes on."""
        gen = self.gen
        if self.kept >= gen.target:
            return "target"
        if self.exhausted_at is not None and self.committed >= self.exhausted_at:
            return "exhausted"
        if self.committed >= gen.max_requests:
            # The cap and the end of the input at once: the end is the news.
            nothing_left = self.recipe.build_request(self.committed, self.ctx) is None
            return "exhausted" if nothing_left else "max_requests"
        if self.idle >= gen.stall_requests:
            return "stalled"
        if self.finish_out_of_budget or (self.out_of_budget and self.committed == self.screened):
            return "budget"
        return ""

    def launch(self) -> None:
        """Keep `window` main requests in flight past the last stored one."""
        # A wave of a Batch API teacher waits until the last one is stored: it is whole then.
        if self.out_of_budget or (self.remote and (self.launched or self.finishing)):
            return
        while self.exhausted_at is None and self.next_launch < min(
            self.committed + self.window, self.gen.max_requests
        ):
            request = self.recipe.build_request(self.next_launch, self.ctx)
            if request is None:  # nothing more to ask: the requests before it still finish
                self.exhausted_at = self.next_launch
                return
            self.launched[self.next_launch] = asyncio.create_task(
                self.ledger.complete(request, purpose="generate")
            )
            self.next_launch += 1

    def _can_screen(self) -> bool:
        return not self.out_of_budget and self.screened < self.next_launch

    def _awaited(self) -> list[asyncio.Task]:
        """What the next step waits for: the answer to screen next, the request to store next."""
        waits = [self.launched[self.screened]] if self._can_screen() else []
        if self.committed < self.screened:
            waits.append(self.finishing[self.committed])
        return waits

    def screen_next(self) -> None:
        """Screen the answer to request `screened` if it has come (strictly in request order), and
        start the recipe's further steps for it."""
        if not (self._can_screen() and self.launched[self.screened].done()):
            return
        task = self.launched.pop(self.screened)
        try:
            result = task.result()
        except BudgetExceeded:
            self.out_of_budget = True
            return
        answer = self.recipe.screen(self.screened, result, self.ctx)
        self.finishing[self.screened] = asyncio.create_task(
            _finished(self.recipe, answer, self.ctx)
        )
        self.screened += 1

    def commit_next(self) -> None:
        """Store request `committed` if its further steps are done (strictly in request order)."""
        if not (self.committed < self.screened and self.finishing[self.committed].done()):
            return
        try:
            request_key, records = self.finishing.pop(self.committed).result()
        except BudgetExceeded:
            self.finish_out_of_budget = True
            return
        n_new = self._store(self.committed, request_key, records)
        self.kept += n_new
        self.idle = 0 if n_new else self.idle + 1
        self.committed += 1
        self.report()

    def _store(self, idx: int, request_key: str, records: list[dict]) -> int:
        """Request idx's answer and records in one transaction; returns the examples it kept
        (a kept instruction whose first instance is kept, as `Store.funnel` counts them)."""
        rows = []
        for rec in records:
            rec = dict(rec)
            key = rec.pop("nearest_key", None)
            if key is not None and key[0] == "id":
                rec["nearest_id"] = key[1]
            elif key is not None and key[1] == idx:  # an earlier task of this same answer
                rec["nearest_pos"] = key[2]
            elif key is not None:
                rec["nearest_id"] = self.stored_ids[key]
            rows.append(self._with_details(rec))
        ids = self.store.put_batch(idx, request_key, self.recipe.NAME, rows)
        for pos, id_ in enumerate(ids):
            self.stored_ids[("new", idx, pos)] = id_
        return sum(
            r["status"] == "kept"
            and (not r.get("instances") or r["instances"][0]["status"] == "kept")
            for r in rows
        )

    def _with_details(self, rec: dict) -> dict:
        """A record in the store's shape: what a recipe knows of a task beyond its text goes in
        `detail` (Magpie's tags and why a conversation stopped, an evolution's lineage with its
        parent's id), a multi-turn conversation in its instance's `messages`."""
        detail = dict(rec.pop("detail", None) or {})
        for name in RECORD_DETAILS:
            if rec.get(name) is not None:
                detail[name] = rec.pop(name)
            rec.pop(name, None)
        evolution = detail.get("evolution")
        if evolution:
            parent = evolution.pop("parent_key", None)
            if parent is not None:
                evolution["parent_id"] = parent[1] if parent[0] == "id" else self.stored_ids[parent]
        conversation = rec.pop("conversation", None)
        if conversation and rec.get("instances"):
            rec["instances"] = [
                {**rec["instances"][0], "messages": conversation},
                *rec["instances"][1:],
            ]
        rec["detail"] = detail
        return rec

    def report(self) -> None:
        if not self.progress:
            return
        ledger, target = self.ledger, self.gen.target
        # The cost of reaching the target, if the rest keeps tasks at the rate so far.
        projected = ledger.projection(self.kept / target) if self.kept else None
        self.progress(
            self.kept,
            target,
            {
                "requests": self.committed,
                "cost_usd": self.account.spent_usd,
                "estimated_usd": self.account.estimated_usd,
                "projected_usd": projected,
                "cache_hits": sum(one.cache_hits for one in self.ledgers),
                "remote": self.remote_status,
            },
        )

    def _on_remote(self, batch: dict) -> None:
        counts = batch.get("request_counts") or {}
        self.remote_status = (
            f"batch {batch.get('status')} {counts.get('completed', 0)}/{counts.get('total', '?')}"
        )
        self.report()

    def message(self) -> str:
        gen, kept = self.gen, self.kept
        if self.stop_reason == "target":
            return f"reached the target of {gen.target} kept tasks"
        if self.stop_reason == "max_requests":
            return (
                f"stopped at generation.max_requests={gen.max_requests} with {kept} of "
                f"{gen.target} kept; raise it to go on"
            )
        if self.stop_reason == "exhausted":
            what = (
                f"all {self.committed} prompts of generation.prompts"
                if gen.recipe == "answer"
                else f"all {self.committed} requests the {gen.recipe} recipe had to make"
            )
            return (
                f"answered {what}, keeping {kept} (target {gen.target}); "
                "give it more input to go on"
            )
        if self.stop_reason == "stalled":
            return (
                f"stalled: {gen.stall_requests} requests in a row added no kept task "
                f"({kept} of {gen.target} kept). {_stall_advice(self.store, gen.stall_requests)}"
            )
        return (
            f"stopped before passing generation.budget_usd={gen.budget_usd} "
            f"(spent ${self.account.spent_usd:.4f}); raise it and rerun to go on"
        )

    def result(self) -> GenerateResult:
        return GenerateResult(
            kept=self.kept,
            target=self.gen.target,
            requests=self.committed,
            new_requests=self.committed - self.start,
            stop_reason=self.stop_reason,
            message=self.message(),
            cost_usd=self.account.spent_usd,
            estimated_usd=self.account.estimated_usd,
            funnel=self.store.funnel(),
        )


async def _finished(recipe: Recipe, screened: Screened, ctx: Context) -> tuple[str, list[dict]]:
    return screened.request_key, await recipe.finish(screened, ctx)


def _kept(row: dict) -> bool:
    """A stored record is a kept example: its instruction and its first instance kept (an
    answer rule may reject the instance of an instruction that passed), as `Store.funnel` says."""
    return row["status"] == "kept" and row["instance_status"] in ("kept", None)


def _recent_rejections(store: Store, last: int) -> Counter:
    """The rejections of the last `last` requests by reason, the instance's reason where the
    instruction passed (as `Store.funnel` counts them)."""
    first = store.next_batch_index() - last
    return Counter(
        (r["reason"] if r["status"] == "rejected" else r["instance_reason"]) or "rejected"
        for r in store.machine_records()
        if r["batch"] >= first and not _kept(r)
    )


def _stall_advice(store: Store, last: int) -> str:
    """What to change, from the commonest rejection of the last `last` requests."""
    reasons = _recent_rejections(store, last)
    if not reasons:
        return "The teacher's answers held no task at all: " + STALL_ADVICE["parse_error"] + "."
    top, n = max(reasons.items(), key=lambda kv: (kv[1], kv[0]))
    advice = STALL_ADVICE.get(top, DEFAULT_ADVICE)
    return f"Most were {top} ({n}): {advice}."
