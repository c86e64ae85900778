"""The one small protocol every teacher backend speaks.

A backend takes a batch of requests (a raw prompt for completion models, or chat messages) with
sampling parameters, and returns for each the text, why it stopped, and the tokens it used.
Everything else (caching, retries bookkeeping, cost, budget) lives around it, in the ledger.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable


@dataclass(frozen=True)
class Request:
    """One thing to ask the teacher. Exactly one of `prompt` and `messages` is set."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...), hashable
    sampling: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs, hashable
    # Distinguishes several samples of the same prompt, so each is its own ledger entry.
    sample_index: int = 0
    # > 0: also return the k most likely first tokens with their log-probs
    # (Completion.top_logprobs), as a log-prob judge reads its one-token verdict.
    top_logprobs: int = 0

    @classmethod
    def make(
        cls,
        *,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        sampling: dict | None = None,
        sample_index: int = 0,
        top_logprobs: int = 0,
    ) -> Request:
        if (prompt is None) == (messages is None):
            raise ValueError("a teacher request needs exactly one of prompt and messages")
        msgs = tuple((m["role"], m["content"]) for m in messages) if messages is not None else None
        clean = {k: v for k, v in (sampling or {}).items() if v is not None}
        if "stop" in clean:
            clean["stop"] = tuple(clean["stop"])
        return cls(prompt, msgs, tuple(sorted(clean.items())), sample_index, top_logprobs)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def message_dicts(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]

    def params(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.sampling}

    def canonical(self, backend: str, model: str) -> dict:
        """What makes two requests the same request: the basis of the ledger key."""
        return {
            "backend": backend,
            "model": model,
            "prompt": self.prompt,
            "messages": self.message_dicts() if self.messages is not None else None,
            "sampling": self.params(),
            "sample_index": self.sample_index,
            # Only when asked for: the keys of every other request stay what they were.
            **({"top_logprobs": self.top_logprobs} if self.top_logprobs else {}),
        }

    def canonical_json(self, backend: str, model: str) -> str:
        """The canonical request as JSON text: what the ledger stores, and hashes for the key."""
        return canonical_json(self.canonical(backend, model))

    def key(self, backend: str, model: str) -> str:
        return request_key(self.canonical_json(backend, model))


def canonical_json(canonical: dict) -> str:
    """A canonical request (`Request.canonical`, `ScoreRequest.canonical`) as JSON text."""
    return json.dumps(canonical, sort_keys=True, ensure_ascii=False)


def request_key(canonical_json: str) -> str:
    """The ledger key of a request: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(canonical_json.encode("utf-8")).hexdigest()


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop", "length", ..., or one of EMPTY_REASONS (then text is "")
    tokens_in: int
    tokens_out: int
    raw: dict | None = field(default=None, repr=False)  # the backend's response, for the ledger
    # Hidden reasoning tokens (o-series, gpt-5): already part of tokens_out, billed as output.
    reasoning_tokens: int = 0
    # The server reported no usage: the tokens were counted (or estimated) here, so the cost is an
    # estimate. HTTP backends also say so in raw["usage_estimated"], which the ledger stores.
    usage_estimated: bool = False
    # The first generated token's most likely candidates, [(token text, log-prob), ...] most
    # likely first, when the request asked for them (Request.top_logprobs); else None. Kept in
    # `raw` too, which the ledger stores: a resumed run reads them back instead of asking again.
    top_logprobs: list[tuple[str, float]] | None = None

    # Why an answer has no text: cut at the token limit before any (a reasoning model that spent
    # it all thinking), filtered, refused (a model's `refusal`), or null content. Never "" alone.
    EMPTY_REASONS: ClassVar[frozenset[str]] = frozenset(
        {"length_empty", "content_filter", "refusal", "null_content"}
    )

    def __post_init__(self) -> None:
        # Rebuilt from a stored row (text, counts, raw), as the ledger's cache does: the raw
        # record brings these back.
        if self.raw:
            self.reasoning_tokens = self.reasoning_tokens or self.raw.get("reasoning_tokens", 0)
            self.usage_estimated = self.usage_estimated or self.raw.get("usage_estimated", False)
            if self.top_logprobs is None and self.raw.get("top_logprobs") is not None:
                self.top_logprobs = [(t, float(lp)) for t, lp in self.raw["top_logprobs"]]
        if self.top_logprobs is not None and (self.raw or {}).get("top_logprobs") is None:
            self.raw = {**(self.raw or {}), "top_logprobs": [list(p) for p in self.top_logprobs]}

    def to_dict(self) -> dict:
        return asdict(self)


def top_logprobs_of(logits, k: int, token_text: Callable[[int], str]) -> list[tuple[str, float]]:
    """The k most likely next tokens of one row of logits, as (text, log-prob) pairs, most likely
    first: what a local backend returns for Request.top_logprobs."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    logprobs = logits - np.logaddexp.reduce(logits)
    best = np.argsort(-logprobs, kind="stable")[:k]
    return [(token_text(int(i)), float(logprobs[i])) for i in best]


class TeacherError(RuntimeError):
    """A request that cannot succeed by retrying (bad key, unknown model, bad request)."""


@runtime_checkable
class Teacher(Protocol):
    backend: str  # "openai", "llamacpp", ...
    model: str  # the model's name as the ledger records it

    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer every request, in order. Raise TeacherError on a non-retryable failure."""
        ...

    async def aclose(self) -> None: ...

    # Optional, not part of the protocol: `async score(requests: Sequence[ScoreRequest]) ->
    # list[Scored]`, the teacher's top-k log-probs over given answers (teacher forcing, for the
    # capture stage; see teachers.scoring). scoring.require_scoring says when a backend lacks it.
