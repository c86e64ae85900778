"""Logit distillation: the loss against dense references written out here, its parts through
training (one process and two), the teacher's captures as examples, the vocabulary check, the
held-out KL in evaluation, and a tiny teacher distilled better by KD than by SFT."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import add_examples
from test_loss import CHUNK, tiny, with_lora
from test_train import EXAMPLES, VALID, make_run, student_weights
from test_train_scale import LAUNCHERS

from tutelage import train as tr
from tutelage.config import Config
from tutelage.model_files import vocabulary_hash
from tutelage.store import Store
from tutelage.student_prompt import prompt_ids, student_prompt
from tutelage.train import loss as L

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


# -- dense references ---------------------------------------------------------------------------
def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float,
) -> torch.Tensor:
    """Per position, written from the definition in float64 with every token's probability at
    hand: the teacher's top-k probabilities and its remaining mass 1 - sum; the student's
    probabilities at those ids and 1 - their sum; both raised to 1/T and renormalised; the
    divergence between them, times T^2."""
    p = F.softmax(student_logits.double(), -1)
    q = teacher_logprobs.double().exp()
    q = q / q.sum(-1, keepdim=True)  # the full teacher, exactly normalised
    s_top, t_top = p.gather(-1, ids), q.gather(-1, ids)
    s = torch.cat([s_top, (1 - s_top.sum(-1, keepdim=True)).clamp_min(1e-30)], -1)
    t = torch.cat([t_top, (1 - t_top.sum(-1, keepdim=True)).clamp_min(1e-30)], -1)
    s, t = s ** (1 / temperature), t ** (1 / temperature)
    s, t = s / s.sum(-1, keepdim=True), t / t.sum(-1, keepdim=True)
    if divergence == "forward_kl":
        d = (t * (t.log() - s.log())).sum(-1)
    elif divergence == "reverse_kl":
        d = (s * (s.log() - t.log())).sum(-1)
    else:
        m = beta * t + (1 - beta) * s
        d = beta * (t * (t.log() - m.log())).sum(-1) + (1 - beta) * (s * (s.log() - m.log())).sum(
            -1
        )
    return d * temperature**2


def full_vocabulary_divergence(student_logits, teacher_logprobs, divergence, temperature, beta):
    """Hinton's softened full-vocabulary divergence, by torch's own KL (no buckets at all)."""
    s = F.log_softmax(student_logits.double() / temperature, -1)
    t = F.log_softmax(teacher_logprobs.double() / temperature, -1)

    def kl(a, b):  # KL(a || b) from log-probs
        return F.kl_div(b, a, log_target=True, reduction="none").sum(-1)

    if divergence == "forward_kl":
        d = kl(t, s)
    elif divergence == "reverse_kl":
        d = kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([t + np.log(beta), s + np.log(1 - beta)]), 0)
        d = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return d * temperature**2


# -- a batch with a teacher ---------------------------------------------------------------------
@dataclass
class Scenario:
    batch: dict[str, torch.Tensor]
    teacher: torch.Tensor  # the teacher's full log-probs (batch, length, vocab), token-aligned


def scenario(vocab: int, k: int, seed: int = 0, unscored: bool = True) -> Scenario:
    """Three examples of random tokens (a prompt, then a response of 9-13 tokens), the teacher's
    top-k at each response token; `unscored`: the second example's first response tokens carry
    no teacher (as an earlier assistant turn would)."""
    g = torch.Generator().manual_seed(seed)
    examples, full = [], []
    for prompt_len, response_len in ((5, 13), (3, 9), (7, 11)):
        n = prompt_len + response_len
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        teacher = F.log_softmax(torch.randn(n, vocab, generator=g) * 3, -1)  # token-aligned
        start = prompt_len + (2 if unscored and prompt_len == 3 else 0)
        top = teacher[start:].topk(k, -1)
        examples.append(
            tr.Example(
                ids,
                [tr.IGNORE] * prompt_len + ids[prompt_len:],
                teacher=tr.TeacherTargets(start, top.indices, top.values),
            )
        )
        full.append(teacher)
    batch = tr.collate(examples, pad_id=0)
    width = batch["input_ids"].shape[1]
    teacher = torch.zeros(len(examples), width, vocab)
    for b, t in enumerate(full):
        teacher[b, : len(t)] = t
    return Scenario(batch, teacher)


def dense_loss(model, s: Scenario, distill: L.Distillation, full: bool = False) -> torch.Tensor:
    """The reference loss of a batch from the model's whole logits: alpha x CE + (1 - alpha) x
    the dense divergence at the teacher's positions."""
    batch = s.batch
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    scored = batch["labels"][:, 1:] != tr.IGNORE
    student = logits[:, :-1][scored]
    labels = batch["labels"][:, 1:][scored]
    teacher = s.teacher[:, 1:][scored]
    mask = batch["teacher_mask"][:, 1:][scored]
    ids = batch["teacher_ids"][:, 1:][scored]
    args = (distill.divergence, distill.temperature, distill.beta)
    if full:
        divergence = full_vocabulary_divergence(student, teacher, *args)
    else:
        divergence = dense_divergence(student, teacher, ids, *args)
    ce = F.cross_entropy(student.double(), labels, reduction="none")
    alpha = distill.alpha
    return (alpha * ce + (1 - alpha) * divergence * mask).sum()


def loss_and_gradients(model, loss_of) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    (loss * 0.37).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def assert_matches_reference(model, s: Scenario, distill: L.Distillation, full: bool) -> None:
    chunked = loss_and_gradients(
        model, lambda: L.loss_sum(model, s.batch, distill, chunk_positions=CHUNK)[0]
    )
    reference = loss_and_gradients(model, lambda: dense_loss(model, s, distill, full))
    assert chunked[0] == pytest.approx(reference[0], rel=1e-5)
    assert chunked[1].keys() == reference[1].keys() and chunked[1]
    for name, grad in reference[1].items():
        assert grad.abs().max() > 0, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(
            chunked[1][name], grad.float(), rtol=1e-4, atol=1e-4 * scale, msg=name
        )


# -- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_k_equal_to_the_vocabulary_it_is_the_full_divergence(divergence, temperature):
    vocab = 96
    model = tiny("llama", vocab)
    s = scenario(vocab, k=vocab)
    distill = L.Distillation(divergence, alpha=0.3, temperature=temperature, beta=0.3)
    assert_matches_reference(model, s, distill, full=True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("method", ["full", "lora+head"])
def test_top_k_with_a_tail_bucket_matches_the_formula(divergence, method):
    vocab = 96
    model = tiny("llama", vocab)
    if method != "full":
        model = with_lora(model, head=True)
    s = scenario(vocab, k=5)
    for temperature in (1.0, 2.0):
        distill = L.Distillation(divergence, alpha=0.3, temperature=temperature, beta=0.3)
        assert_matches_reference(model, s, distill, full=False)
    # the tail matters: with it dropped (the top-k renormalised) the loss is another
    distill = L.Distillation(divergence, alpha=0.0)
    with torch.no_grad():
        ours = L.loss_sum(model, s.batch, distill)[0].item()
        scored = s.batch["labels"][:, 1:] != tr.IGNORE
        logits = model(**{k: s.batch[k] for k in ("input_ids", "attention_mask")}).logits
        student = logits[:, :-1][scored].log_softmax(-1)
        ids = s.batch["teacher_ids"][:, 1:][scored]
        t = s.batch["teacher_logprobs"][:, 1:][scored].log_softmax(-1)
        st = student.gather(-1, ids).log_softmax(-1)
        mask = s.batch["teacher_mask"][:, 1:][scored]
        renormalised = ((t.exp() * (t - st)).sum(-1) * mask).sum().item()
    if divergence == "forward_kl":
        assert ours != pytest.approx(renormalised, rel=1e-2)


def test_alpha_one_is_cross_entropy_and_alpha_zero_ignores_the_labels():
    vocab = 96
    model = tiny("llama", vocab)
    s = scenario(vocab, k=7)
    with torch.no_grad():
        ce = L.loss_sum(model, s.batch)[0].item()
        assert L.loss_sum(model, s.batch, L.Distillation(alpha=1.0))[0].item() == pytest.approx(
            ce, rel=1e-6
        )
        labels = s.batch["labels"]
        other = labels.where(labels == tr.IGNORE, (labels + 1) % vocab)  # every label changed
        relabelled = dict(s.batch, labels=other)
        kd = L.Distillation(alpha=0.0)
        assert L.loss_sum(model, relabelled, kd)[0].item() == pytest.approx(
            L.loss_sum(model, s.batch, kd)[0].item(), rel=1e-6
        )


def test_the_parts_are_summed_for_the_curves_and_a_sharded_head_agrees():
    vocab = 96
    model = tiny("llama", vocab)
    s = scenario(vocab, k=7)
    distill = L.Distillation("jsd", alpha=0.25, temperature=1.5, beta=0.5)
    loss, _ = L.loss_sum(model, s.batch, distill, chunk_positions=CHUNK)
    parts = distill.take_sums()
    assert loss.item() == pytest.approx(0.25 * parts["ce"] + 0.75 * parts["divergence"], rel=1e-5)
    assert parts["ce"] > 0 and parts["divergence"] > 0
    assert distill.take_sums() == {"ce": 0.0, "divergence": 0.0}  # taken: starts again
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    # FSDP / ZeRO-3 heads take the model's own logits and autograd through the same loss
    model.zero_grad()
    model.lm_head.weight.ds_id = 0
    assert L.head_is_sharded(model)
    whole, _ = L.loss_sum(model, s.batch, distill)
    assert whole.item() == pytest.approx(loss.item(), rel=1e-5)
    assert distill.take_sums() == pytest.approx(parts, rel=1e-5)
    whole.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, chunked[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padded_and_packed_batches_give_the_same_distillation_loss():
    vocab = 96
    model = tiny("llama", vocab)
    s = scenario(vocab, k=7)
    examples = []
    for b in range(3):  # back from the padded batch to examples
        n = int(s.batch["attention_mask"][b].sum())
        mask = s.batch["teacher_mask"][b, :n]
        start = int(mask.nonzero()[0])
        examples.append(
            tr.Example(
                s.batch["input_ids"][b, :n].tolist(),
                s.batch["labels"][b, :n].tolist(),
                teacher=tr.TeacherTargets(
                    start,
                    s.batch["teacher_ids"][b, start:n],
                    s.batch["teacher_logprobs"][b, start:n],
                ),
            )
        )
    distill = L.Distillation("forward_kl", alpha=0.5)
    with torch.no_grad():
        padded = L.loss_sum(model, tr.collate(examples, 0), distill)[0].item()
        packed = L.loss_sum(model, tr.pack(examples), distill)[0].item()
    assert packed == pytest.approx(padded, rel=1e-5)


# -- captures as training examples ---------------------------------------------------------------
@dataclass
class Capture:
    """What tutelage.capture.storage.load_captures gives, per instance."""

    answer_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    teacher_vocab_hash: str


def capture_of(model, tokenizer, prompt: list[int], answer: list[int], k: int) -> Capture:
    """The teacher `model`'s top-k over `answer` after `prompt`, as the capture stores it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
    logprobs = logits[len(prompt) - 1 : -1].float().log_softmax(-1)  # predicting each answer token
    top = logprobs.topk(k, -1)
    return Capture(
        np.asarray(answer, dtype=np.int32),
        top.indices.numpy().astype(np.int32),
        top.values.numpy().astype(np.float16),
        vocabulary_hash(tokenizer),
    )


def put_captures(store: Store, captures: dict[int, Capture]) -> None:
    """Store captures as the capture stage does (little-endian int32 / float16 arrays)."""
    for instance_id, c in captures.items():
        store.put_capture(
            instance_id,
            f"test-{instance_id}",
            c.teacher_vocab_hash,
            c.topk_ids.shape[1],
            len(c.answer_ids),
            (
                c.answer_ids.astype("<i4").tobytes(),
                c.topk_ids.astype("<i4").tobytes(),
                c.topk_logprobs.astype("<f2").tobytes(),
            ),
        )


def capture_all(store: Store, teacher_dir: Path, tokenizer, k: int = 8, split=None) -> dict:
    """The teacher at `teacher_dir` scores every kept example: its chat prompt, then the answer
    in its tokens with its end-of-turn token."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    captures = {}
    for row in store.examples(split=split):
        prompt = prompt_ids(tokenizer, student_prompt(row["instruction"], row["input"]), "alpaca")
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        captures[row["instance_id"]] = capture_of(
            teacher, tokenizer, prompt, [*answer, tokenizer.eos_token_id], k
        )
    put_captures(store, captures)
    return captures


def test_a_capture_becomes_an_example_aligned_with_the_teacher(tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():  # sharp: a random head spreads over all 49k tokens
        teacher.lm_head.weight.mul_(300.0)
    row = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}
    prompt = prompt_ids(tokenizer, student_prompt(row["instruction"], ""), "alpaca")
    answer = [*tokenizer("Red.", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    capture = capture_of(teacher, tokenizer, prompt, answer, k=6)
    example = tr.tokenize_distilled(tokenizer, row, "alpaca", 384, capture, top_k=4)
    assert example.input_ids == prompt + answer
    assert example.labels == [tr.IGNORE] * len(prompt) + answer
    assert example.teacher.start == len(prompt)
    assert example.teacher.ids.tolist() == capture.topk_ids[:, :4].tolist()
    # the teacher's row for token t is its prediction of token t: the teacher itself as the
    # student scores KL 0 (up to fp16) and its cross-entropy is the teacher's own NLL
    batch = tr.collate([example], tokenizer.pad_token_id)
    kl = L.Distillation("forward_kl", alpha=0.0)
    with torch.no_grad():
        assert L.loss_sum(teacher, batch, kl)[0].item() == pytest.approx(0.0, abs=1e-3)
        shifted = dict(batch, teacher_ids=batch["teacher_ids"].roll(1, dims=1))
        assert L.loss_sum(teacher, shifted, kl)[0].item() > 0.1
    # cut to max_seq_len with the response, the teacher's rows cut alike
    short = tr.tokenize_distilled(tokenizer, row, "alpaca", len(prompt) + 2, capture, top_k=4)
    assert short.truncated and short.labels[len(prompt) :] == answer[:2]
    assert short.teacher.ids.shape == (2, 4)
    assert tr.tokenize_distilled(tokenizer, row, "alpaca", len(prompt), capture, 4) is None


def test_a_conversation_distils_its_last_turn_and_keeps_the_earlier_ones(tokenizer):
    messages = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    row = {"instruction": "Hello.", "input": "", "output": "Blue.", "messages": messages}
    answer = tokenizer("Blue.<|im_end|>", add_special_tokens=False)["input_ids"]
    capture = Capture(
        np.asarray(answer, np.int32),
        np.tile(np.arange(3, dtype=np.int32), (len(answer), 1)),
        np.full((len(answer), 3), -2.0, np.float16),
        "x",
    )
    example = tr.tokenize_distilled(tokenizer, row, "chat", 512, capture, top_k=3)
    plain = tr.tokenize_example(tokenizer, row, "chat", 512)
    assert example.input_ids[-len(answer) :] == answer
    # the same conversation as plain training sees it, up to the last turn's end
    assert example.input_ids == plain.input_ids[: len(example.input_ids)]
    assert example.labels == plain.labels[: len(example.labels)]
    earlier = tokenizer.decode([t for t in example.labels[: example.teacher.start] if t >= 0])
    assert "Hi there." in earlier and "Blue" not in earlier
    batch = tr.collate([example], tokenizer.pad_token_id)
    assert batch["teacher_mask"][0].nonzero().flatten().tolist() == list(
        range(example.teacher.start, len(example.input_ids))
    )


# -- training -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tokenizer) -> Path:
    """A tiny random teacher whose head is scaled up: its top few tokens hold most of its mass
    (a random head spreads it over all 49k tokens, and its top-k would hold almost none)."""
    from helpers import save_tiny_model
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path_factory.mktemp("sharp") / "teacher", tokenizer, seed=5)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)
    model.save_pretrained(path)
    return path


def distill_run(
    run_dir: Path, model: Path, teacher: Path, tokenizer, **training
) -> tuple[Store, Config]:
    store, config = make_run(run_dir, model, **training)
    if not store.captures():
        capture_all(store, teacher, tokenizer)
    config.training.distill = {"loss": "jsd", "alpha": 0.4, "temperature": 1.5, "top_k": 6}
    return store, config


def test_training_logs_the_two_parts_and_reports_them(
    tmp_path, tiny_model, sharp_teacher, tokenizer
):
    store, config = distill_run(
        tmp_path / "run",
        tiny_model,
        sharp_teacher,
        tokenizer,
        max_steps=3,
        eval_every=1,
        lora={"dropout": 0.0},
    )
    result = tr.train(store, config, tmp_path / "run")
    steps = store.train_steps(result.run_id)
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    for s in steps[1:]:
        assert s["loss"] == pytest.approx(0.4 * s["ce_loss"] + 0.6 * s["divergence"], rel=1e-5)
        assert s["divergence"] > 0 and s["eval_divergence"] > 0
    assert steps[0]["eval_divergence"] > 0 and steps[0]["ce_loss"] is None
    metrics = json.loads(store.latest_train_run()["metrics_json"])
    assert metrics["distill"] == "jsd" and metrics["train_divergence"] == steps[-1]["divergence"]
    assert metrics["eval_divergence"] == steps[-1]["eval_divergence"]

    from tutelage.report.charts import loss_chart

    svg = str(loss_chart(steps))
    assert "train cross-entropy" in svg and "train divergence" in svg and "eval divergence" in svg

    # the same data and settings without distillation: another fingerprint, no parts
    config.training.distill = None
    plain = tr.train(store, config, tmp_path / "run")
    assert not plain.reused
    assert all(s["divergence"] is None for s in store.train_steps(plain.run_id))


def test_missing_captures_and_another_vocabulary_are_one_line_each(tmp_path, tiny_model, tokenizer):
    store, config = make_run(tmp_path / "run", tiny_model, max_steps=1)
    config.training.distill = {}
    with pytest.raises(ValueError, match=r"^training.distill: the teacher has not scored 4 of"):
        tr.train(store, config, tmp_path / "run")
    captures = capture_all(store, tiny_model, tokenizer)
    put_captures(
        store,
        {
            i: Capture(c.answer_ids, c.topk_ids, c.topk_logprobs, "f" * 64)
            for i, c in captures.items()
        },
    )
    with pytest.raises(ValueError) as e:
        tr.train(store, config, tmp_path / "run")
    message = str(e.value)
    assert message.startswith("training.distill: the student's vocabulary") and "\n" not in message
    assert "ffffffffffff" in message and "same tokenizer" in message


def test_ddp_with_two_cpu_processes_matches_one_process(
    tmp_path, tiny_model, sharp_teacher, tokenizer
):
    options = {
        "lora": {"dropout": 0.0},
        "max_steps": 2,
        "batch_size": 3,
        "eval_every": 2,
        "save_every": 10,
    }
    store_one, config_one = distill_run(
        tmp_path / "one", tiny_model, sharp_teacher, tokenizer, **options
    )
    tr.train(store_one, config_one, tmp_path / "one")
    store_two, config_two = distill_run(
        tmp_path / "two", tiny_model, sharp_teacher, tokenizer, **options
    )
    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump(config_two.model_dump(mode="json")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [*LAUNCHERS["accelerate"], "-m", "tutelage", "train", "-c", str(config_file)]
        + ["--run-dir", str(tmp_path / "two")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = json.loads(store_two.latest_train_run()["metrics_json"])
    assert two["processes"] == 2
    columns = ("step", "loss", "ce_loss", "divergence", "eval_loss", "eval_divergence")
    logged = [
        [[r[c] for c in columns] for r in s.train_steps(s.latest_train_run()["id"])]
        for s in (store_one, store_two)
    ]
    assert len(logged[0]) == len(logged[1]) == 3
    for row_a, row_b in zip(*logged):
        assert [v is None for v in row_a] == [v is None for v in row_b]
        assert [v for v in row_a if v is not None] == pytest.approx(
            [v for v in row_b if v is not None], rel=1e-4, abs=1e-6
        )
    a, b = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


# -- evaluation ---------------------------------------------------------------------------------
def test_evaluation_measures_the_kl_to_the_teacher_on_held_out_answers(
    tmp_path, tokenizer, tiny_model, sharp_teacher
):
    from transformers import AutoModelForCausalLM

    from tutelage import evaluate as ev
    from tutelage.evaluate import students

    base, teacher = tiny_model, sharp_teacher
    run_dir = tmp_path / "run"
    store = Store(run_dir)
    add_examples(store, EXAMPLES[:3], "test")
    add_examples(store, VALID, "train")
    capture_all(store, teacher, tokenizer, k=5, split="test")
    config = Config(
        run_dir=run_dir,
        student={"model": str(base)},
        training={"distill": {"top_k": 5}},
        evaluation={
            "builtin_set": False,
            "max_new_tokens": 3,
            "bootstrap": 100,
            "include_teacher": False,
            "pairs": [],
        },
    )
    (run_dir / "student").mkdir()
    for f in teacher.iterdir():  # the tuned student is the teacher itself: KL about 0
        (run_dir / "student" / f.name).write_bytes(f.read_bytes())
    summary = ev.evaluate(store, config, run_dir)
    kl = summary.sets["held_out"]["metrics"]["kl_teacher"]
    assert kl["base"]["n"] == kl["tuned"]["n"] == 3
    assert kl["tuned"]["mean"] == pytest.approx(0.0, abs=2e-3)
    assert kl["base"]["mean"] > 0.01 and kl["delta"]["ci_high"] < 0

    # one item by hand: the dense tail-bucket formula with the capture's fp16 log-probs
    row = store.examples(split="test")[0]
    capture = students.held_out_captures(store)[ev.EvalItem(row["instruction"]).key]
    model = AutoModelForCausalLM.from_pretrained(base)
    prompt = prompt_ids(tokenizer, student_prompt(row["instruction"]), "alpaca")
    answer = capture.answer_ids.tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    p = logits.double().softmax(-1)
    ids = torch.tensor(capture.topk_ids.astype(np.int64))
    t_top = torch.tensor(capture.topk_logprobs.astype(np.float64)).exp()
    s_top = p.gather(-1, ids)
    # fp16 rounding can leave the sharp teacher's top-k a hair above 1: no mass left
    t = torch.cat([t_top, (1 - t_top.sum(-1, keepdim=True)).clamp_min(0)], -1)
    s = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
    t = t / t.sum(-1, keepdim=True)
    by_hand = (torch.xlogy(t, t) - t * s.log()).sum(-1).mean().item()
    item = next(
        r
        for r in store.eval_items("held_out")
        if r["model_role"] == "base" and r["instruction"] == row["instruction"]
    )
    assert item["scores"]["kl_teacher"] == pytest.approx(by_hand, rel=1e-4)


# -- KD against SFT on a tiny teacher ------------------------------------------------------------
def test_kd_gets_closer_to_a_sharp_teacher_than_sft_in_equal_steps():
    """A random teacher, sharpened (its head x 6), writes answers by sampling; a random student
    learns them for 30 steps either from the sampled tokens (SFT) or from the teacher's top-8 with
    the tail bucket (forward KL). On held-out prompts KD's student is much closer to the teacher
    (full-vocabulary KL), as a soft target carries the whole distribution where a sample carries
    one token of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, k = 64, 8

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)

    teacher = model(0).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)
    g = torch.Generator().manual_seed(1)

    def examples(n: int) -> list[tr.Example]:
        """n prompts of 4 random tokens, each answered with 12 tokens sampled from the teacher."""
        ids = torch.randint(0, vocab, (n, 4), generator=g)
        with torch.no_grad():
            for _ in range(12):
                logits = teacher(input_ids=ids).logits[:, -1]
                ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=g)], 1)
            top = teacher(input_ids=ids).logits[:, 3:-1].log_softmax(-1).topk(k, -1)
        return [
            tr.Example(
                row.tolist(),
                [tr.IGNORE] * 4 + row[4:].tolist(),
                teacher=tr.TeacherTargets(4, top_ids, top_logprobs),
            )
            for row, top_ids, top_logprobs in zip(ids, top.indices, top.values)
        ]

    train, held_out = examples(48), examples(16)
    held_batch = tr.collate(held_out, 0)
    scored = held_batch["labels"][:, 1:] != tr.IGNORE
    with torch.no_grad():
        reference = teacher(input_ids=held_batch["input_ids"]).logits[:, :-1][scored]

    def held_out_kl(student) -> float:  # mean full-vocabulary KL(teacher || student)
        with torch.no_grad():
            logits = student(input_ids=held_batch["input_ids"]).logits[:, :-1][scored]
        kl = full_vocabulary_divergence(logits, reference.log_softmax(-1), "forward_kl", 1, 0.5)
        return kl.mean().item()

    results = {}
    for name, loss in (("sft", L.cross_entropy), ("kd", L.Distillation("forward_kl", alpha=0.0))):
        student = model(7)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(2)
        for _ in range(30):
            pick = torch.randperm(len(train), generator=order)[:8].tolist()
            batch = tr.collate([train[i] for i in pick], 0)
            total, n = L.loss_sum(student, batch, loss)
            (total / n).backward()
            optimizer.step()
            optimizer.zero_grad()
        results[name] = held_out_kl(student)
    assert results["kd"] < 0.7 * results["sft"], results
