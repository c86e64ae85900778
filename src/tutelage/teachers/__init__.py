"""Teacher backends behind one protocol (`base.Teacher`), and the ledger every request goes through.

Backends are imported only when made, so importing this package needs neither torch nor llama_cpp.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

from ..config import EMBEDDED, TeacherConfig
from .base import Completion, Request, Teacher, TeacherError
from .ledger import BudgetExceeded, Ledger, LedgerResult
from .prices import PriceQuote, price_for

__all__ = [
    "BudgetExceeded",
    "Completion",
    "Ledger",
    "LedgerResult",
    "PriceQuote",
    "Request",
    "Teacher",
    "TeacherError",
    "make_teacher",
    "price_for",
    "speaks_chat",
]


def speaks_chat(config: TeacherConfig) -> bool:
    """Chat messages, or a raw prompt to continue: `teacher.chat`, else chat for every model but
    the embedded 135M one, which loops in chat mode but continues a prompt well."""
    if config.chat is not None:
        return config.chat
    return config.model != EMBEDDED


def make_teacher(config: TeacherConfig) -> Teacher:
    """The backend `config.backend` names, set up from the teacher section of the configuration."""
    backend = config.backend
    if backend == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        if config.model != EMBEDDED:
            raise TeacherError(
                "teacher.backend: llamacpp needs llama-cpp-python "
                "(pip install 'tutelage[llamacpp]'), or use backend: transformers"
            )
        # The embedded teacher also runs on transformers, only slower (about 20 tokens/s here).
        warnings.warn(
            "llama-cpp-python is not installed: the embedded teacher runs on transformers"
        )
        backend = "transformers"
    if backend == "llamacpp":
        from ..model_files import embedded_teacher_gguf
        from .llamacpp import LlamaCppTeacher

        path = (
            embedded_teacher_gguf() if config.model == EMBEDDED else Path(config.model).expanduser()
        )
        return LlamaCppTeacher(path, n_ctx=config.n_ctx, threads=config.threads)
    if backend == "transformers":
        from .hf import TransformersTeacher

        # A batch can hold at most what the ledger keeps in flight.
        return TransformersTeacher(
            config.model, max_batch=config.concurrency, threads=config.threads
        )
    if backend == "openai":
        from .openai import DEFAULT_BASE_URL, OpenAITeacher
        from .openai_batch import OpenAIBatchTeacher

        online = {
            "base_url": config.base_url or DEFAULT_BASE_URL,
            "api_key_env": config.api_key_env,
            "concurrency": config.concurrency,
            "rpm": config.rpm,
            "tpm": config.tpm,
            "timeout_s": config.timeout_s,
            "max_retries": config.max_retries,
            "reasoning_effort": config.reasoning_effort,
        }
        if config.batch:
            return OpenAIBatchTeacher(
                config.model, batch_size=config.batch_size, poll_s=config.batch_poll_s, **online
            )
        return OpenAITeacher(config.model, **online)
    if backend == "vllm":
        from .vllm import VLLMTeacher

        return VLLMTeacher(config.model, engine_args=config.engine_args)
    raise ValueError(f"teacher.backend: unknown backend {config.backend!r}")
