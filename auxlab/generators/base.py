"""The base class of every auxiliary-label strategy, and the registry of strategy names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from auxlab.hierarchy import HierarchyMask
from auxlab.learners.base import MetaLearner
from auxlab.learners.hypergradient import HypergradientLearner

if TYPE_CHECKING:
    from auxlab.data import TrainingData

__all__ = ["GENERATORS", "AuxLabelGenerator"]

#: Strategy name -> class, filled by ``class MyLabels(AuxLabelGenerator, name="mine")``.
GENERATORS: dict[str, type[AuxLabelGenerator]] = {}


def check_mask(mask: object) -> HierarchyMask:
    """``mask`` itself if it is a :class:`HierarchyMask`; a TypeError naming what was given otherwise."""
    if not isinstance(mask, HierarchyMask):
        raise TypeError(f"mask must be a HierarchyMask, got {type(mask).__name__}; build one with HierarchyMask(psi)")
    return mask


class AuxLabelGenerator(nn.Module):
    """Base class of auxiliary-label strategies: maps a batch to ``(B, K)`` target probabilities.

    A subclass implements :meth:`forward` and returns, for each sample, a probability vector over
    the ``K = mask.num_aux_classes`` auxiliary classes that is zero outside the sample's own block
    (``mask.softmax`` does this for learned scores). If the subclass has trainable parameters,
    :class:`~auxlab.MetaAuxWrapper` meta-trains them in ``meta_step`` through its ``learner``;
    otherwise its labels are fixed.

    What a strategy needs is declared on the class and checked by the wrapper:

    - ``needs_index``: ``forward`` reads the samples' dataset indices (``index``), e.g. for a fixed
      label per training sample; wrap the dataset in :class:`auxlab.data.IndexedDataset`.
    - ``reads_features``: ``forward`` reads the classifier's head input instead of ``x``.
    - ``augments``: the auxiliary task is posed on transformed copies of the batch (SLA):
      the wrapper calls :meth:`augment` and trains the auxiliary head on its result.
    - ``generates_features``: the auxiliary head reads generated data made from the classifier's
      features by :meth:`auxiliary_features` (DTG-AuxL) instead of the features themselves.
    - ``learner``: the class that learns the trainable parameters in the meta step
      (:mod:`auxlab.learners`): :class:`~auxlab.learners.hypergradient.HypergradientLearner`
      (MAXL's hypergradient; the default) or
      :class:`~auxlab.learners.policy_gradient.PolicyGradientLearner` (REINFORCE through
      :meth:`sample` and :meth:`policy_objective`), or one of your own.

    Giving ``name="..."`` in the class statement registers the class under that name, so that
    ``MetaAuxWrapper(generator="...")`` can build it through :meth:`from_wrapper`.

    Args:
        mask: the class-to-sub-class hierarchy.
    """

    name: ClassVar[str | None] = None
    needs_index: ClassVar[bool] = False
    #: Whether the constructor takes ``seed=``; the wrapper then passes its own ``seed`` by default.
    seeded: ClassVar[bool] = False
    #: Whether the targets depend on the input only through the classifier's features: the wrapper
    #: then calls ``forward`` with the ``(B, d)`` input of the classifier's primary head, detached,
    #: from its own forward pass, in place of ``x`` (no second classifier forward for the targets).
    reads_features: ClassVar[bool] = False
    #: Whether the auxiliary head trains on :meth:`augment`'s transformed copies of the batch.
    augments: ClassVar[bool] = False
    #: Whether the auxiliary head reads :meth:`auxiliary_features` of the classifier's features.
    generates_features: ClassVar[bool] = False
    #: What learns the strategy's trainable parameters (if it has any) in the meta step.
    learner: ClassVar[type[MetaLearner]] = HypergradientLearner

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name  # a subclass of a registered strategy is not registered under its parent's name
        if name is not None:
            if name in GENERATORS:
                raise ValueError(f"a label generator named {name!r} is already registered ({GENERATORS[name].__name__})")
            GENERATORS[name] = cls

    def __init__(self, mask: HierarchyMask) -> None:
        super().__init__()
        self.mask = check_mask(mask)

    @classmethod
    def from_wrapper(
        cls, mask: HierarchyMask, *, model: nn.Module, head_name: str, default_seed: int, **kwargs: Any
    ) -> AuxLabelGenerator:
        """Build the strategy for :class:`~auxlab.MetaAuxWrapper` (``generator="name"``).

        ``kwargs`` are the wrapper's ``generator_kwargs``. The default ignores the wrapped ``model``
        and its head's name, and passes the wrapper's seed (``default_seed``) to a ``seeded`` strategy
        unless ``kwargs`` has its own ``seed``; a strategy built from the model overrides this.
        """
        if cls.seeded:
            kwargs = {"seed": default_seed, **kwargs}
        return cls(mask, **kwargs)

    @classmethod
    def kwargs_from_data(cls, data: TrainingData) -> dict[str, Any]:
        """The ``generator_kwargs`` a runner derives from the training set (e.g. its size, or its fine
        labels); the default is none. A runner (``python -m auxlab.experiments``) calls this for any
        registered strategy, so it never needs to know the strategy's name.

        Raises:
            ValueError: if the strategy needs something ``data`` does not have (e.g. fine labels).
        """
        return {}

    @property
    def learns(self) -> bool:
        """Whether the strategy has trainable parameters for the meta step to update."""
        return any(p.requires_grad for p in self.parameters())

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """Auxiliary target probabilities.

        Args:
            x: ``(B, ...)`` inputs.
            y: ``(B,)`` primary labels in ``[0, C)``.
            index: ``(B,)`` dataset indices of the samples, for strategies with ``needs_index``.

        Returns:
            ``(B, K)`` probabilities, zero outside each sample's block ``mask.block(y)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, y, index=None)")

    def label_distribution(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """``(B, K)``: the distribution each sample's auxiliary label comes from, with what :meth:`forward` reads.

        For a deterministic strategy it is the targets themselves (the default); a strategy that
        draws its labels returns the probabilities it draws from, without drawing. Diagnostics read it.
        """
        targets: Tensor = self(x, y, index)
        return targets

    def one_hot(self, column: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(B, K)`` one-hot targets from ``(B,)`` auxiliary columns (for strategies with hard labels)."""
        return nn.functional.one_hot(column, self.mask.num_aux_classes).to(dtype)

    def augment(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """For ``augments`` strategies: the batch the auxiliary head trains on, ``(x_all, y_all)``.

        ``x_all`` is ``(M * B, ...)``, ``M`` transformed copies of the batch stacked copy by copy;
        its first ``B`` rows must be ``x`` itself (the identity comes first), because the primary
        head trains on them. :meth:`forward` then receives ``(x_all, y_all)``. ``y`` is None at
        inference (:meth:`aggregate`), and so is ``y_all`` then. The default returns the batch
        unchanged.
        """
        return x, y

    def auxiliary_features(self, features: Tensor, differentiable: bool = False) -> Tensor:
        """For ``generates_features`` strategies: the ``(B, d')`` data the auxiliary head reads, generated from
        ``features``, the ``(B, d)`` input of the classifier's primary head (with its gradient to the
        classifier). ``differentiable``: keep the gradient to the strategy's own parameters (the meta step
        needs it; the model step holds them fixed). The default returns ``features``."""
        return features

    def aggregate(self, aux: Tensor) -> Tensor:
        """For ``augments`` strategies: ``(B, C)`` class scores from the auxiliary head's logits on
        ``augment(x, None)[0]`` (SLA's aggregated inference; ``MetaAuxWrapper.aggregated_logits``)."""
        raise NotImplementedError(f"{type(self).__name__} has no aggregated inference over its auxiliary head")

    def extra_loss(self, primary: Tensor, aux: Tensor, y: Tensor) -> Tensor | None:
        """An additional term of the model step's loss, e.g. SLA's self-distillation; default None.

        Args:
            primary: ``(B, C)`` primary logits of the batch.
            aux: auxiliary logits of the batch the auxiliary head saw (``(M * B, K)`` for an
                ``augments`` strategy).
            y: ``(B,)`` labels.
        """
        return None

    def sample(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """For a policy-gradient ``learner``: sampled targets and their log-probabilities.

        Returns:
            ``(targets, log_prob)``: ``(B, K)`` targets, detached, zero outside each block, and the
            ``(B,)`` log-probability of each sample's drawn action under the policy, differentiable
            with respect to the strategy's parameters.
        """
        raise NotImplementedError(f"{type(self).__name__} learns by policy gradient and must implement sample(x, y, index=None)")

    def policy_objective(self, log_prob: Tensor, reward: Tensor) -> Tensor:
        """For a policy-gradient ``learner``: the scalar whose gradient is the REINFORCE estimate.

        The meta step minimises it; ``reward`` (a detached scalar) is the decrease of the primary
        loss on the meta batch that the sampled targets' virtual step achieved. Called with the
        ``log_prob`` of :meth:`sample`; :meth:`record_reward` follows once the step is committed.
        """
        raise NotImplementedError(f"{type(self).__name__} learns by policy gradient and must implement policy_objective(log_prob, reward)")

    def record_reward(self, reward: Tensor) -> None:
        """Called after a committed policy-gradient step with its reward (e.g. to move a baseline)."""
