"""The evaluation stage, with tiny random Llama students that share a real tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tutelage import evaluate as ev
from tutelage.config import Config
from tutelage.formats import student_prompt
from tutelage.models import embedded_teacher_hf
from tutelage.store import Store

from helpers import add_examples, save_tiny_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
    ("Give an antonym of hot.", "", "Cold."),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_hf())
    root = tmp_path_factory.mktemp("tiny")
    return {"base": save_tiny_model(root / "base", tokenizer, 0),
            "tuned": save_tiny_model(root / "tuned", tokenizer, 1)}


def make_run(tmp_path: Path, tiny: dict[str, Path], sets: list[Path] = ()) -> tuple[Store, Config]:
    run_dir = tmp_path / "run"
    config = Config(run_dir=run_dir, student={"model": str(tiny["base"])},
                    evaluation={"builtin_set": False, "sets": list(sets), "max_new_tokens": 5,
                                "bootstrap": 200})
    store = Store(run_dir)
    add_examples(store, EXAMPLES, "test")
    add_examples(store, [("A training task only.", "", "Never evaluated.")], "train")
    shutil.copytree(tiny["tuned"], run_dir / "student")
    return store, config


def count_calls(monkeypatch, name: str) -> list:
    calls = []
    original = getattr(ev, name)
    monkeypatch.setattr(ev, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# -- statistics ---------------------------------------------------------------------------------
def test_bootstrap_ci_on_known_data():
    assert ev.bootstrap_ci([0.5] * 20, 500, seed=0) == (0.5, 0.5, 0.5)
    values = np.random.default_rng(1).normal(3.0, 1.0, size=400)
    mean, low, high = ev.bootstrap_ci(values, 2000, seed=0)
    assert mean == pytest.approx(values.mean())
    assert low < 3.0 < high
    # The normal approximation: half-width 1.96 * sd / sqrt(n), about 0.098 here.
    assert (high - low) / 2 == pytest.approx(1.96 * values.std() / 20, rel=0.1)
    assert ev.bootstrap_ci(values, 2000, seed=0) == (mean, low, high)
    assert ev.bootstrap_ci(values, 2000, seed=1) != (mean, low, high)
    assert ev.bootstrap_ci([1, 2, 3, 100], 500, seed=0, stat=np.median)[0] == 2.5
    with pytest.raises(ValueError):
        ev.bootstrap_ci([], 100, seed=0)


# -- the student --------------------------------------------------------------------------------
def test_reference_nll_scores_only_the_reference(tiny):
    model, tokenizer = ev.load_student(tiny["base"])
    prompt = student_prompt("Name a primary colour.")
    reference = "Red is a primary colour."
    nll, n = ev.reference_nll(model, tokenizer, prompt, reference, "alpaca")

    context = tokenizer(prompt)["input_ids"]
    target = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = context + target
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    per_token = [-logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert n == len(target)
    assert nll == pytest.approx(np.mean(per_token[len(context) - 1:]), rel=1e-5)
    assert nll != pytest.approx(np.mean(per_token), rel=1e-3)  # prompt tokens are not scored


def test_batched_generation_matches_one_at_a_time(tiny):
    model, tokenizer = ev.load_student(tiny["base"])
    prompts = [student_prompt("Hi."), student_prompt("Write a much longer instruction here.", "x")]
    batched = ev.generate_answers(model, tokenizer, prompts, "alpaca", 6)
    assert batched == [ev.generate_answers(model, tokenizer, [p], "alpaca", 6)[0] for p in prompts]
    assert all(batched)


def test_cut_answer_stops_at_a_template_section():
    assert ev.cut_answer("Paris.\n\n### Response:\nParis.") == "Paris."
    assert ev.cut_answer(" Two\nlines\n### Instruction: next task") == "Two\nlines"
    assert ev.cut_answer("C# uses ### here, mid-line.") == "C# uses ### here, mid-line."
    assert ev.cut_answer("### Instruction: only an echo") == ""
    assert ev.cut_answer("Steps:\n### Step 1\nMix.") == "Steps:\n### Step 1\nMix."  # a real heading stays


# -- evaluation files ---------------------------------------------------------------------------
def test_each_input_format_loads(tmp_path):
    self_instruct = tmp_path / "si.jsonl"
    self_instruct.write_text(json.dumps({
        "id": "user_oriented_task_0", "motivation_app": "Grammarly",
        "instruction": "Fix the grammar.",
        "instances": [{"input": "he go home", "output": "He goes home."},
                      {"input": "they was late", "output": "They were late."}]}) + "\n\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"instruction": "Why is the sky blue?", "dataset": "x"}\n')
    bare_list = tmp_path / "bare.json"
    bare_list.write_text('[{"instruction": "Why is the sea salty?"}]')

    assert ev.load_eval_file(self_instruct) == [
        ev.EvalItem("Fix the grammar.", "he go home", "He goes home."),
        ev.EvalItem("Fix the grammar.", "they was late", "They were late.")]
    assert ev.load_eval_file(alpaca) == [ev.EvalItem("Say hi.", "", "Hi!")]
    assert ev.load_eval_file(bare) == [ev.EvalItem("Why is the sky blue?", "", None)]
    assert ev.load_eval_file(bare_list) == [ev.EvalItem("Why is the sea salty?", "", None)]
    assert ev.EvalItem("a", "b").key == ev.EvalItem("a", "b", "ref").key != ev.EvalItem("a", "").key


def test_builtin_set_loads_with_references():
    items = ev.load_eval_file(ev.BUILTIN_SET)
    assert len(items) >= 100 and all(i.reference for i in items)


@pytest.mark.skipif(not (SHARED / "alpaca-eval-805.jsonl").exists(), reason="no shared data")
def test_alpaca_eval_file_loads():
    items = ev.load_eval_file(SHARED / "alpaca-eval-805.jsonl")
    assert len(items) == 805 and all(i.reference is None and i.instruction for i in items)


@pytest.mark.parametrize("text, where", [
    ('{"instruction": "ok"}\n{"instruction": "broken"\n', ":2: not valid JSON"),
    ('{"instruction": "ok"}\n\n{"input": "x"}\n', ":3: missing or empty 'instruction'"),
    ('{"instruction": "x", "instances": []}\n', ":1: 'instances' must be"),
    ('{"instruction": "x", "output": 3}\n', ":1: 'input' and 'output' must be strings"),
    ('[{"instruction": "ok"}, "a string"]', ": row 2: a row must be a JSON object"),
    ('[{"instruction": "ok"},\n oops]', ":2: not valid JSON"),
])
def test_malformed_file_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        ev.load_eval_file(path)
    assert str(e.value).startswith(f"{path}{where}") and "\n" not in str(e.value)


# -- the stage ----------------------------------------------------------------------------------
def test_evaluate_scores_resumes_and_refreshes_a_changed_tuned_model(tmp_path, tiny, monkeypatch):
    extra = tmp_path / "extra-set.jsonl"
    extra.write_text('{"instruction": "Why is the sky blue?"}\n{"instruction": "Name a river."}\n')
    store, config = make_run(tmp_path, tiny, sets=[extra])
    generations = count_calls(monkeypatch, "generate_answers")
    ticks = []

    summary = ev.evaluate(store, config, config.run_dir, progress=lambda *a: ticks.append(a))
    assert len(generations) == 2  # batches mix sets: one batch of 6 items per model
    assert ticks == [(6, 12, "base"), (12, 12, "tuned")]
    tuned = config.run_dir / "student"
    assert summary["models"] == {"base": str(tiny["base"]), "tuned": str(tuned)}
    held_out, extra_set = summary["sets"]["held_out"], summary["sets"]["extra-set"]
    assert held_out["n_items"] == 4 and extra_set["n_items"] == 2
    assert set(held_out["metrics"]) == {"rouge_l", "nll", "answer_words"}
    for by_role in held_out["metrics"].values():
        assert set(by_role) == {"base", "tuned", "delta"}
        for ci in by_role.values():
            assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["n"] == 4
    # No reference: no rouge_l or nll, only the answer length.
    assert set(extra_set["metrics"]) == {"answer_words"}

    items = {(r["set_name"], r["item_key"], r["model_role"]): r for r in store.eval_items()}
    assert len(items) == 12
    row = items["held_out", ev.EvalItem("Translate to French.", "cat").key, "tuned"]
    assert row["reference"] == "chat" and row["scores"]["n_ref_tokens"] >= 2
    assert row["scores"]["nll"] > 0 and 0 <= row["scores"]["rouge_l"] <= 1
    nll = held_out["metrics"]["nll"]
    def item_nll(instruction: str, task_input: str, role: str) -> float:
        return items["held_out", ev.EvalItem(instruction, task_input).key, role]["scores"]["nll"]

    paired = [item_nll(i, x, "tuned") - item_nll(i, x, "base") for i, x, _ in EXAMPLES]
    assert nll["delta"]["mean"] == pytest.approx(np.mean(paired))
    assert nll["delta"]["mean"] == pytest.approx(nll["tuned"]["mean"] - nll["base"]["mean"])

    written = json.loads((config.run_dir / "evaluation.json").read_text())
    assert written == json.loads(json.dumps(summary))
    rows = {(r["set_name"], r["model_role"], r["metric"]): r for r in store.eval_summary()}
    assert len(rows) == 3 * 3 + 3  # held_out: 3 metrics x 3 roles; extra-set: answer_words x 3
    assert rows["held_out", "delta", "nll"]["value"] == pytest.approx(nll["delta"]["mean"])

    # Resume: nothing new to answer, so no model is even loaded, and the summary is the same.
    loads = count_calls(monkeypatch, "load_student")
    assert ev.evaluate(store, config, config.run_dir) == summary
    assert len(generations) == 2 and not loads

    # New tuned weights: its answers are stale and redone; the base model's are kept.
    save_tiny_model(tuned, AutoTokenizer.from_pretrained(tiny["base"]), 2)
    before = {k: r["created_at"] for k, r in items.items()}
    ev.evaluate(store, config, config.run_dir)
    assert len(generations) == 3 and len(loads) == 1
    after = {(r["set_name"], r["item_key"], r["model_role"]): r["created_at"]
             for r in store.eval_items()}
    assert after.keys() == before.keys()
    assert all((after[k] == before[k]) == (k[2] == "base") for k in after)


def test_without_a_tuned_model_only_the_base_is_evaluated(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    ev.evaluate(store, config, config.run_dir)
    shutil.rmtree(config.run_dir / "student")
    summary = ev.evaluate(store, config, config.run_dir)
    assert list(summary["models"]) == ["base"]
    assert any("no tuned student" in note for note in summary["notes"])
    assert set(summary["sets"]["held_out"]["metrics"]["nll"]) == {"base"}
    assert {r["model_role"] for r in store.eval_items()} == {"base"}
    assert {r["model_role"] for r in store.eval_summary()} == {"base"}


def test_builtin_set_is_cut_to_its_limit(tmp_path, tiny, monkeypatch):
    builtin = tmp_path / "builtin.jsonl"
    builtin.write_text("".join(json.dumps({"instruction": f"Task {i}.", "instances": [
        {"input": "", "output": f"Answer {i}."}]}) + "\n" for i in range(5)))
    monkeypatch.setattr(ev, "BUILTIN_SET", builtin)
    store, config = make_run(tmp_path, tiny)
    config.evaluation.builtin_set, config.evaluation.builtin_limit = True, 2
    assert [i.instruction for i in ev.eval_sets(store, config)["builtin"]] == ["Task 0.", "Task 1."]
    assert len(ev.eval_sets(store, config)["held_out"]) == len(EXAMPLES)
    config.evaluation.sets = [builtin]  # its name is taken by the built-in set
    with pytest.raises(ValueError, match="already evaluated"):
        ev.eval_sets(store, config)


def test_including_the_teacher_is_not_there_yet(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    config.evaluation.include_teacher = True
    with pytest.raises(NotImplementedError, match="issue 7"):
        ev.evaluate(store, config, config.run_dir)
