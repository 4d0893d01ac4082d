"""Shared machinery of strategies that hold one fixed auxiliary label per training sample."""

from __future__ import annotations

import torch
from torch import Tensor

from auxlab.generators.base import AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask


class FixedLabelTable(AuxLabelGenerator):
    """A strategy whose labels are a table ``column[index]`` fixed when it is built.

    ``table`` is an ``(N,)`` int64 tensor with one entry per training sample; by default the entry
    is the sample's auxiliary column, and a subclass whose entries mean something else overrides
    :meth:`lookup`. The table is a buffer, so it is saved in ``state_dict`` and moves with
    ``.to(device)``. Every looked-up column is checked to lie in the sample's own block, which
    catches indices that do not match the dataset the table was built from.
    """

    needs_index = True

    table: Tensor

    def __init__(self, mask: HierarchyMask, table: Tensor) -> None:
        super().__init__(mask)
        self.register_buffer("table", table.to(torch.long))

    @property
    def num_samples(self) -> int:
        """N, the number of training samples the table covers."""
        return int(self.table.shape[0])

    def check_index(self, index: Tensor | None, batch_size: int) -> Tensor:
        """Validate ``index`` and return it; raises a ValueError/TypeError naming the problem."""
        if index is None:
            raise ValueError(
                f"the {self.name or type(self).__name__!r} strategy assigns a fixed label per training sample and needs index=: "
                "pass the samples' dataset indices (wrap your dataset in auxlab.data.IndexedDataset)"
            )
        if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
            raise TypeError(f"index must be an integer tensor of dataset indices, got {_describe(index)}")
        if index.shape != (batch_size,):
            raise ValueError(f"index must have shape ({batch_size},) to match y, got {tuple(index.shape)}")
        if batch_size:
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= self.num_samples:
                bad = low if low < 0 else high
                raise ValueError(
                    f"index has value {bad} but the {self.name or type(self).__name__!r} table covers {self.num_samples} training samples; "
                    f"indices must lie in [0, {self.num_samples})"
                )
        return index.to(device=self.table.device, dtype=torch.long)

    def lookup(self, y: Tensor, index: Tensor) -> Tensor:
        """``(B,)`` auxiliary columns of the samples at ``index`` with labels ``y``."""
        return self.table[index]

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        index = self.check_index(index, y.shape[0])
        y = y.to(self.table.device)
        column = self.lookup(y, index)
        outside = ~self.mask.rows(y).gather(1, column[:, None]).squeeze(1)
        if bool(outside.any()):
            b = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"sample with index {int(index[b])} has label y={int(y[b])} but the {self.name or type(self).__name__!r} table gives it "
                f"auxiliary column {int(column[b])}, outside block {self.mask.block(int(y[b]))} of class {int(y[b])}; "
                "index must be the sample's position in the dataset the strategy was built from"
            )
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return self.one_hot(column, dtype=dtype).to(x.device)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"
