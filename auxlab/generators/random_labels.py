"""Random auxiliary labels: the paper's random baseline."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from auxlab.data import TrainingData
from auxlab.generators._tables import FixedLabelTable
from auxlab.hierarchy import HierarchyMask


class RandomLabels(FixedLabelTable, name="random"):
    """One fixed random sub-class per training sample, drawn once (the "random" baseline of
    Liu, Davison & Johns, *Self-Supervised Generalisation with Meta Auxiliary Learning*, NeurIPS 2019).

    Each sample ``i`` with label ``y`` gets sub-class ``draw[i] mod psi[y]`` of block ``y``, where
    ``draw`` is drawn uniformly once from a ``torch.Generator`` seeded with ``seed``: the same seed
    gives the same labels on every machine. Needs the samples' dataset indices.

    Args:
        mask: the class-to-sub-class hierarchy.
        num_samples: N, the size of the training set; indices lie in ``[0, N)``.
        seed: seed of the draw.
    """

    seeded = True

    def __init__(self, mask: HierarchyMask, *, num_samples: int, seed: int = 0) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer (the training set size), got {num_samples!r}")
        generator = torch.Generator().manual_seed(int(seed))
        draws = torch.randint(0, 2**62, (int(num_samples),), generator=generator)
        super().__init__(mask, draws)

    @classmethod
    def kwargs_from_data(cls, data: TrainingData) -> dict[str, Any]:
        """``num_samples``: the size of the training set."""
        return {"num_samples": len(data.dataset)}  # type: ignore[arg-type]

    def lookup(self, y: Tensor, index: Tensor) -> Tensor:
        return self.mask.column(y, self.table[index] % self.mask.sizes_of(y))
