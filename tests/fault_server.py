"""An OpenAI-compatible server on 127.0.0.1 that fails on demand, for testing HTTP teachers.

    with FaultServer() as server:
        server.faults += ["429", "500", "drop"]  # the next three requests fail, then answers
        OpenAITeacher("m", base_url=server.url, ...)

Faults: "429" (Retry-After: `retry_after`), "500", "slow" (answers after `slow_s`), "drop" (closes
the connection without an answer), "malformed" (200 with a cut-off JSON body), "quota" (429
insufficient_quota), "400", "401" (echoes the key it got, as some servers do), "403", "404".
A normal answer echoes the prompt: "echo: <prompt or last message>", one token per word.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, delay_s: float = 0.0, slow_s: float = 1.0, retry_after: str = "0"):
        self.faults: list[str] = []
        self.requests: list[dict] = []  # every request received: path, headers, body
        self.delay_s, self.slow_s, self.retry_after = delay_s, slow_s, retry_after
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    @property
    def hits(self) -> int:
        return len(self.requests)

    def __enter__(self) -> FaultServer:
        threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _next_fault(self, request: dict) -> str | None:
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.faults.pop(0) if self.faults else None


def answer(path: str, body: dict) -> dict:
    if path.endswith("/chat/completions"):
        prompt = body["messages"][-1]["content"]
        choice = {"index": 0, "message": {"role": "assistant", "content": f"echo: {prompt}"},
                  "finish_reason": "stop"}
    else:
        prompt = body["prompt"]
        choice = {"index": 0, "text": f"echo: {prompt}", "finish_reason": "stop"}
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(prompt.split()) + 1}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": "cmpl-test", "object": "text_completion", "model": body.get("model"),
            "choices": [choice], "usage": usage}


def _handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def reply(self, status: int, payload: bytes, headers: dict | None = None) -> None:
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

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fault = server._next_fault({"path": self.path, "headers": dict(self.headers),
                                        "body": body})
            try:
                self.respond(fault, body)
            except OSError:  # the client gave up (timeout) while we were slow
                pass
            finally:
                with server._lock:
                    server.in_flight -= 1

        def respond(self, fault: str | None, body: dict) -> None:
            time.sleep(server.delay_s)
            if fault == "429":
                self.error(429, "Rate limit reached", "rate_limit_exceeded",
                           **{"Retry-After": server.retry_after})
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
                self.error(404, f"The model `{body.get('model')}` does not exist",
                           "model_not_found")
            else:
                if fault == "slow":
                    time.sleep(server.slow_s)
                self.reply(200, json.dumps(answer(self.path, body)).encode())

    return Handler
