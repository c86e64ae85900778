"""Training throughput: tutelage's loop against the Stanford Alpaca recipe, same data, same run.

Data: `../shared/data/self-instruct-seed-tasks.jsonl` (the 175 Self-Instruct seed tasks, the first
instance of each). Every 11th row (16) is held out for the eval loss; rows whose Alpaca prompt alone
exceeds --max-seq-len tokens are left out (ours would drop them, the recipe would train on a row
with no response token); the first steps x batch-size of the others are trained on. The default
steps make whole epochs, so both loops see the same rows as often, in their own orders.

Two loops on each model, same hyperparameters (batch, steps, learning rate, warmup ratio,
max_seq_len, seed, fp32, LoRA r/alpha/dropout/target modules from tutelage's defaults, --threads):
- ours: `tutelage.train.train(store, config, run_dir)`, the rows put in a fresh store;
- baseline: the Stanford Alpaca recipe (train.py of tatsu-lab/stanford_alpaca), written here from
  its description: the Alpaca prompt (`tutelage.student_prompt.student_prompt`, so the prompts are
  the same), prompt + output + EOS tokenized as one text and truncated to max_seq_len, labels -100
  on the prompt; a collator that pads each batch to its longest row; HF `Trainer` (random sampler,
  no length grouping, no packing), cosine schedule, the model's own loss. The model is loaded and
  LoRA-wrapped as ours does (fp32, peft, task CAUSAL_LM), or with --method full left whole, every
  weight trainable, in both loops.
Models: `tiny` (a 2-layer random Llama, 64 wide, SmolLM2's 49k-token vocabulary) and `student`
(the embedded Gemma-3-270M, 262k-token vocabulary). Each (model, loop) runs in its own process.

Measured: useful tokens/s (non-pad tokens, prompt included, over the training steps only: no model
load, no eval), the peak RSS of the process at the end of training and its rise over a process
that only loaded the model, and the final eval loss, computed for both by ONE function here
(`response_loss`: mean cross-entropy per response token of the held-out rows, prompt masked, full
logits, one row at a time). Goal: ours >= 1.5x the baseline's tokens/s with an eval loss no worse
(tolerance +0.02 nats: the loops see the rows in different orders and batches) and, with LoRA, a
peak RSS over load at most 25% of the baseline's (ours never holds more than one chunk of response
positions' logits; the recipe holds every position's, several times over). Also the share of
the CPUs other processes used meanwhile: torch's threads suffer badly from a busy neighbour.
--explain adds `run_explain`: the baseline's forward + backward timed three ways, to show where
the difference comes from (the vocabulary projection of every position, and padding).

Run: `python bench/train.py` (about 8 minutes on 2 idle cores; --explain adds 1.5-3). Options:
--models tiny,student, --steps N (every model) or --tiny-steps/--student-steps, --batch-size,
--max-seq-len, --lr, --threads, --seed, --method lora|full,
--gradient-checkpointing [none|ours|both], --explain, --explain-batches, --busy-retries, --markdown.
The machine is noisy: compare within one run, mind the load average and the others' CPU share (a
loop run while others used more than 5% of the CPUs is rerun once they are idle, twice at most).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers: save_tiny_model, add_examples

console = Console(width=None if sys.stdout.isatty() else 160)
BOX = box.HEAVY_HEAD  # box.MARKDOWN with --markdown
DATA = ROOT.parent / "shared" / "data" / "self-instruct-seed-tasks.jsonl"
HOLD_OUT_EVERY = 11  # rows 0, 11, 22, ... are the eval split: 16 of 175
IGNORE = -100
SPEED_GOAL = 1.5
LOSS_TOLERANCE = 0.02
MEMORY_GOAL = 0.25  # LoRA: ours' peak RSS over load at most this share of the recipe's
BUSY = 0.05  # others' share of the CPUs above which a loop's run is retried (--busy-retries)
STEPS = {"tiny": 40, "student": 10}  # batch 8: 2 epochs of 153 rows; 1 epoch of 80 rows


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- data and the shared eval -------------------------------------------------------------------
def load_rows(tokenizer, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows {instruction, input, output}: rows whose prompt fits; the train rows cut
    to steps x batch_size, so that both loops see the same rows when the steps make whole epochs."""
    from tutelage.student_prompt import student_prompt

    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        first = task["instances"][0]
        rows.append(
            {"instruction": task["instruction"], "input": first["input"], "output": first["output"]}
        )
    fits = [
        len(tokenizer(student_prompt(r["instruction"], r["input"]))["input_ids"]) < args.max_seq_len
        for r in rows
    ]
    train = [r for i, r in enumerate(rows) if fits[i] and i % HOLD_OUT_EVERY]
    held = [r for i, r in enumerate(rows) if fits[i] and not i % HOLD_OUT_EVERY]
    return train[: args.steps * args.batch_size], held


def response_loss(model, tokenizer, rows: list[dict], max_seq_len: int) -> float:
    """Mean cross-entropy per response token (output + EOS) over `rows`, the prompt masked, full
    logits, one row at a time. The same function judges both loops."""
    import torch
    import torch.nn.functional as F

    from tutelage.student_prompt import student_prompt

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            prompt = tokenizer(student_prompt(r["instruction"], r["input"]))["input_ids"]
            target = tokenizer(r["output"], add_special_tokens=False)["input_ids"]
            ids = (prompt + target + [tokenizer.eos_token_id])[:max_seq_len]
            labels = torch.tensor(([IGNORE] * len(prompt) + ids[len(prompt) :])[1:])
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            total += F.cross_entropy(
                logits.float(), labels, ignore_index=IGNORE, reduction="sum"
            ).item()
            count += int((labels != IGNORE).sum())
    return total / count


def load_model(path: Path, method: str):
    """The model as tutelage loads it: fp32, then (method lora) peft LoRA with tutelage's default
    settings; method full: every weight trainable."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tutelage.config import LoraConfig as Defaults

    lora = Defaults()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if method == "full":
        return model
    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def plain(model):
    """A trained model as a plain HF model: LoRA merged in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# -- the baseline: the Stanford Alpaca recipe ----------------------------------------------------
class AlpacaDataset:
    """Alpaca's SupervisedDataset: source + output + EOS tokenized as one text (truncated), the
    labels a copy with the tokens of the source (as tokenized alone) set to IGNORE."""

    def __init__(self, rows: list[dict], tokenizer, max_seq_len: int):
        from tutelage.student_prompt import student_prompt

        self.items = []
        for r in rows:
            source = student_prompt(r["instruction"], r["input"])
            ids = tokenizer(
                source + r["output"] + tokenizer.eos_token, max_length=max_seq_len, truncation=True
            )["input_ids"]
            source_len = len(
                tokenizer(source, max_length=max_seq_len, truncation=True)["input_ids"]
            )
            labels = [IGNORE] * source_len + ids[source_len:]
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PadToLongest:
    """Alpaca's collator: right-pad input_ids with the pad token and labels with IGNORE to the
    longest row of the batch. (Alpaca derives the attention mask from `ids != pad`; SmolLM2's pad
    is its EOS, so the mask here comes from the lengths instead.) Counts what each batch holds."""

    def __init__(self, pad_id: int):
        self.pad_id, self.batches = pad_id, []  # (real tokens, padded positions, response tokens)

    def __call__(self, items: list[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in items)
        ids = [x["input_ids"] + [self.pad_id] * (width - len(x["input_ids"])) for x in items]
        labels = [x["labels"] + [IGNORE] * (width - len(x["labels"])) for x in items]
        mask = [[1] * len(x["input_ids"]) + [0] * (width - len(x["input_ids"])) for x in items]
        batch = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
        self.batches.append(
            (
                int(batch["attention_mask"].sum()),
                width * len(items),
                int((batch["labels"] != IGNORE).sum()),
            )
        )
        return batch


def run_baseline(path: Path, args: argparse.Namespace) -> dict:
    from transformers import (
        AutoTokenizer,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from tutelage.config import TrainingConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, held = load_rows(tokenizer, args)
    set_seed(args.seed)
    model = load_model(path, args.method)
    collator = PadToLongest(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    class Clock(TrainerCallback):  # the training loop only: after setup, before teardown
        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            # tutelage's warmup steps, int(ratio * steps); HF's own rounding would be ceil
            warmup_steps=int(TrainingConfig().warmup_ratio * args.steps),
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            seed=args.seed,
            train_sampling_strategy="random",
            use_cpu=True,
            dataloader_pin_memory=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            label_names=["labels"],
            gradient_checkpointing=args.gradient_checkpointing == "both",
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        trainer = Trainer(
            model=model,
            args=training,
            data_collator=collator,
            callbacks=[clock],
            train_dataset=AlpacaDataset(train_rows, tokenizer, args.max_seq_len),
        )
        trainer.remove_callback(PrinterCallback)  # its summary line; the table says more
        trainer.train()
    peak = rss_mb()
    # accelerate's loader fetches one batch ahead: the first `steps` batches are the trained ones
    real, padded, response = (sum(col) for col in zip(*collator.batches[: args.steps]))
    return {
        "useful_tokens": real,
        "seconds": clock.seconds,
        "tokens_per_s": real / clock.seconds,
        "peak_rss_mb": peak,
        "padded_positions": padded,
        "response_tokens": response,
        "eval_loss": response_loss(plain(model), tokenizer, held, args.max_seq_len),
    }


# -- ours ---------------------------------------------------------------------------------------
def run_ours(path: Path, args: argparse.Namespace) -> dict:
    from helpers import add_examples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tutelage.config import Config
    from tutelage.store import Store
    from tutelage.train import train

    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, held = load_rows(tokenizer, args)
    with tempfile.TemporaryDirectory() as run_dir:
        store = Store(Path(run_dir))
        for split, rows in (("train", train_rows), ("valid", held)):
            add_examples(store, [(r["instruction"], r["input"], r["output"]) for r in rows], split)
        config = Config(
            run_dir=run_dir,
            seed=args.seed,
            student={"model": str(path), "method": args.method},
            training={
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "learning_rate": args.lr,
                "max_seq_len": args.max_seq_len,
                "threads": args.threads,
                "gradient_checkpointing": args.gradient_checkpointing != "none",
                "eval_every": 10**6,
                "save_every": 10**6,
                "gguf": None,
            },
        )  # no GGUF export after
        result = train(store, config, Path(run_dir))
        peak = result.peak_rss_mb or rss_mb()
        trained = AutoModelForCausalLM.from_pretrained(Path(run_dir) / "student")
        loss = response_loss(trained, tokenizer, held, args.max_seq_len)
    tokens, per_s = result.useful_tokens, result.tokens_per_s
    return {
        "useful_tokens": tokens,
        "seconds": tokens / per_s,
        "tokens_per_s": per_s,
        "peak_rss_mb": peak,
        "eval_loss": loss,
        "own_eval_loss": result.eval_loss,
    }


def run_load(path: Path, args: argparse.Namespace) -> dict:
    """The model loaded (and LoRA-wrapped), nothing trained: the RSS that training adds to, the
    eval loss before training, and the sizes for the FLOP estimate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path, args.method)
    rss = rss_mb()
    base = model.get_base_model() if args.method == "lora" else model
    head = base.get_output_embeddings().weight
    embed = base.get_input_embeddings().weight
    body = (
        sum(p.numel() for p in base.parameters())
        - embed.numel()
        - (0 if head is embed else head.numel())
    )
    train_rows, held = load_rows(tokenizer, args)
    loss = response_loss(model, tokenizer, held, args.max_seq_len)  # LoRA starts as a no-op
    return {
        "load_rss_mb": rss,
        "eval_loss": loss,
        "head_params": head.numel(),
        "body_params": body,
        "vocab": head.shape[0],
        "train_rows": len(train_rows),
        "eval_rows": len(held),
    }


def run_explain(path: Path, args: argparse.Namespace) -> dict:
    """Where the baseline's time goes: forward + backward (no optimizer) on the same
    --explain-batches x batch_size random training rows, tokenized as the recipe does, three ways:
    the recipe's padded batches and model loss (every position projected onto the vocabulary);
    the same batches with only the positions that predict a response token projected
    (`logits_to_keep`, as tutelage does); and the same rows regrouped by length, so that batches
    hold little padding."""
    import random

    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    data = AlpacaDataset(load_rows(tokenizer, args)[0], tokenizer, args.max_seq_len)
    picked = random.Random(args.seed).sample(data.items, args.explain_batches * args.batch_size)
    by_length = sorted(picked, key=lambda x: len(x["input_ids"]))
    cut = lambda items: [
        items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)
    ]
    collate = PadToLongest(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model = load_model(path, args.method)
    model.train()

    def full_logits(batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def response_only(batch: dict) -> torch.Tensor:
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE
        keep = torch.cat([scored, scored.new_zeros(len(scored), 1)], dim=1)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
        ).logits
        return F.cross_entropy(logits, targets[scored])

    response_only(collate(picked[:2])).backward()  # warm-up, untimed
    results = []
    for label, batches, loss_of in (
        ("padded batches, full logits (the recipe)", cut(picked), full_logits),
        ("padded batches, response positions only", cut(picked), response_only),
        ("length-grouped batches, response positions only", cut(by_length), response_only),
    ):
        seconds, useful, positions = 0.0, 0, 0
        for items in batches:
            batch = collate(items)
            start = time.perf_counter()
            loss_of(batch).backward()
            seconds += time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            useful += int(batch["attention_mask"].sum())
            positions += batch["input_ids"].numel()
        results.append(
            {
                "what": label,
                "seconds": seconds,
                "useful_tokens": useful,
                "positions": positions,
                "tokens_per_s": useful / seconds,
            }
        )
    return {"variants": results, "peak_rss_mb": rss_mb()}


def worker(args: argparse.Namespace) -> None:
    import warnings

    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    run = {"load": run_load, "ours": run_ours, "baseline": run_baseline, "explain": run_explain}[
        args.worker
    ]
    result = run(Path(args.model_path), args)
    Path(args.out).write_text(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------------
def model_path(name: str, tmp: Path) -> Path:
    from tutelage.model_files import embedded_student_hf, embedded_teacher_hf

    if name == "student":
        return embedded_student_hf()
    from helpers import save_tiny_model
    from transformers import AutoTokenizer

    return save_tiny_model(tmp / "tiny", AutoTokenizer.from_pretrained(embedded_teacher_hf()))


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (Linux)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]
    except OSError:
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # minus idle and iowait


def spawn(loop: str, name: str, path: Path, steps: int, argv: list[str], tmp: Path) -> dict:
    """Run one (model, loop) in a fresh process; its result, plus `others_cpu`: the share of the
    machine's CPU that other processes used meanwhile (a noisy neighbour slows torch's threads
    far more than its share suggests: read a run with more than a few percent with care)."""
    out = tmp / f"{name}-{loop}.json"
    (busy, total), child = cpu_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
            "--worker",
            loop,
            "--model-path",
            str(path),
            "--steps",
            str(steps),
            "--out",
            str(out),
        ],
        check=True,
    )
    (busy2, total2), child2 = cpu_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (child2.ru_utime + child2.ru_stime - child.ru_utime - child.ru_stime) * os.sysconf(
        "SC_CLK_TCK"
    )
    others = max(0.0, (busy2 - busy - mine) / (total2 - total)) if total2 > total else 0.0
    return {**json.loads(out.read_text()), "others_cpu": others}


def wait_idle(limit_s: float = 900) -> None:
    """Until the CPUs have been at least 90% idle for 10 s (at most `limit_s`)."""
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end:
        busy, total = cpu_jiffies()
        time.sleep(10)
        busy2, total2 = cpu_jiffies()
        if total2 == total or (busy2 - busy) / (total2 - total) <= 0.1:
            return


def load_note() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_model(name: str, args: argparse.Namespace, argv: list[str], tmp: Path) -> dict:
    steps = args.steps or getattr(args, f"{name}_steps")
    path = model_path(name, tmp)
    load = spawn("load", name, path, steps, argv, tmp)
    epochs = steps / -(-load["train_rows"] // args.batch_size)  # the last batch may be short
    console.print(
        f"{name}: {load['train_rows']} train rows, {load['eval_rows']} eval rows, "
        f"{steps} steps of {args.batch_size} ({epochs:.2f} epochs); eval loss before "
        f"training {load['eval_loss']:.4f}; {load_note()}"
    )
    if epochs != int(epochs):
        console.print(
            "  not whole epochs: the loops train on different rows, so the eval loss "
            "comparison is noisier"
        )
    results = {}
    for loop in ("ours", "baseline") + (("explain",) if args.explain else ()):
        for attempt in range(args.busy_retries + 1):
            if attempt:
                console.print(f"  busy: {loop} again once the CPUs are idle")
                wait_idle()
            start = time.perf_counter()
            results[loop] = spawn(loop, name, path, steps, argv, tmp)
            console.print(
                f"  {loop}: {time.perf_counter() - start:.0f} s in all; other processes "
                f"used {results[loop]['others_cpu']:.0%} of the CPUs; {load_note()}"
            )
            if results[loop]["others_cpu"] <= BUSY:
                break
    return {"load": load, "steps": steps, "epochs": epochs, **results}


def report(runs: dict[str, dict], method: str) -> None:
    table = Table(
        title=f"Training ({method}): tutelage vs the Stanford Alpaca recipe (HF Trainer)", box=BOX
    )
    for col in (
        "model",
        "loop",
        "steps",
        "useful tokens",
        "train s",
        "useful tokens/s",
        "peak RSS MB",
        "RSS over load MB",
        "eval loss",
        "others' CPU",
    ):
        table.add_column(col, justify="left" if col in ("model", "loop") else "right")
    for name, run in runs.items():
        for loop, label in (("baseline", "Alpaca recipe (HF Trainer)"), ("ours", "tutelage")):
            r = run[loop]
            table.add_row(
                name,
                label,
                str(run["steps"]),
                f"{r['useful_tokens']:,}",
                f"{r['seconds']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['peak_rss_mb']:,.0f}",
                f"{r['peak_rss_mb'] - run['load']['load_rss_mb']:,.0f}",
                f"{r['eval_loss']:.4f}",
                f"{r['others_cpu']:.0%}",
            )
    console.print(table)

    memory_goal = (
        f", RSS over load <= {MEMORY_GOAL:.0%} of the recipe's" if method == "lora" else ""
    )
    verdicts = Table(
        title=f"Goal: >= {SPEED_GOAL}x useful tokens/s, eval loss no worse "
        f"(tolerance +{LOSS_TOLERANCE}){memory_goal}",
        box=BOX,
    )
    for col in (
        "model",
        "tokens/s ratio",
        "eval loss ours - baseline",
        "before training",
        "peak RSS ratio",
        "RSS over load ratio",
        "verdict",
    ):
        verdicts.add_column(col, justify="left" if col == "model" else "right")
    for name, run in runs.items():
        ours, base, load_rss = run["ours"], run["baseline"], run["load"]["load_rss_mb"]
        ratio = ours["tokens_per_s"] / base["tokens_per_s"]
        diff = ours["eval_loss"] - base["eval_loss"]
        over_load = (ours["peak_rss_mb"] - load_rss) / (base["peak_rss_mb"] - load_rss)
        ok = ratio >= SPEED_GOAL and diff <= LOSS_TOLERANCE
        ok = ok and (method != "lora" or over_load <= MEMORY_GOAL)
        verdicts.add_row(
            name,
            f"{ratio:.2f}x",
            f"{diff:+.4f}",
            f"{run['load']['eval_loss']:.4f}",
            f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}",
            f"{over_load:.2f}",
            "PASS" if ok else "MISS",
        )
    console.print(verdicts)

    # Where the time goes: the baseline's padding, and the positions projected onto the
    # vocabulary (all of the baseline's; ours only those that predict a response token).
    for name, run in runs.items():
        base, load = run["baseline"], run["load"]
        pad = 1 - base["useful_tokens"] / base["padded_positions"]
        response = base["response_tokens"] / base["useful_tokens"]
        head, body = load["head_params"], load["body_params"]
        # multiply-adds per useful token (forward): body on every position, head where projected
        base_macs = base["padded_positions"] / base["useful_tokens"] * (body + head)
        ours_macs = body + response * head
        console.print(
            f"{name}: vocabulary {load['vocab']:,}, head {head / 1e6:.1f}M vs the rest "
            f"{body / 1e6:.1f}M multiply-adds per position. Baseline: {pad:.1%} of its positions "
            f"are padding, and all {base['padded_positions']:,} positions go through the head. "
            f"Ours: only the {response:.0%} of tokens that predict a response token do. FLOP "
            f"model: {base_macs / 1e6:.0f}M vs {ours_macs / 1e6:.0f}M multiply-adds per useful "
            f"token, {base_macs / ours_macs:.2f}x."
        )
        if "explain" in run:
            table = Table(
                title=f"{name}: forward + backward on the same "
                f"{run['explain']['variants'][0]['useful_tokens']:,} useful tokens",
                box=BOX,
            )
            for col in (
                "batches",
                "positions",
                "padding",
                "seconds",
                "useful tokens/s",
                "speed-up",
            ):
                table.add_column(col, justify="left" if col == "batches" else "right")
            first = run["explain"]["variants"][0]["tokens_per_s"]
            for v in run["explain"]["variants"]:
                table.add_row(
                    v["what"],
                    f"{v['positions']:,}",
                    f"{1 - v['useful_tokens'] / v['positions']:.1%}",
                    f"{v['seconds']:.1f}",
                    f"{v['tokens_per_s']:.1f}",
                    f"{v['tokens_per_s'] / first:.2f}x",
                )
            console.print(table)
        if run["ours"].get("own_eval_loss") is not None:
            console.print(
                f"{name}: tutelage's own final eval loss "
                f"{run['ours']['own_eval_loss']:.4f} (a check of the shared function: "
                f"{run['ours']['eval_loss']:.4f})"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,student", help="tiny, student or both")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps, every model")
    parser.add_argument("--tiny-steps", type=int, default=STEPS["tiny"])
    parser.add_argument("--student-steps", type=int, default=STEPS["student"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4, help="tutelage's default")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both loops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also time forward + backward three ways (see run_explain)",
    )
    parser.add_argument("--explain-batches", type=int, default=2)
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=2,
        help=f"rerun a loop, once the CPUs are idle, when other processes used "
        f"more than {BUSY * 100:.0f}%% of them meanwhile",
    )
    parser.add_argument(
        "--method",
        choices=["lora", "full"],
        default="lora",
        help="both loops: LoRA (tutelage's defaults) or every weight trainable",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["none", "ours", "both"],
        nargs="?",
        const="both",
        default="none",
        help="recompute each decoder layer's activations in the backward pass: in neither loop, "
        "in ours only (the published recipe has none), or in both (the bare flag)",
    )
    parser.add_argument("--markdown", action="store_true", help="tables in Markdown")
    # Internal: one (model, loop) in this process, its result written to --out.
    parser.add_argument(
        "--worker", choices=["load", "ours", "baseline", "explain"], help=argparse.SUPPRESS
    )
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        global BOX
        BOX = box.MARKDOWN
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if not DATA.exists():
        console.print(f"bench/train.py: {DATA} is absent; nothing to do")
        return
    from transformers.utils import logging

    logging.disable_progress_bar()  # saving the tiny model
    start = time.perf_counter()
    console.print(
        f"bench/train.py: {load_note()} at start, {os.cpu_count()} CPUs, {args.threads} threads, "
        f"method {args.method}, gradient checkpointing: {args.gradient_checkpointing}"
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            runs[name] = bench_model(name, args, [a for a in argv if a != "--markdown"], Path(tmp))
    report(runs, args.method)
    console.print(f"done in {time.perf_counter() - start:.0f} s; {load_note()} at the end")


if __name__ == "__main__":
    main()
