"""`tutelage export RUN --push-to-hub REPO`: the folder prepared for upload, its model card written
from the run, and the upload itself (replaced here: no Hub is reachable from the tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import add_examples, add_scripted_request

from tutelage import hub
from tutelage import train as tr
from tutelage.config import Config
from tutelage.store import Store

EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5."),
]
VALID = [("Name a secondary colour.", "", "Green is a secondary colour.")]
REJECTED = [
    ("Write.", "too_short"),
    ("Draw a picture of a cat.", "blacklisted"),
    ("Sing.", "too_short"),
]
SECRET = "hf_SECRETtokenThatMustNeverLeak0123456789"


def add_rejected(store: Store) -> None:
    key = "request-rejected"
    add_scripted_request(store, key, {"rejected": True})
    records = [
        {"text": text, "status": "rejected", "reason": reason, "instances": []}
        for text, reason in REJECTED
    ]
    store.put_batch(store.next_batch_index(), key, "alpaca", records)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """A run with a funnel (kept and rejected tasks), a 2-step training and an evaluation."""
    run_dir = tmp_path_factory.mktemp("hub") / "run"
    store = Store(run_dir)
    add_examples(store, EXAMPLES, "train")
    add_examples(store, VALID, "valid")
    add_rejected(store)
    config = Config(
        run_dir=run_dir,
        student={"model": str(tiny_model)},
        teacher={"backend": "openai", "model": "gpt-5-mini"},
        training={"batch_size": 3, "threads": 1, "gguf": None, "max_steps": 2, "eval_every": 1},
    )
    store.set_meta("config", config.model_dump(mode="json"))
    tr.train(store, config, run_dir)
    row = {"set_name": "builtin", "n": 12}
    store.put_eval_summary(
        [
            {
                **row,
                "model_role": "base",
                "metric": "rouge_l",
                "value": 0.1,
                "ci_low": 0.05,
                "ci_high": 0.15,
            },
            {
                **row,
                "model_role": "tuned",
                "metric": "rouge_l",
                "value": 0.231,
                "ci_low": 0.19,
                "ci_high": 0.27,
            },
            {
                **row,
                "model_role": "delta",
                "metric": "rouge_l",
                "value": 0.131,
                "ci_low": 0.09,
                "ci_high": 0.17,
            },
            {
                **row,
                "model_role": "tuned:base",
                "metric": "win_rate",
                "value": 0.7,
                "ci_low": 0.55,
                "ci_high": 0.83,
            },
        ]
    )
    store.close()
    return run_dir


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_tells_the_funnel_the_training_and_the_evaluation(trained_run, tmp_path):
    folder = hub.prepare_upload(trained_run, "someone/tiny-student", tmp_path / "up")
    card = (folder / "model" / "README.md").read_text()

    meta = front_matter(card)
    assert meta["datasets"] == ["someone/tiny-student"]
    assert meta["library_name"] == "transformers" and "tutelage" in meta["tags"]
    assert "base_model" not in meta  # a local folder is no Hub model to link to
    assert str(trained_run.parent) not in card  # nor is its path shown

    # Data: generated, kept, and each rejection reason with its count and share.
    assert "The teacher generated 7 tasks" in card and "4 (57.1%) passed" in card
    assert "| rejected: too\\_short | 2 | 28.6% |" in card
    assert "| rejected: blacklisted | 1 | 14.3% |" in card
    assert "gpt-5-mini (openai)" in card
    # Training: the method, the settings, the run's figures.
    assert "lora on base" in card and "learning rate 0.0003," in card
    assert "| steps | 2 |" in card
    # Evaluation: means with their intervals, the paired delta and the judge's win rate.
    assert "| rouge\\_l (higher is better) | 0.100 [0.050, 0.150] | 0.231 [0.190, 0.270] |" in card
    assert "+0.131 [+0.090, +0.170]" in card
    assert "| tuned vs base | 0.700 [0.550, 0.830] |" in card
    # The usage snippet is the Alpaca prompt the student trained on, as valid Python.
    snippet = card.split("```python\n")[1].split("```")[0]
    compile(snippet, "card", "exec")
    assert "### Instruction:" in snippet


def test_the_folder_holds_the_student_and_the_dataset(trained_run, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoConfig

    folder = hub.prepare_upload(trained_run, "someone/tiny-student", tmp_path / "up")
    model = folder / "model"
    assert AutoConfig.from_pretrained(model).model_type == "llama"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    assert "base_path" not in json.loads((model / "tutelage.json").read_text())
    data = load_from_disk(str(folder / "dataset"))
    assert {k: len(v) for k, v in data.items()} == {"train": 3, "validation": 1}
    assert data["train"][0] == dict(zip(("instruction", "input", "output"), EXAMPLES[0]))
    with pytest.raises(FileExistsError, match="not empty"):
        hub.prepare_upload(trained_run, "someone/tiny-student", tmp_path / "up")


def test_export_push_to_hub_uploads_the_prepared_folder(trained_run, monkeypatch):
    from typer.testing import CliRunner

    from tutelage.cli import app

    uploads = []

    def fake_upload(folder: Path, repo_id: str, private: bool) -> dict[str, str]:
        uploads.append((folder, repo_id, private, sorted(p.name for p in folder.iterdir())))
        return {"model": f"https://hub.example/{repo_id}", "dataset": "https://hub.example/d"}

    monkeypatch.setattr(hub, "upload", fake_upload)
    env = {"COLUMNS": "200", "HF_TOKEN": SECRET}
    runner = CliRunner()
    r = runner.invoke(
        app, ["export", str(trained_run), "--push-to-hub", "me/student", "--private"], env=env
    )
    assert r.exit_code == 0, r.output
    assert uploads == [(trained_run / "hub", "me/student", True, ["dataset", "model"])]
    assert "https://hub.example/me/student" in r.output
    # The token goes nowhere: not in the output, not in any file that would be uploaded.
    assert SECRET not in r.output
    for path in (trained_run / "hub").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    # Again, public: the default folder is rebuilt, not refused.
    r = runner.invoke(app, ["export", str(trained_run), "--push-to-hub", "me/student"], env=env)
    assert r.exit_code == 0 and uploads[-1][2] is False, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--push-to-hub", "student"], "give the full id"),
        (["--push-to-hub", "me/bad name"], "me/bad name"),
        (["--push-to-hub", "me/student", "--model"], "drop --model"),
        (["--private", "-o", "x.json"], "--private: only with --push-to-hub"),
        ([], "-o/--output: required"),
    ],
)
def test_bad_push_options_are_one_line(trained_run, monkeypatch, args, message):
    from typer.testing import CliRunner

    from tutelage.cli import app

    monkeypatch.setattr(hub, "upload", lambda *a: pytest.fail("nothing may be uploaded"))
    r = CliRunner().invoke(app, ["export", str(trained_run), *args], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
