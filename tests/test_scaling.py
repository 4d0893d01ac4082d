"""``wrapper.step(..., scaler=GradScaler)``: loss scaling for float16 autocast, on CPU's GradScaler."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.amp import GradScaler

from auxlab import MetaAuxWrapper
from tests.helpers import TinyBNNet, TinyCNN, assert_unchanged, batch, image_batch, snapshot


def _wrapper(**kwargs: Any) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
    torch.manual_seed(0)
    options: dict[str, Any] = {"engine": "jvp", "inner_lr": 0.3, "generator_optimizer": lambda p: torch.optim.Adam(p, lr=1e-2)}
    options.update(kwargs)
    wrapper = MetaAuxWrapper(TinyBNNet().double(), num_classes=3, psi=[1, 2, 3], **options)
    return wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9)


def _scaler(init_scale: float = 2.0**12) -> GradScaler:
    return GradScaler("cpu", init_scale=init_scale, growth_interval=1000)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"engine": "finite_difference"},
        {"meta_every": 2},
        {"generator": "maxl-light"},
        {"generator": "random", "generator_kwargs": {"num_samples": 9}},
        {"generator": "single"},
        {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "gcs"},
        {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "uncertainty"},
        {"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "maoal"},
        {"generator": "rl"},
    ],
    ids=["jvp", "finite_difference", "meta_every_2", "maxl-light", "random", "single", "gcs", "uncertainty", "maoal", "rl"],
)
def test_a_scaler_without_overflow_changes_nothing_but_the_scale_of_the_backward_passes(kwargs: dict[str, Any], max_grad_norm: float | None) -> None:
    scaled, scaled_optimizer = _wrapper(**kwargs)
    plain, plain_optimizer = _wrapper(**kwargs)
    scaler = _scaler()
    index = torch.arange(9)
    for seed in range(4):
        x, y = batch(9, seed=seed, dtype=torch.float64)
        loss = scaled.step(x, y, scaled_optimizer, index=index, max_grad_norm=max_grad_norm, scaler=scaler)
        expected = plain.step(x, y, plain_optimizer, index=index, max_grad_norm=max_grad_norm)
        assert torch.allclose(loss, expected, rtol=0, atol=1e-12)
        if plain.last_meta_objective is None:
            assert scaled.last_meta_objective is None
        else:
            assert scaled.last_meta_objective is not None
            assert torch.allclose(scaled.last_meta_objective, plain.last_meta_objective, rtol=0, atol=1e-12)
    assert scaler.get_scale() == 2.0**12  # no overflow, no growth yet: the scaler saw every step
    after_scaled, after_plain = snapshot(scaled), snapshot(plain)
    for key, value in after_plain.items():
        assert torch.allclose(after_scaled[key].double(), value.double(), rtol=0, atol=1e-12), key
    assert scaled.steps == plain.steps
    initial = snapshot(_wrapper(**kwargs)[0])
    learner = "generator." if plain.generator_optimizer is not None else "weighting." if plain.weighting_optimizer is not None else None
    if learner is not None:  # what the meta step trains moved under the scaler too
        assert any(not torch.equal(v, after_scaled[k]) for k, v in initial.items() if k.startswith(learner))


def _grad_outputs(monkeypatch: pytest.MonkeyPatch, scaler: GradScaler | None, **kwargs: Any) -> list[float]:
    """The value of every loss that ``torch.autograd.grad`` differentiates in one ``step``."""
    seen: list[float] = []
    original = torch.autograd.grad

    def recording(outputs: Any, *args: Any, **kw: Any) -> Any:
        seen.append(float(outputs.detach()))
        return original(outputs, *args, **kw)

    wrapper, optimizer = _wrapper(**kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", recording)
        wrapper.step(*batch(9, dtype=torch.float64), optimizer, index=torch.arange(9), scaler=scaler)
    return seen


@pytest.mark.parametrize(
    ("kwargs", "passes"),
    [
        # the gradient at theta, u at theta' and the generator's hypergradient
        ({}, 3),
        # the two gradients that the cosine compares, and the model step's gradient of their weighted sum
        ({"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "gcs"}, 3),
        # the two gradients at theta and the weights' hypergradient
        ({"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "maoal"}, 3),
        # the virtual step's gradient, the policy gradient and the model step's gradient
        ({"generator": "rl"}, 3),
    ],
    ids=["maxl", "gcs", "maoal", "rl"],
)
def test_the_backward_passes_really_run_on_the_scaled_losses(monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], passes: int) -> None:
    unscaled = _grad_outputs(monkeypatch, None, **kwargs)
    scaled = _grad_outputs(monkeypatch, _scaler(2.0**10), **kwargs)
    assert len(scaled) == len(unscaled) == passes
    for scaled_value, value in zip(scaled, unscaled):
        assert scaled_value == pytest.approx(value * 2.0**10, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "learner"),
    [
        ({}, "generator."),
        ({"generator": "rl"}, "generator."),
        ({"generator": "random", "generator_kwargs": {"num_samples": 16}, "weighting": "maoal"}, "weighting."),
    ],
    ids=["maxl", "rl", "maoal"],
)
def test_a_float16_overflow_skips_both_steps_lowers_the_scale_and_training_goes_on(kwargs: dict[str, Any], learner: str) -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=5, engine="jvp", **kwargs)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01)
    scaler = GradScaler("cpu", init_scale=2.0**40)  # far too large for float16 gradients
    x, y = image_batch(16)
    index = torch.arange(16)

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return wrapper.step(x, y, optimizer, index=index, scaler=scaler)  # nonfinite="raise": an overflow is not an error

    before = snapshot(wrapper)
    trained = [name for name in before if (name.startswith(("model.", "aux_head.", learner))) and "running" not in name and "num_batches" not in name]
    loss = step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    # no parameter moved (the forward passes moved the BatchNorm statistics, as in any AMP loop)
    after = snapshot(wrapper)
    assert all(torch.equal(before[name], after[name]) for name in trained)
    assert not optimizer.state and wrapper.last_meta_objective is None
    assert scaler.get_scale() == 2.0**39
    steps = 0
    while scaler.get_scale() == 2.0 ** (39 - steps) and steps < 40:  # halves on each overflow
        step()
        steps += 1
    assert steps < 40
    for _ in range(3):
        assert torch.isfinite(step())
    after = snapshot(wrapper)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(before["model.classifier.weight"], after["model.classifier.weight"])
    assert any(not torch.equal(before[name], after[name]) for name in trained if name.startswith(learner))
    assert wrapper.last_meta_objective is not None


def test_an_overflow_in_the_meta_step_alone_skips_only_the_generator_step() -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), num_classes=3, psi=2, engine="jvp")  # gradients grow with x
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01)
    scaler = GradScaler("cpu", init_scale=2.0**100)
    x, y = batch(9)
    x_meta = x * 1e12  # a finite meta loss whose gradient, times 2^100, overflows float32
    generator_before, model_before = snapshot(wrapper.generator), snapshot(wrapper.model)
    wrapper.step(x, y, optimizer, x_meta=x_meta, y_meta=y, scaler=scaler)  # nonfinite="raise": no error
    assert wrapper.last_meta_objective is not None and torch.isfinite(wrapper.last_meta_objective)  # the meta loss itself is finite
    assert_unchanged(wrapper.generator, generator_before)
    assert any(not torch.equal(v, snapshot(wrapper.model)[k]) for k, v in model_before.items())
    assert scaler.get_scale() == 2.0**99


def test_a_disabled_scaler_is_no_scaler() -> None:
    a, a_optimizer = _wrapper()
    b, b_optimizer = _wrapper()
    for seed in range(2):
        x, y = batch(9, seed=seed, dtype=torch.float64)
        a.step(x, y, a_optimizer, scaler=GradScaler("cpu", enabled=False))
        b.step(x, y, b_optimizer)
    for key, value in snapshot(b).items():
        assert torch.equal(snapshot(a)[key], value), key


@pytest.mark.parametrize("engine", ["functional", "higher"])
def test_a_scaler_with_a_second_order_engine_is_refused_before_anything_changes(engine: str) -> None:
    wrapper, optimizer = _wrapper(engine=engine)
    before = snapshot(wrapper)
    x, y = batch(9, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"needs engine='jvp' or 'finite_difference', got engine='{engine}'"):
        wrapper.step(x, y, optimizer, index=torch.arange(9), scaler=_scaler())
    assert_unchanged(wrapper, before)
    assert wrapper.steps == {"model": 0, "meta": 0}
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler, got float"):
        wrapper.step(x, y, optimizer, index=torch.arange(9), scaler=2.0**12)  # type: ignore[arg-type]
