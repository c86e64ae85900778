"""The vllm backend without vLLM or a GPU: a stand-in `vllm` module records what it is asked."""

from __future__ import annotations

import asyncio
import builtins
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tutelage.teachers
from tutelage.model_files import ModelNotFound
from tutelage.store import Store
from tutelage.teachers import Ledger, Request, TeacherError
from tutelage.teachers.vllm import INSTALL_HINT, VLLMTeacher, resolve_vllm_model

DEFAULT = object()
HUB = Path("/hub-cache/snapshots")
ENGINE_ARGS = {"seed", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype"}


# -- a stand-in for vllm's offline API ------------------------------------------------------------
class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeValidationError(Exception):
    """Like vllm.exceptions.VLLMValidationError: a rejected request, and no ValueError."""


class FakeLLM:
    """Answers "answer: <prompt>"; a prompt's tokens are its words; generates max_tokens tokens
    (finish "length") or, without max_tokens, 2 tokens (finish "stop")."""

    def __init__(self, model, **kwargs):
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown}")
        self.model, self.kwargs = model, kwargs
        self.calls: list[tuple[str, list, list]] = []
        self.finish_reason: object = DEFAULT  # a finish reason (None included) overrides it
        self.rejects_with: type[Exception] = ValueError

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        assert use_tqdm is False
        self.calls.append(("generate", list(prompts), sampling_params))
        return [self._answer(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(messages)
        assert use_tqdm is False
        self.calls.append(("chat", list(messages), sampling_params))
        prompts = [" ".join(m["content"] for m in conversation) for conversation in messages]
        return [self._answer(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def _answer(self, prompt: str, params: FakeSamplingParams):
        ids = list(range(len(prompt.split())))
        limit = self.kwargs.get("max_model_len")
        if limit is not None and len(ids) > limit:
            raise self.rejects_with(
                f"The decoder prompt (length {len(ids)}) is longer than the "
                f"maximum model length of {limit}."
            )
        max_tokens = params.kwargs["max_tokens"]
        reason = self.finish_reason
        if reason is DEFAULT:
            reason = "length" if max_tokens else "stop"
        out = types.SimpleNamespace(
            text=f"answer: {prompt}",
            token_ids=[7] * (max_tokens or 2),
            finish_reason=reason,
            stop_reason=None,
        )
        return types.SimpleNamespace(prompt=prompt, prompt_token_ids=ids, outputs=[out])


@pytest.fixture
def fake_vllm(monkeypatch):
    # A Hub id's snapshot, as model_files finds it in the Hub cache (tests/test_hub.py tests that).
    monkeypatch.setattr(
        "tutelage.model_files.hub_snapshot", lambda repo_id, field, repo_type="model": HUB / repo_id
    )
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delitem(sys.modules, "vllm.exceptions", raising=False)
    return module


def plain(text: str, **sampling) -> Request:
    return Request.make(prompt=text, sampling=sampling)


def chat(text: str, **sampling) -> Request:
    return Request.make(messages=[{"role": "user", "content": text}], sampling=sampling)


def ask(teacher: VLLMTeacher, *requests: Request):
    return asyncio.run(teacher.complete(requests))


# -- without vllm ---------------------------------------------------------------------------------
def test_importing_the_module_loads_no_model_library():
    code = (
        "import sys, tutelage.teachers.vllm; "
        "print([m for m in ('vllm', 'torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_vllm_the_module_imports_and_the_teacher_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, installed or not
    monkeypatch.delitem(sys.modules, "tutelage.teachers.vllm")
    monkeypatch.delattr(tutelage.teachers, "vllm")  # both come back after the test
    module = importlib.import_module("tutelage.teachers.vllm")
    with pytest.raises(TeacherError) as e:
        module.VLLMTeacher("org/model")
    assert str(e.value) == INSTALL_HINT
    assert "pip install 'tutelage[vllm]'" in str(e.value)


def test_a_vllm_that_does_not_import_is_not_mistaken_for_a_missing_one(monkeypatch):
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "vllm":
            raise ImportError("libcudart.so.13: cannot open shared object file", name="vllm._C")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(TeacherError, match="installed but does not import.*libcudart"):
        VLLMTeacher("org/model")


def test_the_config_makes_a_vllm_teacher_with_its_engine_args(fake_vllm):
    from tutelage.config import load_config

    config = load_config(
        None,
        {
            "teacher.backend": "vllm",
            "teacher.model": "org/m",
            "teacher.engine_args": {"max_model_len": 4096},
        },
    )
    teacher = tutelage.teachers.make_teacher(config.teacher)
    assert isinstance(teacher, VLLMTeacher) and teacher.llm.kwargs["max_model_len"] == 4096


# -- the engine and its arguments -----------------------------------------------------------------
def test_engine_args_go_to_the_engine(fake_vllm):
    teacher = VLLMTeacher(
        "org/big-model", seed=3, engine_args={"tensor_parallel_size": 2, "max_model_len": 8192}
    )
    assert (teacher.backend, teacher.model, teacher.max_batch) == ("vllm", "org/big-model", 256)
    assert teacher.llm.model == str(HUB / "org/big-model")  # its snapshot, named by its id
    assert teacher.llm.kwargs == {"seed": 3, "tensor_parallel_size": 2, "max_model_len": 8192}
    with pytest.raises(TeacherError, match="teacher.engine_args: .*unexpected keyword"):
        VLLMTeacher("org/big-model", engine_args={"tensor_paralel_size": 2})


def test_model_folders_hub_names_and_missing_models(fake_vllm, tmp_path):
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_vllm_model(folder)
    (folder / "config.json").write_text("{}")
    assert resolve_vllm_model(folder) == (str(folder), "my-teacher")
    teacher = VLLMTeacher(str(folder))
    assert (teacher.llm.model, teacher.model) == (str(folder), "my-teacher")

    hub_id = "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_vllm_model(hub_id) == (str(HUB / hub_id), hub_id)
    for missing in (tmp_path / "nope.gguf", tmp_path / "nope", "./nope", "~/nope-vllm-teacher"):
        with pytest.raises(ModelNotFound, match="teacher.model"):
            VLLMTeacher(str(missing))


# -- requests -------------------------------------------------------------------------------------
def test_sampling_params_get_openai_defaults_and_keep_their_own(fake_vllm):
    teacher = VLLMTeacher("org/model")
    ask(
        teacher,
        plain("unset"),
        plain(
            "set",
            temperature=0.2,
            top_p=0.9,
            max_tokens=5,
            presence_penalty=0.5,
            frequency_penalty=-0.3,
            stop=["\n\n", "###"],
            seed=7,
        ),
    )
    [(_, _, [default, own])] = teacher.llm.calls
    assert set(default.kwargs) == {
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "seed",
    }
    assert {k: v for k, v in default.kwargs.items() if k != "seed"} == {
        "n": 1,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": [],
    }
    assert own.kwargs == {
        "n": 1,
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 5,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.3,
        "stop": ["\n\n", "###"],
        "seed": 7,
    }


def test_each_request_gets_its_own_seed_and_the_same_one_on_a_rerun(fake_vllm):
    def seeds(teacher, *requests):
        ask(teacher, *requests)
        return [p.kwargs["seed"] for p in teacher.llm.calls[-1][2]]

    teacher = VLLMTeacher("org/model")
    a, b = plain("same prompt"), plain("another prompt")
    second = Request.make(prompt="same prompt", sample_index=1)
    first_run = seeds(teacher, a, b, second)
    assert len(set(first_run)) == 3  # different requests, and samples, sample differently
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in first_run)
    # The same request gets the same seed alone, in another batch, and from a new teacher.
    assert seeds(teacher, b, a) == first_run[1::-1]
    assert seeds(VLLMTeacher("org/model"), a) == first_run[:1]
    # The run's seed shifts every derived seed; a request's own seed is kept as it is.
    assert seeds(VLLMTeacher("org/model", seed=1), a) != first_run[:1]
    assert seeds(teacher, plain("same prompt", seed=123)) == [123]


def test_chat_and_prompts_go_to_one_engine_call_each_in_order(fake_vllm):
    teacher = VLLMTeacher("org/model")
    requests = [plain("p one"), chat("c one"), plain("p two"), chat("c two"), chat("c three")]
    answers = ask(teacher, *requests)
    assert [a.text for a in answers] == [
        "answer: p one",
        "answer: c one",
        "answer: p two",
        "answer: c two",
        "answer: c three",
    ]
    calls = {method: (inputs, params) for method, inputs, params in teacher.llm.calls}
    assert len(teacher.llm.calls) == 2 and set(calls) == {"chat", "generate"}
    assert calls["generate"][0] == ["p one", "p two"]
    assert calls["chat"][0] == [
        [{"role": "user", "content": f"c {n}"}] for n in ("one", "two", "three")
    ]
    # Each request's parameters travel with it.
    assert [p.kwargs["seed"] for p in calls["chat"][1]] == [
        teacher.sampling_params(r).kwargs["seed"] for r in requests if r.is_chat
    ]

    only_chat = VLLMTeacher("org/model")
    ask(only_chat, chat("a"), chat("b"))
    assert [c[0] for c in only_chat.llm.calls] == ["chat"]


def test_token_counts_finish_reasons_and_raw(fake_vllm):
    teacher = VLLMTeacher("org/model")
    capped, free = ask(teacher, plain("one two three", max_tokens=4), chat("four five"))
    assert (capped.finish_reason, capped.tokens_in, capped.tokens_out) == ("length", 3, 4)
    assert (free.finish_reason, free.tokens_in, free.tokens_out) == ("stop", 2, 2)
    assert json.loads(json.dumps(capped.raw)) == {
        "finish_reason": "length",
        "stop_reason": None,
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }

    for reason, mapped in ((None, "stop"), ("stop", "stop"), ("repetition", "stop")):
        teacher.llm.finish_reason = reason
        [answer] = ask(teacher, plain("x", max_tokens=3))
        assert answer.finish_reason == mapped
    teacher.llm.finish_reason = "abort"
    with pytest.raises(RuntimeError, match="finish_reason 'abort'"):
        ask(teacher, plain("x"))


@pytest.mark.parametrize("error", ["value", "vllm"])
def test_a_prompt_longer_than_the_context_is_a_teacher_error(fake_vllm, monkeypatch, error):
    if error == "vllm":  # vLLM's own validation error, which is no ValueError
        exceptions = types.ModuleType("vllm.exceptions")
        exceptions.VLLMClientError = FakeValidationError
        monkeypatch.setitem(sys.modules, "vllm.exceptions", exceptions)
    teacher = VLLMTeacher("org/model", engine_args={"max_model_len": 4})
    teacher.llm.rejects_with = ValueError if error == "value" else FakeValidationError
    [short] = ask(teacher, plain("fits in four"))
    assert short.tokens_in == 3
    too_long = r"org/model: .*length 7.*teacher.engine_args.max_model_len"
    with pytest.raises(TeacherError, match=too_long):
        ask(teacher, plain("fits"), chat("this one does not fit at all"))


def test_a_failure_outside_vllm_validation_is_not_turned_into_a_teacher_error(fake_vllm):
    teacher = VLLMTeacher("org/model", engine_args={"max_model_len": 1})
    teacher.llm.rejects_with = FakeValidationError  # not registered as vLLM's: a real failure
    with pytest.raises(FakeValidationError):
        ask(teacher, plain("two words"))


def test_the_ledger_gathers_concurrent_requests_into_one_engine_call(fake_vllm, tmp_path):
    teacher = VLLMTeacher("org/model")
    requests = [plain(f"prompt {i}") for i in range(20)] + [chat(f"chat {i}") for i in range(12)]
    with Store(tmp_path / "run") as store:
        ledger = Ledger(teacher, store, concurrency=64)
        results = asyncio.run(ledger.complete_many(requests))
        assert [r.completion.text for r in results] == [
            f"answer: {r.prompt or r.messages[0][1]}" for r in requests
        ]
        assert sorted((m, len(inputs)) for m, inputs, _ in teacher.llm.calls) == [
            ("chat", 12),
            ("generate", 20),
        ]
        # A rerun is answered from the store: the engine is not asked again.
        again = asyncio.run(Ledger(teacher, store, concurrency=64).complete_many(requests))
        assert all(r.cached for r in again) and len(teacher.llm.calls) == 2
