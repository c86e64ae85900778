"""The evaluation stage, with tiny random Llama students that share a real tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import add_examples, save_tiny_model
from transformers import AutoTokenizer

from tutelage import evaluate as ev
from tutelage.config import Config
from tutelage.evaluate import students
from tutelage.store import Store
from tutelage.student_prompt import student_prompt

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
    ("Give an antonym of hot.", "", "Cold."),
]


def make_run(tmp_path: Path, tiny: dict[str, Path], sets: list[Path] = ()) -> tuple[Store, Config]:
    run_dir = tmp_path / "run"
    config = Config(
        run_dir=run_dir,
        student={"model": str(tiny["base"])},
        evaluation={
            "builtin_set": False,
            "ifeval": False,
            "sets": list(sets),
            "max_new_tokens": 5,
            "bootstrap": 200,
            "include_teacher": False,
            "pairs": [],
            "judge_mode": "text",  # the scripted judge writes its verdicts
        },
    )
    store = Store(run_dir)
    add_examples(store, EXAMPLES, "test")
    add_examples(store, [("A training task only.", "", "Never evaluated.")], "train")
    shutil.copytree(tiny["tuned"], run_dir / "student")
    return store, config


def count_calls(monkeypatch, name: str) -> list:
    """Count the stage's calls of one of the students' functions."""
    calls = []
    original = getattr(students, name)
    monkeypatch.setattr(students, name, lambda *a, **k: calls.append(1) or original(*a, **k))
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
    assert nll == pytest.approx(np.mean(per_token[len(context) - 1 :]), rel=1e-5)
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
    assert (
        ev.cut_answer("Steps:\n### Step 1\nMix.") == "Steps:\n### Step 1\nMix."
    )  # a real heading stays


# -- evaluation files ---------------------------------------------------------------------------
def test_each_input_format_loads(tmp_path):
    self_instruct = tmp_path / "si.jsonl"
    self_instruct.write_text(
        json.dumps(
            {
                "id": "user_oriented_task_0",
                "motivation_app": "Grammarly",
                "instruction": "Fix the grammar.",
                "instances": [
                    {"input": "he go home", "output": "He goes home."},
                    {"input": "they was late", "output": "They were late."},
                ],
            }
        )
        + "\n\n"
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"instruction": "Why is the sky blue?", "dataset": "x"}\n')
    bare_list = tmp_path / "bare.json"
    bare_list.write_text('[{"instruction": "Why is the sea salty?"}]')

    assert ev.load_eval_file(self_instruct) == [
        ev.EvalItem("Fix the grammar.", "he go home", "He goes home."),
        ev.EvalItem("Fix the grammar.", "they was late", "They were late."),
    ]
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


@pytest.mark.parametrize(
    "text, where",
    [
        ('{"instruction": "ok"}\n{"instruction": "broken"\n', ":2: not valid JSON"),
        ('{"instruction": "ok"}\n\n{"input": "x"}\n', ":3: missing or empty 'instruction'"),
        ('{"instruction": "x", "instances": []}\n', ":1: 'instances' must be"),
        ('{"instruction": "x", "output": 3}\n', ":1: 'input' and 'output' must be strings"),
        ('[{"instruction": "ok"}, "a string"]', ": row 2: a row must be a JSON object"),
        ('[{"instruction": "ok"},\n oops]', ":2: not valid JSON"),
    ],
)
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
    assert summary.models == {"base": str(tiny["base"]), "tuned": str(tuned)}
    held_out, extra_set = summary.sets["held_out"], summary.sets["extra-set"]
    assert held_out["n_items"] == 4 and extra_set["n_items"] == 2
    assert set(held_out["metrics"]) == {"rouge_l", "nll", "answer_words", "refusal"}
    for by_role in held_out["metrics"].values():
        assert set(by_role) == {"base", "tuned", "delta"}
        for ci in by_role.values():
            assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["n"] == 4
    # No reference: no rouge_l or nll, only the answer's length and whether it refuses.
    assert set(extra_set["metrics"]) == {"answer_words", "refusal"}

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
    assert written == json.loads(json.dumps(summary.to_detail()))
    rows = {(r["set_name"], r["model_role"], r["metric"]): r for r in store.eval_summary()}
    assert len(rows) == 4 * 3 + 2 * 3  # held_out: 4 metrics x 3 roles; extra-set: 2 x 3
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
    after = {
        (r["set_name"], r["item_key"], r["model_role"]): r["created_at"] for r in store.eval_items()
    }
    assert after.keys() == before.keys()
    assert all((after[k] == before[k]) == (k[2] == "base") for k in after)


def test_without_a_tuned_model_only_the_base_is_evaluated(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    ev.evaluate(store, config, config.run_dir)
    shutil.rmtree(config.run_dir / "student")
    summary = ev.evaluate(store, config, config.run_dir)
    assert list(summary.models) == ["base"]
    assert any("no tuned student" in note for note in summary.notes)
    assert set(summary.sets["held_out"]["metrics"]["nll"]) == {"base"}
    assert {r["model_role"] for r in store.eval_items()} == {"base"}
    assert {r["model_role"] for r in store.eval_summary()} == {"base"}


def test_builtin_set_is_cut_to_its_limit(tmp_path, tiny, monkeypatch):
    builtin = tmp_path / "builtin.jsonl"
    builtin.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"Task {i}.",
                    "instances": [{"input": "", "output": f"Answer {i}."}],
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    monkeypatch.setattr("tutelage.evaluate.sets.BUILTIN_SET", builtin)
    store, config = make_run(tmp_path, tiny)
    config.evaluation.builtin_set, config.evaluation.builtin_limit = True, 2
    assert [i.instruction for i in ev.eval_sets(store, config)["builtin"]] == ["Task 0.", "Task 1."]
    assert len(ev.eval_sets(store, config)["held_out"]) == len(EXAMPLES)
    config.evaluation.sets = [builtin]  # its name is taken by the built-in set
    with pytest.raises(ValueError, match="already evaluated"):
        ev.eval_sets(store, config)


class ScriptedTeacher:
    """Answers tasks with a fixed sentence and judges by a rule: the longer answer wins (a tie
    when equal), or, with `garbled`, never gives a readable verdict."""

    backend, model = "scripted", "judge"

    def __init__(self, garbled: bool = False, grade: str = "B"):
        self.garbled, self.grade, self.prompts = garbled, grade, []

    async def complete(self, requests):
        from tutelage.teachers import Completion

        out = []
        for r in requests:
            text = r.prompt if r.prompt is not None else r.messages[-1][1]
            self.prompts.append(text)
            if "<answer_a>" in text:
                a, b = (text.split(f"<answer_{x}>")[1].split(f"</answer_{x}>")[0] for x in "ab")
                verdict = "tie" if len(a) == len(b) else "A" if len(a) > len(b) else "B"
                reply = "I think so." if self.garbled else f"Compared.\nVerdict: {verdict}"
            elif "Grade:" in text:
                reply = "Hmm." if self.garbled else f"Fine.\nGrade: {self.grade}"
            else:
                reply = "The teacher answers this task at considerable length, as teachers do."
            out.append(Completion(reply, "stop", 10, 10))
        return out

    async def aclose(self):
        pass


def test_teacher_answers_and_pairs_are_judged_in_both_orders(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    config.evaluation.include_teacher = True
    config.evaluation.pairs = ["tuned:base", "tuned:teacher"]
    teacher = ScriptedTeacher()
    summary = ev.evaluate(store, config, config.run_dir, teacher=teacher)

    items = store.eval_items("held_out")
    assert {r["model_role"] for r in items} == {"base", "tuned", "teacher"}
    answers = [r for r in items if r["model_role"] == "teacher"]
    assert all(r["answer"].startswith("The teacher answers") for r in answers)
    assert all(r["scores"]["rouge_l"] is not None and r["scores"]["request_key"] for r in answers)
    judged = store.judgements("held_out", "pairwise")
    assert {(j["subject"], j["status"]) for j in judged} == {
        ("tuned:base", "done"),
        ("tuned:teacher", "done"),
    }
    assert len(judged) == 2 * len(EXAMPLES)
    # The teacher's long answer beats the tiny student's 5 tokens in both orders.
    vs_teacher = [j for j in judged if j["subject"] == "tuned:teacher"]
    assert all(j["score"] == 0.0 and j["detail"]["consistent"] for j in vs_teacher)
    assert all(len(j["detail"]["orders"]) == 2 for j in judged)
    metrics = summary.sets["held_out"]["metrics"]
    assert metrics["win_rate"]["tuned:teacher"]["mean"] == 0.0
    assert (
        set(metrics["win_rate"]) == set(metrics["lc_win_rate"]) == {"tuned:base", "tuned:teacher"}
    )
    assert summary.judge == "llamacpp:embedded" and summary.models["teacher"]
    # Every judge request went through the ledger, both orders of every pair of every item.
    by_purpose = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    assert by_purpose["judge"] == 2 * 2 * len(EXAMPLES)
    assert by_purpose["evaluate"] == len(EXAMPLES)
    # A rerun asks nothing new.
    asked = len(teacher.prompts)
    ev.evaluate(store, config, config.run_dir, teacher=teacher)
    assert len(teacher.prompts) == asked


def test_unparseable_verdicts_are_failures_not_losses(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    config.evaluation.pairs, config.evaluation.judge_retries = ["tuned:base"], 1
    teacher = ScriptedTeacher(garbled=True)
    summary = ev.evaluate(store, config, config.run_dir, teacher=teacher)
    judged = store.judgements("held_out", "pairwise")
    assert [j["status"] for j in judged] == ["failed"] * len(EXAMPLES)
    assert all(j["score"] is None for j in judged)
    rate = summary.sets["held_out"]["metrics"]["win_rate"]["tuned:base"]
    assert (rate["n_failed"], rate["n"], rate["wins"], rate["losses"]) == (len(EXAMPLES), 0, 0, 0)
    assert rate["mean"] is None
    assert len(teacher.prompts) == len(EXAMPLES) * 2 * 2  # each order asked, then retried once


def test_rubric_grades_and_a_new_judge_judges_again(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    config.evaluation.pairs, config.evaluation.rubric = [], True
    summary = ev.evaluate(store, config, config.run_dir, teacher=ScriptedTeacher(grade="A"))
    graded = store.judgements("held_out", "rubric")
    assert {(j["subject"], j["grade"]) for j in graded} == {("base", "A"), ("tuned", "A")}
    acceptable = summary.sets["held_out"]["metrics"]["rubric_acceptable"]
    assert acceptable["tuned"]["mean"] == 1.0 and acceptable["tuned"]["shares"]["A"] == 1.0
    # Another judge: the stored grades are stale and are all asked again.
    config.evaluation.judge = {"backend": "llamacpp", "model": str(tmp_path / "other.gguf")}
    ev.evaluate(store, config, config.run_dir, judge=ScriptedTeacher(grade="D"))
    assert {j["grade"] for j in store.judgements("held_out", "rubric")} == {"D"}


REFUSAL = "I'm sorry, but as an AI language model I cannot help with that."


class RefusingTeacher(ScriptedTeacher):
    """Answers like ScriptedTeacher, but refuses to translate."""

    async def complete(self, requests):
        out = await super().complete(requests)
        for r, completion in zip(requests, out):
            if "Translate" in (r.prompt if r.prompt is not None else r.messages[-1][1]):
                completion.text = REFUSAL
        return out


def test_refusals_are_counted_per_model_with_a_paired_delta(tmp_path, tiny, monkeypatch):
    store, config = make_run(tmp_path, tiny)
    config.evaluation.include_teacher = True
    config.evaluation.pairs = []
    original = students.generate_answers

    def scripted(model, tokenizer, prompts, style, max_new_tokens):
        """The tuned student (loaded from run/student) refuses colours and sums; the base never."""
        answers = original(model, tokenizer, prompts, style, max_new_tokens)
        if not str(model.name_or_path).endswith("student"):
            return answers
        refuses = ("colour", "numbers")
        return [REFUSAL if any(w in p for w in refuses) else a for p, a in zip(prompts, answers)]

    monkeypatch.setattr(students, "generate_answers", scripted)
    summary = ev.evaluate(store, config, config.run_dir, teacher=RefusingTeacher())

    stored = {(r["instruction"], r["model_role"]): r for r in store.eval_items("held_out")}
    refused = {k for k, r in stored.items() if r["scores"]["refusal"] == 1.0}
    assert refused == {
        ("Name a primary colour.", "tuned"),
        ("Add the numbers.", "tuned"),
        ("Translate to French.", "teacher"),
    }
    assert all(r["scores"]["refusal"] == 0.0 for k, r in stored.items() if k not in refused)
    refusal = summary.sets["held_out"]["metrics"]["refusal"]
    assert {role: ci["mean"] for role, ci in refusal.items()} == {
        "base": 0.0,
        "tuned": 0.5,
        "teacher": 0.25,
        "delta": 0.5,
    }
    assert refusal["tuned"]["ci_low"] <= 0.5 <= refusal["tuned"]["ci_high"]
    assert refusal["tuned"]["n"] == len(EXAMPLES)

    from tutelage.report.page import METRIC_DESCRIPTIONS, _verdict

    about, better = METRIC_DESCRIPTIONS["refusal"]
    assert "refuse" in about and better == "lower"
    # The report calls more refusals after tuning worse.
    assert _verdict({"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75}, better) == "worse"


def test_answers_stored_before_the_refusal_score_still_summarise(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny)
    sets = ev.eval_sets(store, config)
    item = sets["held_out"][0]
    # Rows as an evaluation from before the refusal score stored them: no "refusal" key.
    for role, answer in (("base", "Red is a colour."), ("tuned", REFUSAL)):
        scores = {"rouge_l": 0.5, "nll": 2.0, "n_ref_tokens": 3}
        store.put_eval_item(
            "held_out", item.key, role, item.instruction, item.input, item.reference, answer, scores
        )
    table = ev.summarise(store, {"held_out": [item]}, ["base", "tuned"], [], config)
    metrics = table["held_out"]["metrics"]
    assert metrics["rouge_l"]["delta"]["mean"] == 0.0 and metrics["nll"]["base"]["mean"] == 2.0
    # The rule is applied to the stored text, the same rule new answers are scored by.
    assert metrics["refusal"]["base"]["mean"] == 0.0 and metrics["refusal"]["tuned"]["mean"] == 1.0
    assert metrics["refusal"]["delta"]["mean"] == 1.0


def test_compare_two_runs_item_by_item(tmp_path, tiny):
    from tutelage.evaluate.compare import compare_runs

    runs = []
    for name, student in (("a", "base"), ("b", "tuned")):
        store, config = make_run(tmp_path / name, tiny)
        shutil.rmtree(config.run_dir / "student")
        shutil.copytree(tiny[student], config.run_dir / "student")
        config.evaluation.pairs = []
        ev.evaluate(store, config, config.run_dir)
        runs.append(config.run_dir)
    result = compare_runs(*runs, n_resamples=200)
    held = result["sets"]["held_out"]
    assert held["n_items"] == len(EXAMPLES)
    rouge = held["metrics"]["rouge_l"]
    # Run a's tuned model is the base model: its tuned answers are run b's base answers.
    with Store(runs[1]) as b:
        base_b = [
            r["scores"]["rouge_l"] for r in b.eval_items("held_out") if r["model_role"] == "base"
        ]
    assert rouge["a"]["mean"] == pytest.approx(sum(base_b) / len(base_b))
    assert rouge["delta"]["mean"] == pytest.approx(rouge["b"]["mean"] - rouge["a"]["mean"])
    assert rouge["delta"]["ci_low"] <= rouge["delta"]["mean"] <= rouge["delta"]["ci_high"]
    assert len(held["largest_changes"]) == 3
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        compare_runs(tmp_path / "nowhere", runs[0])

    from typer.testing import CliRunner

    from tutelage.cli import app

    out = tmp_path / "compare.json"
    shown = CliRunner().invoke(
        app,
        ["evaluate", "--compare", str(runs[0]), str(runs[1]), "-o", str(out)],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    assert "held_out" in shown.output and "rouge_l" in shown.output
    assert json.loads(out.read_text())["sets"]["held_out"]["n_items"] == len(EXAMPLES)
    missing = CliRunner().invoke(
        app, ["evaluate", "--compare", str(tmp_path), str(runs[1])], env={"COLUMNS": "400"}
    )
    assert missing.exit_code == 2 and "not a run folder" in missing.output


def test_compare_and_stats_load_no_model_library():
    """`tutelage evaluate --compare` only reads stored answers: it must not pay for torch."""
    code = (
        "import sys, tutelage.evaluate.compare, tutelage.evaluate.stats; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
