"""Smoke test of benchmarks/step_cost.py: it runs and reports every variant. Never asserts on timings."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

step_cost = pytest.importorskip("benchmarks.step_cost")
models = pytest.importorskip("benchmarks.models")


TINY = {"model": "cnn", "batch_size": 4, "image_size": 16, "psi": 2, "num_classes": 3}


@pytest.fixture(scope="module")
def result() -> step_cost.Result:
    return step_cost.measure(step_cost.Config(**TINY, repeats=1, warmup=0))


def test_measure_reports_every_variant_with_positive_times(result: step_cost.Result) -> None:
    names = [row.variant for row in result.rows]
    assert names == result.config.variant_names()
    assert names[:3] == [step_cost.SINGLE, step_cost.AUXLAB_SINGLE, step_cost.MODEL_STEP]
    assert {"functional", "higher", "jvp", "finite_difference"} <= set(result.config.engines)
    for engine in result.config.engines:
        for name in (step_cost.meta_step_name(engine), step_cost.iteration_name(engine), step_cost.step_name(engine)):
            assert name in names
    for row in result.rows:
        assert len(row.times) == 1 and row.times[0] > 0
        assert math.isfinite(row.ratio) and row.ratio > 0
        assert row.peak_bytes is not None and row.peak_bytes > 0
        assert row.memory_ratio is not None and row.memory_ratio > 0


def test_results_markdown_names_command_machine_and_every_variant(result: step_cost.Result) -> None:
    report = step_cost.results_markdown(result, "python -m benchmarks.step_cost --smoke")
    for needle in ("--smoke", "torch:", "CPU:", "date:", "| variant |", *result.config.variant_names()):
        assert needle in report


EXPECTED_PARTS = {
    "functional": ["meta step: classifier forward at theta", "meta step: virtual-step grad (create_graph=True)",
                   "meta step: classifier forward at theta'", "meta step: hypergradient backward"],
    "higher": ["meta step: virtual-step grad (create_graph=True)", "meta step: hypergradient backward"],
    "jvp": ["meta step: gradient at theta", "meta step: gradient at theta' (u)",
            "meta step: classifier forwards for the directional derivative", "step: gradient at theta", "step: hypergradient backward"],
}


@pytest.mark.parametrize("engine", sorted(EXPECTED_PARTS))
def test_profile_labels_each_part_of_the_steps(engine: str) -> None:
    data = step_cost.profile_engine(step_cost.Config(**TINY, warmup=0), engine, iterations=1, row_limit=5)
    counts = data["counts"]
    common = ["single-task step", "MAXL iteration", "model step", "model step: generator forward (targets)",
              "model step: classifier forward", "model step: backward", "model step: optimizer step", "meta step",
              "meta step: generator forward (targets)", "meta step: generator optimizer step"]
    for label in common + EXPECTED_PARTS[engine]:
        assert counts.get(label) == 1, (label, counts)
    assert "Self CPU" in data["table"]
    assert "meta step: hypergradient backward" in data["grad_labels"]
    assert data["nodes"]["meta step: hypergradient backward"]  # the autograd nodes that ran inside it
    table = step_cost.breakdown_markdown(data["durations_ms"], data["order"])
    assert "meta step: rest (unlabelled)" in table


@pytest.mark.parametrize("name", sorted(["cnn", "vgg16", "resnet18"]))
def test_models_end_in_a_linear_head_the_wrapper_finds(name: str) -> None:
    import torch

    from auxlab import MetaAuxWrapper

    model = models.build_model(name, num_classes=7)
    wrapper = MetaAuxWrapper(model, num_classes=7, psi=2)
    assert isinstance(model.get_submodule(wrapper.head_name), torch.nn.Linear)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_measure_times_each_generator_in_the_same_round_robin() -> None:
    config = step_cost.Config(**TINY, repeats=2, warmup=0, engines=("jvp",), generators=("maxl", "maxl-light"), memory=False)
    result = step_cost.measure(config)
    names = [row.variant for row in result.rows]
    assert names == config.variant_names()
    assert names == [
        step_cost.SINGLE, step_cost.AUXLAB_SINGLE,
        "auxlab model step", "meta step (jvp)", "MAXL iteration (jvp)", "wrapper.step (jvp)",
        "auxlab model step (maxl-light)", "meta step (jvp, maxl-light)", "MAXL iteration (jvp, maxl-light)", "wrapper.step (jvp, maxl-light)",
    ]
    assert all(len(row.times) == 2 and math.isfinite(row.ratio) for row in result.rows)
    report = step_cost.results_markdown(result, "python -m benchmarks.step_cost --generators maxl,maxl-light")
    assert "maxl-light (an MLP" in report and "wrapper.step (jvp, maxl-light)" in report


def test_profile_of_the_light_generator_labels_its_classifier_forward_as_the_generators() -> None:
    config = step_cost.Config(**TINY, warmup=0, generators=("maxl-light",))
    counts = step_cost.profile_engine(config, "jvp", iterations=1, row_limit=5)["counts"]
    assert counts.get("meta step: generator forward (targets)") == 1
    assert counts.get("meta step: classifier forward at theta") == 1
    assert counts.get("model step: classifier forward") == 1



def test_meta_every_runs_k_batches_per_timed_call_and_reports_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from auxlab import MetaAuxWrapper

    calls: list[int] = []
    original = MetaAuxWrapper.step
    monkeypatch.setattr(MetaAuxWrapper, "step", lambda self, *a, **k: calls.append(self.meta_every) or original(self, *a, **k))
    config = step_cost.Config(**TINY, repeats=1, warmup=0, engines=("jvp",), memory=False, meta_every=3)
    variants = {v.name: v for v in step_cost.build_variants(config, *step_cost.make_batch(config, torch.device("cpu")))}
    step = variants[step_cost.step_name("jvp")]
    assert step.calls == 3 and variants[step_cost.model_step_name()].calls == 1
    step.step()
    assert calls == [3, 3, 3]  # three batches of a wrapper built with meta_every=3
    report = step_cost.results_markdown(step_cost.measure(config), "python -m benchmarks.step_cost --meta-every 3")
    assert "meta_every=3: a meta step every 3 batches" in report


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_runs_every_variant_under_autocast_and_fp16_steps_with_a_scaler(autocast: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from auxlab import MetaAuxWrapper

    seen: list[tuple[bool, object]] = []
    original = MetaAuxWrapper.step
    monkeypatch.setattr(
        MetaAuxWrapper, "step", lambda self, *a, **k: seen.append((torch.is_autocast_enabled("cpu"), k.get("scaler"))) or original(self, *a, **k)
    )
    config = step_cost.Config(**TINY, repeats=1, warmup=0, engines=("jvp",), memory=False, autocast=autocast)
    result = step_cost.measure(config)
    assert all(math.isfinite(row.ratio) for row in result.rows)
    assert seen and all(enabled for enabled, _ in seen)
    assert all((scaler is not None) == (autocast == "fp16") for _, scaler in seen)
    report = step_cost.results_markdown(result, f"python -m benchmarks.step_cost --autocast {autocast}")
    assert "mixed precision: every variant under torch.autocast('cpu', dtype=torch." in report
    if autocast == "fp16":
        with pytest.raises(ValueError, match="needs engines among"):
            step_cost.build_variants(step_cost.Config(**TINY, engines=("functional",), autocast="fp16"), *step_cost.make_batch(config, torch.device("cpu")))
