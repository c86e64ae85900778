"""A mock OpenAI-compatible server with a fixed latency and a known capacity, for benchmarks.

Every request is held `latency` seconds, at most `slots` at once (the rest wait their turn), so the
server's capacity is exactly slots / latency requests per second, whatever the client does.
It answers POST /v1/chat/completions and /v1/completions with an OpenAI-shaped body (with `usage`),
and GET /stats with what it served and the CPU time it used, so a benchmark can check that the mock
is not what limits it.

Two implementations: `raw` (a small asyncio HTTP/1.1 keep-alive server, the default: cheapest per
request) and `uvicorn` (starlette behind uvicorn, h11). Run it in its own process:

    python bench/mock_openai.py --serve --latency 0.2 --slots 256 [--impl uvicorn] [--jitter 0.5]

It prints `PORT <n>` once it listens on 127.0.0.1 (an ephemeral port) and runs until killed;
`MockServer` does that from a benchmark, and `load()` is a bare asyncio client to measure it.
Without `--serve` it only says what it is and exits, since `make bench` runs every bench/*.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class Stats:
    def __init__(self) -> None:
        self.served = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def snapshot(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "served": self.served,
            "max_in_flight": self.max_in_flight,
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }


def answer(path: str, body: dict) -> dict:
    """An OpenAI-shaped answer: echoes the prompt, one token per word."""
    if path.endswith("/chat/completions"):
        prompt = body["messages"][-1]["content"]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": f"echo: {prompt}"},
            "finish_reason": "stop",
        }
        kind = "chat.completion"
    else:
        prompt = body["prompt"]
        choice = {"index": 0, "text": f"echo: {prompt}", "finish_reason": "stop"}
        kind = "text_completion"
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(prompt.split()) + 1}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": "cmpl-mock",
        "object": kind,
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [choice],
        "usage": usage,
    }


async def serve(
    slots: asyncio.Semaphore,
    stats: Stats,
    latency: float,
    path: str,
    body: bytes,
    jitter: float = 0.0,
) -> tuple[int, dict]:
    """One request for the uvicorn app (the raw server does the same with callbacks)."""
    if path == "/stats":
        return 200, stats.snapshot()
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return 404, {"error": {"message": f"no route {path}"}}
    try:
        data = json.loads(body)
    except ValueError:
        return 400, {"error": {"message": "bad JSON"}}
    async with slots:
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            # jitter j: uniform in latency x [1 - j, 1 + j], the same mean (so the same capacity)
            await asyncio.sleep(
                latency * random.uniform(1 - jitter, 1 + jitter) if jitter else latency
            )
        finally:
            stats.in_flight -= 1
    stats.served += 1
    try:
        return 200, answer(path, data)
    except (KeyError, IndexError, TypeError, AttributeError):
        return 400, {"error": {"message": "no prompt or messages"}}


# -- raw asyncio HTTP/1.1 ----------------------------------------------------------------------
# Callbacks rather than a task per request: about half the server's CPU per request, which matters
# at 256 requests that all come back in the same instant (see bench/teachers.py).
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


def reply(status: int, payload: dict, close: bool) -> bytes:
    blob = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(blob)}\r\n"
        f"connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode() + blob


class Slots:
    """At most `n` requests in their latency at once; the others wait their turn, in order."""

    def __init__(self, n: int, latency: float, jitter: float, stats: Stats):
        self.free, self.latency, self.jitter, self.stats = n, latency, jitter, stats
        self.waiting: deque[Callable[[], None]] = deque()
        self.loop = asyncio.get_running_loop()

    def submit(self, done: Callable[[], None]) -> None:
        if self.free:
            self.free -= 1
            self._start(done)
        else:
            self.waiting.append(done)

    def _start(self, done: Callable[[], None]) -> None:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        delay = (
            self.latency * random.uniform(1 - self.jitter, 1 + self.jitter)
            if self.jitter
            else self.latency
        )
        self.loop.call_later(delay, self._finish, done)

    def _finish(self, done: Callable[[], None]) -> None:
        self.stats.in_flight -= 1
        self.stats.served += 1
        if self.waiting:
            self._start(self.waiting.popleft())
        else:
            self.free += 1
        done()


class RawProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies; the answers on one connection go out in
    request order (pipelining works, though neither aiohttp nor httpx pipelines)."""

    def __init__(self, slots: Slots, stats: Stats):
        self.slots, self.stats = slots, stats
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.pending: deque[list] = deque()  # [answer bytes or None, close], in request order

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            close = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            path = head[0].split(" ", 2)[1]
            entry: list = [None, close]
            self.pending.append(entry)
            if path == "/stats":
                self.answer(entry, reply(200, self.stats.snapshot(), close))
            elif path not in ("/v1/chat/completions", "/v1/completions"):
                self.answer(entry, reply(404, {"error": {"message": f"no route {path}"}}, close))
            else:
                self.slots.submit(lambda e=entry, p=path, b=body: self.complete(e, p, b))

    def complete(self, entry: list, path: str, body: bytes) -> None:
        try:
            status, payload = 200, answer(path, json.loads(body))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            status, payload = 400, {"error": {"message": "no prompt or messages"}}
        self.answer(entry, reply(status, payload, entry[1]))

    def answer(self, entry: list, blob: bytes) -> None:
        entry[0] = blob
        while self.pending and self.pending[0][0] is not None:
            blob, close = self.pending.popleft()
            if self.transport is None:
                continue
            self.transport.write(blob)
            if close:
                self.transport.close()


async def run_raw(sock: socket.socket, latency: float, n_slots: int, jitter: float) -> None:
    stats = Stats()
    slots = Slots(n_slots, latency, jitter, stats)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RawProtocol(slots, stats), sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


# -- starlette behind uvicorn ------------------------------------------------------------------
def run_uvicorn(sock: socket.socket, latency: float, n_slots: int, jitter: float) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state: dict = {}

    async def endpoint(request: Request) -> JSONResponse:
        if "slots" not in state:  # made inside uvicorn's event loop
            state["slots"], state["stats"] = asyncio.Semaphore(n_slots), Stats()
        body = await request.body() if request.method == "POST" else b""
        status, payload = await serve(
            state["slots"], state["stats"], latency, request.url.path, body, jitter
        )
        return JSONResponse(payload, status_code=status)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", endpoint, methods=["POST"]),
            Route("/v1/completions", endpoint, methods=["POST"]),
            Route("/stats", endpoint, methods=["GET"]),
        ]
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        loop="asyncio",
        http="h11",
        lifespan="off",
        backlog=4096,
    )
    uvicorn.Server(config).run(sockets=[sock])


# -- from a benchmark --------------------------------------------------------------------------
class MockServer:
    """The mock in a child process: `with MockServer(0.2, 256) as m: ... m.url ... m.stats()`."""

    def __init__(
        self, latency: float = 0.2, slots: int = 256, impl: str = "raw", jitter: float = 0.0
    ):
        self.latency, self.slots, self.impl, self.jitter = latency, slots, impl, jitter
        self.capacity = slots / latency  # requests per second

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve",
                "--latency",
                str(self.latency),
                "--slots",
                str(self.slots),
                "--impl",
                self.impl,
                "--jitter",
                str(self.jitter),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split()  # type: ignore[union-attr]
        if len(line) != 2 or line[0] != "PORT":
            self.proc.kill()
            raise RuntimeError(f"mock server ({self.impl}) did not start")
        self.port = int(line[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> dict:
        """What the server served so far and its CPU seconds (a plain blocking GET)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2])


async def load(port: int, concurrency: int, n: int) -> float:
    """A bare keep-alive client (asyncio streams, no parsing beyond Content-Length): sends `n`
    completions over `concurrency` connections and returns the wall seconds they took."""
    body = json.dumps({"model": "m", "prompt": "task", "max_tokens": 16}).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    counts = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]

    async def worker(k: int) -> None:
        if not k:
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(k):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in counts))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="serve (else say what this is)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    parser.add_argument("--slots", type=int, default=256, help="requests served at once")
    parser.add_argument("--impl", choices=["raw", "uvicorn"], default="raw")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="each latency uniform in latency x [1 - jitter, 1 + jitter]",
    )
    args = parser.parse_args()
    if not args.serve:
        print(
            "bench/mock_openai.py: the mock OpenAI server used by bench/teachers.py "
            "(not a benchmark itself; --serve runs it, --help says how)"
        )
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.setblocking(False)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more on the pipe nobody reads
    if args.impl == "raw":
        try:
            asyncio.run(run_raw(sock, args.latency, args.slots, args.jitter))
        except KeyboardInterrupt:
            pass
    else:
        run_uvicorn(sock, args.latency, args.slots, args.jitter)


if __name__ == "__main__":
    main()
