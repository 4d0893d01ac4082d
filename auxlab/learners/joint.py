"""DTG-AuxL's upper level: a joint generator of auxiliary data and labels, learned by the hypergradient
through the auxiliary loss's dependence on both."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from auxlab._gradients import named_dot
from auxlab.engines import ENGINES, FirstOrderPass, LinearisedEngine, MetaProblem, first_order_pass
from auxlab.learners.base import MetaLearner, MetaUpdate, ModelStep, adam_optimizer
from auxlab.losses import negative_entropy
from auxlab.multitask import call_on_buffer_copies

if TYPE_CHECKING:
    from auxlab.context import Batch, StepContext
    from auxlab.generators.dtg import JointDataTaskGenerator

__all__ = ["JointHypergradientLearner"]


class JointHypergradientLearner(MetaLearner):
    """The meta step of a generator of auxiliary data and labels (DTG-AuxL, ``generator="dtg"``).

    The auxiliary loss ``L_aux(theta, phi)`` depends on the generator's parameters ``phi`` through the
    targets and through the generated data the auxiliary head reads, so the hypergradient is not linear in
    the targets (as MAXL's is) and is taken as a mixed second derivative by double backward:
    ``-scale * aux_weight * d/dphi [grad_theta L_aux(theta, phi) . p]`` with ``scale * p`` the engine's
    horizon (:meth:`~auxlab.engines.LinearisedEngine.direction`): ``inner_lr * u`` for one virtual step
    (``"jvp"``, ``"finite_difference"``), a truncated Neumann series for ``H^-1 u`` for ``"implicit"`` (the
    paper's implicit gradient), ``u`` the primary meta loss's gradient after the virtual step. The objective
    adds the entropy term on the labels (``entropy_weight``, as MAXL's) and the generator's explicit instance
    regularisation (:meth:`~auxlab.generators.dtg.JointDataTaskGenerator.instance_loss`).

    :meth:`fused_step` shares the forward pass and the gradient at theta with the model step. One process
    only, without a loss scaler. The upper level's primary loss is best taken on held-out data (a
    development split, as in AuxiLearn's and DTG-AuxL's bi-level problems): ``held_out_meta_batch``.
    """

    held_out_meta_batch = True
    generating = True
    why_not_distributed = " (the mixed second derivative is not averaged over the ranks)"
    loss_scaling = False

    default_optimizer = staticmethod(adam_optimizer)

    def check(self, ctx: StepContext) -> None:
        """Also refuse an engine without a horizon to take (``"functional"``, ``"higher"``)."""
        super().check(ctx)
        if not isinstance(ctx.engine, LinearisedEngine):
            choices = ", ".join(repr(name) for name, engine in ENGINES.items() if isinstance(engine, LinearisedEngine))
            raise ValueError(  # noqa: TRY004 - a refused setup, as every other the wrapper refuses
                f"{self.who(ctx)} takes its hypergradient by double backward along a linearised engine's horizon; "
                f"choose engine= one of {choices} ('implicit' is the paper's implicit gradient), got engine={ctx.engine.name!r}"
            )

    def update(self, ctx: StepContext, batch: Batch) -> MetaUpdate | None:
        features = ctx.generator_input(batch.x)
        return self._update(ctx, batch, *self._first_order(ctx, batch, features), features)

    def fused_step(self, ctx: StepContext, batch: Batch) -> tuple[ModelStep, MetaUpdate | None] | None:
        (primary, aux, features), net_buffers = call_on_buffer_copies(ctx.net, batch.x, with_features=True)
        features = features.detach()
        problem, first = self._first_order(ctx, batch, features, at_theta=(primary, aux, net_buffers))
        ctx.check_primary(first.primary, batch.x)
        loss = first.primary_loss + ctx.aux_weight * first.aux_loss
        finite = ctx.guard.check("model", loss, **{"primary loss": first.primary_loss, "auxiliary loss": first.aux_loss})
        update = self._update(ctx, batch, problem, first, features)  # raises before anything changed, if it must
        return ModelStep(loss, first.grads if finite else None, first.buffers), update

    def terms(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        """``"primary"`` (value: the primary loss after the virtual step; gradient: the hypergradient), ``"entropy"``
        and ``"instance"``, each weighted, differentiable with respect to the generator (for diagnostics)."""
        features = ctx.generator_input(batch.x)
        return self._terms(ctx, batch, *self._first_order(ctx, batch, features), features)

    def _first_order(
        self, ctx: StepContext, batch: Batch, features: Tensor, at_theta: tuple[Tensor, Tensor, dict[str, Tensor]] | None = None
    ) -> tuple[MetaProblem, FirstOrderPass]:
        """The meta problem with the generator's targets held fixed, and its :func:`~auxlab.engines.first_order_pass`."""
        with torch.no_grad():
            targets = self._generator(ctx)(features, batch.y)
        problem = ctx.problem(batch, targets)
        return problem, first_order_pass(problem, at_theta=at_theta)

    def _update(self, ctx: StepContext, batch: Batch, problem: MetaProblem, first: FirstOrderPass, features: Tensor) -> MetaUpdate | None:
        terms = self._terms(ctx, batch, problem, first, features)
        objective = terms["primary"] + terms["entropy"] + terms["instance"]
        named = {"primary loss at theta'": terms["primary"], "entropy term": terms["entropy"], "instance regularisation": terms["instance"]}
        return self.gradient(ctx, objective, named)

    def _terms(self, ctx: StepContext, batch: Batch, problem: MetaProblem, first: FirstOrderPass, features: Tensor) -> dict[str, Tensor]:
        generator = self._generator(ctx)
        p, scale = cast(LinearisedEngine, ctx.engine).direction(problem, first.params, first.u)
        with torch.enable_grad():
            targets = generator(features, batch.y)  # differentiable with respect to phi
            (primary, aux), _ = call_on_buffer_copies(ctx.net, batch.x, aux_input_grad=True)
            _, aux_loss = problem.loss_terms(primary, aux, targets)
            virtual = problem.parameters()
            g_aux = torch.autograd.grad(aux_loss, list(virtual.values()), create_graph=True, allow_unused=True)
            hyper = -scale * ctx.aux_weight * named_dot(dict(zip(virtual, g_aux)), p)
            return {
                "primary": first.meta_loss + (hyper - hyper.detach()),
                "entropy": ctx.entropy_weight * negative_entropy(targets.mean(dim=0)),
                "instance": generator.instance_weight * generator.instance_loss(features),
            }

    @staticmethod
    def _generator(ctx: StepContext) -> JointDataTaskGenerator:
        return cast("JointDataTaskGenerator", ctx.strategy)
