"""The budget cap (generation.budget_usd) without holes, each case against the fault server: answers
without `usage`, reasoning tokens, a model without a price, and the teacher's answers and the
judge's verdicts during evaluation."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from fault_server import FaultServer
from helpers import add_examples, save_tiny_model

from tutelage import evaluate as ev
from tutelage.config import Config, Price
from tutelage.display import cost_text
from tutelage.report.page import _cost
from tutelage.store import Store
from tutelage.teachers import BudgetExceeded, Ledger, Request
from tutelage.teachers.openai import OpenAITeacher

# $0.1 per output token, inputs free: a request with max_tokens 10 may cost up to $1.
PER_TOKEN = 0.1
PRICE = {"input": 0.0, "output": PER_TOKEN * 1e6}


def chat(i: int) -> Request:
    return Request.make(
        messages=[{"role": "user", "content": f"task number {i}"}], sampling={"max_tokens": 10}
    )


def sent_until_the_cap(ledger: Ledger, n: int) -> int:
    """Ask n requests one after another; how many went out before the budget refused one."""

    async def asking() -> int:
        for i in range(n):
            try:
                await ledger.complete(chat(i))
            except BudgetExceeded:
                return i
        return n

    return asyncio.run(asking())


def teacher(server: FaultServer, model: str) -> OpenAITeacher:
    return OpenAITeacher(model, base_url=server.url, api_key_env=None, backoff_s=0.01)


# -- what an answer costs --------------------------------------------------------------------------
def test_an_answer_without_usage_counts_against_the_cap(server, store):
    # The server counts nothing; a model tiktoken does not know is counted at 4 characters a
    # token: "echo: task number i" is 19 characters, 5 tokens, $0.5.
    server.send_usage = False
    ledger = Ledger(teacher(server, "my-model"), store, price=Price(**PRICE), budget_usd=2.8)
    # $0.5 an answer and up to $1 for the next: 4 answers ($2.0), then $3.0 could pass $2.8.
    # Counted as $0 (the hole), all 8 would have gone.
    assert sent_until_the_cap(ledger, 8) == 4 and server.hits == 4
    assert ledger.spent_usd == pytest.approx(2.0)
    # ... and marked as estimated: in the ledger's totals, the stored rows, the report, the CLI.
    assert ledger.estimated_usd == pytest.approx(2.0)
    totals = store.request_totals()
    assert totals["estimated"] == 4 and totals["estimated_usd"] == pytest.approx(2.0)
    note = _cost(totals, store.request_totals_by_purpose(), 1)["estimated_note"]
    assert note.startswith("4 answers came without the server's token counts") and "$2" in note
    assert cost_text(2.0, 2.0) == "$2.0000 ($2.0000 of it estimated: answers without usage)"
    # A rerun's totals start from the store's, estimates included.
    again = Ledger(teacher(server, "my-model"), store, price=Price(**PRICE), budget_usd=2.8)
    assert again.estimated_usd == pytest.approx(2.0) and sent_until_the_cap(again, 8) == 4


def test_answers_with_usage_are_not_marked_estimated(server, store):
    ledger = Ledger(teacher(server, "my-model"), store, price=Price(**PRICE), budget_usd=9.0)
    assert sent_until_the_cap(ledger, 3) == 3
    totals = store.request_totals()
    assert totals["estimated"] == 0 and totals["estimated_usd"] == 0
    assert _cost(totals, [], 1)["estimated_note"] is None
    assert cost_text(1.2) == "$1.2000"


def test_reasoning_tokens_count_against_the_cap(server, store):
    # o3 thinks 3 hidden tokens before its 4 visible ones: 7 tokens billed, $0.7 an answer.
    server.reasoning_tokens = 3
    ledger = Ledger(teacher(server, "o3"), store, price=Price(**PRICE), budget_usd=2.8)
    # 3 answers ($2.1), then up to $1 more could pass $2.8; counting 4 tokens, 5 would have gone.
    assert sent_until_the_cap(ledger, 8) == 3 and server.hits == 3
    assert ledger.spent_usd == pytest.approx(2.1)


# -- a model without a price -----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "run", "evaluate"])
def test_a_budget_with_an_unpriced_model_refuses_to_start(server, tmp_path, command):
    from typer.testing import CliRunner

    from tutelage.cli import app

    run_dir = tmp_path / "run"
    if command == "evaluate":  # evaluate needs a run to evaluate
        Store(run_dir).close()
    hosted = {"backend": "openai", "model": "my-finetune", "base_url": server.url}
    config = tmp_path / "tutelage.yaml"
    config.write_text(json.dumps({"teacher": hosted, "generation": {"budget_usd": 5}}))
    args = [command, "-c", str(config), "-r", str(run_dir)]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error: teacher.price: no known price for 'my-finetune'")
    assert "set teacher.price" in lines[0]
    assert server.hits == 0
    assert run_dir.exists() == (command == "evaluate")  # nothing created


# -- evaluation pays from the same budget ----------------------------------------------------------
EXAMPLES = [(f"Name thing {i}.", "", f"Thing {i}.") for i in range(4)]  # echoed: 4 tokens


@pytest.fixture(scope="module")
def students(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("students")
    return {role: save_tiny_model(root / role, tokenizer, seed) for seed, role in enumerate("bt")}


def evaluated_run(tmp_path, students, server, budget: float, **evaluation) -> tuple[Store, Config]:
    """A run with 4 held-out examples, a base and a tuned student, and the fault server as its
    teacher (and judge), asked one request at a time."""
    run_dir = tmp_path / "run"
    config = Config(
        run_dir=run_dir,
        student={"model": str(students["b"])},
        teacher={
            "backend": "openai",
            "model": "my-teacher",
            "base_url": server.url,
            "price": PRICE,
            "concurrency": 1,
        },
        generation={"budget_usd": budget},
        evaluation={
            "builtin_set": False,
            "ifeval": False,
            "max_new_tokens": 10,
            "bootstrap": 20,
            "include_teacher": True,
            **evaluation,
        },
    )
    store = Store(run_dir)
    add_examples(store, EXAMPLES, "test")
    shutil.copytree(students["t"], run_dir / "student")  # the trained student
    return store, config


def by_purpose(store: Store) -> dict[str, dict]:
    return {r["purpose"]: r for r in store.request_totals_by_purpose()}


def test_the_teachers_answers_during_evaluation_count_against_the_cap(tmp_path, students, server):
    # $0.4 an answer, up to $1 for the next: 2 answers ($0.8), then $1.8 could pass $1.5.
    store, config = evaluated_run(tmp_path, students, server, budget=1.5, pairs=[])
    result = ev.evaluate(store, config, config.run_dir)
    assert server.hits == 2 and by_purpose(store)["evaluate"]["requests"] == 2
    assert store.request_totals()["cost_usd"] == pytest.approx(0.8)
    # What was answered is summarised, and a note says where it stopped and how to go on.
    teacher_rows = [r for r in store.eval_items("held_out") if r["model_role"] == "teacher"]
    assert len(teacher_rows) == 2
    words = result.sets["held_out"]["metrics"]["answer_words"]
    assert words["teacher"]["n"] == 2 and words["tuned"]["n"] == 4
    [note] = [n for n in result.notes if "budget" in n]
    assert note.startswith("the teacher's answers stopped at the budget: $0.8000 of the $1.5 cap")
    assert "raise generation.budget_usd" in note

    # A higher cap goes on from there: only the two answers missing are asked.
    config.generation.budget_usd = 10.0
    ev.evaluate(store, config, config.run_dir)
    assert server.hits == 4 and by_purpose(store)["evaluate"]["requests"] == 4


def test_the_judges_verdicts_count_against_the_cap(tmp_path, students, server):
    # The teacher's 4 answers cost $1.6. Each verdict (the judge's answer, cut at 16 tokens)
    # costs $1.6: two fit under $5.5 ($4.8 spent), a third could pass it.
    store, config = evaluated_run(
        tmp_path,
        students,
        server,
        budget=5.5,
        pairs=["tuned:teacher"],
        judge_max_tokens=16,
        judge_retries=0,
    )
    result = ev.evaluate(store, config, config.run_dir)
    spent = by_purpose(store)
    assert spent["evaluate"]["requests"] == 4 and spent["judge"]["requests"] == 2
    assert store.request_totals()["cost_usd"] == pytest.approx(1.6 + 2 * 1.6)  # under $5.5
    assert server.hits == 6
    [note] = [n for n in result.notes if "budget" in n]
    assert note.startswith("judging stopped at the budget")
