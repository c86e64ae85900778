"""Teacher backends and the ledger: retries, errors, secrets, caching, budget, batching, and the
real local backends on the embedded teacher at tiny sizes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
import torch
from fault_server import FaultServer

from tutelage.config import Price, TeacherConfig
from tutelage.store import Store
from tutelage.teachers import (
    BudgetExceeded,
    Completion,
    Ledger,
    Request,
    TeacherError,
    make_teacher,
    price_for,
)
from tutelage.teachers.openai import OpenAITeacher, RateLimit, retry_after

SECRET = "sk-test-DO-NOT-LEAK-4242"
KEY_ENV = "TUTELAGE_TEST_KEY"


def chat(i: int) -> Request:
    return Request.make(
        messages=[{"role": "user", "content": f"task number {i}"}],
        sampling={"max_tokens": 10, "temperature": 0.0, "stop": []},
    )


@pytest.fixture(autouse=True)
def fake_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def http_teacher(server: FaultServer, **kw) -> OpenAITeacher:
    kw = {"api_key_env": KEY_ENV, "timeout_s": 5.0, "backoff_s": 0.01, **kw}
    return OpenAITeacher("gpt-test", base_url=server.url, **kw)


def ask(ledger: Ledger, *requests: Request):
    """Every request through the ledger, one event loop; a single result for a single request."""
    results = asyncio.run(ledger.complete_many(requests))
    return results[0] if len(requests) == 1 else results


def run_dir_bytes(store: Store) -> bytes:
    """Every byte the run folder holds: the database and its WAL."""
    return b"".join(p.read_bytes() for p in sorted(store.path.parent.iterdir()) if p.is_file())


def rows(store: Store) -> list[dict]:
    return store._all("SELECT * FROM requests ORDER BY created_at")


# -- the package --------------------------------------------------------------------------------
def test_importing_teachers_loads_no_model_library():
    code = (
        "import sys, tutelage.teachers; "
        "print([m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_make_teacher_openai_and_the_key(server, store, monkeypatch):
    cfg = TeacherConfig(
        backend="openai", model="gpt-x", base_url=server.url, api_key_env=KEY_ENV, max_retries=3
    )
    teacher = make_teacher(cfg)
    assert (teacher.backend, teacher.model, teacher.max_retries) == ("openai", "gpt-x", 3)
    ask(Ledger(teacher, store), chat(0))
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(TeacherError, match=f"variable {KEY_ENV} is not set"):
        make_teacher(cfg.model_copy(update={"base_url": "https://api.example.com/v1"}))
    # A local server needs no key: without one, no Authorization header goes out.
    result = ask(Ledger(make_teacher(cfg), store), chat(1))
    assert result.completion.text == "echo: task number 1"
    assert "Authorization" not in server.requests[-1]["headers"]


# -- the OpenAI-compatible backend through the ledger ---------------------------------------------
def test_chat_and_completion_are_sent_recorded_and_priced(server, store):
    price = Price(input=2.0, output=4.0)
    ledger = Ledger(http_teacher(server), store, price=price)
    completion_request = Request.make(prompt="continue this", sampling={"max_tokens": 10})
    a, b = ask(ledger, chat(7), completion_request)

    assert a.completion.text == "echo: task number 7" and not a.cached
    assert b.completion.text == "echo: continue this" and b.completion.finish_reason == "stop"
    # Sent at once, so in either order.
    by_path = {r["path"]: r["body"] for r in server.requests}
    assert sorted(by_path) == ["/v1/chat/completions", "/v1/completions"]
    sent = by_path["/v1/chat/completions"]
    assert sent == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "task number 7"}],
        "max_tokens": 10,
        "temperature": 0.0,
    }  # an empty stop list is not sent
    assert (a.completion.tokens_in, a.completion.tokens_out) == (3, 4)
    assert a.cost_usd == pytest.approx((3 * 2.0 + 4 * 4.0) / 1e6)
    stored = rows(store)
    assert [r["status"] for r in stored] == ["done", "done"]
    assert stored[0]["text"] == "echo: task number 7" and stored[0]["attempts"] == 1
    assert json.loads(stored[0]["body_json"]) == chat(7).canonical("openai", "gpt-test")
    assert ledger.spent_usd == pytest.approx(a.cost_usd + b.cost_usd)
    assert (ledger.tokens_in, ledger.tokens_out, ledger.requests_sent) == (5, 7, 2)
    assert SECRET.encode() not in run_dir_bytes(store)


def test_transient_failures_are_retried_until_an_answer(server, store):
    server.faults += ["429", "500", "drop", "malformed", "slow"]
    server.slow_s = 2.5  # past the teacher's 1 s timeout
    result = ask(Ledger(http_teacher(server, timeout_s=1.0), store), chat(1))
    assert result.completion.text == "echo: task number 1"
    assert server.hits == 6
    [row] = rows(store)
    assert row["status"] == "done" and row["attempts"] == 6


def test_retry_after_is_honoured(server, store):
    server.retry_after = "1"
    server.faults.append("429")
    start = time.monotonic()
    ask(Ledger(http_teacher(server), store), chat(1))
    assert time.monotonic() - start >= 0.9 and server.hits == 2


def test_retry_after_forms():
    in_30s = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= retry_after(httpx.Headers({"Retry-After": in_30s})) <= 30
    assert retry_after(httpx.Headers({"Retry-After": "7"})) == 7
    assert retry_after(httpx.Headers({"retry-after-ms": "250", "Retry-After": "1"})) == 0.25
    assert retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after(httpx.Headers({})) is None


def test_gives_up_after_max_retries_then_a_rerun_succeeds(server, store):
    server.faults += ["500"] * 3
    with pytest.raises(TeacherError, match=r"gave up after 3 attempts; last: HTTP 500"):
        ask(Ledger(http_teacher(server, max_retries=2), store), chat(1))
    assert server.hits == 3
    [row] = rows(store)
    assert (row["status"], row["attempts"]) == ("failed", 3) and "HTTP 500" in row["error"]

    result = ask(Ledger(http_teacher(server, max_retries=2), store), chat(1))
    assert result.completion.text == "echo: task number 1" and server.hits == 4
    [row] = rows(store)  # the same row, now answered
    assert row["status"] == "done" and row["error"] is None


@pytest.mark.parametrize(
    "fault, expected",
    [
        ("400", ["HTTP 400", "Invalid value for 'temperature'"]),
        ("401", ["HTTP 401", "Incorrect API key provided", f"check the API key in ${KEY_ENV}"]),
        ("403", ["HTTP 403", "does not have access", "no access to this model"]),
        ("404", ["HTTP 404", "`gpt-test` does not exist", "unknown model or wrong base_url"]),
        ("quota", ["HTTP 429", "exceeded your current quota"]),
    ],
)
def test_non_retryable_errors_fail_at_once_clearly_and_without_the_key(
    server, store, fault, expected
):
    server.faults.append(fault)
    with pytest.raises(TeacherError) as err:
        ask(Ledger(http_teacher(server), store), chat(1))
    message = str(err.value)
    assert all(e in message for e in expected), message
    assert server.url in message and server.hits == 1
    assert SECRET not in message
    [row] = rows(store)
    assert row["status"] == "failed" and row["attempts"] == 1 and expected[0] in row["error"]
    assert SECRET.encode() not in run_dir_bytes(store)


def test_a_rerun_is_answered_from_the_store(server, tmp_path):
    price = Price(input=1.0, output=1.0)
    with Store(tmp_path / "run") as store:
        first = Ledger(http_teacher(server), store, price=price)
        answers = ask(first, *(chat(i) for i in range(3)))
    assert server.hits == 3 and first.requests_sent == 3

    with Store(tmp_path / "run") as store:
        again = Ledger(http_teacher(server), store, price=price)
        assert again.spent_usd == pytest.approx(first.spent_usd)  # the run's total so far
        assert again.projection(0.5) == pytest.approx(2 * first.spent_usd)
        cached = ask(again, *(chat(i) for i in range(3)))
        assert server.hits == 3  # nothing asked again
        assert all(r.cached for r in cached) and again.cache_hits == 3
        assert again.requests_sent == 0 and again.spent_usd == pytest.approx(first.spent_usd)
        assert [r.completion for r in cached] == [r.completion for r in answers]
        assert store.request_totals()["requests"] == 3


def test_the_same_request_twice_at_once_is_sent_once(server, store):
    a, b = ask(Ledger(http_teacher(server), store), chat(1), chat(1))
    assert server.hits == 1 and (a.cached, b.cached) == (False, True)
    assert a.completion == b.completion


def test_no_lock_outlives_the_requests_of_its_key(server, store):
    ledger = Ledger(http_teacher(server), store)
    ask(ledger, chat(1), chat(1), chat(2))  # a key asked twice at once shares one lock
    server.faults = ["400"]
    with pytest.raises(TeacherError, match="HTTP 400"):
        ask(ledger, chat(3))
    assert ledger._key_locks == {}  # else a long run keeps a lock for every request it made


def test_concurrency_is_bounded_and_answers_keep_their_order(server, store):
    server.delay_s = 0.2
    results = ask(Ledger(http_teacher(server), store, concurrency=3), *(chat(i) for i in range(9)))
    assert [r.completion.text for r in results] == [f"echo: task number {i}" for i in range(9)]
    assert server.max_in_flight == 3


def test_the_client_alone_keeps_order_and_its_bound_and_starts_nothing_after_a_failure(server):
    class Counting(OpenAITeacher):
        """Counts the requests in its hands at once (the server's own count can run one over:
        it counts a request out only after its reply has gone, and the next may come first)."""

        now = most = 0

        async def _complete_one(self, request):
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                return await super()._complete_one(request)
            finally:
                self.now -= 1

    server.delay_s = 0.05
    teacher = Counting(
        "gpt-test", base_url=server.url, api_key_env=KEY_ENV, timeout_s=5.0, concurrency=3
    )
    answers = asyncio.run(teacher.complete([chat(i) for i in range(10)]))
    assert [a.text for a in answers] == [f"echo: task number {i}" for i in range(10)]
    assert teacher.most == 3 and server.hits == 10

    server.faults = ["none", "400"]  # the second request is refused for good
    with pytest.raises(TeacherError, match="HTTP 400"):
        asyncio.run(http_teacher(server, concurrency=1).complete([chat(i) for i in range(3)]))
    assert server.hits == 12  # the third was never sent


def test_rate_limit_waits_for_tokens():
    async def go() -> float:
        bucket = RateLimit(per_minute=600)  # 10 a second, 600 at once when full
        await bucket.take(600)
        start = time.monotonic()
        await bucket.take(5)
        return time.monotonic() - start

    assert 0.45 <= asyncio.run(go()) <= 3


@pytest.mark.parametrize("limit", [{"rpm": 60}, {"tpm": 60 * 20}])
def test_configured_rate_limits_pace_the_requests(server, store, limit):
    """A full bucket lets a minute's worth through at once; the rest wait for it to refill."""
    cfg = TeacherConfig(
        backend="openai",
        model="gpt-x",
        base_url=server.url,
        api_key_env=KEY_ENV,
        concurrency=64,
        **limit,
    )
    small = [Request.make(prompt=f"p{i}", sampling={"max_tokens": 19}) for i in range(62)]
    start = time.monotonic()  # 1 request and 20 tokens each: 60 at once, then one a second
    ask(Ledger(make_teacher(cfg), store, concurrency=64), *small)
    assert 1.6 <= time.monotonic() - start <= 6 and server.hits == 62


@pytest.mark.parametrize(
    "message",
    ["Invalid model name passed in model=gpt-x", "model 'gpt-x' not found, try pulling it first"],
)
def test_a_400_naming_an_unknown_model_says_so(message):
    teacher = OpenAITeacher("gpt-x", base_url="http://127.0.0.1:9/v1", api_key_env=None)
    response = httpx.Response(400, json={"error": {"message": message}})
    with pytest.raises(TeacherError, match="unknown model: check teacher.model"):
        teacher._check(response, "here")


# -- today's OpenAI models: reasoning models, refused fields, answers without text ---------------
SAMPLED = {"max_tokens": 10, "temperature": 0.7, "top_p": 0.5, "presence_penalty": 2.0}
# What a reasoning model answers with a 400 (as OpenAI does), and what the fault server imitates.
REASONING_REFUSES = {
    "temperature": "unsupported_value",
    "top_p": "unsupported_value",
    "presence_penalty": "unsupported_parameter",
    "frequency_penalty": "unsupported_parameter",
    "max_tokens": "unsupported_parameter",
}


def sampled_chat(i: int, **sampling) -> Request:
    return Request.make(
        messages=[{"role": "user", "content": f"task number {i}"}],
        sampling={**SAMPLED, **sampling},
    )


def test_a_reasoning_model_is_sent_only_what_it_takes(server, store):
    server.refuse = REASONING_REFUSES
    teacher = OpenAITeacher(
        "o4-mini", base_url=server.url, api_key_env=KEY_ENV, reasoning_effort="low"
    )
    result = ask(Ledger(teacher, store), sampled_chat(1, stop=["\n\n"]))
    assert result.completion.text == "echo: task number 1" and server.hits == 1
    assert server.requests[0]["body"] == {
        "model": "o4-mini",
        "messages": [{"role": "user", "content": "task number 1"}],
        "max_completion_tokens": 10,
        "reasoning_effort": "low",
        "stop": ["\n\n"],
    }
    # The ledger keys and stores the request as asked: the same key whatever was sent.
    [row] = rows(store)
    assert json.loads(row["body_json"])["sampling"]["temperature"] == 0.7
    assert row["key"] == sampled_chat(1, stop=["\n\n"]).key("openai", "o4-mini")


def test_an_unknown_model_that_refuses_fields_is_asked_again_without_them_for_the_run(
    server, store
):
    server.refuse = {
        "temperature": "unsupported_value",
        "max_tokens": "unsupported_parameter",
        "top_p": "unsupported_value",
    }
    teacher = OpenAITeacher("router/new-thinker", base_url=server.url, api_key_env=KEY_ENV)
    ledger = Ledger(teacher, store)
    first = ask(ledger, sampled_chat(0))
    # One 400 per refused field, each answered by sending the request again without it.
    assert server.hits == 4 and first.completion.text == "echo: task number 0"
    assert first.completion.raw["resent_without"] == ["temperature", "max_tokens", "top_p"]
    assert "max_completion_tokens" in server.requests[-1]["body"]
    [row] = rows(store)
    assert row["status"] == "done" and row["attempts"] == 1

    # The lessons hold for the run: the next requests go out right at once.
    ask(ledger, *(sampled_chat(i) for i in range(1, 4)))
    assert server.hits == 7
    for sent in server.requests[4:]:
        assert {"temperature", "top_p", "max_tokens"}.isdisjoint(sent["body"])
        assert sent["body"]["presence_penalty"] == 2.0  # never refused: still sent

    # A 400 about a field the request does not carry, or one no request goes without, is an
    # ordinary failure, not a lesson.
    def refusing(param: str) -> httpx.Response:
        return httpx.Response(400, json={"error": {"code": "unsupported_value", "param": param}})

    assert teacher.learn(refusing("logprobs"), {"model": "x"}) is None
    assert teacher.learn(refusing("messages"), {"model": "x", "messages": []}) is None
    # A model that takes neither name of the token limit is sent none.
    assert teacher.learn(refusing("max_completion_tokens"), {"max_completion_tokens": 1})
    assert {"max_tokens", "max_completion_tokens"}.isdisjoint(teacher._body(sampled_chat(9)))


def test_reasoning_tokens_are_counted_priced_and_kept(server, tmp_path):
    server.reasoning_tokens = 5
    price = Price(input=1.0, output=2.0)
    with Store(tmp_path / "run") as store:
        teacher = OpenAITeacher("o3", base_url=server.url, api_key_env=KEY_ENV)
        result = ask(Ledger(teacher, store, price=price), chat(1))  # max_tokens 10
        c = result.completion
        assert c.text == "echo: task number 1" and c.finish_reason == "stop"
        assert (c.tokens_in, c.tokens_out, c.reasoning_tokens) == (3, 4 + 5, 5)
        assert result.cost_usd == pytest.approx((3 * 1.0 + 9 * 2.0) / 1e6)  # billed as output
    with Store(tmp_path / "run") as store:  # from the store, as a rerun reads it
        again = ask(
            Ledger(OpenAITeacher("o3", base_url=server.url, api_key_env=KEY_ENV), store), chat(1)
        )
        assert again.cached and again.completion.reasoning_tokens == 5


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("refusal", "refusal"),
        ("filtered", "content_filter"),
        ("null", "null_content"),
        ("thinking", "length_empty"),  # the token limit ran out while the model thought
    ],
)
def test_an_answer_without_text_is_stored_with_its_reason(server, store, fault, reason):
    if fault == "thinking":
        server.reasoning_tokens = 50
    else:
        server.faults.append(fault)
    result = ask(Ledger(http_teacher(server), store), chat(1))
    assert (result.completion.text, result.completion.finish_reason) == ("", reason)
    assert reason in Completion.EMPTY_REASONS
    [row] = rows(store)
    assert (row["status"], row["text"], row["finish_reason"]) == ("done", "", reason)
    # What the server said is kept: the refusal's words, the filtered half answer.
    stored = json.loads(row["response_json"])["response"]["choices"][0]
    if fault == "refusal":
        assert stored["message"]["refusal"].startswith("I'm sorry")
    if fault == "filtered":
        assert stored["message"]["content"] == "echo: task"


def test_a_completion_with_null_text_says_so(server, store):
    server.faults.append("null")
    result = ask(Ledger(http_teacher(server), store), Request.make(prompt="go on"))
    assert (result.completion.text, result.completion.finish_reason) == ("", "null_content")


# -- answers without usage ------------------------------------------------------------------------
def byte_encoding():
    """A tiktoken encoding with one token per UTF-8 byte: tiktoken's own code, no download."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(
        name="bytes", pat_str=r"[\s\S]", mergeable_ranks=ranks, special_tokens={}
    )


def test_an_answer_without_usage_is_counted_with_the_model_tokenizer(server, store, monkeypatch):
    from tutelage.teachers import prices

    monkeypatch.setitem(prices._encodings, "o200k_base", byte_encoding())
    server.send_usage = False
    price = price_for("openai", "gpt-4o-mini", None)
    teacher = OpenAITeacher("gpt-4o-mini", base_url=server.url, api_key_env=KEY_ENV)
    result = ask(Ledger(teacher, store, price=price), chat(1))
    c = result.completion
    # One token a byte: the answer's 19 bytes; the message's role "user" (4) and content (13),
    # plus OpenAI's framing: 3 tokens a message, 3 for the answer's start.
    assert (c.tokens_in, c.tokens_out) == (4 + 13 + 3 + 3, len("echo: task number 1"))
    assert c.usage_estimated and result.cost_usd > 0
    [row] = rows(store)
    raw = json.loads(row["response_json"])
    assert raw["usage_estimated"] is True and raw["usage_counted_by"] == "tiktoken o200k_base"
    assert row["cost_usd"] == pytest.approx(result.cost_usd)


def test_without_usage_or_tokenizer_the_tokens_are_estimated(server, store, monkeypatch):
    from tutelage.teachers import prices

    def offline(name):
        raise OSError("no network")

    import tiktoken

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(prices, "_encodings", {})
    monkeypatch.setattr(prices, "_loaders", {})
    server.send_usage = False
    for model in ("gpt-4o-mini", "my-local-model"):  # tiktoken offline; a model it does not know
        teacher = OpenAITeacher(model, base_url=server.url, api_key_env=KEY_ENV)
        c = ask(Ledger(teacher, store), Request.make(prompt=f"{model} x" * 4)).completion
        assert c.usage_estimated and c.raw["usage_counted_by"] == "estimate: characters/4"
        assert c.tokens_out == -(-len(c.text) // 4) and c.tokens_in == -(
            -len(f"{model} x" * 4) // 4
        )
    assert prices._encodings["o200k_base"] is None  # tried once, then estimated for the run


def test_a_budget_needs_a_price_for_every_hosted_model():
    from tutelage.config import Config, ConfigError
    from tutelage.teachers.prices import require_price

    def config(**sections) -> Config:
        return Config.model_validate(sections)

    hosted = {"backend": "openai", "model": "my-finetune", "base_url": "http://127.0.0.1:9/v1"}
    require_price(config(teacher=hosted))  # no budget: nothing to protect
    with pytest.raises(ConfigError, match=r"^teacher\.price: .*'my-finetune'.*set teacher\.price"):
        require_price(config(teacher=hosted, generation={"budget_usd": 5}))
    priced = {**hosted, "price": {"input": 1, "output": 2}}
    require_price(config(teacher=priced, generation={"budget_usd": 5}))
    listed = {**hosted, "model": "gpt-4o-mini"}
    require_price(config(teacher=listed, generation={"budget_usd": 5}))
    require_price(config(generation={"budget_usd": 5}))  # the local embedded teacher costs $0
    with pytest.raises(ConfigError, match=r"^evaluation\.judge\.price: "):
        require_price(
            config(teacher=listed, generation={"budget_usd": 5}, evaluation={"judge": hosted})
        )
    with pytest.raises(ConfigError, match=r"^generation\.responder\.price: "):
        require_price(config(teacher=listed, generation={"budget_usd": 5, "responder": hosted}))


def test_a_teacher_used_from_two_event_loops_closes_each_session(server, store):
    teacher = http_teacher(server)
    ask(Ledger(teacher, store), chat(1))
    first = teacher._client
    assert first.closed  # closed as its loop ended, though nobody called aclose()
    ask(Ledger(teacher, store), chat(2))
    assert teacher._client is not first and teacher._client.closed


# -- budget -----------------------------------------------------------------------------------
# $0.1 per output token: a request may cost up to $1 (10 tokens) and costs $0.4 (4 tokens).
EXPENSIVE = Price(input=0.0, output=100_000.0)


def test_budget_stops_before_the_cap_then_a_higher_cap_goes_on(server, store):
    ledger = Ledger(http_teacher(server), store, price=EXPENSIVE, budget_usd=2.8)
    requests = [chat(i) for i in range(8)]

    async def until_budget() -> int:
        for n, r in enumerate(requests):
            try:
                await ledger.complete(r)
            except BudgetExceeded as e:
                assert "2.8" in str(e) and "generation.budget_usd" in str(e)
                return n
        return len(requests)

    # After 5 answers ($2.0) a sixth could cost $1 more: past $2.8, so it is not sent.
    assert asyncio.run(until_budget()) == 5
    assert server.hits == 5 and ledger.spent_usd == pytest.approx(2.0)
    assert store.request_totals()["requests"] == 5  # the refused request left no row

    more = Ledger(http_teacher(server), store, price=EXPENSIVE, budget_usd=10.0)
    results = ask(more, *requests)
    assert [r.cached for r in results] == [True] * 5 + [False] * 3
    assert server.hits == 8 and more.spent_usd == pytest.approx(3.2)


def test_budget_counts_requests_in_flight(server, store):
    server.delay_s = 0.05
    ledger = Ledger(http_teacher(server), store, price=EXPENSIVE, budget_usd=2.8, concurrency=8)
    with pytest.raises(BudgetExceeded):
        ask(ledger, *(chat(i) for i in range(8)))
    # Two in flight reserve $2; a third could pass $2.8. The two still finish and are stored.
    assert server.hits == 2
    assert [r["status"] for r in rows(store)] == ["done", "done"]


def test_prices():
    configured = price_for("openai", "gpt-4o-mini", Price(input=3.0, output=5.0))
    assert (configured.input, configured.output, configured.source) == (3.0, 5.0, "configured")
    local = price_for("llamacpp", "x.gguf", None)
    assert (local.input, local.output, local.warning) == (0, 0, None)
    listed = price_for("openai", "openai/gpt-4o-mini-2024-07-18", None)
    assert (listed.input, listed.output, listed.source) == (0.15, 0.60, "list")
    unknown = price_for("openai", "my-finetune", None)
    assert unknown.output == 0 and "set teacher.price" in unknown.warning


# -- batching for local backends ----------------------------------------------------------------
class BatchingTeacher:
    """Echoes each prompt; records the size of every batch it was given."""

    backend, model, max_batch = "fake", "fake-1", 4

    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    async def complete(self, requests):
        self.batches.append(len(requests))
        await asyncio.sleep(0.01)
        if self.fail:
            raise TeacherError("the fake teacher failed")
        return [Completion(f"re: {r.prompt}", "stop", 1, 2) for r in requests]

    async def aclose(self):
        pass


def test_concurrent_requests_are_batched_for_local_backends(store):
    teacher = BatchingTeacher()
    requests = [Request.make(prompt=f"p{i}") for i in range(10)]
    results = ask(Ledger(teacher, store, concurrency=8), *requests)
    assert [r.completion.text for r in results] == [f"re: p{i}" for i in range(10)]
    assert sum(teacher.batches) == 10 and max(teacher.batches) == 4 and len(teacher.batches) <= 4
    assert all(r["status"] == "done" for r in rows(store))


def test_a_failed_batch_fails_each_of_its_requests(store):
    with pytest.raises(TeacherError, match="the fake teacher failed"):
        ask(
            Ledger(BatchingTeacher(fail=True), store),
            *(Request.make(prompt=f"p{i}") for i in range(3)),
        )
    assert [(r["status"], r["error"]) for r in rows(store)] == [
        ("failed", "the fake teacher failed")
    ] * 3


# -- llama.cpp in-process, on the embedded teacher ------------------------------------------------
@pytest.fixture(scope="module")
def llama_teacher():
    return make_teacher(TeacherConfig(n_ctx=512))  # the default: llamacpp, embedded


def test_llamacpp_chat_and_completion_are_deterministic(llama_teacher, store):
    sampling = {"max_tokens": 16, "temperature": 0.8}
    chat_request = Request.make(
        messages=[{"role": "user", "content": "Name a fruit."}], sampling=sampling
    )
    prompt_request = Request.make(prompt="1. Write a poem about the sea.\n2.", sampling=sampling)
    ledger = Ledger(llama_teacher, store)
    a, b = (ask(ledger, r) for r in (chat_request, prompt_request))
    assert llama_teacher.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    for result in (a, b):
        c = result.completion
        assert c.text.strip() and c.finish_reason in ("stop", "length")
        assert c.tokens_in > 5 and 1 <= c.tokens_out <= 16
    # Asked again, after another request, each gives the same sampled answer.
    again = asyncio.run(llama_teacher.complete([chat_request, prompt_request]))
    assert [c.text for c in again] == [a.completion.text, b.completion.text]
    assert [c.tokens_out for c in again] == [a.completion.tokens_out, b.completion.tokens_out]


# -- transformers, on a tiny random model with the embedded teacher's tokenizer ------------------
@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
    import transformers as hf

    from tutelage.model_files import embedded_teacher_hf

    tokenizer = hf.AutoTokenizer.from_pretrained(embedded_teacher_hf())
    config = hf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_transformers_batched_equals_unbatched_greedy(tiny_hf_folder):
    from tutelage.teachers.hf import TransformersTeacher

    teacher = TransformersTeacher(tiny_hf_folder, max_batch=4)
    greedy = {"max_tokens": 8, "temperature": 0.0}
    requests = [
        Request.make(prompt="Hello", sampling=greedy),
        Request.make(
            prompt="A much longer prompt, so that the batch needs left padding", sampling=greedy
        ),
        Request.make(messages=[{"role": "user", "content": "Name a fruit."}], sampling=greedy),
    ]
    batched = asyncio.run(teacher.complete(requests))
    alone = [asyncio.run(teacher.complete([r]))[0] for r in requests]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.tokens_in for c in batched] == [c.tokens_in for c in alone]
    assert batched[1].tokens_in > batched[0].tokens_in  # padding is not counted
    for c in batched:
        assert c.text and 1 <= c.tokens_out <= 8
        assert (c.finish_reason == "length") == (c.tokens_out == 8)

    # A stop string taken from the answer ends it there, and is not part of it.
    text = batched[1].text
    stop = text[len(text) // 2 :][:3]
    [cut] = asyncio.run(
        teacher.complete(
            [Request.make(prompt=requests[1].prompt, sampling={**greedy, "stop": [stop]})]
        )
    )
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert cut.tokens_out < 8


def test_openai_penalties_follow_openai():
    from tutelage.teachers.hf import OpenAIPenalties

    scores = torch.zeros(1, 10)
    input_ids = torch.tensor([[9, 9, 5, 5, 7]])  # prompt of 2, then generated 5, 5, 7
    out = OpenAIPenalties(prompt_len=2, presence=0.5, frequency=0.25)(input_ids, scores)
    assert out[0, 5].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 7].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 9].item() == 0  # in the prompt only


# -- a real llama.cpp server through the OpenAI-compatible backend ---------------------------------
SERVER_MODULES = ["uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python[server] is not installed (missing {', '.join(missing)})")
    from tutelage.model_files import embedded_teacher_gguf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The server logs a lot: to a file, since an unread pipe would fill up and stall it.
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(embedded_teacher_gguf()),
            "--model_alias",
            "smollm2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "512",
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
        ],  # robust on a busy machine
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not start within 60 s")
            time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openai_backend_against_a_real_llama_cpp_server(llama_server, store, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    teacher = OpenAITeacher("smollm2", base_url=llama_server, timeout_s=60)
    ledger = Ledger(teacher, store)
    greedy = {"max_tokens": 8, "temperature": 0.0}
    results = ask(
        ledger,
        Request.make(messages=[{"role": "user", "content": "Name a fruit."}], sampling=greedy),
        Request.make(prompt="1. Write a poem about the sea.\n2.", sampling=greedy),
    )
    for r in results:
        c = r.completion
        assert c.text.strip() and c.finish_reason in ("stop", "length")
        assert c.tokens_in > 5 and 1 <= c.tokens_out <= 8
    assert ledger.requests_sent == 2 and store.request_totals()["done"] == 2


def test_embedded_teacher_falls_back_to_transformers_without_llama_cpp(monkeypatch):
    import importlib.util

    from tutelage import teachers
    from tutelage.config import TeacherConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real(name, *a),
    )
    with pytest.warns(UserWarning, match="runs on transformers"):
        teacher = teachers.make_teacher(TeacherConfig())
    assert teacher.backend == "transformers"
    with pytest.raises(teachers.TeacherError, match="needs llama-cpp-python"):
        teachers.make_teacher(TeacherConfig(model="/some/model.gguf"))


# -- cache hits, counted in the store -------------------------------------------------------------
def test_reruns_count_their_cache_hits_in_the_store(server, tmp_path):
    price = Price(input=1.0, output=1.0)
    with Store(tmp_path / "run") as store:
        first = Ledger(http_teacher(server), store, price=price)
        asyncio.run(first.complete_many([chat(0), chat(1)], "generate"))
        asyncio.run(first.complete_many([chat(2)], "judge"))
        totals = store.request_totals()
        assert (totals["cache_hits"], totals["saved_usd"]) == (0, 0)
    paid = totals["cost_usd"]

    for _ in range(2):  # two reruns, each a fresh process's store and ledger
        with Store(tmp_path / "run") as store:
            again = Ledger(http_teacher(server), store, price=price)
            asyncio.run(again.complete_many([chat(0), chat(1)], "generate"))
            asyncio.run(again.complete_many([chat(2)], "judge"))
            assert again.requests_sent == 0 and again.cache_hits == 3
    assert server.hits == 3  # nothing sent twice

    with Store(tmp_path / "run") as store:
        assert [r["cache_hits"] for r in rows(store)] == [2, 2, 2]
        totals = store.request_totals()
        assert totals["requests"] == totals["done"] == 3 and totals["cost_usd"] == paid
        assert totals["cache_hits"] == 6 and totals["saved_usd"] == pytest.approx(2 * paid)
        by_purpose = {r["purpose"]: r for r in store.request_totals_by_purpose()}
        assert {p: r["cache_hits"] for p, r in by_purpose.items()} == {"generate": 4, "judge": 2}
        judge = by_purpose["judge"]
        assert judge["saved_usd"] == pytest.approx(2 * judge["cost_usd"])


def test_a_request_asked_twice_at_once_counts_one_hit(server, store):
    ask(Ledger(http_teacher(server), store), chat(1), chat(1))
    assert server.hits == 1 and store.request_totals()["cache_hits"] == 1


def test_a_schema_2_store_gains_cache_hits(tmp_path):
    """A store as schema 2 wrote it (tests/data/schema2.db) counts cache hits once opened."""
    path = tmp_path / "tutelage.db"
    shutil.copy(Path(__file__).parent / "data" / "schema2.db", path)
    with sqlite3.connect(path) as old:
        old.execute(
            "INSERT INTO requests (key, backend, model, body_json, status, text, cost_usd,"
            " created_at) VALUES ('old', 'openai', 'gpt-test', '{}', 'done', 'an old answer',"
            " 0.5, 0)"
        )
    old.close()

    with Store(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] >= 3
        assert store.get_request("old")["cache_hits"] == 0
        before = store.request_totals()
        assert before["cache_hits"] == 0
        store.count_cache_hit("old")
        totals = store.request_totals()
        assert totals["cache_hits"] == 1
        assert totals["saved_usd"] == pytest.approx(before["saved_usd"] + 0.5)
    with Store(path) as store:  # reopening a migrated store changes nothing
        assert store.get_request("old")["cache_hits"] == 1
