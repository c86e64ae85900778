"""Supervised fine-tuning of the student on the kept examples: a plain PyTorch loop.

The recipe, top to bottom (the components live beside this module):
  1. rows -> token ids, the loss masked to the response (`data.tokenize_example`);
  2. a batch plan fixed up front: shuffled epochs, grouped by length (`data.batch_plan`);
  3. the student, LoRA-wrapped, QLoRA (4-bit base, GPU) or fully trainable (`model.load_model`);
  4. AdamW, linear warmup then cosine decay, gradient accumulation, clipping (`_fit`);
  5. eval loss on the valid split (`loss.eval_loss`), checkpoints (`checkpoints`), and a merged
     plain HF folder at the end (`outputs.save_student`).

With `training.distill` the examples carry the teacher's captured top-k distributions and the loss
is `loss.Distillation` (cross-entropy and a divergence, both logged per step); without it, plain
cross-entropy on the teacher's text.

One process or many: the loop runs under `accelerate launch` or `torchrun` (DDP, FSDP, DeepSpeed
ZeRO-3) through `accelerate.Accelerator`. `training.batch_size` is the global batch of a
micro-step; each process takes its share of every micro-batch and the loss is normalised by the
response tokens of the whole step, so N processes compute the same update as one.

Resumable: a checkpoint holds the trainable weights, optimizer, scheduler, every process's RNG
states and the batch plan, so a killed run continues with the same batches in the same order and
ends with the same weights. Idempotent: a finished run with the same fingerprint is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import Config
from ..gguf import write_student_gguf
from ..model_files import resolve_base_student
from ..stage_results import TrainResult
from ..store import Store
from .checkpoints import (
    CHECKPOINT_FORMAT,
    LoopState,
    checkpoint_hooks,
    checkpoints,
    save_checkpoint,
)
from .data import Example, batch_plan, collate, pack, tokenize_examples
from .loss import Distillation, cross_entropy, eval_losses, loss_sum
from .model import choose_packing, first_line, load_model, plain_model
from .outputs import save_student, student_info
from .trackers import check_trackers, log_step, start_trackers

# Fields that change neither the weights nor the data: changing them must not retrain.
NOT_FINGERPRINTED = {"threads", "eval_every", "save_every", "gguf", "report_to"}


def train(
    store: Store,
    config: Config,
    run_dir: Path,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> TrainResult:
    """Fine-tune the student on the train split; return the run's metrics with its `run_id`,
    `output_dir`, and `reused` (True when a finished identical run was returned as it was).

    Under a distributed launch every process calls this; only the main one writes to the store
    and the run folder, and decides whether to resume."""
    run_dir = Path(run_dir)
    cfg = config.training
    train_rows, valid_rows = store.examples(split="train"), store.examples(split="valid")
    if not train_rows:
        raise ValueError(
            "nothing to train on: the store holds no kept training examples; "
            "`tutelage generate` (then `tutelage filter`) must keep examples first"
        )
    captures = teacher_captures(store, train_rows) if cfg.distill is not None else None
    fp = fingerprint(config, train_rows, valid_rows, captures)
    done = store.latest_train_run(status="done", fingerprint=fp)
    info = student_info(run_dir)
    if done and info and (info["run_id"], info["fingerprint"]) == (done["id"], fp):
        metrics = json.loads(done["metrics_json"])
        if metrics.get("gguf_type") != cfg.gguf or (cfg.gguf and "gguf" not in metrics):
            metrics = {k: v for k, v in metrics.items() if not k.startswith("gguf")}
            metrics.update(write_student_gguf(run_dir, cfg.gguf))  # only the GGUF setting changed
            store.finish_train_run(done["id"], "done", done["output_dir"], metrics)
        return TrainResult.from_metrics(
            metrics, run_id=done["id"], output_dir=done["output_dir"], reused=True
        )

    from accelerate.utils import broadcast_object_list
    from transformers import AutoTokenizer

    path = resolve_base_student(config, run_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(
            f"student.model: {config.student.model}: cannot load the tokenizer ({first_line(e)})"
        ) from e
    if tokenizer.eos_token_id is None:  # the student could never learn to stop
        raise ValueError(f"student.model: {config.student.model}: the tokenizer has no EOS token")
    top_k = None
    if captures is not None:
        check_capture_vocabulary(captures, tokenizer)
        top_k = min(cfg.distill.top_k, *(c.topk_ids.shape[1] for c in captures.values()))
    train_set, dropped, truncated = tokenize_examples(
        tokenizer, train_rows, cfg.prompt_format, cfg.max_seq_len, captures, top_k
    )
    valid_set, _, _ = tokenize_examples(
        tokenizer, valid_rows, cfg.prompt_format, cfg.max_seq_len, captures, top_k
    )
    if not train_set:
        raise ValueError(
            f"training.max_seq_len: every training prompt is longer than "
            f"{cfg.max_seq_len} tokens ({dropped} examples); raise it"
        )

    accelerator = make_accelerator(cfg.report_to, run_dir / "logs")
    main = accelerator.is_main_process
    ckpt_dir = run_dir / "checkpoints"
    decision = [
        _resume_or_start(store, config, fp, ckpt_dir, len(train_set), len(valid_set))
        if main
        else None
    ]
    run_id, checkpoint = broadcast_object_list(decision)[0]

    try:
        start_trackers(accelerator, config, run_dir, run_id)
        with torch_threads(cfg.threads):
            model, metrics = _fit(
                accelerator,
                store,
                config,
                run_id,
                fp,
                path,
                tokenizer,
                train_set,
                valid_set,
                checkpoint,
                ckpt_dir,
                progress,
            )
        metrics.update(
            train_examples=len(train_set),
            valid_examples=len(valid_set),
            dropped_examples=dropped,
            truncated_examples=truncated,
            processes=accelerator.num_processes,
            engine=accelerator.distributed_type.value,
        )
        output = run_dir / "student"
        if main:
            save_student(
                model,
                tokenizer,
                run_dir,
                {
                    "run_id": run_id,
                    "fingerprint": fp,
                    "base_model": config.student.model,
                    "base_path": str(path),
                    "method": config.student.method,
                    "metrics": metrics,
                },
            )
            metrics.update(write_student_gguf(run_dir, cfg.gguf))
            store.finish_train_run(run_id, "done", str(output), metrics)
        accelerator.wait_for_everyone()
    except BaseException as e:
        if main:
            store.finish_train_run(run_id, "failed", None, {"error": first_line(e)})
        raise
    finally:
        if accelerator.trackers:  # flushes and closes them (and ends the process group)
            accelerator.end_training()
    return TrainResult.from_metrics(metrics, run_id=run_id, output_dir=str(output), reused=False)


def teacher_captures(store: Store, train_rows: list[dict]) -> dict:
    """The teacher's captured distributions (instance id -> CapturedAnswer); every training
    example must have one."""
    from ..capture.storage import load_captures

    captures = load_captures(store)
    missing = sum(r["instance_id"] not in captures for r in train_rows)
    if missing:
        raise ValueError(
            f"training.distill: the teacher has not scored {missing} of the {len(train_rows)} "
            "training examples; capture them first (`tutelage capture`)"
        )
    return captures


def check_capture_vocabulary(captures: dict, tokenizer) -> None:
    """One line, unless the teacher that scored the examples has the student's vocabulary. (A
    capture without a hash came from a teacher whose tokenizer was not at hand, a vLLM server:
    the capture stage checked its answers' ids against the student's tokenizer instead.)"""
    from ..model_files import vocabulary_hash

    student = vocabulary_hash(tokenizer)
    teacher = {c.teacher_vocab_hash for c in captures.values()} - {""}
    if not teacher <= {student}:
        raise ValueError(
            f"training.distill: the student's vocabulary ({student[:12]}) is not the one of the "
            f"teacher that scored the examples ({', '.join(sorted(h[:12] for h in teacher))}): "
            "logit distillation needs the same tokenizer; use student.from_teacher or a student "
            "of the teacher's family"
        )


def _resume_or_start(
    store: Store, config: Config, fp: str, ckpt_dir: Path, n_train: int, n_valid: int
) -> tuple[int, str | None]:
    """(run id, checkpoint to resume from): a checkpoint of this very training resumes it;
    anything else in the folder is stale and goes."""
    last = checkpoints(ckpt_dir)[-1:]
    meta = json.loads((last[0] / "meta.json").read_text()) if last else None
    unfinished = next((r for r in store.train_runs() if meta and r["id"] == meta["run_id"]), None)
    if not (
        meta
        and meta["fingerprint"] == fp
        and meta.get("format") == CHECKPOINT_FORMAT
        and unfinished
        and unfinished["status"] != "done"
    ):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        last, unfinished = [], None
    for r in store.train_runs():  # runs killed before any checkpoint can never finish
        if r["status"] == "running" and (unfinished is None or r["id"] != unfinished["id"]):
            store.finish_train_run(r["id"], "failed", None, {"error": "interrupted"})
    run_id = (
        unfinished["id"]
        if unfinished
        else store.start_train_run(
            fp,
            config.student.model,
            config.student.method,
            config.model_dump(mode="json"),
            n_train,
            n_valid,
        )
    )
    return run_id, str(last[0]) if last else None


def _fit(
    accelerator,
    store: Store,
    config: Config,
    run_id: int,
    fp: str,
    path: Path,
    tokenizer,
    train_set: list[Example],
    valid_set: list[Example],
    checkpoint: str | None,
    ckpt_dir: Path,
    progress,
) -> tuple[torch.nn.Module | None, dict]:
    """The training loop proper, from scratch or from `checkpoint`: the trained model (a plain
    module on the main process, None elsewhere), and the metrics of the loop."""
    from accelerate.utils import DistributedType

    cfg = config.training
    main, rank, world = (
        accelerator.is_main_process,
        accelerator.process_index,
        accelerator.num_processes,
    )
    torch.manual_seed(config.seed)  # the same initial LoRA weights in every process
    random.seed(config.seed)
    device = accelerator.device
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    # bf16 weights where the GPU has them; DeepSpeed keeps fp32 masters and casts itself.
    bf16 = (
        device.type == "cuda"
        and torch.cuda.is_bf16_supported()
        and accelerator.distributed_type != DistributedType.DEEPSPEED
    )
    model = load_model(config, path, device, bf16=bf16)
    packed = choose_packing(cfg.packing, model, device)
    distill = Distillation.from_config(cfg.distill) if cfg.distill is not None else None
    position_loss = distill or cross_entropy

    def evaluate() -> dict | None:  # eval_loss is the cross-entropy, with or without distillation
        losses = eval_losses(
            model, valid_set, cfg.batch_size, pad_id, device, accelerator, position_loss
        )
        if losses is None:
            return {"eval_loss": None}
        if distill is None:
            return {"eval_loss": losses["loss"]}
        return {"eval_loss": losses["ce"], "eval_divergence": losses["divergence"]}

    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    total_steps = cfg.max_steps or math.ceil(
        cfg.epochs * len(train_set) / (cfg.batch_size * cfg.grad_accum)
    )
    warmup = int(cfg.warmup_ratio * total_steps)
    # Our own scheduler, stepped once per optimizer step: accelerate's wrapper would step it once
    # per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps)
    )
    _configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    loop = LoopState()
    accelerator.register_for_checkpointing(scheduler, loop)
    checkpoint_hooks(accelerator)

    if checkpoint is not None:
        accelerator.load_state(checkpoint)
    else:
        plan = batch_plan(
            [len(e.input_ids) for e in train_set],
            cfg.batch_size,
            total_steps * cfg.grad_accum,
            config.seed,
        )
        loop.values = {
            "step": 0,
            "plan": plan,
            "seen": 0,
            "tokens": 0,
            "train_s": 0.0,
            "elapsed_s": 0.0,
        }
        first = evaluate()
        if main:
            store.log_train_step(run_id, 0, epoch=0.0, tokens=0, elapsed_s=0.0, **first)
            log_step(accelerator, 0, **first)
    state = loop.values
    plan, seen, tokens, train_s = state["plan"], state["seen"], state["tokens"], state["train_s"]
    loop_start, elapsed_before = time.perf_counter(), state["elapsed_s"]

    for step in range(state["step"] + 1, total_steps + 1):
        t0 = time.perf_counter()
        micro_batches = [
            [train_set[i] for i in ids]
            for ids in plan[(step - 1) * cfg.grad_accum : step * cfg.grad_accum]
        ]
        # Normalise by the response tokens of the whole step (all micro-batches, all processes),
        # so accumulation and N processes give the gradient of one big batch. DDP averages the
        # processes' gradients, hence the factor `world`.
        n_targets = sum(e.n_targets for micro in micro_batches for e in micro)
        step_loss, parts = 0.0, {"ce": 0.0, "divergence": 0.0}
        for index, micro in enumerate(micro_batches):
            mine = micro[rank::world]
            # A process with no share still runs a forward and backward (weighted 0): the
            # gradient exchange needs every process.
            examples = mine or micro[:1]
            batch = pack(examples) if packed else collate(examples, pad_id)
            last = index == len(micro_batches) - 1
            with nullcontext() if last else accelerator.no_sync(model):  # sync once a step
                loss, _ = loss_sum(
                    model, {k: v.to(device) for k, v in batch.items()}, position_loss
                )
                accelerator.backward(loss * (world / n_targets if mine else 0.0))
            step_loss += loss.item() if mine else 0.0
            if distill is not None:
                sums = distill.take_sums()
                parts = {k: v + sums[k] if mine else v for k, v in parts.items()}
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            step_loss, parts["ce"], parts["divergence"] = accelerator.reduce(
                torch.tensor(
                    [step_loss, parts["ce"], parts["divergence"]],
                    dtype=torch.float64,
                    device=device,
                ),
                "sum",
            ).tolist()
        seen += sum(len(micro) for micro in micro_batches)
        tokens += sum(len(e.input_ids) for micro in micro_batches for e in micro)  # no padding
        train_s += time.perf_counter() - t0

        loss_value, tokens_per_s = step_loss / n_targets, tokens / train_s
        evaluated = step % cfg.eval_every == 0 or step == total_steps
        valid = evaluate() if evaluated else {"eval_loss": None}
        elapsed = elapsed_before + time.perf_counter() - loop_start
        if main:
            # With distillation, the loss's two parts per response token (alpha weighs them).
            split = (
                {"ce_loss": parts["ce"] / n_targets, "divergence": parts["divergence"] / n_targets}
                if distill is not None
                else {}
            )
            store.log_train_step(
                run_id,
                step,
                epoch=seen / len(train_set),
                loss=loss_value,
                lr=lr,
                tokens=tokens,
                tokens_per_s=tokens_per_s,
                elapsed_s=elapsed,
                **valid,
                **split,
            )
            figures = {"loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s}
            log_step(accelerator, step, **figures, **valid, **split)
        if step % cfg.save_every == 0:
            loop.values = {
                "step": step,
                "plan": plan,
                "seen": seen,
                "tokens": tokens,
                "train_s": train_s,
                "elapsed_s": elapsed,
            }
            save_checkpoint(
                accelerator,
                ckpt_dir,
                step,
                {"fingerprint": fp, "run_id": run_id, "format": CHECKPOINT_FORMAT},
            )
        if progress and main:
            progress(step, total_steps, loss_value, tokens_per_s)

    trained = plain_model(accelerator, model, config, path)
    metrics = {
        "steps": total_steps,
        "useful_tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s else None,
        "seconds": elapsed_before + time.perf_counter() - loop_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "packed": packed,
    }
    if device.type == "cuda":
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if main:
        rows = store.train_steps(run_id)
        losses = [r["loss"] for r in rows if r["loss"] is not None]
        evals = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
        metrics.update(
            train_loss=losses[-1],
            train_loss_avg=sum(losses) / len(losses),
            eval_loss=evals[-1] if evals else None,
            eval_loss_first=evals[0] if evals else None,
        )
        if distill is not None:
            divergences = [r["eval_divergence"] for r in rows if r["eval_divergence"] is not None]
            metrics.update(
                distill=cfg.distill.loss,
                train_ce=rows[-1]["ce_loss"],
                train_divergence=rows[-1]["divergence"],
                eval_divergence=divergences[-1] if divergences else None,
                eval_divergence_first=divergences[0] if divergences else None,
            )
    return trained, metrics


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay; `step` counts the optimizer steps already taken. Unlike
    the usual schedules, the first step has a non-zero rate: a 3-step run must learn something."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _configure_deepspeed(accelerator, cfg) -> None:
    """DeepSpeed wants its micro-batch size up front (we prepare no dataloader), and it would
    step the optimizer at each backward of an accumulation: accumulate with batch_size instead."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if cfg.grad_accum != 1:
        raise ValueError(
            "training.grad_accum: must be 1 under DeepSpeed; raise "
            "training.batch_size instead (it is split across the processes)"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = math.ceil(cfg.batch_size / accelerator.num_processes)
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)


def fingerprint(
    config: Config, train_rows: list[dict], valid_rows: list[dict], captures: dict | None = None
) -> str:
    """What the trained weights depend on: settings, base model id, seed and the ordered data
    (with distillation, the teacher's captured distributions of it too). Not the number of
    processes: N of them compute the same updates as one."""
    fmt = config.training.prompt_format
    if fmt not in ("alpaca", "chat") and not Path(fmt).is_file():
        raise ValueError(f"training.prompt_format: {fmt}: neither alpaca, chat nor a template file")
    payload = {
        "training": config.training.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
        "template": fmt if fmt in ("alpaca", "chat") else Path(fmt).read_text(encoding="utf-8"),
        # exclude_none: an unset from_teacher leaves the fingerprints of earlier runs as they were
        "student": config.student.model_dump(mode="json", exclude_none=True),
        "seed": config.seed,
        "data": [
            [[r["instance_id"], r["instruction"], r["input"], r["output"]] for r in rows]
            for rows in (train_rows, valid_rows)
        ],
    }
    if config.student.from_teacher is not None:  # the starting weights are the teacher's
        payload["teacher"] = config.teacher.model
    if captures is not None:
        payload["captures"] = captures_digest(captures, [*train_rows, *valid_rows])
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def captures_digest(captures: dict, rows: list[dict]) -> str:
    """sha256 of the captures of `rows` (ids, log-probs and vocabulary), in row order."""
    digest = hashlib.sha256()
    for row in rows:
        capture = captures.get(row["instance_id"])
        if capture is None:
            digest.update(b"-")
            continue
        digest.update(capture.teacher_vocab_hash.encode())
        for array in (capture.answer_ids, capture.topk_ids, capture.topk_logprobs):
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def make_accelerator(report_to: list[str] = (), logging_dir: Path | None = None):
    """One process, or one of many under `accelerate launch` / `torchrun`, which set the
    distributed environment that Accelerator reads (DDP, FSDP or DeepSpeed, gloo on CPUs), with
    the experiment trackers `report_to` (see `trackers`) logging under `logging_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_trackers(report_to)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Without a GPU, accelerate runs several processes only when told they are CPU ones (gloo).
    accelerator = Accelerator(
        cpu=launched > 1 and not torch.cuda.is_available(),
        log_with=list(report_to) or None,
        project_config=ProjectConfiguration(logging_dir=logging_dir and str(logging_dir)),
    )
    if accelerator.num_processes != launched:  # each process would train alone, all writing
        raise RuntimeError(
            f"launched as {launched} processes, but accelerate sees "
            f"{accelerator.num_processes}; check the launcher's configuration"
        )
    return accelerator


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use `n` CPU threads inside the block (None: as they are), the caller's number after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
