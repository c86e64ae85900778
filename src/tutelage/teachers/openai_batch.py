"""OpenAI's Batch API as a teacher: the same requests as `openai`, at about half the price, answered
within 24 hours instead of seconds.

A remote batch goes through three steps, each an ordinary HTTP call with the online backend's
retries: submit (upload a JSONL file to /v1/files, create /v1/batches), poll (/v1/batches/{id}
until it ends), collect (download the output and error files). The ledger records the batch id
on every request it carries as soon as the batch exists, so a run killed while a batch is pending
polls that batch again when it restarts instead of paying for a second one. A batch is also tagged
with a fingerprint of its requests and its attempt number: if the run dies between creating it and
recording its id, the restart finds it among the account's batches (paging back through them).

A rerun asks again for what failed. Requests that failed together (lines of a batch, or a whole
batch that failed, expired or was cancelled) go in a new batch, attempt 2, 3, ...; once a set of
requests has failed in `max_retries` batches, the latest one's errors are the answer: stored as
failed, not paid for again.

Answers keep the online backend's name ("openai") in the ledger key: a run may switch between
online and batch mode and reuse every stored answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp

from .base import Completion, Request
from .openai import APIError, OpenAITeacher, Reply, Transient, server_message
from .prices import load_tokenizer

LIVE = {"validating", "in_progress", "finalizing", "cancelling"}  # will end by itself
ENDED = {"completed", "failed", "expired", "cancelled"}
# OpenAI's limits for one batch input file.
MAX_REQUESTS_PER_BATCH = 50_000
COMPLETION_WINDOW = "24h"
METADATA_KEY = "tutelage_requests"  # the fingerprint of the requests a batch carries
ATTEMPT_KEY = "tutelage_attempt"  # which try at those requests it is: "2", "3", ... (none: 1)
LIST_PAGE = 100  # the most /v1/batches gives at once
# Paging back through the account's batches stops at batches older than this: a batch's results
# are gone from OpenAI's storage after 30 days anyway.
LOOKBACK_S = 30 * 86_400

log = logging.getLogger(__name__)


def fingerprint(custom_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(custom_ids)).encode()).hexdigest()[:32]


def tag_metadata(tag: str, attempt: int) -> dict[str, str]:
    """A batch's tag: the fingerprint of its requests and, from the second try on, the attempt
    (OpenAI's metadata values are strings)."""
    return {METADATA_KEY: tag, **({ATTEMPT_KEY: str(attempt)} if attempt > 1 else {})}


def attempt_of(batch: dict) -> int:
    """The attempt number a batch's tag carries: 1 when it carries none."""
    try:
        return max(1, int((batch.get("metadata") or {}).get(ATTEMPT_KEY, 1)))
    except (TypeError, ValueError):
        return 1


class OpenAIBatchTeacher(OpenAITeacher):
    remote = True  # answers come back in remote batches: the ledger submits and polls them

    def __init__(self, model: str, *, batch_size: int = 1000, poll_s: float = 30.0, **online):
        super().__init__(model, **online)
        self.max_batch = min(batch_size, MAX_REQUESTS_PER_BATCH)
        self.poll_s = poll_s

    @property
    def max_attempts(self) -> int:
        """Batches a set of requests may fail in before its errors are final."""
        return max(1, self.max_retries)

    # -- the protocol, for callers without a ledger ---------------------------------------------
    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """Submit, wait and collect; raises the first failed request's error."""
        out: list[Completion | None] = [None] * len(requests)
        for endpoint in {self.endpoint(r) for r in requests}:
            index = {f"r{i}": i for i, r in enumerate(requests) if self.endpoint(r) == endpoint}
            ids = list(index)
            batch = await self.submit([requests[index[i]] for i in ids], ids)
            results = await self.collect(await self.wait(batch["id"]), ids)
            for custom_id, answer in results.items():
                if isinstance(answer, Exception):
                    raise answer
                out[index[custom_id]] = answer
        return out  # type: ignore[return-value]

    # -- submit, poll, collect -------------------------------------------------------------------
    def endpoint(self, request: Request) -> str:
        return "/v1/" + self.endpoint_path(request)

    async def submit(self, requests: Sequence[Request], custom_ids: Sequence[str]) -> dict:
        """Create one remote batch for requests that share an endpoint; returns the batch object.

        The newest batch already tagged with these requests is returned instead when it is still
        running, holds answers to them (it was never collected), or is the last try allowed;
        after a batch where they all failed, a new one goes out as the next attempt."""
        endpoints = {self.endpoint(r) for r in requests}
        if len(endpoints) != 1:
            raise ValueError("one remote batch holds requests for one endpoint")
        endpoint = endpoints.pop()
        tag = fingerprint(custom_ids)
        attempt = 1
        if (latest := await self.find(tag)) is not None:
            if await self._reusable(latest, custom_ids):
                log.info(
                    "batch %s (%s) already carries these %d requests: collecting it",
                    latest["id"],
                    latest.get("status"),
                    len(requests),
                )
                return latest
            attempt = attempt_of(latest) + 1
            log.info(
                "batch %s ended %s without answering these %d requests: attempt %d of %d",
                latest["id"],
                latest.get("status"),
                len(requests),
                attempt,
                self.max_attempts,
            )
        lines = [
            json.dumps(
                {"custom_id": cid, "method": "POST", "url": endpoint, "body": self._body(r)},
                ensure_ascii=False,
            )
            for r, cid in zip(requests, custom_ids, strict=True)
        ]
        payload = ("\n".join(lines) + "\n").encode("utf-8")

        async def upload(attempt_no: int) -> str:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field(
                "file",
                payload,
                filename=f"tutelage-{tag}-{attempt}.jsonl",
                content_type="application/jsonl",
            )
            response = await self.call("POST", "files", data=form)
            self._check(response, f"{self.base_url}/files", attempt_no)
            return self._json(response)["id"]

        file_id = await self.with_retries(upload, f"{self.base_url}/files")

        async def create(attempt_no: int) -> dict:
            # A retry after a lost answer must not start a second batch: look for the first.
            found = await self.find(tag) if attempt_no > 1 else None
            if found and attempt_of(found) == attempt and found.get("input_file_id") == file_id:
                return found
            response = await self.post_json(
                "batches",
                {
                    "input_file_id": file_id,
                    "endpoint": endpoint,
                    "completion_window": COMPLETION_WINDOW,
                    "metadata": tag_metadata(tag, attempt),
                },
            )
            self._check(response, f"{self.base_url}/batches", attempt_no)
            return self._json(response)

        batch = await self.with_retries(create, f"{self.base_url}/batches")
        log.info(
            "submitted batch %s: %d requests to %s (attempt %d)",
            batch["id"],
            len(requests),
            endpoint,
            attempt,
        )
        return batch

    async def _reusable(self, batch: dict, custom_ids: Sequence[str]) -> bool:
        """Whether `batch`, the newest tagged with these requests, is theirs to collect."""
        if batch.get("status") in LIVE:
            return True  # it will end by itself: wait for it
        if attempt_of(batch) >= self.max_attempts:
            return True  # the last try allowed: its errors are final
        if not batch.get("output_file_id"):
            return False
        # The ledger asks only for requests it has no answer to: if this batch answered one of
        # them, the run stopped before collecting it (a free answer), else they all failed there.
        wanted = set(custom_ids)
        for line in (await self._file_text(batch["output_file_id"])).splitlines():
            if line.strip():
                row = json.loads(line)
                ok = (row.get("response") or {}).get("status_code") == 200
                if ok and row.get("custom_id") in wanted and not row.get("error"):
                    return True
        return False

    async def find(self, tag: str) -> dict | None:
        """The newest batch tagged `tag`, whatever its status, paging back through the account's
        batches (newest first) until there are no more or they are older than LOOKBACK_S."""

        async def page(after: str | None) -> dict:
            params = {"limit": LIST_PAGE, **({"after": after} if after else {})}

            async def listing(attempt_no: int) -> dict:
                response = await self.call("GET", "batches", params=params)
                self._check(response, f"{self.base_url}/batches", attempt_no)
                return self._json(response)

            return await self.with_retries(listing, f"{self.base_url}/batches")

        oldest = time.time() - LOOKBACK_S
        after = None
        while True:
            listed = await page(after)
            batches = listed.get("data") or []
            for batch in batches:
                if (batch.get("metadata") or {}).get(METADATA_KEY) == tag:
                    return batch
            if not listed.get("has_more") or not batches:
                return None
            if (batches[-1].get("created_at") or oldest) < oldest:
                return None
            after = listed.get("last_id") or batches[-1]["id"]

    async def status(self, batch_id: str) -> dict:
        async def get(attempt_no: int) -> dict:
            response = await self.call("GET", f"batches/{batch_id}")
            self._check(response, f"{self.base_url}/batches/{batch_id}", attempt_no)
            return self._json(response)

        return await self.with_retries(get, f"{self.base_url}/batches/{batch_id}")

    async def wait(self, batch_id: str, on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the batch ends (through finalizing, or cancelling); returns its final
        batch object."""
        last = None
        while True:
            batch = await self.status(batch_id)
            if on_update and (batch.get("status"), batch.get("request_counts")) != last:
                on_update(batch)
            last = (batch.get("status"), batch.get("request_counts"))
            if batch.get("status") in ENDED:
                return batch
            await asyncio.sleep(self.poll_s)

    async def collect(self, batch: dict, custom_ids: Sequence[str]) -> dict:
        """custom_id -> Completion, or an APIError for a request the batch did not answer. The
        error's `attempts` is the batch's attempt number; at the last one it says so."""
        where = f"batch {batch['id']}"
        attempt = attempt_of(batch)
        chat = str(batch.get("endpoint", "")).endswith("chat/completions")
        rows: list[dict] = []
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                text = await self._file_text(file_id)
                rows += [json.loads(line) for line in text.splitlines() if line.strip()]
        bodies: dict[str, dict] = {}
        if any(not ((r.get("response") or {}).get("body") or {}).get("usage") for r in rows):
            await load_tokenizer(self.model)  # answers without usage are counted here
            bodies = await self._input_bodies(batch)
        final = ""
        if attempt >= self.max_attempts:
            final = f" (failed in {attempt} batches, teacher.max_retries: not sent again)"
        results: dict[str, Completion | APIError] = {}
        for row in rows:
            answer = self._answer(row, batch["id"], chat, attempt, bodies.get(row["custom_id"]))
            if isinstance(answer, APIError) and final:
                answer = APIError(str(answer) + final, attempt)
            results[row["custom_id"]] = answer
        problem = f"the batch ended {batch.get('status')} without answering this request"
        if errors := (batch.get("errors") or {}).get("data"):
            problem += ": " + "; ".join(str(e.get("message", e)) for e in errors[:3])
        for cid in custom_ids:
            results.setdefault(cid, APIError(self._scrub(f"{where}: {problem}{final}"), attempt))
        return {cid: results[cid] for cid in custom_ids}

    async def _input_bodies(self, batch: dict) -> dict[str, dict]:
        """custom_id -> the request body the batch sent (to count prompts without usage)."""
        if not batch.get("input_file_id"):
            return {}
        text = await self._file_text(batch["input_file_id"])
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {row["custom_id"]: row.get("body") or {} for row in rows}

    def _answer(
        self, row: dict, batch_id: str, chat: bool, attempt: int, body: dict | None = None
    ) -> Completion | APIError:
        where = f"batch {batch_id}"
        response = row.get("response") or {}
        answer = response.get("body") or {}
        if response.get("status_code") == 200 and not row.get("error"):
            try:
                completion = self._completion(answer, chat, 1, body)
            except (LookupError, TypeError, AttributeError, ValueError):
                return APIError(f"{where}: a malformed answer for {row['custom_id']}", attempt)
            completion.raw = {**(completion.raw or {}), "batch": batch_id}
            return completion
        error = row.get("error") or answer.get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        status = response.get("status_code")
        return APIError(
            self._scrub(f"{where}: HTTP {status or '-'}: {message or 'no answer'}"), attempt
        )

    async def _file_text(self, file_id: str) -> str:
        async def download(attempt_no: int) -> str:
            response = await self.call("GET", f"files/{file_id}/content")
            self._check(response, f"{self.base_url}/files/{file_id}/content", attempt_no)
            return response.text

        return await self.with_retries(download, f"{self.base_url}/files/{file_id}/content")

    @staticmethod
    def _json(response: Reply) -> dict:
        try:
            data = response.json()
        except ValueError:
            raise Transient(f"malformed response body: {server_message(response)}") from None
        if not isinstance(data, dict):
            raise Transient("malformed response body")
        return data
