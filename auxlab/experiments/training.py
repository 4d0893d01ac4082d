"""The training of one (strategy, seed) run: its epochs, and in each the configured schedule of steps.

:func:`train_one` builds the run (:mod:`auxlab.experiments.build`), trains it epoch by epoch with
:func:`train_epoch`, measures it after every epoch (:mod:`auxlab.experiments.diagnostics`) and,
with a checkpoint, saves its state after every epoch and continues from it on resume
(:mod:`auxlab.experiments.run_checkpoint`). The loop is the same for every strategy: whether there
is a meta step is asked of the wrapper, what the run needs of
:class:`~auxlab.experiments.strategies.Strategy`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from auxlab.data import IndexedDataset
from auxlab.experiments.build import build_wrapper, run_data
from auxlab.experiments.config import ExperimentConfig
from auxlab.experiments.diagnostics import (
    LEARNING_DIAGNOSTICS,
    accuracies,
    collapse_diagnostic,
    learning_diagnostics,
    recalibrate_batchnorm,
    weighting_params,
)
from auxlab.experiments.meta_batches import MetaBatches
from auxlab.experiments.randomness import random_states_kept
from auxlab.experiments.run_checkpoint import RunParts, Schedulers, restore_run, save_run
from auxlab.experiments.strategies import Strategy
from auxlab.experiments.tasks import TaskData
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["RunOutcome", "autocast", "epoch_line", "has_meta_step", "progress_bar", "train_epoch", "train_one"]

Log = Callable[[str], None]


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
        probe_distribution: ``(M, K)`` their label distributions after the last epoch (the argmax is
            ``probe_columns``); None with ``probe_columns``.
    """

    records: list[dict[str, Any]]
    probe_columns: Tensor | None
    probe: Tensor | None = None
    probe_distribution: Tensor | None = None



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
    A strategy that learns from a development split (``+maoal``, ``rl``; see :func:`~auxlab.experiments.build.run_data`)
    trains on the rest of the training split, and its meta batches ``(x_meta, y_meta)`` cycle
    through the development split in passes shuffled by a ``torch.Generator`` seeded with
    ``seed + 2**32``.

    With ``checkpoint``, the run's whole state is written there (atomically, by
    :func:`~auxlab.experiments.run_checkpoint.save_run`) after every epoch: wrapper, optimizer, LR schedulers,
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
    diagnostic of :func:`~auxlab.experiments.diagnostics.collapse_diagnostic` on the ``probe`` indices of the training split
    (``subclass_share``, ``subclasses_used``, ``subclass_entropy``, ``target_confidence``,
    ``subclass_soft_share``; None in single-task mode and for a strategy that augments the batch,
    whose sub-classes are its transformations). Probe samples in the development split are left out.
    """
    device = torch.device(config.device)
    spec = Strategy.parse(strategy)
    split, data = run_data(config, data, spec)
    probe_local, probe_full = split.probe(probe)
    with random_states_kept(device, every_cuda_device=checkpoint is not None):
        wrapper = build_wrapper(config, data, spec, seed=seed, device=device)
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        optimizers = [opt for opt in (optimizer, wrapper.generator_optimizer) if opt is not None]
        schedulers = [torch.optim.lr_scheduler.StepLR(opt, config.lr_step, config.lr_gamma) for opt in optimizers] if config.lr_step else []
        scheduler_state = Schedulers(schedulers) if schedulers else None
        batch_order = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            IndexedDataset(data.train),
            batch_size=config.batch_size,
            shuffle=True,
            generator=batch_order,
            drop_last=len(data.train) % config.batch_size == 1,  # BatchNorm cannot train on a batch of one
        )
        meta_batches = MetaBatches(split.dev, batch_size=config.batch_size, seed=seed + 2**32) if split.dev is not None else None
        scaler = torch.amp.GradScaler(device.type) if config.autocast == "fp16" else None
        parts = RunParts(wrapper, optimizer, scheduler_state, strategy, seed, batch_order, meta_batches, scaler)
        labels = "none" if wrapper.is_single_task else ("learned" if wrapper.generator_optimizer is not None else "fixed")
        psi = list(wrapper.mask.psi)
        records: list[dict[str, Any]] = []
        columns: Tensor | None = None
        distribution: Tensor | None = None
        first_epoch = 0
        initial = {name: p.detach().clone() for name, p in wrapper.meta_learner.owner.named_parameters()} if wrapper.meta_learner is not None else {}
        if checkpoint is not None and resume and Path(checkpoint).is_file():
            records, columns = restore_run(checkpoint, parts, epochs=config.epochs)
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
                train_loss, meta_loss, batches = train_epoch(
                    wrapper, optimizer, loader, config, device, meta_batches=meta_batches, scaler=scaler,
                    desc=f"{strategy} seed {seed} epoch {epoch}/{config.epochs}",
                )
                elapsed = time.perf_counter() - start
                for scheduler in schedulers:
                    scheduler.step()
                if config.inner_lr is None:  # alpha follows the model's learning rate, as in the original code
                    wrapper.inner_lr = optimizer.param_groups[0]["lr"]
            last = epoch == config.epochs
            if config.recalibrate_bn:
                recalibrate_batchnorm(wrapper.model, data.train, batch_size=config.eval_batch_size, device=device)
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
                **accuracies(wrapper, data, config, device, test=last, aggregated=spec.augments),
                "weighting_params": weighting_params(wrapper),
                "labels": labels,
                "subclass_share": None,
                "subclasses_used": None,
                "subclass_entropy": None,
                "target_confidence": None,
                "subclass_soft_share": None,
                **dict.fromkeys(LEARNING_DIAGNOSTICS),
            }
            if spec.has_label_diagnostics:
                wrapper.train()  # the generator's training mode; the diagnostic leaves its statistics alone
                diagnostic, distribution = collapse_diagnostic(wrapper, data.train, probe_local, batch_size=config.eval_batch_size, device=device)
                columns = distribution.argmax(1)
                record.update(diagnostic, **learning_diagnostics(wrapper, initial, data, probe_local, config, device))
            records.append(record)
            log(epoch_line(record, config.epochs, sum(psi)))
            if checkpoint is not None:
                save_run(checkpoint, parts, epoch=epoch, records=records, columns=columns)
    return RunOutcome(records, columns, probe_full if columns is not None else None, distribution)


def has_meta_step(wrapper: MetaAuxWrapper) -> bool:
    """Whether the wrapper's meta step learns something: a generator's labels or a meta-learned weighting."""
    return wrapper.meta_learner is not None


def train_epoch(
    wrapper: MetaAuxWrapper,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    config: ExperimentConfig,
    device: torch.device,
    *,
    desc: str,
    meta_batches: MetaBatches | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float | None, int]:
    """One epoch of the configured schedule; returns (mean model loss, mean meta objective or None, model steps).

    With ``meta_batches``, every ``step`` (per-batch) or ``meta_step`` (alternating) gets the next
    development batch as its meta batch; without, the meta batch is the training batch itself.
    With ``config.autocast`` the steps run under ``torch.autocast``; ``scaler`` goes to ``step``.
    """
    meta_learns = has_meta_step(wrapper)
    per_phase = len(loader) if config.max_batches is None else min(len(loader), config.max_batches)
    alternating = config.schedule == "alternating"
    bar = progress_bar(per_phase * (2 if alternating and meta_learns else 1), desc, config.progress)

    def meta_batch() -> tuple[Tensor | None, Tensor | None]:
        return meta_batches.next(device) if meta_batches is not None else (None, None)

    wrapper.train()
    loss_sum, meta_sum, seen, meta_seen = 0.0, 0.0, 0, 0
    try:
        for x, y, index in _batches(loader, per_phase, device):
            if alternating:
                with autocast(config, device):
                    loss = wrapper.loss(x, y, index=index)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                optimizer.step()
            else:  # the model step and the meta step together, sharing their work where the engine can
                x_meta, y_meta = meta_batch()
                with autocast(config, device):
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
                with autocast(config, device):
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


def autocast(config: ExperimentConfig, device: torch.device) -> torch.autocast:
    """``torch.autocast`` with the config's dtype, or a disabled one when it trains in float32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast or "", torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=config.autocast is not None)


def _batches(loader: DataLoader[Any], limit: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for step, (x, y, index) in enumerate(loader):
        if step >= limit:
            return
        yield x.to(device), y.to(device), index.to(device)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, unit="batch", dynamic_ncols=True)


def epoch_line(record: dict[str, Any], epochs: int, num_aux: int) -> str:
    """The progress line of one epoch's record: losses, accuracies, the sub-classes used (of ``num_aux``), the time."""
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
