"""The experiments runner: config parsing, models, the training loop, the files it writes, determinism."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import auxlab.experiments.run as run_module
from auxlab import AuxLabelGenerator, MetaAuxWrapper
from auxlab.checkpoint import load_checkpoint
from auxlab.datasets import FASHION_MNIST_ROOT, ImageDataset
from auxlab.experiments import (
    SMOKE,
    VGGBN,
    ConfigError,
    ExperimentConfig,
    SmallCNN,
    build_model,
    collapse_diagnostic,
    load_task,
    main,
    parse_args,
    run_experiment,
)
from auxlab.experiments.config import build_parser
from auxlab.experiments.report import _verdict, summarise
from auxlab.experiments.run import _progress_bar, build_wrapper, generator_kwargs, run_data
from auxlab.experiments.strategies import Strategy
from auxlab.generators import GENERATORS, PolicyLabels
from auxlab.generators.sla import SLALabels
from auxlab.hierarchy import HierarchyMask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """The models here are tiny: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ------------------------------------------------------------------------------ config
def test_defaults() -> None:
    config = ExperimentConfig()
    assert (config.dataset, config.task, config.model, config.schedule) == ("digits", "fine", "small-cnn", "per-batch")
    assert config.strategies == ("single", "random", "kmeans", "maxl")
    assert config.seeds == (0, 1, 2)
    assert config.psi is None and config.inner_lr is None and config.limit_train is None
    assert (config.lr, config.aux_weight, config.entropy_weight, config.focal_gamma) == (0.01, 1.0, 0.2, 0.0)
    assert parse_args([]) == config


def test_command_line_overrides() -> None:
    config = parse_args([
        "--dataset", "fashion-mnist", "--task", "coarse", "--strategies", "single,human,maxl", "--seeds", "0,1,2",
        "--epochs", "10", "--out", "runs/", "--psi", "4,1,1,3,1", "--inner-lr", "none", "--lr", "0.05",
        "--no-progress", "--model-kwargs", '{"width": 8}', "--schedule", "alternating", "--max-batches", "7",
    ])
    assert config.dataset == "fashion-mnist" and config.task == "coarse"
    assert config.strategies == ("single", "human", "maxl")
    assert config.seeds == (0, 1, 2) and config.epochs == 10 and config.out == "runs/"
    assert config.psi == (4, 1, 1, 3, 1) and config.inner_lr is None and config.lr == 0.05
    assert config.progress is False and config.model_kwargs == {"width": 8}
    assert config.schedule == "alternating" and config.max_batches == 7
    assert parse_args(["--psi", "2"]).psi == (2,)


def test_config_file_then_smoke_then_command_line(tmp_path: Path) -> None:
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"epochs": 3, "batch_size": 32, "strategies": ["single", "maxl"], "limit_train": 500}))
    config = parse_args(["--config", str(path), "--epochs", "5"])
    assert (config.epochs, config.batch_size, config.strategies, config.limit_train) == (5, 32, ("single", "maxl"), 500)
    smoke = parse_args(["--config", str(path), "--smoke", "--epochs", "2"])
    assert smoke.epochs == 2 and smoke.max_batches == SMOKE["max_batches"] and smoke.limit_train == SMOKE["limit_train"]
    assert ExperimentConfig().smoke().epochs == 1


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


def test_strategy_syntax() -> None:
    config = parse_args(["--strategies", "single,maxl,human+gcs,kmeans+maoal,random+uncertainty,sla,rl,kmeans+constant"])
    assert config.strategies == ("single", "maxl", "human+gcs", "kmeans+maoal", "random+uncertainty", "sla", "rl", "kmeans+constant")
    parsed = [Strategy.parse(s) for s in config.strategies]
    assert [(s.generator, s.weighting) for s in parsed] == [
        ("single", "constant"), ("maxl", "constant"), ("human", "gcs"), ("kmeans", "maoal"), ("random", "uncertainty"),
        ("sla", "constant"), ("rl", "constant"), ("kmeans", "constant"),
    ]
    # What a run needs is read from the classes: maoal's and rl's meta steps learn from a development split.
    assert [s.needs_dev_split for s in parsed] == [False, False, False, True, False, False, True, False]
    assert [s.has_label_diagnostics for s in parsed] == [False, True, True, True, True, False, True, True]
    assert Strategy.parse("sla").psi((5, 5, 2)) == (4, 4, 4) and Strategy.parse("kmeans+gcs").psi((5, 5, 2)) == (5, 5, 2)
    kwargs = parse_args(["--weighting-kwargs", '{"gcs": {"mode": "scale"}}']).weighting_kwargs
    assert kwargs == {"gcs": {"mode": "scale"}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "single,kmeans+gsc"], ("strategies has 'kmeans+gsc' with unknown weighting 'gsc' (did you mean 'gcs'?); "
                                                 "write generator+weighting with a weighting among constant, gcs, maoal, uncertainty")),
        (["--strategies", "single+gcs"], "strategies has 'single+gcs', but 'single' trains without an auxiliary loss"),
        (["--strategies", "kmeans+"], "strategies has 'kmeans+' with unknown weighting ''"),
        (["--strategies", "kmeanz+gcs"], "unknown strategy 'kmeanz+gcs' (did you mean 'kmeans'?); known strategies: human, kmeans"),
        (["--strategies", "kmeans+gcs,kmeans+gcs"], "strategies lists kmeans+gcs more than once"),
        (["--dev-fraction", "0.6"], "dev_fraction must lie in (0, 0.5], got 0.6"),
        (["--dev-fraction", "0"], "dev_fraction must lie in (0, 0.5], got 0.0"),
        (["--weighting-kwargs", '{"gsc": {}}'], "weighting_kwargs has unknown weighting 'gsc'; its keys must be weightings among"),
        (["--weighting-kwargs", '{"gcs": "scale"}'], "weighting_kwargs['gcs'] must be a JSON object of keyword arguments, got 'scale'"),
        (["--generator-kwargs", '{"slaa": {}}'], "generator_kwargs has unknown generator 'slaa'; its keys must be generators among"),
        (["--generator-kwargs", '{"sla": 1}'], "generator_kwargs['sla'] must be a JSON object of keyword arguments, got 1"),
    ],
)
def test_bad_strategies_name_the_strategy_and_the_choices(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
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


def test_help_lists_every_field_with_its_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for name, flag, default in [
        ("dataset", "--dataset", "digits"), ("seeds", "--seeds", "0,1,2"), ("psi", "--psi", "none"),
        ("batch_size", "--batch-size", "64"), ("progress", "--progress", "true"), ("model_kwargs", "--model-kwargs", "{}"),
    ]:
        assert flag in text and f"(default: {default})" in text, name
    for field_name in ExperimentConfig.__dataclass_fields__:
        assert "--" + field_name.replace("_", "-") in text, field_name


def test_docs_describe_every_field() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "experiments.md").read_text(encoding="utf-8")
    missing = [name for name in ExperimentConfig.__dataclass_fields__ if f"| `{name}` |" not in text]
    assert not missing, f"docs/experiments.md has no row for the config fields {missing}"


def test_main_reports_a_bad_value_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--epochs", "0"]) == 2
    assert "epochs must be an integer >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ models
@pytest.mark.parametrize("model_class", [SmallCNN, VGGBN])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32), (3, 5)])
def test_models_fit_every_input_size(model_class: type, channels: int, size: int) -> None:
    model = model_class(num_classes=7, in_channels=channels, width=4)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)
    MetaAuxWrapper(model, num_classes=7, psi=2)  # the wrapper finds the primary head


def test_build_model_by_name_and_import_path() -> None:
    assert isinstance(build_model("vgg-bn", num_classes=3, in_channels=1), VGGBN)
    model = build_model("auxlab.experiments.models:SmallCNN", num_classes=3, in_channels=3, kwargs={"width": 4})
    assert isinstance(model, SmallCNN) and model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)
    tiny_cnn = build_model("helpers:TinyCNN", num_classes=4, in_channels=1)  # takes num_classes, not in_channels
    assert tiny_cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_model("no_such_module:Net", num_classes=3, in_channels=1)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        build_model("auxlab.experiments.models:Nope", num_classes=3, in_channels=1)
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_model("collections:OrderedDict", num_classes=3, in_channels=1)


# ------------------------------------------------------------------------------ collapse diagnostic
class _OneSubclass(AuxLabelGenerator):
    """Every sample of class c takes sub-class 0 of block c: total collapse."""

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        return self.one_hot(self.mask.column(y, torch.zeros_like(y)))


class _RoundRobin(AuxLabelGenerator):
    """Sample i takes sub-class i mod psi[y]: every sub-class used equally."""

    needs_index = True

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        assert index is not None
        return self.one_hot(self.mask.column(y, index % self.mask.sizes_of(y)))


def test_collapse_diagnostic_definition() -> None:
    # 30 consecutive samples per class, so that index mod psi spreads each class evenly.
    data = ImageDataset(torch.rand(300, 1, 8, 8), torch.arange(300) // 30, tuple("abcdefghij"))
    mask = HierarchyMask([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    probe = torch.arange(300)
    collapsed = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, mask=mask, generator=_OneSubclass(mask))
    stats, columns = collapse_diagnostic(collapsed, data, probe, batch_size=64, device=torch.device("cpu"))
    assert stats["subclasses_used"] == [1] * 10
    assert stats["subclass_entropy"] == [0.0] * 10
    assert all(share[0] == 1.0 and sum(share) == 1.0 for share in stats["subclass_share"])
    assert stats["target_confidence"] == [1.0] * 10 and stats["subclass_soft_share"] == stats["subclass_share"]
    assert columns.shape == (300,)

    spread = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, mask=mask, generator=_RoundRobin(mask))
    stats, _ = collapse_diagnostic(spread, data, probe, batch_size=64, device=torch.device("cpu"))
    assert stats["subclasses_used"] == list(mask.psi)
    for c, entropy in enumerate(stats["subclass_entropy"]):
        assert entropy == pytest.approx(math.log(mask.psi[c]), abs=0.05)


def test_collapse_diagnostic_of_a_policy_reads_its_probabilities_and_draws_nothing() -> None:
    data = ImageDataset(torch.rand(60, 1, 8, 8), torch.arange(60) // 6, tuple("abcdefghij"))
    probe = torch.arange(60)
    wrapper = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, psi=3, generator="rl", seed=0)
    assert isinstance(wrapper.generator, PolicyLabels)
    wrapper.aux_targets(data.images[:4], data.labels[:4])  # one draw: the policy's random stream exists
    rng_before = wrapper.generator.get_extra_state()["rng"]
    # one batch of 60, so that the features below see the same BatchNorm batch statistics
    stats, _ = collapse_diagnostic(wrapper, data, probe, batch_size=60, device=torch.device("cpu"))
    assert torch.equal(wrapper.generator.get_extra_state()["rng"][1], rng_before[1])
    x, y = data.images, data.labels
    with torch.no_grad():
        probs = wrapper.generator.policy(wrapper.generator.features(x), y)[0].double()
    for c in range(10):
        block = probs[y == c][:, 3 * c : 3 * c + 3]
        assert stats["target_confidence"][c] == pytest.approx(float(block.max(1).values.mean()), abs=1e-9)
        assert stats["subclass_soft_share"][c] == pytest.approx(block.mean(0).tolist(), abs=1e-9)
    assert max(stats["target_confidence"]) < 0.9  # an untrained policy is far from one-hot draws


# ------------------------------------------------------------------------------ summary statistics
def test_summary_gain_and_its_standard_error() -> None:
    def rec(strategy: str, seed: int, acc: float) -> dict[str, Any]:
        return {"strategy": strategy, "seed": seed, "epoch": 1, "test_acc": acc, "val_acc": acc, "time_s": 1.0,
                "subclasses_used": None if strategy == "single" else [2, 3]}

    records = [rec("single", s, a) for s, a in enumerate([0.90, 0.92, 0.94])]
    records += [rec("maxl", s, a) for s, a in enumerate([0.95, 0.96, 0.97])]
    records += [rec("random", s, a) for s, a in enumerate([0.89, 0.93, 0.95])]
    records += [rec("kmeans", s, a) for s, a in enumerate([0.85, 0.86, 0.87])]
    single, maxl, random, kmeans = summarise(records)
    assert [_verdict(row) for row in (single, maxl, random, kmeans)] == ["", "yes", "no", "yes, worse"]
    assert single.gain is None and single.beyond_noise is None
    assert maxl.test_mean == pytest.approx(0.96) and maxl.test_std == pytest.approx(0.01)
    assert maxl.gain == pytest.approx(0.04)
    assert maxl.gain_se == pytest.approx(math.sqrt(0.01**2 / 3 + 0.02**2 / 3))
    assert maxl.beyond_noise is True and random.beyond_noise is False
    assert maxl.subclasses_used == 5


# ------------------------------------------------------------------------------ end to end
def test_end_to_end_on_digits_writes_every_file(tmp_path: Path) -> None:
    config = tiny(tmp_path, epochs=2, max_batches=1, plots=True)
    lines: list[str] = []
    rng = torch.get_rng_state()
    result = run_experiment(config, log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng), "the run changed the caller's random state"
    run_dir = tmp_path / "run"
    assert result.run_dir == run_dir
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "summary.md", "accuracy_curves.png", "collapse.png", "subclass_grid.png"):
        assert (run_dir / name).is_file(), name
    for name in ("accuracy_curves.png", "collapse.png", "subclass_grid.png"):
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


def test_same_config_twice_gives_identical_metrics(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("random", "maxl"), seeds=(3,), epochs=2)
    first = run_experiment(config, log=quiet)
    second = run_experiment(replace(config, name="again"), log=quiet)
    assert without_time(first.records) == without_time(second.records)
    other_seed = run_experiment(replace(config, name="seed4", seeds=(4,)), log=quiet)
    assert without_time(other_seed.records) != without_time(first.records)


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_mixed_precision_training_is_deterministic_and_differs_from_float32(tmp_path: Path, autocast: str) -> None:
    config = tiny(tmp_path, strategies=("single", "maxl"), seeds=(0,), epochs=1, autocast=autocast)
    first = run_experiment(config, log=quiet)
    assert all(math.isfinite(r["train_loss"]) for r in first.records if r["epoch"] == 1)
    assert without_time(run_experiment(replace(config, name="again"), log=quiet).records) == without_time(first.records)
    float32 = run_experiment(replace(config, name="float32", autocast=None), log=quiet)
    trained = [r for r in first.records if r["epoch"] == 1]
    assert [r["train_loss"] for r in trained] != [r["train_loss"] for r in float32.records if r["epoch"] == 1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["autocast"] == autocast


def test_generator_optimizer_adam_trains_the_generator_with_adam(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("maxl",), seeds=(0,), epochs=1)
    sgd = run_experiment(config, log=quiet)
    adam = run_experiment(replace(config, name="adam", generator_optimizer="adam"), log=quiet)
    assert "generator SGD lr" in sgd.summary and "generator Adam lr" in adam.summary
    assert without_time(adam.records) != without_time(sgd.records)
    assert adam.records[0] == {**sgd.records[0], "time_s": adam.records[0]["time_s"]}  # the same start, epoch 0


def test_alternating_schedule(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("single", "maxl"), seeds=(0,), schedule="alternating")
    result = run_experiment(config, log=quiet)
    maxl = [r for r in result.records if r["strategy"] == "maxl"]
    assert maxl[-1]["meta_loss"] is not None and maxl[-1]["batches"] == 2
    per_batch = run_experiment(replace(config, name="per-batch", schedule="per-batch"), log=quiet)
    assert without_time(per_batch.records) != without_time(result.records)


def test_cheaper_meta_steps(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("maxl",), seeds=(0,), meta_every=2, virtual_params=("aux_head", "model.classifier"),
                  engine="finite_difference", max_batches=3)
    result = run_experiment(config, log=quiet)
    assert result.records[-1]["meta_loss"] is not None
    assert "a meta step every 2 batches, virtual step on aux_head, model.classifier only" in result.summary
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        run_experiment(replace(config, virtual_params=("nope",)), log=quiet)


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


def test_human_needs_fine_labels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy 'human' needs the dataset's fine labels"):
        run_experiment(tiny(tmp_path, strategies=("single", "human")), log=quiet)


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


# ------------------------------------------------------------------------------ weightings, development split, sla, rl
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


@pytest.mark.parametrize("schedule", ["per-batch", "alternating"])
def test_weightings_run_end_to_end_and_maoal_learns_from_a_development_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    config = tiny(tmp_path, strategies=("single", "kmeans+gcs", "random+uncertainty", "random+maoal", "kmeans+maoal"),
                  seeds=(0,), schedule=schedule, weighting_kwargs={"gcs": {"mode": "scale"}})
    seen = meta_batches_seen(monkeypatch)
    result = run_experiment(config, log=quiet)
    final = {r["strategy"]: r for r in result.records if r["epoch"] == 1}
    start = {r["strategy"]: r for r in result.records if r["epoch"] == 0}
    whole = final["single"]["train_samples"]
    assert whole == 180 and final["single"]["dev_samples"] is None  # 200 less the validation split
    for name in ("kmeans+gcs", "random+uncertainty"):
        assert (final[name]["train_samples"], final[name]["dev_samples"]) == (whole, None), name
        assert final[name]["meta_loss"] is None and final[name]["labels"] == "fixed"
    for name in ("random+maoal", "kmeans+maoal"):
        assert (final[name]["train_samples"], final[name]["dev_samples"]) == (162, 18), name  # a 10 % development split
        assert final[name]["meta_loss"] is not None and final[name]["labels"] == "fixed"
        assert start[name]["weighting_params"]["weights"] == [1.0]  # one weight per module below the head: features
        assert final[name]["weighting_params"]["weights"] != [1.0], f"{name}: the meta step did not move the weights"
    assert start["random+uncertainty"]["weighting_params"] == {"log_variances": [0.0, 0.0]}
    assert final["random+uncertainty"]["weighting_params"]["log_variances"] != [0.0, 0.0]
    assert final["kmeans+gcs"]["weighting_params"] is None and final["single"]["weighting_params"] is None
    assert "`gcs` {\"mode\": \"scale\"}" in result.summary
    assert "`random+maoal`, `kmeans+maoal` train on 162 of the 180 training samples" in result.summary

    # The maoal runs' meta batches are batches of the development split; the others' are their training batches.
    split, _ = run_data(result.config, load_task(result.config), Strategy.parse("random+maoal"))
    assert split.dev is not None
    given = [x for x in seen if x is not None]
    assert len(given) == 2 * 2  # 2 maoal runs x 2 batches: of wrapper.step (per-batch) or of the meta phase (alternating)
    assert all(x.shape[0] == 18 for x in given)  # the whole development split, reshuffled: it is smaller than a batch
    assert all(rows_of(x, split.dev.images) == set(range(18)) for x in given)
    assert not torch.equal(given[0], given[1]), "the development split is not reshuffled between meta batches"


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


@pytest.mark.skipif("sla" not in GENERATORS, reason="the sla strategy is not registered")
def test_sla_runs_with_four_sub_classes_and_reports_its_aggregated_accuracy(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("single", "sla"), seeds=(0, 1), epochs=2, plots=True)
    result = run_experiment(config, log=quiet)
    assert result.config.psi == (5,) * 10  # the experiment's; sla has its own
    sla = [r for r in result.records if r["strategy"] == "sla"]
    for r in sla:
        assert r["psi"] == [4] * 10 and r["labels"] == "fixed" and r["dev_samples"] is None
        assert r["subclasses_used"] is None and r["subclass_share"] is None  # its sub-classes are the rotations
        assert 0 <= r["val_acc_aggregated"] <= 1
        assert (r["test_acc_aggregated"] is None) == (r["epoch"] != 2)
    assert all(r["val_acc_aggregated"] is None and r["test_acc_aggregated"] is None for r in result.records if r["strategy"] == "single")

    # The aggregated accuracy is that of wrapper.aggregated_logits on the final model (restored from its checkpoint).
    data = load_task(result.config)
    wrapper = build_wrapper(result.config, data, Strategy.parse("sla"), seed=1, device=torch.device("cpu"))
    load_checkpoint(result.run_dir / "checkpoints" / "sla-seed1.pt", wrapper, restore_rng=False)
    wrapper.eval()
    with torch.no_grad():
        expected = float((wrapper.aggregated_logits(data.test.images).argmax(1) == data.test.labels).double().mean())
    assert sla[-1]["test_acc_aggregated"] == pytest.approx(expected)

    table = [line.split("|")[1].strip() for line in result.summary.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert table == ["single", "sla", "sla (aggregated)"]
    aggregated = summarise(result.records)[2]
    finals = [r["test_acc_aggregated"] for r in sla if r["epoch"] == 2]
    assert aggregated.test_mean == pytest.approx(sum(finals) / 2) and aggregated.gain is not None
    assert "`sla` runs with its own hierarchy, psi = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4] (K = 40)" in result.summary
    assert "subclass_grid" not in result.files and "collapse" not in result.files


@pytest.mark.skipif("rl" not in GENERATORS, reason="the rl strategy is not registered")
def test_rl_learns_from_a_development_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny(tmp_path, strategies=("rl",), seeds=(0,), generator_optimizer="adam", generator_lr=0.01, plots=True)
    seen = meta_batches_seen(monkeypatch)
    result = run_experiment(config, log=quiet)
    _, final = result.records
    assert (final["train_samples"], final["dev_samples"]) == (162, 18)
    assert final["labels"] == "learned" and final["meta_loss"] is not None
    assert len(final["subclasses_used"]) == 10  # the diagnostic shows what the policy draws
    assert "collapse" in result.files and "subclass_grid" in result.files
    split, _ = run_data(result.config, load_task(result.config), Strategy.parse("rl"))
    assert split.dev is not None and len(seen) == 2
    assert all(x is not None and rows_of(x, split.dev.images) == set(range(18)) for x in seen)
    # Its generator optimizer is the config's: the policy moved.
    checkpoint = torch.load(result.run_dir / "checkpoints" / "rl-seed0.pt", weights_only=True)
    policy = {k: v for k, v in checkpoint["wrapper"].items() if k.startswith("generator.net.")}
    fresh = build_wrapper(result.config, load_task(result.config), Strategy.parse("rl"), seed=0, device=torch.device("cpu"))
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in policy.items())


# ------------------------------------------------------------------------------ odds and ends
def test_no_progress_bar_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    assert _progress_bar(3, "epoch", True) is None
    assert _progress_bar(3, "epoch", False) is None


def test_module_entry_point(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "auxlab.experiments", "--smoke", "--strategies", "single", "--no-plots", "--no-progress",
         "--threads", "1", "--limit-train", "100", "--out", str(tmp_path), "--name", "cli"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| single |" in completed.stdout
    assert (tmp_path / "cli" / "summary.md").is_file()


# ------------------------------------------------------------------------------ resume
_TRAIN_EPOCH = run_module._train_epoch


class _Interrupted(Exception):
    """Raised in place of an epoch of training, as if the process had been stopped there."""


def interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """From now on, the ``call``-th epoch of training (counted from 1) raises _Interrupted instead of training."""
    calls = 0

    def train_epoch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            raise _Interrupted(f"stopped at training epoch {call}")
        return _TRAIN_EPOCH(*args, **kwargs)

    monkeypatch.setattr(run_module, "_train_epoch", train_epoch)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def csv_without_time(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(file)]


def summary_without_time(path: Path) -> str:
    """summary.md without its last table column, the wall time per epoch."""
    return re.sub(r"\| [0-9.]+ \|$", "| |", path.read_text(), flags=re.MULTILINE)


@pytest.mark.parametrize("schedule", ["per-batch", "alternating"])
def test_an_interrupted_experiment_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    # lr_step=2: both learning rates (and maxl's inner_lr) halve after epoch 2, so their schedulers must resume too.
    config = tiny(tmp_path / "whole", strategies=("kmeans", "maxl"), seeds=(0,), epochs=3, schedule=schedule, lr_step=2)
    whole = run_experiment(config, log=quiet)
    assert {r["lr"] for r in whole.records if r["epoch"] == 3} == {0.005}

    cut = replace(config, out=str(tmp_path / "cut"))
    run_dir = tmp_path / "cut" / "run"
    interrupt_at(monkeypatch, 2)  # kmeans seed 0 stops after epoch 1
    with pytest.raises(_Interrupted):
        run_experiment(cut, log=quiet)
    assert (run_dir / "checkpoints" / "kmeans-seed0.pt").is_file() and not (run_dir / "metrics.jsonl").exists()

    interrupt_at(monkeypatch, 5)  # kmeans epochs 2 and 3, maxl epochs 1 and 2, then maxl stops after epoch 2
    lines: list[str] = []
    with pytest.raises(_Interrupted):
        run_experiment(replace(cut, resume=True), log=lines.append)
    assert any(line.endswith("resumed from " + str(run_dir / "checkpoints" / "kmeans-seed0.pt") + " after epoch 1/3") for line in lines)
    assert {r["strategy"] for r in read_jsonl(run_dir / "metrics.jsonl")} == {"kmeans"}

    monkeypatch.setattr(run_module, "_train_epoch", _TRAIN_EPOCH)
    lines = []
    resumed = run_experiment(replace(cut, resume=True), log=lines.append)
    assert any(line.strip() == "kmeans seed 0: finished, 4 records read from metrics.jsonl" for line in lines)
    assert any(line.strip().startswith("maxl seed 0: resumed from") and line.endswith("after epoch 2/3") for line in lines)
    assert [(r["strategy"], r["epoch"]) for r in resumed.records] == [(s, e) for s in ("kmeans", "maxl") for e in range(4)]
    assert without_time(resumed.records) == without_time(whole.records)
    assert without_time(read_jsonl(run_dir / "metrics.jsonl")) == without_time(read_jsonl(tmp_path / "whole" / "run" / "metrics.jsonl"))
    assert csv_without_time(run_dir / "metrics.csv") == csv_without_time(tmp_path / "whole" / "run" / "metrics.csv")
    assert summary_without_time(run_dir / "summary.md") == summary_without_time(tmp_path / "whole" / "run" / "summary.md")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["kmeans-seed0.pt", "maxl-seed0.pt"]  # kept


@pytest.mark.parametrize("schedule", ["per-batch", "alternating"])
def test_a_run_with_a_development_split_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    # batch_size 8 and max_batches 3: the meta batches of the 18-sample development split run out of a pass in the
    # middle of an epoch, so the resumed run must continue the meta batches' shuffling where it stopped.
    config = tiny(tmp_path / "whole", strategies=("random+maoal",), seeds=(0,), epochs=3, batch_size=8, max_batches=3, schedule=schedule)
    whole = run_experiment(config, log=quiet)
    weights = [r["weighting_params"]["weights"][0] for r in whole.records]
    assert len(set(weights)) == 4, "the maoal weights should move in every epoch"

    cut = replace(config, out=str(tmp_path / "cut"))
    interrupt_at(monkeypatch, 2)  # stops after epoch 1
    with pytest.raises(_Interrupted):
        run_experiment(cut, log=quiet)
    monkeypatch.setattr(run_module, "_train_epoch", _TRAIN_EPOCH)
    lines: list[str] = []
    resumed = run_experiment(replace(cut, resume=True), log=lines.append)
    assert any(line.strip().startswith("random+maoal seed 0: resumed from") and line.endswith("after epoch 1/3") for line in lines)
    assert without_time(resumed.records) == without_time(whole.records)
    run_dir = tmp_path / "cut" / "run"
    assert csv_without_time(run_dir / "metrics.csv") == csv_without_time(tmp_path / "whole" / "run" / "metrics.csv")
    assert summary_without_time(run_dir / "summary.md") == summary_without_time(tmp_path / "whole" / "run" / "summary.md")


def test_resuming_a_finished_experiment_runs_nothing_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny(tmp_path, strategies=("single", "maxl"), seeds=(0, 1), epochs=2, plots=True)
    first = run_experiment(config, log=quiet)
    run_dir = first.run_dir
    written = {name: (run_dir / name).read_bytes() for name in ("summary.md", "subclass_grid.png", "metrics.csv")}
    for name in ("summary.md", "subclass_grid.png"):
        (run_dir / name).unlink()

    interrupt_at(monkeypatch, 1)  # any epoch of training would raise
    # threads, progress and the plots' layout may differ from the experiment's config.json.
    again = run_experiment(replace(config, resume=True, threads=None, progress=True), log=quiet)
    assert again.records == first.records  # time_s included: nothing ran again
    for name, content in written.items():
        assert (run_dir / name).read_bytes() == content, f"{name} differs"  # the grid's labels come from maxl seed 0's checkpoint

    (run_dir / "metrics.jsonl").unlink()  # every run's final checkpoint holds its records too
    rebuilt = run_experiment(replace(config, resume=True), log=quiet)
    assert rebuilt.records == first.records and read_jsonl(run_dir / "metrics.jsonl") == first.records


def test_a_float16_run_resumes_with_its_grad_scaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny(tmp_path / "whole", strategies=("maxl",), seeds=(0,), epochs=3, autocast="fp16", max_batches=4)
    whole = run_experiment(config, log=quiet)
    cut = replace(config, out=str(tmp_path / "cut"))
    interrupt_at(monkeypatch, 3)  # stops after epoch 2
    with pytest.raises(_Interrupted):
        run_experiment(cut, log=quiet)
    saved = torch.load(tmp_path / "cut" / "run" / "checkpoints" / "maxl-seed0.pt", weights_only=True)
    scaler_state = json.loads(saved["counters"]["grad_scaler"])
    assert scaler_state["scale"] < 2.0**16  # overflows lowered the default scale: a fresh scaler would differ
    monkeypatch.setattr(run_module, "_train_epoch", _TRAIN_EPOCH)
    resumed = run_experiment(replace(cut, resume=True), log=quiet)
    assert without_time(resumed.records) == without_time(whole.records)


def test_resume_refuses_another_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny(tmp_path, strategies=("single",), seeds=(0,))
    result = run_experiment(config, log=quiet)
    metrics = (result.run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=re.escape(
        f"resume=True continues the experiment of {result.run_dir / 'config.json'}, but the config differs from it in "
        "epochs (given 2, the experiment has 1); lr (given 0.05, the experiment has 0.01)."
    )):
        run_experiment(replace(config, resume=True, epochs=2, lr=0.05), log=quiet)
    with pytest.raises(ConfigError, match=re.escape("psi (given [3, 3, 3, 3, 3, 3, 3, 3, 3, 3], the experiment has [5, 5, 5")):
        run_experiment(replace(config, resume=True, psi=(3,)), log=quiet)
    with pytest.raises(ConfigError, match="resume=True continues the experiment in .*never, but .* does not exist"):
        run_experiment(replace(config, resume=True, name="never"), log=quiet)

    assert main(["--config", str(result.run_dir / "config.json"), "--schedule", "alternating", "--resume"]) == 2
    assert "differs from it in schedule (given 'alternating', the experiment has 'per-batch')" in capsys.readouterr().err
    assert (result.run_dir / "metrics.jsonl").read_bytes() == metrics


def test_a_new_experiment_of_the_same_name_removes_the_old_metrics_and_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny(tmp_path, strategies=("single", "random"), seeds=(0,))
    result = run_experiment(config, log=quiet)
    checkpoints = result.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["random-seed0.pt", "single-seed0.pt"]
    interrupt_at(monkeypatch, 1)
    with pytest.raises(_Interrupted):  # a resume of this one must not find the old experiment's records
        run_experiment(replace(config, lr=0.05), log=quiet)
    assert not (result.run_dir / "metrics.jsonl").exists() and not (result.run_dir / "metrics.csv").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["single-seed0.pt"]  # the new run's epoch 0
