"""Builders shared by the tests: tiny random models and examples stored as the stages store them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tutelage.store import Store


def save_tiny_model(path: Path, tokenizer, seed: int = 0, max_positions: int = 1024) -> Path:
    """A 2-layer Llama with random weights and the real tokenizer, saved as an HF folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def add_scripted_request(store: Store, key: str, body: dict) -> None:
    """A finished, free generation request for records to hang on, as a scripted teacher's."""
    store.begin_request(key, "scripted", "teacher", body, "generate")
    store.finish_request(
        key,
        text="",
        finish_reason="stop",
        tokens_in=0,
        tokens_out=0,
        cost_usd=0.0,
        latency_s=0.0,
        attempts=1,
    )


def add_examples(store: Store, examples: list[tuple[str, str, str]], split: str) -> None:
    """Store kept generated examples assigned to `split`, as generation and filter would."""
    key = f"request-{split}"
    add_scripted_request(store, key, {"split": split})
    records = [
        {
            "text": ins,
            "status": "kept",
            "instances": [{"input": inp, "output": out, "status": "kept"}],
        }
        for ins, inp, out in examples
    ]
    ids = set(store.put_batch(store.next_batch_index(), key, "alpaca", records))
    store.set_decisions(
        [
            {
                "id": r["id"],
                "status": "kept",
                "reason": None,
                "nearest_id": None,
                "nearest_score": None,
                "instance_id": r["instance_id"],
                "instance_status": "kept",
                "instance_reason": None,
                "split": split,
            }
            for r in store.machine_records()
            if r["id"] in ids
        ]
    )
