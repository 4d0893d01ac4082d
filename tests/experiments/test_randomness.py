"""Random states: kept around what must not move the caller's, and written as text in checkpoints."""

from __future__ import annotations

import random

import numpy as np
import torch

from auxlab.experiments.randomness import decode_state, encode_state, random_states_kept


def test_a_generator_state_survives_its_text() -> None:
    generator = torch.Generator().manual_seed(3)
    torch.rand(5, generator=generator)
    text = encode_state(generator.get_state())
    assert isinstance(text, str) and text.isascii()
    expected = torch.rand(4, generator=generator)
    restored = torch.Generator()
    restored.set_state(decode_state(text))
    assert torch.equal(torch.rand(4, generator=restored), expected)


def test_random_states_kept_restores_torch_numpy_and_python() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with random_states_kept(torch.device("cpu")):
        torch.manual_seed(99)
        np.random.seed(99)
        random.seed(99)
        torch.rand(7), np.random.rand(7), random.random()
    after = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
