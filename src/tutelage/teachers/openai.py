"""A teacher behind an OpenAI-compatible HTTP API: OpenAI itself, or any server that speaks it
(llama.cpp's server, vLLM, Ollama, routers).

Transient failures (429, 5xx, timeouts, dropped connections, garbled bodies) are retried with
exponential backoff and full jitter, honouring Retry-After; the others raise a TeacherError at once.
The API key is read from the environment variable the configuration names, sent only in the
Authorization header, and scrubbed from every message.

Reasoning models (o-series, gpt-5) take `max_completion_tokens` and refuse sampling fields: those
are not sent, and a model that refuses a field with a 400 (`unsupported_parameter` or
`unsupported_value`) is asked again without it, a lesson kept for the rest of the run. The ledger
keys a request as asked, not as sent. An answer without text (cut at the token limit before any,
filtered, refused, or null) comes back with empty text and a finish reason saying why
(`Completion.EMPTY_REASONS`); an answer without `usage` is counted here and marked as estimated.

The HTTP client is aiohttp: a quarter to a sixth of httpx's CPU per request (docs/benchmarks.md),
which is what limits a client at high concurrency against a fast server.
Batch mode (/v1/files + /v1/batches, half price within 24 hours) is
`openai_batch.OpenAIBatchTeacher`.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import yarl

from .base import Completion, Request, TeacherError
from .prices import (
    count_answer_tokens,
    count_prompt_tokens,
    estimate_prompt_tokens,
    load_tokenizer,
    max_output_tokens,
)
from .scoring import Scored, ScoreRequest, scored_from_prompt_logprobs, teacher_forcing

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0
HINTS = {
    400: "the server rejected the request",
    401: "check the API key",
    403: "the key has no access to this model or endpoint",
    404: "unknown model or wrong base_url",
}
# Reasoning models: o1, o3, o4-mini, gpt-5, gpt-5-mini, ... (not gpt-5-chat, a plain chat model).
REASONING_MODEL = re.compile(r"^(o\d|gpt-5(?!.*-chat))")
# What they refuse (OpenAI's reasoning guide); anything else they refuse is learnt from the 400.
REASONING_REFUSES = frozenset(
    {"max_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty"}
)
# The answer's token limit, by the names servers take, in order of preference.
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
# Never dropped, whatever a 400 says: without them there is no request.
ESSENTIAL_FIELDS = frozenset({"model", "messages", "prompt"})
# The error codes of a 400 that names one field (`param`) the model does not take.
REFUSED_FIELD = {"unsupported_parameter", "unsupported_value"}
# Servers that answer an unknown model with 400 rather than 404 (LiteLLM, some routers).
UNKNOWN_MODEL = re.compile(
    r"model.{0,80}(not found|does not exist|unknown|invalid)|"
    r"(unknown|invalid) model",
    re.IGNORECASE | re.DOTALL,
)
JSON_HEADERS = {"Content-Type": "application/json"}
# Scoring given answers (teachers.scoring) needs a vLLM server: its /tokenize, at the server's
# root, and its completions' prompt_logprobs. APIs known to give neither:
TOKENIZE = "/tokenize"
CHAT_ONLY_HOSTS = frozenset({"api.openai.com"})
SCORING_HINT = (
    "scoring given answers needs a vLLM server (its /tokenize and the completions' "
    "prompt_logprobs) or a local backend (llamacpp, transformers, vllm)"
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class APIError(TeacherError):
    """A request that failed for good, after `attempts` tries."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class Transient(Exception):
    """A failure that a retry may fix; `wait`: the server's Retry-After, if it gave one."""

    def __init__(self, problem: str, wait: float | None = None):
        super().__init__(problem)
        self.wait = wait


# What a retry may fix at the transport level: refused, dropped or cut connections, timeouts.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read whole. Its attribute names are httpx.Response's, so `_check` and
    `server_message` read either."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes
    reason_phrase: str = ""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class RateLimit:
    """A token bucket holding `per_minute` units, refilled continuously; `take` waits its turn."""

    def __init__(self, per_minute: float):
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.level = per_minute
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()  # first come, first served

    async def take(self, n: float) -> None:
        n = min(n, self.capacity)  # a request larger than the bucket waits for a full one
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.level >= n:
                    self.level -= n
                    return
                await asyncio.sleep((n - self.level) / self.rate)


def is_local(base_url: str) -> bool:
    """Loopback and private addresses: local servers, which need no key."""
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def proxy_for(base_url: str) -> str | None:
    """The proxy the environment names for this URL (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, less
    NO_PROXY), as httpx found it; none for a local server. Looked up once: aiohttp's trust_env
    would look again for every request, in a thread."""
    parts = urlsplit(base_url)
    if is_local(base_url) or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def ssl_context() -> ssl.SSLContext:
    """The system's certificates (SSL_CERT_FILE and SSL_CERT_DIR override them, through
    OpenSSL), plus certifi's bundle where it is installed, as httpx had it."""
    context = ssl.create_default_context()
    try:
        import certifi
    except ImportError:
        return context
    context.load_verify_locations(certifi.where())
    return context


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from Retry-After (seconds or an HTTP date) or retry-after-ms, if given."""
    if ms := headers.get("retry-after-ms"):
        try:
            return min(float(ms) / 1000, RETRY_AFTER_CAP_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def server_message(response: Reply) -> str:
    """The error message in an error response, in OpenAI's shape or another server's."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        if isinstance(error, dict):
            error = error.get("message") or error
        return str(error)[:300]
    return str(data)[:300]


def refused_field(response: Reply) -> str | None:
    """The field a 400 says the model does not take (OpenAI's `param`), if it says so."""
    if response.status_code != 400:
        return None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict) and error.get("code") in REFUSED_FIELD:
        param = error.get("param")
        return param if isinstance(param, str) else None
    return None


def answer_text(choice: dict, chat: bool) -> tuple[str, str]:
    """The answer's text and finish reason. An answer without text says why in its finish reason
    (Completion.EMPTY_REASONS), so that no caller takes it for an empty answer."""
    finish = choice.get("finish_reason") or "stop"
    message = choice["message"] if chat else choice
    text = message["content"] if chat else message["text"]
    if not isinstance(text, (str, type(None))):
        raise TypeError("the answer is not text")
    if chat and message.get("refusal"):  # a reasoning model's refusal: the text is in `refusal`
        return "", "refusal"
    if finish == "content_filter":  # a filtered answer, perhaps cut short: none of it is kept
        return "", "content_filter"
    if not text:
        if finish == "length":  # the token limit ran out first (a reasoning model's thinking)
            return "", "length_empty"
        if text is None:
            return "", "null_content"
    return text, finish


def first_top_logprobs(choice: dict, chat: bool) -> list[tuple[str, float]] | None:
    """The first answer token's top log-probs, most likely first, when the request asked for
    them: chat `logprobs.content[0].top_logprobs` ([{token, logprob}]), completions
    `logprobs.top_logprobs[0]` ({token: logprob}). None when the answer has none."""
    logprobs = choice.get("logprobs") or {}
    if chat:
        content = logprobs.get("content") or []
        first = content[0].get("top_logprobs") if content else None
        pairs = [(t["token"], float(t["logprob"])) for t in first or ()]
    else:
        tops = logprobs.get("top_logprobs") or []
        pairs = [(t, float(lp)) for t, lp in (tops[0] or {}).items()] if tops else []
    return sorted(pairs, key=lambda p: -p[1]) or None


class OpenAITeacher:
    backend = "openai"
    max_batch = 1  # each request is its own HTTP call; concurrency comes from the ledger

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        reasoning_effort: str | None = None,
    ):
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self._key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not self._key and not is_local(self.base_url):
            raise TeacherError(
                f"the environment variable {api_key_env} is not set: it must hold the API key for "
                f"{self.base_url} (teacher.api_key_env names the variable)"
            )
        self.concurrency, self.rpm, self.tpm = concurrency, rpm, tpm
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.reasoning_effort = reasoning_effort
        # The fields this model is known not to take, from its name and then from its 400s (the
        # lessons last as long as this teacher: one run).
        reasoning = bool(REASONING_MODEL.match(model.rsplit("/", 1)[-1].lower()))
        self.refused: set[str] = set(REASONING_REFUSES) if reasoning else set()
        self._urls: dict[str, yarl.URL] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: aiohttp.ClientSession
        self._closer: asyncio.Task
        self._slots: asyncio.Semaphore
        self._rpm: RateLimit | None
        self._tpm: RateLimit | None

    # -- the HTTP session -------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        """The session, semaphore and rate limits belong to one event loop; a teacher used from a
        new loop (a second asyncio.run) gets fresh ones."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            self._client = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(
                    limit=self.concurrency, ssl=ssl_context(), ttl_dns_cache=300
                ),
                # Per connection attempt and per read, as httpx counted: a long answer is fine as
                # long as the server is not silent for timeout_s.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s
                ),
                cookie_jar=aiohttp.DummyCookieJar(),  # an API sets no cookie worth keeping
                proxy=proxy_for(self.base_url),
            )
            self._closer = loop.create_task(self._close_with_loop(self._client))
            self._slots = asyncio.Semaphore(self.concurrency)
            self._rpm = RateLimit(self.rpm) if self.rpm else None
            self._tpm = RateLimit(self.tpm) if self.tpm else None
            self._loop = loop
        return self._client

    @staticmethod
    async def _close_with_loop(session: aiohttp.ClientSession) -> None:
        """Waits until cancelled, then closes `session`: asyncio.run cancels what is left when
        its loop ends, so a caller that never calls aclose() leaves no open connection behind."""
        try:
            await asyncio.Event().wait()
        finally:
            await session.close()

    def url(self, path: str) -> yarl.URL:
        """base_url/path, parsed once. A path starting with "/" is from the server's root, the
        base_url less its /v1 (where vLLM serves /tokenize)."""
        if (url := self._urls.get(path)) is None:
            if path.startswith("/"):
                root = self.base_url.removesuffix("/v1")
                url = self._urls[path] = yarl.URL(f"{root}{path}")
            else:
                url = self._urls[path] = yarl.URL(f"{self.base_url}/{path}")
        return url

    async def call(self, method: str, path: str, **options: Any) -> Reply:
        """One HTTP call, its answer read whole. Transport failures raise (TRANSPORT_ERRORS)."""
        async with self._session().request(method, self.url(path), **options) as response:
            body = await response.read()
            return Reply(response.status, response.headers, body, response.reason or "")

    async def post_json(self, path: str, body: dict) -> Reply:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return await self.call("POST", path, data=data, headers=JSON_HEADERS)

    # -- requests ---------------------------------------------------------------------------------
    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """Answers in request order. Many requests go through `concurrency` workers, each of
        which sends its next request as soon as it has handled an answer: a task per request
        waiting on a semaphore would wake a loop turn later, after every answer that came with
        this one, and at a fixed latency the whole round would then go out again as one burst.
        After a failure no new request starts; those in flight finish, then the first error
        raises."""
        if len(requests) == 1:  # the ledger's way: no workers for one
            return [await self._complete_one(requests[0])]
        answers: list[Completion | None] = [None] * len(requests)
        todo = iter(enumerate(requests))
        failed = False

        async def worker() -> None:
            nonlocal failed
            for i, request in todo:
                if failed:
                    return
                try:
                    answers[i] = await self._complete_one(request)
                except BaseException:
                    failed = True
                    raise

        workers = min(self.concurrency, len(requests))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return answers  # type: ignore[return-value]  # every one set: no worker failed

    def endpoint_path(self, request: Request) -> str:
        return "chat/completions" if request.is_chat else "completions"

    def _body(self, request: Request) -> dict:
        """What is sent for `request`: its parameters, less what this model refuses."""
        body = {"model": self.model, **request.params()}  # our sampling names are OpenAI's
        if not body.get("stop"):
            body.pop("stop", None)
        if self.reasoning_effort:
            body["reasoning_effort"] = self.reasoning_effort
        if (limit := body.pop("max_tokens", None)) is not None:
            # Under the first name the model takes: a refused limit is renamed, not dropped.
            for name in LIMIT_FIELDS:
                if name not in self.refused:
                    body[name] = limit
                    break
        if request.top_logprobs:  # OpenAI's and vLLM's servers; chat allows up to 20
            if request.is_chat:
                body.update(logprobs=True, top_logprobs=request.top_logprobs)
            else:
                body["logprobs"] = request.top_logprobs
        for name in self.refused.intersection(body):
            del body[name]
        if request.is_chat:
            body["messages"] = request.message_dicts()
        else:
            body["prompt"] = request.prompt
        return body

    def learn(self, response: Reply, body: dict) -> str | None:
        """A 400 refusing a field that `body` carries: remember not to send it (max_tokens: send
        max_completion_tokens instead) and return its name; else None."""
        name = refused_field(response)
        if name is None or name not in body or name in ESSENTIAL_FIELDS:
            return None
        self.refused.add(name)
        log.warning(
            "%s refused %s (%s): sending it without from now on",
            self.model,
            name,
            self._scrub(server_message(response)),
        )
        return name

    async def _complete_one(self, request: Request) -> Completion:
        path = self.endpoint_path(request)
        where = f"{self.base_url}/{path} ({self.model})"
        resent: list[str] = []  # fields the model refused, each sent once more without

        async def send(attempt: int) -> Completion:
            while True:
                body = self._body(request)
                response = await self.post_json(path, body)
                if not response.is_success and (refused := self.learn(response, body)):
                    resent.append(refused)  # a finite body: this loop ends
                    continue
                self._check(response, where, attempt)
                try:
                    data = response.json()
                    if not isinstance(data, dict):
                        raise TypeError("not an object")
                except (ValueError, TypeError):
                    raise Transient("malformed response body") from None
                if not data.get("usage"):
                    await load_tokenizer(self.model)  # to count the tokens; once per process
                try:
                    return self._completion(data, request.is_chat, attempt, body, resent)
                except (ValueError, LookupError, TypeError, AttributeError):
                    raise Transient("malformed response body") from None

        tokens = 0
        if self.tpm:  # as OpenAI counts a request against the limit
            tokens = estimate_prompt_tokens(request) + max_output_tokens(request)
        self._session()
        async with self._slots:
            return await self.with_retries(send, where, tokens=tokens)

    async def with_retries(
        self, send: Callable[[int], Awaitable[T]], where: str, *, tokens: int = 0
    ) -> T:
        """`await send(attempt)` until it returns, retrying what a retry may fix: transport
        failures and `Transient` (raised by `_check` for 429/5xx, or by `send` for a garbled body).
        Every attempt waits its turn in the requests- and tokens-per-minute limits."""
        self._session()
        attempt = 0
        while True:
            attempt += 1
            if self._rpm:
                await self._rpm.take(1)
            if self._tpm and tokens:
                await self._tpm.take(tokens)
            try:
                return await send(attempt)
            except TRANSPORT_ERRORS as e:  # timeouts, refused and dropped connections
                problem, wait = type(e).__name__ + (f": {e}" if str(e) else ""), None
            except Transient as e:
                problem, wait = str(e), e.wait
            problem = self._scrub(problem)
            if attempt > self.max_retries:
                message = f"{where}: gave up after {attempt} attempts; last: {problem}"
                raise APIError(message, attempt)
            if wait is None:  # exponential backoff with full jitter
                wait = random.uniform(0, min(BACKOFF_CAP_S, self.backoff_s * 2**attempt / 2))
            log.warning("%s: %s; retry %d in %.1fs", where, problem, attempt, wait)
            await asyncio.sleep(wait)

    def _check(self, response: Reply, where: str, attempt: int = 1) -> None:
        """Return on success; raise Transient for what a retry may fix, else APIError."""
        if response.is_success:
            return
        problem = self._scrub(f"HTTP {response.status_code}: {server_message(response)}")
        if self._retryable(response):
            raise Transient(problem, retry_after(response.headers))
        hint = HINTS.get(response.status_code, "")
        if response.status_code == 400 and UNKNOWN_MODEL.search(problem):
            hint = "unknown model: check teacher.model"  # how several servers say a 404
        if response.status_code == 401 and self.api_key_env:
            hint += f" in ${self.api_key_env}"
        raise APIError(f"{where}: {problem}" + (f" ({hint})" if hint else ""), attempt)

    @staticmethod
    def _retryable(response: Reply) -> bool:
        if response.status_code == 429:
            # OpenAI says 429 for an exhausted quota too: no wait will fix that.
            return "insufficient_quota" not in response.text
        return response.status_code in (408, 409) or response.status_code >= 500

    def _completion(
        self,
        data: dict,
        chat: bool,
        attempts: int,
        body: dict | None = None,
        resent: Sequence[str] = (),
    ) -> Completion:
        """The Completion in an answer body. `body`: the request as sent, to count its prompt
        when the answer has no usage."""
        text, finish = answer_text(data["choices"][0], chat)
        raw: dict = {"attempts": attempts, "response": data}
        if resent:
            raw["resent_without"] = list(resent)
        usage = data.get("usage")
        if usage:
            tokens_in = usage.get("prompt_tokens") or 0
            tokens_out = usage.get("completion_tokens") or 0
            details = usage.get("completion_tokens_details") or {}
            reasoning = details.get("reasoning_tokens") or 0
            # OpenAI counts reasoning in completion_tokens (billed as output). A server whose
            # reasoning count exceeds it must have left it out: add it, or it is paid unseen.
            if reasoning > tokens_out:
                tokens_out += reasoning
            estimated = False
        else:
            # No usage: count what can be seen (the prompt, the answer) with the model's
            # tokenizer, or estimate it; hidden reasoning tokens cannot be counted at all.
            tokens_in, _ = count_prompt_tokens(self.model, body or {})
            tokens_out, method = count_answer_tokens(self.model, text)
            reasoning, estimated = 0, True
            raw["usage_counted_by"] = method
        if reasoning:
            raw["reasoning_tokens"] = reasoning
        if estimated:
            raw["usage_estimated"] = True
        return Completion(
            text,
            finish,
            tokens_in,
            tokens_out,
            raw=raw,
            reasoning_tokens=reasoning,
            usage_estimated=estimated,
            top_logprobs=first_top_logprobs(data["choices"][0], chat),
        )

    def _scrub(self, text: str) -> str:
        """Servers may echo the key in an error message; it must not go further."""
        return text.replace(self._key, "[key]") if self._key else text

    # -- teacher forcing against a vLLM server (the capture stage; see teachers.scoring) ---------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[Scored]:
        """Each request tokenized by the server itself (/tokenize, in the model's own chat
        template), then read back through the completions endpoint as token ids with
        `prompt_logprobs` (vLLM's extension: at every position, the k most likely tokens and the
        token itself, as {token id: {logprob, rank, decoded_token}}, None first) and `echo`,
        generating one token."""
        if urlsplit(self.base_url).hostname in CHAT_ONLY_HOSTS:
            raise TeacherError(
                f"teacher.base_url: {self.base_url} is a chat-only API that gives no prompt "
                f"log-probs, which training.distill needs; {SCORING_HINT}"
            )
        return list(await asyncio.gather(*(self._score_one(r) for r in requests)))

    async def _score_one(self, request: ScoreRequest) -> Scored:
        loop = asyncio.get_running_loop()

        def tokenize(body: dict) -> list[int]:  # called from the worker thread below
            body = {"model": self.model, "add_special_tokens": False, **body}
            return asyncio.run_coroutine_threadsafe(self._tokenize(body), loop).result()

        def encode_chat(messages: list[dict], header: bool) -> list[int]:
            return tokenize({"messages": messages, "add_generation_prompt": header})

        def encode_text(text: str) -> list[int]:
            return tokenize({"prompt": text})

        forcing = await asyncio.to_thread(teacher_forcing, request, encode_chat, encode_text)
        where = f"{self.base_url}/completions ({self.model})"
        body = {
            "model": self.model,
            "prompt": forcing.ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "prompt_logprobs": request.top_k,
            "return_token_ids": True,  # prompt_token_ids, to check what the server read
        }
        data = await self._post_for_json("completions", body, where)
        try:
            choice = data["choices"][0]
        except (LookupError, TypeError):
            raise TeacherError(f"{where}: an answer without choices") from None
        if not choice.get("prompt_logprobs"):
            raise TeacherError(f"{where}: the answer has no prompt_logprobs; {SCORING_HINT}")
        read = choice.get("prompt_token_ids")
        if read is not None and list(read) != forcing.ids:
            raise TeacherError(f"{where}: the server read other tokens than it was sent")
        scored = scored_from_prompt_logprobs(
            forcing, choice["prompt_logprobs"], request.top_k, where
        )
        scored.tokens_in = (data.get("usage") or {}).get("prompt_tokens") or len(forcing.ids)
        return scored

    async def _tokenize(self, body: dict) -> list[int]:
        where = f"{self.url(TOKENIZE)} ({self.model})"
        data = await self._post_for_json(TOKENIZE, body, where)
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise TeacherError(f"{where}: an answer without tokens; {SCORING_HINT}")
        return tokens

    async def _post_for_json(self, path: str, body: dict, where: str) -> dict:
        """POST `body`, retried as every request is; the answer's JSON object."""

        async def send(attempt: int) -> dict:
            response = await self.post_json(path, body)
            if response.status_code == 404:  # no such endpoint: not a vLLM server
                raise APIError(f"{where}: HTTP 404; {SCORING_HINT}", attempt)
            self._check(response, where, attempt)
            try:
                data = response.json()
            except ValueError:
                raise Transient("malformed response body") from None
            if not isinstance(data, dict):
                raise Transient("malformed response body")
            return data

        self._session()
        async with self._slots:
            return await self.with_retries(send, where)

    async def aclose(self) -> None:
        if self._loop is not None:
            self._closer.cancel()
            await self._client.close()
            self._loop = None
