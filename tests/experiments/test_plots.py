"""The experiment's plots draw the values they are given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from auxlab.experiments import plots
from tests.experiments.support import assert_matplotlib_png

pytest.importorskip("matplotlib")


def test_collapse_draws_each_class_at_its_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No offset: a class that uses 1 sub-class is drawn at 1, and classes that coincide keep their own markers."""
    from matplotlib.figure import Figure

    used = {0: [2, 1, 2], 1: [3, 1, 2]}  # by epoch: sub-classes used by classes 0, 1, 2; classes 0 and 2 coincide at 0
    records = [
        {"strategy": "maxl", "labels": "learned", "seed": 0, "epoch": epoch, "subclasses_used": counts,
         "target_confidence": [0.5, 0.9, 0.5], "subclass_share": [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]}
        for epoch, counts in used.items()
    ]
    figures: list[Any] = []
    savefig = Figure.savefig

    def keep_and_save(figure: Any, *args: Any, **kwargs: Any) -> Any:
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_and_save)

    path = plots.plot_collapse(records, tmp_path / "collapse.png", psi=[3, 3, 3], class_names=["a", "b", "c"])

    assert path is not None
    assert_matplotlib_png(path)
    used_ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in used_ax.get_lines()}
    for c, name in enumerate("abc"):
        assert list(lines[name].get_ydata()) == [used[epoch][c] for epoch in used]
    assert len({lines[name].get_marker() for name in "abc"}) == 3
