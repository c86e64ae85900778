"""Fixtures shared by the teacher tests: a fault-injecting server and a run store."""

from __future__ import annotations

import pytest

from fault_server import FaultServer
from tutelage.store import Store


@pytest.fixture
def server():
    with FaultServer() as s:
        yield s


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "run") as s:
        yield s
