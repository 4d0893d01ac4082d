"""Building a run from the config: the split it trains on, its generator's arguments, its wrapper.

Nothing here knows a strategy by its name. What a generator is built from is asked of its class
(:meth:`~auxlab.AuxLabelGenerator.kwargs_from_data`), what a run needs of
:class:`~auxlab.experiments.strategies.Strategy`. :func:`check_data` and :func:`check_combinations`
refuse, before anything trains or any file is written, a strategy that cannot be built.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from auxlab.experiments.config import ExperimentConfig
from auxlab.experiments.errors import ConfigError
from auxlab.experiments.models import build_model, import_object
from auxlab.experiments.randomness import random_states_kept
from auxlab.experiments.strategies import DEFAULT_WEIGHTING, Strategy
from auxlab.experiments.tasks import RunSplit, TaskData, run_split
from auxlab.generators import GENERATORS
from auxlab.hierarchy import HierarchyMask
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["build_wrapper", "check_combinations", "check_data", "check_device", "check_model", "generator_kwargs", "run_data"]

_GENERATOR_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}

#: The constructor parameter that gets the features of ``config.kmeans_features`` (when it is not ``"pixels"``).
_FEATURES = "features"


def generator_kwargs(generator: str, config: ExperimentConfig, data: TaskData) -> dict[str, Any]:
    """The ``generator_kwargs`` that build ``generator`` for the training split ``data.train``.

    ``data.train`` is the split the run trains on (the whole training split, or its rest after a
    development split; see :func:`run_data`), so that the dataset indices of the run's batches
    index the tables built from it. The generator's class says what it needs, by
    :meth:`~auxlab.AuxLabelGenerator.kwargs_from_data` of :attr:`TaskData.training_data
    <auxlab.experiments.tasks.TaskData.training_data>` (``random``: the split's size, ``kmeans``:
    the split, ``human``: its fine labels; most: nothing). ``config.kmeans_features``, unless it is
    ``"pixels"``, is imported and given as ``features=`` to a generator whose constructor has a
    ``features`` parameter (``kmeans``). ``single`` gets none.

    Raises:
        ValueError: if the generator needs what the data does not have (e.g. fine labels), or
            ``kmeans_features`` cannot be imported.
    """
    cls = GENERATORS.get(generator)
    if cls is None:  # single task: no generator
        return {}
    kwargs = dict(cls.kwargs_from_data(data.training_data))
    if config.kmeans_features != "pixels" and _FEATURES in inspect.signature(cls).parameters:
        kwargs[_FEATURES] = import_object(config.kmeans_features)
    return kwargs


def run_data(config: ExperimentConfig, data: TaskData, strategy: Strategy) -> tuple[RunSplit, TaskData]:
    """The split a run of ``strategy`` trains on, and ``data`` with that split as its training split.

    A strategy that :attr:`~auxlab.experiments.strategies.Strategy.needs_dev_split`, or that
    ``config.held_out_meta_batch`` names, trains on the training split less a stratified development split
    of ``config.dev_fraction`` (seeded by ``config.data_seed``, so the same for every seed); every other
    strategy on the whole of it.
    """
    held_out = strategy.needs_dev_split or strategy.name in config.held_out_meta_batch
    split = run_split(data.train, dev_fraction=config.dev_fraction if held_out else None, seed=config.data_seed)
    return split, dataclasses.replace(data, train=split.train)


def build_wrapper(config: ExperimentConfig, data: TaskData, strategy: Strategy, *, seed: int, device: torch.device) -> MetaAuxWrapper:
    """A fresh model, built right after ``torch.manual_seed(seed)``, in the wrapper of ``strategy``.

    ``data.train`` is the split the run trains on (see :func:`run_data`). The wrapper gets the
    strategy's own hierarchy (:meth:`~auxlab.experiments.strategies.Strategy.psi`), its generator
    (with :func:`generator_kwargs`, then ``config.generator_kwargs`` of the generator, which win)
    and weighting, and everything else from ``config``. Seeds torch's global generator: call it
    where the caller's random state is kept (as :func:`~auxlab.experiments.training.train_one` does).
    """
    assert config.psi is not None  # resolved by run_experiment
    torch.manual_seed(seed)
    model = build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels, kwargs=config.model_kwargs)
    return MetaAuxWrapper(
        model.to(device),
        num_classes=data.num_classes,
        psi=list(strategy.psi(config.psi)),
        generator=strategy.generator,
        generator_kwargs={**generator_kwargs(strategy.generator, config, data), **config.generator_kwargs.get(strategy.generator, {})},
        generator_optimizer=lambda params: _GENERATOR_OPTIMIZERS[config.generator_optimizer](
            params, lr=config.generator_lr, weight_decay=config.generator_weight_decay
        ),
        weighting=strategy.weighting,
        weighting_kwargs=config.weighting_kwargs.get(strategy.weighting),
        inner_lr=config.inner_lr if config.inner_lr is not None else config.lr,
        aux_weight=config.aux_weight,
        entropy_weight=config.entropy_weight,
        focal_gamma=config.focal_gamma,
        engine=config.engine,
        meta_every=config.meta_every,
        virtual_params=list(config.virtual_params) if config.virtual_params is not None else None,
        seed=seed,
    )


def check_device(device: str) -> torch.device:
    """The torch device ``device`` names, checked usable here (a tensor is made on it) before anything is written.

    Raises:
        ConfigError: naming the device and why it cannot be used (a malformed name, CUDA on a CPU build, no such index).
    """
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(f"device {device!r} cannot be used here ({error}); use cpu, or a device this machine has (e.g. cuda:0)") from error
    return parsed


def check_model(config: ExperimentConfig, data: TaskData) -> None:
    """Build the model once, on the CPU and without touching the caller's random state, so that a bad import
    path or arguments stop the experiment before anything is written.

    Raises:
        ConfigError: naming the model and what went wrong.
    """
    try:
        with random_states_kept(torch.device("cpu")):
            build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels, kwargs=config.model_kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model {config.model!r} cannot be built: {error}") from error


def check_data(config: ExperimentConfig, data: TaskData) -> None:
    """Refuse, before anything trains, a strategy that cannot be built from the task's data.

    Every strategy's generator class is asked what it needs of the training split
    (:meth:`~auxlab.AuxLabelGenerator.kwargs_from_data`); a ValueError there (``human`` on a task
    without fine labels) stops the experiment. A generator given the fine labels' ``fine_to_coarse``
    labels each sample by its fine label, one sub-class per fine label, so the experiment's
    ``psi`` (resolved) must be the fine-label hierarchy.

    Raises:
        ConfigError: naming the strategy and what it lacks.
    """
    assert config.psi is not None  # resolved by run_experiment
    for name in config.strategies:
        strategy = Strategy.parse(name)
        cls = strategy.generator_class
        if cls is None:
            continue
        try:
            kwargs = cls.kwargs_from_data(data.training_data)
        except ValueError as error:
            fix = "use a task with fine labels (--dataset fashion-mnist --task coarse), or " if data.fine_to_coarse is None else ""
            raise ConfigError(
                f"strategies has {name!r}, which cannot be built from dataset={config.dataset!r} task={config.task!r}: {error}; "
                f"{fix}drop {name!r} from --strategies"
            ) from error
        fine_to_coarse = kwargs.get("fine_to_coarse")
        if fine_to_coarse is not None:
            fine_psi = HierarchyMask.from_fine_to_coarse(fine_to_coarse).psi
            if tuple(config.psi) != tuple(fine_psi):
                raise ConfigError(
                    f"strategy {strategy.generator!r} gives one sub-class per fine label, psi={list(fine_psi)}, but psi={list(config.psi)} "
                    "was asked; leave psi unset (none) to use the fine-label hierarchy for every strategy"
                )


def check_combinations(config: ExperimentConfig, data: TaskData) -> None:
    """Refuse, before anything trains, a strategy whose generator and weighting the wrapper does not combine.

    The wrapper of every strategy with a weighting other than ``constant`` (or with
    ``weighting_kwargs`` for it, or ``generator_kwargs`` for its generator) is built once, and dropped: a weighting needs labels that do not learn (not ``maxl`` or ``rl``), ``maoal`` does not
    take a strategy that augments the batch (``sla``), and ``weighting_kwargs`` must fit.

    Raises:
        ConfigError: naming the strategy and saying what the wrapper refused.
    """
    device = torch.device(config.device)
    for name in config.strategies:
        strategy = Strategy.parse(name)
        if strategy.weighting == DEFAULT_WEIGHTING and not config.weighting_kwargs.get(DEFAULT_WEIGHTING) and not config.generator_kwargs.get(strategy.generator):
            continue
        try:
            with random_states_kept(device):
                build_wrapper(config, run_data(config, data, strategy)[1], strategy, seed=config.seeds[0], device=device)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"strategies has {name!r}, which cannot run: {error}. Run {strategy.generator!r} without a weighting, "
                f"or +{strategy.weighting} with another generator, and check generator_kwargs and weighting_kwargs"
            ) from error
