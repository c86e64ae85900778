"""A GGUF model run in-process by llama-cpp-python: the default teacher, no server needed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp

from ..model_files import ModelNotFound
from .base import Completion, Request, TeacherError

# OpenAI's defaults, so a request means the same on every backend (llama-cpp-python's own differ:
# temperature 0.2 for chat and 0.8 for completions, and at most 16 tokens for completions).
# What a request cannot set keeps llama.cpp's defaults (top_k 40, min_p 0.05).
DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "max_tokens": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": [],
}


class LlamaCppTeacher:
    backend = "llamacpp"
    max_batch = 1  # llama-cpp-python decodes one sequence at a time

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        threads: int | None = None,
        seed: int = 0,
    ):
        path = Path(model_path)
        if not path.is_file():
            raise ModelNotFound(f"teacher.model: {path}: no such GGUF file")
        self.model = path.name
        self.seed = seed
        # Default: every core. llama.cpp's threads spin-wait for each other, so on a machine busy
        # with other work fewer threads do better (2 threads on 2 busy cores ran 10x slower than
        # 1 here): set teacher.threads then.
        threads = threads or os.cpu_count() or 1
        # One thread of our own loads the model and runs every request. llama.cpp's OpenMP gives
        # each calling thread its own team of workers: called from whichever executor thread was
        # free (asyncio.to_thread), it ran 18-32% slower than a direct call in bench/teachers.py,
        # because OpenMP throttles its spinning once it manages more threads than there are CPUs.
        # One thread also serialises the calls, as a llama.cpp context needs.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self.llm = self._thread.submit(
            llama_cpp.Llama,
            str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            seed=seed,
            verbose=False,
        ).result()

    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        # The worker thread keeps the event loop (and the other requests' I/O) responsive.
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self._thread, self._complete_one, r) for r in requests]

    def _complete_one(self, request: Request) -> Completion:
        params = request.params()
        kwargs = {k: params.get(k, default) for k, default in DEFAULTS.items()}
        # Without a seed of its own, a request gets one derived from its ledger key: a rerun of
        # the same request samples the same answer, which is what makes resumed runs identical.
        key = request.key(self.backend, self.model)
        kwargs["seed"] = params.get("seed", (int(key[:8], 16) + self.seed) % 2**32)
        # Evaluate every prompt from scratch: reusing the previous request's cached prefix
        # changes the arithmetic slightly, and with it a sampled answer.
        self.llm.reset()
        try:
            if request.is_chat:
                out = self.llm.create_chat_completion(request.message_dicts(), **kwargs)
            else:
                out = self.llm.create_completion(self._raw_prompt(request.prompt), **kwargs)
        except ValueError as e:  # the prompt does not fit the context window
            raise TeacherError(f"{self.model}: {e} (raise teacher.n_ctx)") from None
        choice = out["choices"][0]
        text = choice["message"]["content"] if request.is_chat else choice["text"]
        usage = out["usage"]
        return Completion(
            text or "",
            choice["finish_reason"] or "stop",
            usage["prompt_tokens"],
            usage["completion_tokens"],
            raw=out,
        )

    def _raw_prompt(self, prompt: str) -> str | list[int]:
        """A raw prompt as it is. One that starts with the BOS token itself (a chat template's
        `bos_token`, as Magpie's prompts do) goes as tokens: llama.cpp would add a second BOS."""
        if not self.llm.tokenize(b"", add_bos=True):  # this model gets no BOS anyway
            return prompt
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return tokens if tokens[:1] == [self.llm.token_bos()] else prompt

    async def aclose(self) -> None:
        # Nothing to release early: the model is freed with the teacher, and a caller may go on
        # using a teacher that a stage has closed (generate() closes its teacher when it ends).
        return None
