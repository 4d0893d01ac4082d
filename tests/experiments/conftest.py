"""Fixtures of the experiments' tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from auxlab.generators import GENERATORS


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """The models here are tiny: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Unregister the strategies a test registers."""
    before = dict(GENERATORS)
    yield
    GENERATORS.clear()
    GENERATORS.update(before)
