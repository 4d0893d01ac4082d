"""MAXL's meta step: the label generator learns by the hypergradient through a virtual step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from auxlab.engines import ENGINES
from auxlab.learners.base import MetaLearner, MetaUpdate, ModelStep, adam_optimizer
from auxlab.losses import negative_entropy
from auxlab.multitask import call_on_buffer_copies

if TYPE_CHECKING:
    from auxlab.context import Batch, StepContext

__all__ = ["HypergradientLearner", "ScaleFreeHypergradientLearner"]


class HypergradientLearner(MetaLearner):
    """The label generator's meta step of MAXL (Liu, Davison & Johns, NeurIPS 2019).

    Forms the virtual step ``theta' = theta - inner_lr * grad_theta (L_pri + aux_weight * L_aux)``
    on ``(x, y)`` with the generator's targets, and minimises
    ``L_pri(f_theta'(x_meta), y_meta) + entropy_weight * sum_k pbar_k log pbar_k`` over the
    generator's parameters ``phi``, with the hypergradient of the wrapper's engine
    (:mod:`auxlab.engines`). No classifier parameter, BatchNorm running statistic, ``.grad`` or
    state of the user's optimizer changes.

    With an engine that ``shares_gradient`` (``"jvp"``, ``"finite_difference"``),
    :meth:`fused_step` shares the generator's forward pass and the gradient at theta, which the
    virtual step needs and the model step applies; otherwise the two steps run one after the other.
    Works in data-parallel training and with a loss scaler where the engine does.
    """

    distributed = True
    loss_scaling = True

    def check_scaling(self, ctx: StepContext) -> None:
        """A loss scaler needs an engine whose gradients can be taken on scaled losses."""
        if not ctx.engine.loss_scaling:
            choices = " or ".join(repr(name) for name, engine in ENGINES.items() if engine.loss_scaling)
            raise ValueError(
                f"scaler= with a generator that learns by hypergradient needs engine={choices}, got "
                f"engine={ctx.engine.name!r}: loss scaling through a second-order graph is not implemented"
            )

    def update(self, ctx: StepContext, batch: Batch) -> MetaUpdate | None:
        targets, buffers = ctx.targets(batch.x, batch.y, batch.index)
        meta_primary = ctx.engine.meta_loss(ctx.problem(batch, targets))
        return self._update(ctx, meta_primary, targets, buffers)

    def fused_step(self, ctx: StepContext, batch: Batch) -> tuple[ModelStep, MetaUpdate | None] | None:
        if not ctx.engine.shares_gradient:
            return None
        at_theta = features = None
        if ctx.strategy.reads_features:  # the forward pass at theta serves the targets too
            (primary, aux, features), net_buffers = call_on_buffer_copies(ctx.net, batch.x, with_features=True)
            at_theta = (primary, aux, net_buffers)
        targets, buffers = ctx.targets(batch.x, batch.y, batch.index, features)
        shared = ctx.engine.shared_step(ctx.problem(batch, targets), at_theta=at_theta)
        ctx.check_primary(shared.primary, batch.x)
        loss = shared.primary_loss + ctx.aux_weight * shared.aux_loss
        finite = ctx.guard.check("model", loss, **{"primary loss": shared.primary_loss, "auxiliary loss": shared.aux_loss})
        # a gradient that overflowed moved theta' off to infinity: the scaler skips both steps
        overflow = ctx.scaling.overflowed(list(shared.grads.values()))
        update = None if overflow else self._update(ctx, shared.surrogate, targets, buffers)  # raises before anything changed, if it must
        return ModelStep(loss, shared.grads if finite else None, shared.buffers), update

    def terms(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        """The meta objective's two terms on ``batch``, differentiable with respect to the generator:
        ``"primary"``, the primary loss after the virtual step, and ``"entropy"``,
        ``entropy_weight * sum_k pbar_k log pbar_k`` (for diagnostics: their gradients apart)."""
        targets, _ = ctx.targets(batch.x, batch.y, batch.index)
        primary = ctx.engine.meta_loss(ctx.problem(batch, targets))
        return {"primary": primary, "entropy": ctx.entropy_weight * self._entropy_term(ctx, targets)}

    def _update(self, ctx: StepContext, meta_primary: Tensor, targets: Tensor, buffers: Mapping[str, Tensor]) -> MetaUpdate | None:
        """The generator's update for ``meta_primary + entropy_weight * sum_k pbar_k log pbar_k``."""
        entropy_term = self._entropy_term(ctx, targets)
        objective = meta_primary + ctx.entropy_weight * entropy_term
        terms = {"primary loss at theta'": meta_primary, "entropy term": entropy_term}
        return self.gradient(ctx, objective, terms, buffers=buffers)

    @staticmethod
    def _entropy_term(ctx: StepContext, targets: Tensor) -> Tensor:
        """``sum_k pbar_k log pbar_k`` of the labels of every rank's batch together."""
        return negative_entropy(ctx.reducer.mean(targets.mean(dim=0)))



class ScaleFreeHypergradientLearner(HypergradientLearner):
    """MAXL's meta step with a scale-free optimizer by default: Adam, lr 1e-3.

    The one-step hypergradient is proportional to ``inner_lr`` (about 1e-5 to 1e-3 in norm on the
    small CNN with ``inner_lr`` 0.01), so plain SGD at the paper's lr 1e-3 barely moves the generator;
    Adam's step does not depend on the gradient's scale. The balanced generators use it.
    """

    default_optimizer = staticmethod(adam_optimizer)
