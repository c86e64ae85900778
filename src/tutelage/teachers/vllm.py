"""A teacher run by vLLM's offline engine (the `vllm` backend): for a big teacher on GPU machines.

vLLM is an optional extra (`pip install 'tutelage[vllm]'`, CUDA only); this module imports without
it and says what to install when the backend is asked for. The ledger gathers concurrent requests
into one `complete` call, and all of its requests go to the engine at once (one call for chat
requests, one for raw prompts), which schedules them itself with continuous batching.

`teacher.model` is an HF model folder, a Hugging Face Hub id (fetched into the Hub cache, as for
every backend: `model_files.hub_snapshot`), the embedded teacher, or a GGUF file, which is converted
once into an HF folder as for the `transformers` backend (vLLM itself no longer loads GGUF files).
`engine_args` go to `vllm.LLM` as they are: tensor_parallel_size, gpu_memory_utilization,
max_model_len, dtype, ...

Every request gets its own sampling parameters, OpenAI's defaults for what it does not set, and its
own seed (derived from its ledger key when it sets none), so a rerun samples the same answer; vLLM
notes that the arithmetic of a batch can still differ slightly with what else is in it.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..chat_template import MARKER
from ..config import EMBEDDED
from ..model_files import ModelNotFound
from .base import Completion, Request, TeacherError
from .scoring import Scored, ScoreRequest, scored_from_prompt_logprobs, teacher_forcing

INSTALL_HINT = (
    "teacher.backend: vllm needs the vllm package on a CUDA machine: pip install 'tutelage[vllm]'"
)

# OpenAI's defaults, so a request means the same on every backend (vLLM's own SamplingParams stops
# at 16 tokens; max_tokens None lets it generate up to the end of the context).
DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "max_tokens": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": [],
}


def resolve_vllm_model(model: str | Path) -> tuple[str, str]:
    """(what vLLM loads, the model's name in the ledger) for teacher.model."""
    if str(model) == EMBEDDED:
        from ..model_files import embedded_teacher_hf

        folder = embedded_teacher_hf()
        return str(folder), folder.name
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"teacher.model: {model}: no such GGUF file")
        from ..gguf import gguf_to_hf
        from ..model_files import cache_dir

        folder = gguf_to_hf(path, cache_dir() / "hf" / f"{path.stem}-{path.stat().st_size}")
        return str(folder), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"teacher.model: {model}: not an HF model folder (no config.json)")
        return str(path), path.name
    from .. import model_files

    text = str(model)
    if not model_files.is_hub_id(text):
        raise ModelNotFound(
            f"teacher.model: {model}: not an HF model folder, a .gguf file "
            "or a Hugging Face Hub id (org/name)"
        )
    # A Hub id such as Qwen/Qwen2.5-7B-Instruct: its snapshot in the Hub cache, named by its id.
    return str(model_files.hub_snapshot(text, "teacher.model")), text


class VLLMTeacher:
    backend = "vllm"

    def __init__(
        self,
        model: str | Path,
        *,
        max_batch: int = 256,
        seed: int = 0,
        engine_args: dict[str, Any] | None = None,
    ):
        try:
            import vllm
        except ImportError as e:
            if e.name == "vllm":  # not installed
                raise TeacherError(INSTALL_HINT) from None
            raise TeacherError(
                f"teacher.backend: vllm is installed but does not import ({e}); "
                "it needs a CUDA machine"
            ) from e
        self._vllm = vllm
        self._request_errors = request_errors()
        path, self.model = resolve_vllm_model(model)
        self.max_batch = max_batch  # the ledger gathers up to this many requests into one call
        self.seed = seed
        kwargs = {"seed": seed, **(engine_args or {})}
        try:
            self.llm = vllm.LLM(model=path, **kwargs)
        except TypeError as e:  # an engine argument vLLM does not know
            raise TeacherError(f"teacher.engine_args: {e}") from e
        except (ValueError, *self._request_errors) as e:  # e.g. max_model_len above the model's
            raise TeacherError(f"teacher.model: vLLM cannot load {self.model}: {e}") from e
        self._lock = threading.Lock()  # one engine call at a time: the engine is not thread-safe

    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        # A worker thread keeps the event loop (and the ledger's bookkeeping) responsive.
        return await asyncio.to_thread(self._complete, list(requests))

    def sampling_params(self, request: Request) -> Any:
        params = request.params()
        kwargs = {k: params.get(k, default) for k, default in DEFAULTS.items()}
        # Without a seed of its own, a request gets one derived from its ledger key: a rerun of
        # the same request samples the same answer, which is what makes resumed runs identical.
        key = request.key(self.backend, self.model)
        kwargs["seed"] = params.get("seed", (int(key[:8], 16) + self.seed) % 2**32)
        if request.top_logprobs:  # the top tokens at each generated position (we keep the first)
            kwargs["logprobs"] = request.top_logprobs
        return self._vllm.SamplingParams(n=1, **kwargs)

    def _complete(self, requests: list[Request]) -> list[Completion]:
        chat = [i for i, r in enumerate(requests) if r.is_chat]
        plain = [i for i, r in enumerate(requests) if not r.is_chat]
        answers: list[Completion | None] = [None] * len(requests)
        with self._lock:
            try:
                if chat:
                    outputs = self.llm.chat(
                        [requests[i].message_dicts() for i in chat],
                        sampling_params=[self.sampling_params(requests[i]) for i in chat],
                        use_tqdm=False,
                    )
                    self._fill(answers, chat, outputs)
                if plain:
                    outputs = self.llm.generate(
                        [self._raw_prompt(requests[i].prompt) for i in plain],
                        sampling_params=[self.sampling_params(requests[i]) for i in plain],
                        use_tqdm=False,
                    )
                    self._fill(answers, plain, outputs)
            except (ValueError, *self._request_errors) as e:  # e.g. a prompt too long
                hint = (
                    " (give the teacher a longer context: teacher.engine_args.max_model_len, "
                    "up to the model's own)"
                    if "length" in str(e)
                    else ""
                )
                raise TeacherError(f"{self.model}: {e}{hint}") from None
        return answers

    def _raw_prompt(self, prompt: str) -> str | dict:
        """A raw prompt as it is. One that starts with the BOS token itself (a chat template's
        `bos_token`, as Magpie's prompts do) goes as tokens: vLLM's tokenizer would add a second
        BOS to the text."""
        if not MARKER.match(prompt):  # only a control token (<s>, <|begin_of_text|>) can be BOS
            return prompt
        tokenizer = self.llm.get_tokenizer()
        bos = getattr(tokenizer, "bos_token", None)
        if not (bos and prompt.startswith(bos)):
            return prompt
        return {"prompt_token_ids": tokenizer.encode(prompt, add_special_tokens=False)}

    def _fill(self, answers: list, indices: list[int], outputs: list) -> None:
        if len(outputs) != len(indices):
            raise RuntimeError(
                f"{self.model}: vLLM answered {len(outputs)} of {len(indices)} requests"
            )
        for i, output in zip(indices, outputs, strict=True):
            answers[i] = self._completion(output)

    def _completion(self, output: Any) -> Completion:
        choice = output.outputs[0]
        reason = choice.finish_reason
        if reason in ("abort", "error"):  # the engine dropped it: nothing to store as an answer
            raise RuntimeError(f"{self.model}: vLLM ended a request with finish_reason {reason!r}")
        tokens_in = len(output.prompt_token_ids or ())
        tokens_out = len(choice.token_ids)
        stop_reason = choice.stop_reason  # the stop string or token id that ended it, if any
        raw = {
            "finish_reason": reason,
            "stop_reason": stop_reason if isinstance(stop_reason, (str, int)) else None,
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out},
        }
        # "stop" covers an end-of-sequence token and a stop string; anything else but "length"
        # (e.g. "repetition") also ended the answer before its budget.
        finish = "length" if reason == "length" else "stop"
        top = first_top(choice)
        return Completion(
            choice.text or "", finish, tokens_in, tokens_out, raw=raw, top_logprobs=top
        )

    # -- teacher forcing (the capture stage; see teachers.scoring) ---------------------------------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[Scored]:
        """All requests go to the engine at once, as token ids, each generating one token and
        returning its prompt's log-probs (`prompt_logprobs`: the k most likely next tokens at every
        position, and the token itself)."""
        return await asyncio.to_thread(self._score, list(requests))

    def _score(self, requests: list[ScoreRequest]) -> list[Scored]:
        tokenizer = self.llm.get_tokenizer()

        def encode_chat(messages: list[dict], header: bool) -> list[int]:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=header, tokenize=False
            )
            return list(tokenizer.encode(text, add_special_tokens=False))

        def encode_text(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        forcings = [teacher_forcing(r, encode_chat, encode_text) for r in requests]
        params = [
            self._vllm.SamplingParams(
                n=1, max_tokens=1, temperature=0.0, prompt_logprobs=r.top_k, detokenize=False
            )
            for r in requests
        ]
        with self._lock:
            try:
                outputs = self.llm.generate(
                    [{"prompt_token_ids": f.ids} for f in forcings],
                    sampling_params=params,
                    use_tqdm=False,
                )
            except (ValueError, *self._request_errors) as e:  # e.g. k above max_logprobs
                hint = (
                    " (raise teacher.engine_args.max_logprobs to training.distill.top_k)"
                    if "logprobs" in str(e)
                    else ""
                )
                raise TeacherError(f"{self.model}: {e}{hint}") from None
        if len(outputs) != len(requests):
            raise RuntimeError(
                f"{self.model}: vLLM answered {len(outputs)} of {len(requests)} requests"
            )
        return [
            scored_from_prompt_logprobs(f, output.prompt_logprobs or [], r.top_k, self.model)
            for f, output, r in zip(forcings, outputs, requests, strict=True)
        ]

    async def aclose(self) -> None:
        # Nothing to release early: the engine is freed with the teacher, and a caller may go on
        # using a teacher that a stage has closed (generate() closes its teacher when it ends).
        return None


def first_top(choice: Any) -> list[tuple[str, float]] | None:
    """The first generated position's top log-probs, most likely first, when they were asked
    for (SamplingParams.logprobs: {token id: Logprob} per position, the sampled token included)."""
    if not getattr(choice, "logprobs", None):
        return None
    first = choice.logprobs[0]
    pairs = [(lp.decoded_token or "", float(lp.logprob)) for lp in first.values()]
    return sorted(pairs, key=lambda p: -p[1])


def request_errors() -> tuple[type[BaseException], ...]:
    """vLLM's exceptions for a request it rejects (VLLMValidationError is no ValueError)."""
    try:
        exceptions = importlib.import_module("vllm.exceptions")
    except ImportError:
        return ()
    found = getattr(exceptions, "VLLMClientError", None) or getattr(
        exceptions, "VLLMValidationError", None
    )
    return (found,) if isinstance(found, type) else ()
