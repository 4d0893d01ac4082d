"""The command line: options over a config file over --smoke, --help, exit statuses, ``python -m auxlab.experiments``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from auxlab.experiments import SMOKE, ExperimentConfig, main, parse_args
from auxlab.experiments.cli import build_parser


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


def test_help_lists_every_field_with_its_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for name, flag, default in [
        ("dataset", "--dataset", "digits"), ("seeds", "--seeds", "0,1,2"), ("psi", "--psi", "none"),
        ("batch_size", "--batch-size", "64"), ("progress", "--progress", "true"), ("model_kwargs", "--model-kwargs", "{}"),
    ]:
        assert flag in text and f"(default: {default})" in text, name
    for field_name in ExperimentConfig.__dataclass_fields__:
        assert "--" + field_name.replace("_", "-") in text, field_name


def test_main_reports_a_bad_value_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--epochs", "0"]) == 2
    assert "epochs must be an integer >= 1, got 0" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "auxlab.experiments", "--smoke", "--strategies", "single", "--no-plots", "--no-progress",
         "--threads", "1", "--limit-train", "100", "--out", str(tmp_path), "--name", "cli"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| single |" in completed.stdout
    assert (tmp_path / "cli" / "summary.md").is_file()



@pytest.mark.parametrize(("option", "value", "message"), [
    ("--device", "cpux", "device 'cpux' cannot be used here"),
    ("--device", "cuda:999" if torch.cuda.is_available() else "cuda", "device 'cuda(:999)?' cannot be used here"),
    ("--model", "nosuch.module:Foo", "model 'nosuch.module:Foo' cannot be built: cannot import module 'nosuch.module'"),
    ("--model", "torch.nn:Linear", "model 'torch.nn:Linear' cannot be built: could not build model"),
    ("--model", "collections:OrderedDict", "model 'collections:OrderedDict' cannot be built: .* not an nn.Module"),
])
def test_a_bad_device_or_model_exits_2_with_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    """Issue 15, defect 7: these ended in tracebacks, and left config.json and an empty checkpoints/ behind."""
    assert main(["--smoke", "--strategies", "single", option, value, "--out", str(tmp_path / "runs"), "--name", "bad", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and re.search(message, error), error
    assert not (tmp_path / "runs").exists()
