"""auxlab.diagnostics: label statistics, NMI, total variation, parameter movement and the meta objective's gradients."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyCNN, TinyMLP, image_batch, snapshot
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from auxlab import HierarchyMask, MetaAuxWrapper
from auxlab._gradients import global_norm
from auxlab.diagnostics import (
    hypergradient_parts,
    label_statistics,
    normalized_mutual_information,
    parameter_movement,
    total_variation,
)


@given(a=st.lists(st.integers(0, 4), min_size=2, max_size=60), seed=st.integers(0, 1000))
def test_nmi_is_scikit_learns_arithmetic_nmi(a: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    left = torch.tensor(a)
    right = (left + torch.randint(0, 3, (len(a),), generator=g)) % 4
    assert normalized_mutual_information(left, right) == pytest.approx(normalized_mutual_info_score(left, right), abs=1e-9)
    assert normalized_mutual_information(left, left) == pytest.approx(1.0)


def test_label_statistics_of_collapsed_spread_and_fine_labels() -> None:
    mask = HierarchyMask([2, 3])
    y = torch.tensor([0] * 6 + [1] * 6)
    fine = torch.tensor([0, 1] * 3 + [0, 1, 2] * 2)  # the true sub-class of each sample
    spread = torch.zeros(12, 5)
    spread[torch.arange(12), torch.tensor([0, 1] * 3 + [2, 3, 4] * 2)] = 1.0  # the labels are the fine labels
    stats = label_statistics(spread, y, mask, fine_labels=fine)
    assert stats["subclasses_used"] == [2, 3] and stats["used_fraction"] == 1.0 and stats["confidence"] == 1.0
    assert stats["fine_nmi"] == pytest.approx(1.0)
    assert stats["batch_entropy"] == pytest.approx(-(2 * 0.25 * math.log(0.25) + 3 * (1 / 6) * math.log(1 / 6)), abs=1e-9)
    collapsed = torch.zeros(12, 5)
    collapsed[:6, 0] = 1.0
    collapsed[6:, 2] = 1.0
    stats = label_statistics(collapsed, y, mask, fine_labels=fine)
    assert stats["subclasses_used"] == [1, 1] and stats["used_fraction"] == 2 / 5 and stats["fine_nmi"] == pytest.approx(0.0)
    assert stats["batch_entropy"] == pytest.approx(math.log(2))
    flat = mask.softmax(torch.zeros(12, 5), y)
    assert label_statistics(flat, y, mask)["target_confidence"] == pytest.approx([0.5, 1 / 3])
    with pytest.raises(ValueError, match=r"distribution must be \(N, 5\)"):
        label_statistics(flat[:, :4], y, mask)


def test_total_variation_and_parameter_movement() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert total_variation(p, p) == 0.0
    assert total_variation(p, p.flip(1)) == pytest.approx(0.5)
    layer = nn.Linear(3, 2)
    initial = {n: v.detach().clone() for n, v in layer.named_parameters()}
    assert parameter_movement(layer, initial) == 0.0
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.bias.mul_(2.0)
    assert parameter_movement(layer, initial) == pytest.approx(1.0)


@pytest.mark.parametrize("generator", ["maxl", "maxl-light", "maxl-balanced", "maxl-light-balanced"])
def test_hypergradient_parts_splits_maxls_objective_and_changes_nothing(generator: str) -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator=generator, inner_lr=0.1)
    x, y = image_batch(40)
    before, steps = snapshot(wrapper), dict(wrapper.steps)
    parts = hypergradient_parts(wrapper, x, y)
    assert snapshot(wrapper).keys() == before.keys() and all(torch.equal(v, snapshot(wrapper)[k]) for k, v in before.items())
    assert wrapper.steps == steps and all(p.grad is None for p in wrapper.generator.parameters())
    assert parts["primary_norm"] > 0 and -1.0 <= parts["cosine"] <= 1.0
    if generator.endswith("balanced"):  # balance as a constraint: the entropy term has nothing left to push
        assert parts["entropy_norm"] < 1e-6 * parts["primary_norm"]
    else:
        assert parts["entropy_norm"] > parts["primary_norm"]  # MAXL's known imbalance (MAXL_NOTES)
    # the two parts add up to the learner's own meta gradient
    kind = type(wrapper.generator_optimizer)  # lr 0 keeps the gradient in .grad
    reference = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator=generator, inner_lr=0.1, generator_optimizer=lambda p: kind(p, lr=0.0))
    reference.load_state_dict(wrapper.state_dict())
    reference.meta_step(x, y)
    total = global_norm(p.grad for p in reference.generator.parameters())
    assert total is not None
    expected = math.sqrt(parts["primary_norm"] ** 2 + parts["entropy_norm"] ** 2 + 2 * parts["cosine"] * parts["primary_norm"] * parts["entropy_norm"])
    assert float(total) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("entropy_weight", "instance_weight"), [(0.2, 0.0), (0.0, 0.5)])
def test_hypergradient_parts_of_dtgs_three_terms_add_up_to_its_meta_gradient(entropy_weight: float, instance_weight: float) -> None:
    def wrapper_with(**optimizer: object) -> MetaAuxWrapper:
        torch.manual_seed(0)
        wrapper = MetaAuxWrapper(TinyMLP().double(), num_classes=3, psi=2, generator="dtg", engine="implicit", inner_lr=0.3,
                                 entropy_weight=entropy_weight, generator_kwargs={"instance_weight": instance_weight}, **optimizer)  # type: ignore[arg-type]
        assert wrapper.generator is not None
        with torch.no_grad():  # off the feature generator's zero start, so that the instance term has a gradient
            for p in wrapper.generator.parameters():
                p.add_(0.3 * torch.randn_like(p))
        return wrapper

    wrapper = wrapper_with()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.arange(9) % 3
    parts = hypergradient_parts(wrapper, x, y)
    assert set(parts) == {"primary_norm", "entropy_norm", "instance_norm", "cosine"} and parts["primary_norm"] > 0
    regulariser = parts["entropy_norm"] + parts["instance_norm"]  # one of the two is 0 here
    assert regulariser > 0 and min(parts["entropy_norm"], parts["instance_norm"]) == 0.0
    # the parts add up to the learner's own meta gradient, left in .grad by an optimizer of lr 0
    reference = wrapper_with(generator_optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    reference.meta_step(x, y)
    assert reference.generator is not None
    total = global_norm(p.grad for p in reference.generator.parameters())
    assert total is not None
    expected = math.sqrt(parts["primary_norm"] ** 2 + regulariser**2 + 2 * parts["cosine"] * parts["primary_norm"] * regulariser)
    assert float(total) == pytest.approx(expected, rel=1e-6)


def test_hypergradient_parts_needs_maxls_objective() -> None:
    x, y = image_batch(8)
    for generator in ("random", "rl"):
        wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator=generator, generator_kwargs={"num_samples": 8} if generator == "random" else None)
        with pytest.raises(ValueError, match="needs a learner whose objective is a primary term and a regulariser"):
            hypergradient_parts(wrapper, x, y, index=torch.arange(8))
