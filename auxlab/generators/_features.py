"""The base of strategies that read the classifier's own features (its head input), and their MLP."""

from __future__ import annotations

import numbers
from typing import Any, cast

from torch import Tensor, nn
from typing_extensions import Self

from auxlab._seeding import seeded
from auxlab.generators.base import AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask
from auxlab.multitask import head_input


class FeatureReader(AuxLabelGenerator):
    """A strategy on ``h``, the ``(B, d)`` input of the classifier's primary head, detached
    (``reads_features``): the ``"maxl-light"`` generator and the ``"rl"`` policy.

    The classifier is held by reference, outside the module tree: its parameters are neither in
    :meth:`parameters` nor in :meth:`state_dict`, and ``.to()``/``train()`` of the strategy leave
    it alone.

    Args:
        mask: the class-to-sub-class hierarchy.
        model: the classifier; the wrapper passes the wrapped model.
        head_name: name of the classifier's primary ``nn.Linear``.
    """

    seeded = True
    reads_features = True
    head_name: str
    _classifier: nn.Module

    def __init__(self, mask: HierarchyMask, *, model: nn.Module, head_name: str) -> None:
        super().__init__(mask)
        classifier_head(model, head_name)  # checked here, before anything is built on it
        self.head_name = head_name
        object.__setattr__(self, "_classifier", model)  # a reference, not a submodule

    @property
    def head(self) -> nn.Linear:
        """The classifier's primary head, whose input ``h`` the strategy reads."""
        return cast(nn.Linear, self._classifier.get_submodule(self.head_name))

    def extra_repr(self) -> str:
        return f"features=input of {type(self._classifier).__name__}.{self.head_name}"

    @property
    def classifier(self) -> nn.Module:
        """The classifier whose head input the strategy reads (not a submodule of it)."""
        return self._classifier

    @classmethod
    def from_wrapper(cls, mask: HierarchyMask, *, model: nn.Module, head_name: str, default_seed: int, **kwargs: Any) -> Self:
        """The strategy on the wrapped ``model``'s head input; ``generator_kwargs`` give its other arguments (``seed`` included)."""
        return cls(mask, model=model, head_name=head_name, **{"seed": default_seed, **kwargs})

    def features(self, x: Tensor) -> Tensor:
        """``(B, d)``: the input of the classifier's head on ``x``, without gradient, detached.

        The classifier runs in its current mode on copies of its buffers: no running statistic,
        parameter or ``.grad`` of it changes.
        """
        return head_input(self._classifier, self.head_name, x)


def classifier_head(model: object, head_name: str) -> nn.Linear:
    """The classifier's primary head ``model.<head_name>``; a TypeError/ValueError naming what is wrong otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the classifier, an nn.Module, got {type(model).__name__}")
    try:
        head = model.get_submodule(head_name)
    except AttributeError as error:
        raise ValueError(f"head_name={head_name!r} is not a submodule of the model") from error
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head {head_name!r} must be an nn.Linear, got {type(head).__name__}")
    return head


def feature_mlp(head: nn.Linear, *, hidden: int | None, out_features: int, seed: int) -> nn.Sequential:
    """``Linear(d, hidden) -> ReLU -> Linear(hidden, out_features)`` on the head's input width ``d``.

    Built on the head's device and dtype, initialised from ``seed`` (the caller's random state is
    left as it was); ``hidden=None`` means ``d``.
    """
    width = head.in_features
    if hidden is None:
        hidden = width
    if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 1:
        raise ValueError(f"hidden must be a positive integer (the MLP's hidden width), got {hidden!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    device, dtype = head.weight.device, head.weight.dtype
    with seeded(int(seed), device):
        return nn.Sequential(
            nn.Linear(width, int(hidden), device=device, dtype=dtype),
            nn.ReLU(),
            nn.Linear(int(hidden), out_features, device=device, dtype=dtype),
        )


def check_features(x: Tensor, mlp: nn.Sequential, who: str) -> None:
    """A ValueError unless ``x`` is a ``(B, d)`` batch of head inputs for ``mlp`` (from :func:`feature_mlp`)."""
    width = cast(nn.Linear, mlp[0]).in_features
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(
            f"{who} reads the classifier's features, (B, {width}); got {tuple(x.shape)}. "
            "Pass generator.features(x) for a batch of inputs x"
        )
