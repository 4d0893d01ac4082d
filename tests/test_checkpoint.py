"""auxlab.checkpoint: atomic writes, safe loads, checks before restore, exact resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyBNNet, assert_unchanged, batch, snapshot
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
