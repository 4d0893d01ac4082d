"""IndexedDataset: every item ends with its index, also through a shuffled DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from auxlab.data import IndexedDataset


def numbered_dataset(size: int = 10) -> TensorDataset:
    """Items ``(x, y)`` with ``x = 10 * i`` so that an item reveals its position."""
    return TensorDataset(10 * torch.arange(size), torch.arange(size) % 3)


def test_pairs_gain_their_index() -> None:
    dataset = IndexedDataset(numbered_dataset())
    x, y, index = dataset[4]
    assert (int(x), int(y), index) == (40, 1, 4)


def test_triples_gain_their_index_last() -> None:
    base = TensorDataset(torch.arange(5), torch.zeros(5, dtype=torch.long), torch.arange(5) + 100)
    assert [int(v) for v in IndexedDataset(base)[2]] == [2, 0, 102, 2]


def test_length_is_the_wrapped_length() -> None:
    assert len(IndexedDataset(numbered_dataset(7))) == 7


def test_a_shuffled_loader_yields_the_indices_of_its_items() -> None:
    loader = DataLoader(
        IndexedDataset(numbered_dataset(23)), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for x, y, index in loader:
        assert index.dtype == torch.long
        assert torch.equal(x, 10 * index)
        assert torch.equal(y, index % 3)
        seen += index.tolist()
    assert sorted(seen) == list(range(23))
    assert seen != list(range(23))  # the order really was shuffled


@pytest.mark.parametrize(
    "item", [torch.zeros(2), {"x": 1, "y": 0}, [torch.zeros(2), 0]], ids=["tensor", "dict", "list"]
)
def test_items_that_are_not_tuples_are_rejected(item: object) -> None:
    with pytest.raises(
        TypeError, match=rf"dataset items must be tuples such as \(x, y\), got {type(item).__name__} at index 0"
    ):
        IndexedDataset([item])[0]  # type: ignore[arg-type]


def test_a_dataset_without_length_is_rejected() -> None:
    with pytest.raises(
        TypeError, match="dataset must be a map-style dataset with __getitem__ and __len__, got generator"
    ):
        IndexedDataset(x for x in range(3))  # type: ignore[arg-type]
