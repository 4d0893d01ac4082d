"""What is timed: the variants, each a step on its own copy of one freshly initialised model."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auxlab import MetaAuxWrapper
from auxlab.engines import ENGINES
from benchmarks.models import build_model
from benchmarks.step_cost.config import (
    AUTOCAST_DTYPES,
    AUXLAB_SINGLE,
    SINGLE,
    Config,
    iteration_name,
    meta_step_name,
    method_step_name,
    model_step_name,
    step_name,
)

Scaler = torch.amp.GradScaler | None


@dataclass
class Variant:
    """One thing to time: ``step`` runs it once; ``clear`` drops the ``.grad`` tensors it left behind."""

    name: str
    step: Callable[[], Any]
    clear: Callable[[], None]
    #: how many training steps one ``step`` call takes; times are reported per training step
    calls: int = 1


def make_batch(config: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """A fixed random batch ``x: (B, 3, S, S)``, ``y: (B,)`` covering the classes in turn."""
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=generator)
    y = torch.arange(config.batch_size) % config.num_classes
    return x.to(device), y.to(device)


def base_model(config: Config, device: torch.device) -> nn.Module:
    """The freshly initialised classifier every variant copies, in training mode on ``device``."""
    return build_model(config.model, num_classes=config.num_classes, seed=config.seed).to(device).train()


def make_wrapper(base: nn.Module, config: Config, generator: str, engine: str, **overrides: Any) -> MetaAuxWrapper:
    """A wrapper around a copy of ``base``, in training mode, with :meth:`Config.wrapper_kwargs` and ``overrides``."""
    kwargs = {"seed": config.seed} if generator == "single" else {**config.wrapper_kwargs(), **overrides}
    return MetaAuxWrapper(copy.deepcopy(base), num_classes=config.num_classes, generator=generator, engine=engine, **kwargs).train()


def _update(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: Scaler) -> None:
    """``loss.backward(); optimizer.step()``, through ``scaler`` if given (``.grad`` was cleared before the forward)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def single_task_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: Scaler = None) -> None:
    """A user's training step without auxlab: cross entropy, ``backward``, ``optimizer.step``."""
    optimizer.zero_grad(set_to_none=True)
    _update(F.cross_entropy(model(x), y), optimizer, scaler)


def _model_step(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: Scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    _update(wrapper.loss(x, y), optimizer, scaler)


def _meta_step(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: Scaler) -> None:
    """``wrapper.meta_step`` alone (it takes no optimizer and no scaler)."""
    wrapper.meta_step(x, y)


def _iteration(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: Scaler) -> None:
    """A MAXL iteration in the two-call form: the model step, then ``meta_step``."""
    _model_step(wrapper, optimizer, x, y, scaler)
    wrapper.meta_step(x, y)


def _wrapper_step(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, scaler: Scaler) -> None:
    """Both steps in one call."""
    wrapper.step(x, y, optimizer, scaler=scaler)


#: The variants timed per engine, in table order: how each is named, what one call runs.
PER_ENGINE = ((meta_step_name, _meta_step), (iteration_name, _iteration), (step_name, _wrapper_step))


def _clear(*optimizers: torch.optim.Optimizer | None) -> Callable[[], None]:
    def clear() -> None:
        for optimizer in optimizers:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)

    return clear


def _repeated(step: Callable[[], Any], times: int) -> Callable[[], None]:
    """``step`` called ``times`` times in a row (``step`` itself when once)."""
    if times == 1:
        return step

    def run() -> None:
        for _ in range(times):
            step()

    return run


def _under_autocast(variants: list[Variant], config: Config, device: torch.device) -> list[Variant]:
    """``variants`` whose steps run under ``torch.autocast`` with ``config.autocast``'s dtype (as they are if None)."""
    if config.autocast is None:
        return variants
    dtype = AUTOCAST_DTYPES[config.autocast]

    def under(step: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=dtype):
                step()

        return run

    return [Variant(v.name, under(v.step), v.clear, v.calls) for v in variants]


def build_variants(config: Config, x: Tensor, y: Tensor) -> list[Variant]:
    """Every variant of :meth:`Config.variant_names`, in that order, each on its own copy of one freshly
    initialised model on ``x``'s device, with its own SGD optimizer (and GradScaler under float16 autocast)."""
    scaling = sorted(name for name, engine in ENGINES.items() if engine.loss_scaling)
    if config.autocast == "fp16" and any(e not in scaling for e in config.engines):
        raise ValueError(f"autocast fp16 runs wrapper.step with a GradScaler, which needs engines among {scaling}; got {config.engines}")
    device = x.device
    base = base_model(config, device)

    def scaler() -> Scaler:
        """A fresh GradScaler for one variant under float16 autocast; None otherwise."""
        return torch.amp.GradScaler(device.type) if config.autocast == "fp16" else None

    def sgd(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=config.lr)

    plain = copy.deepcopy(base)
    plain_opt = sgd(plain)
    variants = [Variant(SINGLE, functools.partial(single_task_step, plain, plain_opt, x, y, scaler()), _clear(plain_opt))]
    w = make_wrapper(base, config, "single", config.engines[0])
    opt = sgd(w)
    variants.append(Variant(AUXLAB_SINGLE, functools.partial(_model_step, w, opt, x, y, scaler()), _clear(opt)))
    # with meta_every = k, one timed call runs k batches (one meta step) and counts as k
    k = config.meta_every
    for g in config.generators:
        w = make_wrapper(base, config, g, config.engines[0])
        opt = sgd(w)
        variants.append(Variant(model_step_name(g), functools.partial(_model_step, w, opt, x, y, scaler()), _clear(opt, w.generator_optimizer)))
        for name_of, run in PER_ENGINE:
            for engine in config.engines:
                w = make_wrapper(base, config, g, engine)
                opt = sgd(w)
                step = functools.partial(run, w, opt, x, y, scaler())
                variants.append(Variant(name_of(engine, g), _repeated(step, k), _clear(opt, w.generator_optimizer), k))
    index = torch.arange(x.shape[0], device=device)
    x_dev, y_dev = x.flip(0), y.flip(0)  # a development batch for maoal and rl
    for method in config.methods:
        generator, _, weighting = method.partition("+")
        overrides: dict[str, Any] = {"psi": 4 if generator == "sla" else config.psi, "weighting": weighting or "constant"}
        if generator == "random":
            overrides["generator_kwargs"] = {"num_samples": x.shape[0]}
        w = make_wrapper(base, config, generator, config.engines[0], **overrides)
        opt = sgd(w)
        method_step = functools.partial(w.step, x, y, opt, index=index, x_meta=x_dev, y_meta=y_dev, scaler=scaler())
        variants.append(Variant(method_step_name(method), method_step, _clear(opt, w.generator_optimizer, w.weighting_optimizer)))
    return _under_autocast(variants, config, device)
