"""The students' answers: the base and the tuned model, loaded one at a time, answer greedily in
batches, and each answer is scored by ROUGE-L and by the NLL of the item's reference.

- rouge_l: ROUGE-L F1 of the greedy answer. Cheap and crude, but it is what Self-Instruct reports.
- nll: mean negative log-likelihood per token of the *reference* given the prompt (teacher-forced).
  It needs no generation, so it shows how much of the teacher's answers the student has learned
  even when its greedy answer drifts. Lower is better.
- kl_teacher: where the teacher's distributions over a held-out answer were captured (logit
  distillation), the mean KL(teacher || student) per answer token, over the teacher's top-k and
  its remaining mass as one bucket (`train.loss.Distillation`, forward KL at temperature 1). How
  close the student's beliefs are to the teacher's, not only its top choice. Lower is better.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..config import Config
from ..model_files import vocabulary_hash
from ..store import Store
from ..student_prompt import prompt_ids, student_prompt
from ..train.data import IGNORE
from ..train.loss import Distillation, loss_sum
from .answers import SECTION_MARKERS, cut_answer, reference_scores, unanswered
from .sets import EvalItem

BATCH_SIZE = 8


def load_student(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation continues every row from its right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[str], style: str, max_new_tokens: int
) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded), each stopped at EOS and cut."""
    ids = [prompt_ids(tokenizer, p, style) for p in prompts]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    eos = model.generation_config.eos_token_id  # None, an id or a list of ids
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted({tokenizer.eos_token_id, *eos}),
        pad_token_id=tokenizer.pad_token_id,
        # A row that has opened a new section is finished (see cut_answer): stop spending on it.
        stop_strings=["\n" + m for m in SECTION_MARKERS],
        tokenizer=tokenizer,
    )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [cut_answer(t) for t in texts]


@torch.no_grad()
def reference_nll(model, tokenizer, prompt: str, reference: str, style: str) -> tuple[float, int]:
    """Mean NLL per token of `reference` + EOS after `prompt` (prompt tokens are not scored), and
    the number of tokens scored. EOS counts: knowing where the answer ends is part of the answer.
    Training's loss scores it: only the reference's positions reach the output head, a chunk at a
    time (with a 262k vocabulary, a long reference's logits would cost gigabytes)."""
    context = prompt_ids(tokenizer, prompt, style)
    target = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = {
        "input_ids": torch.tensor([context + target]),
        "labels": torch.tensor([[IGNORE] * len(context) + target]),
    }
    total, n = loss_sum(model, batch)
    return total.item() / n, n


@torch.no_grad()
def teacher_kl(model, tokenizer, prompt: str, capture, style: str) -> tuple[float, int]:
    """Mean KL(teacher || student) per token of the teacher's answer after `prompt`, over the
    teacher's top-k and a tail bucket, and the number of tokens scored. `capture`: the teacher's
    distributions over its own tokens of the answer (a tutelage.capture CapturedAnswer), which
    are the student's tokens too (same vocabulary)."""
    context = prompt_ids(tokenizer, prompt, style)
    answer = [int(t) for t in capture.answer_ids]
    ids = torch.from_numpy(np.array(capture.topk_ids, dtype=np.int64))
    logprobs = torch.from_numpy(np.array(capture.topk_logprobs, dtype=np.float32))
    width, k = len(context) + len(answer), ids.shape[1]
    teacher_ids, teacher_logprobs = (
        torch.zeros(1, width, k, dtype=torch.long),
        torch.zeros(1, width, k),
    )
    teacher_ids[0, len(context) :], teacher_logprobs[0, len(context) :] = ids, logprobs
    batch = {
        "input_ids": torch.tensor([context + answer]),
        "labels": torch.tensor([[IGNORE] * len(context) + answer]),
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs,
        "teacher_mask": torch.tensor([[False] * len(context) + [True] * len(answer)]),
    }
    kl = Distillation("forward_kl", alpha=0.0, temperature=1.0)
    total, n = loss_sum(model, batch, kl)
    return total.item() / n, n


def held_out_captures(store: Store) -> dict[str, object]:
    """The teacher's captured distributions over the held-out answers, by evaluation item key
    (single exchanges only: a conversation's capture is of its last turn, after turns the
    held-out prompt does not hold). Empty where nothing was captured; a student trained without
    distillation is measured too when its run holds captures."""
    from ..capture.storage import load_captures

    captures = load_captures(store)
    return {
        EvalItem(row["instruction"], row["input"], row["output"]).key: captures[row["instance_id"]]
        for row in store.examples(split="test")
        if row["instance_id"] in captures and not row["messages"]
    }


def model_fingerprint(path: Path, config: Config) -> str:
    """What a model's stored answers depend on: its files (names, sizes, modification times) and
    how it was asked. Any change makes those answers stale."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    parts = [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    parts.append(
        [str(path.resolve()), config.training.prompt_format, config.evaluation.max_new_tokens]
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def answer_with_students(
    store: Store, config: Config, sets: dict[str, list[EvalItem]], models: dict[str, Path], progress
) -> None:
    """Greedy answers, ROUGE-L and the teacher's reference NLL for each student model, and the
    KL to the teacher on the held-out answers it was captured on."""
    style = config.training.prompt_format
    todo = {role: unanswered(store, sets, role) for role in models}
    total, done = sum(map(len, todo.values())), 0
    captures = held_out_captures(store) if any(todo.values()) else {}
    for role, work in todo.items():
        if not work:
            continue
        model, tokenizer = load_student(models[role])  # one model in memory at a time
        # A student of another vocabulary cannot be compared with the teacher token by token.
        # (No hash: a teacher whose tokenizer was not at hand, checked by the capture instead.)
        hashes = {c.teacher_vocab_hash for c in captures.values()} - {""}
        same_vocabulary = bool(captures) and hashes <= {vocabulary_hash(tokenizer)}
        # Similar lengths share a batch: less padding to compute.
        work.sort(key=lambda w: len(w[1].instruction) + len(w[1].input))
        for start in range(0, len(work), BATCH_SIZE):
            batch = work[start : start + BATCH_SIZE]
            prompts = [
                student_prompt(item.instruction, item.input, style, tokenizer) for _, item in batch
            ]
            answers = generate_answers(
                model, tokenizer, prompts, style, config.evaluation.max_new_tokens
            )
            for (name, item), prompt, answer in zip(batch, prompts, answers):
                scores = {
                    **reference_scores(item, answer, config),
                    "nll": None,
                    "n_ref_tokens": None,
                }
                if item.reference is not None:
                    scores["nll"], scores["n_ref_tokens"] = reference_nll(
                        model, tokenizer, prompt, item.reference, style
                    )
                if name == "held_out" and same_vocabulary and item.key in captures:
                    scores["kl_teacher"], _ = teacher_kl(
                        model, tokenizer, prompt, captures[item.key], style
                    )
                store.put_eval_item(
                    name,
                    item.key,
                    role,
                    item.instruction,
                    item.input,
                    item.reference,
                    answer,
                    scores,
                )
            done += len(batch)
            if progress:
                progress(done, total, role)
        del model, tokenizer
        gc.collect()
