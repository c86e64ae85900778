"""Generation recipes end to end: the same teacher time for each, then the same student training
and the same evaluation, so the recipes compare by what their data teaches.

Each recipe runs the CLI stages in a fresh run folder, as a user would (`tutelage generate`,
`filter`, `train`, `evaluate -c CONFIG --run-dir RUN`), from the demo's configuration
(src/tutelage/templates/tutelage.yaml: the embedded SmolLM2-135M-Instruct teacher, Gemma-3-270M
student, LoRA, its hyperparameters and seed), with these changes, the same for every recipe:
- generation: an unreachable target, no request cap and no stall stop; `tutelage generate` is
  killed (SIGKILL) --gen-seconds after it starts, model load included. The store commits each
  request as it is handled, so the kill loses only requests in flight. A recipe that runs out of
  input (Evol-Instruct's rounds) stops earlier and says so;
- filter: the demo's, except that no test split is held out (every recipe is evaluated on the same
  built-in set instead) and that the recipes generating their own instructions keep the ROUGE-L
  novelty filter at 0.7 (the demo, answering the seed tasks, has none);
- training: --steps optimizer steps (the demo's batch 8, learning rate 3e-4, max_seq_len 384), no
  GGUF export;
- evaluation: the first --eval-items built-in instructions (their reference answers are ours),
  greedy answers of at most 256 new tokens, no judge.

The base student's and the teacher's answers do not depend on the recipe: a reference run folder
answers them once (`tutelage evaluate` with no tuned student), and each recipe's store receives
copies of those rows and of their fingerprints (`eval_fingerprint_base`, `_teacher`) before its
`tutelage evaluate`. The stage accepts a stored answer whose fingerprint matches (same base model
files, prompt format and max_new_tokens; same teacher), so only the tuned student answers; the
table says "reused" when the copied rows came through untouched.

Recipes (--recipes picks some): alpaca (the baseline: the demo's recipe before issue 15),
alpaca-chat (alpaca with `generation.answer: chat`), self-instruct, magpie, evol-instruct, answer
(the teacher answers a fixed sample of --answer-prompts instructions from
../shared/data/instructions-19k.jsonl, shuffled with --seed, any built-in evaluation instruction
left out), answer-seeds (the teacher answers tutelage's own seed tasks, inputs included). A
recipe that tutelage does not register (tutelage.generate.loop.RECIPES) is skipped with a note.

Reported per recipe: kept tasks per minute of generation (and the ratio to alpaca's), teacher
tokens (in + out) per kept task, the share of generated records rejected as parse_error and the
commonest rejection reasons; on the built-in set, the tuned student's ROUGE-L and reference NLL
with bootstrap 95% intervals, tuned - base paired per item with its interval, the tuned student's
ROUGE-L minus alpaca's tuned student's, paired per item, its share of refusals, and the median
answer words of base / tuned / teacher; the teacher's and the base student's own figures once; the
wall time of each phase.

Run: `python bench/recipes.py --markdown --out bench-recipes.md` (about 2-2.5 hours on a quiet
2-core machine with the defaults). Options: --recipes a,b,... (all six),
--gen-seconds S (240), --clock wall|cpu (what --gen-seconds counts: wall time, or the generate
process's CPU time, fair between recipes on a busy machine; use it with --threads 1; kept tasks
are then per CPU minute), --steps N (30), --eval-items N (40), --answer-prompts N (2000),
--threads T (2: llama.cpp and torch), --seed S, --markdown, --out FILE (also write the tables as
Markdown),
--json FILE (the raw figures), --keep DIR (keep the run folders and logs there; a reference
run already there is resumed, so its answers are reused).
The machine is shared and noisy: compare recipes within one run, on a quiet machine. On a busy
one, --threads 1 is several times faster (llama.cpp's threads spin-wait for each other).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

import tutelage
from tutelage.config import load_config
from tutelage.evaluate.sets import BUILTIN_SET, load_eval_file
from tutelage.evaluate.stats import bootstrap_ci
from tutelage.pipeline import open_run
from tutelage.store import Store
from tutelage.templating import TEMPLATE_DIR

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "instructions-19k.jsonl"
DEMO_CONFIG = TEMPLATE_DIR / "tutelage.yaml"
SEED_TASKS = Path(tutelage.__file__).parent / "data" / "seed_tasks.jsonl"
BASELINE = "alpaca"
# Each variant: the recipe it runs and the configuration it changes.
NOVELTY = {"filter.rouge_threshold": 0.7}  # the list recipes' and Magpie's filter (Self-Instruct's)
VARIANTS = {
    "alpaca": {"generation.recipe": "alpaca", **NOVELTY},
    "alpaca-chat": {"generation.recipe": "alpaca", "generation.answer": "chat", **NOVELTY},
    "self-instruct": {"generation.recipe": "self-instruct", **NOVELTY},
    "magpie": {"generation.recipe": "magpie", **NOVELTY},
    # Rewrites are asked in chat (the embedded teacher continues a completion prompt with more
    # rewrite prompts); no ROUGE-L novelty filter: WizardLM has none, and an in-depth rewrite
    # shares most of its words with its parent by design (no_information_gain guards instead).
    "evol-instruct": {
        "generation.recipe": "evol-instruct",
        "teacher.chat": True,
        "filter.rouge_threshold": None,
    },
    # generation.prompts: the sample, set in main
    "answer": {"generation.recipe": "answer", **NOVELTY},
    # The answer recipe on tutelage's own seed tasks (one prompt per seed instance, inputs
    # included): what a demo can ship, since the outside instructions cannot be.
    "answer-seeds": {
        "generation.recipe": "answer",
        "generation.prompts": str(SEED_TASKS),
        "filter.rouge_threshold": None,
    },
}
NEVER = 10**9  # a target, request cap and stall count that generation never reaches
SHARED_ROLES = ("base", "teacher")  # answered once, in the reference run
SET = "builtin"

console = Console(width=None if sys.stdout.isatty() else 320)  # a log: no wrapping
BOX = box.HEAVY_HEAD  # box.MARKDOWN with --markdown


# -- configuration and the CLI ------------------------------------------------------------------
def write_config(path: Path, args: argparse.Namespace, changes: dict) -> Path:
    """The demo's configuration with the bench's common settings and `changes`, written to `path`
    and validated (a bad field fails here, in one line, before any stage runs)."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    common = {
        "seed": args.seed,
        "teacher.threads": args.threads,
        "generation.target": NEVER,
        "generation.max_requests": NEVER,
        "generation.stall_requests": NEVER,
        "filter.test_fraction": 0.0,
        "training.max_steps": args.steps,
        "training.gguf": None,
        "training.threads": args.threads,
        "evaluation.builtin_set": True,
        "evaluation.builtin_limit": args.eval_items,
        "evaluation.max_new_tokens": 256,
        "evaluation.include_teacher": True,
        "evaluation.pairs": [],
        "evaluation.rubric": False,
        "evaluation.ifeval_limit": 20,
    }
    for dotted, value in {**common, **changes}.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_config(path)
    return path


def cli(stage: str, config: Path, run: Path, log: Path) -> tuple[int, float]:
    """`tutelage STAGE -c CONFIG --run-dir RUN`, its output appended to `log`: (exit code, s)."""
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        rc = subprocess.call(
            tutelage_command(stage, config, run), stdout=out, stderr=subprocess.STDOUT
        )
    return rc, time.perf_counter() - start


def tutelage_command(stage: str, config: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "tutelage", stage, "-c", str(config), "--run-dir", str(run)]


def generate_for(
    seconds: float, config: Path, run: Path, log: Path, clock: str = "wall"
) -> tuple[str, float]:
    """`tutelage generate`, killed after `seconds` unless it ends first: (how it ended, the
    seconds it spent on `clock`).

    clock "wall": seconds of wall time. clock "cpu": seconds of the process's CPU time (the
    in-process llama.cpp teacher's work included): on a machine other jobs share, every recipe
    then gets the same teacher work, where wall time would give each whatever the load left."""
    start = time.perf_counter()
    used = 0.0  # CPU seconds, last seen
    with log.open("a", encoding="utf-8") as out:
        # Its own process group: the kill reaches it and whatever it started, nothing else.
        proc = subprocess.Popen(
            tutelage_command("generate", config, run),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        rc = None
        if clock == "wall":
            try:
                rc = proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                pass
        else:
            import psutil

            watched = psutil.Process(proc.pid)
            while rc is None:
                try:
                    rc = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    try:
                        used = sum(watched.cpu_times()[:2])
                    except psutil.NoSuchProcess:
                        continue
                    if used >= seconds:
                        break
        if rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    spent = time.perf_counter() - start if clock == "wall" else used
    if rc is None:
        return "killed", spent
    return ("ended" if rc == 0 else f"failed (exit {rc})"), spent


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# -- the runs -----------------------------------------------------------------------------------
def run_reference(folder: Path, args: argparse.Namespace) -> dict:
    """The base student's and the teacher's answers to the evaluation set, once for all. An
    earlier reference in `folder` (--keep) is resumed: its stored answers are reused as long as
    their fingerprints match, so it costs seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder / "config.yaml", args, {})
    run, log = folder / "run", folder / "log.txt"
    console.print("[bold]reference[/]: base student and teacher answer the set", highlight=False)
    # `tutelage evaluate` reads a run and never creates one: make this one (its store and seeds).
    with open_run(load_config(config).model_copy(update={"run_dir": run})):
        pass
    rc, seconds = cli("evaluate", config, run, log)
    if rc != 0:
        raise SystemExit(f"bench/recipes.py: the reference evaluation failed: {last_line(log)}")
    with Store(run) as store:
        rows = [r for r in store.eval_items(SET) if r["model_role"] in SHARED_ROLES]
        fingerprints = {r: store.get_meta(f"eval_fingerprint_{r}") for r in SHARED_ROLES}
    evaluation = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    console.print(f"  reference: {seconds:.0f} s", highlight=False)
    return {
        "run": run,
        "rows": rows,
        "fingerprints": fingerprints,
        "metrics": evaluation["sets"][SET]["metrics"],
        "evaluate_s": seconds,
    }


def run_variant(
    name: str, changes: dict, folder: Path, args: argparse.Namespace, reference: dict
) -> dict:
    """Generate for --gen-seconds, filter, train, evaluate (reusing the reference's answers)."""
    folder.mkdir(parents=True)
    config = write_config(folder / "config.yaml", args, changes)
    run, log = folder / "run", folder / "log.txt"
    row: dict = {"recipe": name, "seconds": {}, "log": str(log)}

    def phase(label: str, seconds: float) -> None:
        row["seconds"][label] = seconds
        console.print(f"  {name}: {label} {seconds:.0f} s", highlight=False)

    ended, seconds = generate_for(args.gen_seconds, config, run, log, args.clock)
    phase("generate", seconds)
    row["generation_end"] = ended
    if ended.startswith("failed") or not (run / "tutelage.db").exists():
        row["error"] = f"generate {ended}: {last_line(log)}"
        return row
    rc, seconds = cli("filter", config, run, log)
    phase("filter", seconds)
    if rc != 0:
        row["error"] = f"filter: {last_line(log)}"
        return row
    row |= generation_figures(run, ended)
    if not row["train_split"]:
        row["error"] = "no task kept: nothing to train on"
        return row
    rc, seconds = cli("train", config, run, log)
    phase("train", seconds)
    if rc != 0:
        row["error"] = f"train: {last_line(log)}"
        return row
    with Store(run) as store:
        copied = copy_shared_answers(store, reference)
    rc, seconds = cli("evaluate", config, run, log)
    phase("evaluate", seconds)
    if rc != 0:
        row["error"] = f"evaluate: {last_line(log)}"
        return row
    row |= evaluation_figures(run, copied)
    if not args.keep:
        shutil.rmtree(run / "student", ignore_errors=True)  # a gigabyte of weights each
    return row


def copy_shared_answers(store: Store, reference: dict) -> dict:
    """The reference run's base and teacher answers, with the fingerprints that let the stage
    reuse them (evaluate/stage.py clears a role's answers when its fingerprint differs); returns
    when each copy was stored, by (item, role), to tell afterwards whether it was kept."""
    for r in reference["rows"]:
        store.put_eval_item(
            r["set_name"],
            r["item_key"],
            r["model_role"],
            r["instruction"],
            r["input"],
            r["reference"],
            r["answer"],
            r["scores"],
        )
    for role, fingerprint in reference["fingerprints"].items():
        store.set_meta(f"eval_fingerprint_{role}", fingerprint)
    return {(r["item_key"], r["model_role"]): r["created_at"] for r in store.eval_items(SET)}


def generation_figures(run: Path, ended: str) -> dict:
    with Store(run) as store:
        stages = store.stages()
        funnel = stages["filter"]["result"].funnel
        splits = stages["filter"]["result"].splits
        # Every done request so far (all of them generation's), committed or not: the kill
        # loses no paid-for answer from the ledger.
        spent = store.request_totals_by_purpose()
        generate = stages.get("generate")
    stop = ended
    if generate and generate["status"] != "running":
        stop = getattr(generate["result"], "stop_reason", "") or generate["status"]
    return {
        "stop": stop,
        "requests": {p["purpose"]: p["requests"] for p in spent},
        "tokens": sum(p["tokens_in"] + p["tokens_out"] for p in spent),
        "generated": funnel.get("generated", 0),
        "kept": funnel.get("kept", 0),
        "rejected": funnel.get("rejected", {}),
        "train_split": splits.get("train", 0),
    }


def evaluation_figures(run: Path, copied: dict) -> dict:
    evaluation = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    with Store(run) as store:
        rows = store.eval_items(SET)
        train = store.stages()["train"]["result"]
    now = {(r["item_key"], r["model_role"]): r["created_at"] for r in rows}
    return {
        "metrics": evaluation["sets"][SET]["metrics"],
        "reused": all(now.get(key) == at for key, at in copied.items()),
        "tuned_rouge": {
            r["item_key"]: r["scores"].get("rouge_l") for r in rows if r["model_role"] == "tuned"
        },
        "tuned_words": median_words(rows, "tuned"),
        "train_loss": train.train_loss,
        "eval_loss": train.eval_loss,
    }


def median_words(rows: list[dict], role: str) -> float | None:
    words = [len(r["answer"].split()) for r in rows if r["model_role"] == role]
    return statistics.median(words) if words else None


def answer_prompts(path: Path, args: argparse.Namespace) -> Path:
    """A fixed sample of the shared instructions (seeded), none of them a built-in evaluation
    instruction, written to `path` for the answer recipe."""
    held = {item.instruction.strip() for item in load_eval_file(BUILTIN_SET)}
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["instruction"].strip() not in held]
    sample = random.Random(f"{args.seed}:answer-prompts").sample(
        rows, min(args.answer_prompts, len(rows))
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in sample), encoding="utf-8")
    return path


# -- the tables ---------------------------------------------------------------------------------
def ci(metrics: dict, metric: str, role: str, digits: int = 3) -> str:
    """ "mean [low, high]" for a role's metric from an evaluation summary, "-" when absent."""
    v = metrics.get(metric, {}).get(role)
    if not v or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.{digits}f} [{v['ci_low']:.{digits}f}, {v['ci_high']:.{digits}f}]"


def share_ci(metrics: dict, metric: str, role: str) -> str:
    v = metrics.get(metric, {}).get(role)
    if not v or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.0%} [{v['ci_low']:.0%}, {v['ci_high']:.0%}]"


def tables(rows: list[dict], reference: dict, args: argparse.Namespace) -> list[Table]:
    done = [r for r in rows if "kept" in r]
    base = next((r for r in done if r["recipe"] == BASELINE), None)

    generation = Table(
        title=(
            f"Generation: {args.gen_seconds:.0f} s ({args.clock} clock) of the embedded teacher "
            "per recipe"
        ),
        box=BOX,
    )
    for col in (
        "recipe",
        "stop",
        "teacher requests",
        "generated",
        "kept",
        "kept / CPU min" if args.clock == "cpu" else "kept / min",
        f"vs {BASELINE}",
        "teacher tokens / kept",
        "parse errors",
        "top rejections",
    ):
        generation.add_column(col, justify="left" if col in ("recipe", "stop") else "right")
    for r in done:
        per_min = 60 * r["kept"] / r["seconds"]["generate"]
        base_per_min = base and 60 * base["kept"] / base["seconds"]["generate"]
        top = sorted(r["rejected"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        generation.add_row(
            r["recipe"],
            r["stop"],
            f"{sum(r['requests'].values()):,}",
            f"{r['generated']:,}",
            f"{r['kept']:,}",
            f"{per_min:.1f}",
            f"{per_min / base_per_min:.2f}x" if base_per_min else "-",
            f"{r['tokens'] / r['kept']:,.0f}" if r["kept"] else "-",
            f"{r['rejected'].get('parse_error', 0) / max(r['generated'], 1):.0%}",
            ", ".join(f"{reason} {n}" for reason, n in top) or "-",
        )

    ref = reference["metrics"]
    student = Table(
        title=(
            f"The student after {args.steps} steps, on {args.eval_items} built-in instructions "
            "(means with bootstrap 95% intervals; differences paired per item)"
        ),
        box=BOX,
    )
    for col in (
        "model",
        "trained on",
        "ROUGE-L",
        "ROUGE-L tuned - base",
        f"ROUGE-L tuned - {BASELINE}'s tuned",
        "NLL",
        "NLL tuned - base",
        "refusals",
        "median words",
        "base and teacher answers",
    ):
        student.add_column(col, justify="left" if col == "model" else "right")
    # The models every recipe shares first: what the tuned students start from and aim at.
    for role, label in (("base", "base student (untrained)"), ("teacher", "teacher")):
        words = median_words(reference["rows"], role)
        student.add_row(
            label,
            "-",
            ci(ref, "rouge_l", role),
            "-",
            "-",
            ci(ref, "nll", role),
            "-",
            share_ci(ref, "refusal", role),
            f"{words:.0f}" if words is not None else "-",
            "reference run",
        )
    for r in done:
        if "metrics" not in r:
            continue
        m = r["metrics"]
        student.add_row(
            f"tuned on {r['recipe']}",
            f"{r['train_split']:,}",
            ci(m, "rouge_l", "tuned"),
            ci(m, "rouge_l", "delta"),
            paired_against(r, base, args) if r is not base else "-",
            ci(m, "nll", "tuned"),
            ci(m, "nll", "delta"),
            share_ci(m, "refusal", "tuned"),
            f"{r['tuned_words']:.0f}" if r["tuned_words"] is not None else "-",
            "reused" if r["reused"] else "ANSWERED AGAIN",
        )

    phases = Table(title="Wall time per phase (s)", box=BOX)
    for col in ("recipe", "generate", "filter", "train", "evaluate", "total", "note"):
        phases.add_column(col, justify="left" if col in ("recipe", "note") else "right")
    phases.add_row(
        "reference (base + teacher)", "", "", "", f"{reference['evaluate_s']:.0f}", "", ""
    )
    for r in rows:
        s = r.get("seconds", {})
        phases.add_row(
            r["recipe"],
            *(
                f"{s[p]:.0f}" if p in s else "-"
                for p in ("generate", "filter", "train", "evaluate")
            ),
            f"{sum(s.values()):.0f}" if s else "-",
            r.get("error") or r.get("skipped") or "",
        )
    return [generation, student, phases]


def paired_against(row: dict, base: dict | None, args: argparse.Namespace) -> str:
    """ROUGE-L of this recipe's tuned student minus the baseline's, paired per item."""
    if not base or "tuned_rouge" not in base:
        return "-"
    both = [
        row["tuned_rouge"][k] - base["tuned_rouge"][k]
        for k in row["tuned_rouge"].keys() & base["tuned_rouge"].keys()
        if row["tuned_rouge"][k] is not None and base["tuned_rouge"][k] is not None
    ]
    if not both:
        return "-"
    mean, low, high = bootstrap_ci(both, 1000, args.seed)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def markdown(shown: list[Table]) -> str:
    """The tables as Markdown for docs/benchmarks.md: each title a line of its own, no padding."""
    parts = []
    for table in shown:
        text = io.StringIO()
        title, table.title, table.box = table.title, None, box.MARKDOWN
        Console(file=text, width=1000).print(table)
        table.title = title
        lines = [line.rstrip() for line in text.getvalue().splitlines() if line.strip()]
        parts.append(f"{title}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", default=",".join(VARIANTS), help="a subset, comma-separated")
    parser.add_argument("--gen-seconds", type=float, default=240, help="generation per recipe")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="--gen-seconds of wall time, or of the generate process's CPU time (a busy machine)",
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per recipe")
    parser.add_argument("--eval-items", type=int, default=40, help="built-in instructions")
    parser.add_argument("--answer-prompts", type=int, default=2000, help="the answer recipe's")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="tables in Markdown")
    parser.add_argument("--out", type=Path, help="also write the tables here, in Markdown")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--keep", type=Path, help="keep the run folders and logs in this folder")
    args = parser.parse_args(argv)
    unknown = [r for r in args.recipes.split(",") if r not in VARIANTS]
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.markdown:
        global BOX
        BOX = box.MARKDOWN
    return args


def registered_recipes() -> set[str]:
    """The recipes this tutelage can run (imported here: it loads no model library)."""
    from tutelage.generate.loop import RECIPES

    return set(RECIPES)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    console.print(
        f"bench/recipes.py: {args.recipes}; {args.gen_seconds:.0f} s of generation, "
        f"{args.steps} steps, {args.eval_items} items each; load average {load} at the start",
        highlight=False,
    )
    registered = registered_recipes()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tutelage-bench-recipes-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        taken = [name for name in args.recipes.split(",") if (folder / name).exists()]
        if taken:
            raise SystemExit(
                f"bench/recipes.py: {folder} already holds {', '.join(taken)}; remove them or "
                "name another --keep folder (a reference there is reused)"
            )
        reference = run_reference(folder / "reference", args)
        for name in args.recipes.split(","):
            changes = dict(VARIANTS[name])
            recipe = changes["generation.recipe"]
            if recipe not in registered:
                note = f"skipped: recipe '{recipe}' is not registered in tutelage.generate.loop"
                console.print(f"  {name}: {note}", highlight=False)
                rows.append({"recipe": name, "skipped": note})
                continue
            if name == "answer":
                if not PROMPTS.exists():
                    rows.append({"recipe": name, "skipped": f"skipped: no {PROMPTS}"})
                    continue
                sample = answer_prompts(folder / "answer-prompts.jsonl", args)
                changes["generation.prompts"] = str(sample)
            console.print(f"[bold]{name}[/]", highlight=False)
            rows.append(run_variant(name, changes, folder / name, args, reference))
        for r in rows:
            if r.get("error"):
                console.print(f"[red]{r['recipe']}:[/] {r['error']} (log: {r['log']})")

    shown = tables(rows, reference, args)
    for table in shown:
        console.print(table)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    console.print(
        f"done in {time.perf_counter() - start:.0f} s; load average {load} at the end",
        highlight=False,
    )
    if args.out:
        args.out.write_text(markdown(shown), encoding="utf-8")
        console.print(f"written {args.out}")
    if args.json:
        raw = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "reference": {k: v for k, v in reference.items() if k in ("metrics", "evaluate_s")},
            "recipes": rows,
        }
        args.json.write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
        console.print(f"written {args.json}")


if __name__ == "__main__":
    main()
