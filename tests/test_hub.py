"""Hugging Face Hub ids wherever a path goes (model_files.is_hub_id, hub_snapshot): a Hub cache is
built in the hub's own layout under a temporary HF_HOME from the tiny test model and a few data
files, and `org/name` loads through it in a fresh process with HF_HUB_OFFLINE=1 set by the test
(tutelage never sets it). Nothing here reaches a network: "online" means HF_ENDPOINT at a closed
port on 127.0.0.1. (`export --push-to-hub` is tested in test_push_to_hub.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tutelage.config import load_config
from tutelage.model_files import is_hub_id

MODEL_ID = "tiny-org/tiny-llama"
SEEDS_ID = "tiny-org/seed-tasks"
EVAL_ID = "tiny-org/eval-set"
PROMPTS_ID = "tiny-org/prompts"


def put_in_hub_cache(hf_home: Path, repo_id: str, files: dict[str, bytes], kind="model") -> Path:
    """`files` as huggingface_hub stores a download: HF_HOME/hub/{kind}s--org--name/ with the
    contents in blobs/ (named by their sha256), the commit's tree in snapshots/<commit>/ as links
    to them, and refs/main naming the commit. Returns the snapshot folder."""
    repo = hf_home / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    model_files = {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}
    put_in_hub_cache(home, MODEL_ID, model_files)
    seeds = [{"instruction": f"Name a colour, {i}.", "output": "Red."} for i in range(3)]
    put_in_hub_cache(home, SEEDS_ID, {"data/train.jsonl": jsonl(seeds)}, "dataset")
    evaluation = [{"instruction": "Add 2 and 3.", "output": "5"}, {"instruction": "Say hi."}]
    put_in_hub_cache(home, EVAL_ID, {"eval.jsonl": jsonl(evaluation)}, "dataset")
    chats = [{"messages": [{"role": "user", "content": "Why is the sea salty?"}]}]
    put_in_hub_cache(home, PROMPTS_ID, {"train.jsonl": jsonl(chats)}, "dataset")
    return home


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def hub_env(hf_home: Path, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(hf_home), "PYTHONPATH": ":".join(sys.path), "COLUMNS": "300"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:  # the Hub, as far as this process knows, is a port where nobody answers
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env


def run_python(code: str, env: dict[str, str]) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


LOAD_EVERYTHING = f"""
    import asyncio, json, os
    from tutelage.chat_template import load_chat_template
    from tutelage.config import TeacherConfig
    from tutelage.evaluate.sets import load_eval_file
    from tutelage.model_files import resolve_student
    from tutelage.prompt_sources import load_prompts
    from tutelage.seeds import load_seeds
    from tutelage.teachers import Request, make_teacher

    import tutelage.pipeline  # it once forced offline mode on import
    section = TeacherConfig(backend="transformers", model="{MODEL_ID}")
    teacher = make_teacher(section)
    request = Request.make(prompt="Hello", sampling={{"max_tokens": 3, "temperature": 0.0}})
    [answer] = asyncio.run(teacher.complete([request]))
    print(json.dumps({{
        "offline_after_import": os.environ.get("HF_HUB_OFFLINE"),
        "student": str(resolve_student("{MODEL_ID}")),
        "teacher": teacher.model,
        "answer_tokens": answer.tokens_out,
        "template": load_chat_template(section).text,
        "seeds": [s["instruction"] for s in load_seeds("{SEEDS_ID}")],
        "eval": [[i.instruction, i.reference] for i in load_eval_file("{EVAL_ID}")],
        "prompts": [p.instruction for p in load_prompts("{PROMPTS_ID}")],
    }}))
"""


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "hub-unreachable"])
def test_hub_ids_load_from_the_hub_cache(hf_home, tiny_model, offline):
    # Offline by choice, or because the Hub does not answer: the cached snapshot either way.
    out = run_python(LOAD_EVERYTHING, hub_env(hf_home, offline))
    snapshot = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots"
    assert Path(out["student"]).parent == snapshot
    assert (Path(out["student"]) / "config.json").read_bytes() == (
        tiny_model / "config.json"
    ).read_bytes()
    # The ledger knows the teacher by its id, not by the snapshot's commit-named folder.
    assert out["teacher"] == MODEL_ID and out["answer_tokens"] >= 1
    assert "<|im_start|>" in out["template"]  # the tokenizer's own chat template, from the cache
    assert out["seeds"] == [f"Name a colour, {i}." for i in range(3)]
    assert out["eval"] == [["Add 2 and 3.", "5"], ["Say hi.", None]]
    assert out["prompts"] == ["Why is the sea salty?"]
    assert out["offline_after_import"] == ("1" if offline else None)  # tutelage set nothing


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "hub-unreachable"])
def test_a_hub_id_neither_cached_nor_reachable_is_one_line(hf_home, tmp_path, offline):
    config = tmp_path / "tutelage.yaml"
    config.write_text("teacher:\n  backend: transformers\n  model: tiny-org/not-cached\n")
    command = ["generate", "-c", str(config), "-r", str(tmp_path / "run")]
    r = subprocess.run(
        [sys.executable, "-m", "tutelage", *command],
        capture_output=True,
        text=True,
        env=hub_env(hf_home, offline),
        timeout=300,
        check=False,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip() and "generate:" not in line]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    [line] = lines
    assert line.startswith("error: teacher.model: tiny-org/not-cached: not in the Hub cache")
    assert str(hf_home / "hub") in line and "or give a local path" in line
    if offline:
        assert "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE" in line
    else:
        assert "the Hub cannot be reached" in line and "HF_HUB_OFFLINE=1 keeps to the cache" in line


def test_a_missing_hub_dataset_names_its_setting(hf_home):
    code = """
        import json
        from tutelage.model_files import ModelNotFound
        from tutelage.seeds import load_seeds
        try:
            load_seeds("tiny-org/no-such-seeds")
        except ModelNotFound as e:
            print(json.dumps({"error": str(e)}))
    """
    error = run_python(code, hub_env(hf_home, offline=True))["error"]
    assert error.startswith("seeds.path: tiny-org/no-such-seeds: not in the Hub cache")
    assert "\n" not in error


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("Qwen/Qwen2.5-0.5B-Instruct", "tatsu-lab/alpaca", "org/name_v1.5"):
        assert is_hub_id(hub_id), hub_id
    (tmp_path / "org" / "local").mkdir(parents=True)
    for not_hub in (
        "org/local",  # a folder here: a path first
        "data/seeds.jsonl",  # a missing file, not a repository
        "./org/name",
        "/abs/org/name",
        "~/org/name",
        "gpt2",  # a bare name: a local folder that is missing, not a guess at the Hub
        "org/name/extra",
        "org--x/name",
    ):
        assert not is_hub_id(not_hub), not_hub


def test_a_config_file_keeps_hub_ids_and_resolves_paths_beside_it(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "seeds.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    config = tmp_path / "tutelage.yaml"
    config.write_text(
        "seeds:\n  path: local/seeds.jsonl\n"
        "generation:\n  recipe: answer\n  prompts: HuggingFaceH4/no_robots\n"
        "evaluation:\n  sets: [tatsu-lab/alpaca_eval, local/eval.jsonl]\n"
        "student:\n  model: Qwen/Qwen2.5-0.5B-Instruct\n"
    )
    cfg = load_config(config)
    assert cfg.seeds.path == tmp_path / "local" / "seeds.jsonl"
    assert str(cfg.generation.prompts) == "HuggingFaceH4/no_robots"
    assert [str(p) for p in cfg.evaluation.sets] == [
        "tatsu-lab/alpaca_eval",
        str(tmp_path / "local" / "eval.jsonl"),  # a missing file stays a path, beside the config
    ]
    assert cfg.student.model == "Qwen/Qwen2.5-0.5B-Instruct"
