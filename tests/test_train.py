"""The training stage, on a tiny random Llama student that shares a real tokenizer."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import add_examples
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tutelage import train as tr
from tutelage.config import Config
from tutelage.export import export_model
from tutelage.model_files import ModelNotFound
from tutelage.store import Store
from tutelage.student_prompt import student_prompt

EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
    ("Give an antonym of hot.", "", "Cold."),
]
VALID = [("Name a secondary colour.", "", "Green is a secondary colour.")]
# The tiny model's output head is random and, under "all-linear", frozen: it cannot express a
# confident answer, so the overfitting test also adapts the head.
LORA_WITH_HEAD = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
]


def make_run(
    run_dir: Path, model: Path, method: str = "lora", lora: dict | None = None, **training
) -> tuple[Store, Config]:
    store = Store(run_dir)
    if not store.examples():
        add_examples(store, EXAMPLES, "train")
        add_examples(store, VALID, "valid")
    # One thread: the same numbers as two, and far faster on a shared 2-core machine.
    # No GGUF unless a test asks: the conversion is a child process of several seconds.
    training = {"batch_size": 4, "learning_rate": 1e-2, "threads": 1, "gguf": None, **training}
    config = Config(
        run_dir=run_dir,
        student={"model": str(model), "method": method, "lora": lora or {}},
        training=training,
    )
    return store, config


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


# -- data -----------------------------------------------------------------------------------------
def test_prompt_is_masked_token_by_token(tokenizer):
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in EXAMPLES[:2]]
    examples = [tr.tokenize_example(tokenizer, r, "alpaca", 384) for r in rows]
    batch = tr.collate(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(e.input_ids) for e in examples))
    for row, ids, mask, labels in zip(
        rows,
        batch["input_ids"].tolist(),
        batch["attention_mask"].tolist(),
        batch["labels"].tolist(),
    ):
        prompt = tokenizer(student_prompt(row["instruction"], row["input"]))["input_ids"]
        target = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(target) + 1
        assert ids[:n] == prompt + target + [tokenizer.eos_token_id]
        for t in range(len(ids)):
            if t < len(prompt):
                assert labels[t] == tr.IGNORE and mask[t] == 1, t
            elif t < n:
                assert labels[t] == ids[t] and mask[t] == 1, t
            else:  # padding
                assert labels[t] == tr.IGNORE and mask[t] == 0, t
        assert labels[n - 1] == tokenizer.eos_token_id  # the model learns to stop
    assert 0 in batch["attention_mask"]  # the two examples differ in length


def test_long_examples_are_cut_or_dropped(tokenizer):
    rows = [{"instruction": "Say hello.", "input": "", "output": "Hello there, my dear friend."}]
    prompt = len(tokenizer(student_prompt("Say hello."))["input_ids"])
    kept, dropped, truncated = tr.tokenize_examples(tokenizer, rows, "alpaca", prompt + 2)
    assert (len(kept), dropped, truncated) == (1, 0, 1)
    assert len(kept[0].input_ids) == prompt + 2
    assert kept[0].labels[-2:] == kept[0].input_ids[-2:] != [tokenizer.eos_token_id] * 2
    assert tr.tokenize_examples(tokenizer, rows, "alpaca", prompt) == ([], 1, 0)


def test_loss_counts_only_response_tokens(tokenizer, tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in EXAMPLES]
    batch = tr.collate(
        tr.tokenize_examples(tokenizer, rows, "alpaca", 384)[0], tokenizer.pad_token_id
    )
    total, n = tr.loss_sum(model, batch)
    assert n == int((batch["labels"] != tr.IGNORE).sum())
    reference = model(**batch).loss  # transformers' own shifted, masked loss over full logits
    assert (total / n).item() == pytest.approx(reference.item(), rel=1e-5)


def test_batch_plan_groups_lengths_and_covers_epochs():
    lengths = [5, 40, 12, 33, 8, 21, 17, 29, 3, 36]
    plan = tr.batch_plan(lengths, batch_size=3, n_batches=9, seed=1)
    assert plan == tr.batch_plan(lengths, 3, 9, seed=1)
    assert plan != tr.batch_plan(lengths, 3, 9, seed=2)
    # An epoch of 10 is batches of 3, 3, 3 and 1 in some order; the plan is two epochs and a bit.
    assert len(plan) == 9
    first, second = plan[:4], plan[4:8]
    assert sorted(map(len, first)) == sorted(map(len, second)) == [1, 3, 3, 3]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert sorted(i for b in second for i in b) == list(range(10))
    # Sorted within the epoch: the length ranges of two batches never interleave.
    for epoch in (first, second):
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in epoch)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), spans
    assert first != second  # each epoch reshuffled


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, steps", [("lora", 60), ("full", 40)])
def test_tiny_model_overfits_and_everything_is_stored(tmp_path, tiny_model, method, steps):
    store, config = make_run(
        tmp_path / "run",
        tiny_model,
        method,
        {"target_modules": LORA_WITH_HEAD},
        max_steps=steps,
        eval_every=10,
        save_every=100,
        gradient_checkpointing=method == "full",
    )
    calls = []
    metrics = tr.train(store, config, tmp_path / "run", progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(s, steps) for s in range(1, steps + 1)]

    steps_rows = store.train_steps(metrics.run_id)
    assert [r["step"] for r in steps_rows] == list(range(steps + 1))
    assert steps_rows[0]["loss"] is None and steps_rows[0]["eval_loss"] > 9  # before training
    losses = [r["loss"] for r in steps_rows[1:]]
    assert losses[0] > 9 and losses[-1] < 0.5, losses
    assert [r["step"] for r in steps_rows if r["eval_loss"] is not None] == list(
        range(0, steps + 1, 10)
    )
    tokens = [r["tokens"] for r in steps_rows]
    assert all(a < b for a, b in itertools.pairwise(tokens))
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in steps_rows[1:])

    run = store.latest_train_run()
    assert run["status"] == "done" and run["output_dir"] == str(tmp_path / "run" / "student")
    stored = json.loads(run["metrics_json"])
    assert stored["steps"] == steps and stored["train_examples"] == 4
    assert stored["valid_examples"] == 1 and stored["train_loss"] == losses[-1]
    assert (stored["eval_loss_first"], stored["eval_loss"]) == (
        steps_rows[0]["eval_loss"],
        steps_rows[-1]["eval_loss"],
    )
    assert stored["useful_tokens"] == tokens[-1] and stored["peak_rss_mb"] > 0
    assert (tmp_path / "run" / "student-adapter").exists() == (method == "lora")

    # The saved (merged) student scores the valid set as the model in training did.
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    valid = tr.tokenize_examples(tok, store.examples(split="valid"), "alpaca", 384)[0]
    assert tr.eval_loss(student, valid, 4, tok.pad_token_id, torch.device("cpu")) == pytest.approx(
        stored["eval_loss"], rel=1e-4
    )
    assert (
        json.loads((tmp_path / "run" / "student" / "tutelage.json").read_text())["run_id"]
        == metrics.run_id
    )


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, tiny_model):
    # Recomputed layers must draw the same dropout masks as the first pass: same losses, same
    # weights, with it (the default) and without.
    options = {"lora": {"dropout": 0.1}, "max_steps": 3, "batch_size": 2, "eval_every": 3}
    runs = {}
    for on in (True, False):
        store, config = make_run(
            tmp_path / str(on), tiny_model, gradient_checkpointing=on, **options
        )
        tr.train(store, config, tmp_path / str(on))
        steps = store.train_steps(store.latest_train_run()["id"])
        measured = [v for r in steps for v in (r["loss"], r["eval_loss"]) if v is not None]
        runs[on] = (measured, student_weights(tmp_path / str(on)))
    assert Config().training.gradient_checkpointing
    (losses_on, weights_on), (losses_off, weights_off) = runs[True], runs[False]
    assert losses_on == pytest.approx(losses_off, rel=1e-5)
    for name in weights_on:
        assert torch.allclose(weights_on[name], weights_off[name], atol=1e-6), name


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_model):
    # Dropout and accumulation on: resuming must restore the RNG and the batch order exactly.
    options = {
        "method": "lora",
        "lora": {"dropout": 0.1},
        "max_steps": 6,
        "batch_size": 2,
        "grad_accum": 2,
        "save_every": 2,
        "eval_every": 3,
    }
    store_a, config_a = make_run(tmp_path / "a", tiny_model, **options)
    tr.train(store_a, config_a, tmp_path / "a")
    assert [p.name for p in tr.checkpoints(tmp_path / "a" / "checkpoints")] == ["step-4", "step-6"]

    store_b, config_b = make_run(tmp_path / "b", tiny_model, **options)

    def kill_at_5(step, total, loss, tokens_per_s):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        tr.train(store_b, config_b, tmp_path / "b", progress=kill_at_5)
    assert store_b.latest_train_run()["status"] == "failed"
    assert not (tmp_path / "b" / "student").exists()
    resumed_from = []
    tr.train(store_b, config_b, tmp_path / "b", progress=lambda s, *a: resumed_from.append(s))
    assert resumed_from == [5, 6]  # steps 1-4 came from the checkpoint
    assert len(store_b.train_runs()) == 1 and store_b.latest_train_run()["status"] == "done"

    a, b = student_weights(tmp_path / "a"), student_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-7), name
    logged_a, logged_b = (
        [(r["step"], r["loss"], r["eval_loss"]) for r in s.train_steps(s.latest_train_run()["id"])]
        for s in (store_a, store_b)
    )
    assert logged_a == logged_b


def test_an_identical_rerun_is_reused_and_a_changed_one_retrains(tmp_path, tiny_model):
    store, config = make_run(tmp_path / "run", tiny_model, max_steps=2, save_every=1)
    first = tr.train(store, config, tmp_path / "run")
    assert first.reused is False
    again = tr.train(store, config, tmp_path / "run")
    assert again.reused is True and again.run_id == first.run_id
    assert again.train_loss == first.train_loss and len(store.train_runs()) == 1

    config.training.learning_rate = 5e-3
    changed = tr.train(store, config, tmp_path / "run")
    assert changed.reused is False and changed.run_id != first.run_id
    metas = [
        json.loads((p / "meta.json").read_text())
        for p in tr.checkpoints(tmp_path / "run" / "checkpoints")
    ]
    assert {m["run_id"] for m in metas} == {changed.run_id}
    info = json.loads((tmp_path / "run" / "student" / "tutelage.json").read_text())
    assert (
        info["run_id"] == changed.run_id
        and info["fingerprint"] != store.train_runs()[0]["fingerprint"]
    )


def test_exported_student_loads_and_generates_without_tutelage(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="tutelage train"):
        export_model(tmp_path / "run", tmp_path / "out")
    store, config = make_run(tmp_path / "run", tiny_model, max_steps=1)
    tr.train(store, config, tmp_path / "run")
    out = export_model(tmp_path / "run", tmp_path / "out")
    script = (
        "import sys; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
        f"p = {str(out)!r}; m = M.from_pretrained(p); t = T.from_pretrained(p); "
        "ids = t('Name a primary colour.', return_tensors='pt'); "
        "o = m.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=t.eos_token_id); "
        "assert 'tutelage' not in sys.modules and 'peft' not in sys.modules; "
        "print(o.shape[1] - ids['input_ids'].shape[1])"
    )
    probe = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().splitlines()[-1] == "4"


# -- errors ---------------------------------------------------------------------------------------
def test_nothing_to_train_on(tmp_path, tiny_model):
    store = Store(tmp_path / "run")
    add_examples(store, VALID, "valid")
    config = Config(run_dir=tmp_path / "run", student={"model": str(tiny_model)})
    with pytest.raises(ValueError) as e:
        tr.train(store, config, tmp_path / "run")
    assert "nothing to train on" in str(e.value) and "tutelage generate" in str(e.value)
    assert "\n" not in str(e.value) and store.train_runs() == []


def test_a_bad_student_is_named(tmp_path):
    store = Store(tmp_path / "run")
    add_examples(store, EXAMPLES, "train")
    missing = Config(student={"model": str(tmp_path / "nowhere")})
    with pytest.raises(ModelNotFound, match="^student.model: "):
        tr.train(store, missing, tmp_path / "run")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ValueError) as e:
        tr.train(store, Config(student={"model": str(broken)}), tmp_path / "run")
    assert str(e.value).startswith(f"student.model: {broken}: cannot load") and "\n" not in str(
        e.value
    )


def test_the_student_is_also_written_as_gguf_and_only_that_reruns(
    tmp_path, tiny_model, monkeypatch
):
    from gguf import GGUFReader

    store, config = make_run(tmp_path / "run", tiny_model, max_steps=2, gguf="f32")
    first = tr.train(store, config, tmp_path / "run")
    gguf = tmp_path / "run" / "student.gguf"
    assert first.gguf == str(gguf) and first.gguf_type == "f32"
    # The merged student's weights, not the base's (LoRA changed this layer).
    merged = student_weights(tmp_path / "run")["model.layers.0.mlp.down_proj.weight"]
    base = load_file(tiny_model / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    down = next(t for t in GGUFReader(gguf).tensors if t.name == "blk.0.ffn_down.weight")
    assert torch.allclose(torch.from_numpy(down.data.copy()).reshape(merged.shape), merged)
    assert not torch.allclose(merged, base)

    # A failed conversion is recorded, and the trained student stays.
    config.training.gguf = "f16"
    monkeypatch.setenv("TUTELAGE_LLAMA_CPP", str(tmp_path / "nowhere"))
    again = tr.train(store, config, tmp_path / "run")
    assert again.reused is True and again.run_id == first.run_id  # no retraining
    assert "nowhere" in again.gguf_error and not gguf.exists()
    monkeypatch.delenv("TUTELAGE_LLAMA_CPP")
    fixed = tr.train(store, config, tmp_path / "run")
    assert fixed.reused is True and fixed.gguf == str(gguf) and fixed.gguf_error is None
    stored = json.loads(store.latest_train_run()["metrics_json"])
    assert stored["gguf_type"] == "f16" and "gguf_error" not in stored
    assert len(store.train_runs()) == 1


def test_a_gguf_file_trains_as_a_student(tmp_path, tiny_model, monkeypatch):
    from tutelage.gguf import export_gguf

    monkeypatch.setenv("TUTELAGE_CACHE", str(tmp_path / "cache"))  # its HF copy lands here
    gguf = export_gguf(tiny_model, tmp_path / "tiny.gguf", "f32")
    store, config = make_run(tmp_path / "run", gguf, max_steps=2)
    metrics = tr.train(store, config, tmp_path / "run")
    assert metrics.steps == 2 and store.latest_train_run()["status"] == "done"
    # The dequantized copy is the tiny model itself, so training starts from the same loss.
    _, reference = make_run(tmp_path / "ref", tiny_model, max_steps=2)
    assert metrics.eval_loss_first == pytest.approx(
        tr.train(Store(tmp_path / "ref"), reference, tmp_path / "ref").eval_loss_first, rel=1e-4
    )
