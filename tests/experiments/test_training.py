"""The training of one run: schedules, mixed precision, the generator's optimizer, development splits, determinism."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from auxlab.checkpoint import load_checkpoint
from auxlab.experiments import ConfigError, load_task, run_experiment
from auxlab.experiments.build import build_wrapper, run_data
from auxlab.experiments.report import summarise
from auxlab.experiments.strategies import Strategy
from auxlab.experiments.training import progress_bar
from auxlab.generators import GENERATORS
from tests.experiments.support import meta_batches_seen, quiet, rows_of, tiny, without_time


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


def test_held_out_meta_batch_gives_maxl_a_development_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--held-out-meta-batch maxl-light: its meta batches come from the development split (issue 14's hypothesis);
    the other strategies keep the whole training split and the training batch."""
    config = tiny(tmp_path, strategies=("single", "maxl-light"), seeds=(0,), held_out_meta_batch=("maxl-light",))
    seen = meta_batches_seen(monkeypatch)
    result = run_experiment(config, log=quiet)
    final = {r["strategy"]: r for r in result.records if r["epoch"] == 1}
    assert (final["single"]["train_samples"], final["single"]["dev_samples"]) == (180, None)
    assert (final["maxl-light"]["train_samples"], final["maxl-light"]["dev_samples"]) == (162, 18)
    split, _ = run_data(result.config, load_task(result.config), Strategy.parse("maxl-light"))
    held_out = [x for x in seen if x is not None]  # single's two steps take none
    assert split.dev is not None and len(seen) == 4 and len(held_out) == 2
    assert all(rows_of(x, split.dev.images) == set(range(18)) for x in held_out)
    with pytest.raises(ConfigError, match=r"held_out_meta_batch has 'maxl', which is not among strategies \(single\)"):
        tiny(tmp_path, strategies=("single",), held_out_meta_batch=("maxl",))


def test_no_progress_bar_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    assert progress_bar(3, "epoch", True) is None
    assert progress_bar(3, "epoch", False) is None



def test_recalibrate_bn_changes_the_evaluation_and_not_the_training(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("single", "maxl"), seeds=(0,), epochs=2)
    plain = run_experiment(config, log=quiet).records
    recalibrated = run_experiment(replace(config, name="recalibrated", recalibrate_bn=True), log=quiet).records
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in recalibrated]  # the same training
    assert [r["target_confidence"] for r in plain] == [r["target_confidence"] for r in recalibrated]  # the same labels
    assert [r["val_loss"] for r in plain] != [r["val_loss"] for r in recalibrated]  # BatchNorm statistics at the final weights


def test_the_runner_records_the_learning_diagnostics_and_saves_the_final_labels(tmp_path: Path) -> None:
    config = tiny(tmp_path, strategies=("random", "maxl-balanced"), seeds=(0,), epochs=1)
    result = run_experiment(config, log=quiet)
    last = {r["strategy"]: r for r in result.records if r["epoch"] == 1}
    assert last["random"]["generator_movement"] is None and last["random"]["confidence"] == 1.0
    assert last["maxl-balanced"]["generator_movement"] > 0 and last["maxl-balanced"]["meta_entropy_norm"] < 1e-6
    assert last["maxl-balanced"]["meta_primary_norm"] > 0 and -1 <= last["maxl-balanced"]["meta_cosine"] <= 1
    saved = torch.load(tmp_path / config.name / "labels" / "maxl-balanced-seed0.pt")  # type: ignore[operator]
    assert saved["distribution"].shape == (saved["probe"].shape[0], sum(last["maxl-balanced"]["psi"]))
