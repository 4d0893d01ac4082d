"""Data-parallel training across processes: what the wrapper exchanges through ``torch.distributed``.

With ``MetaAuxWrapper(..., distributed=True)`` every process (rank) holds the whole wrapper and
trains on its own share of each batch, and the ranks stay identical because they exchange:

- at construction, every parameter and buffer of rank 0 (classifier, auxiliary head, generator,
  fixed label tables), as DistributedDataParallel does;
- in a step, the model step's gradient and loss terms (averaged: the gradient of the mean loss
  over the concatenated batch, for equal per-rank batches), ``u``, the gradient of the primary
  loss after the virtual step (averaged), the batch-mean target distribution of the entropy term
  (averaged) and the generator's gradient (summed: each rank holds its own samples' share);
- every decision on a non-finite loss, so that all ranks raise or skip together.

Only the engines that write the hypergradient from first-order gradients (``"jvp"`` and
``"finite_difference"``) decompose this way; the result is then that of one process on the
concatenated batch. BatchNorm normalises with each rank's own batch statistics (as under
DistributedDataParallel), so with BatchNorm the match is close but not exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["CALLS", "LocalReducer", "Reducer"]

#: The wrapper's calls that talk to the other ranks; their index is what the ranks exchange to check they agree.
CALLS = ("loss", "meta_step", "step", "aux_targets", "hypergradient_parts")


class LocalReducer:
    """The stand-in for one process: every collective operation leaves its tensors as they are."""

    world_size = 1
    #: Whether this is data-parallel training (a process group, even of one rank).
    distributed = False

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Nothing to average in one process."""

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Nothing to sum in one process."""

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """``flag`` itself."""
        return flag

    def mean(self, local: Tensor) -> Tensor:
        """``local`` itself."""
        return local

    def broadcast_(self, module: nn.Module) -> None:
        """Nothing to broadcast in one process."""

    def agree(self, call: str, batch_size: int, meta_batch_size: int, device: torch.device) -> None:
        """One process always agrees with itself."""

    def warn_unaveraged_loss(self) -> None:
        """A ``loss().backward()`` of one process needs no averaging."""


class Reducer(LocalReducer):
    """Collective operations over one process group, on lists of tensors (flattened into one call).

    Args:
        group: the process group; None for the default group.
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "distributed=True needs an initialised process group: call torch.distributed.init_process_group(...) "
                "(torchrun sets up its environment) before building the wrapper"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.source = 0 if group is None else dist.get_global_rank(group, 0)
        self.distributed = True
        self._warned_loss = False

    def warn_unaveraged_loss(self) -> None:
        """Warn once that ``loss().backward()`` is not averaged over the ranks (``step`` is)."""
        if not self._warned_loss:
            self._warned_loss = True
            warnings.warn(
                "with distributed=True, the gradients of loss().backward() are not averaged over the ranks, so the ranks "
                "drift apart; train with wrapper.step(x, y, optimizer), which averages them", RuntimeWarning, stacklevel=3,
            )

    def agree(self, call: str, batch_size: int, meta_batch_size: int, device: torch.device) -> None:
        """A ValueError on every rank, before anything else is exchanged, unless every rank makes the same ``call``
        (one of :data:`CALLS`) with batches of the same sizes: the averages assume equal per-rank batches, and ranks
        that run different calls would otherwise exchange mismatched tensors or wait for each other for ever.
        One all-gather of three numbers per call."""
        mine = torch.tensor([CALLS.index(call), batch_size, meta_batch_size], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        seen = [tuple(int(v) for v in t.tolist()) for t in gathered]
        if len(set(seen)) > 1:
            described = "; ".join(f"rank {r} called {CALLS[c]} with a batch of {b} (meta batch {m})" for r, (c, b, m) in enumerate(seen))
            raise ValueError(
                f"distributed=True needs every rank to make the same call at the same time with batches of the same size, but {described}; "
                "nothing was updated. Give every rank the same per-rank batch size (e.g. DistributedSampler with drop_last=True)"
            )

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor, in place, by its mean over the ranks."""
        self._all_reduce_(tensors, scale=1.0 / self.world_size)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor, in place, by its sum over the ranks."""
        self._all_reduce_(tensors, scale=1.0)

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank."""
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item() == 1.0)

    def mean(self, local: Tensor) -> Tensor:
        """The mean of ``local`` over the ranks, differentiable with respect to this rank's ``local``.

        The other ranks' values enter as constants, so the gradients of all ranks, summed, are the
        gradient of the mean.
        """
        total = local.detach().clone()
        self.sum_([total])
        return (local + (total - local.detach())) / self.world_size

    def broadcast_(self, module: nn.Module) -> None:
        """Overwrite every parameter and buffer of ``module`` with rank 0's values."""
        with torch.no_grad():
            for submodule in module.modules():  # module by module: a wrapper may hide parameters from parameters()
                for tensor in [*submodule.parameters(recurse=False), *submodule.buffers(recurse=False)]:
                    dist.broadcast(tensor.data, src=self.source, group=self.group)

    def _all_reduce_(self, tensors: Sequence[Tensor], *, scale: float) -> None:
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat.mul_(scale)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
