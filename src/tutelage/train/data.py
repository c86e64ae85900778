"""The training data: rows -> token ids with the loss masked to the response, a batch plan fixed
up front (shuffled epochs, grouped by length), and the tensors of one micro-batch (padded or
packed).

With distillation an example also carries the teacher's top-k next-token log-probs at its
response tokens (`TeacherTargets`), and its response is the teacher's own tokens of the answer
(the capture's `answer_ids`), so that row i of the capture lines up with response token i."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..student_prompt import prompt_ids, student_prompt

IGNORE = -100  # label of a token that carries no loss (prompt and padding)
MEGABATCH = 50  # batches sorted by length together: low padding, yet still a shuffled order


@dataclass
class TeacherTargets:
    """The teacher's distributions at tokens start, start + 1, ...: row i holds its top-k ids and
    log-probs for predicting token start + i of the example (laid out like the labels)."""

    start: int
    ids: torch.Tensor  # int64 (n, k)
    logprobs: torch.Tensor  # float32 (n, k)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the response and its EOS
    truncated: bool = False  # the response was cut to fit max_seq_len
    teacher: TeacherTargets | None = None  # distillation: the teacher's top-k at the response

    @property
    def n_targets(self) -> int:  # the tokens that carry loss (the first one never does)
        return sum(label != IGNORE for label in self.labels[1:])


def tokenize_example(tokenizer, row: dict, style: str, max_seq_len: int) -> Example | None:
    """Prompt and response tokenized apart, then joined, so the loss mask falls exactly on the
    boundary. The response is cut to fit `max_seq_len`; None when the prompt alone fills it.

    A multi-turn conversation (`row["messages"]`) trains on every assistant turn with the chat
    format; with any other format only its first exchange (instruction, output) is used."""
    if style == "chat" and row.get("messages"):
        return tokenize_conversation(tokenizer, row["messages"], max_seq_len)
    prompt = prompt_ids(
        tokenizer,
        student_prompt(row["instruction"], row["input"], style=style, tokenizer=tokenizer),
        style,
    )
    room = max_seq_len - len(prompt)
    if room <= 0:
        return None
    target = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    target += [tokenizer.eos_token_id]
    cut = target[:room]
    return Example(prompt + cut, [IGNORE] * len(prompt) + cut, truncated=len(cut) < len(target))


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_len: int) -> Example | None:
    """The whole conversation in the student's chat template, the loss on each assistant turn
    (its text and the template's end of turn) and nowhere else; cut to `max_seq_len`. None when
    not one assistant token fits.

    Each assistant turn's span is found in characters, as the difference between the text
    rendered up to its header and the text rendered through it, then mapped onto tokens of the
    whole text: tokenizing the turns apart and joining them could split tokens differently."""
    whole, labels = conversation_tokens(tokenizer, messages)
    ids, labels = whole[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Example(ids, labels, truncated=len(whole) > max_seq_len)


def conversation_tokens(
    tokenizer, messages: list[dict], header: bool = False
) -> tuple[list[int], list[int]]:
    """The conversation's token ids in the student's chat template (followed by the assistant's
    header when `header`), and their labels: the token on each assistant turn, IGNORE elsewhere."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("training.prompt_format: chat, but the student has no chat template")

    def render(turns: list[dict], header: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=header)

    text = render(messages, header)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the student's chat template renders turns inconsistently")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(a <= start < b for a, b in spans) else IGNORE
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return encoded["input_ids"], labels


def tokenize_distilled(
    tokenizer, row: dict, style: str, max_seq_len: int, capture, top_k: int | None = None
) -> Example | None:
    """An example whose response is the teacher's answer as the teacher scored it: the student's
    prompt in its own format, then the capture's `answer_ids` (the teacher's tokens, ending with
    its end-of-turn token), each with the teacher's `top_k` most likely tokens at that position
    (`capture`: a tutelage.capture.storage.CapturedAnswer; None: all it holds). Cut like
    `tokenize_example`.

    A conversation in the chat format keeps its earlier assistant turns as cross-entropy targets;
    the teacher scored its last one, which is the response here."""
    messages = row.get("messages") or []
    if style == "chat" and len(messages) > 1 and messages[-1]["role"] == "assistant":
        prompt, labels = conversation_tokens(tokenizer, messages[:-1], header=True)
    else:
        prompt = prompt_ids(
            tokenizer,
            student_prompt(row["instruction"], row["input"], style=style, tokenizer=tokenizer),
            style,
        )
        labels = [IGNORE] * len(prompt)
    room = max_seq_len - len(prompt)
    if room <= 0:
        return None
    answer = [int(t) for t in capture.answer_ids]
    cut = answer[:room]
    teacher = TeacherTargets(
        start=len(prompt),
        ids=torch.from_numpy(np.array(capture.topk_ids[: len(cut), :top_k], dtype=np.int64)),
        logprobs=torch.from_numpy(
            np.array(capture.topk_logprobs[: len(cut), :top_k], dtype=np.float32)
        ),
    )
    return Example(prompt + cut, labels + cut, truncated=len(cut) < len(answer), teacher=teacher)


def tokenize_examples(
    tokenizer,
    rows: list[dict],
    style: str,
    max_seq_len: int,
    captures: dict | None = None,
    top_k: int | None = None,
) -> tuple[list[Example], int, int]:
    """(examples, dropped, truncated). With `captures` (instance id -> CapturedAnswer), a row the
    teacher scored becomes a distillation example (`tokenize_distilled`); the others stay plain."""
    examples, dropped, truncated = [], 0, 0
    for row in rows:
        capture = (captures or {}).get(row.get("instance_id"))
        if capture is not None:
            ex = tokenize_distilled(tokenizer, row, style, max_seq_len, capture, top_k)
        else:
            ex = tokenize_example(tokenizer, row, style, max_seq_len)
        if ex is None:
            dropped += 1
            continue
        truncated += ex.truncated
        examples.append(ex)
    return examples, dropped, truncated


def batch_plan(lengths: list[int], batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """The first `n_batches` batches of example indices, epoch after epoch. Each epoch is
    shuffled and cut into mega-batches of MEGABATCH batches; each mega-batch is sorted by length,
    cut into batches (the last of an epoch may be short), and those are shuffled.
    Why: similar lengths in a batch waste little compute on padding."""
    rng = random.Random(seed)
    plan: list[list[int]] = []
    while len(plan) < n_batches:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        for start in range(0, len(epoch), MEGABATCH * batch_size):
            mega = sorted(epoch[start : start + MEGABATCH * batch_size], key=lambda i: -lengths[i])
            batches = [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
            rng.shuffle(batches)
            plan += batches
    return plan[:n_batches]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: padding is masked from attention and from the loss."""
    width = max(len(e.input_ids) for e in examples)

    def pad(seq: list[int], value: int) -> list[int]:
        return seq + [value] * (width - len(seq))

    batch = {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
        "labels": torch.tensor([pad(e.labels, IGNORE) for e in examples]),
    }
    return batch | teacher_tensors([[(0, e)] for e in examples], width)


def pack(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: the examples end to end in one row, positions restarting at each. The model
    reads the restarts as sequence boundaries (transformers' packed-sequence masks, or varlen
    flash attention), so no token attends across examples and no compute goes to padding."""
    labels = [[IGNORE, *e.labels[1:]] for e in examples]  # never predict across a boundary
    offsets = [sum(len(e.input_ids) for e in examples[:i]) for i in range(len(examples))]
    batch = {
        "input_ids": torch.tensor([[t for e in examples for t in e.input_ids]]),
        "position_ids": torch.tensor([[i for e in examples for i in range(len(e.input_ids))]]),
        "labels": torch.tensor([[t for row in labels for t in row]]),
    }
    return batch | teacher_tensors([list(zip(offsets, examples))], batch["labels"].shape[1])


def teacher_tensors(rows: list[list[tuple[int, Example]]], width: int) -> dict[str, torch.Tensor]:
    """The teacher's targets of a batch, laid out like its labels (batch, width): `teacher_ids`
    and `teacher_logprobs` (batch, width, k), zero where the teacher scored nothing, and
    `teacher_mask`, whether it scored the token. `rows`: each batch row's examples with the
    offset each starts at. Nothing when no example carries a teacher."""
    given = [e.teacher for row in rows for _, e in row if e.teacher is not None]
    if not given:
        return {}
    k = given[0].ids.shape[1]
    ids = torch.zeros(len(rows), width, k, dtype=torch.long)
    logprobs = torch.zeros(len(rows), width, k)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        for offset, example in row:
            if (teacher := example.teacher) is None:
                continue
            where = slice(offset + teacher.start, offset + teacher.start + len(teacher.ids))
            ids[b, where], logprobs[b, where], mask[b, where] = teacher.ids, teacher.logprobs, True
    return {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_mask": mask}
