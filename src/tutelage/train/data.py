"""The training data: rows -> token ids with the loss masked to the response, a batch plan fixed
up front (shuffled epochs, grouped by length), and the tensors of one micro-batch (padded or
packed)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..student_prompt import prompt_ids, student_prompt

IGNORE = -100  # label of a token that carries no loss (prompt and padding)
MEGABATCH = 50  # batches sorted by length together: low padding, yet still a shuffled order


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the response and its EOS
    truncated: bool = False  # the response was cut to fit max_seq_len

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
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("training.prompt_format: chat, but the student has no chat template")

    def render(turns: list[dict], header: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=header)

    text = render(messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[: k + 1], False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the student's chat template renders turns inconsistently")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_seq_len]
    labels = [
        token if any(a <= start < b for a, b in spans) else IGNORE
        for token, (start, _) in zip(ids, encoded["offset_mapping"])
    ]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Example(ids, labels, truncated=len(encoded["input_ids"]) > max_seq_len)


def tokenize_examples(
    tokenizer, rows: list[dict], style: str, max_seq_len: int
) -> tuple[list[Example], int, int]:
    """(examples, dropped, truncated)."""
    examples, dropped, truncated = [], 0, 0
    for row in rows:
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

    return {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
        "labels": torch.tensor([pad(e.labels, IGNORE) for e in examples]),
    }


def pack(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: the examples end to end in one row, positions restarting at each. The model
    reads the restarts as sequence boundaries (transformers' packed-sequence masks, or varlen
    flash attention), so no token attends across examples and no compute goes to padding."""
    labels = [[IGNORE, *e.labels[1:]] for e in examples]  # never predict across a boundary
    return {
        "input_ids": torch.tensor([[t for e in examples for t in e.input_ids]]),
        "position_ids": torch.tensor([[i for e in examples for i in range(len(e.input_ids))]]),
        "labels": torch.tensor([[t for row in labels for t in row]]),
    }
