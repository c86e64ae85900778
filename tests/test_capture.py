"""The capture stage: the teacher's top-k log-probs over the kept answers, under teacher forcing.

Round trips through the store for every backend: llama.cpp and transformers on the embedded teacher
(whose greedy answers it must find most likely at every token), vLLM's server format from a
scripted 127.0.0.1 server (against a forward pass of the same model), the vllm offline engine's
stand-in; resume after a kill; the chat-only API and vocabulary-mismatch errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import add_examples, save_tiny_model
from test_vllm import FakeLLM, FakeSamplingParams

from tutelage.capture import capture, load_captures
from tutelage.capture.storage import CapturedAnswer
from tutelage.config import TeacherConfig, load_config
from tutelage.store import Store
from tutelage.teachers import Request, TeacherError
from tutelage.teachers.scoring import (
    Forcing,
    Scored,
    ScoreRequest,
    ScoringError,
    scored_from_prompt_logprobs,
    teacher_forcing,
    top_k_of_logits,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
TASKS = [
    ("Name three primary colors.", ""),
    ("What is the capital of France?", ""),
    ("Give a synonym for the word below.", "happy"),
]


def cfg_for(tmp_path: Path, top_k: int = 5, **overrides):
    values = {"training.distill.top_k": top_k, "run_dir": str(tmp_path / "run"), **overrides}
    return load_config(None, values)


def stored_run(tmp_path: Path, answers: list[str], tasks=TASKS) -> Store:
    """A run whose kept examples are `tasks` with `answers` (train, then one in test)."""
    store = Store(tmp_path / "run")
    rows = [(ins, inp, out) for (ins, inp), out in zip(tasks, answers, strict=True)]
    add_examples(store, rows[:-1], "train")
    add_examples(store, rows[-1:], "test")
    return store


def user_turn(instruction: str, input: str) -> dict:
    return {"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}


# -- which tokens are the answer -----------------------------------------------------------------
def toy_encoders():
    """A template that writes "<u>" / "<a>" headers and "|" ends a turn, one id per character."""

    def render(messages, header):
        text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
        return text + ("<a>" if header else "")

    def encode_chat(messages, header):
        return [ord(c) for c in render(messages, header)]

    return encode_chat, lambda text: [ord(c) for c in text]


def test_the_answer_is_the_last_turn_then_the_templates_end_of_turn():
    encode_chat, encode_text = toy_encoders()
    request = ScoreRequest.make(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "ans"},
        ]
    )
    forcing = teacher_forcing(request, encode_chat, encode_text)
    text = "".join(map(chr, forcing.ids))
    assert text == "<u>hi|<a>yo|<u>q|<a>ans|"
    assert "".join(chr(forcing.ids[p]) for p in forcing.positions) == "ans|"
    assert forcing.positions == list(range(len(text) - 4, len(text)))
    with pytest.raises(ScoringError, match="ends with the answer"):
        teacher_forcing(ScoreRequest.make([{"role": "user", "content": "q"}]), *toy_encoders())


def test_a_template_that_rewrites_the_answer_is_refused_in_one_line():
    encode_chat, encode_text = toy_encoders()
    request = ScoreRequest.make([user_turn("q", ""), {"role": "assistant", "content": "a"}])
    with pytest.raises(ScoringError) as e:
        teacher_forcing(request, encode_chat, lambda text: encode_text(text.upper()))
    assert "\n" not in str(e.value) and "end" in str(e.value)


def test_top_k_of_logits_matches_a_full_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    ids, values = top_k_of_logits(logits, 7)
    assert ids.dtype == np.int32 and values.dtype == np.float16 and ids.shape == (4, 7)
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.argsort(-full, axis=-1)[:, :7]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(values, np.take_along_axis(full, expected, -1), atol=2e-3)


def test_vllm_prompt_logprobs_are_read_by_rank_without_the_token_itself():
    """vLLM's entry at a position: the k most likely (ranks 1..k) and the prompt token itself with
    its own rank, when it is not among them; JSON makes the ids strings."""
    forcing = Forcing(ids=[5, 6, 7, 8], positions=[2, 3])

    def entry(tokens: dict[int, tuple[float, int]]) -> dict:
        return {
            str(t): {"logprob": lp, "rank": r, "decoded_token": "x"}
            for t, (lp, r) in tokens.items()
        }

    entries = [
        None,
        entry({6: (-0.1, 1), 1: (-2.0, 2), 2: (-3.0, 3)}),
        entry({7: (-9.0, 40), 3: (-0.5, 1), 4: (-1.5, 2), 1: (-2.5, 3)}),  # 7 itself, rank 40
        entry({8: (-0.2, 1), 9: (-1.9, 2), 2: (-2.9, 3)}),
    ]
    scored = scored_from_prompt_logprobs(forcing, entries, 3, "server")
    assert scored.answer_ids.tolist() == [7, 8] and scored.tokens_in == 4
    assert scored.topk_ids.tolist() == [[3, 4, 1], [8, 9, 2]]
    np.testing.assert_allclose(
        scored.topk_logprobs, [[-0.5, -1.5, -2.5], [-0.2, -1.9, -2.9]], atol=1e-3
    )
    with pytest.raises(TeacherError, match="2 prompt log-probs at a position, not 3"):
        scored_from_prompt_logprobs(
            forcing, [*entries[:3], entry({8: (-0.1, 1), 9: (-2, 2)})], 3, "s"
        )


# -- storage ---------------------------------------------------------------------------------------
class ScriptedScorer:
    """A teacher whose scores follow from each request's text: answer ids are the answer's bytes
    then 2, top-k ids and log-probs a function of the position."""

    backend, model = "scripted", "scorer"

    def __init__(self):
        self.calls: list[ScoreRequest] = []

    async def score(self, requests):
        self.calls += requests
        return [scripted_score(r) for r in requests]

    async def aclose(self):
        return None


def scripted_score(request: ScoreRequest) -> Scored:
    answer = [*request.messages[-1][1].encode(), 2]
    n, k = len(answer), request.top_k
    ids = (np.arange(n)[:, None] * 31 + np.arange(k)[None, :] * 7) % 49152
    values = -np.arange(1, k + 1, dtype=np.float32)[None, :] * (1 + np.arange(n)[:, None] / n)
    return Scored(
        np.array(answer, np.int32), ids.astype(np.int32), values.astype(np.float16), n + 9
    )


def test_captures_round_trip_through_the_store_at_4_plus_6k_bytes_a_token(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from tutelage.model_files import vocabulary_hash

    config = cfg_for(
        tmp_path,
        top_k=4,
        **{
            "student.model": str(tiny_model),
            "teacher.model": str(tiny_model),
            "teacher.backend": "transformers",
        },
    )
    answers = ["Red, blue, yellow.", "Paris.", "Joyful."]
    store = stored_run(tmp_path, answers)
    teacher = ScriptedScorer()
    result = capture(store, config, teacher=teacher)
    assert (result.examples, result.captured, result.scored, result.top_k) == (3, 3, 3, 4)
    tokens = sum(len(a.encode()) + 1 for a in answers)
    assert result.tokens == tokens and result.bytes == tokens * (4 + 6 * 4)
    assert result.bytes_per_token == 4 + 6 * 4

    captures = load_captures(store)
    rows = {r["instance_id"]: r for r in store.examples()}
    assert set(captures) == set(rows)
    for instance_id, got in captures.items():
        assert isinstance(got, CapturedAnswer)
        want = scripted_score(
            ScoreRequest.make(
                [
                    user_turn(rows[instance_id]["instruction"], rows[instance_id]["input"]),
                    {"role": "assistant", "content": rows[instance_id]["output"]},
                ],
                top_k=4,
            )
        )
        assert got.answer_ids.dtype == np.int32 and got.topk_ids.dtype == np.int32
        assert got.topk_logprobs.dtype == np.float16
        np.testing.assert_array_equal(got.answer_ids, want.answer_ids)
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(got.topk_logprobs, want.topk_logprobs)
        assert got.teacher_vocab_hash == vocabulary_hash(AutoTokenizer.from_pretrained(tiny_model))
    # What the teacher read: the user's turn as the chat format writes it, then the answer.
    assert teacher.calls[2].messages == (
        ("user", "Give a synonym for the word below.\n\nhappy"),
        ("assistant", "Joyful."),
    )
    # Every request went through the ledger: done, with the tokens read, purpose capture.
    by_purpose = {r["purpose"]: r for r in store.request_totals_by_purpose()}
    assert by_purpose["capture"]["requests"] == 3
    assert by_purpose["capture"]["tokens_in"] == tokens + 3 * 9

    # A rerun scores nothing; another k scores everything again, replacing the stale captures.
    assert capture(store, config, teacher=teacher).scored == 0 and len(teacher.calls) == 3
    config.training.distill.top_k = 3
    again = capture(store, config, teacher=teacher)
    assert again.scored == 3 and {c.top_k for c in load_captures(store).values()} == {3}
    store.close()


# -- the embedded teacher: llama.cpp and transformers ---------------------------------------------
@pytest.fixture(scope="module")
def greedy_answers():
    """The embedded teacher's own greedy answers to TASKS (llama.cpp), and the teacher."""
    from tutelage.model_files import embedded_teacher_gguf
    from tutelage.teachers.llamacpp import LlamaCppTeacher

    teacher = LlamaCppTeacher(embedded_teacher_gguf(), n_ctx=512, threads=1)
    sampling = {"temperature": 0.0, "max_tokens": 12}
    requests = [Request.make(messages=[user_turn(*t)], sampling=sampling) for t in TASKS]
    completions = asyncio.run(teacher.complete(requests))
    return [c.text for c in completions], teacher


def check_greedy_capture(captures: dict, store: Store, tokenizer) -> None:
    """Teacher forcing a greedy answer: at every answer token but the turn's end, the teacher's
    most likely next token is that very token; the answer is the text's tokens then <|im_end|>."""
    rows = {r["instance_id"]: r for r in store.examples()}
    assert set(captures) == set(rows)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for instance_id, got in captures.items():
        text_ids = tokenizer(rows[instance_id]["output"], add_special_tokens=False)["input_ids"]
        assert got.answer_ids.tolist() == [*text_ids, end]
        assert got.topk_ids.shape == (len(text_ids) + 1, 5)
        assert got.topk_ids[:-1, 0].tolist() == text_ids  # the greedy choice, position by position
        logprobs = got.topk_logprobs.astype(np.float32)
        assert (logprobs <= 0).all() and (np.diff(logprobs, axis=1) <= 0).all()
        assert (np.exp(logprobs).sum(axis=1) <= 1.0 + 1e-2).all()


def test_llamacpp_captures_the_embedded_teachers_own_answers(tmp_path, greedy_answers, tokenizer):
    answers, teacher = greedy_answers
    config = cfg_for(tmp_path, **{"student.from_teacher": {"layers": 2}})
    store = stored_run(tmp_path, answers)
    result = capture(store, config, teacher=teacher)
    assert result.captured == 3 and result.teacher.startswith("llamacpp ")
    check_greedy_capture(load_captures(store), store, tokenizer)
    store.close()


def test_transformers_captures_its_own_answers_and_llamacpps_tokens(
    tmp_path, greedy_answers, tokenizer
):
    from tutelage.teachers.hf import TransformersTeacher

    teacher = TransformersTeacher("embedded", threads=1)
    sampling = {"temperature": 0.0, "max_tokens": 12}
    requests = [Request.make(messages=[user_turn(*t)], sampling=sampling) for t in TASKS]
    own = [c.text for c in asyncio.run(teacher.complete(requests))]
    config = {"teacher.backend": "transformers", "student.from_teacher": {"layers": 2}}
    for name, answers in (("own", own), ("llamacpp", greedy_answers[0])):
        (tmp_path / name).mkdir()
        store = stored_run(tmp_path / name, answers)
        capture(store, cfg_for(tmp_path / name, **config), teacher=teacher)
        if name == "own":  # its own greedy answers: its top choice at every token
            check_greedy_capture(load_captures(store), store, tokenizer)
            store.close()
            continue
        # llama.cpp's answers (from Q4_1 weights, not these dequantized ones): the same tokens,
        # and mostly the same top choice.
        captured = load_captures(store)
        answer_ids = [c.answer_ids for c in captured.values()]
        top = np.concatenate([c.topk_ids[:-1, 0] for c in captured.values()])
        rows = {r["instance_id"]: r["output"] for r in store.examples()}
        for (instance_id, c), ids in zip(captured.items(), answer_ids, strict=True):
            text_ids = tokenizer(rows[instance_id], add_special_tokens=False)["input_ids"]
            assert ids.tolist()[:-1] == text_ids
        agree = np.mean(top == np.concatenate([ids[:-1] for ids in answer_ids]))
        assert agree >= 0.8, agree
        store.close()


# -- vLLM: the offline engine's stand-in, and a server's format -----------------------------------
class ScoringLLM(FakeLLM):
    """tests/test_vllm.py's stand-in, with the real tokenizer and prompt log-probs: at position p,
    the k ids (p + 7j) % 1000 at log-prob -(j + 1) - p / 100, and the prompt's token at rank 999."""

    tokenizer = None

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        if not all(isinstance(p, dict) for p in prompts):
            return super().generate(prompts, sampling_params, use_tqdm=use_tqdm)
        self.calls.append(("generate", list(prompts), sampling_params))
        return [
            self._scored(p["prompt_token_ids"], sp.kwargs)
            for p, sp in zip(prompts, sampling_params)
        ]

    def _scored(self, ids, params):
        k = params["prompt_logprobs"]
        entries = [None]
        for p, token in enumerate(ids[1:], start=1):
            entry = {
                (p + 7 * j) % 1000: types.SimpleNamespace(
                    logprob=-(j + 1) - p / 100, rank=j + 1, decoded_token=""
                )
                for j in range(k)
            }
            entry.setdefault(
                token, types.SimpleNamespace(logprob=-20.0, rank=999, decoded_token="")
            )
            entries.append(entry)
        out = types.SimpleNamespace(
            text="", token_ids=[1], finish_reason="length", stop_reason=None
        )
        return types.SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=entries, outputs=[out])


def test_the_vllm_engine_scores_with_prompt_logprobs(tmp_path, tiny_model, tokenizer, monkeypatch):
    module = types.ModuleType("vllm")
    ScoringLLM.tokenizer = tokenizer
    module.LLM, module.SamplingParams = ScoringLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delitem(sys.modules, "vllm.exceptions", raising=False)
    config = cfg_for(
        tmp_path,
        top_k=4,
        **{
            "teacher.backend": "vllm",
            "teacher.model": str(tiny_model),
            "student.model": str(tiny_model),
        },
    )
    answers = ["Red, blue, yellow.", "Paris.", "Joyful."]
    store = stored_run(tmp_path, answers)
    from tutelage.teachers import make_teacher

    teacher = make_teacher(config.teacher)
    result = capture(store, config, teacher=teacher)
    assert result.captured == 3
    [(_, prompts, params)] = teacher.llm.calls  # one engine call for the whole chunk
    assert {(p.kwargs["max_tokens"], p.kwargs["prompt_logprobs"]) for p in params} == {(1, 4)}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = {r["output"]: r for r in store.examples()}
    captures = load_captures(store)
    for prompt in prompts:
        ids = prompt["prompt_token_ids"]
        answer = next(
            a
            for a in answers
            if ids[-len(tokenizer(a)["input_ids"]) - 1 : -1] == tokenizer(a)["input_ids"]
        )
        row = rows[answer]
        chat = tokenizer.apply_chat_template(
            [user_turn(row["instruction"], row["input"])],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        assert ids == prompt_ids + tokenizer(answer)["input_ids"] + [end]
        got = captures[row["instance_id"]]
        positions = range(len(prompt_ids), len(ids))
        assert got.answer_ids.tolist() == ids[len(prompt_ids) :]
        assert got.topk_ids.tolist() == [[(p + 7 * j) % 1000 for j in range(4)] for p in positions]
        np.testing.assert_allclose(
            got.topk_logprobs.astype(float),
            [[-(j + 1) - p / 100 for j in range(4)] for p in positions],
            atol=1e-2,
        )
    store.close()


class VLLMServer:
    """A scripted vLLM server on 127.0.0.1: /tokenize (the real tokenizer and chat template) and
    /v1/completions with prompt_logprobs in vLLM's format, from a forward pass of `model_dir`."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.torch = torch
        self.bodies: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append((self.path, body))
                if self.path == "/tokenize":
                    data = server.tokenize(body)
                elif self.path == "/v1/completions":
                    data = server.complete(body)
                else:
                    self.send_error(404)
                    return
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def tokenize(self, body: dict) -> dict:
        if "messages" in body:
            text = self.tokenizer.apply_chat_template(
                body["messages"],
                add_generation_prompt=body["add_generation_prompt"],
                tokenize=False,
            )
        else:
            text = body["prompt"]
        tokens = self.tokenizer(text, add_special_tokens=body.get("add_special_tokens", True))[
            "input_ids"
        ]
        return {"count": len(tokens), "max_model_len": 512, "tokens": tokens}

    def complete(self, body: dict) -> dict:
        ids, k = body["prompt"], body["prompt_logprobs"]
        assert body["echo"] is True and body["max_tokens"] == 1
        with self.torch.no_grad():
            logprobs = self.torch.log_softmax(
                self.model(self.torch.tensor([ids])).logits[0].float(), -1
            )
        entries = [None]
        for p in range(1, len(ids)):
            row = logprobs[p - 1]
            values, top = row.topk(k)
            entry = {
                str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": "?"}
                for r, (t, v) in enumerate(zip(top, values))
            }
            rank = int((row > row[ids[p]]).sum()) + 1
            entry.setdefault(
                str(ids[p]), {"logprob": float(row[ids[p]]), "rank": rank, "decoded_token": "?"}
            )
            entries.append(entry)
        choice = {"index": 0, "text": "x", "finish_reason": "length", "prompt_logprobs": entries}
        if body.get("return_token_ids"):
            choice["prompt_token_ids"] = ids
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_a_vllm_server_scores_as_a_forward_pass_does(tmp_path, tiny_model):
    from tutelage.teachers.hf import TransformersTeacher
    from tutelage.teachers.openai import OpenAITeacher

    server = VLLMServer(tiny_model)
    try:
        config = cfg_for(
            tmp_path,
            top_k=6,
            **{
                "teacher.backend": "openai",
                "teacher.model": "tiny",
                "teacher.base_url": server.url,
                "student.model": str(tiny_model),
            },
        )
        answers = ["Red, blue, yellow.", "Paris.", "Joyful <|im_end|> odd."]
        store = stored_run(tmp_path, answers)
        result = capture(store, config)
        assert result.captured == 3 and result.teacher == "openai tiny"
        assert {p for p, _ in server.bodies} == {"/tokenize", "/v1/completions"}
        served = load_captures(store)
        # The teacher's tokenizer is not on this machine: no hash, and each answer was checked.
        assert {c.teacher_vocab_hash for c in served.values()} == {""}
        local = TransformersTeacher(tiny_model, threads=1)
        rows = {r["instance_id"]: r for r in store.examples()}
        for instance_id, got in served.items():
            row = rows[instance_id]
            request = ScoreRequest.make(
                [
                    user_turn(row["instruction"], row["input"]),
                    {"role": "assistant", "content": row["output"]},
                ],
                top_k=6,
            )
            [want] = asyncio.run(local.score([request]))
            np.testing.assert_array_equal(got.answer_ids, want.answer_ids)
            np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
            np.testing.assert_allclose(
                got.topk_logprobs.astype(float), want.topk_logprobs.astype(float), atol=1e-2
            )
        # The plain teacher (no scoring) still answers through the same class.
        assert isinstance(OpenAITeacher("tiny", base_url=server.url), OpenAITeacher)
        store.close()
    finally:
        server.close()


def test_a_chat_only_api_cannot_score_and_says_so_in_one_line(
    tmp_path, tiny_model, monkeypatch, server
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    store = stored_run(tmp_path, ["a", "b", "c"])
    config = cfg_for(
        tmp_path,
        **{
            "teacher.backend": "openai",
            "teacher.model": "gpt-4o-mini",
            "student.model": str(tiny_model),
        },
    )
    with pytest.raises(TeacherError) as e:
        capture(store, config)
    assert str(e.value).startswith("teacher.base_url: https://api.openai.com/v1 is a chat-only API")
    assert "\n" not in str(e.value)
    # An OpenAI-compatible server that is no vLLM server: its first answer gives it away.
    config.teacher = TeacherConfig(backend="openai", model="m", base_url=server.url)
    with pytest.raises(TeacherError, match="needs a vLLM server") as e:
        capture(store, config)
    assert "\n" not in str(e.value)
    assert {r["path"] for r in server.requests} == {"/tokenize"}  # nothing was scored
    assert store.capture_totals()["captures"] == 0
    store.close()


def test_different_vocabularies_fail_before_anything_is_scored(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra-token>"])
    student = save_tiny_model(tmp_path / "student", other, max_positions=64)
    config = cfg_for(tmp_path, **{"student.model": str(student)})
    store = stored_run(tmp_path, ["a", "b", "c"])
    teacher = ScriptedScorer()
    with pytest.raises(ValueError) as e:
        capture(store, config, teacher=teacher)
    message = str(e.value)
    assert message.startswith("student.model and teacher.model have different vocabularies")
    assert "49153 vs 49152 tokens" in message and "\n" not in message
    assert teacher.calls == []
    store.close()


# -- resume after a kill -----------------------------------------------------------------------
KILLED = textwrap.dedent("""
    import asyncio, sys, time
    sys.path[:0] = [{src!r}, {tests!r}]
    from test_capture import ScriptedScorer, cfg_for
    from tutelage.capture import capture
    from tutelage.store import Store
    from pathlib import Path

    class Slow(ScriptedScorer):
        async def score(self, requests):
            out = await super().score(requests)
            print("scored", len(self.calls), flush=True)
            await asyncio.sleep(0.3)
            return out

    tmp = Path({tmp!r})
    config = cfg_for(tmp, **{{"student.model": {model!r}, "teacher.model": {model!r},
                             "teacher.backend": "transformers", "teacher.concurrency": 1}})
    with Store(tmp / "run") as store:
        capture(store, config, teacher=Slow())
    print("finished", flush=True)
""")


def test_a_killed_capture_resumes_without_scoring_again_what_it_stored(tmp_path, tiny_model):
    tasks = [(f"Write the number {i} in words.", "") for i in range(12)]
    answers = [f"The number {i}." for i in range(12)]
    stored_run(tmp_path, answers, tasks).close()
    script = tmp_path / "killed.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(KILLED.format(src=SRC, tests=tests, tmp=str(tmp_path), model=str(tiny_model)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for _ in range(4):  # the fourth answer is back: three or more are stored
        assert proc.stdout.readline().startswith("scored")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    with Store(tmp_path / "run") as store:
        before = load_captures(store)
        assert 3 <= len(before) < 12
        config = cfg_for(
            tmp_path,
            **{
                "student.model": str(tiny_model),
                "teacher.model": str(tiny_model),
                "teacher.backend": "transformers",
            },
        )
        teacher = ScriptedScorer()
        result = capture(store, config, teacher=teacher)
        assert result.scored == 12 - len(before) == len(teacher.calls)
        asked = {r.messages[-1][1] for r in teacher.calls}
        rows = {r["instance_id"]: r["output"] for r in store.examples()}
        assert asked.isdisjoint(rows[i] for i in before)  # nothing stored was asked again
        after = load_captures(store)
        assert len(after) == 12
        for instance_id, got in after.items():  # as one uninterrupted capture would have stored
            want = scripted_score(
                ScoreRequest.make(
                    [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": rows[instance_id]},
                    ],
                    top_k=5,
                )
            )
            np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
            np.testing.assert_array_equal(got.answer_ids, want.answer_ids)
        requests = store.request_totals_by_purpose()
        assert {r["purpose"]: r["requests"] for r in requests}["capture"] == 12


# -- the command ----------------------------------------------------------------------------------
def test_the_capture_command_needs_training_distill(tmp_path):
    from typer.testing import CliRunner

    from tutelage.cli import app

    Store(tmp_path / "run").close()
    r = CliRunner().invoke(app, ["capture", str(tmp_path / "run")])
    assert r.exit_code == 2
    assert "training.distill is not set: there is nothing to capture" in r.output


def test_run_captures_only_with_training_distill(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from tutelage import pipeline
    from tutelage.cli import app
    from tutelage.stage_results import (
        CaptureResult,
        EvaluateResult,
        FilterResult,
        GenerateResult,
        ReportResult,
        TrainResult,
    )

    ran = []
    results = {
        "generate": GenerateResult(kept=2, target=2, stop_reason="target", message="kept 2"),
        "filter": FilterResult(
            funnel={"generated": 2, "kept": 2, "rejected": {}},
            splits={"train": 2, "valid": 0, "test": 0},
        ),
        "capture": CaptureResult(
            top_k=20, examples=2, captured=2, tokens=10, bytes=1240, bytes_per_token=124.0
        ),
        "train": TrainResult(steps=1),
        "evaluate": EvaluateResult(),
        "report": ReportResult(),
    }
    for name, result in results.items():
        monkeypatch.setattr(
            pipeline,
            f"{name}_stage",
            lambda *a, name=name, result=result, **k: ran.append(name) or result,
        )
    r = CliRunner().invoke(app, ["run", "-r", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    assert ran == ["generate", "filter", "train", "evaluate", "report"]
    ran.clear()
    config = tmp_path / "distill.yaml"
    config.write_text("training:\n  distill: {loss: forward_kl}\n")
    r = CliRunner().invoke(
        app, ["run", "-c", str(config), "-r", str(tmp_path / "distill")], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert ran == ["generate", "filter", "capture", "train", "evaluate", "report"]
    assert (
        "capture: 2 of 2 examples captured (top 20, 10 answer tokens, 124 bytes a token)"
        in r.output
    )
