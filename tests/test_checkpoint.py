"""auxlab.checkpoint: atomic writes, safe loads, checks before restore, exact resume."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import TinyBNNet, assert_unchanged, batch, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import auxlab.checkpoint
from auxlab import MetaAuxWrapper
from auxlab.checkpoint import load_checkpoint, save_checkpoint

SCRIPT = Path(__file__).with_name("resume_script.py")


def _trained(psi: int = 2, steps: int = 2) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=psi)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = batch(6, seed=step)
        loss = wrapper.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        wrapper.meta_step(x, y)
    return wrapper, optimizer


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], check=True, env=env, timeout=300)
    return torch.load(out, weights_only=True)


def test_resume_in_a_fresh_process_is_bit_for_bit_the_uninterrupted_run(tmp_path: Path) -> None:
    checkpoint = tmp_path / "half.pt"
    whole = _run(tmp_path, "--steps", "6")
    first = _run(tmp_path, "--steps", "3", "--save", str(checkpoint))
    second = _run(tmp_path, "--steps", "6", "--load", str(checkpoint))
    assert [float(v) for v in first["losses"] + second["losses"]] == [float(v) for v in whole["losses"]]
    for key, value in whole["state"].items():
        if isinstance(value, Tensor):
            assert torch.equal(value, second["state"][key]), key
    assert second["state"]["_extra_state"]["steps"] == {"model": 6, "meta": 6}
    momentum = [s["momentum_buffer"] for s in whole["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, second["optimizer"]["state"].values()))


def test_round_trip_restores_wrapper_optimizer_scheduler_rng_and_counters(tmp_path: Path) -> None:
    wrapper, optimizer = _trained()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path / "c.pt", wrapper, optimizer=optimizer, scheduler=scheduler, epoch=4, note="x")
    expected_rng = torch.rand(3)

    other, other_optimizer = _trained(steps=3)
    other_scheduler = torch.optim.lr_scheduler.StepLR(other_optimizer, step_size=1, gamma=0.5)
    counters = load_checkpoint(tmp_path / "c.pt", other, optimizer=other_optimizer, scheduler=other_scheduler)
    assert counters == {"epoch": 4, "note": "x"}
    assert torch.equal(torch.rand(3), expected_rng)
    assert other_scheduler.state_dict() == scheduler.state_dict()
    for key, value in wrapper.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, other.state_dict()[key]), key
    assert other.steps == {"model": 2, "meta": 2}
    assert other_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper, optimizer = _trained()
    path = tmp_path / "last.pt"
    save_checkpoint(path, wrapper, optimizer=optimizer, step=1)

    def crash(state: object, file: object) -> None:
        file.write(b"partial bytes")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(auxlab.checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, wrapper, optimizer=optimizer, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"], "a temporary file was left behind"
    assert load_checkpoint(path, wrapper, optimizer=optimizer) == {"step": 1}


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty", "text"])
def test_a_damaged_checkpoint_gives_a_clear_error_and_the_older_one_still_loads(tmp_path: Path, damage: str) -> None:
    wrapper, optimizer = _trained()
    save_checkpoint(tmp_path / "older.pt", wrapper, optimizer=optimizer, step=1)
    save_checkpoint(tmp_path / "newer.pt", wrapper, optimizer=optimizer, step=2)
    data = (tmp_path / "newer.pt").read_bytes()
    damaged = {
        "truncate": data[: len(data) // 2], "garble": data[:100] + bytes(255 - b for b in data[100:]), "empty": b"",
        "text": b"hello world" * 10,  # torch's weights-only unpickler raised a raw KeyError: 101 (issue 15, defect 1)
    }[damage]
    (tmp_path / "newer.pt").write_bytes(damaged)
    before = snapshot(wrapper)
    with pytest.raises(ValueError, match=r"newer.pt' is truncated or corrupted"):
        load_checkpoint(tmp_path / "newer.pt", wrapper, optimizer=optimizer)
    assert_unchanged(wrapper, before)
    assert load_checkpoint(tmp_path / "older.pt", wrapper, optimizer=optimizer) == {"step": 1}


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "auxlab-checkpoint-1", "payload": _Payload()}, path)
    wrapper, _ = _trained()
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(path, wrapper)
    assert not (tmp_path / "pwned.txt").exists()


def test_a_checkpoint_of_another_hierarchy_or_optimizer_changes_nothing(tmp_path: Path) -> None:
    other, other_optimizer = _trained(psi=3)
    save_checkpoint(tmp_path / "psi3.pt", other, optimizer=other_optimizer)
    wrapper, optimizer = _trained(psi=2)
    before, optimizer_before = snapshot(wrapper), optimizer.state_dict()
    with pytest.raises(ValueError, match=r"made for psi=\[3, 3, 3\] but this wrapper has psi=\[2, 2, 2\]"):
        load_checkpoint(tmp_path / "psi3.pt", wrapper, optimizer=optimizer)

    save_checkpoint(tmp_path / "two-groups.pt", wrapper, optimizer=torch.optim.SGD([
        {"params": list(wrapper.model.parameters())}, {"params": list(wrapper.aux_head.parameters())}], lr=0.1))
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[6, 2\] but optimizer= has \[8\]"):
        load_checkpoint(tmp_path / "two-groups.pt", wrapper, optimizer=optimizer)
    save_checkpoint(tmp_path / "no-optimizer.pt", wrapper)
    with pytest.raises(ValueError, match="holds no optimizer state, but optimizer= was given"):
        load_checkpoint(tmp_path / "no-optimizer.pt", wrapper, optimizer=optimizer)
    assert_unchanged(wrapper, before)
    assert str(optimizer.state_dict()) == str(optimizer_before)


def test_bad_arguments(tmp_path: Path) -> None:
    wrapper, _ = _trained()
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        save_checkpoint(tmp_path / "missing" / "c.pt", wrapper)
    with pytest.raises(TypeError, match="counter 'epoch' must be an int, float, str, bool or None, got list"):
        save_checkpoint(tmp_path / "c.pt", wrapper, epoch=[1])
    with pytest.raises(TypeError, match="wrapper must be a MetaAuxWrapper"):
        save_checkpoint(tmp_path / "c.pt", wrapper.model)  # type: ignore[arg-type]
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not an auxlab checkpoint"):
        load_checkpoint(tmp_path / "other.pt", wrapper)


# ------------------------------------------------------------------------------ issue 15: defects 2-4
def test_flipped_bytes_in_the_payload_are_refused(tmp_path: Path) -> None:
    """Defect 2: 200 bytes flipped a third of the way in loaded silently (a generator weight off by up to 1,720)."""
    wrapper, optimizer = _trained()
    path = tmp_path / "c.pt"
    save_checkpoint(path, wrapper, optimizer=optimizer, step=1)
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + 200] = bytes(b ^ 0xFF for b in data[start : start + 200])
    path.write_bytes(bytes(data))
    before = snapshot(wrapper)
    with pytest.raises(ValueError, match=r"c.pt' is truncated or corrupted"):
        load_checkpoint(path, wrapper, optimizer=optimizer)
    assert_unchanged(wrapper, before)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> str:
    return str(optimizer.state_dict())


@pytest.mark.parametrize("other", ["adam-fresh", "adam-stepped", "adamw-same-keys"])
def test_an_optimizer_of_another_class_is_refused_before_anything_is_restored(tmp_path: Path, other: str) -> None:
    """Defect 3: SGD (momentum) saved, Adam given: no error at load, then KeyError 'step' at the first Adam step
    (or a KeyError after the wrapper was overwritten)."""
    wrapper, optimizer = _trained()
    if other == "adamw-same-keys":  # AdamW keeps Adam's keys: the class name recorded in the file tells them apart
        optimizer = torch.optim.Adam(wrapper.parameters())
    save_checkpoint(tmp_path / "saved.pt", wrapper, optimizer=optimizer)
    fresh, _ = _trained(steps=1)
    given: torch.optim.Optimizer = (torch.optim.AdamW if other == "adamw-same-keys" else torch.optim.Adam)(fresh.parameters(), lr=1e-3)
    if other == "adam-stepped":
        fresh.loss(*batch(6)).backward()
        given.step()
    before, optimizer_before = snapshot(fresh), _optimizer_state(given)
    expected = "is a torch.optim.adam.Adam but optimizer= is a torch.optim.adamw.AdamW" if other == "adamw-same-keys" else (
        "is a torch.optim.sgd.SGD but optimizer= is a torch.optim.adam.Adam")
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(tmp_path / "saved.pt", fresh, optimizer=given)
    assert_unchanged(fresh, before)
    assert _optimizer_state(given) == optimizer_before


def test_a_format_1_file_is_checked_by_its_hyper_parameters_and_state_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files of format 1 record no class name: the hyper-parameter keys and state keys tell SGD from Adam."""
    wrapper, optimizer = _trained()
    monkeypatch.setattr(auxlab.checkpoint, "_class_name", lambda obj: None)
    save_checkpoint(tmp_path / "sgd.pt", wrapper, optimizer=optimizer)
    monkeypatch.undo()
    fresh, _ = _trained(steps=1)
    adam = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"hyper-parameters \['dampening', 'momentum', 'nesterov'\] in parameter group 0"):
        load_checkpoint(tmp_path / "sgd.pt", fresh, optimizer=adam)
    stepped = torch.optim.SGD(fresh.parameters(), lr=0.1)  # no momentum: it keeps momentum_buffer = None, a key all the same
    assert load_checkpoint(tmp_path / "sgd.pt", fresh, optimizer=stepped) == {}


def test_a_scheduler_of_another_class_is_refused(tmp_path: Path) -> None:
    wrapper, optimizer = _trained()
    save_checkpoint(tmp_path / "c.pt", wrapper, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=2))
    fresh, fresh_optimizer = _trained(steps=1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(fresh_optimizer, gamma=0.5)
    before, optimizer_before, scheduler_before = snapshot(fresh), _optimizer_state(fresh_optimizer), scheduler.state_dict()
    with pytest.raises(ValueError, match="the checkpoint's scheduler is a torch.optim.lr_scheduler.StepLR"):
        load_checkpoint(tmp_path / "c.pt", fresh, optimizer=fresh_optimizer, scheduler=scheduler)
    assert_unchanged(fresh, before)
    assert _optimizer_state(fresh_optimizer) == optimizer_before and scheduler.state_dict() == scheduler_before


def test_a_restore_that_fails_half_way_puts_everything_back(tmp_path: Path) -> None:
    """Transactional: the wrapper and the optimizer were restored when the scheduler's restore raised."""
    wrapper, optimizer = _trained(steps=3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    save_checkpoint(tmp_path / "c.pt", wrapper, optimizer=optimizer, scheduler=scheduler)

    class Failing(torch.optim.lr_scheduler.StepLR):
        def load_state_dict(self, state_dict: dict) -> None:
            raise RuntimeError("disk gone")

    fresh, fresh_optimizer = _trained(steps=1)
    failing = Failing(fresh_optimizer, step_size=2)
    before, optimizer_before = snapshot(fresh), _optimizer_state(fresh_optimizer)
    steps_before = dict(fresh.steps)
    with pytest.raises(RuntimeError, match="disk gone"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(auxlab.checkpoint, "_check_scheduler_fits", lambda *args: None)
        load_checkpoint(tmp_path / "c.pt", fresh, optimizer=fresh_optimizer, scheduler=failing)
    assert_unchanged(fresh, before)
    assert _optimizer_state(fresh_optimizer) == optimizer_before and fresh.steps == steps_before


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.skipif(auxlab.checkpoint.fcntl is None, reason="stale temporary files are recognised by their lock (POSIX)")
def test_a_save_removes_the_temporary_files_of_killed_saves_but_not_a_live_ones(tmp_path: Path) -> None:
    """Defect 4: six kill -9 during saves left four .NAME.*.tmp files for ever."""
    import fcntl

    wrapper, optimizer = _trained()
    path = tmp_path / "last.pt"
    for name in (".last.pt.dead1.tmp", ".last.pt.dead2.tmp", ".other.pt.dead.tmp"):
        (tmp_path / name).write_bytes(b"x" * 1000)  # what a killed writer leaves: no lock held
    (tmp_path / ".last.pt.empty.tmp").write_bytes(b"")  # empty and fresh: a writer that has not locked it yet
    live = tmp_path / ".last.pt.live.tmp"
    with open(live, "wb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # a save that is writing now
        handle.write(b"y" * 1000)
        save_checkpoint(path, wrapper, optimizer=optimizer)
        assert _temporaries(tmp_path) == [".last.pt.empty.tmp", ".last.pt.live.tmp", ".other.pt.dead.tmp"]
    old = time.time() - 3600
    os.utime(tmp_path / ".last.pt.empty.tmp", (old, old))
    save_checkpoint(path, wrapper, optimizer=optimizer)
    assert _temporaries(tmp_path) == [".other.pt.dead.tmp"]  # only this path's, and the other path's file is left


_KILLED_WRITER = """
import sys, torch
from torch import nn
from auxlab import MetaAuxWrapper
from auxlab.checkpoint import save_checkpoint
wrapper = MetaAuxWrapper(nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 3)), num_classes=3, psi=2)
print("ready", flush=True)
while True:
    save_checkpoint(sys.argv[1], wrapper)
"""


@pytest.mark.skipif(auxlab.checkpoint.fcntl is None, reason="stale temporary files are recognised by their lock (POSIX)")
def test_after_kill_9_during_saves_the_next_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    import signal

    path = tmp_path / "last.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    leftovers = 0
    for delay in (0.15, 0.3, 0.45, 0.6):
        writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        leftovers = max(leftovers, len(_temporaries(tmp_path)))
    wrapper, _ = _trained()
    with pytest.raises(ValueError, match="does not fit this wrapper"):  # the killed writers' file: loadable, of another model
        load_checkpoint(path, wrapper)
    save_checkpoint(path, wrapper)
    assert _temporaries(tmp_path) == [], f"{leftovers} temporary file(s) of killed saves were left"
    assert load_checkpoint(path, wrapper) == {}


# ------------------------------------------------------------------------------ property: the reader never half-loads
_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(b"")),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0, exclude_max=True), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=64)),
)


def _mutated(data: bytes, kind: str, where: float, payload: bytes) -> bytes:
    at = int(where * len(data))
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + payload + data[at:]
    span = data[at : at + len(payload)]
    return data[:at] + bytes(b ^ (p or 1) for b, p in zip(span, payload)) + data[at + len(span) :]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=_MUTATIONS)
def test_a_damaged_file_loads_exactly_the_saved_state_or_raises_value_error_changing_nothing(mutation: tuple[str, float, bytes]) -> None:
    saved, saved_optimizer = _SAVED
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.pt"
        path.write_bytes(_mutated(_SAVED_BYTES, *mutation))
        wrapper, optimizer = _trained(steps=1)
        before, optimizer_before = snapshot(wrapper), _optimizer_state(optimizer)
        try:
            counters = load_checkpoint(path, wrapper, optimizer=optimizer, restore_rng=False)
        except ValueError:
            assert_unchanged(wrapper, before)
            assert _optimizer_state(optimizer) == optimizer_before
            return
    assert counters == {"epoch": 3}
    assert_unchanged(wrapper, snapshot(saved))
    assert _optimizer_state(optimizer) == _optimizer_state(saved_optimizer)


_SAVED = _trained(steps=3)
with tempfile.TemporaryDirectory() as _directory:
    save_checkpoint(Path(_directory) / "c.pt", _SAVED[0], optimizer=_SAVED[1], epoch=3)
    _SAVED_BYTES = (Path(_directory) / "c.pt").read_bytes()
