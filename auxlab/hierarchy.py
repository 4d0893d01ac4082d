"""The class-to-sub-class structure: which auxiliary columns belong to which primary class."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["HierarchyMask"]


def _as_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} of type {type(value).__name__}")
    count = int(value)
    if count < 1:
        raise ValueError(f"{what} must be >= 1, got {count}; every primary class needs at least one sub-class")
    return count


def _as_list(values: object, what: str) -> list[object]:
    """A list from a sequence, NumPy array or 1-D tensor; a clear TypeError for anything else."""
    if hasattr(values, "tolist"):
        values = values.tolist()  # NumPy arrays and tensors
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        hint = " (for the same count in every class use HierarchyMask.uniform(num_classes, psi))" if what == "psi" else ""
        raise TypeError(f"{what} must be a sequence of integers, got {type(values).__name__}{hint}")
    return list(values)


class HierarchyMask:
    """Which auxiliary classes (columns) belong to which primary class.

    Primary class ``c`` owns ``psi[c]`` auxiliary sub-classes, laid out as one contiguous block of
    columns: class 0 owns columns ``0 .. psi[0]-1``, class 1 the next ``psi[1]``, and so on, for
    ``K = sum(psi)`` auxiliary classes in total. A sample with primary label ``y`` may only take an
    auxiliary label inside block ``y``.

    Args:
        psi: one sub-class count per primary class, each >= 1.

    Examples:
        >>> mask = HierarchyMask([2, 3])
        >>> mask.num_classes, mask.num_aux_classes, mask.block(1)
        (2, 5, range(2, 5))
    """

    def __init__(self, psi: Sequence[int]) -> None:
        counts = _as_list(psi, "psi")
        if not counts:
            raise ValueError("psi must not be empty: give one sub-class count per primary class")
        self._psi = tuple(_as_count(p, f"psi[{c}]") for c, p in enumerate(counts))
        starts = [0]
        for count in self._psi[:-1]:
            starts.append(starts[-1] + count)
        self._starts = tuple(starts)
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def uniform(cls, num_classes: int, psi: int) -> HierarchyMask:
        """The same number ``psi`` of sub-classes for each of ``num_classes`` primary classes."""
        num_classes = _as_count(num_classes, "num_classes")
        return cls([_as_count(psi, "psi")] * num_classes)

    @classmethod
    def from_fine_to_coarse(cls, fine_to_coarse: Sequence[int]) -> HierarchyMask:
        """The hierarchy of a dataset with fine labels grouped under coarse (primary) labels.

        Args:
            fine_to_coarse: ``fine_to_coarse[f]`` is the primary class of fine label ``f``; every
                primary class ``0 .. C-1`` must own at least one fine label.

        The fine labels of class ``c`` take the columns of block ``c`` in increasing order of fine
        label; :meth:`fine_label_columns` gives that column for each fine label.
        """
        coarse = cls._coarse_list(fine_to_coarse)
        num_classes = max(coarse) + 1
        psi = [coarse.count(c) for c in range(num_classes)]
        missing = [c for c, count in enumerate(psi) if count == 0]
        if missing:
            raise ValueError(
                f"fine_to_coarse maps no fine label to primary class(es) {missing}; "
                f"every class in [0, {num_classes}) needs at least one fine label"
            )
        return cls(psi)

    @staticmethod
    def _coarse_list(fine_to_coarse: Sequence[int]) -> list[int]:
        values = _as_list(fine_to_coarse, "fine_to_coarse")
        if not values:
            raise ValueError("fine_to_coarse must not be empty")
        coarse = []
        for f, c in enumerate(values):
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                raise ValueError(f"fine_to_coarse[{f}] must be a non-negative integer class, got {c!r}")
            coarse.append(int(c))
        return coarse

    def fine_label_columns(self, fine_to_coarse: Sequence[int]) -> list[int]:
        """The auxiliary column of each fine label, for the layout of :meth:`from_fine_to_coarse`.

        Raises:
            ValueError: if ``fine_to_coarse`` does not give exactly ``psi[c]`` fine labels to class ``c``.
        """
        coarse = self._coarse_list(fine_to_coarse)
        if HierarchyMask.from_fine_to_coarse(coarse) != self:
            counts = [coarse.count(c) for c in range(max(coarse) + 1)]
            raise ValueError(
                f"fine_to_coarse gives {counts} fine labels per class but this hierarchy has psi={list(self._psi)}; "
                "build the mask with HierarchyMask.from_fine_to_coarse(fine_to_coarse)"
            )
        used = [0] * self.num_classes
        columns = []
        for c in coarse:
            columns.append(self._starts[c] + used[c])
            used[c] += 1
        return columns

    @property
    def psi(self) -> tuple[int, ...]:
        """Sub-class count of each primary class."""
        return self._psi

    @property
    def num_classes(self) -> int:
        """C, the number of primary classes."""
        return len(self._psi)

    @property
    def num_aux_classes(self) -> int:
        """K = sum(psi), the number of auxiliary classes."""
        return self._starts[-1] + self._psi[-1]

    def block(self, c: int) -> range:
        """The auxiliary columns owned by primary class ``c``."""
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} is outside [0, {self.num_classes})")
        return range(self._starts[c], self._starts[c] + self._psi[c])

    def as_matrix(self, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.bool) -> Tensor:
        """The hierarchy as a ``(C, K)`` 0/1 matrix: entry ``[c, k]`` is 1 iff column ``k`` belongs to class ``c``."""
        starts, sizes = self._bounds(torch.device(device) if device is not None else torch.device("cpu"))
        columns = torch.arange(self.num_aux_classes, device=starts.device)
        inside = (columns >= starts[:, None]) & (columns < (starts + sizes)[:, None])
        return inside.to(dtype)

    def _bounds(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Start column and size of every block, as int64 tensors on ``device`` (cached)."""
        if device not in self._device_cache:
            self._device_cache[device] = (
                torch.tensor(self._starts, dtype=torch.long, device=device),
                torch.tensor(self._psi, dtype=torch.long, device=device),
            )
        return self._device_cache[device]

    def sizes_of(self, y: Tensor) -> Tensor:
        """``psi[y]`` for each label: ``(B,)`` int64 on ``y``'s device."""
        return self._bounds(y.device)[1][y]

    def column(self, y: Tensor, sub: Tensor) -> Tensor:
        """The auxiliary column of sub-class ``sub`` (in ``[0, psi[y])``) of class ``y``; ``(B,)`` int64."""
        return self._bounds(y.device)[0][y] + sub

    def rows(self, y: Tensor) -> Tensor:
        """``(B, K)`` boolean: which columns lie in each sample's own block."""
        starts, sizes = self._bounds(y.device)
        columns = torch.arange(self.num_aux_classes, device=y.device)
        start = starts[y][:, None]
        return (columns >= start) & (columns < start + sizes[y][:, None])

    def softmax(self, scores: Tensor, y: Tensor) -> Tensor:
        """Softmax of ``scores`` over each sample's own block, exactly 0 elsewhere.

        Numerically stable for any finite scores (out-of-block entries are set to ``-inf`` before a
        max-subtracted softmax); half-precision inputs are computed in float32 and cast back.

        Args:
            scores: ``(B, K)`` real scores.
            y: ``(B,)`` primary labels in ``[0, C)``.

        Returns:
            ``(B, K)`` probabilities in ``scores``' dtype; each row sums to 1 over block ``y``.
        """
        if scores.dim() != 2 or scores.shape[1] != self.num_aux_classes:
            raise ValueError(
                f"scores must have shape (B, {self.num_aux_classes}) for K=sum(psi)={self.num_aux_classes}, "
                f"got {tuple(scores.shape)}"
            )
        if y.shape != scores.shape[:1]:
            raise ValueError(f"y must have shape ({scores.shape[0]},) to match scores, got {tuple(y.shape)}")
        masked = scores.masked_fill(~self.rows(y), float("-inf"))
        compute_dtype = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
        return torch.softmax(masked, dim=1, dtype=compute_dtype).to(scores.dtype)

    def balance(self, probs: Tensor, y: Tensor, *, iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp equipartition of each class's samples over its sub-classes, within the batch.

        Alternately rescales the columns, so that sub-class ``k`` of class ``c`` holds ``n_c / psi[c]``
        of the probability mass of the batch's ``n_c`` samples of class ``c``, and the rows, so that
        each sums to 1 (as SwAV balances its codes over a batch). It ends on the rows: every row stays
        a distribution over its sample's block, zero elsewhere. Differentiable; a class absent from
        the batch keeps empty columns.

        Args:
            probs: ``(B, K)`` probabilities, zero outside each sample's block (e.g. :meth:`softmax`).
            y: ``(B,)`` primary labels in ``[0, C)``.
            iterations: column-and-row rescalings; 0 returns ``probs``.

        Returns:
            ``(B, K)`` balanced probabilities.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
        if probs.dim() != 2 or probs.shape[1] != self.num_aux_classes or y.shape != probs.shape[:1]:
            raise ValueError(f"probs must have shape (B, {self.num_aux_classes}) and y (B,), got {tuple(probs.shape)} and {tuple(y.shape)}")
        rows = self.rows(y)
        block_sizes = torch.tensor(self._psi, device=probs.device, dtype=probs.dtype).repeat_interleave(
            torch.tensor(self._psi, device=probs.device)
        )
        column_mass = rows.sum(0).to(probs.dtype) / block_sizes  # n_c / psi[c] for each column of block c
        tiny = torch.finfo(probs.dtype).tiny
        q = probs
        for _ in range(iterations):
            q = q * (column_mass / q.sum(0).clamp_min(tiny))
            q = q / q.sum(1, keepdim=True).clamp_min(tiny)
        return q

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HierarchyMask) and self._psi == other._psi

    def __hash__(self) -> int:
        return hash(self._psi)

    def __repr__(self) -> str:
        return f"HierarchyMask(psi={list(self._psi)})"
