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
    ],
    ids=["jvp", "finite_difference", "meta_every_2", "maxl-light", "random", "single", "gcs", "uncertainty"],
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
    if plain.generator is not None and plain.generator_optimizer is not None:  # the generator trained under the scaler too
        assert any(not torch.equal(v, snapshot(_wrapper(**kwargs)[0].generator)[k]) for k, v in snapshot(scaled.generator).items())


def test_the_backward_passes_really_run_on_the_scaled_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper, optimizer = _wrapper()
    seen: list[float] = []
    original = torch.autograd.grad

    def recording(outputs: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(float(outputs.detach()) if isinstance(outputs, torch.Tensor) else float("nan"))
        return original(outputs, *args, **kwargs)

    x, y = batch(9, dtype=torch.float64)
    monkeypatch.setattr(torch.autograd, "grad", recording)
    wrapper.step(x, y, optimizer)
    unscaled = list(seen)
    seen.clear()
    wrapper2, optimizer2 = _wrapper()
    wrapper2.step(x, y, optimizer2, scaler=_scaler(2.0**10))
    # the gradient at theta, u at theta' and the generator's hypergradient: each of a loss 1024 times larger
    assert len(seen) == len(unscaled) == 3
    for scaled_value, value in zip(seen, unscaled):
        assert scaled_value == pytest.approx(value * 2.0**10, rel=1e-12)


def test_a_float16_overflow_skips_both_steps_lowers_the_scale_and_training_goes_on() -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=5, engine="jvp")
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01)
    scaler = GradScaler("cpu", init_scale=2.0**40)  # far too large for float16 gradients
    x, y = image_batch(16)
    before = snapshot(wrapper)
    parameters_before = {name: p.detach().clone() for name, p in wrapper.state_dict().items() if name in dict(wrapper.named_parameters()) or name.startswith("generator.") and "running" not in name and "num_batches" not in name}
    with torch.autocast("cpu", dtype=torch.float16):
        loss = wrapper.step(x, y, optimizer, scaler=scaler)  # nonfinite="raise": an overflow is not an error
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    # no parameter moved (the forward passes moved the BatchNorm statistics, as in any AMP loop)
    assert all(torch.equal(value, wrapper.state_dict()[name]) for name, value in parameters_before.items())
    assert not optimizer.state and wrapper.last_meta_objective is None
    assert scaler.get_scale() == 2.0**39
    steps = 0
    while scaler.get_scale() == 2.0 ** (39 - steps) and steps < 40:  # halves on each overflow
        with torch.autocast("cpu", dtype=torch.float16):
            wrapper.step(x, y, optimizer, scaler=scaler)
        steps += 1
    assert steps < 40
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.isfinite(wrapper.step(x, y, optimizer, scaler=scaler))
    after = snapshot(wrapper)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(before["model.classifier.weight"], after["model.classifier.weight"])
    assert any(not torch.equal(before[name], after[name]) for name in before if name.startswith("generator.") and "running" not in name)
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "functional"}, "engine='functional'"),
        ({"engine": "higher"}, "engine='higher'"),
        ({"generator": "rl"}, "generator='rl'"),
        ({"generator": "random", "generator_kwargs": {"num_samples": 9}, "weighting": "maoal"}, "weighting='maoal'"),
    ],
)
def test_a_scaler_with_a_second_order_or_other_meta_step_is_refused_before_anything_changes(kwargs: dict[str, Any], message: str) -> None:
    wrapper, optimizer = _wrapper(**kwargs)
    before = snapshot(wrapper)
    x, y = batch(9, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"scaler= needs .*{message}"):
        wrapper.step(x, y, optimizer, index=torch.arange(9), scaler=_scaler())
    assert_unchanged(wrapper, before)
    assert wrapper.steps == {"model": 0, "meta": 0}
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler, got float"):
        wrapper.step(x, y, optimizer, index=torch.arange(9), scaler=2.0**12)  # type: ignore[arg-type]


def test_a_gradient_level_weighting_compares_gradients_of_the_scaled_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    import auxlab.wrapper

    seen: list[tuple[float, float]] = []
    original = auxlab.wrapper.separate_gradients

    def recording(primary_loss: torch.Tensor, aux_loss: torch.Tensor, params: Any) -> Any:
        seen.append((float(primary_loss.detach()), float(aux_loss.detach())))
        return original(primary_loss, aux_loss, params)

    monkeypatch.setattr(auxlab.wrapper, "separate_gradients", recording)
    x, y = batch(9, dtype=torch.float64)
    for scaler in (None, _scaler(2.0**10)):
        wrapper, optimizer = _wrapper(generator="random", generator_kwargs={"num_samples": 9}, weighting="gcs")
        wrapper.step(x, y, optimizer, index=torch.arange(9), scaler=scaler)
    (plain_primary, plain_aux), (scaled_primary, scaled_aux) = seen
    assert scaled_primary == pytest.approx(plain_primary * 2.0**10, rel=1e-12)
    assert scaled_aux == pytest.approx(plain_aux * 2.0**10, rel=1e-12)
