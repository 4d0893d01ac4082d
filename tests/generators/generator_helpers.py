"""Data and checks shared by the tests of the label strategies in ``auxlab/generators``."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from auxlab import HierarchyMask
from auxlab.generators import HumanLabels, KMeansLabels, RandomLabels

PSI = [2, 3, 1]
MASK = HierarchyMask(PSI)
#: Six fine labels under the three classes of PSI: class 0 owns fine 1, 4; class 1 owns 0, 3, 5; class 2 owns 2.
FINE_TO_COARSE = [1, 0, 2, 1, 0, 1]
NUM_SAMPLES = 30


def toy_dataset() -> tuple[TensorDataset, Tensor]:
    """``(x, y)`` items whose labels ``y`` come from fine labels ``arange(N) % 6``; also returns the fine labels."""
    fine = torch.arange(NUM_SAMPLES) % len(FINE_TO_COARSE)
    y = torch.tensor(FINE_TO_COARSE)[fine]
    x = torch.randn(NUM_SAMPLES, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, y), fine


def build_random() -> RandomLabels:
    return RandomLabels(MASK, num_samples=NUM_SAMPLES, seed=0)


def build_kmeans() -> KMeansLabels:
    return KMeansLabels(MASK, dataset=toy_dataset()[0], seed=0)


def build_human() -> HumanLabels:
    return HumanLabels(MASK, fine_labels=toy_dataset()[1], fine_to_coarse=FINE_TO_COARSE)


#: The strategies with a fixed label table (``auxlab/generators/_tables.py``), each built on the toy dataset.
TABLE_BUILDERS = {"random": build_random, "kmeans": build_kmeans, "human": build_human}


def assert_inside_blocks(targets: Tensor, mask: HierarchyMask, y: Tensor) -> None:
    assert (targets[~mask.rows(y)] == 0).all()
    assert torch.allclose(targets.sum(1), torch.ones(len(y), dtype=targets.dtype))
