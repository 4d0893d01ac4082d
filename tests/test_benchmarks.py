"""Smoke tests of the benchmarks: benchmarks/step_cost runs and reports every variant, its profile reads the
library's ``auxlab.*`` ranges, and benchmarks/results keeps its layout. Never asserts on timings.

The profile tests marked "needs the library's ranges" below count ``auxlab.*`` ranges, which only an auxlab
that opens them (``torch.profiler.record_function`` in the library) records; the others need nothing of it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import models, step_cost

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


#: The parts the benchmark marks itself (its own ranges, module forward hooks, optimizer step hooks), per engine.
OWN_PARTS = {
    "functional": ["meta step: classifier forward at theta", "meta step: classifier forward at theta'"],
    "higher": ["meta step: classifier forward at theta", "meta step: classifier forward at theta'"],
    "jvp": ["meta step: classifier forward at theta", "meta step: classifier forward at theta'",
            "meta step: classifier forwards for the directional derivative", "step", "step: classifier forward at theta",
            "step: optimizer step", "step: generator optimizer step"],
}
#: The library's ranges, per engine, named after the phase they ran in.
LIBRARY_PARTS = {
    "functional": ["meta step: auxlab.gradient.virtual_step", "meta step: auxlab.gradient.meta"],
    "higher": ["meta step: auxlab.gradient.virtual_step", "meta step: auxlab.gradient.meta"],
    "jvp": ["meta step: auxlab.gradient.model", "meta step: auxlab.gradient.meta_loss", "meta step: auxlab.directional_derivative",
            "meta step: auxlab.gradient.meta", "step: auxlab.step", "step: auxlab.targets", "step: auxlab.gradient.model",
            "step: auxlab.gradient.meta_loss", "step: auxlab.directional_derivative", "step: auxlab.gradient.meta"],
}


@pytest.fixture(scope="module")
def profiles() -> dict[str, step_cost.EngineProfile]:
    """One profiled round per engine of :data:`OWN_PARTS`."""
    return {engine: step_cost.profile_engine(step_cost.Config(**TINY, warmup=0), engine, iterations=1, row_limit=5) for engine in OWN_PARTS}


@pytest.mark.parametrize("engine", sorted(OWN_PARTS))
def test_profile_marks_the_rounds_phases_forwards_and_optimizer_steps(engine: str, profiles: dict[str, step_cost.EngineProfile]) -> None:
    data = profiles[engine]
    common = ["single-task step", "MAXL iteration", "model step", "model step: classifier forward", "model step: backward",
              "model step: optimizer step", "meta step", "meta step: generator optimizer step"]
    for label in common + OWN_PARTS[engine]:
        assert data.counts.get(label) == 1, (label, data.counts)
    assert data.parents["model step: backward"] == "model step" and data.parents["model step"] == "MAXL iteration"
    assert "Self CPU" in data.table
    table = step_cost.breakdown_markdown(data)
    assert "meta step: rest (unlabelled)" in table


@pytest.mark.parametrize("engine", sorted(LIBRARY_PARTS))
def test_profile_reads_the_librarys_ranges(engine: str, profiles: dict[str, step_cost.EngineProfile]) -> None:
    """Needs the library's ranges."""
    data = profiles[engine]
    common = ["model step: auxlab.loss", "model step: auxlab.targets", "meta step: auxlab.meta_step", "meta step: auxlab.targets"]
    for label in common + LIBRARY_PARTS[engine]:
        assert data.counts.get(label) == 1, (label, data.counts)
    assert data.library_labelled
    assert "meta step: auxlab.gradient.meta" in data.broken_down
    assert data.nodes["meta step: auxlab.gradient.meta"]  # the autograd nodes that ran inside it


def test_profile_patches_nothing_of_torch() -> None:
    config = step_cost.Config(**TINY)
    wrapper = step_cost.make_wrapper(step_cost.base_model(config, torch.device("cpu")), config, "maxl", "jvp")
    grad, backward = torch.autograd.grad, torch.autograd.backward
    with step_cost.Labeller(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1)):
        assert torch.autograd.grad is grad and torch.autograd.backward is backward


def test_profile_nests_each_library_range_in_the_phase_it_ran_in() -> None:
    """What the library's ranges will look like, opened here by hand: read, nested and broken down."""
    from torch.profiler import profile, record_function

    weight = torch.ones(3, requires_grad=True)
    with profile() as prof:
        for _ in range(2):
            with record_function(step_cost.SINGLE):
                pass
            with record_function("MAXL iteration"), record_function("meta step"), record_function("auxlab.meta_step"):
                with record_function("auxlab.targets"), record_function("classifier forward"):
                    torch.ones(3) * 2  # a generator such as maxl-light reading the classifier's features
                with record_function("classifier forward"):
                    loss = (weight * 2).sum()
                with record_function("auxlab.gradient.meta"):
                    torch.autograd.grad(loss, weight)
    data = step_cost.read_profile(prof, 2, row_limit=5)
    assert data.counts["meta step: auxlab.gradient.meta"] == 2 and len(data.durations_ms["meta step: auxlab.gradient.meta"]) == 2
    assert data.parents["meta step: auxlab.gradient.meta"] == "meta step: auxlab.meta_step"
    assert data.parents["meta step: auxlab.meta_step"] == "meta step"
    assert data.parents["meta step: classifier forward for the targets"] == "meta step: auxlab.targets"
    assert data.counts["meta step: classifier forward at theta"] == 2  # the first forward outside the targets
    assert data.broken_down == ["meta step: auxlab.gradient.meta"]
    assert data.nodes["meta step: auxlab.gradient.meta"] and data.inside["meta step: auxlab.gradient.meta"]
    assert data.library_labelled
    assert "meta step: auxlab.meta_step: rest (unlabelled)" in step_cost.breakdown_markdown(data)


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


@pytest.fixture(scope="module")
def light_counts() -> dict[str, int]:
    config = step_cost.Config(**TINY, warmup=0, generators=("maxl-light",))
    return step_cost.profile_engine(config, "jvp", iterations=1, row_limit=5).counts


def test_profile_of_the_light_generator_counts_one_classifier_forward_per_phase(light_counts: dict[str, int]) -> None:
    assert light_counts.get("meta step: classifier forward at theta") == 1
    assert light_counts.get("model step: classifier forward") == 1


def test_profile_of_the_light_generator_puts_its_features_forward_in_the_targets(light_counts: dict[str, int]) -> None:
    """Needs the library's ranges."""
    assert light_counts.get("meta step: auxlab.targets") == 1
    assert light_counts.get("meta step: classifier forward for the targets") == 1



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



@pytest.mark.parametrize("mode", [[], ["--profile", "--profile-iterations", "1"]], ids=["timing", "profile"])
def test_command_line_writes_the_report(mode: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.step_cost.__main__ import main

    tiny = ["--model", "cnn", "--batch-size", "4", "--image-size", "16", "--psi", "2", "--num-classes", "3",
            "--repeats", "1", "--warmup", "0", "--engines", "jvp", "--no-memory"]
    out = tmp_path / "report.md"
    main([*tiny, *mode, "--out", str(out)])
    report = out.read_text()
    assert report in capsys.readouterr().out
    assert "- command: `python -m benchmarks.step_cost --model cnn" in report and "date:" in report
    assert ("## Engine: jvp" if mode else "| wrapper.step (jvp) |") in report

# --------------------------------------------------------------------------------------- results layout
RESULTS = ROOT / "benchmarks" / "results"
#: What made each folder of benchmarks/results: a script of benchmarks/, or the experiments runner.
RESULT_FOLDERS = {"step_cost", "jvp_variants", "jvp_weight_swap", "fashion_mnist", "hypergradient_equivalence", "graph_lifetime"}
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(markdown: Path) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    headings = (line.lstrip("#") for line in markdown.read_text().splitlines() if line.startswith("#"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_result_lies_in_the_folder_of_what_made_it_named_by_what_was_measured() -> None:
    assert {p.name for p in RESULTS.iterdir()} == RESULT_FOLDERS
    for folder in RESULT_FOLDERS - {"fashion_mnist"}:
        assert (ROOT / "benchmarks" / folder).exists() or (ROOT / "benchmarks" / f"{folder}.py").exists(), folder
    for path in RESULTS.rglob("*"):
        words = re.split(r"[_\-.]", path.name.lower())
        assert not {"session", "final", "new", "old", "latest", "round", "tmp"} & set(words), path
        assert not any(re.fullmatch(r"v\d+|session\d+", w) for w in words), path


def test_links_to_and_inside_the_benchmarks_resolve() -> None:
    documents = [*(ROOT / "benchmarks").rglob("*.md"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for document in documents:
        for target in _LINK.findall(document.read_text()):
            path, _, anchor = target.partition("#")
            if re.match(r"[a-z]+:", target) or not path:
                continue
            resolved = (document.parent / path).resolve()
            if document.is_relative_to(ROOT / "benchmarks") or resolved.is_relative_to(ROOT / "benchmarks"):
                assert resolved.exists(), f"{document.relative_to(ROOT)} links to {target}, which does not exist"
                if anchor and resolved.suffix == ".md":
                    assert anchor in _anchors(resolved), f"{document.relative_to(ROOT)} links to {target}: no such heading"


def test_the_benchmarks_readme_names_every_script_and_result_folder() -> None:
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    scripts = [p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "models")]
    for name in [*scripts, "step_cost", *RESULT_FOLDERS]:
        assert name in readme, name


def test_label_learning_compares_a_run_with_its_control(tmp_path: Path) -> None:
    from auxlab.experiments import ExperimentConfig, run_experiment
    from benchmarks import label_learning

    common = {"dataset": "digits", "epochs": 1, "seeds": (0, 1), "limit_train": 300, "limit_test": 100, "collapse_samples": 60,
              "threads": 1, "plots": False, "progress": False, "out": str(tmp_path), "generator_optimizer": "adam", "generator_weight_decay": 0.0}
    run_experiment(ExperimentConfig(name="run", strategies=("single", "maxl-light-balanced"), **common), log=lambda _: None)
    run_experiment(ExperimentConfig(name="control", strategies=("maxl-light-balanced",), inner_lr=1e-9, **common), log=lambda _: None)
    text, curves = label_learning.compare(tmp_path / "run", tmp_path / "control")
    rows = {line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith(("| maxl", "| single"))}
    assert rows == {"single", "maxl-light-balanced", "maxl-light-balanced (control)"}
    tv = next(line for line in text.splitlines() if line.startswith("| maxl-light-balanced |") and "/" in line).split(" | ")[-1]
    assert float(tv.split(" ± ")[0]) > 0  # the primary hypergradient moved the labels away from the control's
    assert set(curves) == {"maxl-light-balanced run", "maxl-light-balanced control"}
    label_learning.plot(curves, tmp_path / "curves.png", title="test")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_auxiliary_scenarios_tabulates_methods_under_both_scenarios(tmp_path: Path) -> None:
    from benchmarks import auxiliary_scenarios

    def run(name: str, accuracies: dict[str, list[float]]) -> None:
        folder = tmp_path / name
        folder.mkdir()
        lines = [json.dumps({"strategy": strategy, "seed": seed, "epoch": epoch, "test_acc": acc if epoch == 2 else 0.1})
                 for strategy, accs in accuracies.items() for seed, acc in enumerate(accs) for epoch in (1, 2)]
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    run("helpful", {"single": [0.90, 0.92, 0.91], "human": [0.93, 0.94, 0.95]})
    run("unhelpful", {"random": [0.80, 0.81, 0.82]})
    cost = tmp_path / "cost.md"
    cost.write_text("| variant | median ms | ratio to single-task |\n|---|---:|---:|\n| wrapper.step [random] | 9.0 | 1.25 |\n")
    rows = [auxiliary_scenarios.parse_row("STL=helpful/single"),
            auxiliary_scenarios.parse_row("Equal=helpful/human|unhelpful/random~wrapper.step [random]"),
            auxiliary_scenarios.parse_row("Other=-|unhelpful/random")]
    text = auxiliary_scenarios.table(tmp_path, rows, "STL", cost)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert lines["STL (reads no manual task: the same runs)"].count("91.00 ± 0.58") == 2
    assert "94.00 ± 0.58 | +3.00 ± 0.82 (> 2 s.e.) | 81.00 ± 0.58 | -10.00 ± 0.82 (> 2 s.e.) | 3 | 1.25x |" in lines["Equal"]
    assert "not run" in lines["Other"]
    with pytest.raises(ValueError, match="RUN/STRATEGY"):
        auxiliary_scenarios.parse_row("Bad=helpful")
    with pytest.raises(ValueError, match="no finished seed of strategy 'maxl'"):
        auxiliary_scenarios.table(tmp_path, [auxiliary_scenarios.parse_row("STL=helpful/maxl")], "STL", None)


def test_hypergradient_equivalence_of_a_checkout_with_itself_is_exact() -> None:
    from benchmarks import hypergradient_equivalence

    results = hypergradient_equivalence.run_scenarios()
    rows = hypergradient_equivalence.compare(results, results)
    assert [r[0] for r in rows] == [name for name, _ in hypergradient_equivalence.SCENARIOS]
    assert all(count > 0 and difference == 0.0 for _, count, difference, _ in rows)
    shifted = {name: {k: v + 1e-3 for k, v in tensors.items()} for name, tensors in results.items()}
    # (maoal keeps its module weights in float32: 1e-3 is added with float32 rounding there)
    assert all(difference == pytest.approx(1e-3, rel=1e-4) for _, _, difference, _ in hypergradient_equivalence.compare(shifted, results))


@pytest.mark.parametrize(("generator", "optimizer"), [("maxl", "sgd"), ("maxl-light-balanced", "adam")])
def test_hypergradient_balance_measures_each_term_without_changing_the_training(generator: str, optimizer: str) -> None:
    from auxlab.datasets import ImageDataset
    from benchmarks import hypergradient_balance

    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(128, 1, 28, 28, generator=g), torch.arange(128) % 10, tuple("abcdefghij"))
    rows = hypergradient_balance.balance_rows(data, steps=4, every=2, generator=generator, generator_optimizer=optimizer)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(r["primary_norm"] > 0 and -1.0 <= r["cosine"] <= 1.0 and 0.2 <= r["confidence"] <= 1.0 for r in rows)
    if generator.endswith("balanced"):  # the balance leaves the entropy term nothing to push
        assert all(r["entropy_norm"] < 1e-6 * r["primary_norm"] for r in rows)
    else:  # MAXL's known imbalance at the start (MAXL_NOTES)
        assert rows[0]["entropy_norm"] > rows[0]["primary_norm"]
    table = hypergradient_balance.markdown(rows)
    assert table.count("\n") == 1 + len(rows) and "| cosine |" in table
    # the measurement changes nothing: the same run measured at steps 0 and 4 only ends the same at step 4
    again = hypergradient_balance.balance_rows(data, steps=4, every=4, generator=generator, generator_optimizer=optimizer)
    assert again[-1] == rows[-1]
