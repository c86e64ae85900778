"""An OpenAI-compatible server on 127.0.0.1 that fails on demand, for testing HTTP teachers.

    with FaultServer() as server:
        server.faults += ["429", "500", "drop"]  # the next three requests fail, then answers
        OpenAITeacher("m", base_url=server.url, ...)

Faults: "429" (Retry-After: `retry_after`), "500", "slow" (answers after `slow_s`), "drop" (closes
the connection without an answer), "malformed" (200 with a cut-off JSON body), "quota" (429
insufficient_quota), "400", "401" (echoes the key it got, as some servers do), "403", "404",
"lost" (does the work, then closes the connection without the answer), "refusal" (no content, a
`refusal` instead), "filtered" (finish_reason content_filter, half an answer), "null" (null
content), "ok" (no fault).
A normal answer echoes the prompt: "echo: <prompt or last message>", one token per word.

Model behaviours, for every request: `send_usage = False` leaves `usage` out of answers, as some
servers do; `refuse = {"temperature": "unsupported_value", ...}` answers a request carrying one of
those fields with OpenAI's 400 naming it (`param`, `code`), as reasoning models do ("max_tokens":
"use max_completion_tokens"); `reasoning_tokens = n` makes each answer think n hidden tokens
first (counted in completion_tokens, and in completion_tokens_details): an answer whose token
limit runs out while thinking comes back empty with finish_reason "length".

It also speaks the Batch API (/v1/files, /v1/batches): a batch reports `in_progress` for
`batch_polls` status reads, `finalizing` for `finalizing_polls` more, then ends `batch_end`
("completed"; "expired": only the first half answered; "cancelled": the same, after one read of
`cancelling`; "failed": rejected at validation). A request whose text contains "FAIL" gets a 400
line in the error file, and one containing "FLAKY" too in its first `flaky_failures` batches.
The batch list pages (`limit`, `after`, `has_more`), newest first. Faults apply to the batch
endpoints' calls too.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default 5 resets connections under a burst of clients


class FaultServer:
    def __init__(self, delay_s: float = 0.0, slow_s: float = 1.0, retry_after: str = "0"):
        self.faults: list[str] = []
        self.requests: list[dict] = []  # every request received: path, headers, body
        self.delay_s, self.slow_s, self.retry_after = delay_s, slow_s, retry_after
        self.in_flight = self.max_in_flight = 0
        self.send_usage = True
        self.refuse: dict[str, str] = {}  # field -> "unsupported_parameter" | "unsupported_value"
        self.reasoning_tokens = 0
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_polls, self.finalizing_polls, self.batch_end = 1, 0, "completed"
        self.flaky_failures = 1
        self.line_failures: dict[str, int] = {}  # custom_id -> batches it failed in (FLAKY)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._http = Server(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    @property
    def hits(self) -> int:
        return len(self.requests)

    def __enter__(self) -> Self:
        threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def add_batch(self, endpoint: str, input_file_id: str, **fields) -> dict:
        """A new batch in the account (as POST /v1/batches makes one), newest of all."""
        n = next(self._ids)
        batch = {
            "id": f"batch-{n}",
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "status": "validating",
            "metadata": None,
            "created_at": int(time.time()),
            "seq": n,  # orders batches made within the same second
            "polls": 0,
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            **fields,
        }
        self.batches[batch["id"]] = batch
        return batch

    def _next_fault(self, request: dict) -> str | None:
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.faults.pop(0) if self.faults else None


def _text(body: dict) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def answer(
    path: str, body: dict, fault: str | None = None, usage: bool = True, reasoning: int = 0
) -> dict:
    """The echo answer; `fault` "refusal", "filtered" or "null" changes it as named above;
    `reasoning` hidden tokens come first and count against the token limit."""
    prompt = _text(body)
    words = f"echo: {prompt}".split(" ")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    finish = "stop"
    if limit is not None and reasoning + len(words) > limit:
        words, finish = words[: max(0, limit - reasoning)], "length"
    content: str | None = " ".join(words)
    if fault == "filtered":
        content, finish = " ".join(words[: len(words) // 2]), "content_filter"
    elif fault in ("null", "refusal"):
        content = None
    if path.endswith("/chat/completions"):
        message = {"role": "assistant", "content": content}
        if fault == "refusal":
            message["refusal"] = "I'm sorry, I can't help with that."
        choice = {"index": 0, "message": message, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": content, "finish_reason": finish}
    data = {
        "id": "cmpl-test",
        "object": "text_completion",
        "model": body.get("model"),
        "choices": [choice],
    }
    if usage:
        completion = (len(content.split()) if content else 0) + reasoning
        data["usage"] = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": completion,
            "total_tokens": len(prompt.split()) + completion,
        }
        if reasoning:
            data["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return data


def refusal(body: dict, refuse: dict[str, str]) -> dict | None:
    """OpenAI's 400 for the first field in `body` that `refuse` names, else None."""
    for name, code in refuse.items():
        if name not in body:
            continue
        if name == "max_tokens":
            message = (
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead."
            )
        elif code == "unsupported_value":
            message = (
                f"Unsupported value: '{name}' does not support {body[name]!r} with this model. "
                "Only the default (1) value is supported."
            )
        else:
            message = f"Unsupported parameter: '{name}' is not supported with this model."
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": name,
                "code": code,
            }
        }
    return None


def _handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        lose = False

        def reply(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            if self.lose:  # the work is done, but the answer never arrives
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def error(self, status: int, message: str, code: str | None = None, **headers) -> None:
            body = {"error": {"message": message, "type": "test_error", "code": code}}
            self.reply(status, json.dumps(body).encode(), headers)

        def do_GET(self) -> None:
            self.handle_any(None)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
                self.handle_any(self.form(raw))
            else:
                self.handle_any(json.loads(raw))

        def form(self, raw: bytes) -> dict:
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
            return {
                part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                for part in message.iter_parts()
            }

        def handle_any(self, body) -> None:
            fault = server._next_fault(
                {
                    "path": self.path,
                    "method": self.command,
                    "headers": dict(self.headers),
                    "body": body,
                }
            )
            try:
                self.respond(fault, body)
            except OSError:  # the client gave up (timeout) while we were slow
                pass
            finally:
                with server._lock:
                    server.in_flight -= 1

        def respond(self, fault: str | None, body: dict) -> None:
            time.sleep(server.delay_s)
            self.lose = fault == "lost"
            if fault == "429":
                self.error(
                    429,
                    "Rate limit reached",
                    "rate_limit_exceeded",
                    **{"Retry-After": server.retry_after},
                )
            elif fault == "quota":
                self.error(429, "You exceeded your current quota", "insufficient_quota")
            elif fault == "500":
                self.error(500, "The server had an error")
            elif fault == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
            elif fault == "malformed":
                self.reply(200, json.dumps(answer(self.path, body)).encode()[:40])
            elif fault == "400":
                self.error(400, "Invalid value for 'temperature'")
            elif fault == "401":
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                self.error(401, f"Incorrect API key provided: {key}", "invalid_api_key")
            elif fault == "403":
                self.error(403, "Project does not have access to this model")
            elif fault == "404":
                self.error(
                    404, f"The model `{body.get('model')}` does not exist", "model_not_found"
                )
            else:
                if fault == "slow":
                    time.sleep(server.slow_s)
                if "/files" in self.path or "/batches" in self.path:
                    self.batch_api(body)
                elif refused := refusal(body, server.refuse):
                    self.reply(400, json.dumps(refused).encode())
                else:
                    data = answer(
                        self.path, body, fault, server.send_usage, server.reasoning_tokens
                    )
                    self.reply(200, json.dumps(data).encode())

        def batch_api(self, body) -> None:
            path = self.path.split("?")[0].removeprefix("/v1/")
            parts = path.split("/")
            if path == "files":
                file_id = f"file-{next(server._ids)}"
                server.files[file_id] = body["file"]
                self.send_json(
                    {"id": file_id, "object": "file", "purpose": body["purpose"].decode()}
                )
            elif parts[0] == "files" and parts[-1] == "content":
                payload = server.files[parts[1]]
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            elif path == "batches" and self.command == "POST":
                batch = server.add_batch(body["endpoint"], body["input_file_id"])
                batch["metadata"] = body.get("metadata")
                self.send_json(self.public(batch))
            elif path == "batches":
                self.send_json(self.listing())
            elif parts[0] == "batches" and parts[1] in server.batches:
                batch = server.batches[parts[1]]
                batch["polls"] += 1
                polls = batch["polls"] - server.batch_polls  # reads past in_progress
                if batch["status"] == "validating":
                    batch["status"] = "in_progress"
                elif batch["status"] == "in_progress" and polls > 0:
                    if server.finalizing_polls:
                        batch["status"] = "finalizing"
                    elif server.batch_end == "cancelled":
                        batch["status"] = "cancelling"
                    else:
                        self.end_batch(batch)
                elif batch["status"] == "cancelling" or (
                    batch["status"] == "finalizing" and polls > server.finalizing_polls
                ):
                    self.end_batch(batch)
                self.send_json(self.public(batch))
            else:
                self.error(404, f"no such object: {path}")

        def listing(self) -> dict:
            """One page of the batches, newest first: `limit` of them after the id `after`."""
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            limit = int(query.get("limit", ["20"])[0])
            newest = sorted(
                server.batches.values(), key=lambda b: (b["created_at"], b["seq"]), reverse=True
            )
            ids = [b["id"] for b in newest]
            after = query.get("after", [None])[0]
            start = ids.index(after) + 1 if after in ids else 0
            page = newest[start : start + limit]
            return {
                "object": "list",
                "data": [self.public(b) for b in page],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(newest),
            }

        @staticmethod
        def public(batch: dict) -> dict:
            return {k: v for k, v in batch.items() if k not in ("polls", "seq")}

        def end_batch(self, batch: dict) -> None:
            lines = [json.loads(x) for x in server.files[batch["input_file_id"]].splitlines()]
            batch["request_counts"]["total"] = len(lines)
            if server.batch_end == "failed":
                batch["status"] = "failed"
                batch["errors"] = {
                    "data": [{"code": "invalid_request", "message": "the input file is not valid"}]
                }
                return
            answered = lines if server.batch_end == "completed" else lines[: len(lines) // 2]
            out, errors = [], []
            for line in lines:
                cid = line["custom_id"]
                flaky = "FLAKY" in _text(line["body"])
                if flaky and line in answered:
                    failed = server.line_failures.get(cid, 0)
                    flaky = failed < server.flaky_failures
                    server.line_failures[cid] = failed + flaky
                if line not in answered:
                    errors.append(
                        {
                            "custom_id": cid,
                            "response": None,
                            "error": {
                                "code": f"batch_{server.batch_end}",
                                "message": "This request could not be executed "
                                + (
                                    "before the batch was cancelled."
                                    if server.batch_end == "cancelled"
                                    else "before the completion window expired."
                                ),
                            },
                        }
                    )
                elif "FAIL" in _text(line["body"]) or flaky:
                    errors.append(
                        {
                            "custom_id": cid,
                            "error": None,
                            "response": {
                                "status_code": 400,
                                "body": {"error": {"message": "bad request line"}},
                            },
                        }
                    )
                else:
                    out.append(
                        {
                            "custom_id": cid,
                            "error": None,
                            "response": {
                                "status_code": 200,
                                "body": answer(line["url"], line["body"], usage=server.send_usage),
                            },
                        }
                    )
            for name, rows in (("output_file_id", out), ("error_file_id", errors)):
                if rows:
                    file_id = f"file-{next(server._ids)}"
                    server.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    batch[name] = file_id
            batch["status"] = server.batch_end
            batch["request_counts"].update(completed=len(out), failed=len(errors))

        def send_json(self, data: dict) -> None:
            self.reply(200, json.dumps(data).encode())

    return Handler
