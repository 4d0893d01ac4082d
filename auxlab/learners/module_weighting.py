"""MAOAL-style meta step: one weight per module of the auxiliary gradient, learned through the virtual step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from auxlab._gradients import Scale, combined_gradients, detached, named_dot
from auxlab.engines import (
    GradientsAtTheta,
    ImplicitEngine,
    MetaProblem,
    gradients_at_theta,
    loss_terms_at,
    meta_gradient,
    meta_loss_after,
    virtual_step,
)
from auxlab.learners.base import MetaLearner, MetaUpdate, ModelStep, adam_optimizer

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

    With ``engine="implicit"`` (an :class:`~auxlab.engines.ImplicitEngine` with the Neumann series) the
    horizon is longer: the hypergradient is ``-scale * d/dw [G(theta, w) . p]`` with
    ``G = g_pri + aux_weight * scale(w) * g_aux`` the reweighted update direction and ``scale * p`` the
    Neumann series for ``J^-T u``, ``J`` the Jacobian of ``G`` over theta (not symmetric: the weights
    differ between modules, so conjugate gradient is refused). With no extra term it is the one-step result.

    :meth:`fused_step` shares one forward pass and the two gradients at theta between the model
    step (with the scales before their update) and the hypergradient.
    """

    reweighting = True
    held_out_meta_batch = True

    default_optimizer = staticmethod(adam_optimizer)

    def check(self, ctx: StepContext) -> None:
        """Also refuse conjugate gradient, which needs a symmetric Jacobian, and a loss scaler with the implicit engine."""
        super().check(ctx)
        if isinstance(ctx.engine, ImplicitEngine) and ctx.engine.solver == "cg":
            raise ValueError(
                f"{self.who(ctx)} with engine=ImplicitEngine(solver='cg'): conjugate gradient needs a symmetric Hessian, and the "
                "module weights make the lower level's Jacobian non-symmetric; use solver='neumann'"
            )

    def check_scaling(self, ctx: StepContext) -> None:
        """A loss scaler works with the one-step hypergradient only."""
        if isinstance(ctx.engine, ImplicitEngine):
            raise ValueError(f"scaler= is not supported by {self.who(ctx)} with engine={ctx.engine.name!r}")  # noqa: TRY004 - a refused setup

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
        """The exact one-step hypergradient of the scales' parameters (``theta'`` is linear in the scales), or the
        implicit engine's."""
        direction = combined_gradients(at_theta.primary_grads, at_theta.aux_grads, ctx.aux_weight, scales, problem.parameters())
        step = {name: g for name, g in direction.items() if g is not None}
        if not isinstance(ctx.engine, ImplicitEngine):
            meta_primary: Tensor = meta_loss_after(problem, step)
            return self.gradient(ctx, meta_primary, {"primary loss at theta'": meta_primary})
        params = {name: p.detach() for name, p in problem.parameters().items()}
        meta_loss, u = meta_gradient(problem, virtual_step(params, [None if g is None else g.detach() for g in direction.values()], problem.inner_lr))
        fixed = detached(scales)

        def reweighted(problem: MetaProblem, leaves: dict[str, Tensor]) -> list[Tensor | None]:
            """``g_pri + aux_weight * scale * g_aux`` at ``leaves``, the scales held fixed, with its graph."""
            _, primary_loss, aux_loss, _, _ = loss_terms_at(problem, leaves)
            g_pri = torch.autograd.grad(primary_loss, list(leaves.values()), create_graph=True, retain_graph=True, allow_unused=True)
            g_aux = torch.autograd.grad(aux_loss, list(leaves.values()), create_graph=True, allow_unused=True)
            return list(combined_gradients(dict(zip(leaves, g_pri)), dict(zip(leaves, g_aux)), problem.aux_weight, fixed, leaves).values())

        p, scale = ctx.engine.direction(problem, params, u, field=reweighted)
        hyper = -scale * named_dot(step, p)
        surrogate = meta_loss + (hyper - hyper.detach())  # value: the primary loss at theta'; gradient: the implicit one
        return self.gradient(ctx, surrogate, {"primary loss at theta'": surrogate})
