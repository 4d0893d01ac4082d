"""The experiment end to end: every file it writes, on digits, an image folder and Fashion-MNIST."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from auxlab import AuxLabelGenerator
from auxlab.datasets import FASHION_MNIST_ROOT
from auxlab.experiments import ConfigError, ExperimentConfig, load_task, run_experiment
from auxlab.experiments.run import grid_strategy
from tests.experiments.support import assert_matplotlib_png, quiet, tiny


def test_end_to_end_on_digits_writes_every_file(tmp_path: Path) -> None:
    config = tiny(tmp_path, epochs=2, max_batches=1, plots=True)
    lines: list[str] = []
    rng = torch.get_rng_state()
    result = run_experiment(config, log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng), "the run changed the caller's random state"
    run_dir = tmp_path / "run"
    assert result.run_dir == run_dir
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "summary.md", "accuracy_curves.png", "collapse.png", "subclass_grid.png", "label_learning.png"):
        assert (run_dir / name).is_file(), name
    for name in ("accuracy_curves.png", "collapse.png", "subclass_grid.png", "label_learning.png"):
        assert_matplotlib_png(run_dir / name)

    assert ExperimentConfig.from_dict(json.loads((run_dir / "config.json").read_text())) == result.config
    assert result.config.psi == (5,) * 10

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == json.loads(json.dumps(result.records))
    assert len(records) == 4 * 2 * 3  # strategies x seeds x epochs 0 (before training), 1, 2
    for r in records:
        assert (r["test_acc"] is None) == (r["epoch"] != 2), "the test set is read only after the last epoch"
        assert r["batches"] == min(r["epoch"], 1) and 0 <= r["val_acc"] <= 1
        assert (r["train_loss"] is None) == (r["epoch"] == 0)
        if r["strategy"] == "single":
            assert r["subclasses_used"] is None and r["labels"] == "none"
        else:
            assert len(r["subclasses_used"]) == 10 and all(1 <= u <= 5 for u in r["subclasses_used"])
            assert all(sum(share) == pytest.approx(1.0) for share in r["subclass_share"])
    assert {r["strategy"]: r["labels"] for r in records} == {"single": "none", "random": "fixed", "kmeans": "fixed", "maxl": "learned"}
    assert all((r["meta_loss"] is not None) == (r["strategy"] == "maxl" and r["epoch"] > 0) for r in records)

    with (run_dir / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(records) and {"used_9", "entropy_0", "confidence_0"} <= set(rows[0])
    assert all(c == 1.0 for r in records if r["labels"] == "fixed" for c in r["target_confidence"])
    assert all(0.1 <= c <= 1.0 for r in records if r["labels"] == "learned" for c in r["target_confidence"])

    summary = (run_dir / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| strategy")]
    assert [line.split("|")[1].strip() for line in table] == ["single", "random", "kmeans", "maxl"]
    assert "after the last epoch (epoch 2)" in summary
    assert summary in "\n".join(lines)  # printed at the end


def test_image_folder_dataset(tmp_path: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 4)):
        for c, name in enumerate(("cat", "dog", "fox")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(10, 10, 3, generator=g) * 80 + 60 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
    config = tiny(tmp_path / "out", dataset="folder", data_root=str(tmp_path / "images"), strategies=("single", "kmeans", "maxl"),
                  psi=(2,), limit_train=None, limit_test=None, val_fraction=0.25, seeds=(0,), plots=True)
    result = run_experiment(config, log=quiet)
    assert result.config.psi == (2, 2, 2)
    assert "3 classes" in result.summary and "27 train / 9 validation / 12 test" in result.summary
    assert_matplotlib_png(result.files["subclass_grid"])


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_ROOT}")
def test_fashion_mnist_coarse_task_with_human_labels(tmp_path: Path) -> None:
    config = tiny(tmp_path, dataset="fashion-mnist", task="coarse", strategies=("single", "human", "maxl"), seeds=(0,),
                  limit_train=300, limit_test=100, collapse_samples=0)
    result = run_experiment(config, log=quiet)
    assert result.config.psi == (4, 1, 1, 3, 1)
    assert "270 train / 30 validation / 100 test images of 1x28x28, 5 classes" in result.summary
    # Human labels are the fine classes: each sub-class's share is its fine class's share of the coarse class.
    train = load_task(result.config).train
    assert train.fine_labels is not None
    human = next(r for r in result.records if r["strategy"] == "human")
    for c, fines in enumerate([(0, 2, 4, 6), (1,), (3,), (5, 7, 9), (8,)]):
        in_class = train.fine_labels[train.labels == c]
        expected = [float((in_class == f).double().mean()) for f in fines]
        assert human["subclass_share"][c] == pytest.approx(expected)
    with pytest.raises(ConfigError, match=r"one sub-class per fine label, psi=\[4, 1, 1, 3, 1\]"):
        run_experiment(replace(config, psi=(2,)), log=quiet)



@pytest.mark.usefixtures("restore_registry")
def test_the_subclass_grid_shows_a_strategy_that_labels_the_inputs_with_its_own_network() -> None:
    # maxl whenever it runs: the one registered generator with label diagnostics that reads neither indices nor features.
    assert grid_strategy(("single", "random", "kmeans", "maxl")) == "maxl"
    assert grid_strategy(("rl", "maxl-light", "maxl", "kmeans+gcs")) == "maxl"
    # Without such a strategy, the first with label diagnostics (sla has none: its sub-classes are its transformations).
    assert grid_strategy(("single", "kmeans", "rl")) == "kmeans"
    assert grid_strategy(("sla", "maxl-light", "random")) == "maxl-light"
    assert grid_strategy(("single", "sla")) is None

    class OwnNetwork(AuxLabelGenerator, name="own-network"):
        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.one_hot(self.mask.column(y, torch.zeros_like(y)))

    # The rule is read from the classes, not from a name: a strategy of one's own of that kind, listed first, is shown.
    assert grid_strategy(("random", "own-network", "maxl")) == "own-network"


def test_a_fresh_run_of_the_same_name_leaves_no_label_file_of_the_earlier_one(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("random", "maxl"), seeds=(0,), epochs=1)
    run_experiment(config, log=quiet)
    labels = tmp_path / config.name / "labels"  # type: ignore[operator]
    assert sorted(p.name for p in labels.iterdir()) == ["maxl-seed0.pt", "random-seed0.pt"]
    run_experiment(replace(config, strategies=("random",)), log=quiet)
    assert sorted(p.name for p in labels.iterdir()) == ["random-seed0.pt"]
