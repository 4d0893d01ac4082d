"""Whole training state to and from disk: written atomically, read without running code.

A checkpoint holds the wrapper (classifier, auxiliary head, generator, generator optimizer, step
counters and any fixed label table), the user's optimizer and LR scheduler when given, the random
states of torch, NumPy and Python, and the user's own counters (epoch, step, ...). Restoring it and
running on gives, on CPU, bit for bit the run that was not interrupted::

    save_checkpoint("run/last.pt", wrapper, optimizer=opt, scheduler=sched, epoch=epoch)
    ...
    counters = load_checkpoint("run/last.pt", wrapper, optimizer=opt, scheduler=sched)
    start_epoch = counters["epoch"] + 1
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from auxlab.wrapper import MetaAuxWrapper

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "auxlab-checkpoint-1"


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def save_checkpoint(
    path: str | os.PathLike[str],
    wrapper: MetaAuxWrapper,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: _Stateful | None = None,
    **counters: float | str | bool | None,
) -> None:
    """Write the whole training state to ``path`` atomically.

    The state goes to a temporary file in the same directory, is flushed to disk (fsync), and then
    replaces ``path`` in one rename: a crash at any moment leaves either the previous checkpoint or
    the new one, never a partial file.

    Args:
        path: the checkpoint file; its directory must exist.
        wrapper: the wrapper being trained.
        optimizer: the optimizer of ``wrapper.parameters()``.
        scheduler: its learning-rate scheduler (anything with ``state_dict``/``load_state_dict``).
        counters: plain values to restore with it, e.g. ``epoch=3, step=1200``.
    """
    if not isinstance(wrapper, MetaAuxWrapper):
        raise TypeError(f"wrapper must be a MetaAuxWrapper, got {type(wrapper).__name__}")
    for name, value in counters.items():
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise TypeError(f"counter {name!r} must be an int, float, str, bool or None, got {type(value).__name__}")
    state = {
        "format": _FORMAT,
        "wrapper": wrapper.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _random_states(),
        "counters": dict(counters),
    }
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"the directory of path={str(path)!r} does not exist; create it first")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def load_checkpoint(
    path: str | os.PathLike[str],
    wrapper: MetaAuxWrapper,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: _Stateful | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a state written by :func:`save_checkpoint`; return its counters.

    The file is read with ``torch.load(weights_only=True)``, so it cannot run code. Everything is
    checked before anything is restored: a truncated or corrupted file, a checkpoint made for
    another hierarchy, strategy or model, or an optimizer of another shape raises a ValueError and
    leaves ``wrapper``, ``optimizer`` and ``scheduler`` as they were.

    Args:
        path: the checkpoint file.
        wrapper: a wrapper built the same way as the one saved.
        optimizer, scheduler: restored when given; the checkpoint must hold them.
        restore_rng: also restore the torch, NumPy and Python random states (needed for an
            exact continuation when the training loop draws random numbers).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as error:  # torch's readers raise many types on bad bytes (KeyError for a short text file)
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted and cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} is not an auxlab checkpoint written by save_checkpoint")
    for name, given in (("optimizer", optimizer), ("scheduler", scheduler)):
        if given is not None and state[name] is None:
            raise ValueError(f"checkpoint {str(path)!r} holds no {name} state, but {name}= was given")
    if optimizer is not None:
        _check_optimizer_fits(optimizer, state["optimizer"])
    wrapper.load_state_dict(state["wrapper"])  # checks everything before loading anything
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_random_states(state["rng"])
    return dict(state["counters"])


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    own = [len(group["params"]) for group in optimizer.state_dict()["param_groups"]]
    theirs = [len(group["params"]) for group in saved["param_groups"]]
    if own != theirs:
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of sizes {theirs} but optimizer= has {own}; "
            "build the optimizer over wrapper.parameters() as in the saved run"
        )


def _random_states() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
    }


def _set_random_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = states["numpy"]
    np.random.set_state((
        numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
