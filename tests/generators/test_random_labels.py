"""RandomLabels (``auxlab/generators/random_labels.py``): a seeded, uniform random sub-class per training sample."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from auxlab import HierarchyMask
from auxlab.generators import RandomLabels
from tests.generators.generator_helpers import MASK, assert_inside_blocks


# ------------------------------------------------------------------------------ RandomLabels
def test_random_labels_are_seeded() -> None:
    def table(seed: int) -> Tensor:
        return RandomLabels(MASK, num_samples=100, seed=seed).table

    assert torch.equal(table(3), table(3))
    assert not torch.equal(table(3), table(4))


@given(psi=st.lists(st.integers(1, 7), min_size=1, max_size=12), data=st.data())
def test_random_labels_stay_inside_the_block(psi: list[int], data: st.DataObject) -> None:
    mask = HierarchyMask(psi)
    num_samples = data.draw(st.integers(1, 50))
    batch_size = data.draw(st.integers(1, 8))
    index = torch.tensor(data.draw(st.lists(st.integers(0, num_samples - 1), min_size=batch_size, max_size=batch_size)))
    y = torch.tensor(data.draw(st.lists(st.integers(0, len(psi) - 1), min_size=batch_size, max_size=batch_size)))

    targets = RandomLabels(mask, num_samples=num_samples, seed=data.draw(st.integers(0, 2**31)))(
        torch.zeros(batch_size, 1), y, index=index
    )

    assert_inside_blocks(targets, mask, y)


def test_random_labels_are_roughly_uniform_over_sub_classes() -> None:
    mask = HierarchyMask([2, 5, 3])
    num_samples = 30_000
    y = torch.arange(num_samples) % 3
    targets = RandomLabels(mask, num_samples=num_samples, seed=0)(
        torch.zeros(num_samples, 1), y, index=torch.arange(num_samples)
    )
    for c in range(3):
        counts = targets[y == c][:, mask.block(c).start : mask.block(c).stop].sum(0)
        expected = counts.sum() / len(counts)
        chi_square = ((counts - expected) ** 2 / expected).sum().item()
        assert chi_square < 30, f"class {c}: counts {counts.tolist()}"  # df <= 4: p < 1e-5


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True, "10", None])
def test_random_labels_reject_a_bad_num_samples(num_samples: object) -> None:
    with pytest.raises(ValueError, match=r"num_samples must be a positive integer \(the training set size\)"):
        RandomLabels(MASK, num_samples=num_samples)  # type: ignore[arg-type]
