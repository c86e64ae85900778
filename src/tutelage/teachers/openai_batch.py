"""OpenAI's Batch API as a teacher: the same requests as `openai`, at about half the price, answered
within 24 hours instead of seconds.

A remote batch goes through three steps, each an ordinary HTTP call with the online backend's
retries: submit (upload a JSONL file to /v1/files, create /v1/batches), poll (/v1/batches/{id}
until it ends), collect (download the output and error files). The ledger records the batch id
on every request it carries as soon as the batch exists, so a run killed while a batch is pending
polls that batch again when it restarts instead of paying for a second one. A batch is also tagged
with a fingerprint of its requests: if the run dies between creating it and recording its id, the
restart finds it among the account's recent batches.

Answers keep the online backend's name ("openai") in the ledger key: a run may switch between
online and batch mode and reuse every stored answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Sequence

import httpx

from .base import Completion, Request
from .openai import APIError, OpenAITeacher, Transient, server_message

ENDED = {"completed", "failed", "expired", "cancelled"}
# OpenAI's limits for one batch input file.
MAX_REQUESTS_PER_BATCH = 50_000
COMPLETION_WINDOW = "24h"
METADATA_KEY = "tutelage_requests"  # the fingerprint of the requests a batch carries

log = logging.getLogger(__name__)


def fingerprint(custom_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(custom_ids)).encode()).hexdigest()[:32]


class OpenAIBatchTeacher(OpenAITeacher):
    remote = True  # answers come back in remote batches: the ledger submits and polls them

    def __init__(self, model: str, *, batch_size: int = 1000, poll_s: float = 30.0, **online):
        super().__init__(model, **online)
        self.max_batch = min(batch_size, MAX_REQUESTS_PER_BATCH)
        self.poll_s = poll_s

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
        return "/v1/" + self._body(request)[0]

    async def submit(self, requests: Sequence[Request], custom_ids: Sequence[str]) -> dict:
        """Create one remote batch for requests that share an endpoint; returns the batch object.
        A live batch already carrying exactly these requests is returned instead of a new one."""
        endpoints = {self.endpoint(r) for r in requests}
        if len(endpoints) != 1:
            raise ValueError("one remote batch holds requests for one endpoint")
        endpoint = endpoints.pop()
        tag = fingerprint(custom_ids)
        if (found := await self.find(tag)) is not None:
            log.info(
                "batch %s already carries these %d requests: waiting on it",
                found["id"],
                len(requests),
            )
            return found
        lines = [
            json.dumps(
                {"custom_id": cid, "method": "POST", "url": endpoint, "body": self._body(r)[1]},
                ensure_ascii=False,
            )
            for r, cid in zip(requests, custom_ids, strict=True)
        ]
        payload = ("\n".join(lines) + "\n").encode("utf-8")

        async def upload(client: httpx.AsyncClient, attempt: int) -> str:
            response = await client.post(
                "files",
                data={"purpose": "batch"},
                files={"file": (f"tutelage-{tag}.jsonl", payload, "application/jsonl")},
            )
            self._check(response, f"{self.base_url}/files", attempt)
            return self._json(response)["id"]

        file_id = await self.with_retries(upload, f"{self.base_url}/files")

        async def create(client: httpx.AsyncClient, attempt: int) -> dict:
            # A retry after a lost answer must not start a second batch: look for the first.
            if attempt > 1 and (found := await self.find(tag)) is not None:
                return found
            response = await client.post(
                "batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": endpoint,
                    "completion_window": COMPLETION_WINDOW,
                    "metadata": {METADATA_KEY: tag},
                },
            )
            self._check(response, f"{self.base_url}/batches", attempt)
            return self._json(response)

        batch = await self.with_retries(create, f"{self.base_url}/batches")
        log.info("submitted batch %s: %d requests to %s", batch["id"], len(requests), endpoint)
        return batch

    async def find(self, tag: str) -> dict | None:
        """The newest live (or completed) batch tagged `tag` among the account's 100 latest."""

        async def listing(client: httpx.AsyncClient, attempt: int) -> list[dict]:
            response = await client.get("batches", params={"limit": 100})
            self._check(response, f"{self.base_url}/batches", attempt)
            return self._json(response).get("data") or []

        for batch in await self.with_retries(listing, f"{self.base_url}/batches"):
            if (batch.get("metadata") or {}).get(METADATA_KEY) == tag and batch.get("status") in {
                "validating",
                "in_progress",
                "finalizing",
                "completed",
            }:
                return batch
        return None

    async def status(self, batch_id: str) -> dict:
        async def get(client: httpx.AsyncClient, attempt: int) -> dict:
            response = await client.get(f"batches/{batch_id}")
            self._check(response, f"{self.base_url}/batches/{batch_id}", attempt)
            return self._json(response)

        return await self.with_retries(get, f"{self.base_url}/batches/{batch_id}")

    async def wait(self, batch_id: str, on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the batch ends; returns its final batch object."""
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
        """custom_id -> Completion, or an APIError for a request the batch did not answer."""
        where = f"batch {batch['id']}"
        chat = str(batch.get("endpoint", "")).endswith("chat/completions")
        results: dict[str, Completion | APIError] = {}
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            for line in (await self._file_text(file_id)).splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                results[row["custom_id"]] = self._answer(row, batch["id"], chat)
        problem = f"the batch ended {batch.get('status')} without answering this request"
        if errors := (batch.get("errors") or {}).get("data"):
            problem += ": " + "; ".join(str(e.get("message", e)) for e in errors[:3])
        for cid in custom_ids:
            results.setdefault(cid, APIError(self._scrub(f"{where}: {problem}"), 1))
        return {cid: results[cid] for cid in custom_ids}

    def _answer(self, row: dict, batch_id: str, chat: bool) -> Completion | APIError:
        where = f"batch {batch_id}"
        response = row.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") == 200 and not row.get("error"):
            try:
                completion = self._completion(body, chat, 1)
                completion.raw = {"attempts": 1, "batch": batch_id, "response": body}
                return completion
            except (LookupError, TypeError, AttributeError):
                return APIError(f"{where}: a malformed answer for {row['custom_id']}", 1)
        error = row.get("error") or body.get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        status = response.get("status_code")
        return APIError(self._scrub(f"{where}: HTTP {status or '-'}: {message or 'no answer'}"), 1)

    async def _file_text(self, file_id: str) -> str:
        async def download(client: httpx.AsyncClient, attempt: int) -> str:
            response = await client.get(f"files/{file_id}/content")
            self._check(response, f"{self.base_url}/files/{file_id}/content", attempt)
            return response.text

        return await self.with_retries(download, f"{self.base_url}/files/{file_id}/content")

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            data = response.json()
        except ValueError:
            raise Transient(f"malformed response body: {server_message(response)}") from None
        if not isinstance(data, dict):
            raise Transient("malformed response body")
        return data
