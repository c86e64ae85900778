"""A teacher behind an OpenAI-compatible HTTP API: OpenAI itself, or any server that speaks it
(llama.cpp's server, vLLM, Ollama, routers).

Transient failures (429, 5xx, timeouts, dropped connections, garbled bodies) are retried with
exponential backoff and full jitter, honouring Retry-After; the others raise a TeacherError at once.
The API key is read from the environment variable the configuration names, sent only in the
Authorization header, and scrubbed from every message.
Batch mode (/v1/files + /v1/batches, half price within 24 hours) is `openai_batch.OpenAIBatchTeacher`.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import math
import os
import random
import re
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import httpx

from .base import Completion, Request, TeacherError
from .prices import estimate_prompt_tokens, max_output_tokens

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0
LANE_SIZE = 4  # connections per httpcore pool (see LaneTransport)
HINTS = {
    400: "the server rejected the request",
    401: "check the API key",
    403: "the key has no access to this model or endpoint",
    404: "unknown model or wrong base_url",
}
# Reasoning models take max_completion_tokens and reject max_tokens.
REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")
# Servers that answer an unknown model with 400 rather than 404 (LiteLLM, some routers).
UNKNOWN_MODEL = re.compile(
    r"model.{0,80}(not found|does not exist|unknown|invalid)|"
    r"(unknown|invalid) model",
    re.IGNORECASE | re.DOTALL,
)

log = logging.getLogger(__name__)


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


class _CountedStream(httpx.AsyncByteStream):
    """A response body that tells its lane when it is done with."""

    def __init__(self, stream: httpx.AsyncByteStream, done):
        self._stream, self._done = stream, done

    async def __aiter__(self):
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._done()


class LaneTransport(httpx.AsyncBaseTransport):
    """Connections split over small pools ("lanes"), each request to the least busy lane.

    Why: httpcore's pool scans every connection at each request's start and end (with syscalls),
    so one pool of 256 connections cost 18 ms of CPU per request in bench/teachers.py and capped
    the client at about 60 requests/s; lanes of 4 cost under 1 ms.
    """

    def __init__(self, connections: int, per_lane: int = LANE_SIZE):
        n = max(1, math.ceil(connections / per_lane))
        ssl_context = httpx.create_ssl_context()  # one for all lanes: each takes ~30 ms to make
        limits = httpx.Limits(max_connections=math.ceil(connections / n))
        self.lanes = [httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits) for _ in range(n)]
        self.busy = [0] * n

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = min(range(len(self.lanes)), key=self.busy.__getitem__)
        self.busy[i] += 1

        def done() -> None:
            self.busy[i] -= 1

        try:
            response = await self.lanes[i].handle_async_request(request)
        except BaseException:
            done()
            raise
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedStream(response.stream, done),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        for lane in self.lanes:
            await lane.aclose()


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
    host = httpx.URL(base_url).host
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def retry_after(headers: httpx.Headers) -> float | None:
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


def server_message(response: httpx.Response) -> str:
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient
        self._slots: asyncio.Semaphore
        self._rpm: RateLimit | None
        self._tpm: RateLimit | None

    def _session(self) -> httpx.AsyncClient:
        """The client, semaphore and rate limits belong to one event loop; a teacher used from a
        new loop (a second asyncio.run) gets fresh ones."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=self.timeout_s,
                transport=LaneTransport(self.concurrency),
            )
            self._slots = asyncio.Semaphore(self.concurrency)
            self._rpm = RateLimit(self.rpm) if self.rpm else None
            self._tpm = RateLimit(self.tpm) if self.tpm else None
            self._loop = loop
        return self._client

    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        return list(await asyncio.gather(*(self._complete_one(r) for r in requests)))

    def _body(self, request: Request) -> tuple[str, dict]:
        body = {"model": self.model, **request.params()}  # our sampling names are OpenAI's
        if not body.get("stop"):
            body.pop("stop", None)
        if REASONING_MODEL.match(self.model) and "max_tokens" in body:
            body["max_completion_tokens"] = body.pop("max_tokens")
        if request.is_chat:
            return "chat/completions", {**body, "messages": request.message_dicts()}
        return "completions", {**body, "prompt": request.prompt}

    async def _complete_one(self, request: Request) -> Completion:
        path, body = self._body(request)
        tokens = estimate_prompt_tokens(request) + max_output_tokens(request)  # as OpenAI counts

        async def send(client: httpx.AsyncClient, attempt: int) -> Completion:
            response = await client.post(path, json=body)
            self._check(response, where, attempt)
            try:
                return self._completion(response.json(), request.is_chat, attempt)
            except (ValueError, LookupError, TypeError, AttributeError):
                raise Transient("malformed response body") from None

        where = f"{self.base_url}/{path} ({self.model})"
        self._session()
        async with self._slots:
            return await self.with_retries(send, where, tokens=tokens)

    async def with_retries(self, send, where: str, *, tokens: int = 0):
        """`await send(client, attempt)` until it returns, retrying what a retry may fix: transport
        failures and `Transient` (raised by `_check` for 429/5xx, or by `send` for a garbled body).
        Every attempt waits its turn in the requests- and tokens-per-minute limits."""
        client = self._session()
        attempt = 0
        while True:
            attempt += 1
            if self._rpm:
                await self._rpm.take(1)
            if self._tpm and tokens:
                await self._tpm.take(tokens)
            try:
                return await send(client, attempt)
            except httpx.TransportError as e:  # timeouts, refused and dropped connections
                problem, wait = type(e).__name__ + (f": {e}" if str(e) else ""), None
            except Transient as e:
                problem, wait = str(e), e.wait
            if attempt > self.max_retries:
                raise APIError(
                    self._scrub(f"{where}: gave up after {attempt} attempts; last: {problem}"),
                    attempt,
                )
            if wait is None:  # exponential backoff with full jitter
                wait = random.uniform(0, min(BACKOFF_CAP_S, self.backoff_s * 2**attempt / 2))
            log.warning("%s: %s; retry %d in %.1fs", where, problem, attempt, wait)
            await asyncio.sleep(wait)

    def _check(self, response: httpx.Response, where: str, attempt: int = 1) -> None:
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
    def _retryable(response: httpx.Response) -> bool:
        if response.status_code == 429:
            # OpenAI says 429 for an exhausted quota too: no wait will fix that.
            return "insufficient_quota" not in response.text
        return response.status_code in (408, 409) or response.status_code >= 500

    def _completion(self, data: dict, chat: bool, attempts: int) -> Completion:
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        if not isinstance(text, (str, type(None))):
            raise TypeError("the answer is not text")
        usage = data.get("usage") or {}
        return Completion(
            text or "",
            choice.get("finish_reason") or "stop",
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            raw={"attempts": attempts, "response": data},
        )

    def _scrub(self, text: str) -> str:
        """Servers may echo the key in an error message; it must not go further."""
        return text.replace(self._key, "[key]") if self._key else text

    async def aclose(self) -> None:
        if self._loop is not None:
            await self._client.aclose()
            self._loop = None
