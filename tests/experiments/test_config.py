"""The experiment's config: defaults, conversion and checks of every field, JSON in and out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auxlab.experiments import ConfigError, ExperimentConfig, parse_args


def test_defaults() -> None:
    config = ExperimentConfig()
    assert (config.dataset, config.task, config.model, config.schedule) == ("digits", "fine", "small-cnn", "per-batch")
    assert config.strategies == ("single", "random", "kmeans", "maxl")
    assert config.seeds == (0, 1, 2)
    assert config.psi is None and config.inner_lr is None and config.limit_train is None
    assert (config.lr, config.aux_weight, config.entropy_weight, config.focal_gamma) == (0.01, 1.0, 0.2, 0.0)
    assert parse_args([]) == config


def test_round_trip_through_json() -> None:
    config = ExperimentConfig(psi=(4, 1, 1, 3, 1), dataset="fashion-mnist", task="coarse", model_kwargs={"width": 8}, name="x")
    assert ExperimentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--epochs", "ten"], "epochs must be an integer, got 'ten'"),
        (["--lr", "-0.1"], "lr must be > 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--momentum", "1.5"], "momentum must lie in"),
        (["--strategies", "single,maxxl"], "did you mean 'maxl'"),
        (["--strategies", "single,single"], "strategies lists single more than once"),
        (["--seeds", "0,0"], "seeds lists 0 more than once"),
        (["--seeds", "0,x"], "seeds must be an integer"),
        (["--schedule", "weekly"], "schedule must be one of 'per-batch', 'alternating'"),
        (["--task", "coarse"], "task='coarse' exists only for dataset='fashion-mnist'"),
        (["--dataset", "cifar"], "dataset must be one of"),
        (["--dataset", "folder"], "dataset='folder' needs data_root"),
        (["--psi", "3,0"], "psi must hold integers >= 1"),
        (["--model", "not a path"], "model must be one of"),
        (["--model-kwargs", "{bad"], "model_kwargs must be a JSON object"),
        (["--val-fraction", "1"], "val_fraction must lie in (0, 1)"),
        (["--engine", "nope"], "engine must be one of"),
        (["--meta-every", "0"], "meta_every must be an integer >= 1"),
        (["--generator-optimizer", "rmsprop"], "generator_optimizer must be one of 'sgd', 'adam'"),
        (["--progress", "--name", "a/b"], "name must be a plain directory name"),
        (["--resume"], "name must be given with resume=True: the experiment to continue is <out>/<name>; got name=None"),
        (["--autocast", "fp8"], "autocast must be one of 'bf16', 'fp16', got 'fp8'"),
        (["--autocast", "fp16", "--schedule", "alternating"], "autocast='fp16' trains with a GradScaler, which wrapper.step takes: it needs schedule='per-batch'"),
        (["--autocast", "fp16", "--engine", "functional"], "autocast='fp16' needs engine 'jvp' or 'finite_difference'"),
    ],
)
def test_bad_values_name_the_field(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def test_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ConfigError, match=r"unknown config field 'epoch' \(did you mean 'epochs'\?\)"):
        parse_args(["--config", str(path)])
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.json")])


def test_docs_describe_every_field() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text(encoding="utf-8")
    missing = [name for name in ExperimentConfig.__dataclass_fields__ if f"| `{name}` |" not in text]
    assert not missing, f"docs/experiments.md has no row for the config fields {missing}"

