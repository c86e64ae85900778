"""The capture stage: with `training.distill` set, the teacher scores every kept example's answer
under teacher forcing, and its top-k next-token log-probs at each answer token are stored for the
distillation loss (`capture.storage`; the loss is `train.loss`).

- What the teacher reads: the example as a conversation in its own chat template, the answer last
  (`teachers.scoring`). Every local backend scores; so does a vLLM server (its prompt_logprobs),
  and a chat-only API says in one line that it cannot.
- The same vocabulary first: the student's and the teacher's tokenizers are compared before
  anything is scored (`model_files.check_same_vocabulary`). A student made from the teacher
  (`student.from_teacher`) has the teacher's own tokenizer. A teacher whose tokenizer is not on
  this machine (a vLLM server) is checked answer by answer instead: the student's tokenizer must
  give the teacher's ids for each answer's text.
- Resumable: every example is one ledger request (recorded before it is sent, its tokens and cost
  when answered), and its capture is stored with that request's key. A rerun scores only the
  examples without a capture of the current key; a changed teacher or top_k drops the stale ones
  and scores them again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import EMBEDDED, Config, TeacherConfig
from ..model_files import (
    cache_dir,
    check_same_vocabulary,
    embedded_teacher_hf,
    is_hub_id,
    resolve_student,
    vocabulary_hash,
)
from ..stage_results import CaptureResult
from ..store import Store
from ..teachers import Ledger, make_teacher, price_for
from ..teachers.scoring import Scored, ScoreRequest, require_scoring
from .storage import bytes_per_token, save_capture

SPLITS = ("train", "valid", "test")


def capture(store: Store, config: Config, progress=None, teacher=None) -> CaptureResult:
    """Score every kept example without a capture, store what the teacher said (see the module
    docstring). `progress(done, total, info)` is called as examples are stored; `teacher`: an
    already made teacher (tests), else config.teacher's."""
    distill = config.training.distill
    if distill is None:
        raise ValueError(
            "training.distill is not set: there is nothing to capture (set training.distill, "
            "e.g. {loss: forward_kl}, to distil the teacher's distributions)"
        )
    rows = [r for r in store.examples() if r["split"] in SPLITS]
    requests = {r["instance_id"]: score_request(r, distill.top_k) for r in rows}
    if not requests:
        return result_of(store, CaptureResult(top_k=distill.top_k))
    vocab_hash, student_tokenizer = same_vocabulary(config)
    teacher = teacher or make_teacher(config.teacher)
    require_scoring(teacher)
    keys = {i: r.key(teacher.backend, teacher.model) for i, r in requests.items()}
    stored = store.capture_keys()
    store.drop_captures(i for i, key in stored.items() if keys.get(i) != key)
    todo = [i for i in requests if stored.get(i) != keys[i]]
    answers = {i: r.messages[-1][1] for i, r in requests.items()}  # the text each answer is

    price = price_for(
        config.teacher.backend, teacher.model, config.teacher.price, batch=config.teacher.batch
    )
    ledger = Ledger(
        teacher,
        store,
        price=price,
        budget_usd=config.generation.budget_usd,  # the run's budget
        concurrency=config.teacher.concurrency,
    )
    spent_before = ledger.spent_usd
    # Requests per call: what a local backend takes at once, or what a server takes in parallel.
    size = max(getattr(teacher, "max_batch", 1), config.teacher.concurrency)
    done = len(requests) - len(todo)
    scored_tokens = 0
    start = time.perf_counter()
    if progress:
        progress(done, len(requests), "")

    async def score_all() -> None:
        nonlocal done, scored_tokens
        try:
            for first in range(0, len(todo), size):
                chunk = todo[first : first + size]

                def save(i: int, key: str, scored: Scored, chunk: list[int] = chunk) -> None:
                    if student_tokenizer is not None:
                        check_answer(student_tokenizer, answers[chunk[i]], scored, chunk[i])
                    save_capture(store, chunk[i], key, vocab_hash, scored)

                scored = await ledger.score_many([requests[i] for i in chunk], save)
                done += len(chunk)
                scored_tokens += sum(len(s.answer_ids) for s in scored)
                if progress:
                    rate = scored_tokens / max(time.perf_counter() - start, 1e-9)
                    progress(done, len(requests), f"{rate:.0f} answer tok/s")
        finally:
            await teacher.aclose()

    if todo:
        asyncio.run(score_all())
    seconds = time.perf_counter() - start
    return result_of(
        store,
        CaptureResult(
            teacher=f"{teacher.backend} {teacher.model}",
            top_k=distill.top_k,
            examples=len(requests),
            scored=len(todo),
            scored_tokens=scored_tokens,
            tokens_per_s=scored_tokens / seconds if todo and seconds > 0 else None,
            seconds=seconds,
            cost_usd=ledger.spent_usd - spent_before,
        ),
    )


def result_of(store: Store, result: CaptureResult) -> CaptureResult:
    """`result` with the stored totals filled in."""
    totals = store.capture_totals()
    result.captured, result.tokens, result.bytes = (
        totals["captures"],
        totals["tokens"],
        totals["bytes"],
    )
    result.bytes_per_token = bytes_per_token(store)
    return result


def score_request(row: dict, top_k: int) -> ScoreRequest:
    """What the teacher reads for a kept example: its conversation, or its one exchange (the
    user's turn as the chat format writes it, `student_prompt`), the answer last."""
    if row.get("messages"):
        return ScoreRequest.make(row["messages"], top_k=top_k)
    content = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": row["output"]},
    ]
    return ScoreRequest.make(messages, top_k=top_k)


# -- the same vocabulary ---------------------------------------------------------------------
def same_vocabulary(config: Config) -> tuple[str, Any]:
    """(the teacher's vocabulary hash, "" when its tokenizer is not on this machine; the
    student's tokenizer when each answer must be checked instead, else None). Raises ValueError,
    one line, when the student's and the teacher's vocabularies differ."""
    from transformers import AutoTokenizer

    teacher_tokenizer = load_teacher_tokenizer(config.teacher)
    if config.student.from_teacher is not None:  # the teacher pruned keeps its tokenizer
        return (vocabulary_hash(teacher_tokenizer) if teacher_tokenizer else ""), None
    student_tokenizer = AutoTokenizer.from_pretrained(resolve_student(config.student.model))
    if teacher_tokenizer is None:
        return "", student_tokenizer
    check_same_vocabulary(student_tokenizer, teacher_tokenizer)
    return vocabulary_hash(teacher_tokenizer), None


def load_teacher_tokenizer(teacher: TeacherConfig):
    """The teacher's tokenizer where it is on this machine: a GGUF file's (read from its
    metadata), an HF folder's, a Hub id's (from the Hub cache); None for a model behind a server
    (backend openai), or one whose tokenizer cannot be had."""
    from transformers import AutoTokenizer

    model = teacher.model
    if model == EMBEDDED:  # its HF folder, made once, holds the GGUF's tokenizer
        return AutoTokenizer.from_pretrained(embedded_teacher_hf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    if teacher.backend == "openai" or not is_hub_id(model):
        return None
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):  # not in the Hub cache, and the Hub out of reach
        return None


def gguf_tokenizer(gguf: Path):
    """A GGUF file's tokenizer, saved once into the cache: transformers reads it from the GGUF
    in tens of seconds, and from the saved folder in one."""
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return tokenizer


def check_answer(student_tokenizer, output: str, scored: Scored, instance_id: int) -> None:
    """The teacher's ids of an answer's text must be the student's (the answer's last id is the
    teacher's end of turn). Raises ValueError, one line."""
    text_ids = [int(t) for t in scored.answer_ids[:-1]]
    if student_tokenizer(output, add_special_tokens=False)["input_ids"] != text_ids:
        raise ValueError(
            f"the teacher and student.model tokenize example {instance_id}'s answer differently: "
            "logit distillation needs the same tokenizer; use a student of the teacher's family"
        )
