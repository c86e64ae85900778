"""IFEval, log-prob verdicts and the files other tools read, wired through the evaluation stage: a
scripted student and a scripted judge with known log-probs give exact figures."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import add_examples
from transformers import AutoTokenizer

from tutelage import evaluate as ev
from tutelage.config import Config
from tutelage.evaluate import students
from tutelage.evaluate.judge import judge_pair_logprobs, letter_probabilities
from tutelage.evaluate.judging import judge_mode
from tutelage.store import Store
from tutelage.teachers import Completion, Ledger, Request, TeacherError

EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
]
# Three IFEval prompts in Google's format, with an answer that meets every constraint and one that
# meets none (the scripted tuned and base students give them).
IFEVAL_ROWS = [
    {
        "key": 11,
        "prompt": "Describe green tea without using any commas.",
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
    },
    {
        "key": 12,
        "prompt": "In lowercase and in fewer than 15 words, say what rain is.",
        "instruction_id_list": [
            "change_case:english_lowercase",
            "length_constraints:number_words",
        ],
        "kwargs": [{}, {"relation": "less than", "num_words": 15}],
    },
    {
        "key": 13,
        "prompt": "Name a fruit, wrapping your whole answer in double quotation marks.",
        "instruction_id_list": ["startend:quotation"],
        "kwargs": [{}],
    },
]
FOLLOWS = {
    11: "Green tea is a mild drink made from the dried leaves of the tea plant.",
    12: "rain is water that falls from the clouds in the sky above us",
    13: '"An apple is a sweet fruit that grows on trees."',
}
BREAKS = {
    11: "Green tea, a mild drink, is made from leaves.",
    12: "Rain is water that falls from the clouds when the air above the ground is "
    "full of moisture and cools down.",
    13: "An apple is a sweet fruit.",
}


def ifeval_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in IFEVAL_ROWS))
    return path


def make_run(tmp_path: Path, tiny: dict[str, Path], **evaluation) -> tuple[Store, Config]:
    run_dir = tmp_path / "run"
    config = Config(
        run_dir=run_dir,
        student={"model": str(tiny["base"])},
        evaluation={
            "builtin_set": False,
            "ifeval": False,
            "max_new_tokens": 4,
            "bootstrap": 200,
            "include_teacher": False,
            "pairs": [],
            **evaluation,
        },
    )
    store = Store(run_dir)
    add_examples(store, EXAMPLES, "test")
    shutil.copytree(tiny["tuned"], run_dir / "student")
    return store, config


def script_students(monkeypatch) -> None:
    """The tuned student (run/student) meets every IFEval constraint, the base student none;
    other tasks get the tiny models' own greedy answers."""
    original = students.generate_answers
    keys = {r["prompt"]: r["key"] for r in IFEVAL_ROWS}

    def scripted(model, tokenizer, prompts, style, max_new_tokens):
        answers = original(model, tokenizer, prompts, style, max_new_tokens)
        table = FOLLOWS if str(model.name_or_path).endswith("student") else BREAKS
        out = []
        for prompt, answer in zip(prompts, answers):
            key = next((k for text, k in keys.items() if text in prompt), None)
            out.append(table[key] if key else answer)
        return out

    monkeypatch.setattr(students, "generate_answers", scripted)


class LogprobJudge:
    """A judge with known log-probs: whatever it is shown, its next token is " A" with
    probability `p_a` (split between " A" and "A", as two token variants) and " B" with `p_b`,
    the rest on a word that is no letter. A pure position bias: it prefers whatever comes first."""

    backend, model = "scripted", "logprob-judge"

    def __init__(self, p_a: float = 0.7, p_b: float = 0.1):
        self.p_a, self.p_b, self.calls = p_a, p_b, 0

    async def complete(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            assert r.top_logprobs == 20 and dict(r.sampling)["max_tokens"] == 1
            top = [
                (" A", math.log(self.p_a * 0.75)),
                ("A", math.log(self.p_a * 0.25)),
                (" B", math.log(self.p_b)),
                (" The", math.log(1 - self.p_a - self.p_b)),
            ]
            out.append(Completion(" A", "length", 100, 1, top_logprobs=top))
        return out

    async def aclose(self):
        pass


# -- the built-in IFEval set and users' IFEval files ----------------------------------------------
def test_the_builtin_ifeval_set_is_a_set_cut_to_its_limit(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny, ifeval=True, ifeval_limit=3)
    sets = ev.eval_sets(store, config)
    assert len(sets["ifeval"]) == 3
    assert all(i.ifeval is not None and i.instruction == i.ifeval.prompt for i in sets["ifeval"])
    assert all(i.reference is None for i in sets["ifeval"])
    config.evaluation.ifeval = False
    assert "ifeval" not in ev.eval_sets(store, config)
    # The default is modest: the demo answers 50 prompts per model.
    assert Config().evaluation.ifeval_limit == 50 and Config().evaluation.ifeval


def test_an_ifeval_jsonl_file_is_told_by_its_fields(tmp_path):
    items = ev.load_eval_file(ifeval_file(tmp_path / "mine.jsonl"))
    assert [i.instruction for i in items] == [r["prompt"] for r in IFEVAL_ROWS]
    assert [i.ifeval.key for i in items] == [11, 12, 13]
    assert items[1].ifeval.instruction_id_list == tuple(IFEVAL_ROWS[1]["instruction_id_list"])
    # The same fields as a JSON list load too; a plain instruction file stays what it was.
    listed = tmp_path / "mine.json"
    listed.write_text(json.dumps(IFEVAL_ROWS))
    assert [i.ifeval.key for i in ev.load_eval_file(listed)] == [11, 12, 13]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"instruction": "Say hi."}\n')
    assert ev.load_eval_file(plain)[0].ifeval is None


# -- IFEval through the stage -----------------------------------------------------------------
def test_ifeval_scores_per_item_summary_rows_and_outputs(tmp_path, tiny, monkeypatch):
    script_students(monkeypatch)
    store, config = make_run(
        tmp_path, tiny, sets=[ifeval_file(tmp_path / "google-style.jsonl")], pairs=["tuned:base"]
    )
    judge = LogprobJudge()
    result = ev.evaluate(store, config, config.run_dir, judge=judge)

    # Each answer carries its verdicts per instruction, [strict, loose].
    rows = {(r["instruction"], r["model_role"]): r for r in store.eval_items("google-style")}
    tuned = rows[IFEVAL_ROWS[1]["prompt"], "tuned"]["scores"]["ifeval"]
    assert tuned == {
        "change_case:english_lowercase": [True, True],
        "length_constraints:number_words": [True, True],
    }
    base = rows[IFEVAL_ROWS[1]["prompt"], "base"]["scores"]["ifeval"]
    assert base == {
        "change_case:english_lowercase": [False, False],
        "length_constraints:number_words": [False, False],
    }
    # IFEval's four accuracies per model, and tuned minus base paired by prompt.
    metrics = result.sets["google-style"]["metrics"]
    for level, n in (("prompt", 3), ("instruction", 4)):
        for mode in ("strict", "loose"):
            m = metrics[f"ifeval_{level}_{mode}"]
            assert (m["base"]["mean"], m["tuned"]["mean"], m["delta"]["mean"]) == (0.0, 1.0, 1.0)
            assert m["tuned"]["n"] == n and m["tuned"]["ci_low"] == 1.0
    by_kind = result.sets["google-style"]["ifeval_by_kind"]
    assert by_kind["tuned"]["change_case"] == {"strict": 1.0, "loose": 1.0, "n": 1}
    assert set(by_kind["base"]) == {"punctuation", "change_case", "length_constraints", "startend"}
    # The summary rows the report reads: the accuracies with intervals, the kinds as shares.
    summary = {(r["set_name"], r["model_role"], r["metric"]): r for r in store.eval_summary()}
    row = summary["google-style", "tuned", "ifeval_prompt_strict"]
    assert (row["value"], row["ci_low"], row["ci_high"], row["n"]) == (1.0, 1.0, 1.0, 3)
    kind = summary["google-style", "base", "ifeval_kind_strict:startend"]
    assert (kind["value"], kind["ci_low"], kind["n"]) == (0.0, None, 1)
    assert summary["google-style", "delta", "ifeval_instruction_loose"]["value"] == 1.0

    # IFEval prompts are checked, not judged: only the held-out items have judgements.
    judged = store.judgements(kind="pairwise")
    assert {j["set_name"] for j in judged} == {"held_out"} and len(judged) == len(EXAMPLES)
    assert judge.calls == 2 * len(EXAMPLES)

    # The answers as AlpacaEval model_outputs, one file per model, the same items in order.
    assert result.outputs == {
        role: str(config.run_dir / "eval" / f"{role}.json") for role in ("base", "tuned")
    }
    files = {role: json.loads(Path(p).read_text()) for role, p in result.outputs.items()}
    for role, rows_out in files.items():
        assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in rows_out)
        assert {r["generator"] for r in rows_out} == {f"tutelage-run-{role}"}
    assert [r["instruction"] for r in files["base"]] == [r["instruction"] for r in files["tuned"]]
    assert [r["dataset"] for r in files["tuned"]] == ["held_out"] * 3 + ["google-style"] * 3
    by_instruction = {r["instruction"]: r for r in files["tuned"]}
    assert by_instruction["Translate to French.\n\ncat"]["dataset"] == "held_out"  # input folded
    assert by_instruction[IFEVAL_ROWS[2]["prompt"]]["output"] == FOLLOWS[13]


def test_alpaca_evals_loader_reads_our_file(tmp_path, tiny):
    """alpaca_eval reads a `.json` model_outputs file with pandas.read_json (its
    utils.load_or_convert_to_dataframe) and names the model by its one `generator`."""
    pandas = pytest.importorskip("pandas")
    store, config = make_run(tmp_path, tiny)
    result = ev.evaluate(store, config, config.run_dir)
    frame = pandas.read_json(result.outputs["tuned"])
    assert list(frame.columns) == ["instruction", "output", "generator", "dataset"]
    assert len(frame) == len(EXAMPLES) and frame["generator"].nunique() == 1
    assert frame["output"].str.len().mean() >= 0  # AlpacaEval's avg_length


def test_evaluate_set_takes_an_ifeval_file_on_the_command_line(tmp_path, tiny):
    from typer.testing import CliRunner

    from tutelage.cli import app

    config = tmp_path / "tutelage.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "student": {"model": str(tiny["base"])},
                "evaluation": {
                    "builtin_set": False,
                    "ifeval": False,
                    "include_teacher": False,
                    "pairs": [],
                    "max_new_tokens": 3,
                    "bootstrap": 20,
                },
            }
        )
    )
    with Store(tmp_path / "run"):  # a run folder, not yet evaluated
        pass
    prompts = ifeval_file(tmp_path / "user-ifeval.jsonl")
    runner = CliRunner()
    shown = runner.invoke(
        app, ["evaluate", "-c", str(config), "--set", str(prompts)], env={"COLUMNS": "200"}
    )
    assert shown.exit_code == 0, shown.output
    assert "ifeval_prompt_strict" in shown.output
    with Store(tmp_path / "run") as store:
        rows = store.eval_items("user-ifeval")
        assert len(rows) == 3 and all(r["model_role"] == "base" for r in rows)
        assert [sorted(r["scores"]["ifeval"]) for r in rows] == [
            sorted(r["instruction_id_list"]) for r in IFEVAL_ROWS
        ]
    # A bad row: one line naming the file and line, and a non-zero exit.
    bad = tmp_path / "bad-ifeval.jsonl"
    broken = {**IFEVAL_ROWS[0], "key": 2, "instruction_id_list": ["punctuation:no_commas"]}
    bad.write_text(json.dumps(IFEVAL_ROWS[0]) + "\n" + json.dumps(broken) + "\n")
    failed = runner.invoke(
        app, ["evaluate", "-c", str(config), "--set", str(bad)], env={"COLUMNS": "400"}
    )
    assert failed.exit_code != 0
    assert f"{bad}:2: unknown instruction id 'punctuation:no_commas'" in failed.output
    assert "did you mean 'punctuation:no_comma'" in failed.output


def test_compare_runs_reports_ifeval_accuracies(tmp_path, tiny, monkeypatch):
    from tutelage.evaluate.compare import compare_runs

    script_students(monkeypatch)
    runs = []
    for name in ("a", "b"):
        store, config = make_run(tmp_path / name, tiny, sets=[ifeval_file(tmp_path / "p.jsonl")])
        if name == "a":  # run a's tuned student is the base model: it meets nothing
            shutil.rmtree(config.run_dir / "student")
        ev.evaluate(store, config, config.run_dir)
        runs.append(config.run_dir)
    result = compare_runs(*runs, role="base", n_resamples=100)
    same = result["sets"]["p"]["metrics"]["ifeval_prompt_strict"]
    assert (same["a"]["mean"], same["b"]["mean"], same["delta"]["mean"]) == (0.0, 0.0, 0.0)
    with Store(runs[0]) as a:
        assert not [r for r in a.eval_items("p") if r["model_role"] == "tuned"]


# -- log-prob verdicts --------------------------------------------------------------------------
def test_letter_probabilities_sum_every_variant_of_a_letter():
    top = [
        (" A", math.log(0.4)),
        ("A", math.log(0.1)),
        ("**A", math.log(0.05)),
        (" B", math.log(0.2)),
        ("B.", math.log(0.05)),
        (" a", math.log(0.1)),  # the article, not the letter
        (" AB", math.log(0.05)),
    ]
    p_a, p_b = letter_probabilities(top)
    assert p_a == pytest.approx(0.55) and p_b == pytest.approx(0.25)
    assert letter_probabilities([]) == (0.0, 0.0)


class OrderedJudge:
    """Gives each order its own next-token log-probs, told apart by which answer is shown as A."""

    backend, model = "scripted", "ordered"

    def __init__(self, by_answer_a: dict[str, list[tuple[str, float]] | None]):
        self.by_answer_a, self.calls = by_answer_a, 0

    async def complete(self, requests):
        self.calls += len(requests)
        out = []
        for r in requests:
            shown_a = r.prompt.split("<answer_a>\n")[1].split("\n</answer_a>")[0]
            top = self.by_answer_a[shown_a]
            out.append(Completion("A", "length", 50, 1, top_logprobs=top))
        return out

    async def aclose(self):
        pass


def judge(store: Store, teacher) -> object:
    async def ask():
        ledger = Ledger(teacher, store)
        return await judge_pair_logprobs(
            ledger, chat=False, instruction="Name a colour.", first="Red.", second="A table."
        )

    return asyncio.run(ask())


def test_logprob_verdict_is_an_exact_probability_in_both_orders(store):
    teacher = OrderedJudge(
        {
            # "Red." shown as A: P(A) 0.6, P(B) 0.2 -> P(first better) 0.75
            "Red.": [(" A", math.log(0.6)), (" B", math.log(0.2))],
            # "Red." shown as B: P(A) 0.5, P(B) 0.3 -> P(first better) 0.3 / 0.8
            "A table.": [(" A", math.log(0.5)), ("B", math.log(0.3))],
        }
    )
    verdict = judge(store, teacher)
    first, second = verdict.orders
    assert (first.first_as, second.first_as) == ("A", "B")
    assert first.score == pytest.approx(0.75) and second.score == pytest.approx(0.375)
    assert verdict.score == pytest.approx((0.75 + 0.375) / 2)
    assert not verdict.consistent  # the second order preferred the other answer
    detail = verdict.to_dict()
    assert detail["mode"] == "logprobs"
    assert detail["orders"][0]["p_a"] == pytest.approx(0.6)
    assert detail["orders"][1]["verdict"] == "A" and len(detail["orders"][1]["keys"]) == 1
    # The prompt ends with the fixed prefix the letter follows.
    row = store.get_request(detail["orders"][0]["keys"][0])
    assert json.loads(row["body_json"])["prompt"].endswith("Better answer:")


def test_a_position_bias_cancels_and_no_letter_is_undecided(tmp_path):
    biased = [(" A", math.log(0.9)), (" B", math.log(0.1))]
    with Store(tmp_path / "biased") as store:
        verdict = judge(store, OrderedJudge({"Red.": biased, "A table.": biased}))
    assert verdict.score == pytest.approx(0.5) and not verdict.consistent
    # Neither letter among the candidates: never unparseable, just undecided.
    words = [(" The", math.log(0.5)), (" I", math.log(0.3))]
    with Store(tmp_path / "no-letter") as store:
        undecided = judge(store, OrderedJudge({"Red.": words, "A table.": words}))
    assert undecided.score == 0.5 and undecided.consistent
    assert [o.mass for o in undecided.orders] == [0.0, 0.0]
    # A judge that gives no log-probs at all is a configuration problem, said in one line.
    with (
        Store(tmp_path / "none") as store,
        pytest.raises(TeacherError, match="returned no log-probs; set evaluation.judge_mode"),
    ):
        judge(store, OrderedJudge({"Red.": None, "A table.": None}))


def test_logprob_verdicts_through_the_stage_are_stored_and_resumed(tmp_path, tiny):
    store, config = make_run(tmp_path, tiny, pairs=["tuned:base"], judge_mode="logprobs")
    teacher = LogprobJudge(p_a=0.7, p_b=0.1)
    result = ev.evaluate(store, config, config.run_dir, judge=teacher)
    judged = store.judgements("held_out", "pairwise")
    # Pure position bias: P(first) 0.7/0.8 shown first, 0.1/0.8 shown second: 0.5 exactly.
    assert [j["status"] for j in judged] == ["done"] * len(EXAMPLES)
    assert all(j["score"] == pytest.approx(0.5) for j in judged)
    assert all(not j["detail"]["consistent"] for j in judged)
    metrics = result.sets["held_out"]["metrics"]
    assert metrics["win_rate"]["tuned:base"]["mean"] == pytest.approx(0.5)
    assert metrics["win_rate"]["tuned:base"]["n_failed"] == 0
    assert metrics["position_bias"]["tuned:base"]["mean"] == 1.0
    assert metrics["position_bias"]["tuned:base"]["n"] == len(EXAMPLES)
    assert result.judge_mode == "logprobs" and store.get_meta("eval_judge_mode") == "logprobs"
    # The ledger stored the log-probs with each answer ...
    keys = [k for j in judged for o in j["detail"]["orders"] for k in o["keys"]]
    assert len(set(keys)) == 2 * len(EXAMPLES)
    for key in keys:
        row = store.get_request(key)
        assert row["purpose"] == "judge"
        [(token, logprob), *_] = json.loads(row["response_json"])["top_logprobs"]
        assert token == " A" and logprob == pytest.approx(math.log(0.525))
    # ... so a rerun asks the judge nothing, and the same probabilities come back from the store.
    calls = teacher.calls
    store.clear_judgements()
    again = ev.evaluate(store, config, config.run_dir, judge=teacher)
    assert teacher.calls == calls
    assert again.sets["held_out"]["metrics"]["win_rate"] == metrics["win_rate"]


def test_judge_mode_defaults_to_logprobs_for_local_judges():
    assert judge_mode(Config()) == "logprobs"  # the embedded teacher on llama.cpp
    for backend in ("transformers", "vllm"):
        assert judge_mode(Config(teacher={"backend": backend})) == "logprobs"
    openai = Config(teacher={"backend": "openai", "model": "gpt-x"})
    assert judge_mode(openai) == "text"
    openai.evaluation.judge_mode = "logprobs"  # an OpenAI or vLLM server that gives them
    assert judge_mode(openai) == "logprobs"
    # A separate judge decides for itself.
    local_judge = Config(
        teacher={"backend": "openai", "model": "gpt-x"},
        evaluation={"judge": {"backend": "transformers", "model": "/models/judge"}},
    )
    assert judge_mode(local_judge) == "logprobs"


def test_a_top_logprobs_request_is_its_own_ledger_entry_and_old_keys_stay():
    plain = Request.make(prompt="p", sampling={"max_tokens": 1})
    asked = Request.make(prompt="p", sampling={"max_tokens": 1}, top_logprobs=20)
    assert "top_logprobs" not in plain.canonical("b", "m")  # keys stored by older runs hold
    assert plain.key("b", "m") != asked.key("b", "m")
    # A completion rebuilt from its stored raw record brings its log-probs back.
    made = Completion("A", "length", 1, 1, top_logprobs=[("A", -0.1), (" B", -2.5)])
    assert made.raw == {"top_logprobs": [["A", -0.1], [" B", -2.5]]}
    stored = json.loads(json.dumps(made.raw))
    assert Completion("A", "length", 1, 1, raw=stored).top_logprobs == [("A", -0.1), (" B", -2.5)]


# -- backends -------------------------------------------------------------------------------------
def test_transformers_backend_returns_the_first_tokens_top_logprobs(tiny):
    from tutelage.teachers.hf import TransformersTeacher

    teacher = TransformersTeacher(tiny["base"], max_batch=2)
    prompts = ["Which is better, A or B? Better answer:", "Short."]
    requests = [
        Request.make(prompt=p, sampling={"temperature": 0.0, "max_tokens": 1}, top_logprobs=5)
        for p in prompts
    ]
    answers = asyncio.run(teacher.complete(requests))
    for prompt, answer in zip(prompts, answers):
        ids = teacher.tokenizer(prompt).input_ids
        with torch.no_grad():
            logits = teacher.lm(torch.tensor([ids])).logits[0, -1]
        expected = torch.log_softmax(logits.double(), -1).topk(5)
        assert [t for t, _ in answer.top_logprobs] == [
            teacher.tokenizer.decode([i]) for i in expected.indices.tolist()
        ]
        assert [lp for _, lp in answer.top_logprobs] == pytest.approx(
            expected.values.tolist(), abs=1e-4
        )
        assert answer.text == answer.top_logprobs[0][0]  # greedy: the most likely token
    # Without the field: no log-probs, and the same answer.
    greedy = {"temperature": 0.0, "max_tokens": 1}
    [plain] = asyncio.run(teacher.complete([Request.make(prompt=prompts[0], sampling=greedy)]))
    assert plain.top_logprobs is None and plain.text == answers[0].text


def test_llamacpp_backend_returns_the_first_tokens_top_logprobs():
    pytest.importorskip("llama_cpp")
    from tutelage.model_files import embedded_teacher_gguf
    from tutelage.teachers.llamacpp import LlamaCppTeacher

    teacher = LlamaCppTeacher(embedded_teacher_gguf(), n_ctx=512, threads=1)
    prompt = "Question: is red a colour? Reply A for yes, B for no.\nAnswer:"
    sampling = {"temperature": 0.0, "max_tokens": 1}
    [asked] = asyncio.run(
        teacher.complete([Request.make(prompt=prompt, sampling=sampling, top_logprobs=8)])
    )
    [plain] = asyncio.run(teacher.complete([Request.make(prompt=prompt, sampling=sampling)]))
    top = asked.top_logprobs
    assert len(top) == 8 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert 0.0 < sum(math.exp(lp) for _, lp in top) <= 1.0 + 1e-6
    assert asked.text == plain.text == top[0][0]  # greedy picks the most likely token
    assert plain.top_logprobs is None and "top_logprobs" in asked.raw
    # A chat request: the GGUF's own chat template is evaluated.
    chat = Request.make(
        messages=[{"role": "user", "content": "Reply with one letter, A or B."}],
        sampling=sampling,
        top_logprobs=4,
    )
    [answer] = asyncio.run(teacher.complete([chat]))
    assert len(answer.top_logprobs) == 4 and answer.text == answer.top_logprobs[0][0]


def test_openai_backend_asks_for_and_reads_top_logprobs(server):
    from tutelage.teachers.openai import OpenAITeacher, first_top_logprobs

    teacher = OpenAITeacher("gpt-test", base_url=server.url, api_key_env=None)
    chat = Request.make(messages=[{"role": "user", "content": "hi"}], top_logprobs=20)
    completion = Request.make(prompt="hi", top_logprobs=20)
    asyncio.run(teacher.complete([chat]))
    asyncio.run(teacher.complete([completion]))
    asyncio.run(teacher.aclose())
    sent = [r["body"] for r in server.requests]
    assert (sent[0]["logprobs"], sent[0]["top_logprobs"]) == (True, 20)
    assert sent[1]["logprobs"] == 20 and "top_logprobs" not in sent[1]
    # Both answer shapes, most likely first.
    chat_choice = {
        "logprobs": {
            "content": [
                {
                    "token": "A",
                    "logprob": -0.2,
                    "top_logprobs": [
                        {"token": " B", "logprob": -2.0},
                        {"token": "A", "logprob": -0.2},
                    ],
                }
            ]
        }
    }
    assert first_top_logprobs(chat_choice, chat=True) == [("A", -0.2), (" B", -2.0)]
    text_choice = {"logprobs": {"top_logprobs": [{" B": -1.5, " A": -0.5}, {"x": -1.0}]}}
    assert first_top_logprobs(text_choice, chat=False) == [(" A", -0.5), (" B", -1.5)]
    assert first_top_logprobs({"logprobs": None}, chat=True) is None


def test_vllm_backend_reads_the_first_positions_logprobs():
    from types import SimpleNamespace

    from tutelage.teachers.vllm import first_top

    logprob = SimpleNamespace
    choice = SimpleNamespace(
        logprobs=[
            {
                7: logprob(logprob=-1.2, decoded_token=" B"),
                3: logprob(logprob=-0.3, decoded_token=" A"),
            },
            {9: logprob(logprob=-0.1, decoded_token="x")},
        ]
    )
    assert first_top(choice) == [(" A", -0.3), (" B", -1.2)]
    assert first_top(SimpleNamespace(logprobs=None)) is None


# -- an exported student, loaded the way lm-eval-harness loads it ---------------------------------
def test_an_exported_student_loads_as_lm_evals_hf_model_loads_it(tmp_path, tiny):
    """lm-eval's HFLM (`--model hf --model_args pretrained=DIR`): AutoConfig, then AutoTokenizer
    and AutoModelForCausalLM from the folder (revision "main", no remote code, dtype "auto"), the
    model type among the causal LMs, and the tokenizer's chat template for --apply_chat_template."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tutelage.export import export_model
    from tutelage.train.outputs import save_student

    tokenizer = AutoTokenizer.from_pretrained(tiny["tuned"])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["tuned"])
    lora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: nonzero, so the merge changes the weights
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    run_dir = tmp_path / "run"
    save_student(lora, tokenizer, run_dir, {"run_id": 1})
    folder = export_model(run_dir, tmp_path / "exported")
    assert not (folder / "adapter_config.json").exists()  # HFLM would take it for a PEFT folder

    config = transformers.AutoConfig.from_pretrained(
        str(folder), revision="main", trust_remote_code=False
    )
    assert config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(folder), revision="main", trust_remote_code=False, use_fast=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), revision="main", dtype="auto", trust_remote_code=False
    ).eval()
    assert loaded_tokenizer.eos_token_id is not None
    # A loglikelihood request as HFLM scores it: the continuation's tokens after the context.
    context = loaded_tokenizer("The sky is").input_ids
    continuation = loaded_tokenizer(" blue", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation])).logits[0]
        merged = lora.merge_and_unload()(torch.tensor([context + continuation])).logits[0]
    assert torch.allclose(logits, merged, atol=1e-5)  # the adapter is in the exported weights
    logp = torch.log_softmax(logits[len(context) - 1 : -1], -1)
    score = logp.gather(1, torch.tensor(continuation)[:, None]).sum()
    assert torch.isfinite(score)
    # --apply_chat_template renders the conversation with the tokenizer's own template.
    assert loaded_tokenizer.chat_template
    rendered = loaded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hi" in rendered
