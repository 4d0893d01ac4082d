"""The training loop of the experiments: one loop for every strategy, and the per-epoch diagnostics.

Each (strategy, seed) pair trains a fresh model through :class:`~auxlab.MetaAuxWrapper`; the loop
is the same for all of them. The only place that knows generator names is
:func:`generator_kwargs`, which hands each fixed-label strategy the data it is built from.
Everything else is asked of the classes (:class:`~auxlab.experiments.strategies.Strategy`: a
development split, a hierarchy of its own, the label diagnostics) or of the wrapper (whether
there is a meta step to take), never decided from a name.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from auxlab.checkpoint import load_checkpoint, save_checkpoint
from auxlab.data import IndexedDataset
from auxlab.datasets import ImageDataset
from auxlab.experiments import plots, report
from auxlab.experiments.config import ConfigError, ExperimentConfig, load_config, resume_differences
from auxlab.experiments.models import build_model, import_object
from auxlab.experiments.strategies import DEFAULT_WEIGHTING, Strategy
from auxlab.experiments.tasks import RunSplit, TaskData, load_task, resolve_psi, run_split, subset_indices
from auxlab.generators import PolicyLabels
from auxlab.wrapper import MetaAuxWrapper

__all__ = [
    "CHECKPOINTS",
    "ExperimentResult",
    "RunOutcome",
    "build_wrapper",
    "check_combinations",
    "collapse_diagnostic",
    "evaluate",
    "generator_kwargs",
    "run_data",
    "run_experiment",
    "train_one",
]

Log = Callable[[str], None]

_GENERATOR_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}

CHECKPOINTS = "checkpoints"
"""The folder of ``<out>/<name>/`` that holds each run's checkpoint, ``<strategy>-seed<seed>.pt``."""


@dataclass(frozen=True, eq=False)
class RunOutcome:
    """What one (strategy, seed) run produced.

    Attributes:
        records: one metrics dict per epoch (see :func:`train_one`).
        probe_columns: ``(M,)`` auxiliary column the generator gives each sample of the collapse
            probe set after the last epoch (its argmax); None without the diagnostic (single task, a
            strategy that augments the batch).
        probe: ``(M,)`` indices into the task's training split of those samples: the probe set, less
            its samples in the run's development split; None with ``probe_columns``.
    """

    records: list[dict[str, Any]]
    probe_columns: Tensor | None
    probe: Tensor | None = None


@dataclass(frozen=True, eq=False)
class ExperimentResult:
    """The outcome of :func:`run_experiment`.

    Attributes:
        config: the config as run, with ``name`` and ``psi`` resolved (what ``config.json`` holds; after a
            resume, ``config.json`` keeps the experiment's own values of the fields a resume may change).
        run_dir: ``<out>/<name>``, where the files were written.
        records: every epoch's metrics, one dict per (strategy, seed, epoch).
        summary: the Markdown of ``summary.md``.
        files: output name -> path of each file written.
    """

    config: ExperimentConfig
    run_dir: Path
    records: list[dict[str, Any]]
    summary: str
    files: dict[str, Path]


# --------------------------------------------------------------------------------------- the experiment
def run_experiment(config: ExperimentConfig, *, log: Log = print, command: str | None = None) -> ExperimentResult:
    """Train every strategy of ``config`` with every seed, then write metrics, summary and plots.

    Writes to ``<config.out>/<name>/``: ``config.json``, ``metrics.jsonl`` and ``metrics.csv``
    (rewritten after each run, so a crash keeps what finished), ``summary.md``, and with
    ``config.plots`` the PNGs ``accuracy_curves.png``, ``collapse.png`` (if a strategy learns its
    labels) and ``subclass_grid.png``. After every epoch of every run, the run's whole state goes
    to ``checkpoints/<strategy>-seed<seed>.pt`` (kept when the run has finished: it then holds the
    final model).

    With ``config.resume`` the experiment ``<out>/<name>`` continues where it stopped: its
    ``config.json`` must agree with ``config`` in every experiment-defining field (all but
    :data:`~auxlab.experiments.config.RESUME_MAY_DIFFER`), else a ConfigError names the fields
    that differ; runs whose records are complete in ``metrics.jsonl`` are not run again, and an
    unfinished run continues from its checkpoint. The files are then those of a run that was
    never interrupted (``time_s`` aside). Without it, the files of an earlier experiment of the
    same name (metrics and checkpoints) are removed first.

    Args:
        config: the experiment.
        log: where progress lines and the final summary go.
        command: the command line that started the run, quoted in ``summary.md``.
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_experiment(config, log=log, command=command)
    finally:
        torch.set_num_threads(threads)


def _run_experiment(config: ExperimentConfig, *, log: Log, command: str | None) -> ExperimentResult:
    stored = _experiment_to_resume(config) if config.resume else None  # refuses another experiment before loading any data
    data = load_task(config)
    psi = resolve_psi(config, data)
    name = config.name or f"{config.dataset}-{config.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = dataclasses.replace(config, psi=psi, name=name)
    check_combinations(config, data)  # before anything is written or trained
    run_dir = Path(config.out) / name
    finished: dict[tuple[str, int], list[dict[str, Any]]] = {}
    if stored is not None:
        _refuse_another_experiment(config, stored, run_dir / "config.json")  # now that psi is resolved
        finished = _finished_runs(report.read_metrics_jsonl(run_dir / "metrics.jsonl"), config)
        files = {"config": run_dir / "config.json"}  # as written when the experiment started
        total = len(config.strategies) * len(config.seeds)
        log(f"auxlab experiment {name!r}: {data.description}; psi={list(psi)}; resuming in {run_dir}, "
            f"{len(finished)} of {total} runs finished")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_previous_run(run_dir)
        files = {"config": report.write_config(config, run_dir / "config.json")}
        log(f"auxlab experiment {name!r}: {data.description}; psi={list(psi)}; writing to {run_dir}")
    (run_dir / CHECKPOINTS).mkdir(exist_ok=True)

    probe = subset_indices(data.train.labels, config.collapse_samples or len(data.train), seed=config.data_seed)
    # Mixed classes in every chunk of the diagnostic, as in training batches (a generator in train mode uses batch statistics).
    probe = probe[torch.randperm(probe.shape[0], generator=torch.Generator().manual_seed(config.data_seed))]
    grid_strategy = _grid_strategy(config.strategies)
    grid_columns: Tensor | None = None
    grid_probe = probe
    order = [(strategy, seed) for strategy in config.strategies for seed in config.seeds]
    runs = dict(finished)  # (strategy, seed) -> its records; the metrics files always hold every finished run, in this order

    def in_order() -> list[dict[str, Any]]:
        return [record for key in order for record in runs.get(key, [])]

    def write_metrics() -> None:
        files["metrics_jsonl"] = report.write_metrics_jsonl(in_order(), run_dir / "metrics.jsonl")
        files["metrics_csv"] = report.write_metrics_csv(in_order(), run_dir / "metrics.csv")

    for strategy, seed in order:
        checkpoint = run_dir / CHECKPOINTS / f"{strategy}-seed{seed}.pt"
        grid_run = strategy == grid_strategy and seed == config.seeds[0]
        done = finished.get((strategy, seed))
        # A finished run is not run again; the grid's run is restored from its final checkpoint, for its labels.
        if done is not None and not (grid_run and config.plots and checkpoint.is_file()):
            log(f"{strategy:>8} seed {seed}: finished, {len(done)} records read from metrics.jsonl")
            if grid_run and config.plots:
                log(f"{strategy:>8} seed {seed}: {checkpoint} is missing, so subclass_grid.png cannot be drawn again")
            continue
        outcome = train_one(config, data, strategy=strategy, seed=seed, probe=probe, log=log, checkpoint=checkpoint, resume=config.resume)
        runs[strategy, seed] = outcome.records
        if grid_run and outcome.probe is not None:
            grid_columns, grid_probe = outcome.probe_columns, outcome.probe
        write_metrics()
    if "metrics_jsonl" not in files:  # a resumed experiment that had nothing left to run
        write_metrics()
    records = in_order()

    summary = report.summary_markdown(records, config, description=data.description, command=command)
    files["summary"] = run_dir / "summary.md"
    files["summary"].write_text(summary, encoding="utf-8")
    if config.plots:
        files["accuracy_curves"] = plots.plot_accuracy_curves(records, run_dir / "accuracy_curves.png", title=_title(config))
        collapse = plots.plot_collapse(records, run_dir / "collapse.png", psi=psi, class_names=data.train.class_names, title=_title(config))
        if collapse is not None:
            files["collapse"] = collapse
        if grid_strategy is not None and grid_columns is not None:
            files["subclass_grid"] = plots.plot_subclass_grid(
                data.train.images[grid_probe],
                data.train.labels[grid_probe],
                grid_columns,
                psi=psi,
                class_names=data.train.class_names,
                path=run_dir / "subclass_grid.png",
                num_classes_shown=config.grid_classes,
                images_per_row=config.grid_images,
                title=f"{_title(config)}\nwhat {grid_strategy!r} groups together: argmax of its targets, seed {config.seeds[0]}, "
                f"after epoch {config.epochs}",
            )
    log("")
    log(summary)
    return ExperimentResult(config, run_dir, records, summary, files)


def _experiment_to_resume(config: ExperimentConfig) -> ExperimentConfig:
    """The config of the experiment ``config.resume`` continues; a ConfigError if there is none or it is another experiment."""
    assert config.name is not None  # ExperimentConfig refuses resume=True without a name
    path = Path(config.out) / config.name / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"resume=True continues the experiment in {path.parent}, but {path} does not exist; "
            "check out and name, or run without resume to start the experiment"
        )
    try:
        stored = ExperimentConfig.from_dict(load_config(path))
    except ConfigError as error:
        raise ConfigError(f"resume=True cannot read the experiment's {path}: {error}") from error
    # psi is compared once resolved: psi=5 and psi=5,5,...,5 are the same experiment
    _refuse_another_experiment(config, stored, path, ignore=("psi",))
    return stored


def _refuse_another_experiment(config: ExperimentConfig, stored: ExperimentConfig, path: Path, *, ignore: Sequence[str] = ()) -> None:
    differences = resume_differences(config, stored, ignore=ignore)
    if differences:
        raise ConfigError(
            f"resume=True continues the experiment of {path}, but the config differs from it in {'; '.join(differences)}. "
            f"Resume with the experiment's values (--config {path} --resume), or start a new experiment under another name"
        )


def _finished_runs(records: Sequence[dict[str, Any]], config: ExperimentConfig) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The records of each (strategy, seed) run that has all its epochs, 0 to ``config.epochs``, in ``records``."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        runs.setdefault((record["strategy"], record["seed"]), []).append(record)
    epochs = list(range(config.epochs + 1))
    return {key: run for key, run in runs.items() if [r.get("epoch") for r in run] == epochs}


def _remove_previous_run(run_dir: Path) -> None:
    """Remove what an earlier experiment of the same name left that a resume would read: metrics and checkpoints."""
    for name in ("metrics.jsonl", "metrics.csv"):
        (run_dir / name).unlink(missing_ok=True)
    folder = run_dir / CHECKPOINTS
    if folder.is_dir():
        for path in [*folder.glob("*-seed*.pt"), *folder.glob(".*-seed*.pt.*.tmp")]:
            path.unlink(missing_ok=True)


def _grid_strategy(strategies: tuple[str, ...]) -> str | None:
    """The strategy whose sub-classes ``subclass_grid.png`` shows: maxl if run, else the first with label diagnostics."""
    if "maxl" in strategies:
        return "maxl"
    return next((s for s in strategies if Strategy.parse(s).has_label_diagnostics), None)


def _title(config: ExperimentConfig) -> str:
    return f"{config.dataset} ({config.task}), {config.model}, {len(config.seeds)} seed(s)"


# --------------------------------------------------------------------------------------- one run
def generator_kwargs(generator: str, config: ExperimentConfig, data: TaskData) -> dict[str, Any]:
    """The ``generator_kwargs`` that build ``generator`` for the training split ``data.train``.

    ``data.train`` is the split the run trains on (the whole training split, or its rest after a
    development split; see :func:`run_data`): ``"random"`` gets its size, ``"kmeans"`` the split
    itself and the features of ``config.kmeans_features``, ``"human"`` its fine labels, so that the
    dataset indices of the run's batches index their tables. Every other generator (single, maxl,
    sla, rl, a registered strategy of your own) gets none.
    """
    train = data.train
    if generator == "random":
        return {"num_samples": len(train)}
    if generator == "kmeans":
        features = None if config.kmeans_features == "pixels" else import_object(config.kmeans_features)
        return {"dataset": train, "features": features}
    if generator == "human":
        if train.fine_labels is None or data.fine_to_coarse is None:
            raise ValueError(f"strategy 'human' needs fine labels, and {data.description} has none")
        return {"fine_labels": train.fine_labels, "fine_to_coarse": data.fine_to_coarse}
    return {}


def run_data(config: ExperimentConfig, data: TaskData, strategy: Strategy) -> tuple[RunSplit, TaskData]:
    """The split a run of ``strategy`` trains on, and ``data`` with that split as its training split.

    A strategy that :attr:`~auxlab.experiments.strategies.Strategy.needs_dev_split` trains on the
    training split less a stratified development split of ``config.dev_fraction`` (seeded by
    ``config.data_seed``, so the same for every seed); every other strategy on the whole of it.
    """
    split = run_split(data.train, dev_fraction=config.dev_fraction if strategy.needs_dev_split else None, seed=config.data_seed)
    return split, dataclasses.replace(data, train=split.train)


def build_wrapper(config: ExperimentConfig, data: TaskData, strategy: Strategy, *, seed: int, device: torch.device) -> MetaAuxWrapper:
    """A fresh model, built right after ``torch.manual_seed(seed)``, in the wrapper of ``strategy``.

    ``data.train`` is the split the run trains on (see :func:`run_data`). The wrapper gets the
    strategy's own hierarchy (:meth:`~auxlab.experiments.strategies.Strategy.psi`), its generator
    and weighting, and everything else from ``config``. Seeds torch's global generator: call it
    where the caller's random state is kept (as :func:`train_one` does).
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
            with _random_states_kept(device):
                build_wrapper(config, run_data(config, data, strategy)[1], strategy, seed=config.seeds[0], device=device)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"strategies has {name!r}, which cannot run: {error}. Run {strategy.generator!r} without a weighting, "
                f"or +{strategy.weighting} with another generator, and check generator_kwargs and weighting_kwargs"
            ) from error


def train_one(
    config: ExperimentConfig,
    data: TaskData,
    *,
    strategy: str,
    seed: int,
    probe: Tensor,
    log: Log = print,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> RunOutcome:
    """Train a fresh model with one strategy and one seed; evaluate and diagnose after every epoch.

    The model is built right after ``torch.manual_seed(seed)`` (the caller's random state is
    restored afterwards), batches are drawn by a ``torch.Generator`` seeded with ``seed``, and the
    wrapper gets ``seed=seed``: the same config and seed give the same numbers on the same machine.
    A strategy that learns from a development split (``+maoal``, ``rl``; see :func:`run_data`)
    trains on the rest of the training split, and its meta batches ``(x_meta, y_meta)`` cycle
    through the development split in passes shuffled by a ``torch.Generator`` seeded with
    ``seed + 2**32``.

    With ``checkpoint``, the run's whole state is written there (atomically, by
    :func:`auxlab.checkpoint.save_checkpoint`) after every epoch: wrapper, optimizer, LR schedulers,
    random states, the generators of the batch order and of the meta batches, the records so far and
    the probe's columns. With ``resume`` too and that file present, the run continues after its last
    epoch, bit for bit as if it had not stopped (on CPU; ``time_s`` aside).

    Records run from epoch 0, the untrained model and the initial labels before any step (no
    ``train_loss``, ``time_s`` 0), to ``config.epochs``. Each holds ``strategy``, ``seed``,
    ``epoch``, ``lr``, ``batches`` (model steps), ``psi`` (the run's hierarchy), ``train_samples``
    and ``dev_samples`` (the sizes of the split trained on and of the development split, None without),
    ``train_loss`` (mean model-step objective, ``L_pri + aux_weight * L_aux``), ``meta_loss`` (mean
    meta objective, None without meta steps), ``time_s`` (training wall time of the epoch),
    ``val_acc`` and ``val_loss`` (primary cross entropy), ``test_acc`` and ``test_loss`` (last epoch
    only, None before), ``val_acc_aggregated`` and ``test_acc_aggregated`` (for a strategy that
    augments the batch: the accuracy of ``wrapper.aggregated_logits``; None otherwise),
    ``weighting_params`` (the weighting's parameters by name, e.g. maoal's ``weights``; None if it
    has none), ``labels`` (``"none"``, ``"fixed"`` or ``"learned"``), and the collapse
    diagnostic of :func:`collapse_diagnostic` on the ``probe`` indices of the training split
    (``subclass_share``, ``subclasses_used``, ``subclass_entropy``, ``target_confidence``,
    ``subclass_soft_share``; None in single-task mode and for a strategy that augments the batch,
    whose sub-classes are its transformations). Probe samples in the development split are left out.
    """
    device = torch.device(config.device)
    spec = Strategy.parse(strategy)
    split, data = run_data(config, data, spec)
    probe_local, probe_full = split.probe(probe)
    with _random_states_kept(device, every_cuda_device=checkpoint is not None):
        wrapper = build_wrapper(config, data, spec, seed=seed, device=device)
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        optimizers = [opt for opt in (optimizer, wrapper.generator_optimizer) if opt is not None]
        schedulers = [torch.optim.lr_scheduler.StepLR(opt, config.lr_step, config.lr_gamma) for opt in optimizers] if config.lr_step else []
        scheduler_state = _Schedulers(schedulers) if schedulers else None
        batch_order = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            IndexedDataset(data.train),
            batch_size=config.batch_size,
            shuffle=True,
            generator=batch_order,
            drop_last=len(data.train) % config.batch_size == 1,  # BatchNorm cannot train on a batch of one
        )
        meta_batches = _MetaBatches(split.dev, batch_size=config.batch_size, seed=seed + 2**32) if split.dev is not None else None
        scaler = torch.amp.GradScaler(device.type) if config.autocast == "fp16" else None
        labels = "none" if wrapper.is_single_task else ("learned" if wrapper.generator_optimizer is not None else "fixed")
        psi = list(wrapper.mask.psi)
        records: list[dict[str, Any]] = []
        columns: Tensor | None = None
        first_epoch = 0
        if checkpoint is not None and resume and Path(checkpoint).is_file():
            counters = load_checkpoint(checkpoint, wrapper, optimizer=optimizer, scheduler=scheduler_state)  # and the random states
            records, columns = _run_state(counters, checkpoint, strategy=strategy, seed=seed, epochs=config.epochs)
            batch_order.set_state(_decode_state(counters["batch_order"]))
            if meta_batches is not None:
                meta_batches.load_state(_decode_state(counters["meta_order"]), counters["meta_taken"])
            if scaler is not None:
                scaler.load_state_dict(json.loads(counters["grad_scaler"]))
            if config.inner_lr is None:  # as set after the last epoch's scheduler step
                wrapper.inner_lr = optimizer.param_groups[0]["lr"]
            first_epoch = len(records)
            log(f"{strategy:>8} seed {seed}: resumed from {checkpoint} after epoch {first_epoch - 1}/{config.epochs}")
        for epoch in range(first_epoch, config.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            train_loss: float | None = None
            meta_loss: float | None = None
            batches, elapsed = 0, 0.0
            if epoch > 0:  # epoch 0 measures the untrained model and the initial labels
                start = time.perf_counter()
                train_loss, meta_loss, batches = _train_epoch(
                    wrapper, optimizer, loader, config, device, meta_batches=meta_batches, scaler=scaler,
                    desc=f"{strategy} seed {seed} epoch {epoch}/{config.epochs}",
                )
                elapsed = time.perf_counter() - start
                for scheduler in schedulers:
                    scheduler.step()
                if config.inner_lr is None:  # alpha follows the model's learning rate, as in the original code
                    wrapper.inner_lr = optimizer.param_groups[0]["lr"]
            last = epoch == config.epochs
            record: dict[str, Any] = {
                "strategy": strategy,
                "seed": seed,
                "epoch": epoch,
                "lr": lr,
                "batches": batches,
                "psi": psi,
                "train_samples": len(data.train),
                "dev_samples": len(split.dev) if split.dev is not None else None,
                "train_loss": train_loss,
                "meta_loss": meta_loss,
                "time_s": elapsed,
                **_accuracies(wrapper, data, config, device, test=last, aggregated=spec.augments),
                "weighting_params": _weighting_params(wrapper),
                "labels": labels,
                "subclass_share": None,
                "subclasses_used": None,
                "subclass_entropy": None,
                "target_confidence": None,
                "subclass_soft_share": None,
            }
            if spec.has_label_diagnostics:
                wrapper.train()  # the generator's training mode; aux_targets leaves its statistics alone
                diagnostic, columns = collapse_diagnostic(wrapper, data.train, probe_local, batch_size=config.eval_batch_size, device=device)
                record.update(diagnostic)
            records.append(record)
            log(_epoch_line(record, config.epochs, sum(psi)))
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint,
                    wrapper,
                    optimizer=optimizer,
                    scheduler=scheduler_state,
                    strategy=strategy,
                    seed=seed,
                    epoch=epoch,
                    records=json.dumps(records),
                    probe_columns=json.dumps(columns.tolist()) if columns is not None else None,
                    batch_order=_encode_state(batch_order.get_state()),
                    meta_order=_encode_state(meta_batches.pass_state) if meta_batches is not None else None,
                    meta_taken=meta_batches.taken if meta_batches is not None else None,
                    grad_scaler=json.dumps(scaler.state_dict()) if scaler is not None else None,
                )
    return RunOutcome(records, columns, probe_full if columns is not None else None)


def _accuracies(
    wrapper: MetaAuxWrapper, data: TaskData, config: ExperimentConfig, device: torch.device, *, test: bool, aggregated: bool
) -> dict[str, float | None]:
    """Validation accuracy and loss of the classifier, test accuracy and loss when ``test``; with
    ``aggregated``, the validation (and test) accuracy of the wrapper's aggregated inference too."""
    values: dict[str, float | None] = dict.fromkeys(
        ("val_acc", "val_loss", "test_acc", "test_loss", "val_acc_aggregated", "test_acc_aggregated")
    )
    for split, dataset in (("val", data.val), ("test", data.test)):
        if split == "test" and not test:
            continue
        values[f"{split}_acc"], values[f"{split}_loss"] = evaluate(wrapper.model, dataset, batch_size=config.eval_batch_size, device=device)
        if aggregated:
            values[f"{split}_acc_aggregated"], _ = evaluate(
                wrapper, dataset, batch_size=config.eval_batch_size, device=device, logits=wrapper.aggregated_logits
            )
    return values


def _weighting_params(wrapper: MetaAuxWrapper) -> dict[str, list[float]] | None:
    """The weighting's parameters by name, flattened (maoal's ``weights``, uncertainty's ``log_variances``); None without any."""
    values = {name: [float(v) for v in p.detach().flatten().cpu()] for name, p in wrapper.weighting.named_parameters()}
    return values or None


class _Schedulers:
    """The run's LR schedulers (the classifier's and the generator's) as the one ``scheduler=`` of a checkpoint."""

    def __init__(self, schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler]) -> None:
        self.schedulers = list(schedulers)

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["schedulers"]
        if len(states) != len(self.schedulers):
            raise ValueError(f"the checkpoint holds {len(states)} LR schedulers, this run has {len(self.schedulers)}")
        for scheduler, state in zip(self.schedulers, states):
            scheduler.load_state_dict(state)


class _MetaBatches:
    """The meta batches ``(x_meta, y_meta)`` of a run: the development split in reshuffled passes, without end.

    Each pass is a permutation of the split drawn from a ``torch.Generator`` seeded with ``seed``,
    cut into ``max(1, N // batch_size)`` batches of ``min(batch_size, N)`` samples (the few left
    over wait for a later pass). :attr:`pass_state` (the generator's state before the current
    pass) and :attr:`taken` (the batches drawn from it) restore the sequence exactly.
    """

    def __init__(self, dataset: ImageDataset, *, batch_size: int, seed: int) -> None:
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.per_pass = len(dataset) // self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.load_state(self.generator.get_state(), 0)

    def load_state(self, pass_state: Tensor, taken: int) -> None:
        """Continue from a pass drawn from ``pass_state``, of which ``taken`` batches were drawn."""
        self.pass_state = pass_state
        self.generator.set_state(pass_state)
        self.order = torch.randperm(len(self.dataset), generator=self.generator)
        self.taken = int(taken)

    def next(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The next meta batch ``(x_meta, y_meta)`` for ``step`` and ``meta_step``."""
        if self.taken == self.per_pass:
            self.load_state(self.generator.get_state(), 0)
        index = self.order[self.taken * self.batch_size : (self.taken + 1) * self.batch_size]
        self.taken += 1
        return self.dataset.images[index].to(device), self.dataset.labels[index].to(device)


def _encode_state(state: Tensor) -> str:
    """A ``torch.Generator`` state as text, for a checkpoint's counters."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_state(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _run_state(
    counters: dict[str, Any], path: str | os.PathLike[str], *, strategy: str, seed: int, epochs: int
) -> tuple[list[dict[str, Any]], Tensor | None]:
    """The records and probe columns that :func:`train_one` saved with a checkpoint."""
    if (counters.get("strategy"), counters.get("seed")) != (strategy, seed):
        raise ValueError(
            f"checkpoint {str(path)!r} is of strategy {counters.get('strategy')!r} seed {counters.get('seed')!r}, "
            f"not of strategy {strategy!r} seed {seed}"
        )
    records = json.loads(counters["records"])
    epoch = counters["epoch"]
    if not 0 <= epoch <= epochs or [r["epoch"] for r in records] != list(range(epoch + 1)):
        raise ValueError(f"checkpoint {str(path)!r} holds epochs 0 to {epoch} of a run, but the run has epochs 0 to {epochs}")
    columns = None if counters["probe_columns"] is None else torch.tensor(json.loads(counters["probe_columns"]), dtype=torch.int64)
    return records, columns


@contextlib.contextmanager
def _random_states_kept(device: torch.device, *, every_cuda_device: bool = False) -> Iterator[None]:
    """Restore torch's (CPU, and ``device``'s or with ``every_cuda_device`` every CUDA device's), NumPy's
    and Python's global random states when the block ends.

    Loading a checkpoint sets the random states of every CUDA device, NumPy and Python: pass
    ``every_cuda_device=True`` where one may be loaded.
    """
    fork_devices = list(range(torch.cuda.device_count())) if every_cuda_device and torch.cuda.is_available() else []
    if device.type == "cuda" and not fork_devices:
        fork_devices = [device.index or 0]
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=fork_devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _has_meta_step(wrapper: MetaAuxWrapper) -> bool:
    """Whether the wrapper's meta step learns something: a generator's labels or a meta-learned weighting."""
    return wrapper.generator_optimizer is not None or wrapper.weighting.meta_learned


def _train_epoch(
    wrapper: MetaAuxWrapper,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    config: ExperimentConfig,
    device: torch.device,
    *,
    desc: str,
    meta_batches: _MetaBatches | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float | None, int]:
    """One epoch of the configured schedule; returns (mean model loss, mean meta objective or None, model steps).

    With ``meta_batches``, every ``step`` (per-batch) or ``meta_step`` (alternating) gets the next
    development batch as its meta batch; without, the meta batch is the training batch itself.
    With ``config.autocast`` the steps run under ``torch.autocast``; ``scaler`` goes to ``step``.
    """
    meta_learns = _has_meta_step(wrapper)
    per_phase = len(loader) if config.max_batches is None else min(len(loader), config.max_batches)
    alternating = config.schedule == "alternating"
    bar = _progress_bar(per_phase * (2 if alternating and meta_learns else 1), desc, config.progress)

    def meta_batch() -> tuple[Tensor | None, Tensor | None]:
        return meta_batches.next(device) if meta_batches is not None else (None, None)

    wrapper.train()
    loss_sum, meta_sum, seen, meta_seen = 0.0, 0.0, 0, 0
    try:
        for x, y, index in _batches(loader, per_phase, device):
            if alternating:
                with _autocast(config, device):
                    loss = wrapper.loss(x, y, index=index)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
            else:  # the model step and the meta step together, sharing their work where the engine can
                x_meta, y_meta = meta_batch()
                with _autocast(config, device):
                    loss = wrapper.step(x, y, optimizer, index=index, x_meta=x_meta, y_meta=y_meta, scaler=scaler)
                meta = wrapper.last_meta_objective
                if meta is not None:
                    meta_sum += float(meta) * y.shape[0]
                    meta_seen += y.shape[0]
            loss_sum += float(loss.detach()) * y.shape[0]
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        if alternating and meta_learns:  # the original code: a whole epoch of meta steps after the model's epoch
            for x, y, index in _batches(loader, per_phase, device):
                x_meta, y_meta = meta_batch()
                with _autocast(config, device):
                    meta = wrapper.meta_step(x, y, x_meta, y_meta, index=index)
                if meta is not None:  # None: a batch skipped by meta_every
                    meta_sum += float(meta) * y.shape[0]
                    meta_seen += y.shape[0]
                if bar is not None:
                    bar.update(1)
                    if meta is not None:
                        bar.set_postfix(meta=f"{float(meta):.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return loss_sum / max(seen, 1), (meta_sum / meta_seen if meta_seen else None), min(per_phase, len(loader))


def _autocast(config: ExperimentConfig, device: torch.device) -> torch.autocast:
    """``torch.autocast`` with the config's dtype, or a disabled one when it trains in float32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast or "", torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=config.autocast is not None)


def _batches(loader: DataLoader[Any], limit: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for step, (x, y, index) in enumerate(loader):
        if step >= limit:
            return
        yield x.to(device), y.to(device), index.to(device)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, unit="batch", dynamic_ncols=True)


def _epoch_line(record: dict[str, Any], epochs: int, num_aux: int) -> str:
    parts = [f"{record['strategy']:>8} seed {record['seed']} epoch {record['epoch']}/{epochs}:"]
    if record["train_loss"] is None:
        parts.append("(before training)")
    else:
        parts.append(f"train loss {record['train_loss']:.4f},")
    parts.append(f"val acc {record['val_acc']:.2%}" + _aggregated(record, "val_acc") + ",")
    if record["subclasses_used"] is not None:
        parts.append(f"sub-classes used {sum(record['subclasses_used'])}/{num_aux},")
    if record["test_acc"] is not None:
        parts.append(f"test acc {record['test_acc']:.2%}" + _aggregated(record, "test_acc") + " (last epoch),")
    parts.append(f"{record['time_s']:.1f} s" if record["epoch"] else "")
    return " ".join(parts).rstrip(" ,")


def _aggregated(record: dict[str, Any], key: str) -> str:
    value = record.get(f"{key}_aggregated")
    return f" ({value:.2%} aggregated)" if value is not None else ""


# --------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    batch_size: int,
    device: torch.device,
    logits: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """Accuracy and mean cross entropy of ``model`` (in eval mode) on ``dataset``; the model's mode is restored.

    ``logits`` maps a batch to the ``(B, C)`` scores to judge, in place of ``model`` itself: e.g.
    ``evaluate(wrapper, data, ..., logits=wrapper.aggregated_logits)`` for SLA's aggregated inference.
    """
    predict = logits if logits is not None else model
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device)
            y = dataset.labels[start : start + batch_size].to(device)
            scores = predict(x)
            correct += int((scores.argmax(1) == y).sum())
            loss_sum += float(nn.functional.cross_entropy(scores, y, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / len(dataset), loss_sum / len(dataset)


@torch.no_grad()
def _label_distribution(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
    """``(B, K)``: the distribution each sample's auxiliary label comes from, without gradient: the
    targets, or a policy's probabilities (its targets are draws; drawing none leaves its random stream)."""
    generator = wrapper.generator
    if isinstance(generator, PolicyLabels):
        with torch.no_grad():
            return generator.policy(generator.features(x), y)[0]
    return wrapper.aux_targets(x, y, index=index)


def collapse_diagnostic(
    wrapper: MetaAuxWrapper, dataset: ImageDataset, indices: Tensor, *, batch_size: int, device: torch.device
) -> tuple[dict[str, Any], Tensor]:
    """How many of its sub-classes each primary class actually uses, and how sure the labels are.

    Every probe sample (``indices`` into ``dataset``, the training split) gets its auxiliary target,
    ``wrapper.aux_targets(x, y, index=...)``, run in the generator's current mode without updating
    its statistics. For a policy that draws its labels (``"rl"``) it gets the policy's probabilities
    instead (its targets are one draw from them), and no random number is drawn. For primary class
    ``c`` with ``n_c`` probe samples:

    - ``share[c][j]``: the fraction of the ``n_c`` samples whose argmax is sub-class ``j`` of block ``c``;
    - ``used[c]``: the number of sub-classes with ``share > 1 / (2 psi[c])``, i.e. more than half of
      the share a uniform spread would give them (``psi[c]`` when all are in use, 1 when collapsed);
    - ``entropy[c]``: ``-sum_j share[c][j] ln share[c][j]`` in nats, from 0 (collapsed) to ``ln psi[c]``;
    - ``confidence[c]``: the mean over the ``n_c`` samples of their target's largest probability,
      from ``1 / psi[c]`` (flat soft targets: the argmax says little) to 1 (hard labels);
    - ``soft_share[c][j]``: the mean probability of sub-class ``j`` over the ``n_c`` samples.

    A class with no probe sample has all of these 0.

    Returns:
        ``(diagnostic, columns)``: ``diagnostic`` holds ``subclass_share``, ``subclasses_used``,
        ``subclass_entropy``, ``target_confidence`` and ``subclass_soft_share`` (per class, as above);
        ``columns`` is the ``(M,)`` argmax auxiliary column of each probe sample.
    """
    mask = wrapper.mask
    pieces = []
    for start in range(0, indices.shape[0], batch_size):
        index = indices[start : start + batch_size]
        x, y = dataset.images[index].to(device), dataset.labels[index].to(device)
        pieces.append(_label_distribution(wrapper, x, y, index.to(device)).double().cpu())
    targets = torch.cat(pieces)
    columns = targets.argmax(1)
    labels = dataset.labels[indices]
    shares, used, entropy, confidence, soft = [], [], [], [], []
    for c, size in enumerate(mask.psi):
        block = mask.block(c)
        in_class = labels == c
        count = torch.bincount(columns[in_class] - block.start, minlength=size).double()
        share = count / count.sum() if count.sum() > 0 else count
        shares.append([float(s) for s in share])
        used.append(int((share > 1.0 / (2 * size)).sum()))
        entropy.append(float(-sum(s * math.log(s) for s in share.tolist() if s > 0)))
        probabilities = targets[in_class][:, block.start : block.stop]
        present = probabilities.shape[0] > 0
        confidence.append(float(probabilities.max(1).values.mean()) if present else 0.0)
        soft.append([float(p) for p in probabilities.mean(0)] if present else [0.0] * size)
    diagnostic = {
        "subclass_share": shares,
        "subclasses_used": used,
        "subclass_entropy": entropy,
        "target_confidence": confidence,
        "subclass_soft_share": soft,
    }
    return diagnostic, columns
