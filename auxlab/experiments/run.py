"""The experiment: every (strategy, seed) run in order, its files, and resuming one that stopped.

:func:`run_experiment` loads the task, refuses what cannot run before anything is written
(:mod:`auxlab.experiments.build`), trains each run (:func:`~auxlab.experiments.training.train_one`),
rewrites the metrics after each, and writes the summary and plots (:mod:`auxlab.experiments.report`,
:mod:`auxlab.experiments.plots`). With ``resume`` it continues an experiment where it stopped:
finished runs are read back, an unfinished one continues from its checkpoint. Nothing here knows a
strategy by its name or its class: what a run needs is asked of
:class:`~auxlab.experiments.strategies.Strategy`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from auxlab.experiments import plots, report
from auxlab.experiments.build import (
    build_wrapper,
    check_combinations,
    check_data,
    check_device,
    check_model,
    generator_kwargs,
    run_data,
)
from auxlab.experiments.config import ExperimentConfig, load_config, resume_differences
from auxlab.experiments.diagnostics import collapse_diagnostic, evaluate
from auxlab.experiments.errors import ConfigError
from auxlab.experiments.strategies import Strategy
from auxlab.experiments.tasks import load_task, resolve_psi, subset_indices
from auxlab.experiments.training import Log, RunOutcome, train_one

__all__ = [
    "CHECKPOINTS",
    "ExperimentResult",
    "RunOutcome",
    "build_wrapper",
    "check_combinations",
    "collapse_diagnostic",
    "evaluate",
    "generator_kwargs",
    "grid_strategy",
    "run_data",
    "run_experiment",
    "train_one",
]
# RunOutcome, build_wrapper, check_combinations, collapse_diagnostic, evaluate, generator_kwargs, run_data and
# train_one live in auxlab.experiments.training, .build and .diagnostics; they stay importable from here.

CHECKPOINTS = "checkpoints"
#: The folder of each run's final label distributions on the probe samples (``<strategy>-seed<seed>.pt``).
LABELS = "labels"
"""The folder of ``<out>/<name>/`` that holds each run's checkpoint, ``<strategy>-seed<seed>.pt``."""


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
    check_device(config.device)  # every check comes before anything is written or trained
    stored = _experiment_to_resume(config) if config.resume else None  # refuses another experiment before loading any data
    data = load_task(config)
    psi = resolve_psi(config, data)
    name = config.name or f"{config.dataset}-{config.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = dataclasses.replace(config, psi=psi, name=name)
    check_model(config, data)
    check_data(config, data)
    check_combinations(config, data)
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
    grid = grid_strategy(config.strategies)
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
        grid_run = strategy == grid and seed == config.seeds[0]
        done = finished.get((strategy, seed))
        # A finished run is not run again; the grid's run is restored from its final checkpoint, for its labels.
        if done is not None and not (grid_run and config.plots and checkpoint.is_file()):
            log(f"{strategy:>8} seed {seed}: finished, {len(done)} records read from metrics.jsonl")
            if grid_run and config.plots:
                log(f"{strategy:>8} seed {seed}: {checkpoint} is missing, so subclass_grid.png cannot be drawn again")
            continue
        outcome = train_one(config, data, strategy=strategy, seed=seed, probe=probe, log=log, checkpoint=checkpoint, resume=config.resume)
        runs[strategy, seed] = outcome.records
        if outcome.probe_distribution is not None:  # the final labels, to compare runs (e.g. with a control)
            (run_dir / LABELS).mkdir(exist_ok=True)
            labels = run_dir / LABELS / f"{strategy}-seed{seed}.pt"
            temporary = labels.with_name(f".{labels.name}.tmp")
            torch.save({"probe": outcome.probe, "distribution": outcome.probe_distribution.float()}, temporary)
            os.replace(temporary, labels)  # whole or absent, if the run is killed while writing
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
        learning = plots.plot_label_learning(records, run_dir / "label_learning.png", title=_title(config))
        if learning is not None:
            files["label_learning"] = learning
        if grid is not None and grid_columns is not None:
            files["subclass_grid"] = plots.plot_subclass_grid(
                data.train.images[grid_probe],
                data.train.labels[grid_probe],
                grid_columns,
                psi=psi,
                class_names=data.train.class_names,
                path=run_dir / "subclass_grid.png",
                num_classes_shown=config.grid_classes,
                images_per_row=config.grid_images,
                title=f"{_title(config)}\nwhat {grid!r} groups together: argmax of its targets, seed {config.seeds[0]}, "
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
    """Remove what an earlier experiment of the same name left that a resume would read or a reader
    would mistake for this one's: metrics, checkpoints and final labels."""
    for name in ("metrics.jsonl", "metrics.csv"):
        (run_dir / name).unlink(missing_ok=True)
    for folder, patterns in ((run_dir / CHECKPOINTS, ("*-seed*.pt", ".*-seed*.pt.*.tmp")), (run_dir / LABELS, ("*-seed*.pt", ".*-seed*.pt.tmp"))):
        for path in [p for pattern in patterns for p in folder.glob(pattern)] if folder.is_dir() else []:
            path.unlink(missing_ok=True)


def grid_strategy(strategies: Sequence[str]) -> str | None:
    """The strategy whose sub-classes ``subclass_grid.png`` shows (its first seed's run).

    Among the strategies with label diagnostics (:attr:`~auxlab.experiments.strategies.Strategy.has_label_diagnostics`),
    in config order: the first whose generator reads neither dataset indices (a fixed table per
    sample: ``random``, ``kmeans``, ``human``) nor the classifier's features, i.e. one that labels
    the inputs with a network of its own, as ``maxl`` does; else the first of them. None without any.
    """
    candidates = [s for s in strategies if Strategy.parse(s).has_label_diagnostics]
    for name in candidates:
        cls = Strategy.parse(name).generator_class
        if cls is not None and not cls.needs_index and not cls.reads_features:
            return name
    return candidates[0] if candidates else None


def _title(config: ExperimentConfig) -> str:
    return f"{config.dataset} ({config.task}), {config.model}, {len(config.seeds)} seed(s)"
