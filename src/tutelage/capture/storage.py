"""How the teacher's captured top-k distributions are stored in a run and loaded back.

The contract the distillation loss relies on:

    load_captures(store) -> dict[int, CapturedAnswer]      # keyed by instances.id

    @dataclass
    class CapturedAnswer:
        answer_ids: np.ndarray      # int32 [n]: the answer's tokens in the teacher's tokenization
        topk_ids: np.ndarray        # int32 [n, k]: the teacher's k most likely next tokens
        topk_logprobs: np.ndarray   # float16 [n, k]: their log-probabilities (natural log,
                                    #   temperature 1, full-vocabulary softmax), descending
        teacher_vocab_hash: str     # model_files.vocabulary_hash of the teacher's tokenizer

Row i of topk_ids / topk_logprobs is the teacher's distribution at the position *before*
answer_ids[i], that is, its prediction of answer_ids[i] given the prompt and answer_ids[:i].
The teacher's remaining mass at row i is 1 - exp(topk_logprobs[i]).sum(). Only kept instances
with a capture are in the dict; the answer is the instance's output (for a conversation, its
last assistant turn), as the teacher tokenizes it alone, then the token its chat template ends an
assistant turn with (teachers.scoring). teacher_vocab_hash is "" when the teacher's tokenizer is
not on this machine (a vLLM server): the capture then checked, answer by answer, that the
student's tokenizer gives the same ids.

Storage: one row per instance in the store's `captures` table (schema 5), the three arrays as
little-endian blobs: 4 + 6k bytes an answer token (124 at k = 20), in the run's one SQLite file, so
a capture commits with the rest of the run and a kill loses nothing stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import Store
from ..teachers.scoring import Scored

ID_TYPE = np.dtype("<i4")
LOGPROB_TYPE = np.dtype("<f2")


@dataclass
class CapturedAnswer:
    answer_ids: np.ndarray  # int32 [n]
    topk_ids: np.ndarray  # int32 [n, k]
    topk_logprobs: np.ndarray  # float16 [n, k]
    teacher_vocab_hash: str

    @property
    def n_tokens(self) -> int:
        return len(self.answer_ids)

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]


def blobs_of(scored: Scored) -> tuple[bytes, bytes, bytes]:
    """The three arrays of a scored answer as little-endian bytes, checked for shape."""
    answer = np.ascontiguousarray(scored.answer_ids, dtype=ID_TYPE)
    ids = np.ascontiguousarray(scored.topk_ids, dtype=ID_TYPE)
    logprobs = np.ascontiguousarray(scored.topk_logprobs, dtype=LOGPROB_TYPE)
    n = len(answer)
    if answer.ndim != 1 or ids.ndim != 2 or ids.shape[0] != n or logprobs.shape != ids.shape:
        raise ValueError(
            f"a scored answer's arrays do not match: answer {answer.shape}, top-k ids "
            f"{ids.shape}, log-probs {logprobs.shape}"
        )
    return answer.tobytes(), ids.tobytes(), logprobs.tobytes()


def save_capture(
    store: Store, instance_id: int, request_key: str, vocab_hash: str, scored: Scored
) -> None:
    """Store one instance's capture (replacing any earlier one), in one transaction."""
    blobs = blobs_of(scored)
    top_k = int(np.shape(scored.topk_ids)[1])
    n_tokens = len(scored.answer_ids)
    store.put_capture(instance_id, request_key, vocab_hash, top_k, n_tokens, blobs)


def captured_answer(row: dict) -> CapturedAnswer:
    """A stored row as arrays (read-only views of the row's bytes)."""
    n, k = row["n_tokens"], row["top_k"]
    return CapturedAnswer(
        answer_ids=np.frombuffer(row["answer_ids"], dtype=ID_TYPE).astype(np.int32, copy=False),
        topk_ids=np.frombuffer(row["topk_ids"], dtype=ID_TYPE)
        .astype(np.int32, copy=False)
        .reshape(n, k),
        topk_logprobs=np.frombuffer(row["topk_logprobs"], dtype=LOGPROB_TYPE)
        .astype(np.float16, copy=False)
        .reshape(n, k),
        teacher_vocab_hash=row["vocab_hash"],
    )


def load_captures(store: Store) -> dict[int, CapturedAnswer]:
    """Every kept instance's capture, by instance id (see the module docstring)."""
    return {row["instance_id"]: captured_answer(row) for row in store.captures()}


def bytes_per_token(store: Store) -> float | None:
    """What the stored captures take per answer token (their arrays' bytes), or None if none."""
    totals = store.capture_totals()
    return totals["bytes"] / totals["tokens"] if totals["tokens"] else None
