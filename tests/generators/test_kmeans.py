"""KMeansLabels and the kmeans function (``auxlab/generators/kmeans.py``): clusters of each class as its sub-classes."""

from __future__ import annotations

import pytest
import torch
from helpers import batch
from torch import Tensor
from torch.utils.data import TensorDataset

from auxlab import HierarchyMask
from auxlab.data import IndexedDataset
from auxlab.generators import KMeansLabels
from auxlab.generators.kmeans import kmeans
from tests.generators.generator_helpers import MASK, PSI, assert_inside_blocks


# ------------------------------------------------------------------------------ k-means
def blobs(sizes: list[int], *, points_per_blob: int = 12, dim: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Well-separated gaussian blobs, ``sizes[c]`` of them in class ``c``, shuffled.

    Returns ``(x, y, blob)``: inputs, class labels and the blob of each sample.
    """
    g = torch.Generator().manual_seed(seed)
    num_blobs = sum(sizes)
    centres = 100 * torch.randn(num_blobs, dim, generator=g)
    blob = torch.arange(num_blobs).repeat_interleave(points_per_blob)
    owner = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    x = centres[blob] + 0.1 * torch.randn(len(blob), dim, generator=g)
    order = torch.randperm(len(blob), generator=g)
    return x[order], owner[blob][order], blob[order]


def assert_same_partition(labels: Tensor, groups: Tensor) -> None:
    """``labels`` are constant within each group and distinct between groups."""
    pairs = set(zip(groups.tolist(), labels.tolist()))
    assert len(pairs) == len(set(groups.tolist())) == len(set(labels.tolist()))


def test_kmeans_labels_recover_the_blobs_of_each_class() -> None:
    x, y, blob = blobs(PSI)
    generator = KMeansLabels(MASK, dataset=TensorDataset(x, y), seed=0)
    assert_same_partition(generator.table, blob)
    targets = generator(x, y, index=torch.arange(len(y)))
    assert_inside_blocks(targets, MASK, y)


def test_kmeans_labels_are_seeded() -> None:
    x, y = batch(60, 4, 3, seed=5)  # no cluster structure: the seed decides
    mask = HierarchyMask.uniform(3, 4)

    def table(seed: int) -> Tensor:
        return KMeansLabels(mask, dataset=TensorDataset(x, y), seed=seed).table

    assert torch.equal(table(0), table(0))
    assert not torch.equal(table(0), table(1))


def test_kmeans_labels_cluster_the_given_features() -> None:
    # dimension 0 separates groups "a", dimension 1 (far larger) separates groups "b"
    i = torch.arange(40)
    group_a, group_b = i % 2, (i // 2) % 2
    x = torch.stack([10.0 * group_a, 1000.0 * group_b], dim=1) + 0.01 * torch.randn(
        40, 2, generator=torch.Generator().manual_seed(0)
    )
    dataset = IndexedDataset(TensorDataset(x, torch.zeros(40, dtype=torch.long)))  # extra items are ignored
    mask = HierarchyMask([2])
    calls = []

    def first_dimension(inputs: Tensor) -> Tensor:
        calls.append(len(inputs))
        return inputs[:, :1]

    assert_same_partition(KMeansLabels(mask, dataset=dataset, features=first_dimension, batch_size=16).table, group_a)
    assert calls == [16, 16, 8]
    assert_same_partition(KMeansLabels(mask, dataset=dataset).table, group_b)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 0, 1, 1, 1, 2], r"class 2 has 1 samples in dataset, fewer than psi\[2\]=2 clusters"),
        ([0, 0, 1, 1, 3, 2], r"dataset has label 3 but the hierarchy has 3 classes; labels must lie in \[0, 3\)"),
        ([0, 0, 1, -1, 2, 2], "dataset has label -1"),
    ],
    ids=["too-few-samples", "label-too-large", "negative-label"],
)
def test_kmeans_labels_reject_a_dataset_that_does_not_fit(labels: list[int], message: str) -> None:
    dataset = TensorDataset(torch.randn(6, 2), torch.tensor(labels))
    with pytest.raises(ValueError, match=message):
        KMeansLabels(HierarchyMask([2, 1, 2]), dataset=dataset)


def test_kmeans_labels_reject_an_empty_dataset() -> None:
    with pytest.raises(ValueError, match="dataset is empty"):
        KMeansLabels(MASK, dataset=TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


def test_kmeans_function_recovers_blobs() -> None:
    x, _, blob = blobs([4], points_per_blob=20)
    assignment = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert assignment.shape == (80,)
    assert assignment.dtype == torch.long
    assert_same_partition(assignment, blob)


def test_kmeans_function_converges_to_a_lloyd_fixed_point() -> None:
    points = torch.randn(60, 2, generator=torch.Generator().manual_seed(3))
    assignment = kmeans(points, 5, generator=torch.Generator().manual_seed(0))
    centres = torch.stack([points[assignment == j].mean(0) for j in range(5)])
    assert torch.equal(torch.cdist(points, centres).argmin(1), assignment)  # every point sits with its nearest mean


def test_kmeans_function_is_deterministic_for_a_generator_seed() -> None:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))

    def assign(seed: int) -> Tensor:
        return kmeans(x, 5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(assign(1), assign(1))
    assert not torch.equal(assign(1), assign(2))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_kmeans_function_handles_duplicate_points_and_k_up_to_n(k: int) -> None:
    points = torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3)
    assignment = kmeans(points, k, generator=torch.Generator().manual_seed(0))
    assert ((0 <= assignment) & (assignment < k)).all()
    if k == 1:
        assert (assignment == 0).all()
    else:
        assert assignment[0] != assignment[3]


@pytest.mark.parametrize("k", [0, 7, 2.0, True])
def test_kmeans_function_rejects_a_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, 6\] for 6 points, got {k!r}"):
        kmeans(torch.randn(6, 2), k, generator=torch.Generator())  # type: ignore[arg-type]
