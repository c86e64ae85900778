"""A GGUF model run in-process by llama-cpp-python: the default teacher, no server needed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llama_cpp

from ..chat_template import ChatTemplate
from ..model_files import ModelNotFound
from .base import Completion, Request, TeacherError, top_logprobs_of
from .scoring import Scored, ScoreRequest, teacher_forcing, top_k_of_logits

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
        top = None
        try:
            prompt = None if request.is_chat else self._raw_prompt(request.prompt)
            if request.top_logprobs:
                tokens = self._prompt_tokens(request, prompt)
                top = self._next_token_logprobs(tokens, request.top_logprobs)
                if request.is_chat:
                    self.llm.reset()  # the chat completion formats and evaluates it again
                else:
                    # Evaluated just now: generation samples from these very logits.
                    prompt = tokens
            if request.is_chat:
                out = self.llm.create_chat_completion(request.message_dicts(), **kwargs)
            else:
                out = self.llm.create_completion(prompt, **kwargs)
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
            top_logprobs=top,
        )

    def _prompt_tokens(self, request: Request, prompt: str | list[int] | None) -> list[int]:
        """The tokens llama-cpp-python would evaluate for the request: a raw prompt with the
        model's BOS, or the conversation in the GGUF's own chat template (as its chat handler
        formats it)."""
        if not request.is_chat:
            if isinstance(prompt, list):
                return prompt
            return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise TeacherError(f"{self.model}: no chat template in the GGUF for a chat request")
        model = self.llm._model  # the token texts its chat handler uses
        formatted = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
        )(messages=request.message_dicts())
        return self.llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )

    def _next_token_logprobs(self, tokens: list[int], k: int) -> list[tuple[str, float]]:
        """The k most likely next tokens after `tokens`, from one evaluation of them. Not
        llama-cpp-python's `logprobs`: that needs logits_all, a row of logits kept for every
        position of the context (800 MB for the embedded teacher's 4096 x 49,152)."""
        import numpy as np

        if len(tokens) >= self.llm.n_ctx():
            raise ValueError(f"the prompt's {len(tokens)} tokens do not fit {self.llm.n_ctx()}")
        self.llm.eval(tokens)
        logits = np.ctypeslib.as_array(
            self.llm._ctx.get_logits_ith(-1),  # the last position's logits
            shape=(self.llm.n_vocab(),),
        )
        return top_logprobs_of(
            logits, k, lambda i: self.llm.detokenize([i]).decode("utf-8", errors="replace")
        )

    # -- teacher forcing (the capture stage; see teachers.scoring) ---------------------------------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[Scored]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self._thread, self._score_one, r) for r in requests]

    def _score_one(self, request: ScoreRequest) -> Scored:
        import numpy as np

        forcing = teacher_forcing(request, self._encode_chat, self._encode_text)
        if len(forcing.ids) > self.llm.n_ctx():
            raise TeacherError(
                f"{self.model}: an example of {len(forcing.ids)} tokens does not fit the "
                f"context of {self.llm.n_ctx()} (raise teacher.n_ctx)"
            )
        ids, values = self._top_k_after(forcing.ids, [p - 1 for p in forcing.positions], request)
        answer = np.asarray(forcing.answer_ids, dtype=np.int32)
        return Scored(answer, ids, values, tokens_in=len(forcing.ids))

    def _top_k_after(self, tokens: list[int], rows: list[int], request: ScoreRequest):
        """The top-k of the logits after each of `rows` (ascending indices into `tokens`), from
        one pass over the tokens in batches: Llama.eval's steps, asking for logits at those rows
        only, without logits_all's buffer of a row for every position of the context (800 MB
        for the embedded teacher)."""
        import numpy as np

        llm, wanted = self.llm, np.asarray(rows)
        n_vocab = llm.n_vocab()
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        ids, values = [], []
        try:
            for start in range(0, len(tokens), llm.n_batch):
                if start > wanted[-1]:  # the last token is read, never predicted from
                    break
                chunk = tokens[start : start + llm.n_batch]
                here = wanted[(wanted >= start) & (wanted < start + len(chunk))] - start
                # Logits only where an answer token is predicted: the prompt's rows never pass
                # through the output layer (but a chunk's last token always does, in llama.cpp).
                llm._batch.set_batch(batch=chunk, n_past=start, logits_all=False)
                for i in here:
                    llm._batch.batch.logits[int(i)] = True
                llm._ctx.decode(llm._batch)
                if not len(here):
                    continue
                logits = np.stack(
                    [
                        np.ctypeslib.as_array(llm._ctx.get_logits_ith(int(i)), shape=(n_vocab,))
                        for i in here
                    ]
                )
                top_ids, top_values = top_k_of_logits(logits, request.top_k)
                ids.append(top_ids)
                values.append(top_values)
        finally:
            llm.reset()  # the next request evaluates its prompt from scratch
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        return np.concatenate(ids), np.concatenate(values)

    def _encode_chat(self, messages: list[dict], header: bool) -> list[int]:
        text = self._chat_template().render(messages, add_generation_prompt=header)
        # The template writes its own BOS, as llama-cpp-python's chat handler has it.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _encode_text(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _chat_template(self) -> ChatTemplate:
        text = self.llm.metadata.get("tokenizer.chat_template")
        if not text:
            raise TeacherError(f"{self.model}: no chat template in the GGUF to score in")
        model = self.llm._model  # the special tokens' texts, as the chat handler takes them
        return ChatTemplate(
            text,
            model.token_get_text(self.llm.token_bos()),
            model.token_get_text(self.llm.token_eos()),
            f"{self.model} (GGUF tokenizer.chat_template)",
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
