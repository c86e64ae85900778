"""The students' answers: the base and the tuned model, loaded one at a time, answer greedily in
batches, and each answer is scored by ROUGE-L and by the NLL of the item's reference.

- rouge_l: ROUGE-L F1 of the greedy answer. Cheap and crude, but it is what Self-Instruct reports.
- nll: mean negative log-likelihood per token of the *reference* given the prompt (teacher-forced).
  It needs no generation, so it shows how much of the teacher's answers the student has learned
  even when its greedy answer drifts. Lower is better.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..config import Config
from ..store import Store
from ..student_prompt import prompt_ids, student_prompt
from ..train.data import IGNORE
from ..train.loss import loss_sum
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
    """Greedy answers, ROUGE-L and the teacher's reference NLL for each student model."""
    style = config.training.prompt_format
    todo = {role: unanswered(store, sets, role) for role in models}
    total, done = sum(map(len, todo.values())), 0
    for role, work in todo.items():
        if not work:
            continue
        model, tokenizer = load_student(models[role])  # one model in memory at a time
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
