"""Resume of a large run: `tutelage generate` on a finished run with a raised target, up to its
first new request.

1. Build (once per folder, kept for later runs): a run of the Alpaca recipe that reached a target
   of --tasks kept tasks (50,000), through the real generation loop and ledger, with an in-process
   teacher that answers every request with 20 new tasks at once (random words of
   `../shared/data/instructions-19k.jsonl`, so the novelty filter has real work to do). The run's
   configuration names an OpenAI-compatible teacher on 127.0.0.1:PORT, as a user's would.
2. Resume: a small OpenAI-compatible server (this script with --serve, its own process) listens on
   that port and notes the time of the first request it gets; `tutelage generate --run-dir RUN
   --target TASKS+more` runs as a user runs it (a fresh process, the stored configuration). The
   figure is the wall time from starting that process to the server's first request: everything
   a resume does before it asks anything new (start-up, opening the store, rebuilding the novelty
   pool, the ledger). The run then goes on to the raised target and exits; its whole wall time is
   reported too. --repeats runs the resume several times (each raises the target again).

Run: `python bench/resume.py` (the build takes a few minutes the first time; the folder is kept
under $TMPDIR/tutelage-bench-resume-TASKS unless --run-dir names one). Options: --tasks N,
--more N, --repeats N, --run-dir DIR, --rebuild, --profile FILE (cProfile of one resume, to read
with `python -m pstats FILE`), --baseline SRC (also resume with another source tree, e.g. a git
worktree of an older commit, alternating with this one), --markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instructions-19k.jsonl"
TASKS_PER_ANSWER = 20
BUILD_CONCURRENCY = 8


# -- the teacher's answers: 20 new Alpaca tasks each --------------------------------------------
def vocabulary() -> list[str]:
    """Every word of the instruction file, with repeats: random draws follow its frequencies."""
    words: list[str] = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        words += re.findall(r"[a-z]+", json.loads(line)["instruction"].lower())
    return words


def answer_text(words: list[str], number: int) -> str:
    """Answer `number`: 20 numbered Instruction/Input/Output blocks, the same on every run."""
    rng = random.Random(number)
    blocks = []
    for k in range(TASKS_PER_ANSWER):
        n = 4 + k  # the prompt shows 3 seed tasks: the teacher goes on from 4
        task = " ".join(rng.choices(words, k=rng.randint(8, 16)))
        output = " ".join(rng.choices(words, k=rng.randint(5, 30)))
        blocks.append(
            f"###\n{n}. Instruction: {task.capitalize()}.\n{n}. Input:\n<noinput>\n"
            f"{n}. Output:\n{output.capitalize()}.\n"
        )
    return "".join(blocks)


class TasksTeacher:
    """The build's teacher, in process: named as the resumed run's HTTP teacher is."""

    backend = "openai"
    model = "mock"

    def __init__(self, words: list[str]):
        self.words = words
        self.answered = 0

    async def complete(self, requests):
        from tutelage.teachers.base import Completion

        out = []
        for _ in requests:
            text = answer_text(self.words, self.answered)
            self.answered += 1
            out.append(Completion(text, "stop", 600, 700))
        return out

    async def aclose(self) -> None:
        pass


# -- the server for the resume -------------------------------------------------------------------
def serve(port: int, first_answer: int) -> None:
    """`--serve`: answer /v1/chat/completions and /v1/completions on 127.0.0.1:port; print the
    time of the first request as `FIRST <unix time>`."""
    from aiohttp import web

    words = vocabulary()
    state = {"answered": first_answer, "first": None}

    async def complete(request: web.Request) -> web.Response:
        if state["first"] is None:
            state["first"] = time.time()
            print(f"FIRST {state['first']:.6f}", flush=True)
        body = await request.json()
        text = answer_text(words, state["answered"])
        state["answered"] += 1
        chat = "messages" in body
        choice = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response(
            {
                "id": "cmpl-resume",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [choice],
                "usage": {"prompt_tokens": 600, "completion_tokens": 700, "total_tokens": 1300},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. build -------------------------------------------------------------------------------------
def build(run_dir: Path, tasks: int) -> dict:
    """A finished run of `tasks` kept tasks in run_dir; returns its facts."""
    from tutelage.config import load_config
    from tutelage.generate import generate
    from tutelage.pipeline import open_run, staged

    cfg = load_config(
        None,
        {
            "teacher.backend": "openai",
            "teacher.model": "mock",
            "teacher.base_url": "http://127.0.0.1:1/v1",  # the resume points it at its server
            "teacher.api_key_env": None,
            "generation.target": tasks,
            "generation.max_requests": 10 * tasks // TASKS_PER_ANSWER,
            "generation.concurrency": BUILD_CONCURRENCY,
        },
    )
    cfg.run_dir = run_dir
    teacher = TasksTeacher(vocabulary())
    start = time.perf_counter()
    last = [0.0]

    def progress(kept: int, target: int, info: dict) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            print(
                f"  build: {kept:,} of {target:,} kept, {info['requests']:,} requests", flush=True
            )

    with open_run(cfg) as store:
        result = staged(store, "generate", lambda: generate(store, cfg, teacher, progress))
        facts = {
            "kept": result.kept,
            "requests": result.requests,
            "generated": store.funnel()["generated"],
            "stored_requests": store.request_totals()["requests"],
            "build_s": time.perf_counter() - start,
        }
    (run_dir / "bench-resume.json").write_text(json.dumps(facts))
    return facts


def set_teacher_port(run_dir: Path, port: int) -> None:
    """Point the stored configuration's teacher at 127.0.0.1:port (the resume reads it)."""
    from tutelage.store import Store

    with Store(run_dir) as store:
        config = store.get_meta("config")
        config["teacher"]["base_url"] = f"http://127.0.0.1:{port}/v1"
        store.set_meta("config", config)


# -- 2. resume ------------------------------------------------------------------------------------
def resume(
    run_dir: Path, target: int, first_answer: int, profile: Path | None, source: Path | None
) -> dict:
    """One `tutelage generate --run-dir RUN --target target` against a fresh server; `source`:
    another source tree of tutelage to run instead of this one (PYTHONPATH)."""
    port = free_port()
    set_teacher_port(run_dir, port)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--first-answer", str(first_answer)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if server.stdout.readline().strip() != "READY":
            raise RuntimeError("the resume server did not start")
        command = [sys.executable]
        if profile is not None:
            command += ["-m", "cProfile", "-o", str(profile)]
        command += ["-m", "tutelage.cli", "generate", "--run-dir", str(run_dir)]
        command += ["--target", str(target)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        env = dict(os.environ, **({"PYTHONPATH": str(source)} if source else {}))
        cli = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        end = time.time()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if cli.returncode != 0:
            raise RuntimeError(f"tutelage generate failed:\n{cli.stdout}\n{cli.stderr}")
        line = server.stdout.readline().split()
        if not line or line[0] != "FIRST":
            raise RuntimeError("the resume server got no request")
        first = float(line[1])
    finally:
        server.terminate()
        server.wait()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "to_first_request_s": first - start,
        "whole_s": end - start,
        "cpu_s": cpu,
        "output": cli.stdout + cli.stderr,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50_000, help="kept tasks of the finished run")
    parser.add_argument("--more", type=int, default=10, help="the target raised by this much")
    parser.add_argument("--repeats", type=int, default=3, help="resumes (0: build the run only)")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--rebuild", action="store_true", help="build the run again")
    parser.add_argument("--profile", type=Path, help="cProfile the first resume into this file")
    parser.add_argument(
        "--baseline", type=Path, help="also resume with this source tree (e.g. an older commit's)"
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first-answer", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.first_answer)

    run_dir = args.run_dir or Path(tempfile.gettempdir()) / f"tutelage-bench-resume-{args.tasks}"
    facts_file = run_dir / "bench-resume.json"
    if args.rebuild and run_dir.exists():
        shutil.rmtree(run_dir)
    load = os.getloadavg()
    print(f"bench/resume.py: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    if facts_file.exists():
        facts = json.loads(facts_file.read_text())
        print(f"run {run_dir}: built earlier ({facts['kept']:,} kept)")
    else:
        print(f"building {run_dir}: a finished run of {args.tasks:,} kept tasks")
        facts = build(run_dir, args.tasks)
        print(f"  built in {facts['build_s']:.0f} s")
    if args.repeats == 0:  # --repeats 0: build the run only
        return
    from tutelage.store import Store

    trees = {"this tree": None, **({str(args.baseline): args.baseline} if args.baseline else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for i in range(args.repeats):
        for name, source in trees.items():  # alternating, so that they share the machine
            with Store(run_dir) as store:
                kept, answered = store.funnel()["kept"], store.request_totals()["requests"]
            db_mb = sum(p.stat().st_size for p in run_dir.glob("tutelage.db*")) / 1e6
            profile = args.profile if i == 0 and source is None else None
            r = resume(run_dir, kept + args.more, answered, profile, source)
            r.update(kept=kept, requests=answered, db_mb=db_mb)
            runs[name].append(r)
            print(
                f"  resume {i + 1} ({name}): {kept:,} kept, {answered:,} stored requests: first "
                f"new request after {r['to_first_request_s']:.2f} s (CPU {r['cpu_s']:.2f} s in "
                f"all), whole process {r['whole_s']:.2f} s",
                flush=True,
            )
    load = os.getloadavg()
    bar = "|" if args.markdown else ""
    columns = [
        "source",
        "stored requests",
        "kept",
        "store MB",
        "resumes",
        "to first new request, median (min-max)",
        "whole process, median",
        "its CPU, median",
    ]
    print(f"\n{bar} " + f" {bar} ".join(columns) + f" {bar}")
    if args.markdown:
        print("|" + "---|" * len(columns))
    for name, tree_runs in runs.items():
        firsts = [r["to_first_request_s"] for r in tree_runs]
        cells = [
            name,
            f"{tree_runs[0]['requests']:,}",
            f"{tree_runs[0]['kept']:,}",
            f"{tree_runs[0]['db_mb']:.0f}",
            str(len(tree_runs)),
            f"{statistics.median(firsts):.2f} s ({min(firsts):.2f}-{max(firsts):.2f})",
            f"{statistics.median(r['whole_s'] for r in tree_runs):.2f} s",
            f"{statistics.median(r['cpu_s'] for r in tree_runs):.2f} s",
        ]
        print(f"{bar} " + f" {bar} ".join(cells) + f" {bar}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    print("last resume's output:\n" + runs["this tree"][-1]["output"])


if __name__ == "__main__":
    main()
