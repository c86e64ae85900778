"""The embedded judge in both modes: written verdicts (`judge_mode: text`) against one-token
log-prob verdicts (`judge_mode: logprobs`), on the same pairs in the same run.

Each pair is a task with a right answer and a wrong or off-topic one (written here), judged in
both orders as the evaluation stage judges it, through a ledger on a temporary store, by
SmolLM2-135M-Instruct on llama.cpp in completion mode (the demo's judge). Reported per mode:
seconds per pair, pairs without a verdict, the mean score of the right answer (1 = always
preferred), and the position bias (the share of pairs whose two orders preferred different
answers). The baseline is the text mode, with one retry as the shipped configuration has.

Run: `python bench/judge_modes.py` (about a minute on 2 idle cores). Options: --pairs N (8),
--threads N (2), --markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from tutelage.evaluate.judge import judge_pair, judge_pair_logprobs
from tutelage.model_files import embedded_teacher_gguf
from tutelage.store import Store
from tutelage.teachers import Ledger
from tutelage.teachers.llamacpp import LlamaCppTeacher

PAIRS = [  # (task, right answer, wrong answer)
    ("Name a primary colour.", "Red is a primary colour.", "Bananas grow in warm places."),
    ("What is 2 + 3?", "2 + 3 = 5.", "I'm sorry, I cannot help with that."),
    ("Translate 'cat' into French.", "chat", "The cat sat on the mat all afternoon."),
    ("Give the opposite of 'hot'.", "Cold.", "Hot means a high temperature."),
    ("Name the largest ocean on Earth.", "The Pacific Ocean.", "Mount Everest is very tall."),
    ("Spell 'dog' backwards.", "god", "Dogs are loyal pets."),
    ("How many days are in a week?", "Seven.", "A year has twelve months."),
    ("Write the word 'yes' in capital letters.", "YES", "no"),
]


async def judge_all(teacher, mode: str, pairs: list[tuple[str, str, str]]) -> dict:
    with Store(Path(tempfile.mkdtemp())) as store:
        ledger = Ledger(teacher, store)
        start = time.perf_counter()
        verdicts = []
        for task, right, wrong in pairs:
            if mode == "logprobs":
                verdict = await judge_pair_logprobs(
                    ledger, chat=False, instruction=task, first=right, second=wrong
                )
            else:
                verdict = await judge_pair(
                    ledger,
                    chat=False,
                    instruction=task,
                    first=right,
                    second=wrong,
                    retries=1,
                    max_tokens=160,
                )
            verdicts.append(verdict)
        seconds = time.perf_counter() - start
    scores = [v.score for v in verdicts if v.score is not None]
    decided = [v for v in verdicts if v.score is not None]
    return {
        "mode": mode,
        "pairs": len(pairs),
        "s_per_pair": seconds / len(pairs),
        "no_verdict": len(pairs) - len(decided),
        "right_preferred": sum(scores) / len(scores) if scores else None,
        "position_bias": (
            sum(not v.consistent for v in decided) / len(decided) if decided else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=len(PAIRS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    teacher = LlamaCppTeacher(embedded_teacher_gguf(), threads=args.threads)
    pairs = PAIRS[: args.pairs]
    rows = [asyncio.run(judge_all(teacher, mode, pairs)) for mode in ("text", "logprobs")]
    ratio = rows[0]["s_per_pair"] / rows[1]["s_per_pair"]

    def fmt(v) -> str:
        return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    header = ["mode", "pairs", "s_per_pair", "no_verdict", "right_preferred", "position_bias"]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(fmt(row[h]) for h in header) + " |")
    else:
        for row in rows:
            print("  ".join(f"{h}={fmt(row[h])}" for h in header))
    print(f"log-prob verdicts are {ratio:.1f}x faster per pair than written ones")


if __name__ == "__main__":
    main()
