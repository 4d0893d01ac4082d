"""K-means auxiliary labels: clusters of each primary class's samples."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from auxlab.data import TrainingData
from auxlab.generators._tables import FixedLabelTable
from auxlab.generators.base import check_mask
from auxlab.hierarchy import HierarchyMask


class KMeansLabels(FixedLabelTable, name="kmeans"):
    """Sub-class = k-means cluster of the sample within its primary class (the "k-means" baseline
    of Liu, Davison & Johns, NeurIPS 2019).

    Fitted once, when built: the samples of each class ``c`` are clustered into ``psi[c]`` clusters
    of ``features(x)`` (default: the flattened inputs) by k-means++ seeding and Lloyd iterations,
    seeded by ``seed``. Needs the samples' dataset indices.

    Args:
        mask: the class-to-sub-class hierarchy.
        dataset: the training set, whose items are ``(x, y, ...)``; read once, in order.
        features: maps a batch ``x`` to ``(B, D)`` features (e.g. a pretrained extractor);
            ``None`` clusters the flattened inputs.
        seed: seed of the k-means++ initialisation.
        max_iter: most Lloyd iterations per class.
        batch_size: batch size for computing the features.
    """

    seeded = True

    def __init__(
        self,
        mask: HierarchyMask,
        *,
        dataset: Dataset[Any],
        features: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        max_iter: int = 100,
        batch_size: int = 256,
    ) -> None:
        check_mask(mask)
        points, labels = _features_and_labels(dataset, features, batch_size)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= mask.num_classes):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise ValueError(f"dataset has label {bad} but the hierarchy has {mask.num_classes} classes; labels must lie in [0, {mask.num_classes})")
        generator = torch.Generator().manual_seed(int(seed))
        table = torch.empty(labels.shape[0], dtype=torch.long)
        for c, k in enumerate(mask.psi):
            members = (labels == c).nonzero().squeeze(1)
            if members.numel() < k:
                raise ValueError(f"class {c} has {members.numel()} samples in dataset, fewer than psi[{c}]={k} clusters")
            table[members] = mask.block(c).start + kmeans(points[members], k, generator=generator, max_iter=max_iter)
        super().__init__(mask, table)

    @classmethod
    def kwargs_from_data(cls, data: TrainingData) -> dict[str, Any]:
        """``dataset``: the training set, clustered once."""
        return {"dataset": data.dataset}


def _features_and_labels(
    dataset: Dataset[Any], features: Callable[[Tensor], Tensor] | None, batch_size: int
) -> tuple[Tensor, Tensor]:
    chunks, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = batch[0], batch[1]
            feats = features(x) if features is not None else x
            chunks.append(feats.reshape(feats.shape[0], -1).detach().float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    if not chunks:
        raise ValueError("dataset is empty: k-means needs the training samples")
    return torch.cat(chunks), torch.cat(labels)


def kmeans(points: Tensor, k: int, *, generator: torch.Generator, max_iter: int = 100) -> Tensor:
    """Cluster ``(N, D)`` points into ``k`` clusters; returns ``(N,)`` cluster indices in ``[0, k)``.

    k-means++ seeding drawn from ``generator``, then Lloyd iterations until the assignment stops
    changing or ``max_iter`` is reached. An emptied cluster keeps its previous centre.
    """
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] for {n} points, got {k!r}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [points[first]]
    closest = (points - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            pick = int(torch.multinomial(closest / total, 1, generator=generator))
        else:  # every point coincides with a centre already
            pick = int(torch.randint(n, (1,), generator=generator))
        centres.append(points[pick])
        closest = torch.minimum(closest, (points - points[pick]).pow(2).sum(1))
    centre = torch.stack(centres)
    assign = torch.cdist(points, centre).argmin(1)
    for _ in range(max_iter):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centre).index_add_(0, assign, points)
        filled = counts > 0
        centre[filled] = sums[filled] / counts[filled, None].to(points.dtype)
        new_assign = torch.cdist(points, centre).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign
