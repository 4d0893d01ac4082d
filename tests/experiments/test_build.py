"""Building a run from the config: its split, its generator's arguments, its wrapper, and the checks before anything trains."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from auxlab import AuxLabelGenerator
from auxlab.data import TrainingData
from auxlab.experiments import ConfigError, load_task, run_experiment
from auxlab.experiments.build import build_wrapper, generator_kwargs, run_data
from auxlab.experiments.strategies import Strategy
from auxlab.generators import KMeansLabels
from auxlab.generators.sla import SLALabels
from auxlab.hierarchy import HierarchyMask
from tests.experiments.support import first_pixels, quiet, tiny


def test_human_needs_fine_labels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy 'human' needs the dataset's fine labels"):
        run_experiment(tiny(tmp_path, strategies=("single", "human")), log=quiet)


def test_a_weighting_the_wrapper_refuses_stops_the_experiment_before_anything_trains(tmp_path: Path) -> None:
    for strategy, refusal in [
        ("maxl+gcs", "weighting='gcs' needs labels that do not learn, but generator='maxl' learns them"),
        ("rl+uncertainty", "weighting='uncertainty' needs labels that do not learn, but generator='rl' learns them"),
        ("sla+maoal", "weighting='maoal' does not support a strategy that augments the batch (generator='sla')"),
    ]:
        config = tiny(tmp_path, strategies=("single", "kmeans", strategy), name=strategy)
        with pytest.raises(ConfigError, match=re.escape(f"strategies has {strategy!r}, which cannot run: {refusal}")):
            run_experiment(config, log=quiet)
        assert not (tmp_path / strategy).exists(), "files were written"
    config = tiny(tmp_path, strategies=("kmeans+gcs",), weighting_kwargs={"gcs": {"mood": "scale"}}, name="kwargs")
    with pytest.raises(ConfigError, match=re.escape("'kmeans+gcs', which cannot run: could not build weighting='gcs' from weighting_kwargs")):
        run_experiment(config, log=quiet)


def test_generator_kwargs_reach_the_generator_and_bad_ones_stop_the_experiment(tmp_path: Path) -> None:
    config = replace(tiny(tmp_path, strategies=("single", "sla"), generator_kwargs={"sla": {"distillation_weight": 0.5}}), psi=(5,) * 10)
    data = load_task(config)
    wrapper = build_wrapper(config, data, Strategy.parse("sla"), seed=0, device=torch.device("cpu"))
    assert isinstance(wrapper.generator, SLALabels) and wrapper.generator.distillation_weight == 0.5
    bad = tiny(tmp_path, strategies=("single", "sla"), generator_kwargs={"sla": {"distillation": 0.5}}, name="bad")
    with pytest.raises(ConfigError, match=re.escape("strategies has 'sla', which cannot run: could not build generator='sla'")):
        run_experiment(bad, log=quiet)
    assert not (tmp_path / "bad").exists(), "files were written"


def test_fixed_labels_are_built_from_the_split_trained_on(tmp_path: Path) -> None:
    config = replace(tiny(tmp_path), psi=(5,))
    data = load_task(config)
    for name in ("random+maoal", "kmeans+maoal", "random"):
        split, run = run_data(config, data, Strategy.parse(name))
        kwargs = generator_kwargs(Strategy.parse(name).generator, config, run)
        size = len(kwargs["dataset"]) if "dataset" in kwargs else kwargs["num_samples"]
        assert size == len(split.train) == (162 if "+maoal" in name else 180), name
    split, _ = run_data(config, data, Strategy.parse("kmeans+maoal"))
    assert split.dev is not None and torch.equal(data.train.images[split.kept], split.train.images)
    local, full = split.probe(torch.tensor([5, 0, 179, 3]))
    assert torch.equal(split.train.images[local], data.train.images[full])
    assert set(full.tolist()) == {5, 0, 179, 3} - set(torch.arange(180)[~torch.isin(torch.arange(180), split.kept)].tolist())



@pytest.mark.usefixtures("restore_registry")
def test_generator_kwargs_are_asked_of_the_generator_class(tmp_path: Path) -> None:
    class Counted(AuxLabelGenerator, name="counted"):
        """Built from the size of the training split; takes features= like kmeans."""

        def __init__(self, mask: HierarchyMask, *, size: int, features: Any = None) -> None:
            super().__init__(mask)
            self.size, self.reader = size, features

        @classmethod
        def kwargs_from_data(cls, data: TrainingData) -> dict[str, Any]:
            return {"size": len(data.dataset)}  # type: ignore[arg-type]

        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.one_hot(self.mask.column(y, torch.zeros_like(y)))

    class Plain(AuxLabelGenerator, name="plain"):
        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.one_hot(self.mask.column(y, torch.zeros_like(y)))

    config = replace(tiny(tmp_path, kmeans_features="tests.experiments.support:first_pixels"), psi=(5,) * 10)
    data = load_task(config)
    # kmeans_features goes to every generator whose constructor takes features=, and only when it is not "pixels".
    assert generator_kwargs("counted", config, data) == {"size": 180, "features": first_pixels}
    kmeans = generator_kwargs("kmeans", config, data)
    assert kmeans.keys() == {"dataset", "features"} and kmeans["dataset"] is data.train and kmeans["features"] is first_pixels
    assert generator_kwargs("plain", config, data) == {} and generator_kwargs("single", config, data) == {}
    assert generator_kwargs("random", config, data) == {"num_samples": 180}
    pixels = replace(config, kmeans_features="pixels")
    assert generator_kwargs("counted", pixels, data) == {"size": 180}
    assert generator_kwargs("kmeans", pixels, data).keys() == {"dataset"}  # the constructor's default, the flattened inputs
    with pytest.raises(ValueError, match="strategy 'human' needs the dataset's fine labels"):
        generator_kwargs("human", config, data)

    # The wrapper's generator is built with them, config.generator_kwargs on top.
    wrapper = build_wrapper(replace(config, generator_kwargs={"counted": {"size": 7}}), data, Strategy.parse("counted"),
                            seed=0, device=torch.device("cpu"))
    assert isinstance(wrapper.generator, Counted) and (wrapper.generator.size, wrapper.generator.reader) == (7, first_pixels)
    wrapper = build_wrapper(config, data, Strategy.parse("kmeans"), seed=0, device=torch.device("cpu"))
    expected = KMeansLabels(wrapper.mask, dataset=data.train, features=first_pixels, seed=0)
    assert isinstance(wrapper.generator, KMeansLabels) and torch.equal(wrapper.generator.table, expected.table)


def test_a_strategy_the_data_cannot_build_stops_the_experiment_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(
        "strategies has 'human+gcs', which cannot be built from dataset='digits' task='fine': strategy 'human' needs the dataset's "
        "fine labels, and this training set has none; use a task with fine labels (--dataset fashion-mnist --task coarse), or drop "
        "'human+gcs' from --strategies"
    )):
        run_experiment(tiny(tmp_path, strategies=("single", "human+gcs")), log=quiet)
    assert not (tmp_path / "run").exists(), "files were written"
