"""The capture stage on the embedded teacher (SmolLM2-135M-Instruct Q4_1, llama.cpp): how fast the
teacher scores answers under teacher forcing, against how fast it writes them, and what a captured
token costs in the store.

1. Plain generation: `LlamaCppTeacher.complete`, greedy chat answers to N short tasks (at most
   `--max-tokens` tokens each): generated tokens a second.
2. Capture: the same answers scored by `LlamaCppTeacher.score` (top-k log-probs at each answer
   token, prompt and answer read in one pass): answer tokens a second, and every token read a
   second. Then through the whole stage (`capture.capture`: the ledger, the store) into a run.
3. Storage: bytes a captured answer token takes in the store's arrays (4 + 6k), and what zlib
   would make of them (not used: the measure of what compression could give).

The runs alternate (`--repeats`) and medians are taken. Run: `python bench/capture.py` (about a
minute on 2 idle cores); `--markdown` prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import add_examples

from tutelage.capture import capture, load_captures
from tutelage.config import load_config
from tutelage.model_files import embedded_teacher_gguf
from tutelage.store import Store
from tutelage.teachers import Request
from tutelage.teachers.llamacpp import LlamaCppTeacher
from tutelage.teachers.scoring import ScoreRequest

TASKS = [
    "Name three primary colors.",
    "What is the capital of France?",
    "Give a synonym for the word happy.",
    "Explain in one sentence what a noun is.",
    "List two fruits that are red.",
    "What does a thermometer measure?",
    "Write a short greeting for a birthday card.",
    "Why do we need sleep?",
]


def user(task: str) -> dict:
    return {"role": "user", "content": task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=len(TASKS))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    tasks = TASKS[: args.tasks]
    teacher = LlamaCppTeacher(embedded_teacher_gguf(), n_ctx=1024, threads=args.threads)
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    asks = [Request.make(messages=[user(t)], sampling=sampling) for t in tasks]

    generate_rates, score_rates, read_rates = [], [], []
    generate_seconds, score_seconds = [], []
    answers: list[str] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        completions = asyncio.run(teacher.complete(asks))
        seconds = time.perf_counter() - start
        answers = [c.text for c in completions]
        generate_seconds.append(seconds)
        generate_rates.append(sum(c.tokens_out for c in completions) / seconds)

        requests = [
            ScoreRequest.make([user(t), {"role": "assistant", "content": a}], top_k=args.top_k)
            for t, a in zip(tasks, answers, strict=True)
        ]
        start = time.perf_counter()
        scored = asyncio.run(teacher.score(requests))
        seconds = time.perf_counter() - start
        score_seconds.append(seconds)
        score_rates.append(sum(len(s.answer_ids) for s in scored) / seconds)
        read_rates.append(sum(s.tokens_in for s in scored) / seconds)
        print(
            f"generation {generate_rates[-1]:.0f} tok/s, capture {score_rates[-1]:.0f} answer "
            f"tok/s",
            file=sys.stderr,
            flush=True,
        )

    # The whole stage: ledger and store included, into a fresh run.
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            {
                "run_dir": tmp,
                "training.distill.top_k": args.top_k,
                "student.from_teacher": {"layers": 2},
            },
        )
        with Store(tmp) as store:
            add_examples(store, [(t, "", a) for t, a in zip(tasks, answers, strict=True)], "train")
            result = capture(store, config, teacher=teacher)
            captured = load_captures(store)
            raw = sum(
                c.answer_ids.nbytes + c.topk_ids.nbytes + c.topk_logprobs.nbytes
                for c in captured.values()
            )
            packed = sum(
                len(zlib.compress(c.answer_ids.tobytes() + c.topk_ids.tobytes(), 6))
                + len(zlib.compress(c.topk_logprobs.tobytes(), 6))
                for c in captured.values()
            )
            wal = Path(f"{store.path}-wal")
            db_bytes = os.path.getsize(store.path) + (wal.stat().st_size if wal.exists() else 0)

    generate, score = statistics.median(generate_rates), statistics.median(score_rates)
    rows = [
        ("generation, generated tokens/s", f"{generate:.0f}"),
        ("capture (score), answer tokens/s", f"{score:.0f}"),
        (
            "capture (score), tokens read/s (prompt + answer)",
            f"{statistics.median(read_rates):.0f}",
        ),
        ("capture / generation (answer tokens/s)", f"{score / generate:.1f}x"),
        (
            "seconds for the same answers: generating / scoring",
            f"{statistics.median(generate_seconds):.1f} / {statistics.median(score_seconds):.1f}",
        ),
        ("capture stage (ledger + store), answer tokens/s", f"{result.tokens_per_s:.0f}"),
        ("answer tokens captured", f"{result.tokens}"),
        (f"bytes a token, stored arrays (k = {args.top_k})", f"{raw / result.tokens:.0f}"),
        ("bytes a token, zlib level 6 (not used)", f"{packed / result.tokens:.0f}"),
        ("store after capture, file + WAL (bytes, the run's other rows too)", f"{db_bytes}"),
    ]
    load = os.getloadavg()[0]
    print(
        f"{len(tasks)} tasks, max_tokens {args.max_tokens}, top_k {args.top_k}, "
        f"threads {args.threads}, {args.repeats} repeats (medians), load average {load:.1f}"
    )
    if args.markdown:
        print("| measure | value |\n|---|---:|")
        for name, value in rows:
            print(f"| {name} | {value} |")
    else:
        for name, value in rows:
            print(f"{name:<62} {value:>10}")


if __name__ == "__main__":
    main()
