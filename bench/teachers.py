"""Teacher throughput: the HTTP client against a mock server, and the local backends.

1. HTTP (`OpenAITeacher`, on aiohttp): a mock OpenAI-compatible server (bench/mock_openai.py, its
   own process,
   127.0.0.1) answers every request after a fixed latency (0.2 s) with `slots` requests at most in
   flight (256), so its capacity is slots / latency = 1,280 requests/s. At concurrency c the ideal
   is min(c, slots) / latency; we send max(20, rounds x c) distinct chat requests (no cache hits)
   and report requests/s achieved as a fraction of the ideal (goal: at least 0.90) and the client's
   CPU seconds per 1,000 requests (getrusage of this process; the server's CPU is its own). Two
   ways: the bare teacher (`teacher.complete`, teacher concurrency c) and through the request
   ledger as the pipeline calls it (`Ledger(teacher, store, concurrency=c).complete_many`, SQLite
   writes before and after each request, committed in groups); "ledger share" is the part of the
   client's CPU per request that the ledger adds. `--ledger-commits both` also runs the ledger
   with a commit for every write (its way before issue 16), right after the grouped one. First
   the mock alone, driven by a bare asyncio client, shows the ceiling the mock and this way of
   measuring allow.
2. Local backends on the embedded teacher (SmolLM2-135M-Instruct Q4_1, 2 threads): generated
   tokens/s of `LlamaCppTeacher`, bare and through the ledger, against llama-cpp-python called
   directly (goal: at least 0.95); the direct baseline runs in a process of its own (see the note
   above `greedy`), the runs alternate and medians are taken. Then `TransformersTeacher` batched
   (max_batch 8, 8 requests in one call) against unbatched (max_batch 1), and against llama.cpp
   direct on the same prompts. Greedy decoding throughout; every prompt evaluated from scratch.

Run: `python bench/teachers.py` (about 5-6 minutes on 2 cores; `make bench` runs it).
Options: --quick (a smoke run, about a minute), --skip-http, --skip-local, --skip-hf,
--only http|llama|hf, --markdown,
--levels 1,16,64,256, --rounds N or --requests N, --server uvicorn, --jitter J,
--ledger-commits grouped|both (HTTP), --gc cli|python (the cycle collector as `tutelage` sets it,
the default, or as Python has it),
--prompts/--max-tokens/--repeats (llama.cpp), --hf-tokens/--hf-repeats (transformers).
The machine is noisy: compare the ratios within one run. Each section runs in a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mock_openai import MockServer, load

from tutelage.cli import collect_less_often
from tutelage.store import Store
from tutelage.teachers import Ledger, Request

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

# Wide enough for the tables when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
BOX = box.HEAVY_HEAD  # box.MARKDOWN with --markdown
HTTP_GOAL = 0.90
PATHS = {
    "bare": "bare teacher",
    "ledger": "through Ledger",
    "ledger-each": "through Ledger, a commit per write",
}
LOCAL_GOAL = 0.95

# Completion-style prompts the 135M teacher continues for a while (instructions often get an
# immediate end-of-sequence from it as a bare completion).
PROMPTS = [
    "The history of the printing press begins",
    "Here is a step-by-step guide to baking bread:\n1.",
    "Once upon a time, in a small village by the sea,",
    "The three main causes of the French Revolution were",
    "A good way to learn a new programming language is",
    "Photosynthesis is the process by which",
    "The best advice I ever received was",
    "In the year 2050, cities will",
]


def cpu_s() -> float:
    """CPU seconds of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


# -- 1. HTTP ------------------------------------------------------------------------------------
def make_openai_teacher(url: str, concurrency: int):
    from tutelage.teachers.openai import OpenAITeacher

    return OpenAITeacher("mock", base_url=url, api_key_env=None, concurrency=concurrency)


def chat_requests(n: int, tag: str) -> list[Request]:
    return [
        Request.make(
            messages=[{"role": "user", "content": f"task {i} ({tag})"}], sampling={"max_tokens": 16}
        )
        for i in range(n)
    ]


async def http_pass(
    make_teacher: Callable, url: str, c: int, n: int, mode: str, tag: str, folder: Path
) -> tuple[float, float]:
    """One pass at concurrency c: (wall seconds, client CPU seconds)."""
    teacher = make_teacher(url, c)
    requests = chat_requests(n, tag)
    store = Store(folder / f"{tag}.db") if mode.startswith("ledger") else None
    try:
        # One request first, not measured: the client is made (an SSL context alone costs ~30 ms
        # here) and one connection opened. The other c - 1 connections open during the pass.
        await teacher.complete(chat_requests(1, f"{tag} first"))
        cpu0, start = cpu_s(), time.perf_counter()
        if store is not None:
            grouped = mode != "ledger-each"
            ledger = Ledger(teacher, store, concurrency=c, group_commits=grouped)
            results = await ledger.complete_many(requests)
            answers = [r.completion for r in results]
        else:
            answers = await teacher.complete(requests)
        wall, cpu = time.perf_counter() - start, cpu_s() - cpu0
    finally:
        await teacher.aclose()
        if store is not None:
            store.close()
    if len(answers) != n or not all(a.text.startswith("echo: ") for a in answers):
        raise RuntimeError(f"{mode} c={c}: wrong answers from the mock")
    return wall, cpu


def bench_mock(args: argparse.Namespace) -> None:
    """The mock alone, driven by a bare asyncio client: the ceiling the mock itself allows."""
    c = max(args.levels)
    n = args.requests or max(20, args.rounds * c)
    table = Table(
        title=f"Mock server alone (bare asyncio keep-alive client, "
        f"{args.latency * 1000:.0f} ms latency, {args.slots} slots)",
        box=BOX,
    )
    for col in (
        "server",
        "concurrency",
        "requests",
        "req/s",
        "ideal req/s",
        "fraction",
        "load client CPU s/1k",
        "server CPU s/1k",
    ):
        table.add_column(col, justify="left" if col == "server" else "right")
    impls = [args.server] if args.quick else ["raw", "uvicorn"]
    for impl in impls:
        with MockServer(args.latency, args.slots, impl, args.jitter) as mock:
            asyncio.run(load(mock.port, min(c, 8), 16))  # connect once, warm up
            before, cpu0 = mock.stats(), cpu_s()
            wall = asyncio.run(load(mock.port, c, n))
            cpu, after = cpu_s() - cpu0, mock.stats()
        ideal = min(c, args.slots) / args.latency
        table.add_row(
            impl + (" (used)" if impl == args.server else ""),
            str(c),
            str(n),
            f"{n / wall:.0f}",
            f"{ideal:.0f}",
            f"{n / wall / ideal:.3f}",
            f"{1000 * cpu / n:.3f}",
            f"{1000 * (after['cpu_s'] - before['cpu_s']) / n:.3f}",
        )
    console.print(table)


def bench_http(
    args: argparse.Namespace,
    make_teacher: Callable = make_openai_teacher,
    title: str = "OpenAITeacher",
) -> list[dict]:
    rows = []
    table = Table(
        title=f"{title} vs the mock ({args.latency * 1000:.0f} ms latency, {args.slots} "
        f"slots = {args.slots / args.latency:.0f} req/s capacity, {args.server}; "
        f"collector thresholds {gc.get_threshold()})",
        box=BOX,
    )
    for col in (
        "concurrency",
        "path",
        "requests",
        "wall s",
        "req/s",
        "ideal req/s",
        "fraction",
        f">= {HTTP_GOAL}",
        "client CPU s/1k",
        "ledger share",
        "server CPU s/1k",
    ):
        table.add_column(col, justify="right")
    with (
        MockServer(args.latency, args.slots, args.server, args.jitter) as mock,
        tempfile.TemporaryDirectory(prefix="tutelage-bench-") as tmp,
    ):
        # Warm up: lazy imports (anyio backends, sqlite) and the first connection, not measured.
        modes = ("bare", "ledger") + (("ledger-each",) if args.ledger_commits == "both" else ())
        for mode in modes:
            asyncio.run(http_pass(make_teacher, mock.url, 4, 8, mode, f"warm-{mode}", Path(tmp)))
        for c in args.levels:
            n = args.requests or max(20, args.rounds * c)
            ideal = min(c, args.slots) / args.latency
            for mode in modes:
                before = mock.stats()
                wall, cpu = asyncio.run(
                    http_pass(make_teacher, mock.url, c, n, mode, f"{mode}-{c}", Path(tmp))
                )
                server_cpu = mock.stats()["cpu_s"] - before["cpu_s"]
                fraction = n / wall / ideal
                share = ""  # of the client's CPU per request through the ledger, the ledger's
                bare = [r for r in rows if r["c"] == c and r["mode"] == "bare"]
                if mode != "bare" and bare:
                    share = f"{1 - bare[-1]['cpu_per_1k'] / (1000 * cpu / n):.0%}"
                rows.append(
                    {
                        "c": c,
                        "mode": mode,
                        "n": n,
                        "wall": wall,
                        "rate": n / wall,
                        "fraction": fraction,
                        "cpu_per_1k": 1000 * cpu / n,
                    }
                )
                table.add_row(
                    str(c),
                    PATHS[mode],
                    str(n),
                    f"{wall:.2f}",
                    f"{n / wall:.0f}",
                    f"{ideal:.0f}",
                    f"{fraction:.3f}",
                    mark(fraction >= HTTP_GOAL),
                    f"{1000 * cpu / n:.2f}",
                    share,
                    f"{1000 * server_cpu / n:.3f}",
                )
                console.print(f"  c={c} {mode}: {n / wall:.0f} req/s", style="dim")
    console.print(table)
    return rows


# -- 2. Local backends --------------------------------------------------------------------------
# llama.cpp here is built with OpenMP, and every OS thread that calls into it gets its own OpenMP
# team; libgomp (shared with torch) spins less once it manages more threads than there are CPUs, and
# the decode slows down for the whole process. So the direct baseline runs in a process of its own
# (its main thread, as a plain script would), and each section of this benchmark in a fresh one.
def greedy(prompts: list[str], max_tokens: int) -> list[Request]:
    return [
        Request.make(prompt=p, sampling={"max_tokens": max_tokens, "temperature": 0.0})
        for p in prompts
    ]


def llama_direct(llm, prompts: list[str], max_tokens: int) -> tuple[float, int, list[str]]:
    """llama-cpp-python called directly, each prompt evaluated from scratch as our teacher does."""
    start = time.perf_counter()
    tokens, texts = 0, []
    for prompt in prompts:
        llm.reset()
        out = llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0
        )
        tokens += out["usage"]["completion_tokens"]
        texts.append(out["choices"][0]["text"])
    return time.perf_counter() - start, tokens, texts


def direct_worker(threads: int) -> None:
    """`--direct-worker`: llama-cpp-python alone in this process, driven by JSON lines on stdin."""
    import llama_cpp

    from tutelage.model_files import embedded_teacher_gguf

    llm = llama_cpp.Llama(
        str(embedded_teacher_gguf()),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        wall, tokens, texts = llama_direct(llm, job["prompts"], job["max_tokens"])
        print(json.dumps({"wall": wall, "tokens": tokens, "texts": texts}), flush=True)


class DirectLlama:
    """The direct baseline in a child process: `with DirectLlama() as d: d.run(prompts, n)`."""

    def __init__(self, threads: int = 2):
        self.threads = threads

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--direct-worker",
                "--threads",
                str(self.threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise RuntimeError("the direct llama-cpp-python worker did not start")
        return self

    def run(self, prompts: list[str], max_tokens: int) -> tuple[float, int, list[str]]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        return out["wall"], out["tokens"], out["texts"]

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_llamacpp_teacher(path: Path, threads: int):
    from tutelage.teachers.llamacpp import LlamaCppTeacher

    return LlamaCppTeacher(path, n_ctx=2048, threads=threads)


def teacher_pass(
    teacher, requests: list[Request], folder: Path | None = None, concurrency: int = 8
) -> tuple[float, int, list[str]]:
    """`teacher.complete` over all requests, or through a fresh ledger when `folder` is given."""

    async def go():
        if folder is None:
            return await teacher.complete(requests)
        store = Store(folder / f"ledger-{time.monotonic_ns()}.db")  # fresh: no cache hits
        try:
            results = await Ledger(teacher, store, concurrency=concurrency).complete_many(requests)
        finally:
            store.close()
        return [r.completion for r in results]

    start = time.perf_counter()
    answers = asyncio.run(go())
    wall = time.perf_counter() - start
    return wall, sum(a.tokens_out for a in answers), [a.text for a in answers]


def summarize(runs: list[tuple[float, int, list[str]]]) -> dict:
    rates = [tokens / wall for wall, tokens, _ in runs]
    return {
        "tokens": runs[0][1],
        "rates": rates,
        "median": statistics.median(rates),
        "texts": runs[0][2],
    }


def alternate(
    paths: dict[str, Callable], rounds: int, skip: Callable = lambda r, name: False
) -> dict[str, list]:
    """Run every path once per round, in order, so drifts in the machine's load hit them all."""
    runs: dict[str, list] = {name: [] for name in paths}
    for r in range(rounds):
        for name, run in paths.items():
            if skip(r, name):
                continue
            runs[name].append(run())
            wall, tokens, _ = runs[name][-1]
            console.print(f"  round {r + 1}: {name}: {tokens / wall:.1f} tokens/s", style="dim")
    return runs


DIRECT = "llama-cpp-python direct"


def bench_llamacpp(
    args: argparse.Namespace,
    make_teacher: Callable = make_llamacpp_teacher,
    title: str = "LlamaCppTeacher",
) -> dict:
    from tutelage.model_files import embedded_teacher_gguf

    prompts = PROMPTS[: args.prompts]
    requests = greedy(prompts, args.max_tokens)
    teacher = make_teacher(embedded_teacher_gguf(), 2)
    with DirectLlama(2) as direct, tempfile.TemporaryDirectory(prefix="tutelage-bench-") as tmp:
        direct.run(prompts[:1], 8)  # warm up: page faults, the first thread pool
        teacher_pass(teacher, greedy(prompts[:1], 8))
        runs = alternate(
            {
                DIRECT: lambda: direct.run(prompts, args.max_tokens),
                title: lambda: teacher_pass(teacher, requests),
                f"{title} via Ledger": lambda: teacher_pass(teacher, requests, Path(tmp)),
            },
            args.repeats,
        )
    table = Table(
        title=f"Embedded teacher on llama.cpp (2 threads): {len(prompts)} prompts x "
        f"{args.max_tokens} new tokens, greedy, {args.repeats} alternated rounds; "
        "ratio of medians",
        box=BOX,
    )
    for col in (
        "path",
        "tokens/round",
        "tokens/s median",
        "tokens/s min-max",
        "ratio vs direct",
        f">= {LOCAL_GOAL}",
        "same text",
    ):
        table.add_column(col, justify="left" if col == "path" else "right")
    summary = {}
    direct_median = summarize(runs[DIRECT])["median"]
    for name, name_runs in runs.items():
        s = summarize(name_runs)
        # Medians first: others' jobs here hit single runs hard (a 2-thread llama.cpp slows down
        # 5-10x when a core is taken), and a median of paired ratios would take those in.
        s["ratio"] = s["median"] / direct_median
        summary[name] = s
        baseline = name == DIRECT
        table.add_row(
            name + (" (own process)" if baseline else ""),
            str(s["tokens"]),
            f"{s['median']:.1f}",
            f"{min(s['rates']):.1f}-{max(s['rates']):.1f}",
            "1 (baseline)" if baseline else f"{s['ratio']:.3f}",
            "" if baseline else mark(s["ratio"] >= LOCAL_GOAL),
            "" if baseline else "yes" if s["texts"] == runs[DIRECT][0][2] else "NO",
        )
    console.print(table)
    return summary


def bench_transformers(args: argparse.Namespace) -> dict:
    from tutelage.teachers.hf import TransformersTeacher

    prompts = PROMPTS[:8]
    requests = greedy(prompts, args.hf_tokens)
    t0 = time.perf_counter()
    batched = TransformersTeacher("embedded", max_batch=8, threads=2)
    unbatched = TransformersTeacher("embedded", max_batch=1, threads=2)
    console.print(
        f"  transformers teachers loaded in {time.perf_counter() - t0:.1f} s", style="dim"
    )
    ub = "transformers unbatched (max_batch 1)"
    with DirectLlama(2) as direct, tempfile.TemporaryDirectory(prefix="tutelage-bench-") as tmp:
        teacher_pass(batched, greedy(prompts, 2))  # warm up, at the batch's own shape
        direct.run(prompts[:1], 4)
        runs = alternate(
            {
                "transformers batched (max_batch 8)": lambda: teacher_pass(batched, requests),
                ub: lambda: teacher_pass(unbatched, requests),
                "transformers batched via Ledger": lambda: teacher_pass(
                    batched, requests, Path(tmp)
                ),
                DIRECT + " (own process)": lambda: direct.run(prompts, args.hf_tokens),
            },
            args.hf_repeats,
            # the unbatched run is the slow one (about 30 s): once unless asked
            skip=lambda r, name: r > 0 and name == ub and not args.hf_repeat_unbatched,
        )
    s = {name: summarize(name_runs) for name, name_runs in runs.items()}
    base = s[ub]["median"]
    llama = s[DIRECT + " (own process)"]["median"]
    table = Table(
        title=f"Embedded teacher on transformers (fp32, 2 threads): 8 prompts x "
        f"{args.hf_tokens} new tokens, greedy, {args.hf_repeats} alternated "
        "rounds (unbatched once); ratios of medians",
        box=BOX,
    )
    for col in (
        "path",
        "runs",
        "tokens/run",
        "tokens/s median",
        "tokens/s min-max",
        "vs unbatched",
        "vs llama.cpp direct",
        "same text as unbatched",
    ):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, v in s.items():
        table.add_row(
            name,
            str(len(v["rates"])),
            str(v["tokens"]),
            f"{v['median']:.1f}",
            f"{min(v['rates']):.1f}-{max(v['rates']):.1f}",
            f"{v['median'] / base:.2f}x",
            f"{v['median'] / llama:.2f}x",
            "" if name.startswith("llama") else "yes" if v["texts"] == s[ub]["texts"] else "NO",
        )
    console.print(table)
    return s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small everything")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-local", action="store_true", help="no llama.cpp, no transformers")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers")
    parser.add_argument(
        "--only",
        choices=["http", "llama", "hf"],
        action="append",
        help="run only this section (repeatable)",
    )
    parser.add_argument("--markdown", action="store_true", help="tables in Markdown")
    parser.add_argument("--levels", default="1,16,64,256", help="HTTP concurrency levels")
    parser.add_argument(
        "--rounds",
        type=int,
        default=20,
        # 20, not fewer: the first round of a pass opens its connections and the whole run
        # starts at once; in a pass of 5 rounds that start is a fifth of the wall time.
        help="HTTP requests per level = max(20, rounds x concurrency)",
    )
    parser.add_argument("--requests", type=int, default=0, help="HTTP requests per level, fixed")
    parser.add_argument("--latency", type=float, default=0.2, help="mock latency, seconds")
    parser.add_argument("--slots", type=int, default=256, help="mock capacity in requests at once")
    parser.add_argument("--server", choices=["raw", "uvicorn"], default="raw")
    parser.add_argument(
        "--ledger-commits",
        choices=["grouped", "both"],
        default="grouped",
        help="HTTP: 'both' also runs the ledger with a commit for every write (the old way)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="mock latency uniform in latency x [1 - jitter, 1 + jitter]",
    )
    parser.add_argument("--prompts", type=int, default=4, help="llama.cpp prompts (at most 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="llama.cpp new tokens")
    parser.add_argument("--repeats", type=int, default=5, help="llama.cpp alternated rounds")
    parser.add_argument("--hf-tokens", type=int, default=64, help="transformers new tokens")
    parser.add_argument("--hf-repeats", type=int, default=3, help="transformers rounds")
    parser.add_argument(
        "--hf-repeat-unbatched",
        action="store_true",
        help="repeat the slow unbatched transformers run too",
    )
    # Internal: one section in this process; the llama.cpp worker for the direct baseline.
    parser.add_argument(
        "--gc",
        choices=["cli", "python"],
        default="cli",
        help="the cycle collector as the tutelage command sets it, or Python's default",
    )
    parser.add_argument("--section", choices=["http", "llama", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        global BOX
        BOX = box.MARKDOWN
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.quick:
        args.levels = [x for x in args.levels if x <= 64]
        args.rounds, args.prompts, args.max_tokens, args.repeats = 4, 2, 32, 2
        args.hf_tokens, args.hf_repeats = 16, 1
    args.prompts = min(args.prompts, len(PROMPTS))
    return args


def run_section(args: argparse.Namespace) -> None:
    if args.gc == "cli":
        collect_less_often()
    if args.section == "http":
        bench_mock(args)
        bench_http(args)
    elif args.section == "llama":
        bench_llamacpp(args)
    elif args.section == "hf":
        bench_transformers(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.direct_worker:
        return direct_worker(args.threads)
    if args.section:
        return run_section(args)
    start = time.perf_counter()
    load_avg = os.getloadavg()
    console.print(
        f"bench/teachers.py: load average {load_avg[0]:.2f} {load_avg[1]:.2f} "
        f"{load_avg[2]:.2f} at start, {os.cpu_count()} CPUs"
    )
    sections = args.only or ([] if args.skip_http else ["http"]) + (
        [] if args.skip_local else ["llama"] + ([] if args.skip_hf else ["hf"])
    )
    for section in sections:  # each in a fresh process: see the note above greedy()
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *argv, "--section", section], check=True
        )
    load_avg = os.getloadavg()
    console.print(
        f"done in {time.perf_counter() - start:.0f} s; load average {load_avg[0]:.2f} "
        f"{load_avg[1]:.2f} {load_avg[2]:.2f} at the end"
    )


if __name__ == "__main__":
    main()
