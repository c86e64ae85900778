"""Generation recipes on the embedded teacher: Alpaca against Self-Instruct, same target.

Each recipe runs `tutelage.generate` in a fresh temporary run folder on SmolLM2-135M-Instruct
(Q4_1 GGUF, llama-cpp-python, completion prompts as the embedded teacher uses them), with the
recipe's own defaults except one cap shared by both: at most 512 new tokens for the main request
(the 135M teacher loops on past that; Self-Instruct's stops end its list sooner anyway). Each run
stops at the target of kept instructions or at its request cap, whichever comes first.

Reported per recipe: wall time, main requests and every teacher request by step (generate,
classify, instances), teacher tokens, kept instructions and kept instances, then
kept instructions per main request, per teacher request, per 1,000 teacher tokens (in + out) and
per minute, and the rejection funnels (instructions; for Self-Instruct, instances too).

Run: `python bench/generation.py` (about 5-10 minutes on 2 idle cores).
Options: --target N (10), --max-requests-alpaca N (40), --max-requests-self-instruct N (12),
--recipes alpaca,self-instruct, --threads T (2), --max-tokens N (512), --seed S, --markdown,
--keep DIR (keep the run folders there, e.g. for `tutelage generate --explain DIR/alpaca`).
The machine is shared and noisy: compare the two recipes within one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from tutelage.config import load_config
from tutelage.generate import generate
from tutelage.pipeline import open_run
from tutelage.teachers import make_teacher

console = Console(width=None if sys.stdout.isatty() else 160)
BOX = box.HEAVY_HEAD  # box.MARKDOWN with --markdown


def run_recipe(recipe: str, args: argparse.Namespace, folder: Path) -> dict:
    max_requests = (
        args.max_requests_alpaca if recipe == "alpaca" else args.max_requests_self_instruct
    )
    config = load_config(
        None,
        {
            "seed": args.seed,
            "generation.recipe": recipe,
            "generation.target": args.target,
            "generation.max_requests": max_requests,
            "generation.stall_requests": max_requests,
            "teacher.threads": args.threads,
            "teacher.sampling.max_tokens": args.max_tokens,
        },
    )
    config.run_dir = folder / recipe
    store = open_run(config)
    teacher = make_teacher(config.teacher)
    start = time.perf_counter()

    def progress(kept: int, target: int, info: dict) -> None:
        console.print(
            f"  {recipe}: {kept}/{target} kept after {info['requests']} requests, "
            f"{time.perf_counter() - start:.0f} s",
            highlight=False,
        )

    result = generate(store, config, teacher, progress)
    wall = time.perf_counter() - start
    by_step = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    totals = store.request_totals()
    row = {
        "recipe": recipe,
        "stop": result.stop_reason,
        "wall_s": wall,
        "main": result.requests,
        "by_step": by_step,
        "requests": sum(by_step.values()),
        "tokens": totals["tokens_in"] + totals["tokens_out"],
        "tokens_in": totals["tokens_in"],
        "tokens_out": totals["tokens_out"],
        "kept": result.kept,
        "instances": len(store.examples()),
        "funnel": store.funnel(),
        "instance_funnel": store.instance_funnel() if recipe == "self-instruct" else None,
    }
    store.close()
    return row


def report(rows: list[dict], args: argparse.Namespace) -> None:
    table = Table(
        title=f"Generation on the embedded teacher, target {args.target} kept instructions", box=BOX
    )
    for col in (
        "recipe",
        "stop",
        "wall s",
        "main requests",
        "teacher requests (by step)",
        "tokens in / out",
        "kept instr.",
        "kept instances",
        "kept / main req.",
        "kept / teacher req.",
        "kept / 1k tokens",
        "kept / min",
    ):
        table.add_column(col, justify="left" if col in ("recipe", "stop") else "right")
    for r in rows:
        steps = ", ".join(f"{k} {v}" for k, v in sorted(r["by_step"].items()))
        table.add_row(
            r["recipe"],
            r["stop"],
            f"{r['wall_s']:.0f}",
            str(r["main"]),
            f"{r['requests']} ({steps})",
            f"{r['tokens_in']:,} / {r['tokens_out']:,}",
            str(r["kept"]),
            str(r["instances"]),
            f"{r['kept'] / max(r['main'], 1):.2f}",
            f"{r['kept'] / max(r['requests'], 1):.2f}",
            f"{1000 * r['kept'] / max(r['tokens'], 1):.2f}",
            f"{60 * r['kept'] / r['wall_s']:.2f}",
        )
    console.print(table)
    for r in rows:
        console.print(f"{r['recipe']} instructions: {funnel_line(r['funnel'])}", highlight=False)
        if r["instance_funnel"]:
            console.print(
                f"{r['recipe']} instances: {funnel_line(r['instance_funnel'])}", highlight=False
            )


def funnel_line(funnel: dict) -> str:
    rejected = sorted(funnel["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))
    parts = ", ".join(f"{reason} {n}" for reason, n in rejected) or "nothing rejected"
    return f"{funnel['generated']} -> {parts} -> {funnel['kept']} kept"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=int, default=10, help="kept instructions to stop at")
    parser.add_argument("--max-requests-alpaca", type=int, default=40)
    parser.add_argument("--max-requests-self-instruct", type=int, default=12)
    parser.add_argument("--recipes", default="alpaca,self-instruct")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--max-tokens", type=int, default=512, help="main request's cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="tables in Markdown")
    parser.add_argument("--keep", type=Path, help="keep the run folders in this folder")
    args = parser.parse_args(argv)
    if args.markdown:
        global BOX
        BOX = box.MARKDOWN
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        rows = []
        for recipe in args.recipes.split(","):
            console.print(f"[bold]{recipe}[/]")
            rows.append(run_recipe(recipe, args, folder))
    report(rows, args)


if __name__ == "__main__":
    main()
