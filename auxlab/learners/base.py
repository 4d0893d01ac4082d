"""The base of every meta learner: what learns in the meta step, with its optimizer and schedule."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from auxlab.context import strategy_name
from auxlab.multitask import commit_buffers

if TYPE_CHECKING:
    from auxlab.context import Batch, StepContext

__all__ = ["MetaLearner", "MetaUpdate", "ModelStep", "OptimizerFactory", "adam_optimizer"]

#: ``params -> torch.optim.Optimizer``: how the wrapper's ``generator_optimizer`` and ``weighting_optimizer`` are given.
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class MetaUpdate:
    """A meta step's update, computed and checked, not applied yet.

    Attributes:
        objective: the meta objective's value, detached.
        grads: the gradient for each of the learner's parameters (None where it does not reach one).
        buffers: the owner's buffers as updated by the meta step's forward passes (BatchNorm
            statistics), committed when the update is applied.
    """

    objective: Tensor
    grads: tuple[Tensor | None, ...]
    buffers: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStep:
    """A model step, computed and not applied yet.

    Attributes:
        loss: the model step's loss, detached.
        grads: its gradient by name of ``ctx.model_params`` (None where it does not reach one); None
            when the loss was not finite and the step is skipped.
        buffers: the network's buffers after the forward pass (BatchNorm statistics), committed
            when the step is applied.
    """

    loss: Tensor
    grads: Mapping[str, Tensor | None] | None
    buffers: Mapping[str, Tensor]


def adam_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam, lr 1e-3: the default of the learners whose gradient is small and of no fixed scale (the
    one-step hypergradient is proportional to ``inner_lr``); Adam's step does not depend on it."""
    return torch.optim.Adam(params, lr=1e-3)


class MetaLearner:
    """What learns in the meta step: a strategy's labels, or a meta-learned weighting.

    A strategy (:class:`~auxlab.AuxLabelGenerator`) or weighting (:class:`~auxlab.weighting.AuxWeighting`)
    names its learner class in its ``learner`` class attribute; the wrapper builds one for it when
    it has trainable parameters. The learner owns the optimizer of those parameters, the
    ``meta_every`` schedule, the meta gradient and its part of the wrapper's ``state_dict``. A
    subclass writes :meth:`update` (the meta step's gradient), and may write :meth:`fused_step`
    (a model step and a meta step that share their work) and :meth:`after_update`.

    What a learner needs is declared in class attributes, checked by :meth:`check` when the wrapper
    is built (a subclass may add checks):

    Attributes:
        distributed: whether it works in data-parallel training.
        loss_scaling: whether it works with a ``GradScaler`` in :meth:`~auxlab.MetaAuxWrapper.step`.
        reweighting: whether it works with a weighting that changes the model step's loss (else it
            needs the constant rule, ``L_pri + aux_weight * L_aux``, whose virtual step it assumes).
        augmenting: whether it works with a strategy that augments the batch.
        generating: whether it learns a strategy that ``generates_features`` (the auxiliary head's data),
            differentiating through that data as well as through the targets.
        held_out_meta_batch: whether its meta batch should come from held-out data (a runner then
            carves a development split).
        default_optimizer: the optimizer when the wrapper is given none.

    Args:
        owner: the module whose trainable parameters it learns.
        optimizer: the optimizer of those parameters.
        meta_every: take the meta step on every ``meta_every``-th call only.
    """

    distributed: ClassVar[bool] = False
    loss_scaling: ClassVar[bool] = True
    reweighting: ClassVar[bool] = False
    augmenting: ClassVar[bool] = False
    generating: ClassVar[bool] = False
    held_out_meta_batch: ClassVar[bool] = False
    #: Said after "distributed training does not support ..." when ``distributed`` is False.
    why_not_distributed: ClassVar[str] = ""

    @staticmethod
    def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The original MAXL code's generator optimizer: SGD, lr 1e-3, weight decay 5e-4."""
        return torch.optim.SGD(params, lr=1e-3, weight_decay=5e-4)

    def __init__(self, owner: nn.Module, *, optimizer: torch.optim.Optimizer, meta_every: int = 1) -> None:
        self.owner = owner
        self.params = [p for p in owner.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.meta_every = meta_every

    # ----------------------------------------------------------------------------------- declared needs
    def check(self, ctx: StepContext) -> None:
        """Refuse, with a ValueError, a setup this learner cannot work in (called when the wrapper is built)."""
        who = self.who(ctx)
        if ctx.reducer.distributed and not self.distributed:
            raise ValueError(f"distributed training does not support {who}{self.why_not_distributed}")
        if not self.reweighting and ctx.weighting.reweights:
            raise ValueError(
                f"weighting={strategy_name(ctx.weighting)!r} needs labels that do not learn, but {who} learns them in the meta step "
                "(whose virtual step uses the constant aux_weight); use a fixed strategy such as 'human' or 'kmeans'"
            )
        if not self.augmenting and ctx.generator is not None and ctx.generator.augments:
            raise ValueError(f"{who} does not support a strategy that augments the batch (generator={strategy_name(ctx.generator)!r})")
        if not self.generating and self.owner is ctx.generator and ctx.generator.generates_features:
            raise ValueError(
                f"{who} learns a strategy that generates the auxiliary head's data with {type(self).__name__}, whose hypergradient "
                "reaches it through the targets only; give the strategy a learner that declares generating (JointHypergradientLearner)"
            )

    def check_scaling(self, ctx: StepContext) -> None:
        """Refuse a loss scaler (``step(..., scaler=...)``) if the learner cannot take one."""
        if not self.loss_scaling:
            raise ValueError(f"scaler= is not supported by {self.who(ctx)}")

    def who(self, ctx: StepContext) -> str:
        """The owner, as messages name it: ``generator='maxl'``, ``weighting='maoal'``."""
        kind = "generator" if self.owner is ctx.generator else "weighting"
        return f"{kind}={strategy_name(self.owner)!r}"

    # ----------------------------------------------------------------------------------- the meta step
    def due(self, call: int) -> bool:
        """Whether the ``call``-th meta step (counting from 1) is taken: the first of every ``meta_every``."""
        return (call - 1) % self.meta_every == 0

    def update(self, ctx: StepContext, batch: Batch) -> MetaUpdate | None:
        """The meta step's update, checked, not applied; None if skipped (non-finite with
        ``nonfinite="skip"``, or a gradient that overflowed under loss scaling).

        Changes nothing: no parameter, buffer, ``.grad`` or optimizer state.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement update(ctx, batch)")

    def fused_step(self, ctx: StepContext, batch: Batch) -> tuple[ModelStep, MetaUpdate | None] | None:
        """A model step and this meta step computed together at the same theta, sharing their work;
        None (the default) when they cannot share, and the wrapper runs them one after the other.
        Changes nothing, as :meth:`update`."""
        return None

    def terms(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        """The meta objective's terms on ``batch`` by name, differentiable with respect to the learner's
        parameters, for diagnostics (:func:`auxlab.diagnostics.hypergradient_parts`); none by default."""
        return {}

    def gradient(self, ctx: StepContext, objective: Tensor, terms: Mapping[str, Tensor], *, buffers: Mapping[str, Tensor] | None = None) -> MetaUpdate | None:
        """The update that minimises ``objective``: its gradient for the learner's parameters
        (summed over the ranks, each of which holds its own samples' share), checked finite; None if
        skipped. ``terms`` name the objective's parts in the message of a non-finite one."""
        grads = ctx.scaling.grad(objective, self.params, label="auxlab.gradient.meta")
        ctx.reducer.sum_([g for g in grads if g is not None])
        checked, parts = ctx.scaling.meta_check(objective, grads, terms)
        if not ctx.guard.check("meta", checked, **parts):
            return None
        return MetaUpdate(objective.detach(), grads, buffers or {})

    def apply(self, ctx: StepContext, update: MetaUpdate) -> None:
        """Commit ``update``: the owner's buffers, then a step of the learner's optimizer."""
        commit_buffers(self.owner, update.buffers)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.params, update.grads):
            p.grad = ctx.scaling.as_grad(g)
        ctx.scaling.step(self.optimizer)
        self.after_update(update)

    def after_update(self, update: MetaUpdate) -> None:
        """Called after an update was applied (e.g. to project the parameters, or move a baseline)."""

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The learner's state for the wrapper's checkpoint: its optimizer's."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, from a copy: ``Optimizer.load_state_dict`` keeps some of the given tensors
        (Adam's step count, SGD's momentum), which would otherwise be shared with the optimizer they came from."""
        self.optimizer.load_state_dict(copy.deepcopy(dict(state["optimizer"])))
