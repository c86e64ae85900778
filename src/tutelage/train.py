"""Supervised fine-tuning of the student on the kept examples: a plain PyTorch loop.

The recipe, top to bottom:
  1. rows -> token ids, the loss masked to the response (`tokenize_example`);
  2. a batch plan fixed up front: shuffled epochs, grouped by length (`batch_plan`);
  3. the student, LoRA-wrapped, QLoRA (4-bit base, GPU) or fully trainable (`load_model`);
  4. AdamW, linear warmup then cosine decay, gradient accumulation, clipping (`_fit`);
  5. eval loss on the valid split, checkpoints, and a merged plain HF folder at the end.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config
from .gguf import write_student_gguf
from .model_files import resolve_student
from .store import Store
from .student_prompt import prompt_ids, student_prompt

IGNORE = -100  # label of a token that carries no loss (prompt and padding)
MEGABATCH = 50  # batches sorted by length together: low padding, yet still a shuffled order
KEEP_CHECKPOINTS = 2
CHECKPOINT_FORMAT = 2  # accelerate's save_state; format 1 (before it) cannot resume, it retrains
# Fields that change neither the weights nor the data: changing them must not retrain.
NOT_FINGERPRINTED = {"threads", "eval_every", "save_every", "gguf"}
# Attention kernels that take packed sequences apart from position_ids at no extra cost.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the response and its EOS

    @property
    def n_targets(self) -> int:  # the tokens that carry loss (the first one never does)
        return sum(label != IGNORE for label in self.labels[1:])


def tokenize_example(tokenizer, row: dict, style: str, max_seq_len: int) -> Example | None:
    """Prompt and response tokenized apart, then joined, so the loss mask falls exactly on the
    boundary. The response is cut to fit `max_seq_len`; None when the prompt alone fills it."""
    prompt = prompt_ids(
        tokenizer,
        student_prompt(row["instruction"], row["input"], style=style, tokenizer=tokenizer),
        style,
    )
    room = max_seq_len - len(prompt)
    if room <= 0:
        return None
    target = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    target = (target + [tokenizer.eos_token_id])[:room]
    return Example(prompt + target, [IGNORE] * len(prompt) + target)


def tokenize_examples(
    tokenizer, rows: list[dict], style: str, max_seq_len: int
) -> tuple[list[Example], int, int]:
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
            mega = sorted(epoch[start : start + MEGABATCH * batch_size], key=lambda i: -lengths[i])
            batches = [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
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


def pack(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: the examples end to end in one row, positions restarting at each. The model
    reads the restarts as sequence boundaries (transformers' packed-sequence masks, or varlen
    flash attention), so no token attends across examples and no compute goes to padding."""
    labels = [[IGNORE, *e.labels[1:]] for e in examples]  # never predict across a boundary
    return {
        "input_ids": torch.tensor([[t for e in examples for t in e.input_ids]]),
        "position_ids": torch.tensor([[i for e in examples for i in range(len(e.input_ids))]]),
        "labels": torch.tensor([[t for row in labels for t in row]]),
    }


# -- model and loss -----------------------------------------------------------------------------
def load_model(
    config: Config, path: Path, device: torch.device, bf16: bool = False, for_export: bool = False
) -> torch.nn.Module:
    """The student ready to train on `device`: LoRA-wrapped (`lora`, `qlora`) or whole (`full`),
    its weights in bf16 when asked (pure bf16, as torchtune does), else fp32.
    `for_export`: full precision on the CPU, the shape a trained state is merged into."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    method, cfg = config.student.method, config.training
    kwargs: dict = (
        {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    )
    bf16 = bf16 and not for_export
    quantized = method == "qlora" and not for_export
    if quantized:
        kwargs.update(quantization_config=qlora_quantization(device), device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if bf16 else torch.float32, **kwargs
        )
    except Exception as e:  # a folder with a config.json that transformers cannot load
        raise ValueError(
            f"student.model: {config.student.model}: cannot load the model ({_first_line(e)})"
        ) from e
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.to(device)
        if cfg.gradient_checkpointing and not for_export:
            model.activation_checkpointing_enable()  # non-reentrant: LoRA needs no input grads
    if method in ("lora", "qlora"):
        lora = config.student.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def qlora_quantization(device: torch.device):
    """QLoRA's base model: 4-bit NormalFloat with double quantization, computing in bf16."""
    if device.type != "cuda":
        raise ValueError(
            "student.method: qlora needs a CUDA GPU (4-bit bitsandbytes kernels); "
            "use lora on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(
            "student.method: qlora needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


@torch.no_grad()
def packing_is_exact(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `model` keeps packed sequences apart: two short sequences scored packed and one
    by one must give the same logits. Cheap, and true for any architecture that passes."""
    vocab = (
        model.config.get_text_config().vocab_size
        if hasattr(model.config, "get_text_config")
        else model.config.vocab_size
    )
    first, second = torch.arange(7) * 13 % vocab, torch.arange(5) * 29 % vocab + 3
    was_training = model.training
    model.eval()
    try:
        apart = torch.cat(
            [
                model(input_ids=s[None].to(device), use_cache=False).logits[0]
                for s in (first, second)
            ]
        )
        packed = model(
            input_ids=torch.cat([first, second])[None].to(device),
            position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None].to(device),
            use_cache=False,
        ).logits[0]
    except Exception:  # a forward without position_ids, say
        return False
    finally:
        model.train(was_training)
    tolerance = 5e-2 if apart.dtype in (torch.bfloat16, torch.float16) else 1e-3
    return bool(torch.allclose(apart.float(), packed.float(), atol=tolerance, rtol=tolerance))


def choose_packing(setting: bool | str, model: torch.nn.Module, device: torch.device) -> bool:
    """`auto` packs only with a varlen attention kernel (flash attention), where it is free. With
    sdpa or eager attention the packed mask is a dense block-diagonal matrix, and on the CPU we
    measured no gain over length-grouped padding (docs/benchmarks.md); `true` packs anyway."""
    if setting is False:
        return False
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    if setting == "auto" and implementation not in VARLEN_ATTENTION:
        return False
    if packing_is_exact(model, device):
        return True
    if setting is True:
        raise ValueError(
            f"training.packing: {type(model).__name__} with {implementation or 'its'} "
            f"attention mixes packed sequences; set packing: false"
        )
    return False


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens of a batch (padded or packed), and how many
    there are.

    Only the positions that predict a response token are projected onto the vocabulary: with
    Gemma's 262k vocabulary, the logits of a whole batch would cost gigabytes."""
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    scored = targets != IGNORE
    keep = torch.cat([scored, scored.new_zeros(len(scored), 1)], dim=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (scored, vocab)
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), int(scored.sum())


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    accelerator=None,
) -> float | None:
    """Mean loss per response token over `examples` (None when there are none). Under several
    processes each scores its share of every batch, and all run the same number of forwards
    (sharded models need every process in every forward)."""
    if not examples:
        return None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    model.eval()
    total, n = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
    for i in range(0, len(ordered), batch_size):
        part = ordered[i : i + batch_size]
        mine = part[rank::world]
        batch = {k: v.to(device) for k, v in collate(mine or part[:1], pad_id).items()}
        loss, count = loss_sum(model, batch)
        if mine:
            total, n = total + loss.item(), n + count
    model.train()
    if world > 1:
        total, n = accelerator.reduce(
            torch.tensor([total, n], dtype=torch.float64, device=device), "sum"
        ).tolist()
    return total / n


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay; `step` counts the optimizer steps already taken. Unlike
    the usual schedules, the first step has a non-zero rate: a 3-step run must learn something."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -- fingerprint, checkpoints, output ------------------------------------------------------------
def fingerprint(config: Config, train_rows: list[dict], valid_rows: list[dict]) -> str:
    """What the trained weights depend on: settings, base model id, seed and the ordered data.
    Not the number of processes: N of them compute the same updates as one."""
    fmt = config.training.prompt_format
    if fmt not in ("alpaca", "chat") and not Path(fmt).is_file():
        raise ValueError(f"training.prompt_format: {fmt}: neither alpaca, chat nor a template file")
    payload = {
        "training": config.training.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
        "template": fmt if fmt in ("alpaca", "chat") else Path(fmt).read_text(encoding="utf-8"),
        "student": config.student.model_dump(mode="json"),
        "seed": config.seed,
        "data": [
            [[r["instance_id"], r["instruction"], r["input"], r["output"]] for r in rows]
            for rows in (train_rows, valid_rows)
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder with `write`, then swap it in: a kill never leaves half a folder
    under `target` (at worst the old one stays as `NAME.old`, or `target` is briefly missing)."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    swap_in(tmp, target)


def swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # The LoRA matrices, or every weight in full fine-tuning (a tied head appears once).
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class LoopState:
    """What the loop needs besides weights, optimizer, scheduler and RNG to go on where it
    stopped: the batch plan and the counters. Checkpointed by accelerate as a custom object."""

    def __init__(self, **values):
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, values: dict) -> None:
        self.values = dict(values)


def checkpoint_hooks(accelerator) -> None:
    """Checkpoints hold the trainable weights only, under their plain (unwrapped) names: a LoRA
    checkpoint of Gemma-270M is a few MB, not the whole model. Sharded engines (FSDP, DeepSpeed)
    keep their own formats: accelerate hands those hooks no weights."""

    def save(models, weights, output_dir):
        for model, state in zip(models, weights):
            state.clear()
            state.update(trainable_state(accelerator.unwrap_model(model)))

    def load(models, input_dir):
        from safetensors.torch import load_file

        file = Path(input_dir) / "model.safetensors"
        if models and file.exists():
            model = models.pop(0)  # loaded here, so accelerate skips it
            unexpected = (
                accelerator.unwrap_model(model)
                .load_state_dict(load_file(file, device=str(accelerator.device)), strict=False)
                .unexpected_keys
            )
            if unexpected:
                raise RuntimeError(f"{input_dir}: does not fit the model ({unexpected[0]})")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, meta: dict) -> None:
    """Every process writes its part (its RNG states; shards under FSDP/DeepSpeed) into
    `step-N.partial`; the main process then swaps the finished folder in."""
    target = ckpt_dir / f"step-{step}"
    tmp = target.with_name(target.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}))
        swap_in(tmp, target)
        for old in checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [
        p
        for p in ckpt_dir.glob("step-*")
        if (p / "meta.json").exists() and p.name.removeprefix("step-").isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def plain_model(accelerator, model, config: Config, path: Path) -> torch.nn.Module | None:
    """The trained model as one plain full-precision module on the main process (None on the
    others). Sharded (FSDP, DeepSpeed) or 4-bit (QLoRA) training is gathered into a fresh
    full-precision copy of the base, so merging LoRA never rounds through 4 bits."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if not sharded and config.student.method != "qlora":
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)  # every process takes part in the gather
    if not accelerator.is_main_process:
        return None
    rebuilt = load_model(config, path, torch.device("cpu"), for_export=True)
    wanted = trainable_state(rebuilt).keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise RuntimeError(f"the trained state lacks {missing[0]}")
    rebuilt.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return rebuilt


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


def make_accelerator():
    """One process, or one of many under `accelerate launch` / `torchrun`, which set the
    distributed environment that Accelerator reads (DDP, FSDP or DeepSpeed, gloo on CPUs)."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Without a GPU, accelerate runs several processes only when told they are CPU ones (gloo).
    accelerator = Accelerator(cpu=launched > 1 and not torch.cuda.is_available())
    if accelerator.num_processes != launched:  # each process would train alone, all writing
        raise RuntimeError(
            f"launched as {launched} processes, but accelerate sees "
            f"{accelerator.num_processes}; check the launcher's configuration"
        )
    return accelerator


# -- the recipe ---------------------------------------------------------------------------------
def train(
    store: Store,
    config: Config,
    run_dir: Path,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> dict:
    """Fine-tune the student on the train split; return the run's metrics (with `run_id`,
    `output_dir`, and `reused`: True when a finished identical run was returned as it was).

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
    fp = fingerprint(config, train_rows, valid_rows)
    done = store.latest_train_run(status="done", fingerprint=fp)
    info = student_info(run_dir)
    if done and info and (info["run_id"], info["fingerprint"]) == (done["id"], fp):
        metrics = json.loads(done["metrics_json"])
        if metrics.get("gguf_type") != cfg.gguf or (cfg.gguf and "gguf" not in metrics):
            metrics = {k: v for k, v in metrics.items() if not k.startswith("gguf")}
            metrics.update(write_student_gguf(run_dir, cfg.gguf))  # only the GGUF setting changed
            store.finish_train_run(done["id"], "done", done["output_dir"], metrics)
        return {**metrics, "run_id": done["id"], "output_dir": done["output_dir"], "reused": True}

    from accelerate.utils import broadcast_object_list
    from transformers import AutoTokenizer

    path = resolve_student(config.student.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(
            f"student.model: {config.student.model}: cannot load the tokenizer ({_first_line(e)})"
        ) from e
    if tokenizer.eos_token_id is None:  # the student could never learn to stop
        raise ValueError(f"student.model: {config.student.model}: the tokenizer has no EOS token")
    train_set, dropped, truncated = tokenize_examples(
        tokenizer, train_rows, cfg.prompt_format, cfg.max_seq_len
    )
    valid_set, _, _ = tokenize_examples(tokenizer, valid_rows, cfg.prompt_format, cfg.max_seq_len)
    if not train_set:
        raise ValueError(
            f"training.max_seq_len: every training prompt is longer than "
            f"{cfg.max_seq_len} tokens ({dropped} examples); raise it"
        )

    accelerator = make_accelerator()
    main = accelerator.is_main_process
    ckpt_dir = run_dir / "checkpoints"
    decision = [
        _resume_or_start(store, config, fp, ckpt_dir, len(train_set), len(valid_set))
        if main
        else None
    ]
    run_id, checkpoint = broadcast_object_list(decision)[0]

    try:
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
            store.finish_train_run(run_id, "failed", None, {"error": _first_line(e)})
        raise
    return {**metrics, "run_id": run_id, "output_dir": str(output), "reused": False}


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
        first = eval_loss(model, valid_set, cfg.batch_size, pad_id, device, accelerator)
        if main:
            store.log_train_step(run_id, 0, epoch=0.0, eval_loss=first, tokens=0, elapsed_s=0.0)
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
        step_loss = 0.0
        for index, micro in enumerate(micro_batches):
            mine = micro[rank::world]
            # A process with no share still runs a forward and backward (weighted 0): the
            # gradient exchange needs every process.
            examples = mine or micro[:1]
            batch = pack(examples) if packed else collate(examples, pad_id)
            last = index == len(micro_batches) - 1
            with nullcontext() if last else accelerator.no_sync(model):  # sync once a step
                loss, _ = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
                accelerator.backward(loss * (world / n_targets if mine else 0.0))
            step_loss += loss.item() if mine else 0.0
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), "sum").item()
        seen += sum(len(micro) for micro in micro_batches)
        tokens += sum(len(e.input_ids) for micro in micro_batches for e in micro)  # no padding
        train_s += time.perf_counter() - t0

        loss_value, tokens_per_s = step_loss / n_targets, tokens / train_s
        evaluated = step % cfg.eval_every == 0 or step == total_steps
        valid_loss = (
            eval_loss(model, valid_set, cfg.batch_size, pad_id, device, accelerator)
            if evaluated
            else None
        )
        elapsed = elapsed_before + time.perf_counter() - loop_start
        if main:
            store.log_train_step(
                run_id,
                step,
                epoch=seen / len(train_set),
                loss=loss_value,
                eval_loss=valid_loss,
                lr=lr,
                tokens=tokens,
                tokens_per_s=tokens_per_s,
                elapsed_s=elapsed,
            )
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
    return trained, metrics


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
