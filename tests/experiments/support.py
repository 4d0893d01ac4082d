"""What the experiments' tests share: a config that trains in a fraction of a second, readers of the files a run
writes, spies on the wrapper's steps, and an interruption of training at a chosen epoch."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

from auxlab import MetaAuxWrapper
from auxlab.experiments import ExperimentConfig, training

#: The real epoch of training, which interrupt_at wraps and a test puts back.
TRAIN_EPOCH = training.train_epoch


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny(tmp_path: Path, **changes: Any) -> ExperimentConfig:
    """A config that trains in a fraction of a second per run on digits."""
    values: dict[str, Any] = {
        "dataset": "digits",
        "strategies": ("single", "random", "kmeans", "maxl"),
        "seeds": (0, 1),
        "epochs": 1,
        "max_batches": 2,
        "batch_size": 32,
        "limit_train": 200,
        "limit_test": 100,
        "collapse_samples": 100,
        "threads": 1,
        "progress": False,
        "plots": False,
        "out": str(tmp_path),
        "name": "run",
        "model_kwargs": {"width": 8},
    }
    values.update(changes)
    return ExperimentConfig(**values)


def quiet(_: str) -> None:
    pass


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def assert_matplotlib_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert str(image.info.get("Software", "")).startswith("Matplotlib"), f"{path} was not written by matplotlib"
        assert image.size[0] > 100 and image.size[1] > 100


def meta_batches_seen(monkeypatch: pytest.MonkeyPatch) -> list[Tensor | None]:
    """From now on, collect the ``x_meta`` of every ``wrapper.step`` and ``wrapper.meta_step`` call (None where not given)."""
    seen: list[Tensor | None] = []
    step, meta_step = MetaAuxWrapper.step, MetaAuxWrapper.meta_step

    def spy_step(self: MetaAuxWrapper, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("x_meta"))
        return step(self, *args, **kwargs)

    def spy_meta_step(self: MetaAuxWrapper, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("x_meta", args[2] if len(args) > 2 else None))
        return meta_step(self, *args, **kwargs)

    monkeypatch.setattr(MetaAuxWrapper, "step", spy_step)
    monkeypatch.setattr(MetaAuxWrapper, "meta_step", spy_meta_step)
    return seen


def rows_of(x: Tensor, images: Tensor) -> set[int]:
    """The row of ``images`` equal to each row of ``x`` (every one must be there)."""
    flat = images.flatten(1)
    rows = [int((flat == row).all(1).nonzero()[0]) for row in x.flatten(1)]
    return set(rows)


class Interrupted(Exception):
    """Raised in place of an epoch of training, as if the process had been stopped there."""


def interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """From now on, the ``call``-th epoch of training (counted from 1) raises Interrupted instead of training."""
    calls = 0

    def train_epoch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            raise Interrupted(f"stopped at training epoch {call}")
        return TRAIN_EPOCH(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", train_epoch)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def csv_without_time(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(file)]


def summary_without_time(path: Path) -> str:
    """summary.md without its last table column, the wall time per epoch."""
    return re.sub(r"\| [0-9.]+ \|$", "| |", path.read_text(), flags=re.MULTILINE)



def first_pixels(x: Tensor) -> Tensor:
    """Features for ``kmeans_features="tests.experiments.support:first_pixels"``: the first 16 pixels of each image."""
    return x.flatten(1)[:, :16]
