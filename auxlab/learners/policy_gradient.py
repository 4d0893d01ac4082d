"""REINFORCE: a label policy learns from the improvement of the primary task, without second-order gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from auxlab.engines import gradient_at_theta, meta_loss_after
from auxlab.learners.base import MetaLearner, MetaUpdate

if TYPE_CHECKING:
    from auxlab.context import Batch, StepContext

__all__ = ["PolicyGradientLearner"]


@dataclass(frozen=True)
class PolicyUpdate(MetaUpdate):
    """A policy-gradient update, with the reward it was computed from."""

    reward: Tensor | None = None


class PolicyGradientLearner(MetaLearner):
    """The meta step of a strategy that draws its labels from a policy (e.g. ``"rl"``), by REINFORCE.

    The owner draws ``(targets, log_prob)`` with ``sample(inputs, y, index)``; the learner takes a
    virtual SGD step of the classifier on ``(x, y)`` with those targets and measures the reward
    ``R``, the decrease of the primary loss on the meta batch that the step achieved (first-order
    gradients only). It then minimises the owner's ``policy_objective(log_prob, R)`` and, once the
    update is applied, calls ``record_reward(R)`` (e.g. to move a baseline). The meta batch is
    best held out (a development split).
    """

    held_out_meta_batch = True
    why_not_distributed = ": its policy-gradient reward is not averaged over the ranks"

    def update(self, ctx: StepContext, batch: Batch) -> MetaUpdate | None:
        """None if skipped: as non-finite, or (under loss scaling) because the virtual step's gradient overflowed."""
        policy = cast(Any, self.owner)
        targets, log_prob = policy.sample(ctx.generator_input(batch.x), batch.y, batch.index)
        expected = (batch.y.shape[0], ctx.mask.num_aux_classes)
        if targets.shape != expected or log_prob.shape != expected[:1]:
            raise ValueError(f"generator.sample returned targets {tuple(targets.shape)} and log_prob {tuple(log_prob.shape)}; expected {expected} and {expected[:1]}")
        problem = ctx.problem(batch, targets.detach())
        gradient = gradient_at_theta(problem)
        if ctx.scaling.overflowed(list(gradient.values())):
            return None  # an overflow, as in the model step's own gradient: the scaler lowers the scale
        with torch.no_grad():
            before = meta_loss_after(problem, {})
            after = meta_loss_after(problem, {name: g for name in problem.parameters() if (g := gradient[name]) is not None})
        reward = before - after
        objective = policy.policy_objective(log_prob, reward)
        update = self.gradient(ctx, objective, {"reward": reward, "policy objective": objective})
        return None if update is None else PolicyUpdate(update.objective, update.grads, update.buffers, reward=reward.detach())

    def after_update(self, update: MetaUpdate) -> None:
        """The owner's ``record_reward`` with the update's reward."""
        cast(Any, self.owner).record_reward(cast(PolicyUpdate, update).reward)
