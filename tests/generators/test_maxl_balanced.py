"""The balanced MAXL generators ("maxl-balanced", "maxl-light-balanced") and the MAXL generators' options:
temperature, Sinkhorn balance and the original code's xavier_normal initialisation."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, image_batch

from auxlab import HierarchyMask, MetaAuxWrapper
from auxlab.experiments.models import SmallCNN
from auxlab.generators import GENERATORS, BalancedLightMAXLGenerator, BalancedMAXLGenerator, MAXLGenerator
from auxlab.learners import HypergradientLearner, ScaleFreeHypergradientLearner


def test_registered_with_a_scale_free_learner() -> None:
    assert GENERATORS["maxl-balanced"] is BalancedMAXLGenerator and GENERATORS["maxl-light-balanced"] is BalancedLightMAXLGenerator
    assert BalancedMAXLGenerator.learner is ScaleFreeHypergradientLearner and MAXLGenerator.learner is HypergradientLearner
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator="maxl-balanced")
    assert isinstance(wrapper.generator_optimizer, torch.optim.Adam) and wrapper.generator_optimizer.defaults["lr"] == 1e-3
    assert wrapper.generator.temperature == 0.5 and wrapper.generator.balance_iterations == 3  # type: ignore[union-attr]
    assert isinstance(MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3).generator_optimizer, torch.optim.SGD)  # the paper's stays


@pytest.mark.parametrize("generator", ["maxl-balanced", "maxl-light-balanced"])
def test_balanced_targets_spread_each_class_over_its_sub_classes(generator: str) -> None:
    torch.manual_seed(0)
    mask = HierarchyMask([2, 3, 1, 4, 2, 3, 1, 2, 3, 4])
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, mask=mask, generator=generator)
    x, y = image_batch(200)
    targets = wrapper.aux_targets(x, y)
    assert torch.allclose(targets.sum(1), torch.ones(200)) and float(targets[~mask.rows(y)].abs().max()) == 0.0
    for c, size in enumerate(mask.psi):
        n_c = int((y == c).sum())
        block = targets[:, mask.block(c).start : mask.block(c).stop].sum(0)
        assert torch.allclose(block, torch.full((size,), n_c / size), rtol=0.1), (c, block)


def test_temperature_sharpens_and_options_are_checked() -> None:
    mask = HierarchyMask.uniform(10, 3)
    x, y = image_batch(64)
    confidence = {}
    for temperature in (1.0, 0.25):
        generator = MAXLGenerator.from_model(mask, TinyCNN(), head_name="classifier", seed=0, temperature=temperature)
        with torch.no_grad():
            confidence[temperature] = float(generator(x, y).max(1).values.mean())
    assert confidence[0.25] > confidence[1.0]
    with pytest.raises(TypeError, match="temperature must be a finite number"):
        MAXLGenerator.from_model(mask, TinyCNN(), head_name="classifier", temperature=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        MAXLGenerator.from_model(mask, TinyCNN(), head_name="classifier", temperature=0)
    with pytest.raises(ValueError, match="balance_iterations must be a non-negative integer"):
        MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator="maxl-balanced", generator_kwargs={"balance_iterations": -1})
    with pytest.raises(ValueError, match="init='he' is not known; choose 'default'"):
        MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator_kwargs={"init": "he"})


def test_xavier_normal_initialisation_gives_sharper_initial_labels() -> None:
    """The original MAXL code's init: xavier_normal_ weights and zero biases (MAXL_NOTES: 0.44-0.48
    initial confidence on the small CNN against 0.27-0.28 with PyTorch's default)."""
    mask = HierarchyMask.uniform(10, 5)
    x, y = image_batch(256)
    x = torch.nn.functional.interpolate(x, size=28)
    confidence = {}
    for init in ("default", "xavier_normal"):
        generator = MAXLGenerator.from_model(mask, SmallCNN(width=16), head_name="classifier", seed=0, init=init)
        if init == "xavier_normal":
            linears = [m for m in generator.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            assert linears and all(m.bias is None or float(m.bias.abs().max()) == 0.0 for m in linears)
        with torch.no_grad():
            confidence[init] = float(generator(x, y).max(1).values.mean())
    assert confidence["xavier_normal"] > confidence["default"] + 0.05, confidence


@pytest.mark.parametrize("generator", ["maxl-balanced", "maxl-light-balanced"])
def test_the_hypergradient_through_the_balance_is_exact(generator: str) -> None:
    x, y = image_batch(24, seed=1)
    grads = {}
    for engine in ("functional", "jvp"):
        torch.manual_seed(0)
        wrapper = MetaAuxWrapper(
            TinyCNN().double(), num_classes=10, psi=3, generator=generator, engine=engine, inner_lr=0.1,
            generator_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        )
        wrapper.meta_step(x.double(), y)
        grads[engine] = torch.cat([p.grad.reshape(-1) for p in wrapper.generator.parameters() if p.grad is not None])  # type: ignore[union-attr]
    assert float(grads["functional"].abs().max()) > 0
    torch.testing.assert_close(grads["jvp"], grads["functional"], rtol=1e-7, atol=1e-12)
