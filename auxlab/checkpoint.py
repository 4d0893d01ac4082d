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

import copy
import io
import os
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from auxlab._build import check_loadable
from auxlab._seeding import random_states, set_random_states
from auxlab.wrapper import MetaAuxWrapper

__all__ = ["load_checkpoint", "save_checkpoint"]

#: Written now: format 1 plus the optimizer's and the scheduler's class names. Format 1 still loads.
_FORMAT = "auxlab-checkpoint-2"
_FORMATS = ("auxlab-checkpoint-1", _FORMAT)
#: A temporary file of a killed save that is still empty is removed once it is this old (seconds).
_STALE_EMPTY_AGE = 60.0

try:  # POSIX: a writer holds an exclusive lock on its temporary file, so a later save can tell a dead writer's file
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale temporary files are left for the user to remove
    fcntl = None  # type: ignore[assignment]


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
    the new one, never a partial file. A crash does leave its temporary file (``.NAME.*.tmp``); each save
    first removes those of ``path`` whose writer is gone (on POSIX, where a writer holds a lock on its file;
    never one that a live save is writing).

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
        "optimizer_class": _class_name(optimizer),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scheduler_class": _class_name(scheduler),
        "rng": random_states(),
        "counters": dict(counters),
    }
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"the directory of path={str(path)!r} does not exist; create it first")
    # serialised before the temporary file exists, so that the file is empty only for the instant between its
    # creation and its first write: an empty unlocked one is then almost surely a killed writer's
    payload = io.BytesIO()
    torch.save(state, payload)
    _remove_stale_temporaries(target)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until the file is closed, after its rename
        with os.fdopen(handle, "wb") as file:
            file.write(payload.getbuffer())
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

    The file is read with ``torch.load(weights_only=True)``, so it cannot run code, after every member of
    its archive passed its CRC-32 check (a flipped byte anywhere in the payload is found). Everything is
    checked before anything is restored: a truncated or corrupted file, a checkpoint made for another
    hierarchy, strategy or model, an optimizer of another class, parameter groups, hyper-parameters or
    state, or a scheduler of another class raises a ValueError and leaves ``wrapper``, ``optimizer`` and
    ``scheduler`` as they were. Should a restore fail all the same, all three are put back as they were
    before the error propagates.

    Args:
        path: the checkpoint file.
        wrapper: a wrapper built the same way as the one saved.
        optimizer: restored when given; the checkpoint must hold an optimizer state.
        scheduler: restored when given; the checkpoint must hold a scheduler state.
        restore_rng: also restore the torch, NumPy and Python random states (needed for an
            exact continuation when the training loop draws random numbers).
    """
    state = _read(str(path))
    for name, given in (("optimizer", optimizer), ("scheduler", scheduler)):
        if given is not None and state[name] is None:
            raise ValueError(f"checkpoint {str(path)!r} holds no {name} state, but {name}= was given")
    if optimizer is not None:
        _check_optimizer_fits(optimizer, state["optimizer"], state.get("optimizer_class"))
    if scheduler is not None:
        _check_scheduler_fits(scheduler, state["scheduler"], state.get("scheduler_class"))
    check_loadable(wrapper, state["wrapper"])
    before = [(part, copy.deepcopy(part.state_dict())) for part in (wrapper, optimizer, scheduler) if part is not None]
    try:
        for part, name in ((wrapper, "wrapper"), (optimizer, "optimizer"), (scheduler, "scheduler")):
            if part is not None:
                part.load_state_dict(state[name])
    except BaseException:
        for part, saved in before:  # put everything back as it was: a restore is all or nothing
            part.load_state_dict(saved)
        raise
    if restore_rng:
        set_random_states(state["rng"])
    return dict(state["counters"])


def _read(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, every member of its archive checked against its CRC-32 first."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            failed = archive.testzip()
        if failed is not None:
            raise zipfile.BadZipFile(f"member {failed!r} fails its CRC-32 check")
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # the readers raise many types on bad bytes (KeyError for a short text file)
        raise ValueError(f"checkpoint {path!r} is truncated or corrupted and cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") not in _FORMATS:
        raise ValueError(f"{path!r} is not an auxlab checkpoint written by save_checkpoint")
    return state


def _class_name(obj: object | None) -> str | None:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_class(name: str, given: object, saved_class: str | None) -> None:
    if saved_class is not None and saved_class != _class_name(given):
        raise ValueError(f"the checkpoint's {name} is a {saved_class} but {name}= is a {_class_name(given)}; build the {name} of the saved run")


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], saved_class: str | None) -> None:
    """A ValueError unless ``saved`` (with ``saved_class``, if recorded) can be loaded into ``optimizer`` whole:
    the same class, parameter groups of the same sizes, no hyper-parameter it does not know, and the same state
    keys for every parameter that both hold state for."""
    _check_class("optimizer", optimizer, saved_class)
    own_state = optimizer.state_dict()
    own = [len(group["params"]) for group in own_state["param_groups"]]
    theirs = [len(group["params"]) for group in saved["param_groups"]]
    if own != theirs:
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of sizes {theirs} but optimizer= has {own}; "
            "build the optimizer over wrapper.parameters() as in the saved run"
        )
    for i, (mine, their) in enumerate(zip(own_state["param_groups"], saved["param_groups"])):
        unknown = sorted(set(their) - set(mine))
        if unknown:
            raise ValueError(f"the checkpoint's optimizer has hyper-parameters {unknown} in parameter group {i} that optimizer= "
                             f"({_class_name(optimizer)}) does not have; build the optimizer of the saved run")
    for index, values in saved["state"].items():
        if index in own_state["state"] and set(own_state["state"][index]) != set(values):
            raise ValueError(f"the checkpoint's optimizer state of parameter {index} has keys {sorted(values)} but optimizer= "
                             f"keeps {sorted(own_state['state'][index])}; build the optimizer of the saved run")


def _check_scheduler_fits(scheduler: _Stateful, saved: Mapping[str, Any], saved_class: str | None) -> None:
    """A ValueError unless ``saved`` fits ``scheduler``: the same class (if recorded), no key it does not know."""
    _check_class("scheduler", scheduler, saved_class)
    unknown = sorted(set(saved) - set(scheduler.state_dict()))
    if unknown:
        raise ValueError(f"the checkpoint's scheduler has state {unknown} that scheduler= ({_class_name(scheduler)}) does not have; "
                         "build the scheduler of the saved run")


def _remove_stale_temporaries(target: Path) -> None:
    """Remove the temporary files that killed saves of ``target`` left: those whose writer's lock is gone
    (a live writer holds its file's lock from its creation to its rename), empty ones only once they are old
    (a writer that has just created its file may not hold its lock yet). Nothing is removed without ``fcntl``."""
    if fcntl is None:
        return
    for candidate in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            descriptor = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue  # gone already (renamed or removed by another save)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            status = os.fstat(descriptor)
            if status.st_size > 0 or time.time() - status.st_mtime > _STALE_EMPTY_AGE:
                candidate.unlink(missing_ok=True)
        except OSError:
            pass  # locked: a live save is writing it
        finally:
            os.close(descriptor)


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
