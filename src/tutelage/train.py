"""Supervised fine-tuning of the student on the kept examples: a plain PyTorch loop.

The recipe, top to bottom:
  1. rows -> token ids, the loss masked to the response (`tokenize_example`);
  2. a batch plan fixed up front: shuffled epochs, grouped by length (`batch_plan`);
  3. the student, LoRA-wrapped or fully trainable (`load_model`);
  4. AdamW, linear warmup then cosine decay, gradient accumulation, clipping (`train`);
  5. eval loss on the valid split, checkpoints, and a merged plain HF folder at the end.

Resumable: a checkpoint holds the trainable weights, optimizer, scheduler, RNG states and the
batch plan, so a killed run continues with the same batches in the same order and ends with the
same weights. Idempotent: a finished run with the same fingerprint (config + data) is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import Config
from .formats import prompt_ids, student_prompt
from .models import resolve_student
from .store import Store

IGNORE = -100  # label of a token that carries no loss (prompt and padding)
MEGABATCH = 50  # batches sorted by length together: low padding, yet still a shuffled order
KEEP_CHECKPOINTS = 2
# Fields that change neither the weights nor the data: changing them must not retrain.
NOT_FINGERPRINTED = {"threads", "eval_every", "save_every"}


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the response and its EOS


def tokenize_example(tokenizer, row: dict, style: str, max_seq_len: int) -> Example | None:
    """Prompt and response tokenized apart, then joined, so the loss mask falls exactly on the
    boundary. The response is cut to fit `max_seq_len`; None when the prompt alone fills it."""
    prompt = prompt_ids(tokenizer, student_prompt(row["instruction"], row["input"], style=style,
                                                  tokenizer=tokenizer), style)
    room = max_seq_len - len(prompt)
    if room <= 0:
        return None
    target = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    target = (target + [tokenizer.eos_token_id])[:room]
    return Example(prompt + target, [IGNORE] * len(prompt) + target)


def tokenize_examples(tokenizer, rows: list[dict], style: str,
                      max_seq_len: int) -> tuple[list[Example], int, int]:
    """(examples, dropped, truncated)."""
    examples, dropped, truncated = [], 0, 0
    for row in rows:
        ex = tokenize_example(tokenizer, row, style, max_seq_len)
        if ex is None:
            dropped += 1
            continue
        truncated += ex.labels[-1] != tokenizer.eos_token_id
        examples.append(ex)
    return examples, dropped, truncated


def batch_plan(lengths: list[int], batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """The first `n_batches` batches of example indices, epoch after epoch. Each epoch is
    shuffled and cut into mega-batches of MEGABATCH batches; each mega-batch is sorted by length,
    cut into batches (the last of an epoch may be short), and those are shuffled.
    Why: similar lengths in a batch waste little compute on padding."""
    rng = random.Random(seed)
    plan: list[list[int]] = []
    while len(plan) < n_batches:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        for start in range(0, len(epoch), MEGABATCH * batch_size):
            mega = sorted(epoch[start:start + MEGABATCH * batch_size], key=lambda i: -lengths[i])
            batches = [mega[i:i + batch_size] for i in range(0, len(mega), batch_size)]
            rng.shuffle(batches)
            plan += batches
    return plan[:n_batches]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: padding is masked from attention and from the loss."""
    width = max(len(e.input_ids) for e in examples)

    def pad(seq: list[int], value: int) -> list[int]:
        return seq + [value] * (width - len(seq))

    return {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
        "labels": torch.tensor([pad(e.labels, IGNORE) for e in examples]),
    }


# -- model and loss -----------------------------------------------------------------------------
def load_model(config: Config, path: Path, device: torch.device) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # bf16 where the GPU has it (pure bf16, as torchtune does); fp32 elsewhere.
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if bf16 else torch.float32)
    except Exception as e:  # a folder with a config.json that transformers cannot load
        raise ValueError(f"student.model: {config.student.model}: cannot load the model "
                         f"({_first_line(e)})") from e
    model.to(device)
    if config.training.gradient_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant: LoRA needs no input grads
    if config.student.method == "lora":
        lora = config.student.lora
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return model


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens of a batch, and how many there are.

    Only the positions that predict a response token are projected onto the vocabulary: with
    Gemma's 262k vocabulary, the logits of a whole batch would cost gigabytes."""
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    scored = targets != IGNORE
    keep = torch.cat([scored, scored.new_zeros(len(scored), 1)], dim=1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep, use_cache=False).logits  # (scored tokens, vocab)
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), int(scored.sum())


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int,
              device: torch.device) -> float | None:
    """Mean loss per response token over `examples` (None when there are none)."""
    if not examples:
        return None
    model.eval()
    total, n = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
    for i in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[i:i + batch_size], pad_id).items()}
        loss, count = loss_sum(model, batch)
        total, n = total + loss.item(), n + count
    model.train()
    return total / n


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay; `step` counts the optimizer steps already taken. Unlike
    the usual schedules, the first step has a non-zero rate: a 3-step run must learn something."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -- fingerprint, checkpoints, output ------------------------------------------------------------
def fingerprint(config: Config, train_rows: list[dict], valid_rows: list[dict]) -> str:
    """What the trained weights depend on: settings, base model id, seed and the ordered data."""
    fmt = config.training.prompt_format
    if fmt not in ("alpaca", "chat") and not Path(fmt).is_file():
        raise ValueError(f"training.prompt_format: {fmt}: neither alpaca, chat nor a template file")
    payload = {
        "training": config.training.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
        "template": fmt if fmt in ("alpaca", "chat") else Path(fmt).read_text(encoding="utf-8"),
        "student": config.student.model_dump(mode="json"),
        "seed": config.seed,
        "data": [[[r["instance_id"], r["instruction"], r["input"], r["output"]] for r in rows]
                 for rows in (train_rows, valid_rows)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder with `write`, then swap it in: a kill never leaves half a folder
    under `target` (at worst the old one stays as `NAME.old`, or `target` is briefly missing)."""
    tmp, old = target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # The LoRA matrices, or every weight in full fine-tuning (a tied head appears once).
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, step: int, meta: dict, model, optimizer, scheduler,
                    state: dict) -> None:
    def write(tmp: Path) -> None:
        save_file(trainable_state(model), tmp / "weights.safetensors")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng, **state}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}))

    write_atomically(ckpt_dir / f"step-{step}", write)
    for old in checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [p for p in ckpt_dir.glob("step-*") if (p / "meta.json").exists()
             and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def load_checkpoint(path: Path, model, optimizer, scheduler, device: torch.device) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the rest of the state."""
    unexpected = model.load_state_dict(load_file(path / "weights.safetensors", device=str(device)),
                                       strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"{path}: does not fit the model ({unexpected[0]})")
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return state


def save_student(model, tokenizer, run_dir: Path, info: dict) -> Path:
    """run_dir/student: a plain HF folder (LoRA merged), loadable without tutelage or peft; with
    LoRA, the adapter alone goes to run_dir/student-adapter."""
    adapter = run_dir / "student-adapter"
    if hasattr(model, "merge_and_unload"):
        write_atomically(adapter, model.save_pretrained)
        model = model.merge_and_unload()
    else:
        shutil.rmtree(adapter, ignore_errors=True)  # an older LoRA run's, stale now

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tutelage.json").write_text(json.dumps(info, indent=2) + "\n")

    write_atomically(run_dir / "student", write)
    return run_dir / "student"


def student_info(run_dir: Path) -> dict | None:
    path = run_dir / "student" / "tutelage.json"
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use `n` CPU threads inside the block (None: as they are), the caller's number after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- the recipe ---------------------------------------------------------------------------------
def train(store: Store, config: Config, run_dir: Path,
          progress: Callable[[int, int, float, float], None] | None = None) -> dict:
    """Fine-tune the student on the train split; return the run's metrics (with `run_id`,
    `output_dir`, and `reused`: True when a finished identical run was returned as it was)."""
    run_dir = Path(run_dir)
    cfg = config.training
    train_rows, valid_rows = store.examples(split="train"), store.examples(split="valid")
    if not train_rows:
        raise ValueError("nothing to train on: the store holds no kept training examples; "
                         "`tutelage generate` (then `tutelage filter`) must keep examples first")
    fp = fingerprint(config, train_rows, valid_rows)
    done = store.latest_train_run(status="done", fingerprint=fp)
    info = student_info(run_dir)
    if done and info and (info["run_id"], info["fingerprint"]) == (done["id"], fp):
        return {**json.loads(done["metrics_json"]), "run_id": done["id"],
                "output_dir": done["output_dir"], "reused": True}

    from transformers import AutoTokenizer

    path = resolve_student(config.student.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"student.model: {config.student.model}: cannot load the tokenizer "
                         f"({_first_line(e)})") from e
    if tokenizer.eos_token_id is None:  # the student could never learn to stop
        raise ValueError(f"student.model: {config.student.model}: the tokenizer has no EOS token")
    train_set, dropped, truncated = tokenize_examples(tokenizer, train_rows, cfg.prompt_format,
                                                      cfg.max_seq_len)
    valid_set, _, _ = tokenize_examples(tokenizer, valid_rows, cfg.prompt_format, cfg.max_seq_len)
    if not train_set:
        raise ValueError(f"training.max_seq_len: every training prompt is longer than "
                         f"{cfg.max_seq_len} tokens ({dropped} examples); raise it")

    # A checkpoint of this very training resumes it; anything else in the folder is stale.
    ckpt_dir = run_dir / "checkpoints"
    last = checkpoints(ckpt_dir)[-1:]
    meta = json.loads((last[0] / "meta.json").read_text()) if last else None
    unfinished = next((r for r in store.train_runs() if meta and r["id"] == meta["run_id"]), None)
    if not (meta and meta["fingerprint"] == fp and unfinished and unfinished["status"] != "done"):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        last, unfinished = [], None
    for r in store.train_runs():  # runs killed before any checkpoint can never finish
        if r["status"] == "running" and (unfinished is None or r["id"] != unfinished["id"]):
            store.finish_train_run(r["id"], "failed", None, {"error": "interrupted"})
    run_id = unfinished["id"] if unfinished else store.start_train_run(
        fp, config.student.model, config.student.method, config.model_dump(mode="json"),
        len(train_set), len(valid_set))

    try:
        with torch_threads(cfg.threads):
            model, metrics = _fit(store, config, run_id, fp, path, tokenizer, train_set,
                                  valid_set, last[0] if last else None, ckpt_dir, progress)
        metrics.update(train_examples=len(train_set), valid_examples=len(valid_set),
                       dropped_examples=dropped, truncated_examples=truncated)
        output = save_student(model, tokenizer, run_dir, {
            "run_id": run_id, "fingerprint": fp, "base_model": config.student.model,
            "base_path": str(path), "method": config.student.method, "metrics": metrics})
        store.finish_train_run(run_id, "done", str(output), metrics)
    except BaseException as e:
        store.finish_train_run(run_id, "failed", None, {"error": _first_line(e)})
        raise
    return {**metrics, "run_id": run_id, "output_dir": str(output), "reused": False}


def _fit(store: Store, config: Config, run_id: int, fp: str, path: Path, tokenizer,
         train_set: list[Example], valid_set: list[Example], checkpoint: Path | None,
         ckpt_dir: Path, progress) -> tuple[torch.nn.Module, dict]:
    """The training loop proper, from scratch or from `checkpoint`: the trained model, and the
    metrics of the loop."""
    cfg = config.training
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    model = load_model(config, path, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or math.ceil(
        cfg.epochs * len(train_set) / (cfg.batch_size * cfg.grad_accum))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps))

    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, device)
    else:
        plan = batch_plan([len(e.input_ids) for e in train_set], cfg.batch_size,
                          total_steps * cfg.grad_accum, config.seed)
        state = {"step": 0, "plan": plan, "seen": 0, "tokens": 0, "train_s": 0.0, "elapsed_s": 0.0}
        first = eval_loss(model, valid_set, cfg.batch_size, pad_id, device)
        store.log_train_step(run_id, 0, epoch=0.0, eval_loss=first, tokens=0, elapsed_s=0.0)
    plan, seen, tokens, train_s = state["plan"], state["seen"], state["tokens"], state["train_s"]
    loop_start, elapsed_before = time.perf_counter(), state["elapsed_s"]

    for step in range(state["step"] + 1, total_steps + 1):
        t0 = time.perf_counter()
        step_ids = plan[(step - 1) * cfg.grad_accum: step * cfg.grad_accum]
        batches = [collate([train_set[i] for i in ids], pad_id) for ids in step_ids]
        # Normalise by the response tokens of the whole step, not per micro-batch, so that
        # accumulation gives the same gradient as one big batch.
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        step_loss = 0.0
        for batch in batches:
            loss, _ = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            (loss / n_targets).backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += sum(len(ids) for ids in step_ids)
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        train_s += time.perf_counter() - t0

        loss_value, tokens_per_s = step_loss / n_targets, tokens / train_s
        evaluated = step % cfg.eval_every == 0 or step == total_steps
        valid_loss = (eval_loss(model, valid_set, cfg.batch_size, pad_id, device)
                      if evaluated else None)
        elapsed = elapsed_before + time.perf_counter() - loop_start
        store.log_train_step(run_id, step, epoch=seen / len(train_set), loss=loss_value,
                             eval_loss=valid_loss, lr=lr, tokens=tokens, tokens_per_s=tokens_per_s,
                             elapsed_s=elapsed)
        if step % cfg.save_every == 0:
            save_checkpoint(ckpt_dir, step, {"fingerprint": fp, "run_id": run_id}, model,
                            optimizer, scheduler, {"step": step, "plan": plan, "seen": seen,
                                                   "tokens": tokens, "train_s": train_s,
                                                   "elapsed_s": elapsed})
        if progress:
            progress(step, total_steps, loss_value, tokens_per_s)

    rows = store.train_steps(run_id)
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    evals = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
    metrics = {
        "train_loss": losses[-1], "train_loss_avg": sum(losses) / len(losses),
        "eval_loss": evals[-1] if evals else None, "eval_loss_first": evals[0] if evals else None,
        "steps": total_steps, "useful_tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s else None,
        "seconds": elapsed_before + time.perf_counter() - loop_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return model, metrics
