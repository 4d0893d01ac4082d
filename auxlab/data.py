"""Datasets that yield each sample's index, for strategies with one fixed label per sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IndexedDataset", "TrainingData"]


@dataclass(frozen=True)
class TrainingData:
    """What a runner knows of the training set, for strategies built from it
    (:meth:`~auxlab.AuxLabelGenerator.kwargs_from_data`).

    Attributes:
        dataset: the training set, a map-style dataset whose items are ``(x, y, ...)``; the dataset
            indices of the training batches index it.
        fine_labels: ``(N,)`` the fine label of every sample, if the dataset has them.
        fine_to_coarse: the primary class of each fine label, if the dataset has fine labels.
    """

    dataset: Dataset[Any]
    fine_labels: Tensor | None = None
    fine_to_coarse: Sequence[int] | None = None


class IndexedDataset(Dataset[tuple[Any, ...]]):
    """Wraps a map-style dataset so that each item ends with its index.

    An item ``(x, y)`` of ``dataset`` becomes ``(x, y, i)``, and ``(x, y, extra)`` becomes
    ``(x, y, extra, i)``, so that a shuffled ``DataLoader`` yields the dataset indices that
    strategies such as ``"random"``, ``"kmeans"`` and ``"human"`` need::

        loader = DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True)
        for x, y, index in loader:
            loss = wrapper.loss(x, y, index=index)
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset with __getitem__ and __len__, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if not isinstance(item, tuple):
            raise TypeError(f"dataset items must be tuples such as (x, y), got {type(item).__name__} at index {index}")
        return (*item, index)
