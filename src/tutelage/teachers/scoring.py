"""Teacher forcing: the teacher reads a conversation it is given, instead of writing one, and says
at every answer token what it would have predicted there.

The optional half of the teacher protocol (`teachers.base`): a backend that can score has
`async score(requests: Sequence[ScoreRequest]) -> list[Scored]`. For each request it reads the
conversation in its own chat template and returns, at each answer token, its k most likely next
tokens and their log-probs (natural log, temperature 1, normalised over the whole vocabulary).
`require_scoring` gives the one-line error for a backend without it.

Which tokens are the answer is decided here, once for every backend (`teacher_forcing`), from two
functions each backend provides: the token ids of messages in its chat template, and of plain text.
The answer is the conversation's last turn, an assistant's; the prompt is every turn before it in
the teacher's chat template, through the assistant's header. The answer's tokens are its text
tokenized alone (special tokens written in it read as such, as the training data tokenizes a
response), then the one token the template ends an assistant turn with (<|im_end|>, <|eot_id|>,
<end_of_turn>, ...). A multi-turn conversation's earlier assistant turns are part of the prompt:
only the last is scored (distillation trains on it; the earlier turns keep plain cross-entropy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import TeacherError, canonical_json, request_key

if TYPE_CHECKING:
    import numpy as np

# The ids of chat messages in the teacher's template (True: end with the assistant's header).
EncodeChat = Callable[[list[dict], bool], list[int]]
# The ids of plain text, no BOS added (special tokens written in the text read as such).
EncodeText = Callable[[str], list[int]]


@dataclass(frozen=True)
class ScoreRequest:
    """A conversation for the teacher to score: its last turn, an assistant's, is the answer."""

    messages: tuple[tuple[str, str], ...]  # ((role, content), ...), hashable
    top_k: int = 20

    @classmethod
    def make(cls, messages: Sequence[dict], *, top_k: int = 20) -> ScoreRequest:
        return cls(tuple((m["role"], m["content"]) for m in messages), top_k)

    def message_dicts(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def canonical(self, backend: str, model: str) -> dict:
        """What makes two score requests the same: the basis of the ledger key (its own shape, so
        it never equals a generation request's)."""
        return {
            "backend": backend,
            "model": model,
            "score": {"messages": self.message_dicts(), "top_k": self.top_k},
        }

    def canonical_json(self, backend: str, model: str) -> str:
        return canonical_json(self.canonical(backend, model))

    def key(self, backend: str, model: str) -> str:
        return request_key(self.canonical_json(backend, model))

    def estimated_tokens(self) -> int:
        """An upper-leaning guess of the tokens read, for the budget (as prices.py guesses)."""
        return sum(math.ceil(len(c.encode("utf-8")) / 3) + 8 for _, c in self.messages)


@dataclass
class Scored:
    """What the teacher said about one request's answer tokens (see tutelage.capture.storage)."""

    answer_ids: np.ndarray  # int32 [n]
    topk_ids: np.ndarray  # int32 [n, k]: row i predicts answer_ids[i]
    topk_logprobs: np.ndarray  # float16 [n, k], most likely first
    tokens_in: int  # tokens the teacher read: the whole sequence


@dataclass
class Forcing:
    """One request as token ids, and where its answer's tokens are."""

    ids: list[int]
    positions: list[int]  # indices into ids of the answer's tokens, in order, each >= 1

    @property
    def answer_ids(self) -> list[int]:
        return [self.ids[p] for p in self.positions]


class ScoringError(TeacherError):
    """A request that cannot be scored as asked (the template does not write it as it is)."""


def require_scoring(teacher: Any) -> None:
    """Raise TeacherError, one line, unless `teacher` can score given answers."""
    if not callable(getattr(teacher, "score", None)):
        raise TeacherError(
            f"teacher.backend: {teacher.backend} cannot score given answers (teacher forcing), "
            "which training.distill needs; use llamacpp, transformers, vllm, or a vLLM server "
            "(backend openai with base_url)"
        )


def teacher_forcing(
    request: ScoreRequest, encode_chat: EncodeChat, encode_text: EncodeText
) -> Forcing:
    """The token ids the teacher reads for `request`, and which of them are the answer."""
    messages = request.message_dicts()
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ScoringError("a score request is a conversation that ends with the answer to score")
    prompt = encode_chat(messages[:-1], True)
    if not prompt:
        raise ScoringError("the teacher's chat template wrote nothing before the answer")
    answer = encode_text(messages[-1]["content"])
    ids = [*prompt, *answer, end_of_turn(messages, prompt, answer, encode_chat)]
    return Forcing(ids, list(range(len(prompt), len(ids))))


def end_of_turn(
    messages: list[dict], prompt: list[int], answer: list[int], encode_chat: EncodeChat
) -> int:
    """The token the template writes right after an assistant's words."""
    whole = encode_chat(messages, False)
    n = len(prompt) + len(answer)
    if whole[: len(prompt)] != prompt or whole[len(prompt) : n] != answer or len(whole) <= n:
        raise ScoringError(
            "the teacher's chat template does not write the answer as the answer alone "
            "tokenizes, so the token that ends its turn cannot be found"
        )
    return whole[n]


# -- top-k rows, from logits or from vLLM's prompt log-probs ---------------------------------------
def top_k_of_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, k], log-probs float16 [n, k]) of rows of logits [n, vocab], most likely
    first."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float32)
    k = min(k, logits.shape[-1])
    top = logits.max(axis=-1, keepdims=True)
    log_norm = top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    ids = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, ids, axis=-1), axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1)
    values = np.take_along_axis(logits, ids, axis=-1) - log_norm
    return ids.astype(np.int32), values.astype(np.float16)


def scored_from_prompt_logprobs(
    forcing: Forcing, prompt_logprobs: Sequence[Mapping | None], k: int, where: str
) -> Scored:
    """A Scored from vLLM's prompt log-probs: one entry per token of the sequence, None first,
    then a mapping of token id (int, or str in JSON) to its log-prob (a vLLM Logprob, or a dict
    with `logprob` and `rank`), holding the k most likely tokens and the token itself."""
    import numpy as np

    if len(prompt_logprobs) != len(forcing.ids):
        raise TeacherError(
            f"{where}: prompt_logprobs has {len(prompt_logprobs)} entries for "
            f"{len(forcing.ids)} tokens"
        )
    ids = np.zeros((len(forcing.positions), k), dtype=np.int32)
    values = np.zeros((len(forcing.positions), k), dtype=np.float32)
    for row, position in enumerate(forcing.positions):
        entry = prompt_logprobs[position]
        if not entry:
            raise TeacherError(f"{where}: no prompt log-probs at position {position}")
        candidates = sorted(
            (_rank(v, 0), -_logprob(v), int(t)) for t, v in entry.items()
        )  # by rank, else by log-prob; a token ranked below k is the token itself
        best = [c for c in candidates if c[0] == 0 or c[0] <= k][:k]
        best.sort(key=lambda c: (c[1], c[2]))
        if len(best) < k:
            raise TeacherError(
                f"{where}: {len(best)} prompt log-probs at a position, not {k} "
                "(the server's --max-logprobs may be lower than training.distill.top_k)"
            )
        ids[row] = [c[2] for c in best]
        values[row] = [-c[1] for c in best]
    answer = np.asarray(forcing.answer_ids, dtype=np.int32)
    return Scored(answer, ids, values.astype(np.float16), tokens_in=len(forcing.ids))


def _logprob(value: Any) -> float:
    raw = value["logprob"] if isinstance(value, Mapping) else getattr(value, "logprob", value)
    return float(raw)


def _rank(value: Any, default: int) -> int:
    raw = value.get("rank") if isinstance(value, Mapping) else getattr(value, "rank", None)
    return default if raw is None else int(raw)
