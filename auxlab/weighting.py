"""Auxiliary-loss weighting: how much the auxiliary loss counts in each model step.

One small :class:`AuxWeighting` subclass per rule, registered under a name that
``MetaAuxWrapper(weighting="name")`` accepts:

| name | class | weight of the auxiliary loss |
|---|---|---|
| ``"constant"`` | :class:`ConstantWeighting` | ``aux_weight`` (default; the paper's rule) |
| ``"gcs"`` | :class:`GradientCosineWeighting` | dropped or scaled on the shared layers when its gradient conflicts with the primary gradient |
| ``"uncertainty"`` | :class:`UncertaintyWeighting` | learned homoscedastic uncertainty of each loss |
| ``"maoal"`` | :class:`ModuleWeighting` | one meta-learned weight per module of the model |

A rule acts at one of two levels. A *loss-level* rule (:meth:`AuxWeighting.combine`) rewrites
the model step's loss from ``L_pri`` and ``L_aux``. A *gradient-level* rule
(``needs_gradients = True``, :meth:`AuxWeighting.gradient_scales`) receives the gradients of both
losses for every parameter and scales the auxiliary one per parameter: the model step then
applies ``g_pri + aux_weight * scale * g_aux``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from auxlab._checks import check_number
from auxlab._gradients import Scale
from auxlab.learners.base import MetaLearner
from auxlab.learners.module_weighting import GradientScaleLearner

__all__ = ["WEIGHTINGS", "AuxWeighting", "ConstantWeighting", "GradientCosineWeighting", "ModuleWeighting", "UncertaintyWeighting"]

#: Weighting name -> class, filled by ``class MyRule(AuxWeighting, name="mine")``.
WEIGHTINGS: dict[str, type[AuxWeighting]] = {}


class AuxWeighting(nn.Module):
    """Base class of auxiliary-loss weighting rules.

    A subclass overrides :meth:`combine` (a loss-level rule) or sets ``needs_gradients = True`` and
    overrides :meth:`gradient_scales` (a gradient-level rule). Its parameters are trained with the
    model by the user's optimizer (they are in ``wrapper.parameters()``), unless the class names a
    meta ``learner`` (:mod:`auxlab.learners`): then :meth:`~auxlab.MetaAuxWrapper.meta_step` trains
    them through it, bi-level, from the primary loss on the meta batch after a virtual step, and
    they are left out of ``wrapper.parameters()``.

    Giving ``name="..."`` in the class statement registers the class under that name.
    """

    name: ClassVar[str | None] = None
    #: Whether :meth:`gradient_scales` is used: the model step computes ``g_pri`` and ``g_aux`` apart.
    needs_gradients: ClassVar[bool] = False
    #: Whether the rule changes the model step from ``L_pri + aux_weight * L_aux`` (every rule but the constant one).
    reweights: ClassVar[bool] = True
    #: Whether the rule works in data-parallel training.
    distributed: ClassVar[bool] = False
    #: The learner of the rule's parameters in the meta step; None: the user's optimizer trains them.
    learner: ClassVar[type[MetaLearner] | None] = None
    #: Whether the meta step learns the rule's parameters (``learner`` is set); derived, not to be set.
    meta_learned: ClassVar[bool] = False

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.meta_learned = cls.learner is not None
        cls.name = name
        if name is not None:
            if name in WEIGHTINGS:
                raise ValueError(f"a weighting named {name!r} is already registered ({WEIGHTINGS[name].__name__})")
            WEIGHTINGS[name] = cls

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_wrapper(cls, *, model: nn.Module, head_name: str, **kwargs: Any) -> AuxWeighting:
        """Build the rule for ``MetaAuxWrapper(weighting="name", weighting_kwargs=kwargs)``.

        The default ignores the wrapped ``model`` and its head's name; a rule built from the
        model's structure overrides this.
        """
        return cls(**kwargs)

    def combine(self, primary_loss: Tensor, aux_loss: Tensor, aux_weight: float) -> Tensor:
        """The model step's loss from ``L_pri`` and ``L_aux``; default ``L_pri + aux_weight * L_aux``."""
        return primary_loss + aux_weight * aux_loss

    def gradient_scales(
        self, primary_grads: Mapping[str, Tensor | None], aux_grads: Mapping[str, Tensor | None]
    ) -> dict[str, Scale]:
        """For ``needs_gradients`` rules: the scale of the auxiliary gradient, by parameter name.

        Args:
            primary_grads: ``grad L_pri`` for each trainable parameter of the network
                (``"model.<name>"`` for the classifier's, ``"aux_head.<name>"`` for the auxiliary
                head's); None where the loss does not reach the parameter.
            aux_grads: ``grad L_aux``, the same way.

        Returns:
            Scales by parameter name; a parameter left out keeps scale 1.
        """
        return {}

    def after_meta_step(self) -> None:
        """Called after the meta step updated a ``meta_learned`` rule (e.g. to project its weights)."""


class ConstantWeighting(AuxWeighting, name="constant"):
    """``L_pri + aux_weight * L_aux`` at every step: the paper's rule and the default."""

    reweights = False
    distributed = True


class GradientCosineWeighting(AuxWeighting, name="gcs"):
    """Gradient cosine similarity (Du et al., *Adapting Auxiliary Losses Using Gradient Similarity*, 2018).

    On the parameters that both losses reach (the classifier's layers below its head), the
    auxiliary gradient is used only as far as it agrees with the primary one, measured by the
    cosine ``cos = <g_pri, g_aux> / (|g_pri| |g_aux|)`` over all those parameters together:

    - ``mode="drop"`` (the paper's unweighted rule): ``g_pri + aux_weight * g_aux`` if ``cos >= 0``,
      else ``g_pri``;
    - ``mode="scale"`` (the weighted rule): ``g_pri + aux_weight * max(cos, 0) * g_aux``.

    The auxiliary head itself always gets its full gradient. Costs one more backward pass than
    the constant rule.

    Args:
        mode: ``"drop"`` or ``"scale"``.

    Attributes:
        last_cosine: the cosine of the latest model step (None before the first).
    """

    needs_gradients = True
    last_cosine: float | None

    def __init__(self, mode: Literal["drop", "scale"] = "drop") -> None:
        super().__init__()
        if mode not in ("drop", "scale"):
            raise ValueError(f"mode={mode!r} is not known; choose 'drop' (the unweighted rule) or 'scale' (the weighted rule)")
        self.mode = mode
        self.last_cosine = None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def gradient_scales(
        self, primary_grads: Mapping[str, Tensor | None], aux_grads: Mapping[str, Tensor | None]
    ) -> dict[str, Scale]:
        shared = [name for name, g in primary_grads.items() if g is not None and aux_grads.get(name) is not None]
        if not shared:
            self.last_cosine = None
            return {}
        g_pri = torch.cat([primary_grads[name].reshape(-1) for name in shared])  # type: ignore[union-attr]
        g_aux = torch.cat([aux_grads[name].reshape(-1) for name in shared])  # type: ignore[union-attr]
        norms = torch.linalg.vector_norm(g_pri) * torch.linalg.vector_norm(g_aux)
        cosine = float(g_pri @ g_aux / norms) if float(norms) > 0 else 0.0
        self.last_cosine = cosine
        weight = (1.0 if cosine >= 0 else 0.0) if self.mode == "drop" else max(cosine, 0.0)
        return {name: weight for name in shared}


class UncertaintyWeighting(AuxWeighting, name="uncertainty"):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), classification form.

    ``exp(-s_pri) L_pri + s_pri / 2 + exp(-s_aux) aux_weight L_aux + s_aux / 2``, with
    ``s = log sigma^2`` of each task learned jointly with the model by the user's optimizer (the
    two log-variances are in ``wrapper.parameters()``). At ``s = 0`` it is the constant rule. The
    reported loss includes the ``s / 2`` terms, so it can be negative.

    Args:
        initial_log_variance: the starting ``s`` of both tasks.
    """

    log_variances: nn.Parameter

    def __init__(self, initial_log_variance: float = 0.0) -> None:
        super().__init__()
        value = check_number(initial_log_variance, "initial_log_variance", signed=True)
        self.log_variances = nn.Parameter(torch.full((2,), value))

    def combine(self, primary_loss: Tensor, aux_loss: Tensor, aux_weight: float) -> Tensor:
        s = self.log_variances.to(primary_loss.dtype)
        return torch.exp(-s[0]) * primary_loss + s[0] / 2 + torch.exp(-s[1]) * aux_weight * aux_loss + s[1] / 2


class ModuleWeighting(AuxWeighting, name="maoal"):
    """Module-level meta-learned importance of the auxiliary loss, as in MAOAL.

    One learnable weight ``w_m`` per module ``m`` of the classifier scales the auxiliary loss's
    gradient inside that module: the model step applies ``g_pri + aux_weight * w_m * g_aux`` to
    the module's parameters (parameters outside every named module, and the auxiliary head, keep
    weight 1). The weights start at 1, where the rule equals the constant one exactly.

    :meth:`~auxlab.MetaAuxWrapper.meta_step` learns them bi-level: with
    ``theta'(w) = theta - inner_lr * (g_pri + aux_weight * w * g_aux)`` it minimises the primary
    loss on the meta batch (a development split carved from the training set) at ``theta'``.
    ``theta'`` is linear in ``w``, so the hypergradient ``-inner_lr * aux_weight * <u_m, g_aux,m>``
    (``u`` the primary gradient at ``theta'``) is exact with first-order gradients only. After each
    update the weights are clipped at 0.

    Args:
        modules: names of the classifier's submodules (as in ``model.named_modules()``), one weight
            each. Default: every top-level child with trainable parameters except the primary head
            (which the auxiliary loss does not reach).
        model: the classifier (the wrapper passes it).
        head_name: its primary head's name (the wrapper passes it).

    Attributes:
        module_names: the modules, in the order of :attr:`weights`.
        weights: ``(M,)`` the modules' weights.
    """

    learner = GradientScaleLearner
    needs_gradients = True
    weights: nn.Parameter
    module_names: tuple[str, ...]

    def __init__(self, *, model: nn.Module, head_name: str, modules: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the classifier, an nn.Module, got {type(model).__name__}")
        named = dict(model.named_modules())
        if modules is None:
            modules = [
                name for name, child in model.named_children()
                if name != head_name and any(p.requires_grad for p in child.parameters())
            ]
            if not modules:
                raise ValueError("the model has no top-level child with trainable parameters besides its head; name the modules with modules=[...]")
        elif isinstance(modules, str) or not modules or not all(isinstance(m, str) for m in modules):
            raise TypeError(f"modules must be a non-empty list of module names, got {modules!r}")
        for name in modules:
            if name not in named or name == "":
                raise ValueError(f"modules entry {name!r} is not a submodule of the model; its top-level children are {[n for n, _ in model.named_children()]}")
        names = tuple(modules)
        if len(set(names)) != len(names):
            raise ValueError(f"modules lists a module twice: {list(names)}")
        nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
        if nested:
            raise ValueError(f"modules must not contain one another, got {nested[0][1]!r} inside {nested[0][0]!r}")
        self.module_names = names
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.weights = nn.Parameter(torch.ones(len(names), device=device))
        # "model.<module>." prefixes of the multi-task network's parameter names
        self._prefixes = tuple(f"model.{name}." for name in names)

    @classmethod
    def from_wrapper(cls, *, model: nn.Module, head_name: str, **kwargs: Any) -> AuxWeighting:
        return cls(model=model, head_name=head_name, **kwargs)

    def extra_repr(self) -> str:
        return f"modules={list(self.module_names)}"

    def gradient_scales(
        self, primary_grads: Mapping[str, Tensor | None], aux_grads: Mapping[str, Tensor | None]
    ) -> dict[str, Scale]:
        scales: dict[str, Scale] = {}
        for name in aux_grads:
            for m, prefix in enumerate(self._prefixes):
                if name.startswith(prefix):
                    scales[name] = self.weights[m]
                    break
        return scales

    def after_meta_step(self) -> None:
        with torch.no_grad():
            self.weights.clamp_(min=0.0)
