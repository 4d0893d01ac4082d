"""A soak run of the experiments runner (issue 15): killed with SIGKILL at random moments five times and resumed
each time, an experiment ends bit-identical to an uninterrupted one. Per-batch MAXL, the light generator and a
meta-learned weighting (``random+maoal``), on digits, one seed; about a minute."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.experiments.support import csv_without_time, read_jsonl, summary_without_time, without_time

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

ARGS = [
    "--dataset", "digits", "--strategies", "maxl,maxl-light,random+maoal", "--seeds", "0", "--epochs", "3",
    "--limit-train", "400", "--limit-test", "200", "--collapse-samples", "100", "--no-plots", "--no-progress",
    "--threads", "1", "--name", "soak",
]
KILLS = 5


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "auxlab.experiments", *ARGS, "--out", str(out), *extra]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)

    walk("", state)
    return found


def test_an_experiment_killed_five_times_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    whole = subprocess.run(_command(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert whole.returncode == 0, whole.stderr
    draws = random.Random(0)
    cut, landed = tmp_path / "cut", 0
    for _ in range(KILLS):
        resume = ("--resume",) if (cut / "soak" / "config.json").is_file() else ()
        process = subprocess.Popen(_command(cut, *resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(draws.uniform(1.0, 8.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            landed += 1
        process.wait(timeout=60)
    assert landed >= 3, f"only {landed} of {KILLS} kills landed while the runner ran"
    resume = ("--resume",) if (cut / "soak" / "config.json").is_file() else ()
    finished = subprocess.run(_command(cut, *resume), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr

    a, b = tmp_path / "whole" / "soak", cut / "soak"
    assert without_time(read_jsonl(b / "metrics.jsonl")) == without_time(read_jsonl(a / "metrics.jsonl"))
    assert csv_without_time(b / "metrics.csv") == csv_without_time(a / "metrics.csv")
    def summary(run: Path) -> list[str]:  # the command line differs (--out, --resume)
        return [line for line in summary_without_time(run / "summary.md").splitlines() if not line.startswith("Command:")]

    assert summary(b) == summary(a)
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (b / "checkpoints").iterdir()) and len(names) == 3
    for name in names:
        expected, got = _tensors(a / "checkpoints" / name), _tensors(b / "checkpoints" / name)
        assert expected.keys() == got.keys(), name
        # All but NumPy's global random state: the runner draws nothing from it, and each process starts it from
        # the operating system's entropy, so it differs between any two processes (the torch states are compared).
        differ = sorted(key for key, value in expected.items() if not key.startswith("/rng/numpy/") and not torch.equal(value, got[key]))
        assert differ == [], f"{name}: {differ}"
    for name in sorted(p.name for p in (a / "labels").iterdir()):
        assert all(torch.equal(v, _tensors(b / "labels" / name)[k]) for k, v in _tensors(a / "labels" / name).items()), name
