"""Logit distillation on the embedded teacher: SFT, forward KL and JSD, from the same data in the
same steps, measured on held-out answers.

Data (one run folder, the CLI stages as a user runs them from examples/distill.yaml): the
embedded teacher, SmolLM2-135M-Instruct through llama.cpp, answers --prompts instructions sampled
from ../shared/data/instructions-19k.jsonl (seeded; the built-in evaluation instructions left
out) with the answer recipe, greedy, at most --answer-tokens tokens (`tutelage generate`); the
filter keeps them (examples/distill.yaml's rules) and holds out --test of them as the test split
(`tutelage filter`); the teacher scores every kept answer, its top --top-k log-probs at each
token (`tutelage capture`, llama.cpp).

Student: the teacher pruned to --layers of its 30 layers (`student.from_teacher`, Minitron's
rule: the first layers-1 and the last), built once. Three trainings from that same start on the
same train split, in the same order, with the same settings (--steps, --batch-size, --lr,
--max-seq-len, --method, the chat prompt format): `sft` (training.distill unset: cross-entropy on
the teacher's text), `forward_kl` and `jsd` (alpha --alpha, temperature --temperature, top_k,
JSD's beta --beta). Each trains in this process through `tutelage.train.train`.

Measured for each trained student and the untrained pruned one, by the evaluation's own
functions (tutelage.evaluate.students):
- on the test split: the NLL per token of the teacher's answer (`reference_nll`) and the KL from
  the teacher, KL(teacher || student) per answer token over the teacher's top-k and the rest as
  one bucket (`teacher_kl`);
- on the first --builtin built-in instructions: ROUGE-L F1 of the greedy answer (at most
  --max-new-tokens) against the built-in reference;
each a mean with a bootstrap 95% interval, and for the two distilled students the paired
difference from SFT (per item) with its own interval.
From the data run: the teacher's generation speed (generated tokens a second, the ledger's
tokens and latency of the answer requests) against the capture's (answer tokens scored a second,
the capture stage's figure), and the bytes stored per captured token. bench/capture.py measures
those two speeds more carefully, side by side on the same answers.

Goal: distillation beats SFT on held-out NLL and on KL to the teacher, with intervals that do not
overlap.

Run: `python bench/distill.py --markdown` (about 50 minutes with --threads 1 beside one other
one-thread job: generation 13, capture 9, each training 10-12, the measurements 2-3 each).
Options: --prompts, --answer-tokens, --test, --layers, --steps, --batch-size, --lr,
--method full|lora, --max-seq-len, --alpha, --temperature, --top-k, --beta,
--runs sft,forward_kl,jsd, --builtin, --max-new-tokens, --threads, --seed, --bootstrap,
--keep DIR (keep the run folders; the data run and finished trainings in it are reused),
--data-only (stop after the data run), --json FILE, --markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "instructions-19k.jsonl"
EXAMPLE = ROOT / "examples" / "distill.yaml"
NEVER = 10**9
VARIANTS = ("sft", "forward_kl", "jsd")

console = Console(width=None if sys.stdout.isatty() else 200)
BOX = box.HEAVY_HEAD


# -- the data run: generate, filter, capture -------------------------------------------------------
def write_config(path: Path, args: argparse.Namespace, run_dir: Path, prompts: Path, distill):
    """examples/distill.yaml with the bench's settings, written to `path` and validated."""
    from tutelage.config import load_config

    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    changes = {
        "run_dir": str(run_dir),
        "seed": args.seed,
        "teacher.threads": args.threads,
        "student.from_teacher.layers": args.layers,
        "student.method": args.method,
        "generation.prompts": str(prompts),
        "generation.target": NEVER,
        "generation.max_requests": NEVER,
        "generation.stall_requests": NEVER,
        "generation.answer_sampling.max_tokens": args.answer_tokens,
        "filter.test_fraction": 0.5,  # capped by test_max
        "filter.test_max": args.test,
        "training.max_steps": args.steps,
        "training.batch_size": args.batch_size,
        "training.learning_rate": args.lr,
        "training.max_seq_len": args.max_seq_len,
        "training.threads": args.threads,
        "training.eval_every": max(1, args.steps // 4),
        "training.save_every": NEVER,
        "training.distill": distill,
        "evaluation.include_teacher": False,
    }
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_config(path)  # a bad field fails here, in one line
    return path


def sample_prompts(path: Path, n: int, seed: int) -> Path:
    """n instructions from the shared file, shuffled with `seed`, none of the built-in set's."""
    from tutelage.evaluate.sets import BUILTIN_SET, load_eval_file

    builtin = {item.instruction for item in load_eval_file(BUILTIN_SET)}
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["instruction"] not in builtin]
    random.Random(seed).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]), encoding="utf-8")
    return path


def cli(*arguments: str, threads: int) -> float:
    """Run a tutelage command; its wall seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tutelage", *arguments],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"tutelage {' '.join(arguments)} failed:\n{done.stdout[-2000:]}")
    return time.perf_counter() - start


def data_run(work: Path, args: argparse.Namespace) -> dict:
    """Generate, filter and capture in work/data (reusing what a kept folder finished)."""
    from tutelage.config import load_config
    from tutelage.model_files import resolve_base_student
    from tutelage.store import Store

    run = work / "data"
    config = write_config(
        work / "data.yaml",
        args,
        run,
        sample_prompts(work / "prompts.jsonl", args.prompts, args.seed),
        distill_settings(args, "forward_kl"),
    )
    seconds = {}
    for stage in ("generate", "filter", "capture"):
        stages = Store(run).stages() if (run / "tutelage.db").exists() else {}
        if stages.get(stage, {}).get("status") == "done":
            seconds[stage] = None  # reused
            continue
        console.print(f"[bold]data[/]: tutelage {stage}", highlight=False)
        seconds[stage] = cli(stage, "-c", str(config), "--run-dir", str(run), threads=args.threads)
    start = time.perf_counter()  # the pruned student, once: every training copies it
    resolve_base_student(load_config(config), run)
    seconds["prune"] = time.perf_counter() - start
    return {"run": run, "config": config, "seconds": seconds}


def distill_settings(args: argparse.Namespace, loss: str) -> dict | None:
    if loss == "sft":
        return None
    return {
        "loss": loss,
        "alpha": args.alpha,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "beta": args.beta,
    }


def data_figures(run: Path) -> dict:
    """Kept examples per split, the teacher's generation and capture speeds, bytes a token."""
    from tutelage.store import Store

    with Store(run) as store:
        splits = {}
        for row in store.examples():
            splits[row["split"]] = splits.get(row["split"], 0) + 1
        purposes = store.request_totals_by_purpose()
        capture = store.stages()["capture"]["result"]
    answered = [p for p in purposes if p["purpose"] in ("generate", "answer")]  # the answers
    tokens = sum(p["tokens_out"] for p in answered)
    latency = sum(p["latency_s"] for p in answered)
    return {
        "splits": splits,
        "generated_tokens": tokens,
        "generation_tok_s": tokens / latency if latency else None,
        "capture_tokens": capture.tokens,
        "capture_tok_s": capture.tokens_per_s,
        "bytes_per_token": capture.bytes_per_token,
        "capture_teacher": capture.teacher,
    }


# -- the trainings -------------------------------------------------------------------------------
def copy_run(data: Path, run: Path) -> None:
    """A fresh run folder holding the data run's store (its examples and captures) and its
    pruned student, so that every training starts from the same weights."""
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "tutelage.db").exists():
        with (
            sqlite3.connect(data / "tutelage.db") as source,
            sqlite3.connect(run / "tutelage.db") as target,
        ):
            source.backup(target)
    base = data / "student-base"
    if base.exists():  # always the data run's: a kept folder may hold another --layers' student
        shutil.rmtree(run / "student-base", ignore_errors=True)
        shutil.copytree(base, run / "student-base")


def train_variant(work: Path, data: dict, args: argparse.Namespace, variant: str) -> dict:
    from tutelage.config import load_config
    from tutelage.store import Store
    from tutelage.train import train

    run = work / variant
    copy_run(data["run"], run)
    config_path = write_config(
        work / f"{variant}.yaml",
        args,
        run,
        work / "prompts.jsonl",
        distill_settings(args, variant),
    )
    config = load_config(config_path)
    console.print(f"[bold]{variant}[/]: training {args.steps} steps", highlight=False)
    start = time.perf_counter()
    with Store(run) as store:
        result = train(store, config, run)
        steps = store.train_steps(result.run_id)
    return {
        "run": run,
        "student": Path(result.output_dir),
        "seconds": time.perf_counter() - start,
        "reused": result.reused,
        "final_train_loss": steps[-1]["loss"],
        "final_ce": steps[-1].get("ce_loss"),
        "final_divergence": steps[-1].get("divergence"),
        "final_eval_loss": next(
            (s["eval_loss"] for s in reversed(steps) if s["eval_loss"] is not None), None
        ),
    }


# -- the measurements ------------------------------------------------------------------------------
def measure(model_path: Path, data_run: Path, args: argparse.Namespace) -> dict:
    """Per item: NLL and KL on the test split, ROUGE-L on the built-in set."""
    from tutelage.capture.storage import load_captures
    from tutelage.evaluate.sets import BUILTIN_SET, load_eval_file
    from tutelage.evaluate.students import (
        generate_answers,
        load_student,
        reference_nll,
        teacher_kl,
    )
    from tutelage.filter import rouge_l_f1, tokenize
    from tutelage.store import Store
    from tutelage.student_prompt import student_prompt
    from tutelage.train import torch_threads

    style = "chat"
    with Store(data_run) as store:
        captures = load_captures(store)
        test = [r for r in store.examples(split="test") if r["instance_id"] in captures]
    model, tokenizer = load_student(model_path)
    nll, kl = [], []
    with torch_threads(args.threads):
        for row in test:
            prompt = student_prompt(row["instruction"], row["input"], style, tokenizer)
            nll.append(reference_nll(model, tokenizer, prompt, row["output"], style)[0])
            kl.append(teacher_kl(model, tokenizer, prompt, captures[row["instance_id"]], style)[0])
        items = load_eval_file(BUILTIN_SET)[: args.builtin]
        rouge = []
        for start in range(0, len(items), 8):
            batch = items[start : start + 8]
            prompts = [student_prompt(i.instruction, i.input, style, tokenizer) for i in batch]
            answers = generate_answers(model, tokenizer, prompts, style, args.max_new_tokens)
            rouge += [
                rouge_l_f1(tokenize(i.reference), tokenize(a)) for i, a in zip(batch, answers)
            ]
    return {"nll": nll, "kl_teacher": kl, "rouge_l": rouge}


def interval(values: list[float], args: argparse.Namespace) -> dict:
    from tutelage.evaluate.stats import bootstrap_ci

    mean, low, high = bootstrap_ci(values, args.bootstrap, args.seed)
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


# -- the report ----------------------------------------------------------------------------------
def show(figures: dict, args: argparse.Namespace) -> None:
    metrics = ("nll", "kl_teacher", "rouge_l")
    better = {"nll": "lower", "kl_teacher": "lower", "rouge_l": "higher"}
    table = Table(title="Held-out figures (mean [95% CI], n)", box=BOX)
    table.add_column("student")
    for metric in metrics:
        table.add_column(f"{metric} ({better[metric]})", justify="right")
    for name, row in figures["students"].items():
        table.add_row(name, *(fmt(row["intervals"][m]) for m in metrics))
    console.print(table)
    table = Table(title="Paired difference from SFT, per item (mean [95% CI])", box=BOX)
    table.add_column("student")
    for metric in metrics:
        table.add_column(metric, justify="right")
    table.add_column("beats SFT, intervals apart (nll, kl)")
    for name, row in figures["students"].items():
        if "vs_sft" not in row:
            continue
        apart = [
            row["intervals"][m]["high"] < figures["students"]["sft"]["intervals"][m]["low"]
            for m in ("nll", "kl_teacher")
        ]
        table.add_row(
            name,
            *(fmt(row["vs_sft"][m], sign=True) for m in metrics),
            " / ".join("yes" if a else "no" for a in apart),
        )
    console.print(table)
    table = Table(title="Trainings", box=BOX)
    for column in ("student", "seconds", "train loss", "train CE", "train divergence", "eval CE"):
        table.add_column(column, justify="right")
    for name, t in figures["trainings"].items():
        table.add_row(
            name,
            f"{t['seconds']:.0f}" + (" (reused)" if t["reused"] else ""),
            *(num(t[k]) for k in ("final_train_loss", "final_ce", "final_divergence")),
            num(t["final_eval_loss"]),
        )
    console.print(table)
    d = figures["data"]
    console.print(
        f"data: {d['splits']} kept examples by split; teacher generation "
        f"{num(d['generation_tok_s'])} tokens/s ({d['generated_tokens']} tokens); capture "
        f"({d['capture_teacher']}) {num(d['capture_tok_s'])} answer tokens/s "
        f"({d['capture_tokens']} tokens), ratio {num(ratio(d))}; "
        f"{num(d['bytes_per_token'])} bytes stored per token",
        highlight=False,
    )
    console.print(f"stage seconds: {figures['stage_seconds']}", highlight=False)


def ratio(d: dict) -> float | None:
    if d["capture_tok_s"] and d["generation_tok_s"]:
        return d["capture_tok_s"] / d["generation_tok_s"]
    return None


def fmt(ci: dict, sign: bool = False) -> str:
    plus = "+" if sign else ""
    return f"{ci['mean']:{plus}.3f} [{ci['low']:{plus}.3f}, {ci['high']:{plus}.3f}] n={ci['n']}"


def num(value) -> str:
    return "-" if value is None else f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--answer-tokens", type=int, default=160)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--runs", default=",".join(VARIANTS))
    parser.add_argument("--builtin", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--data-only", action="store_true", help="stop after the data run")
    args = parser.parse_args()
    global BOX
    if args.markdown:
        BOX = box.MARKDOWN
    variants = [v for v in args.runs.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"--runs: unknown {sorted(unknown)} (known: {', '.join(VARIANTS)})")

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    data = data_run(work, args)
    if args.data_only:
        console.print(data_figures(data["run"]), highlight=False)
        return
    trainings = {v: train_variant(work, data, args, v) for v in variants}
    students = {"pruned (untrained)": {"path": data["run"] / "student-base"}}
    students.update({v: {"path": t["student"]} for v, t in trainings.items()})
    for name, s in students.items():
        console.print(f"[bold]{name}[/]: measuring", highlight=False)
        s["values"] = measure(s["path"], data["run"], args)
        s["intervals"] = {m: interval(v, args) for m, v in s["values"].items()}
    if "sft" in students:
        for name, s in students.items():
            if name in ("sft", "pruned (untrained)"):
                continue
            s["vs_sft"] = {
                m: interval(list(np.subtract(v, students["sft"]["values"][m])), args)
                for m, v in s["values"].items()
            }
    figures = {
        "date": time.strftime("%Y-%m-%d"),
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0],
        "seconds": time.perf_counter() - start,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "data": data_figures(data["run"]),
        "stage_seconds": data["seconds"],
        "trainings": {
            v: {k: x for k, x in t.items() if k not in ("run", "student")}
            for v, t in trainings.items()
        },
        "students": {
            name: {k: v for k, v in s.items() if k != "path"} | {"path": str(s["path"])}
            for name, s in students.items()
        },
    }
    show(figures, args)
    console.print(
        f"load average {load:.2f} at the start, {figures['load_average_end']:.2f} at the end; "
        f"{figures['seconds'] / 60:.1f} minutes; folders in {work}",
        highlight=False,
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
