"""Training beyond the basic loop: packing, other architectures, QLoRA's guard, and DDP with two
CPU processes matching one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import EXAMPLES, LORA_WITH_HEAD, make_run, student_weights
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from tutelage import train as tr
from tutelage.store import Store


def tiny(family: str, tokenizer, path: Path) -> Path:
    """A 2-layer random model of `family` with the real tokenizer, saved as an HF folder."""
    torch.manual_seed(0)
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    size = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    config = {
        "llama": lambda: LlamaConfig(**common, **size),
        "qwen2": lambda: Qwen2Config(**common, **size),
        "mistral": lambda: MistralConfig(**common, **size, sliding_window=16),
        "gemma3": lambda: Gemma3TextConfig(
            **common,
            **size,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "gpt2": lambda: GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    }[family]()
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rows(examples=EXAMPLES) -> list[dict]:
    return [{"instruction": i, "input": x, "output": o} for i, x, o in examples]


# -- packing --------------------------------------------------------------------------------------
def test_packed_batch_is_the_padded_batch_end_to_end(tokenizer, tiny_model):
    examples = tr.tokenize_examples(tokenizer, rows(), "alpaca", 384)[0]
    packed = tr.pack(examples)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert "attention_mask" not in packed  # padding-free: the positions say where examples end
    starts = [0]
    for e in examples[:-1]:
        starts.append(starts[-1] + len(e.input_ids))
    positions = packed["position_ids"][0].tolist()
    assert [i for i, p in enumerate(positions) if p == 0] == starts
    labels = packed["labels"][0].tolist()
    assert all(labels[s] == tr.IGNORE for s in starts)
    assert sum(label != tr.IGNORE for label in labels) == sum(e.n_targets for e in examples)

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    padded_loss, padded_n = tr.loss_sum(model, tr.collate(examples, tokenizer.pad_token_id))
    packed_loss, packed_n = tr.loss_sum(model, packed)
    assert packed_n == padded_n
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)


def test_packing_is_chosen_only_where_it_is_exact_and_free(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cpu = torch.device("cpu")
    assert tr.packing_is_exact(model, cpu)
    assert tr.choose_packing(True, model, cpu) is True
    assert tr.choose_packing(False, model, cpu) is False
    assert tr.choose_packing("auto", model, cpu) is False  # sdpa: measured no gain on CPUs

    class Mixing(torch.nn.Module):  # attends across the packed boundary, as a broken kernel would
        config = model.config
        training = False

        def forward(self, input_ids, position_ids=None, **kwargs):
            mixed = input_ids.float().cumsum(-1)[..., None].expand(-1, -1, 8)
            return type("Out", (), {"logits": mixed})

        def train(self, mode=True):
            return self

    assert not tr.packing_is_exact(Mixing(), cpu)
    with pytest.raises(ValueError, match="^training.packing: .*set packing: false"):
        tr.choose_packing(True, Mixing(), cpu)


def test_packed_training_learns_what_padded_training_learns(tmp_path, tiny_model):
    options = {"lora": {"dropout": 0.0}, "max_steps": 4, "batch_size": 4}
    weights = {}
    for packing in (False, True):
        run = tmp_path / str(packing)
        store, config = make_run(run, tiny_model, packing=packing, **options)
        metrics = tr.train(store, config, run)
        assert metrics.packed is packing
        weights[packing] = student_weights(run)
    for name in weights[False]:
        assert torch.allclose(weights[False][name], weights[True][name], atol=1e-5), name


# -- architectures --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3", "gpt2"])
def test_default_lora_trains_and_exports_each_family(tmp_path, tokenizer, family):
    base = tiny(family, tokenizer, tmp_path / family)
    store, config = make_run(tmp_path / "run", base, max_steps=4)
    assert config.student.lora.target_modules == "all-linear"  # the default under test
    metrics = tr.train(store, config, tmp_path / "run")
    losses = [r["loss"] for r in store.train_steps(metrics.run_id)[1:]]
    assert losses[-1] < losses[0], losses
    # The merged export is the plain family, and it scores the valid set as training did.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert type(exported).__name__ == type(AutoModelForCausalLM.from_pretrained(base)).__name__
    # The student's own tokenizer: transformers picks its class by model type (Qwen2Tokenizer
    # splits newlines differently from the Llama one it was saved from).
    own = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    valid = tr.tokenize_examples(own, store.examples(split="valid"), "alpaca", 384)[0]
    assert tr.eval_loss(exported, valid, 4, own.pad_token_id, torch.device("cpu")) == pytest.approx(
        metrics.eval_loss, rel=1e-4
    )
    # Packing is exact for every family we ship defaults for.
    assert tr.packing_is_exact(exported, torch.device("cpu"))


def test_qlora_without_a_gpu_says_what_it_needs(tmp_path, tiny_model):
    store, config = make_run(tmp_path / "run", tiny_model, method="qlora", max_steps=1)
    with pytest.raises(ValueError, match="^student.method: qlora needs a CUDA GPU"):
        tr.train(store, config, tmp_path / "run")
    assert store.latest_train_run()["status"] == "failed"


# -- two processes --------------------------------------------------------------------------------
LAUNCHERS = {
    "torchrun": [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ],
    # --multi_gpu picks accelerate's torchrun launcher; with no GPU each process trains on the CPU
    # (gloo).
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ddp_with_two_cpu_processes_matches_one_process(tmp_path, tiny_model, launcher):
    # Batches of 3 over 2 processes split 2 + 1, and the epoch's last batch of 1 leaves one
    # process without a share: both must still give one process's result.
    options = {
        "lora": {"dropout": 0.0, "target_modules": LORA_WITH_HEAD},
        "max_steps": 4,
        "batch_size": 3,
        "grad_accum": 2,
        "save_every": 2,
        "eval_every": 2,
    }
    store_one, config_one = make_run(tmp_path / "one", tiny_model, **options)
    one = tr.train(store_one, config_one, tmp_path / "one")

    store_two, config_two = make_run(tmp_path / "two", tiny_model, **options)
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(config_two.model_dump(mode="json")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [
            *LAUNCHERS[launcher],
            "-m",
            "tutelage",
            "train",
            "-c",
            str(config_file),
            "--run-dir",
            str(tmp_path / "two"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    run = store_two.latest_train_run()
    assert run["status"] == "done" and len(store_two.train_runs()) == 1
    two = json.loads(run["metrics_json"])
    assert (two["processes"], two["engine"]) == (2, "MULTI_CPU")
    assert (one.processes, one.engine) == (1, "NO")
    assert two["useful_tokens"] == one.useful_tokens
    logged = [
        [(r["step"], r["loss"], r["eval_loss"]) for r in s.train_steps(s.latest_train_run()["id"])]
        for s in (store_one, store_two)
    ]
    assert [r[0] for r in logged[0]] == [r[0] for r in logged[1]] == [0, 1, 2, 3, 4]
    for row_a, row_b in zip(*logged):  # (step, loss, eval loss); None where not measured
        assert [v is None for v in row_a] == [v is None for v in row_b]
        assert [v for v in row_a if v is not None] == pytest.approx(
            [v for v in row_b if v is not None], rel=1e-4, abs=1e-6
        )
    # Adam divides by the root of the squared gradients, so float rounding in gloo's all-reduce
    # reaches the weights amplified where a gradient is near zero (1e-4 on one CPU, 1e-6 on
    # another): the two runs must agree to 1% of how far training moved each tensor.
    a, b = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    base = load_file(tiny_model / "model.safetensors")
    assert a.keys() == b.keys()
    trained = [name for name in a if not torch.equal(a[name], base[name])]
    assert len(trained) >= 15, trained  # the LoRA targets of both layers and the head, merged
    for name in a:
        moved = (a[name] - base[name]).abs().max()
        assert (a[name] - b[name]).abs().max() <= 1e-2 * moved, name
    assert [p.name for p in tr.checkpoints(tmp_path / "two" / "checkpoints")] == [
        "step-2",
        "step-4",
    ]


def test_run_refuses_several_processes(tmp_path):
    from typer.testing import CliRunner

    from tutelage.cli import app

    result = CliRunner().invoke(
        app, ["run", "--run-dir", str(tmp_path / "run")], env={"WORLD_SIZE": "2"}
    )
    assert result.exit_code == 2 and "launch only `tutelage train`" in result.output
    assert not (tmp_path / "run" / "tutelage.db").exists()


def test_shipped_launch_configurations_load_and_init_writes_them(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from typer.testing import CliRunner

    from tutelage.cli import app

    result = CliRunner().invoke(app, ["init", str(tmp_path), "--launchers"])
    assert result.exit_code == 0, result.output
    written = {
        p.name: load_config_from_file(str(p))
        for p in sorted((tmp_path / "accelerate").glob("*.yaml"))
    }
    assert {name: c.distributed_type.value for name, c in written.items()} == {
        "ddp.yaml": "MULTI_GPU",
        "fsdp.yaml": "FSDP",
        "deepspeed-zero3.yaml": "DEEPSPEED",
    }
    assert written["fsdp.yaml"].fsdp_config["fsdp_version"] == 2
    assert written["deepspeed-zero3.yaml"].deepspeed_config["zero_stage"] == 3
    assert (tmp_path / "tutelage.yaml").exists()
    again = CliRunner().invoke(app, ["init", str(tmp_path), "--launchers"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path, tiny_model):
    import signal
    import time

    # Many steps at a high rate: over 60 steps the order of floating-point sums makes two
    # processes drift from one by ~1e-4, so the reference here is an uninterrupted 2-process run.
    options = {
        "lora": {"dropout": 0.1},
        "max_steps": 60,
        "batch_size": 2,
        "save_every": 10,
        "eval_every": 30,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    commands = {}
    for name in ("ref", "two"):
        _, config = make_run(tmp_path / name, tiny_model, **options)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
        commands[name] = [
            *LAUNCHERS["torchrun"],
            "-m",
            "tutelage",
            "train",
            "-c",
            str(tmp_path / f"{name}.yaml"),
            "--run-dir",
            str(tmp_path / name),
        ]
    reference = subprocess.run(
        commands["ref"], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    # Kill -9 the launcher and both workers once the first checkpoint is complete.
    launched = subprocess.Popen(
        commands["two"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = tmp_path / "two" / "checkpoints" / "step-10" / "meta.json"
    deadline = time.time() + 300
    while not first.exists() and launched.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(launched.pid, signal.SIGKILL)
    launched.wait()
    store = Store(tmp_path / "two")
    assert first.exists() and store.latest_train_run()["status"] == "running"
    assert not (tmp_path / "two" / "student").exists()

    resumed = subprocess.run(
        commands["two"], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["status"] for r in store.train_runs()] == ["done"]  # the same run, resumed
    # Dropout is on: each process's RNG state came back from the checkpoint.
    a, b = student_weights(tmp_path / "ref"), student_weights(tmp_path / "two")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-7), name
