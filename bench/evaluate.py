"""Evaluation throughput on the embedded models: items per second for each part of the stage.

One temporary run folder holds the first N built-in evaluation instructions (with reference
answers) as its only set. `tutelage.evaluate.evaluate` then runs its parts in order:
- the students answer: Gemma-3-270M as base and as "tuned" (the same weights: this measures
  speed, not quality), greedy, batched by `evaluate.students.BATCH_SIZE`, each answer also scored
  by reference NLL;
- the teacher answers: SmolLM2-135M-Instruct through llama.cpp and the ledger;
- the judge: the same teacher judges tuned:base and tuned:teacher, both orders each.
Each part's items/s comes from the stage's own progress callbacks.

The baseline is the same student part with batches of 1 (generation one prompt at a time, as a
plain `generate` loop does), on the same items in the same run: the ratio is batched / unbatched.

Run: `python bench/evaluate.py` (about 8-12 minutes on 2 idle cores).
Options: --items N (16), --max-new-tokens N (64), --seed S, --markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

import tutelage.evaluate as ev
from tutelage.config import Config
from tutelage.evaluate import students as eval_students
from tutelage.model_files import embedded_student_hf
from tutelage.store import Store

console = Console(width=None if sys.stdout.isatty() else 160)


def run_stage(folder: Path, args: argparse.Namespace, batch_size: int, judge: bool) -> dict:
    """One evaluation in a fresh run folder: seconds spent per part, and items per part."""
    folder.mkdir(parents=True)
    items = [json.loads(line) for line in ev.BUILTIN_SET.read_text().splitlines()][: args.items]
    eval_file = folder / "bench-set.jsonl"
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in items))
    config = Config(
        run_dir=folder / "run",
        seed=args.seed,
        evaluation={
            "builtin_set": False,
            "sets": [eval_file],
            "max_new_tokens": args.max_new_tokens,
            "include_teacher": judge,
            "pairs": ["tuned:base", "tuned:teacher"] if judge else [],
            "judge_retries": 1,
            "judge_max_tokens": 160,
            "bootstrap": 200,
        },
    )
    store = Store(config.run_dir)
    marks: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    start = time.perf_counter()

    def progress(done: int, total: int, part: str) -> None:
        now = time.perf_counter()
        marks.setdefault(part, [now])  # first tick of a part: its start is the previous end
        marks[part].append(now)
        counts[part] = total

    eval_students.BATCH_SIZE = batch_size
    summary = ev.evaluate(
        store, config, config.run_dir, tuned_model=embedded_student_hf(), progress=progress
    )
    wall = time.perf_counter() - start
    # A part runs from the end of the part before it (or the start) to its last tick.
    ends = sorted((ticks[-1], part) for part, ticks in marks.items())
    seconds, before = {}, start
    for end, part in ends:
        seconds[part], before = end - before, end
    students = counts.get("base", 0)  # the students' ticks count base and tuned together
    out = {
        "wall_s": wall,
        "students_items": students,
        "students_s": seconds.get("base", 0) + seconds.get("tuned", 0),
    }
    if judge:
        out |= {
            "teacher_items": counts.get("teacher", 0),
            "teacher_s": seconds.get("teacher"),
            "judge_items": counts.get("judge", 0),
            "judge_s": seconds.get("judge"),
            "judge_failed": sum(j["status"] == "failed" for j in store.judgements()),
            "summary": summary.to_detail(),
        }
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    console.print(
        f"{args.items} items, {args.max_new_tokens} new tokens at most; load average "
        f"{load} at the start",
        highlight=False,
    )

    with tempfile.TemporaryDirectory(prefix="tutelage-bench-eval-") as tmp:
        batched = run_stage(Path(tmp) / "batched", args, eval_students.BATCH_SIZE, judge=True)
        single = run_stage(Path(tmp) / "single", args, 1, judge=False)

    table = Table(box=box.MARKDOWN if args.markdown else box.HEAVY_HEAD)
    for col in ("part", "items", "seconds", "items/s"):
        table.add_column(col, justify="left" if col == "part" else "right")
    rows = [
        (
            "students answer, batches of 8 (base + tuned)",
            batched["students_items"],
            batched["students_s"],
        ),
        (
            "students answer, one at a time (baseline)",
            single["students_items"],
            single["students_s"],
        ),
        ("teacher answers (llama.cpp, ledger)", batched["teacher_items"], batched["teacher_s"]),
        ("judge: pairs judged, both orders each", batched["judge_items"], batched["judge_s"]),
    ]
    for part, n, s in rows:
        table.add_row(part, str(n), f"{s:.1f}", f"{n / s:.2f}")
    console.print(table)
    ratio = (batched["students_items"] / batched["students_s"]) / (
        single["students_items"] / single["students_s"]
    )
    console.print(
        f"batched / one at a time: [bold]{ratio:.2f}x[/]; whole stage with teacher and "
        f"judge: {batched['wall_s']:.0f} s; judgements failed (unparseable after a "
        f"retry): {batched['judge_failed']} of {batched['judge_items']}",
        highlight=False,
    )
    metrics = batched["summary"]["sets"]["bench-set"]["metrics"]
    for name in ("win_rate", "lc_win_rate"):
        for pair, v in metrics.get(name, {}).items():
            if v.get("mean") is not None:
                console.print(
                    f"{name} {pair}: {v['mean']:.2f} [{v['ci_low']:.2f}, "
                    f"{v['ci_high']:.2f}] over {v['n']} items",
                    highlight=False,
                )


if __name__ == "__main__":
    main()
