"""The summary's statistics."""

from __future__ import annotations

import math
from typing import Any

import pytest

from auxlab.experiments.report import summarise, verdict


def test_summary_gain_and_its_standard_error() -> None:
    def rec(strategy: str, seed: int, acc: float) -> dict[str, Any]:
        return {"strategy": strategy, "seed": seed, "epoch": 1, "test_acc": acc, "val_acc": acc, "time_s": 1.0,
                "subclasses_used": None if strategy == "single" else [2, 3]}

    records = [rec("single", s, a) for s, a in enumerate([0.90, 0.92, 0.94])]
    records += [rec("maxl", s, a) for s, a in enumerate([0.95, 0.96, 0.97])]
    records += [rec("random", s, a) for s, a in enumerate([0.89, 0.93, 0.95])]
    records += [rec("kmeans", s, a) for s, a in enumerate([0.85, 0.86, 0.87])]
    single, maxl, random, kmeans = summarise(records)
    assert [verdict(row) for row in (single, maxl, random, kmeans)] == ["", "yes", "no", "yes, worse"]
    assert single.gain is None and single.beyond_noise is None
    assert maxl.test_mean == pytest.approx(0.96) and maxl.test_std == pytest.approx(0.01)
    assert maxl.gain == pytest.approx(0.04)
    assert maxl.gain_se == pytest.approx(math.sqrt(0.01**2 / 3 + 0.02**2 / 3))
    assert maxl.beyond_noise is True and random.beyond_noise is False
    assert maxl.subclasses_used == 5

