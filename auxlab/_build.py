"""Building a :class:`~auxlab.MetaAuxWrapper`'s parts from its arguments, each checked with a clear
error before anything is built on it."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from auxlab._checks import check_batch
from auxlab.context import Batch, strategy_name
from auxlab.distributed import LocalReducer, Reducer
from auxlab.engines import ENGINES, Engine, get_engine
from auxlab.generators import GENERATORS, AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask
from auxlab.learners.base import MetaLearner, OptimizerFactory
from auxlab.weighting import WEIGHTINGS, AuxWeighting

if TYPE_CHECKING:
    from auxlab.wrapper import MetaAuxWrapper

T = TypeVar("T")

SINGLE_TASK = "single"


def check_model(model: object) -> nn.Module:
    """``model`` if it is an ``nn.Module``; a TypeError otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def check_nonfinite(nonfinite: object) -> Literal["raise", "skip"]:
    """``nonfinite`` if it is ``"raise"`` or ``"skip"``; a ValueError naming the choices otherwise."""
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite={nonfinite!r} is not known; choose 'raise' or 'skip'")
    return nonfinite


def check_seed(seed: object) -> int:
    """``seed`` as an int; a TypeError for anything but an integer."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def build_mask(psi: int | Sequence[int] | None, mask: HierarchyMask | None, num_classes: int) -> HierarchyMask:
    """The hierarchy from ``psi`` (default 5 for every class) or ``mask``, not both."""
    if mask is not None:
        if psi is not None:
            raise ValueError("give psi or mask, not both")
        if not isinstance(mask, HierarchyMask):
            raise TypeError(f"mask must be a HierarchyMask, got {type(mask).__name__}")
        if mask.num_classes != num_classes:
            raise ValueError(f"mask has {mask.num_classes} classes (psi={list(mask.psi)}) but num_classes={num_classes}")
        return mask
    if psi is None:
        psi = 5
    if isinstance(psi, numbers.Integral) and not isinstance(psi, bool):
        return HierarchyMask.uniform(num_classes, int(psi))
    built = HierarchyMask(psi)  # type: ignore[arg-type]
    if built.num_classes != num_classes:
        raise ValueError(f"psi has {built.num_classes} entries but num_classes={num_classes}; give one sub-class count per class, or a single int for all")
    return built


def build_engine(engine: str | Engine, distributed: bool | dist.ProcessGroup) -> Engine:
    """The engine named ``engine`` (or given), refused if training is distributed and it cannot be."""
    built = get_engine(engine)  # a clear error now rather than at the first meta step
    if distributed is not False and not built.distributed:
        choices = " or ".join(repr(name) for name, e in ENGINES.items() if e.distributed)
        raise ValueError(
            f"distributed training needs engine={choices}, got engine={built.name!r}: "
            "only they write the hypergradient from gradients that can be averaged over the ranks"
        )
    return built


def build_reducer(distributed: bool | dist.ProcessGroup) -> LocalReducer:
    """The ranks' collective operations: a stand-in for one process, or over the given group."""
    return LocalReducer() if distributed is False else Reducer(None if distributed is True else distributed)


def build_generator(
    generator: str | AuxLabelGenerator, kwargs: Mapping[str, Any] | None, mask: HierarchyMask, *, model: nn.Module, head_name: str,
    seed: int, device: torch.device,
) -> AuxLabelGenerator | None:
    """The strategy ``generator`` names (built with ``kwargs``), or the given instance, on ``device``; None for single task."""
    built = _generator(generator, kwargs, mask, model=model, head_name=head_name, seed=seed)
    return None if built is None else built.to(device=device)


def _generator(
    generator: str | AuxLabelGenerator, kwargs: Mapping[str, Any] | None, mask: HierarchyMask, *, model: nn.Module, head_name: str, seed: int
) -> AuxLabelGenerator | None:
    if isinstance(generator, str) and generator == SINGLE_TASK:
        if kwargs:
            raise ValueError("generator_kwargs has no meaning with generator='single'")
        return None
    built = from_registry(
        "generator", generator, kwargs, GENERATORS, AuxLabelGenerator, names=[*sorted(GENERATORS), SINGLE_TASK], what="a strategy name",
        build=lambda cls, options: cls.from_wrapper(mask, model=model, head_name=head_name, default_seed=seed, **options),
    )
    if built.mask != mask:
        raise ValueError(f"the generator's hierarchy psi={list(built.mask.psi)} differs from the wrapper's psi={list(mask.psi)}")
    return built


def build_weighting(weighting: str | AuxWeighting, kwargs: Mapping[str, Any] | None, *, model: nn.Module, head_name: str, device: torch.device) -> AuxWeighting:
    """The rule ``weighting`` names (built with ``kwargs``), or the given instance, on ``device``."""
    built = from_registry(
        "weighting", weighting, kwargs, WEIGHTINGS, AuxWeighting, names=sorted(WEIGHTINGS), what="a name",
        build=lambda cls, options: cls.from_wrapper(model=model, head_name=head_name, **options),
    )
    return built.to(device=device)


def from_registry(
    kind: str, value: str | T, kwargs: Mapping[str, Any] | None, registry: Mapping[str, type[T]], base: type[T], *,
    names: Sequence[str], what: str, build: Callable[[type[T], dict[str, Any]], T],
) -> T:
    """``value`` itself if it is a ``base`` instance (then ``kwargs`` must be empty), else the class ``registry``
    holds under the name ``value``, built by ``build(cls, kwargs)``: each mistake named, with the choices."""
    if isinstance(value, base):
        if kwargs:
            raise ValueError(f"{kind}_kwargs is only for a {kind} given by name; configure the instance directly")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be {what} or an {base.__name__}, got {type(value).__name__}")
    if value not in registry:
        raise ValueError(f"{kind}={value!r} is not known; choose one of {list(names)} or pass an {base.__name__}")
    try:
        return build(registry[value], dict(kwargs or {}))
    except TypeError as error:
        raise TypeError(f"could not build {kind}={value!r} from {kind}_kwargs={dict(kwargs or {})}: {error}") from error


def build_learner(
    generator: AuxLabelGenerator | None, weighting: AuxWeighting, *, generator_optimizer: OptimizerFactory | None,
    weighting_optimizer: OptimizerFactory | None, meta_every: int,
) -> MetaLearner | None:
    """The learner of whatever learns in the meta step (the strategy's labels or the weighting), or None."""
    learnable = [p for p in generator.parameters() if p.requires_grad] if generator is not None else []
    weights = [p for p in weighting.parameters() if p.requires_grad] if weighting.learner is not None else []
    if learnable and weights:
        raise ValueError(
            f"generator={strategy_name(cast(AuxLabelGenerator, generator))!r} and weighting={strategy_name(weighting)!r} both learn in the "
            "meta step, and a wrapper has one meta learner; use a strategy whose labels do not learn with this weighting"
        )
    if learnable and generator is not None:
        return generator.learner(generator, optimizer=(generator_optimizer or generator.learner.default_optimizer)(learnable), meta_every=meta_every)
    if weights and weighting.learner is not None:
        return weighting.learner(weighting, optimizer=(weighting_optimizer or weighting.learner.default_optimizer)(weights), meta_every=meta_every)
    return None


def check_strategy(generator: AuxLabelGenerator | None, weighting: AuxWeighting, reducer: LocalReducer) -> None:
    """Refuse what the strategy and the weighting declare they cannot do together (the learner checks its own needs)."""
    if generator is None:
        if weighting.reweights:
            raise ValueError(f"weighting={strategy_name(weighting)!r} needs an auxiliary loss to weight; generator='single' has none")
        return
    if reducer.distributed and not weighting.distributed:
        raise ValueError(f"distributed training does not support weighting={strategy_name(weighting)!r}; use weighting='constant'")
    if generator.augments and (generator.learns or generator.needs_index):
        raise ValueError(f"generator={strategy_name(generator)!r} augments the batch, so it can neither learn nor read dataset indices")


def select_virtual_params(prefixes: Sequence[str] | None, named: Mapping[str, Tensor]) -> frozenset[str] | None:
    """The names of ``named`` (trainable parameters) that ``prefixes`` select, for ``virtual_params``."""
    if prefixes is None:
        return None
    if isinstance(prefixes, str) or not all(isinstance(p, str) for p in prefixes) or not prefixes:
        raise TypeError(f"virtual_params must be a non-empty list of parameter names or prefixes, got {prefixes!r}")
    chosen: set[str] = set()
    for prefix in prefixes:
        matched = {n for n in named if n == prefix or n.startswith(prefix.rstrip(".") + ".")}
        if not matched:
            tops = sorted({n.rsplit(".", 1)[0] for n in named})
            raise ValueError(f"virtual_params entry {prefix!r} matches no trainable parameter; modules with parameters: {tops}")
        chosen |= matched
    return frozenset(chosen)


STATE_FORMAT = 2


def extra_state(mask: HierarchyMask, single_task: bool, learner: MetaLearner | None, steps: Mapping[str, int], skipped: Mapping[str, int]) -> dict[str, Any]:
    """A wrapper's extra state: the hierarchy, the meta learner's state and the step counters."""
    return {
        "format": STATE_FORMAT, "psi": list(mask.psi), "single_task": single_task,
        "meta_learner": None if learner is None else learner.state_dict(), "steps": dict(steps), "skipped_steps": dict(skipped),
    }


def check_extra_state(state: Any, mask: HierarchyMask, single_task: bool, learner: MetaLearner | None) -> Mapping[str, Any] | None:
    """The meta learner's part of a checked extra state; a ValueError if it was made for another wrapper.

    Format 1 (auxlab 0.1) kept the generator's or the weighting's optimizer state apart; it is read as the learner's.
    """
    if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
        raise ValueError("the checkpoint was not written by MetaAuxWrapper.state_dict() of this auxlab version")
    if state["psi"] != list(mask.psi):
        raise ValueError(f"the checkpoint was made for psi={state['psi']} but this wrapper has psi={list(mask.psi)}")
    if state["single_task"] != single_task:
        kinds = {True: "single-task", False: "auxiliary"}
        raise ValueError(f"the checkpoint was made for {kinds[state['single_task']]} training but this wrapper is {kinds[single_task]}")
    if state["format"] == 1:
        optimizer = state["generator_optimizer"] if state["generator_optimizer"] is not None else state.get("weighting_optimizer")
        saved: Mapping[str, Any] | None = None if optimizer is None else {"optimizer": optimizer}
    else:
        saved = state["meta_learner"]
    if (saved is None) != (learner is None):
        raise ValueError("the checkpoint's generator learns and this one does not (or the reverse): different strategies")
    return saved


def check_call(
    call: str, x: Tensor, y: Tensor, index: Tensor | None, x_meta: Tensor | None, y_meta: Tensor | None, *,
    num_classes: int, like: Tensor, generator: AuxLabelGenerator | None, reducer: LocalReducer,
) -> Batch:
    """The data of the wrapper's ``call``, checked before anything runs (see :func:`~auxlab._checks.check_batch`),
    and, across ranks, the same call with batches of the same sizes on every rank (:meth:`Reducer.agree`); the
    meta batch defaults to ``(x, y)``; ``index`` is required by a strategy that ``needs_index``."""
    batch = _check_batch(x, y, index, x_meta, y_meta, num_classes=num_classes, like=like, generator=generator)
    reducer.agree(call, batch.x.shape[0], batch.x_meta.shape[0], like.device)
    return batch


def _check_batch(
    x: Tensor, y: Tensor, index: Tensor | None, x_meta: Tensor | None, y_meta: Tensor | None, *,
    num_classes: int, like: Tensor, generator: AuxLabelGenerator | None,
) -> Batch:
    y = check_batch(x, y, "x", "y", num_classes=num_classes, like=like)
    if generator is not None and generator.needs_index and index is None:
        raise ValueError(
            f"the {type(generator).__name__} strategy gives a fixed label per training sample and needs index=: "
            "pass the samples' dataset indices (wrap your dataset in auxlab.data.IndexedDataset)"
        )
    if (x_meta is None) != (y_meta is None):
        raise ValueError("give both x_meta and y_meta, or neither (then the meta loss uses x, y)")
    if x_meta is None or y_meta is None:
        return Batch(x, y, index, x, y)
    return Batch(x, y, index, x_meta, check_batch(x_meta, y_meta, "x_meta", "y_meta", num_classes=num_classes, like=like))


def check_loadable(wrapper: MetaAuxWrapper, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """A ValueError, before anything is loaded, unless ``state_dict`` fits ``wrapper``: its hierarchy, its
    strategy (:func:`check_extra_state`), every key and shape (:func:`check_state_fits`)."""
    if "_extra_state" not in state_dict:
        raise ValueError("state_dict has no '_extra_state' entry: it was not written by MetaAuxWrapper.state_dict()")
    check_extra_state(state_dict["_extra_state"], wrapper.mask, wrapper.is_single_task, wrapper.meta_learner)
    check_state_fits(wrapper.state_dict(), state_dict, strict=strict)


def check_state_fits(own: Mapping[str, Any], state_dict: Mapping[str, Any], *, strict: bool) -> None:
    """A ValueError, before anything is loaded, if ``state_dict`` does not fit ``own`` (keys and shapes)."""
    if strict:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit this wrapper: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if isinstance(v, Tensor) and k in own and isinstance(own[k], Tensor) and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"state_dict does not fit this wrapper's shapes: {wrong[:5]}")


def head_parameter(model: nn.Module, head_name: str) -> Tensor:
    """The primary head's weight: its device and dtype are the model's."""
    head = model.get_submodule(head_name)
    assert isinstance(head, nn.Linear)
    return head.weight


def new_aux_head(model: nn.Module, head_name: str, num_aux_classes: int) -> nn.Linear:
    """The auxiliary head: an ``nn.Linear`` from the primary head's input to the K auxiliary classes (not initialised here)."""
    weight = head_parameter(model, head_name)
    return nn.Linear(weight.shape[1], num_aux_classes, device=weight.device, dtype=weight.dtype)


def aux_input(generator: AuxLabelGenerator | None) -> Callable[[Tensor, bool], Tensor] | None:
    """What the auxiliary head reads instead of the classifier's features: a ``generates_features`` strategy's
    :meth:`~auxlab.AuxLabelGenerator.auxiliary_features`; None for every other strategy."""
    return generator.auxiliary_features if generator is not None and generator.generates_features else None


def check_scaler(scaler: object) -> torch.amp.GradScaler | None:
    """``scaler`` if it is an enabled GradScaler; None if none or disabled."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None
