"""The whole pipeline through the CLI, on the real embedded models at minimal sizes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = textwrap.dedent("""
    seed: 1
    teacher:
      sampling: {max_tokens: 384, temperature: 0.7}
    generation:
      target: 6
      max_requests: 12
      stall_requests: 12
    filter:
      test_fraction: 0.2
      valid_fraction: 0.2
    training:
      max_steps: 3
      batch_size: 2
      max_seq_len: 192
      eval_every: 2
      save_every: 2
    evaluation:
      builtin_limit: 2
      ifeval_limit: 2
      max_new_tokens: 12
      bootstrap: 50
""")


def tutelage(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tutelage.cli", *args],
        capture_output=True,
        text=True,
        **kw,
        check=False,
    )


def db_rows(run: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(run / "tutelage.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def embedded_models():
    from tutelage.model_files import embedded_student_hf, embedded_teacher_gguf

    return embedded_teacher_gguf(), embedded_student_hf()


def test_kill_during_generation_then_run_to_the_end(tmp_path, embedded_models):
    config = tmp_path / "tutelage.yaml"
    config.write_text(CONFIG)
    run = tmp_path / "run"

    # Kill -9 generation as soon as it has ingested its first answer.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tutelage.cli",
            "generate",
            "-c",
            str(config),
            "--run-dir",
            str(run),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "tutelage.db").exists() and db_rows(run, "SELECT COUNT(*) FROM batches")[0][0]:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = db_rows(run, "SELECT key, text FROM requests WHERE status='done'")
    assert before, "generation never finished a request"

    done = tutelage("run", "-c", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]

    # No stored answer was asked again, none was lost, no record is duplicated.
    after = dict(db_rows(run, "SELECT key, text FROM requests"))
    for key, text in before:
        assert after[key] == text
    batches = db_rows(run, "SELECT idx, request_key FROM batches ORDER BY idx")
    assert [b[0] for b in batches] == list(range(len(batches)))
    assert len({b[1] for b in batches}) == len(batches)
    generated = {r[0] for r in db_rows(run, "SELECT key FROM requests WHERE purpose='generate'")}
    assert generated == {b[1] for b in batches} or len(generated) == len(batches) + 1
    dup = db_rows(
        run,
        "SELECT request_key, position, COUNT(*) FROM instructions "
        "GROUP BY 1, 2 HAVING COUNT(*) > 1",
    )
    assert dup == []
    kept = db_rows(
        run,
        "SELECT COUNT(*) FROM instructions i JOIN instances n ON n.instruction_id=i.id "
        "WHERE i.source='machine' AND i.status='kept' AND n.status='kept'",
    )[0][0]
    assert kept >= 6

    # Every stage left its output.
    stages = dict(db_rows(run, "SELECT name, status FROM stages"))
    assert stages == {
        "generate": "done",
        "filter": "done",
        "train": "done",
        "evaluate": "done",
        "report": "done",
    }
    assert db_rows(run, "SELECT COUNT(*) FROM train_steps")[0][0] >= 3
    summary = json.loads((run / "evaluation.json").read_text())
    assert summary
    assert {r[0] for r in db_rows(run, "SELECT DISTINCT model_role FROM eval_items")} == {
        "base",
        "tuned",
        "teacher",
    }
    # Every item judged for both pairs (a verdict or a recorded failure), through the ledger;
    # IFEval's prompts are checked by program instead, for every model, tuned minus base too.
    items = db_rows(
        run,
        "SELECT COUNT(DISTINCT set_name || item_key) FROM eval_items WHERE set_name != 'ifeval'",
    )[0][0]
    checked = db_rows(
        run, "SELECT model_role FROM eval_summary WHERE metric='ifeval_prompt_strict'"
    )
    assert {r[0] for r in checked} == {"base", "tuned", "teacher", "delta"}
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == [
        "base.json",
        "teacher.json",
        "tuned.json",
    ]
    assert (
        db_rows(run, "SELECT COUNT(*) FROM eval_judgements WHERE kind='pairwise'")[0][0]
        == 2 * items
    )
    # Both orders of each pair are asked, and two identical prompts are one request: a pair whose
    # two answers are the same text asks once.
    answer = {
        (s, k, r): a
        for s, k, r, a in db_rows(
            run,
            "SELECT set_name, item_key, model_role, answer FROM eval_items "
            "WHERE set_name != 'ifeval'",
        )
    }
    prompts = sum(
        1 if answer[s, k, "tuned"] == answer[s, k, other] else 2
        for s, k, r in answer
        if r == "tuned"
        for other in ("base", "teacher")
    )
    assert db_rows(run, "SELECT COUNT(*) FROM requests WHERE purpose='judge'")[0][0] >= prompts
    html = (run / "report.html").read_text()
    assert "<svg" in html and (run / "report.md").exists()

    # The student loads without tutelage.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys; from transformers import AutoModelForCausalLM as M; "
                f"m = M.from_pretrained({str(run / 'student')!r}); "
                "assert 'tutelage' not in sys.modules; print(m.config.model_type)"
            ),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert probe.returncode == 0 and "gemma" in probe.stdout, probe.stderr[-2000:]

    # The GGUF beside it serves with llama.cpp.
    metrics = json.loads(db_rows(run, "SELECT metrics_json FROM train_runs")[0][0])
    assert metrics["gguf"] == str(run / "student.gguf") and "gguf_error" not in metrics
    served = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "from llama_cpp import Llama; "
                f"m = Llama({str(run / 'student.gguf')!r}, n_ctx=256, verbose=False); "
                "print(m.n_vocab(), len(m('### Instruction:\\nSay hi.\\n\\n### Response:\\n', "
                "max_tokens=4, temperature=0)['choices'][0]['text']) >= 0)"
            ),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert served.returncode == 0 and served.stdout.split() == ["262144", "True"], served.stderr[
        -2000:
    ]

    # A second run has nothing left to do: no new request, no new training run.
    requests_before = len(after)
    again = tutelage("run", "-c", str(config), "--run-dir", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    assert db_rows(run, "SELECT COUNT(*) FROM requests")[0][0] == requests_before
    assert db_rows(run, "SELECT COUNT(*) FROM train_runs")[0][0] == 1

    # Exports.
    for fmt, name in (("alpaca", "d.json"), ("jsonl", "d.jsonl"), ("hf", "d_hf")):
        r = tutelage("export", str(run), "--format", fmt, "-o", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "d.json").read_text())) == kept
    from datasets import load_from_disk

    assert sum(len(s) for s in load_from_disk(str(tmp_path / "d_hf")).values()) == kept
    r = tutelage("export", str(run), "--model", "-o", str(tmp_path / "student"))
    assert r.returncode == 0 and (tmp_path / "student" / "config.json").exists()


# One short generation per new recipe on the embedded teacher: the recipe's requests reach the
# real model, its answers parse, and every record lands with a status (and a reason when
# rejected). The teacher is tiny, so only the mechanics are asserted, not the quality.
RECIPE_CONFIGS = {
    "magpie": """
        generation: {recipe: magpie, target: 2, max_requests: 8, stall_requests: 8}
    """,
    "evol-instruct": """
        teacher: {chat: true}
        generation: {recipe: evol-instruct, target: 2, rounds: 1, max_requests: 10,
                     stall_requests: 10}
        filter: {rouge_threshold: null}
    """,
    "answer": """
        generation: {recipe: answer, target: 2, prompts: PROMPTS, max_requests: 6,
                     stall_requests: 6}
        filter: {rouge_threshold: null}
    """,
}
OWN_PROMPTS = [
    {"instruction": "Name three colours of a rainbow."},
    {"instruction": "Give one tip for sleeping better."},
    {"instruction": "Turn this sentence into the past tense.", "input": "I walk to the shop."},
]


@pytest.mark.parametrize("recipe", sorted(RECIPE_CONFIGS))
def test_each_new_recipe_generates_on_the_embedded_teacher(tmp_path, embedded_models, recipe):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in OWN_PROMPTS))
    chosen = yaml.safe_load(
        textwrap.dedent(RECIPE_CONFIGS[recipe]).replace("PROMPTS", str(prompts))
    )
    chosen["seed"] = 1
    chosen.setdefault("teacher", {})["threads"] = 1  # faster than two on a busy machine
    chosen["generation"]["answer_sampling"] = {"temperature": 0, "max_tokens": 320}
    config = tmp_path / "tutelage.yaml"
    config.write_text(yaml.safe_dump(chosen))
    run = tmp_path / "run"
    done = tutelage("generate", "-c", str(config), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]

    rows = db_rows(
        run,
        "SELECT i.status, i.reason, i.text, n.output FROM instructions i "
        "LEFT JOIN instances n ON n.instruction_id = i.id WHERE i.source = 'machine'",
    )
    assert rows, "no record stored"
    assert all(status in ("kept", "rejected") for status, *_ in rows)
    assert all(reason for status, reason, *_ in rows if status == "rejected")
    kept = [(text, output) for status, _, text, output in rows if status == "kept"]
    assert kept and all(text.strip() and output and output.strip() for text, output in kept)
    if recipe == "answer":  # the instructions are the user's own, word for word
        assert {text for text, _ in kept} <= {p["instruction"] for p in OWN_PROMPTS}
    explained = tutelage("generate", "--explain", str(run))
    assert explained.returncode == 0 and "kept" in explained.stdout, explained.stderr[-2000:]
