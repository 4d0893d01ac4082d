"""Resuming an experiment that stopped: the same files as one that never did."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from auxlab.experiments import ConfigError, main, run_experiment, training
from tests.experiments.support import (
    TRAIN_EPOCH,
    Interrupted,
    csv_without_time,
    interrupt_at,
    quiet,
    read_jsonl,
    summary_without_time,
    tiny,
    without_time,
)


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
    with pytest.raises(Interrupted):
        run_experiment(cut, log=quiet)
    assert (run_dir / "checkpoints" / "kmeans-seed0.pt").is_file() and not (run_dir / "metrics.jsonl").exists()

    interrupt_at(monkeypatch, 5)  # kmeans epochs 2 and 3, maxl epochs 1 and 2, then maxl stops after epoch 2
    lines: list[str] = []
    with pytest.raises(Interrupted):
        run_experiment(replace(cut, resume=True), log=lines.append)
    assert any(line.endswith("resumed from " + str(run_dir / "checkpoints" / "kmeans-seed0.pt") + " after epoch 1/3") for line in lines)
    assert {r["strategy"] for r in read_jsonl(run_dir / "metrics.jsonl")} == {"kmeans"}

    monkeypatch.setattr(training, "train_epoch", TRAIN_EPOCH)
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
    with pytest.raises(Interrupted):
        run_experiment(cut, log=quiet)
    monkeypatch.setattr(training, "train_epoch", TRAIN_EPOCH)
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
    with pytest.raises(Interrupted):
        run_experiment(cut, log=quiet)
    saved = torch.load(tmp_path / "cut" / "run" / "checkpoints" / "maxl-seed0.pt", weights_only=True)
    scaler_state = json.loads(saved["counters"]["grad_scaler"])
    assert scaler_state["scale"] < 2.0**16  # overflows lowered the default scale: a fresh scaler would differ
    monkeypatch.setattr(training, "train_epoch", TRAIN_EPOCH)
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
    with pytest.raises(Interrupted):  # a resume of this one must not find the old experiment's records
        run_experiment(replace(config, lr=0.05), log=quiet)
    assert not (result.run_dir / "metrics.jsonl").exists() and not (result.run_dir / "metrics.csv").exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["single-seed0.pt"]  # the new run's epoch 0

