"""RL-AUX-style auxiliary labels: a policy draws each sample's sub-class and learns by REINFORCE."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from auxlab.generators._features import FeatureReader, check_features, feature_mlp
from auxlab.hierarchy import HierarchyMask
from auxlab.learners.policy_gradient import PolicyGradientLearner

__all__ = ["PolicyLabels"]


class PolicyLabels(FeatureReader, name="rl"):
    """RL-AUX-style auxiliary labels: a stochastic policy assigns the sub-classes, and learns from
    the improvement of the primary task by policy gradient (REINFORCE), with no second-order gradient.

    The policy is an MLP ``Linear(d, hidden) -> ReLU -> Linear(hidden, K)`` on ``h``, the ``(B, d)``
    input of the classifier's primary head (``head_name``), detached, as in the ``"maxl-light"``
    generator. Its scores become a distribution over each sample's own block only
    (``pi(. | h, y) = mask.softmax(scores, y)``, exactly zero elsewhere), and :meth:`sample` draws
    one sub-class per sample from it: the targets are hard, one-hot labels. With
    ``per_example_weights=True`` the MLP has one more output unit, the logit of a Bernoulli gate
    ``g ~ Bernoulli(sigmoid(logit))`` per sample; the sample's auxiliary target (and so its
    auxiliary loss) is multiplied by the drawn ``g``, 0 or 1.

    In :meth:`~auxlab.MetaAuxWrapper.meta_step` the wrapper draws ``(targets, log_prob)`` with
    :meth:`sample`, takes a virtual SGD step of the classifier on the batch with those targets, and
    measures the reward ``R``, the decrease of the primary loss on the meta batch that the step
    achieved. It then minimises :meth:`policy_objective`

        ``J = -(R - b) * mean_i log pi(a_i | h_i, y_i)``,

    whose gradient is the REINFORCE estimate of ``-grad E[R] / B`` for a batch of ``B`` samples
    whose actions ``a_i`` (sub-class, and gate) were drawn jointly: the exact estimator of the joint
    action's score function is ``(R - b) * sum_i grad log pi(a_i)``, and the mean instead of the sum
    scales it by ``1/B``, which keeps the generator optimizer's learning rate independent of the
    batch size. ``b`` is a baseline, an exponential moving average of the past rewards

        ``b <- R`` (first reward),  ``b <- m * b + (1 - m) * R`` (later; ``m = baseline_momentum``),

    moved by :meth:`record_reward` after the update. It does not depend on the current draw, so it
    leaves the estimator unbiased (``E[grad log pi(a)] = 0``) and only reduces its variance. The
    model step trains the auxiliary head on a fresh draw (:meth:`forward`).

    The draws come from a ``torch.Generator`` seeded with ``seed``, made on the features' device at
    the first draw: the same seed gives the same draws. Its state is part of ``state_dict()`` (as the
    module's extra state), so a run resumed from a checkpoint draws what the uninterrupted run would.
    The classifier is held by reference, outside the module tree: only the MLP's parameters are the
    generator's, and the baseline is a buffer.

    Args:
        mask: the class-to-sub-class hierarchy.
        model: the classifier whose head input the policy reads; the wrapper passes the wrapped model.
        head_name: name of the classifier's primary ``nn.Linear`` (its input is ``h``).
        hidden: the MLP's hidden width; default ``d``, the head's input width.
        per_example_weights: also learn a Bernoulli gate per sample that keeps (1) or drops (0) its
            auxiliary loss.
        baseline_momentum: ``m`` in ``[0, 1)``, the momentum of the rewards' moving average; 0 makes
            the baseline the last reward.
        seed: seeds the MLP's initialisation and the draws; the caller's random state is left as it was.
    """

    learner = PolicyGradientLearner
    net: nn.Sequential
    baseline: Tensor
    num_rewards: Tensor
    per_example_weights: bool
    baseline_momentum: float
    seed: int

    def __init__(
        self,
        mask: HierarchyMask,
        *,
        model: nn.Module,
        head_name: str,
        hidden: int | None = None,
        per_example_weights: bool = False,
        baseline_momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__(mask, model=model, head_name=head_name)
        head = self.head
        if not isinstance(per_example_weights, bool):
            raise TypeError(f"per_example_weights must be True or False, got {per_example_weights!r}")
        if (
            isinstance(baseline_momentum, bool)
            or not isinstance(baseline_momentum, numbers.Real)
            or not 0 <= float(baseline_momentum) < 1
        ):
            raise ValueError(
                f"baseline_momentum must be a number with 0 <= baseline_momentum < 1 (the momentum of the rewards' "
                f"moving average), got {baseline_momentum!r}"
            )
        outputs = mask.num_aux_classes + int(per_example_weights)  # the last unit is the gate's logit
        self.net = feature_mlp(head, hidden=hidden, out_features=outputs, seed=seed)  # validates hidden and seed
        self.per_example_weights = per_example_weights
        self.baseline_momentum = float(baseline_momentum)
        self.seed = int(seed)
        device, dtype = head.weight.device, head.weight.dtype
        self.register_buffer("baseline", torch.zeros((), device=device, dtype=dtype))
        self.register_buffer("num_rewards", torch.zeros((), device=device, dtype=torch.long))
        self._rng: torch.Generator | None = None
        #: A state restored by set_extra_state before the first draw: (device type, generator state).
        self._restored_rng: tuple[str, Tensor] | None = None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, "
            f"per_example_weights={self.per_example_weights}, baseline_momentum={self.baseline_momentum}, seed={self.seed}"
        )

    # ----------------------------------------------------------------------------------- the policy
    def _outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(B, K)`` sub-class scores and the ``(B,)`` gate logits (None without per-example weights)."""
        check_features(x, self.net, "the RL label policy")
        out = self.net(x)
        k = self.mask.num_aux_classes
        return out[:, :k], (out[:, k] if self.per_example_weights else None)

    def policy(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """The policy's distribution, differentiable with respect to its parameters.

        Args:
            x: ``(B, d)`` head inputs of the classifier (``features``).
            y: ``(B,)`` primary labels in ``[0, C)``.

        Returns:
            ``(probs, keep)``: ``(B, K)`` probability of each sub-class, exactly zero outside each
            sample's block ``mask.block(y)``; and the ``(B,)`` probability that the gate keeps the
            sample's auxiliary loss, or None without per-example weights.
        """
        scores, gate_logit = self._outputs(x)
        return self.mask.softmax(scores, y), (torch.sigmoid(gate_logit) if gate_logit is not None else None)

    def label_distribution(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """``(B, K)``: the policy's sub-class probabilities (:meth:`policy`), without drawing."""
        return self.policy(x, y)[0]

    def sample(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw one sub-class per sample inside its block (and its gate), with their log-probabilities.

        Args:
            x: ``(B, d)`` head inputs of the classifier (``features``).
            y: ``(B,)`` primary labels in ``[0, C)``.
            index: unused (the policy labels any input).

        Returns:
            ``(targets, log_prob)``: ``(B, K)`` one-hot targets in ``x``'s dtype, detached, zero
            outside each block (times the drawn gate with per-example weights: a dropped sample's
            row is all zero); and the ``(B,)`` log-probability of each sample's draw (sub-class plus
            gate), differentiable with respect to the policy's parameters.
        """
        scores, gate_logit = self._outputs(x)
        probs = self.mask.softmax(scores, y)
        rng = self._generator(x.device)
        column = torch.multinomial(probs.detach(), 1, generator=rng)  # (B, 1), never a zero-probability column
        # The drawn column has positive probability, so its log is finite; only it is taken, so no
        # gradient flows through log(0) outside the block.
        log_prob = probs.gather(1, column).squeeze(1).log()
        targets = self.one_hot(column.squeeze(1), dtype=x.dtype)
        if gate_logit is not None:
            gate = torch.bernoulli(torch.sigmoid(gate_logit.detach()), generator=rng)  # (B,) 0 or 1
            log_prob = log_prob - nn.functional.binary_cross_entropy_with_logits(gate_logit, gate, reduction="none")
            targets = targets * gate[:, None].to(x.dtype)
        return targets.detach(), log_prob

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """The targets of a fresh :meth:`sample` (the model step trains on sampled labels).

        :class:`~auxlab.MetaAuxWrapper` passes the features of its own forward pass; on its own,
        call ``generator(generator.features(x), y)``.

        Returns:
            ``(B, K)`` one-hot targets, detached (see :meth:`sample`).
        """
        with torch.no_grad():
            return self.sample(x, y, index)[0]

    # ----------------------------------------------------------------------------------- learning
    def policy_objective(self, log_prob: Tensor, reward: Tensor | float) -> Tensor:
        """REINFORCE with a baseline: ``-(reward - baseline) * log_prob.mean()``, to minimise.

        Its gradient is an unbiased estimate of ``-grad E[reward] / B`` (see the class docstring for
        the ``1/B``): the baseline, a moving average of past rewards, does not depend on the draw.

        Args:
            log_prob: ``(B,)`` log-probabilities from :meth:`sample`.
            reward: the scalar reward of the draw (detached here), e.g. the decrease of the primary
                loss on the meta batch.

        Returns:
            A scalar tensor, differentiable with respect to the policy's parameters.
        """
        if log_prob.dim() != 1:
            raise ValueError(f"log_prob must be the (B,) log-probabilities from sample(), got shape {tuple(log_prob.shape)}")
        reward = self._scalar_reward(reward, log_prob)
        return -(reward - self.baseline.to(log_prob.dtype)) * log_prob.mean()

    @torch.no_grad()
    def record_reward(self, reward: Tensor | float) -> None:
        """Move the baseline to ``reward`` (the first one) or by ``b <- m * b + (1 - m) * reward``."""
        value = self._scalar_reward(reward, self.baseline)
        if not bool(torch.isfinite(value)):
            raise ValueError(f"reward must be finite to move the baseline, got {float(value)}")
        moved = self.baseline_momentum * self.baseline + (1.0 - self.baseline_momentum) * value
        self.baseline.copy_(torch.where(self.num_rewards == 0, value, moved))
        self.num_rewards.add_(1)

    @staticmethod
    def _scalar_reward(reward: Tensor | float, like: Tensor) -> Tensor:
        """``reward`` as a detached 0-dim tensor with ``like``'s dtype and device; a ValueError if it is not a scalar."""
        if isinstance(reward, Tensor):
            valid = reward.numel() == 1 and reward.dtype != torch.bool and not reward.is_complex()
        else:
            valid = isinstance(reward, numbers.Real) and not isinstance(reward, bool)
        if not valid:
            raise ValueError(f"reward must be one real number (the decrease of the primary meta loss), got {reward!r}")
        value = reward.detach() if isinstance(reward, Tensor) else torch.tensor(float(reward), dtype=like.dtype)
        return value.reshape(()).to(device=like.device, dtype=like.dtype)

    # ----------------------------------------------------------------------------------- randomness
    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of the draws on ``device``: made at the first draw there, from ``seed`` or a restored state."""
        if self._rng is not None and self._rng.device == device:
            return self._rng
        rng = torch.Generator(device=device)
        restored, self._restored_rng = self._restored_rng, None
        if restored is not None and restored[0] == device.type:
            rng.set_state(restored[1])
        else:
            if restored is not None:
                warnings.warn(
                    f"the saved random state of the RL label policy is for a {restored[0]} generator but the features are on "
                    f"{device}; the draws start again from seed={self.seed}",
                    stacklevel=3,
                )
            rng.manual_seed(self.seed)
        self._rng = rng
        return rng

    def get_extra_state(self) -> dict[str, Any]:
        """The draws' generator state: ``{"rng": (device type, state) or None}`` (None before the first draw)."""
        if self._rng is not None:
            return {"rng": (self._rng.device.type, self._rng.get_state())}
        return {"rng": self._restored_rng}

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`: the next draw continues the saved generator's stream."""
        if not isinstance(state, dict) or "rng" not in state:
            raise ValueError(f"the extra state of PolicyLabels must be a dict with key 'rng' from get_extra_state(), got {state!r}")
        saved = state["rng"]
        self._rng = None
        self._restored_rng = None if saved is None else (str(saved[0]), saved[1].cpu())

