"""SLA: self-supervised label augmentation, one auxiliary head over (class, transformation) pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch
from torch import Tensor, nn

from auxlab._checks import check_number
from auxlab.generators.base import AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask

__all__ = ["TRANSFORMATIONS", "SLALabels", "register_transformation"]

#: A transformation of a whole batch: ``(B, ...) -> (B, ...)``, the same shape.
Transformation = Callable[[Tensor], Tensor]

#: Transformation name -> function of a batch, for ``SLALabels(transformations=[...names...])``.
TRANSFORMATIONS: dict[str, Transformation] = {}

#: SLA's default transformations: the four rotations of the paper, the identity first.
DEFAULT_TRANSFORMATIONS = ("identity", "rot90", "rot180", "rot270")


def register_transformation(name: str, function: Transformation) -> None:
    """Register a batch transformation under ``name``, for ``SLALabels(transformations=[..., name])``.

    Args:
        name: a name not yet in :data:`TRANSFORMATIONS`.
        function: maps a ``(B, ...)`` batch to a batch of the same shape (e.g. a horizontal flip,
            ``lambda x: x.flip(-1)``).

    Raises:
        TypeError: if ``name`` is not a non-empty string or ``function`` is not callable.
        ValueError: if ``name`` is already registered.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a transformation's name must be a non-empty string, got {name!r}")
    if not callable(function):
        raise TypeError(f"transformation {name!r} must be callable (a function of a batch), got {type(function).__name__}")
    if name in TRANSFORMATIONS:
        raise ValueError(
            f"a transformation named {name!r} is already registered ({_describe(TRANSFORMATIONS[name])}); choose another name"
        )
    TRANSFORMATIONS[name] = function


def _describe(function: Transformation) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _identity(x: Tensor) -> Tensor:
    """The batch itself."""
    return x


def _rotation(quarter_turns: int) -> Transformation:
    """Rotation by ``90 * quarter_turns`` degrees of the last two dims (``torch.rot90``) of square images."""
    degrees = 90 * quarter_turns

    def rotate(x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"rot{degrees} rotates batches of square images, (B, C, H, W) or (B, H, W) with H == W, "
                f"got a batch of shape {tuple(x.shape)}"
            )
        return torch.rot90(x, quarter_turns, dims=(x.dim() - 2, x.dim() - 1))

    rotate.__name__ = rotate.__qualname__ = f"rot{degrees}"
    rotate.__doc__ = f"Rotation by {degrees} degrees of the last two dims of a batch of square images."
    return rotate


register_transformation("identity", _identity)
for _turns in (1, 2, 3):
    register_transformation(f"rot{90 * _turns}", _rotation(_turns))


class SLALabels(AuxLabelGenerator, name="sla"):
    """Self-supervised label augmentation: SLA (Lee, Hwang & Shin, *Self-supervised Label
    Augmentation via Input Transformations*, ICML 2020, arXiv:1910.05872).

    The auxiliary task is posed on ``M`` transformed copies of the batch (by default the four
    rotations, the identity first): the auxiliary head classifies each copy into the joint label
    space (class, transformation), ``K = C * M`` classes. In auxlab terms this is a fixed hierarchy
    with ``psi = M`` for every class: copy ``j`` of a sample of class ``c`` has the one-hot target
    at sub-class ``j`` of block ``c``. The labels are fixed by construction; the strategy has no
    parameters.

    :meth:`augment` builds the ``M * B`` transformed rows, :meth:`forward` their targets,
    :meth:`aggregate` the paper's aggregated inference (the joint head's class scores averaged over
    the transformations), and :meth:`extra_loss` the optional self-distillation of that aggregated
    prediction into the classifier's own ``C``-way head.

    Args:
        mask: the hierarchy; must have ``psi = M`` for every class.
        transformations: ``M >= 2`` batch transformations, each a name registered in
            :data:`TRANSFORMATIONS` (see :func:`register_transformation`) or a callable mapping a
            ``(B, ...)`` batch to a batch of the same shape. The first must be the identity.
        distillation_weight: weight of the self-distillation term of :meth:`extra_loss`; 0 turns
            it off.
        temperature: the distillation's softmax temperature ``T`` (> 0).

    Raises:
        ValueError: if ``M < 2``, ``psi`` is not ``M`` for every class, a name is not registered,
            or a number is out of range.
        TypeError: if a transformation is neither a name nor a callable, or a number is not finite.
    """

    augments = True

    def __init__(
        self,
        mask: HierarchyMask,
        *,
        transformations: Sequence[str | Transformation] = DEFAULT_TRANSFORMATIONS,
        distillation_weight: float = 0.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(mask)
        if isinstance(transformations, (str, bytes)) or not isinstance(transformations, Sequence):
            raise TypeError(
                f"transformations must be a sequence of transformation names or callables, got {transformations!r}"
            )
        functions: list[Transformation] = []
        names: list[str] = []
        for j, entry in enumerate(transformations):
            if isinstance(entry, str):
                if entry not in TRANSFORMATIONS:
                    raise ValueError(
                        f"transformations[{j}]={entry!r} is not a registered transformation; choose one of "
                        f"{sorted(TRANSFORMATIONS)}, register it with register_transformation(name, function), "
                        "or pass the callable itself"
                    )
                functions.append(TRANSFORMATIONS[entry])
                names.append(entry)
            elif callable(entry):
                functions.append(entry)
                names.append(_describe(entry))
            else:
                raise TypeError(
                    f"transformations[{j}] must be a registered name or a callable, got {type(entry).__name__}"
                )
        count = len(functions)
        if count < 2:
            raise ValueError(f"generator 'sla' needs at least 2 transformations (the identity first), got {count}: {names}")
        if any(p != count for p in mask.psi):
            raise ValueError(
                f"generator 'sla' with {count} transformations needs psi={count} for every class, "
                f"got psi={list(mask.psi)}; build the hierarchy with psi={count} "
                f"(MetaAuxWrapper(..., psi={count}, generator='sla')) or pass as many transformations as psi"
            )
        self._transformations = tuple(functions)
        #: The transformations' names (a callable's ``__qualname__``), in order.
        self.transformation_names: tuple[str, ...] = tuple(names)
        self.distillation_weight = check_number(distillation_weight, "distillation_weight")
        self.temperature = check_number(temperature, "temperature", positive=True)

    @property
    def num_transformations(self) -> int:
        """M, the number of transformations (and of sub-classes per class)."""
        return len(self._transformations)

    @overload
    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]: ...

    @overload
    def augment(self, x: Tensor, y: None) -> tuple[Tensor, None]: ...

    def augment(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The ``M`` transformed copies of the batch, stacked copy by copy, and their labels.

        Args:
            x: ``(B, ...)`` inputs (``(B, C, H, W)`` or ``(B, H, W)`` square images for rotations).
            y: ``(B,)`` primary labels, or None (at inference).

        Returns:
            ``(x_all, y_all)``: ``x_all`` is ``(M * B, ...)``, its row ``j * B + b`` transformation
            ``j`` of sample ``b`` (so its first ``B`` rows are ``x`` itself); ``y_all`` is
            ``y.repeat(M)``, ``(M * B,)``, or None when ``y`` is None.

        Raises:
            ValueError: if the first transformation does not return ``x`` exactly, a
                transformation changes the batch's shape, or ``y`` does not match ``x``.
        """
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a (B, ...) tensor, got {type(x).__name__}")
        if y is not None and (not isinstance(y, Tensor) or y.shape != x.shape[:1]):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}, got {got}")
        copies = []
        for j, (name, transform) in enumerate(zip(self.transformation_names, self._transformations)):
            out = transform(x)
            if not isinstance(out, Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"transformation {j} ({name!r}) changed the batch's shape from {tuple(x.shape)} to {got}; "
                    "every transformation must keep the shape"
                )
            if j == 0 and not torch.equal(out, x):
                raise ValueError(
                    f"the first transformation must be the identity (its output must equal x exactly: the primary "
                    f"head trains on the first B rows), got {name!r}; put 'identity' first"
                )
            copies.append(out)
        return torch.cat(copies), None if y is None else y.repeat(self.num_transformations)

    def _batch_size(self, rows: int, what: str) -> int:
        """B from the ``M * B`` rows of an augmented batch; a ValueError if ``rows`` is not a multiple of M."""
        count = self.num_transformations
        if rows % count != 0 or rows == 0:
            raise ValueError(
                f"{what} has {rows} rows, which is not a positive multiple of the {count} transformations; "
                "pass the (M * B, ...) batch that augment(x, y) returns"
            )
        return rows // count

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """One-hot joint targets of an augmented batch.

        Args:
            x: ``(M * B, ...)`` the ``x_all`` of :meth:`augment`.
            y: ``(M * B,)`` the ``y_all`` of :meth:`augment`, in ``[0, C)``.
            index: unused.

        Returns:
            ``(M * B, K)`` one-hot targets: row ``j * B + b`` has its 1 at sub-class ``j`` of block
            ``y[j * B + b]``. Float in ``x``'s dtype when it is floating, float32 otherwise.
        """
        batch = self._batch_size(x.shape[0], "x")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}, got {tuple(y.shape)}")
        sub = torch.arange(self.num_transformations, device=y.device).repeat_interleave(batch)
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return self.one_hot(self.mask.column(y, sub), dtype=dtype)

    def aggregate(self, aux: Tensor) -> Tensor:
        """The paper's aggregated class scores from the joint head's logits of an augmented batch.

        ``s[b, i] = (1 / M) * sum_j aux[j * B + b, offset(i) + j]``, with ``offset(i)`` the first
        column of block ``i``; ``softmax(s)`` is SLA's aggregated prediction ``P_aggregated``.

        Args:
            aux: ``(M * B, K)`` auxiliary logits of the :meth:`augment`-ed batch.

        Returns:
            ``(B, C)`` aggregated scores, in ``aux``'s dtype.
        """
        num_aux = self.mask.num_aux_classes
        if aux.dim() != 2 or aux.shape[1] != num_aux:
            raise ValueError(f"aux must have shape (M * B, {num_aux}) for K=sum(psi)={num_aux}, got {tuple(aux.shape)}")
        count, num_classes = self.num_transformations, self.mask.num_classes
        batch = self._batch_size(aux.shape[0], "aux")
        classes = torch.arange(num_classes, device=aux.device)
        offsets = self.mask.column(classes, torch.zeros_like(classes))  # (C,): first column of each block
        columns = offsets + torch.arange(count, device=aux.device)[:, None]  # (M, C): column of (j, i)
        picked = aux.reshape(count, batch, num_aux).gather(2, columns[:, None, :].expand(count, batch, num_classes))
        return picked.mean(0)

    def extra_loss(self, primary: Tensor, aux: Tensor, y: Tensor) -> Tensor | None:
        """SLA's self-distillation of the aggregated prediction into the primary head (None if off).

        ``distillation_weight * T**2 * KL(softmax(s / T) || softmax(primary / T))``, a batch mean,
        with ``s = aggregate(aux)``. The teacher ``softmax(s / T)`` is detached: the gradient reaches
        the primary head only.

        Args:
            primary: ``(B, C)`` primary logits of the untransformed batch.
            aux: ``(M * B, K)`` auxiliary logits of the augmented batch.
            y: ``(B,)`` labels (unused).

        Returns:
            A scalar, or None when ``distillation_weight == 0``.
        """
        if self.distillation_weight == 0:
            return None
        scores = self.aggregate(aux).detach()
        if primary.shape != scores.shape:
            raise ValueError(
                f"primary must have shape {tuple(scores.shape)} (B, C) to match aux of shape {tuple(aux.shape)}, "
                f"got {tuple(primary.shape)}"
            )
        temperature = self.temperature
        teacher = torch.log_softmax(scores / temperature, dim=1)
        student = torch.log_softmax(primary / temperature, dim=1)
        kl = nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True)
        return self.distillation_weight * temperature**2 * kl

    def extra_repr(self) -> str:
        return (
            f"transformations={list(self.transformation_names)}, "
            f"distillation_weight={self.distillation_weight}, temperature={self.temperature}"
        )
