"""A run's checkpoint: the whole state of one (strategy, seed) run, written after every epoch and read on resume.

It holds what :func:`auxlab.checkpoint.save_checkpoint` saves (wrapper, optimizer, LR schedulers,
random states) and the runner's own counters: the run's name, its records and probe columns so
far, the generators of the batch order and of the meta batches, and the float16 loss scaler.
Restored, the run continues bit for bit as if it had not stopped (on CPU).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from auxlab.checkpoint import load_checkpoint, save_checkpoint
from auxlab.experiments.meta_batches import MetaBatches
from auxlab.experiments.randomness import decode_state, encode_state
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["Schedulers", "restore_run", "save_run"]


class Schedulers:
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


@dataclass(frozen=True)
class RunParts:
    """What a run's checkpoint holds besides its records: the wrapper and everything that moves with it.

    Attributes:
        wrapper, optimizer, schedulers: the model, its optimizer and its learning-rate schedulers.
        strategy, seed: which run it is (checked at restore).
        batch_order: the generator of the training batches' order.
        meta_batches: the development split's meta batches, if the run has one.
        scaler: the float16 loss scaler, if any.
    """

    wrapper: MetaAuxWrapper
    optimizer: torch.optim.Optimizer
    schedulers: Schedulers | None
    strategy: str
    seed: int
    batch_order: torch.Generator
    meta_batches: MetaBatches | None
    scaler: torch.amp.GradScaler | None


def save_run(checkpoint: str | os.PathLike[str], run: RunParts, *, epoch: int, records: list[dict[str, Any]], columns: Tensor | None) -> None:
    """Write the run's state after ``epoch`` to ``checkpoint`` (atomically)."""
    save_checkpoint(
        checkpoint,
        run.wrapper,
        optimizer=run.optimizer,
        scheduler=run.schedulers,
        strategy=run.strategy,
        seed=run.seed,
        epoch=epoch,
        records=json.dumps(records),
        probe_columns=json.dumps(columns.tolist()) if columns is not None else None,
        batch_order=encode_state(run.batch_order.get_state()),
        meta_order=encode_state(run.meta_batches.pass_state) if run.meta_batches is not None else None,
        meta_taken=run.meta_batches.taken if run.meta_batches is not None else None,
        grad_scaler=json.dumps(run.scaler.state_dict()) if run.scaler is not None else None,
    )


def restore_run(checkpoint: str | os.PathLike[str], run: RunParts, *, epochs: int) -> tuple[list[dict[str, Any]], Tensor | None]:
    """Restore what :func:`save_run` wrote, the global random states included; return the records and probe columns so far.

    Raises:
        ValueError: if the checkpoint is of another strategy or seed, or holds epochs the run does not have.
    """
    counters = load_checkpoint(checkpoint, run.wrapper, optimizer=run.optimizer, scheduler=run.schedulers)  # and the random states
    records, columns = _run_state(counters, checkpoint, strategy=run.strategy, seed=run.seed, epochs=epochs)
    run.batch_order.set_state(decode_state(counters["batch_order"]))
    if run.meta_batches is not None:
        run.meta_batches.load_state(decode_state(counters["meta_order"]), counters["meta_taken"])
    if run.scaler is not None:
        run.scaler.load_state_dict(json.loads(counters["grad_scaler"]))
    return records, columns


def _run_state(
    counters: dict[str, Any], path: str | os.PathLike[str], *, strategy: str, seed: int, epochs: int
) -> tuple[list[dict[str, Any]], Tensor | None]:
    """The records and probe columns that :func:`save_run` saved with a checkpoint."""
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
