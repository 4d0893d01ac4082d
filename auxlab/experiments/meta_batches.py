"""The meta batches of a run that learns from a development split: the split in reshuffled passes, without end."""

from __future__ import annotations

import torch
from torch import Tensor

from auxlab.datasets import ImageDataset

__all__ = ["MetaBatches"]


class MetaBatches:
    """The meta batches ``(x_meta, y_meta)`` of a run: the development split in reshuffled passes, without end.

    Each pass is a permutation of the split drawn from a ``torch.Generator`` seeded with ``seed``,
    cut into ``max(1, N // batch_size)`` batches of ``min(batch_size, N)`` samples (the few left
    over wait for a later pass). :attr:`pass_state` (the generator's state before the current
    pass) and :attr:`taken` (the batches drawn from it) restore the sequence exactly.
    """

    def __init__(self, dataset: ImageDataset, *, batch_size: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.per_pass = len(dataset) // self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.load_state(self.generator.get_state(), 0)

    def load_state(self, pass_state: Tensor, taken: int) -> None:
        """Continue from a pass drawn from ``pass_state``, of which ``taken`` batches were drawn."""
        self.pass_state = pass_state
        self.generator.set_state(pass_state)
        self.order = torch.randperm(len(self.dataset), generator=self.generator)
        self.taken = int(taken)

    def next(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The next meta batch ``(x_meta, y_meta)`` for ``step`` and ``meta_step``."""
        if self.taken == self.per_pass:
            self.load_state(self.generator.get_state(), 0)
        index = self.order[self.taken * self.batch_size : (self.taken + 1) * self.batch_size]
        self.taken += 1
        return self.dataset.images[index].to(device), self.dataset.labels[index].to(device)
