"""MAOAL-style meta step: one weight per module of the auxiliary gradient, learned through the virtual step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from auxlab._gradients import Scale, combined_gradients, detached
from auxlab.engines import GradientsAtTheta, MetaProblem, gradients_at_theta, meta_loss_after
from auxlab.learners.base import MetaLearner, MetaUpdate, ModelStep

if TYPE_CHECKING:
    from auxlab.context import Batch, StepContext

__all__ = ["GradientScaleLearner"]


class GradientScaleLearner(MetaLearner):
    """The meta step of a meta-learned, gradient-level weighting (``weighting="maoal"``).

    The owner's ``gradient_scales(g_pri, g_aux)`` gives, differentiably in its parameters ``w``, the
    scale of each parameter's auxiliary gradient. With
    ``theta'(w) = theta - inner_lr * (g_pri + aux_weight * scale(w) * g_aux)`` the learner minimises
    the primary loss on the meta batch (best a development split) at ``theta'``. ``theta'`` is
    linear in the scales, so the hypergradient is exact with first-order gradients only. After each
    update it calls the owner's ``after_meta_step()`` (e.g. to clip the weights).

    :meth:`fused_step` shares one forward pass and the two gradients at theta between the model
    step (with the scales before their update) and the hypergradient.
    """

    reweighting = True
    held_out_meta_batch = True

    @staticmethod
    def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam, lr 1e-3."""
        return torch.optim.Adam(params, lr=1e-3)

    def update(self, ctx: StepContext, batch: Batch) -> MetaUpdate | None:
        problem, at_theta = self._at_theta(ctx, batch)
        scales = self._scales(at_theta)
        return self._hypergradient(ctx, problem, at_theta, scales)

    def fused_step(self, ctx: StepContext, batch: Batch) -> tuple[ModelStep, MetaUpdate | None] | None:
        problem, at_theta = self._at_theta(ctx, batch)
        ctx.check_primary(at_theta.primary, batch.x)
        loss = at_theta.primary_loss + ctx.aux_weight * at_theta.aux_loss
        finite = ctx.guard.check("model", loss, **{"primary loss": at_theta.primary_loss, "auxiliary loss": at_theta.aux_loss})
        scales = self._scales(at_theta)
        # a gradient that overflowed moved theta' off to infinity: the scaler skips both steps
        overflow = ctx.scaling.overflowed([*at_theta.primary_grads.values(), *at_theta.aux_grads.values()])
        update = None if overflow else self._hypergradient(ctx, problem, at_theta, scales)  # raises before anything changed
        grads = combined_gradients(at_theta.primary_grads, at_theta.aux_grads, ctx.aux_weight, detached(scales), at_theta.primary_grads) if finite else None
        return ModelStep(loss, grads, at_theta.buffers), update

    def after_update(self, update: MetaUpdate) -> None:
        """The owner's ``after_meta_step()``."""
        cast(Any, self.owner).after_meta_step()

    def _at_theta(self, ctx: StepContext, batch: Batch) -> tuple[MetaProblem, GradientsAtTheta]:
        """The meta problem, with the (fixed) targets, and the two losses' gradients at theta."""
        with torch.no_grad():
            targets = ctx.targets(batch.x, batch.y, batch.index)[0]
        problem = ctx.problem(batch, targets)
        return problem, gradients_at_theta(problem)

    def _scales(self, at_theta: GradientsAtTheta) -> dict[str, Scale]:
        return cast(dict[str, Scale], cast(Any, self.owner).gradient_scales(at_theta.primary_grads, at_theta.aux_grads))

    def _hypergradient(self, ctx: StepContext, problem: MetaProblem, at_theta: GradientsAtTheta, scales: Mapping[str, Scale]) -> MetaUpdate | None:
        """The exact hypergradient of the scales' parameters: ``theta'`` is linear in the scales."""
        direction = combined_gradients(at_theta.primary_grads, at_theta.aux_grads, ctx.aux_weight, scales, problem.parameters())
        meta_primary: Tensor = meta_loss_after(problem, {name: g for name, g in direction.items() if g is not None})
        return self.gradient(ctx, meta_primary, {"primary loss at theta'": meta_primary})
