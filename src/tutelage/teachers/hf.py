"""A teacher run by transformers (the `transformers` backend): batched generation, on CUDA when
there is a GPU. Slower than llama.cpp on a CPU, but it runs any HF model folder as it is.

Sampling keeps transformers' defaults for what the request does not set (top_k 50).
Greedy decoding (temperature 0) gives each request the same answer in any batch. Sampling draws from
one random stream per batch, seeded from the batch's requests, so a rerun reproduces an answer only
when the same requests are batched together again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers as hf

from ..config import EMBEDDED
from ..model_files import embedded_teacher_hf, model_folder, model_name
from .base import Completion, Request, TeacherError, top_logprobs_of
from .scoring import Scored, ScoreRequest, teacher_forcing


def resolve_teacher_folder(model: str | Path) -> Path:
    """The HF folder for teacher.model: the embedded teacher, a Hub id, an HF folder, or a GGUF
    file (converted once into the cache)."""
    if str(model) == EMBEDDED:
        return embedded_teacher_hf()
    return model_folder(str(model), "teacher.model")


class OpenAIPenalties(hf.LogitsProcessor):
    """presence_penalty and frequency_penalty as OpenAI defines them, over the tokens generated
    so far (transformers has only the multiplicative repetition_penalty)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class TransformersTeacher:
    backend = "transformers"

    def __init__(
        self, model: str | Path, *, max_batch: int = 8, seed: int = 0, threads: int | None = None
    ):
        if threads:  # torch's threads are per process: teacher.threads sets them for the run
            torch.set_num_threads(threads)
        folder = resolve_teacher_folder(model)
        self.model = model_name(str(model), folder)
        self.max_batch = max_batch
        self.seed = seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = hf.AutoTokenizer.from_pretrained(folder)
        # Left padding: every row of a batch then ends where its generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.lm = hf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.lm.to(self.device).eval()
        eos = self.lm.generation_config.eos_token_id
        self.end_ids = {
            self.tokenizer.eos_token_id,
            self.tokenizer.pad_token_id,
            *(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        }
        self._lock = threading.Lock()  # one generate() at a time: they would only compete

    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """Requests with the same sampling parameters are generated together, max_batch at once."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.sampling, r.top_logprobs), []).append(i)
        out: list[Completion | None] = [None] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                answers = await asyncio.to_thread(self._generate, [requests[i] for i in chunk])
                for i, answer in zip(chunk, answers, strict=True):
                    out[i] = answer
        return out

    def _token_ids(self, request: Request) -> list[int]:
        if request.is_chat:
            text = self.tokenizer.apply_chat_template(
                request.message_dicts(), add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False).input_ids
        # A raw prompt as it is. One that starts with the BOS token itself (a chat template's
        # `bos_token`, as Magpie's prompts do) gets no second one from the tokenizer.
        bos = self.tokenizer.bos_token
        own_bos = bool(bos) and request.prompt.startswith(bos)
        return self.tokenizer(request.prompt, add_special_tokens=not own_bos).input_ids

    def _generate(self, requests: list[Request]) -> list[Completion]:
        """One batch of requests that share their sampling parameters."""
        params = requests[0].params()
        ids = [self._token_ids(r) for r in requests]
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        prompt_len = batch["input_ids"].shape[1]
        temperature = params.get("temperature", 1.0)
        stop = params.get("stop") or []
        room = self.lm.config.max_position_embeddings - prompt_len  # no max_tokens: to the end
        kwargs = {
            "max_new_tokens": params.get("max_tokens") or room,
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=params.get("top_p", 1.0))
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        presence = params.get("presence_penalty", 0.0)
        frequency = params.get("frequency_penalty", 0.0)
        if presence or frequency:
            kwargs["logits_processor"] = hf.LogitsProcessorList(
                [OpenAIPenalties(prompt_len, presence, frequency)]
            )
        k = requests[0].top_logprobs  # the same for the whole batch (see complete)
        if k:  # the raw logits of the first step, before any sampling processor
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with self._lock, torch.inference_mode():
            torch.manual_seed(params.get("seed", self._batch_seed(requests)))
            out = self.lm.generate(**batch, **kwargs)
        sequences = out.sequences if k else out
        answers = [
            self._completion(row[prompt_len:].tolist(), len(prompt), stop)
            for row, prompt in zip(sequences, ids, strict=True)
        ]
        if k:
            answers = [
                dataclasses.replace(
                    answer,
                    top_logprobs=top_logprobs_of(
                        row.float().cpu().numpy(), k, lambda i: self.tokenizer.decode([i])
                    ),
                )
                for answer, row in zip(answers, out.logits[0], strict=True)
            ]
        return answers

    def _batch_seed(self, requests: list[Request]) -> int:
        keys = "".join(r.key(self.backend, self.model) for r in requests)
        return (int(hashlib.sha256(keys.encode()).hexdigest()[:8], 16) + self.seed) % 2**32

    def _completion(self, generated: list[int], tokens_in: int, stop: list[str]) -> Completion:
        # A finished row is padded to the batch's length: its own tokens end at the first end id.
        n = next((j for j, t in enumerate(generated) if t in self.end_ids), len(generated))
        text = self.tokenizer.decode(generated[:n], skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:  # stopped at a stop string, which (as in OpenAI's API) is not part of the answer
            return Completion(text[: min(cuts)], "stop", tokens_in, n)
        if stop and any(s in self.tokenizer.decode(generated[:n]) for s in stop):
            # A stop string that is a special token (<|eot_id|>, a user turn's end in Magpie) is
            # left out of the text above: the row stopped on it, as its last token.
            return Completion(text, "stop", tokens_in, n)
        if n < len(generated):  # the end-of-sequence token, counted as generated
            return Completion(text, "stop", tokens_in, n + 1)
        return Completion(text, "length", tokens_in, n)

    # -- teacher forcing (the capture stage; see teachers.scoring) ---------------------------------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[Scored]:
        """Each request's answer tokens scored in one forward pass of its own (no padding)."""
        return await asyncio.to_thread(lambda: [self._score_one(r) for r in requests])

    def _encode_chat(self, messages: list[dict], header: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TeacherError(f"teacher.model: {self.model} has no chat template to score in")
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=header, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _score_one(self, request: ScoreRequest) -> Scored:
        forcing = teacher_forcing(request, self._encode_chat, self._encode_text)
        if len(forcing.ids) > self.lm.config.max_position_embeddings:
            raise TeacherError(
                f"{self.model}: an example of {len(forcing.ids)} tokens is longer than the "
                f"teacher's context ({self.lm.config.max_position_embeddings})"
            )
        ids = torch.tensor([forcing.ids], device=self.device)
        rows = torch.tensor([p - 1 for p in forcing.positions], device=self.device)
        with self._lock, torch.inference_mode():
            # Only the rows before answer tokens go through the head, not [length, vocab].
            logits = self.lm(input_ids=ids, logits_to_keep=rows).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, top = logprobs.topk(min(request.top_k, logprobs.shape[-1]), dim=-1)
        return Scored(
            np.asarray(forcing.answer_ids, dtype=np.int32),
            top.to(torch.int32).cpu().numpy(),
            values.to(torch.float16).cpu().numpy(),
            tokens_in=len(forcing.ids),
        )

    async def aclose(self) -> None:
        return None  # the model is freed with the teacher
