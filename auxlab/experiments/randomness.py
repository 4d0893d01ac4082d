"""Random states of the runner: kept around what must not move the caller's, and saved as text in checkpoints."""

from __future__ import annotations

import base64
import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["decode_state", "encode_state", "random_states_kept"]


@contextlib.contextmanager
def random_states_kept(device: torch.device, *, every_cuda_device: bool = False) -> Iterator[None]:
    """Restore torch's (CPU, and ``device``'s or with ``every_cuda_device`` every CUDA device's), NumPy's
    and Python's global random states when the block ends.

    Loading a checkpoint sets the random states of every CUDA device, NumPy and Python: pass
    ``every_cuda_device=True`` where one may be loaded.
    """
    fork_devices = list(range(torch.cuda.device_count())) if every_cuda_device and torch.cuda.is_available() else []
    if device.type == "cuda" and not fork_devices:
        fork_devices = [device.index or 0]
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=fork_devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def encode_state(state: Tensor) -> str:
    """A ``torch.Generator`` state as text, for a checkpoint's counters; :func:`decode_state` reads it back."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_state(text: str) -> Tensor:
    """The ``torch.Generator`` state that :func:`encode_state` wrote."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
