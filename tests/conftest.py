"""Fixtures shared by the tests: a fault-injecting server, a run store, the real tokenizer and a
tiny random Llama that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_server import FaultServer
from helpers import save_tiny_model

from tutelage.store import Store


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "run") as s:
        yield s


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from tutelage.model_files import embedded_teacher_hf

    return AutoTokenizer.from_pretrained(embedded_teacher_hf())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the real tokenizer, as an HF folder (tests must not change
    it)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "base", tokenizer, max_positions=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random students ("base", "tuned") on the embedded teacher's tokenizer."""
    from transformers import AutoTokenizer

    from tutelage.model_files import embedded_teacher_hf

    tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_hf())
    root = tmp_path_factory.mktemp("tiny")
    return {
        "base": save_tiny_model(root / "base", tokenizer, 0),
        "tuned": save_tiny_model(root / "tuned", tokenizer, 1),
    }
