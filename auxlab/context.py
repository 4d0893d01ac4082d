"""What one call of the wrapper runs with: the multi-task view, the data-parallel reducer, the loss
scaling and the finite guard.

One process and no loss scaler have do-nothing stand-ins (:class:`~auxlab.distributed.LocalReducer`,
:class:`LossScaling`), so no algorithm asks whether there is a scaler or a reducer: it calls
``ctx.scaling.grad``, ``ctx.reducer.average_`` and ``ctx.guard.check`` and gets the plain operation
where there is nothing to do. :class:`~auxlab.MetaAuxWrapper` builds a :class:`StepContext` at each
call from its current settings; meta learners (:mod:`auxlab.learners`) receive it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from auxlab.distributed import LocalReducer
from auxlab.engines import Engine, MetaProblem
from auxlab.hierarchy import HierarchyMask
from auxlab.losses import model_step_losses
from auxlab.multitask import MultiTaskNet, call_on_buffer_copies, head_input
from auxlab.scaling import LossScaling

if TYPE_CHECKING:
    from auxlab.generators.base import AuxLabelGenerator
    from auxlab.weighting import AuxWeighting

__all__ = ["Batch", "FiniteGuard", "StepContext"]


@dataclass(frozen=True)
class Batch:
    """One call's data, checked: the batch ``(x, y)`` of the model step and the virtual step, its
    dataset indices, and the batch of the meta loss (``(x, y)`` unless given apart)."""

    x: Tensor
    y: Tensor
    index: Tensor | None
    x_meta: Tensor
    y_meta: Tensor


@dataclass
class FiniteGuard:
    """What a non-finite loss does: raise, or (``nonfinite="skip"``) warn and count; all ranks decide together.

    Attributes:
        nonfinite: ``"raise"`` or ``"skip"``.
        steps, skipped: the wrapper's counters by ``"model"``/``"meta"`` (the same dicts; ``steps`` counts the
            calls that completed, so the one checked now is ``steps[step] + 1``).
        reducer: the ranks' collective operations.
        parts: the named parts of this call's finite checks (detached), by ``"model"``/``"meta"``.
        skipped_now: the steps this call skipped (``nonfinite="skip"``).
    """

    nonfinite: Literal["raise", "skip"]
    steps: dict[str, int]
    skipped: dict[str, int]
    reducer: LocalReducer
    parts: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    skipped_now: set[str] = field(default_factory=set)

    def check(self, step: str, total: Tensor, **parts: Tensor) -> bool:
        """Whether ``total`` is finite (on every rank); otherwise raise or warn and count."""
        finite = self.reducer.all_true(bool(torch.isfinite(total)), total.device)
        if finite:
            self.parts[step] = {name: value.detach() for name, value in parts.items()}
            return True
        described = ", ".join(f"{name} = {float(value.detach()):.4g}" for name, value in parts.items())
        if bool(torch.isfinite(total)):
            described += " on this rank, non-finite on another"
        where = f"{step} step {self.steps[step] + 1}"
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss at {where}: {described}; nothing was updated. Check the batch for NaN/inf inputs and "
                "the learning rates, or pass nonfinite='skip' to skip such batches"
            )
        self.skipped[step] += 1
        self.skipped_now.add(step)
        warnings.warn(f"skipped {where}: non-finite loss ({described}); {self.skipped[step]} {step} step(s) skipped so far", RuntimeWarning, stacklevel=4)
        return False


@dataclass(frozen=True)
class StepContext:
    """Everything an algorithm of the wrapper reads: the networks, the settings, and the stand-ins.

    Attributes:
        net: the multi-task network (classifier and auxiliary head).
        mask: the hierarchy.
        generator: the label strategy; None for single-task training.
        weighting: the auxiliary-loss weighting.
        engine: the hypergradient engine.
        inner_lr, aux_weight, entropy_weight, focal_gamma: the wrapper's hyper-parameters now.
        virtual_params: the parameters of the virtual step, by name; None for every trainable one.
        model_params: what the user's optimizer steps, by name (``wrapper.named_parameters()``).
        reducer: the ranks' collective operations (a do-nothing stand-in in one process).
        guard: the finite guard.
        scaling: the loss scaling (a do-nothing stand-in without a scaler).
    """

    net: MultiTaskNet
    mask: HierarchyMask
    generator: AuxLabelGenerator | None
    weighting: AuxWeighting
    engine: Engine
    inner_lr: float
    aux_weight: float
    entropy_weight: float
    focal_gamma: float
    virtual_params: frozenset[str] | None
    model_params: dict[str, nn.Parameter]
    reducer: LocalReducer
    guard: FiniteGuard
    scaling: LossScaling

    @property
    def strategy(self) -> AuxLabelGenerator:
        """The label strategy; a ValueError in single-task training, which has none."""
        if self.generator is None:
            raise ValueError("generator='single' trains without auxiliary labels; there are no targets")
        return self.generator

    def problem(self, batch: Batch, targets: Tensor) -> MetaProblem:
        """The meta problem of ``batch`` with auxiliary ``targets``."""
        return MetaProblem(
            net=self.net, x=batch.x, y=batch.y, targets=targets, x_meta=batch.x_meta, y_meta=batch.y_meta,
            inner_lr=self.inner_lr, aux_weight=self.aux_weight, focal_gamma=self.focal_gamma,
            virtual_params=self.virtual_params, reducer=self.reducer, scaling=self.scaling,
        )

    def targets(self, x: Tensor, y: Tensor, index: Tensor | None, features: Tensor | None = None, *, distribution: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's ``(B, K)`` targets (or with ``distribution`` the distribution they are
        drawn from), and its updated buffers, to commit once the step succeeded.

        A generator that ``reads_features`` gets the classifier's head input: ``features`` when the
        caller's forward pass has it, else from a forward pass here (no gradient, buffer copies).
        """
        generator = self.strategy
        with record_function("auxlab.targets"):
            inputs = self.generator_input(x, features)
            method = "label_distribution" if distribution else "forward"
            targets, buffers = call_on_buffer_copies(generator, inputs, y, index, method=method)
        expected = (y.shape[0], self.mask.num_aux_classes)
        if targets.shape != expected:
            raise ValueError(f"the generator returned targets of shape {tuple(targets.shape)}; expected {expected} (B, K=sum(psi))")
        return targets, buffers

    def generator_input(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """What the generator reads: ``x``, or for a strategy that ``reads_features`` the classifier's
        head input, detached (``features`` when the caller's forward pass has it, else a forward pass
        here without gradient, on buffer copies)."""
        if not self.strategy.reads_features:
            return x
        return head_input(self.net.model, self.net.head_name, x) if features is None else features.detach()

    def augmented(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The batch of the auxiliary task: ``(x, y)``, or an augmenting strategy's transformed copies, checked."""
        generator = self.strategy
        if not generator.augments:
            return x, y
        x_aux, y_aux = generator.augment(x, y)
        if y is None:
            return x_aux, None
        if y_aux is None or y_aux.shape[0] != x_aux.shape[0] or x_aux.shape[0] % x.shape[0] or not torch.equal(y_aux[: y.shape[0]], y):
            raise ValueError(
                f"generator={strategy_name(generator)!r} augmented a batch of {x.shape[0]} into {x_aux.shape[0]} inputs and "
                f"{None if y_aux is None else y_aux.shape[0]} labels; expected M * {x.shape[0]} of each, the untransformed batch first"
            )
        return x_aux, y_aux

    def loss_terms(self, primary: Tensor, aux: Tensor | None, y: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_pri, L_aux)`` of the model step."""
        if aux is None or aux.shape != targets.shape:
            shape = None if aux is None else tuple(aux.shape)
            raise ValueError(f"the auxiliary head gave shape {shape} but the targets have {tuple(targets.shape)}; the head's input must be (B, features)")
        return model_step_losses(primary, y, aux, targets, focal_gamma=self.focal_gamma)

    def check_primary(self, primary: Tensor, x: Tensor) -> None:
        """A ValueError unless the model returned ``(B, num_classes)`` logits."""
        expected = (x.shape[0], self.mask.num_classes)
        if primary.shape != expected:
            raise ValueError(f"the model returned shape {tuple(primary.shape)} but (B, num_classes) = {expected} was expected")


def strategy_name(module: nn.Module) -> str:
    """A strategy's or weighting's registered name, else its class name (for messages)."""
    name = getattr(module, "name", None)
    return name if isinstance(name, str) else type(module).__name__
