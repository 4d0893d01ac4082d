"""Human auxiliary labels: a dataset's own finer labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from auxlab.data import TrainingData
from auxlab.generators._tables import FixedLabelTable
from auxlab.generators.base import check_mask
from auxlab.hierarchy import HierarchyMask


class HumanLabels(FixedLabelTable, name="human"):
    """The dataset's own fine labels as auxiliary labels (the "human" baseline of Liu, Davison &
    Johns, NeurIPS 2019, e.g. CIFAR-100's 100 classes under its 20 superclasses).

    Fine label ``f`` takes column ``mask.fine_label_columns(fine_to_coarse)[f]``, inside the block
    of its primary class ``fine_to_coarse[f]``. Needs the samples' dataset indices.

    Args:
        mask: must equal ``HierarchyMask.from_fine_to_coarse(fine_to_coarse)``.
        fine_labels: ``(N,)`` fine label of every training sample, in ``[0, len(fine_to_coarse))``.
        fine_to_coarse: primary class of each fine label.
    """

    def __init__(self, mask: HierarchyMask, *, fine_labels: Tensor | Sequence[int], fine_to_coarse: Sequence[int]) -> None:
        columns = torch.tensor(check_mask(mask).fine_label_columns(fine_to_coarse), dtype=torch.long)
        fine = torch.as_tensor(fine_labels)
        if fine.dtype.is_floating_point or fine.dtype == torch.bool or fine.dim() != 1 or fine.numel() == 0:
            raise ValueError(f"fine_labels must be a non-empty 1-D sequence of integer labels, got {fine.dtype} of shape {tuple(fine.shape)}")
        low, high = int(fine.min()), int(fine.max())
        if low < 0 or high >= len(columns):
            bad = low if low < 0 else high
            raise ValueError(
                f"fine_labels has label {bad} but fine_to_coarse names {len(columns)} fine labels; "
                f"fine labels must lie in [0, {len(columns)})"
            )
        super().__init__(mask, columns[fine.long()])

    @classmethod
    def kwargs_from_data(cls, data: TrainingData) -> dict[str, Any]:
        """``fine_labels`` and ``fine_to_coarse`` of the training set; a ValueError if it has none."""
        if data.fine_labels is None or data.fine_to_coarse is None:
            raise ValueError("strategy 'human' needs the dataset's fine labels, and this training set has none")
        return {"fine_labels": data.fine_labels, "fine_to_coarse": data.fine_to_coarse}
