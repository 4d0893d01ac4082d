"""The losses: classification (cross entropy and focal) and the generator's entropy regulariser."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.nn import functional as F

from auxlab.losses import classification_loss, negative_batch_entropy

GAMMAS = [0.0, 0.5, 2.0]


def logits_and_labels(batch_size: int = 6, num_classes: int = 4, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch_size, num_classes, generator=g, dtype=torch.float64)
    return logits, torch.randint(0, num_classes, (batch_size,), generator=g)


def soft_targets(batch_size: int = 6, num_classes: int = 4, *, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch_size, num_classes, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------ classification_loss
def test_integer_targets_match_cross_entropy() -> None:
    logits, y = logits_and_labels()
    assert torch.allclose(classification_loss(logits, y), F.cross_entropy(logits, y))


@pytest.mark.parametrize("gamma", GAMMAS)
def test_one_hot_targets_match_integer_targets(gamma: float) -> None:
    logits, y = logits_and_labels()
    one_hot = F.one_hot(y, 4).to(logits.dtype)
    assert torch.allclose(
        classification_loss(logits, one_hot, focal_gamma=gamma), classification_loss(logits, y, focal_gamma=gamma)
    )


def test_soft_targets_match_the_cross_entropy_formula() -> None:
    logits, target = logits_and_labels()[0], soft_targets()
    expected = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(classification_loss(logits, target), expected)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_loss_matches_its_formula(gamma: float) -> None:
    logits, target = logits_and_labels()[0], soft_targets()
    p = torch.softmax(logits, 1)
    expected = -(target * (1 - p) ** gamma * p.log()).sum(1).mean()
    assert torch.allclose(classification_loss(logits, target, focal_gamma=gamma), expected)


def test_focal_loss_discounts_confident_samples() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    per_sample = [
        classification_loss(logits[b : b + 1], y[b : b + 1], focal_gamma=2.0)
        / classification_loss(logits[b : b + 1], y[b : b + 1])
        for b in range(2)
    ]
    assert per_sample[0] < per_sample[1] < 1  # the easy sample is scaled down more


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("kind", ["integer", "soft"])
def test_classification_loss_gradcheck(kind: str, gamma: float) -> None:
    logits, y = logits_and_labels(4, 3)
    target = y if kind == "integer" else soft_targets(4, 3)
    assert torch.autograd.gradcheck(
        lambda z: classification_loss(z, target, focal_gamma=gamma), (logits.requires_grad_(),)
    )


@pytest.mark.parametrize("gamma", GAMMAS + [1.0])
@pytest.mark.parametrize("kind", ["integer", "one-hot"])
def test_gradient_stays_finite_for_a_certain_prediction(kind: str, gamma: float) -> None:
    # p == 1 exactly in float32: (1 - p)^gamma has an infinite derivative at 0 when gamma < 1
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    target = y if kind == "integer" else F.one_hot(y, 3).float()
    loss = classification_loss(logits, target, focal_gamma=gamma)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert grad[0].abs().max() < 1e-30  # nothing left to learn from the certain sample


@pytest.mark.parametrize(
    ("logits_shape", "target", "message"),
    [
        ((4, 4), torch.tensor([0.0, 1.0, 2.0, 3.0]), r"target must be probabilities of shape \(B, K\).*target \(4,\)"),
        (
            (4, 3),
            torch.zeros(4, 3, dtype=torch.long),
            r"target must be integer labels of shape \(B,\).*target \(4, 3\)",
        ),
        ((4, 3), torch.zeros(4, 4), r"got logits \(4, 3\) and torch.float32 target \(4, 4\)"),
        ((4,), torch.zeros(4, dtype=torch.long), r"got logits \(4,\)"),
    ],
    ids=["float-labels", "integer-matrix", "wrong-width", "1d-logits"],
)
def test_classification_loss_rejects_mismatched_targets(
    logits_shape: tuple[int, ...], target: Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_loss(torch.zeros(logits_shape), target)


def test_classification_loss_rejects_a_negative_gamma() -> None:
    logits, y = logits_and_labels()
    with pytest.raises(ValueError, match="focal_gamma must be >= 0.*got -1"):
        classification_loss(logits, y, focal_gamma=-1)


# ------------------------------------------------------------------------------ negative_batch_entropy
def hand_negative_entropy(probs: Tensor) -> Tensor:
    p_bar = probs.double().mean(0)
    p_bar = p_bar[p_bar > 0]
    return (p_bar * p_bar.log()).sum()


def test_negative_batch_entropy_of_a_hand_example() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])  # p_bar = (3/8, 3/8, 1/4)
    expected = 2 * 0.375 * math.log(0.375) + 0.25 * math.log(0.25)
    assert negative_batch_entropy(probs).item() == pytest.approx(expected, rel=1e-6)


def test_it_is_the_entropy_of_the_batch_mean_not_the_mean_entropy() -> None:
    spread = torch.eye(4)  # every sample certain, but of a different class
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 1
    assert negative_batch_entropy(spread).item() == pytest.approx(-math.log(4))
    assert negative_batch_entropy(collapsed).item() == 0


@pytest.mark.parametrize("num_classes", [1, 2, 7])
def test_uniform_probabilities_give_minus_log_k(num_classes: int) -> None:
    probs = torch.full((3, num_classes), 1 / num_classes, dtype=torch.float64)
    assert negative_batch_entropy(probs).item() == pytest.approx(-math.log(num_classes), abs=1e-12)


def test_absent_columns_count_zero_in_value_and_gradient() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.2, 0.0, 0.8, 0.0]], dtype=torch.float64, requires_grad=True)
    value = negative_batch_entropy(probs)
    (grad,) = torch.autograd.grad(value, probs)

    assert value.item() == pytest.approx(hand_negative_entropy(probs.detach()).item())
    assert torch.isfinite(grad).all()
    assert (grad[:, [1, 3]] == 0).all()
    p_bar = probs.detach().mean(0)[[0, 2]]
    assert torch.allclose(grad[:, [0, 2]], ((p_bar.log() + 1) / 2).expand(2, 2))  # d/dp of sum p_bar log p_bar


def test_negative_batch_entropy_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    probs = (torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(negative_batch_entropy, (probs,))


@st.composite
def probability_matrices(draw: st.DrawFn) -> Tensor:
    """``(B, K)`` rows on the simplex, often with exact zeros and whole empty columns."""
    batch_size, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    weight = st.sampled_from([0.0, 1.0]) | st.floats(0, 1)
    rows = []
    for _ in range(batch_size):
        row = draw(st.lists(weight, min_size=width, max_size=width))
        rows.append(row if sum(row) > 0 else [1.0] + [0.0] * (width - 1))
    probs = torch.tensor(rows, dtype=torch.float64)
    return probs / probs.sum(1, keepdim=True)


@given(probability_matrices())
def test_negative_batch_entropy_properties(probs: Tensor) -> None:
    probs.requires_grad_()
    value = negative_batch_entropy(probs)
    (grad,) = torch.autograd.grad(value, probs)

    assert -math.log(probs.shape[1]) - 1e-12 <= value.item() <= 1e-12
    assert value.item() == pytest.approx(hand_negative_entropy(probs.detach()).item(), abs=1e-12)
    assert torch.isfinite(grad).all()
    assert (grad[:, probs.detach().sum(0) == 0] == 0).all()
