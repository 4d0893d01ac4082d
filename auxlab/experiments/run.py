"""The training loop of the experiments: one loop for every strategy, and the per-epoch diagnostics.

Each (strategy, seed) pair trains a fresh model through :class:`~auxlab.MetaAuxWrapper`; the loop
is the same for all of them. The only place that knows strategy names is
:func:`generator_kwargs`, which hands each fixed-label strategy the data it is built from. Whether
there is a meta step to take is asked of the wrapper (``generator_optimizer is None``), never
decided from a name.
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
from auxlab.experiments.tasks import TaskData, load_task, resolve_psi, subset_indices
from auxlab.wrapper import SINGLE_TASK, MetaAuxWrapper

__all__ = [
    "CHECKPOINTS",
    "ExperimentResult",
    "RunOutcome",
    "collapse_diagnostic",
    "evaluate",
    "generator_kwargs",
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
            probe set after the last epoch (its argmax); None in single-task mode.
    """

    records: list[dict[str, Any]]
    probe_columns: Tensor | None


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
        if grid_run:
            grid_columns = outcome.probe_columns
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
                data.train.images[probe],
                data.train.labels[probe],
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
    """The strategy whose sub-classes ``subclass_grid.png`` shows: maxl if run, else the first with labels."""
    if "maxl" in strategies:
        return "maxl"
    return next((s for s in strategies if s != SINGLE_TASK), None)


def _title(config: ExperimentConfig) -> str:
    return f"{config.dataset} ({config.task}), {config.model}, {len(config.seeds)} seed(s)"


# --------------------------------------------------------------------------------------- one run
def generator_kwargs(strategy: str, config: ExperimentConfig, data: TaskData) -> dict[str, Any]:
    """The ``generator_kwargs`` that build ``strategy`` for this task's training split.

    ``"random"`` gets the training-set size, ``"kmeans"`` the training split and the features of
    ``config.kmeans_features``, ``"human"`` the split's fine labels; every other strategy (single,
    maxl, a registered strategy of your own) gets none.
    """
    train = data.train
    if strategy == "random":
        return {"num_samples": len(train)}
    if strategy == "kmeans":
        features = None if config.kmeans_features == "pixels" else import_object(config.kmeans_features)
        return {"dataset": train, "features": features}
    if strategy == "human":
        if train.fine_labels is None or data.fine_to_coarse is None:
            raise ValueError(f"strategy 'human' needs fine labels, and {data.description} has none")
        return {"fine_labels": train.fine_labels, "fine_to_coarse": data.fine_to_coarse}
    return {}


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

    With ``checkpoint``, the run's whole state is written there (atomically, by
    :func:`auxlab.checkpoint.save_checkpoint`) after every epoch: wrapper, optimizer, LR schedulers,
    random states, the batch order's generator, the records so far and the probe's columns. With
    ``resume`` too and that file present, the run continues after its last epoch, bit for bit as
    if it had not stopped (on CPU; ``time_s`` aside).

    Records run from epoch 0, the untrained model and the initial labels before any step (no
    ``train_loss``, ``time_s`` 0), to ``config.epochs``. Each holds ``strategy``, ``seed``,
    ``epoch``, ``lr``, ``batches`` (model steps),
    ``train_loss`` (mean model-step objective, ``L_pri + aux_weight * L_aux``), ``meta_loss`` (mean
    meta objective, None without meta steps), ``time_s`` (training wall time of the epoch),
    ``val_acc`` and ``val_loss`` (primary cross entropy), ``test_acc`` and ``test_loss`` (last epoch
    only, None before), ``labels`` (``"none"``, ``"fixed"`` or ``"learned"``), and the collapse
    diagnostic of :func:`collapse_diagnostic` on the ``probe`` indices of the training split
    (``subclass_share``, ``subclasses_used``, ``subclass_entropy``, ``target_confidence``,
    ``subclass_soft_share``; None in single-task mode).
    """
    device = torch.device(config.device)
    # Loading a checkpoint sets the random states of every CUDA device, NumPy and Python: all are the caller's again afterwards.
    fork_devices = list(range(torch.cuda.device_count())) if checkpoint is not None and torch.cuda.is_available() else []
    if device.type == "cuda" and not fork_devices:
        fork_devices = [device.index or 0]
    with torch.random.fork_rng(devices=fork_devices), _host_random_states_kept():
        torch.manual_seed(seed)
        model = build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels, kwargs=config.model_kwargs)
        model = model.to(device)
        assert config.psi is not None  # resolved by run_experiment
        wrapper = MetaAuxWrapper(
            model,
            num_classes=data.num_classes,
            psi=list(config.psi),
            generator=strategy,
            generator_kwargs=generator_kwargs(strategy, config, data),
            generator_optimizer=lambda params: _GENERATOR_OPTIMIZERS[config.generator_optimizer](
                params, lr=config.generator_lr, weight_decay=config.generator_weight_decay
            ),
            inner_lr=config.inner_lr if config.inner_lr is not None else config.lr,
            aux_weight=config.aux_weight,
            entropy_weight=config.entropy_weight,
            focal_gamma=config.focal_gamma,
            engine=config.engine,
            meta_every=config.meta_every,
            virtual_params=list(config.virtual_params) if config.virtual_params is not None else None,
            seed=seed,
        )
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
        labels = "none" if wrapper.is_single_task else ("learned" if wrapper.generator_optimizer is not None else "fixed")
        records: list[dict[str, Any]] = []
        columns: Tensor | None = None
        first_epoch = 0
        if checkpoint is not None and resume and Path(checkpoint).is_file():
            counters = load_checkpoint(checkpoint, wrapper, optimizer=optimizer, scheduler=scheduler_state)  # and the random states
            records, columns, batch_state = _run_state(counters, checkpoint, strategy=strategy, seed=seed, epochs=config.epochs)
            batch_order.set_state(batch_state)
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
                    wrapper, optimizer, loader, config, device, desc=f"{strategy} seed {seed} epoch {epoch}/{config.epochs}"
                )
                elapsed = time.perf_counter() - start
                for scheduler in schedulers:
                    scheduler.step()
                if config.inner_lr is None:  # alpha follows the model's learning rate, as in the original code
                    wrapper.inner_lr = optimizer.param_groups[0]["lr"]
            val_acc, val_loss = evaluate(model, data.val, batch_size=config.eval_batch_size, device=device)
            last = epoch == config.epochs
            test_acc, test_loss = evaluate(model, data.test, batch_size=config.eval_batch_size, device=device) if last else (None, None)
            record: dict[str, Any] = {
                "strategy": strategy,
                "seed": seed,
                "epoch": epoch,
                "lr": lr,
                "batches": batches,
                "train_loss": train_loss,
                "meta_loss": meta_loss,
                "time_s": elapsed,
                "val_acc": val_acc,
                "val_loss": val_loss,
                "test_acc": test_acc,
                "test_loss": test_loss,
                "labels": labels,
                "subclass_share": None,
                "subclasses_used": None,
                "subclass_entropy": None,
                "target_confidence": None,
                "subclass_soft_share": None,
            }
            if not wrapper.is_single_task:
                wrapper.train()  # the generator's training mode; aux_targets leaves its statistics alone
                diagnostic, columns = collapse_diagnostic(wrapper, data.train, probe, batch_size=config.eval_batch_size, device=device)
                record.update(diagnostic)
            records.append(record)
            log(_epoch_line(record, config.epochs, sum(config.psi)))
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
                    batch_order=base64.b64encode(batch_order.get_state().numpy().tobytes()).decode("ascii"),
                )
    return RunOutcome(records, columns)


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


def _run_state(
    counters: dict[str, Any], path: str | os.PathLike[str], *, strategy: str, seed: int, epochs: int
) -> tuple[list[dict[str, Any]], Tensor | None, Tensor]:
    """The records, probe columns and batch-order generator state that :func:`train_one` saved with a checkpoint."""
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
    batch_state = torch.frombuffer(bytearray(base64.b64decode(counters["batch_order"])), dtype=torch.uint8)
    return records, columns, batch_state


@contextlib.contextmanager
def _host_random_states_kept() -> Iterator[None]:
    """Restore NumPy's and Python's global random states when the block ends (``torch.random.fork_rng`` does torch's)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _train_epoch(
    wrapper: MetaAuxWrapper,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    config: ExperimentConfig,
    device: torch.device,
    *,
    desc: str,
) -> tuple[float, float | None, int]:
    """One epoch of the configured schedule; returns (mean model loss, mean meta objective or None, model steps)."""
    meta_learns = wrapper.generator_optimizer is not None
    per_phase = len(loader) if config.max_batches is None else min(len(loader), config.max_batches)
    alternating = config.schedule == "alternating"
    bar = _progress_bar(per_phase * (2 if alternating and meta_learns else 1), desc, config.progress)
    wrapper.train()
    loss_sum, meta_sum, seen, meta_seen = 0.0, 0.0, 0, 0
    try:
        for x, y, index in _batches(loader, per_phase, device):
            if alternating:
                loss = wrapper.loss(x, y, index=index)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
            else:  # the model step and the meta step together, sharing their work where the engine can
                loss = wrapper.step(x, y, optimizer, index=index)
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
                meta = wrapper.meta_step(x, y, index=index)
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
    parts.append(f"val acc {record['val_acc']:.2%},")
    if record["subclasses_used"] is not None:
        parts.append(f"sub-classes used {sum(record['subclasses_used'])}/{num_aux},")
    if record["test_acc"] is not None:
        parts.append(f"test acc {record['test_acc']:.2%} (last epoch),")
    parts.append(f"{record['time_s']:.1f} s" if record["epoch"] else "")
    return " ".join(parts).rstrip(" ,")


# --------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, *, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Accuracy and mean cross entropy of ``model`` (in eval mode) on ``dataset``; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(dataset), batch_size):
            x = dataset.images[start : start + batch_size].to(device)
            y = dataset.labels[start : start + batch_size].to(device)
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    finally:
        model.train(was_training)
    return correct / len(dataset), loss_sum / len(dataset)


@torch.no_grad()
def collapse_diagnostic(
    wrapper: MetaAuxWrapper, dataset: ImageDataset, indices: Tensor, *, batch_size: int, device: torch.device
) -> tuple[dict[str, Any], Tensor]:
    """How many of its sub-classes each primary class actually uses, and how sure the labels are.

    Every probe sample (``indices`` into ``dataset``, the training split) gets its auxiliary target,
    ``wrapper.aux_targets(x, y, index=...)``, run in the generator's current mode without updating
    its statistics. For primary class ``c`` with ``n_c`` probe samples:

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
        pieces.append(wrapper.aux_targets(x, y, index=index.to(device)).double().cpu())
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
