"""SLA (self-supervised label augmentation): transformations, joint targets, aggregated inference,
self-distillation, and the strategy inside MetaAuxWrapper."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import TinyMLP, restored
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from auxlab import AuxLabelGenerator, HierarchyMask, MetaAuxWrapper
from auxlab.generators import GENERATORS, SLALabels
from auxlab.generators.sla import TRANSFORMATIONS, register_transformation

MASK = HierarchyMask.uniform(3, 4)


def sla(num_classes: int = 3, **kwargs: Any) -> SLALabels:
    """SLA with the four rotations over ``num_classes`` classes (psi = 4)."""
    return SLALabels(HierarchyMask.uniform(num_classes, 4), **kwargs)


def images(batch: int = 2, channels: int = 1, size: int = 3, *, seed: int = 0) -> Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def hand_aggregate(aux: Tensor, mask: HierarchyMask, count: int) -> Tensor:
    """``s[b, i] = (1/M) sum_j aux[j*B + b, offset(i) + j]`` with explicit loops."""
    batch = aux.shape[0] // count
    scores = torch.zeros(batch, mask.num_classes, dtype=aux.dtype)
    for b in range(batch):
        for i in range(mask.num_classes):
            total = 0.0
            for j in range(count):
                total += float(aux[j * batch + b, mask.block(i).start + j])
            scores[b, i] = total / count
    return scores


@pytest.fixture
def restore_transformations() -> Iterator[None]:
    with restored(TRANSFORMATIONS):
        yield


# ------------------------------------------------------------------------------ registration and construction
def test_sla_is_registered_augments_and_learns_nothing() -> None:
    assert GENERATORS["sla"] is SLALabels
    assert SLALabels.name == "sla"
    assert SLALabels.augments and not AuxLabelGenerator.augments
    generator = sla()
    assert not generator.learns and list(generator.parameters()) == []
    assert generator.num_transformations == 4
    assert generator.transformation_names == ("identity", "rot90", "rot180", "rot270")


def test_from_wrapper_passes_the_generator_kwargs() -> None:
    generator = SLALabels.from_wrapper(
        MASK, model=torch.nn.Linear(2, 3), head_name="", default_seed=0, distillation_weight=0.5, temperature=3.0
    )
    assert isinstance(generator, SLALabels)
    assert (generator.distillation_weight, generator.temperature) == (0.5, 3.0)


@pytest.mark.parametrize(("psi", "shown"), [([5, 5, 5], "[5, 5, 5]"), ([4, 3, 4], "[4, 3, 4]")])
def test_a_psi_other_than_the_number_of_transformations_is_refused(psi: list[int], shown: str) -> None:
    with pytest.raises(ValueError, match=rf"generator 'sla' with 4 transformations needs psi=4 for every class, got psi={re.escape(shown)}"):
        SLALabels(HierarchyMask(psi))
    with pytest.raises(ValueError, match=r"with 2 transformations needs psi=2 for every class, got psi=\[4, 4, 4\]"):
        SLALabels(MASK, transformations=["identity", "rot180"])
    assert SLALabels(HierarchyMask([2, 2]), transformations=["identity", "rot180"]).num_transformations == 2


def test_bad_transformation_lists_are_refused() -> None:
    with pytest.raises(ValueError, match=r"needs at least 2 transformations \(the identity first\), got 1"):
        SLALabels(HierarchyMask.uniform(3, 1), transformations=["identity"])
    with pytest.raises(ValueError, match=r"transformations\[1\]='rot45' is not a registered transformation; choose one of"):
        SLALabels(MASK, transformations=["identity", "rot45", "rot180", "rot270"])
    with pytest.raises(TypeError, match=r"transformations\[2\] must be a registered name or a callable, got int"):
        SLALabels(MASK, transformations=["identity", "rot90", 3, "rot270"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="transformations must be a sequence of transformation names or callables, got 'rot90'"):
        SLALabels(MASK, transformations="rot90")
    with pytest.raises(TypeError, match="mask must be a HierarchyMask, got list"):
        SLALabels([4, 4])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"distillation_weight": -1.0}, ValueError, "distillation_weight must be >= 0, got -1.0"),
        ({"distillation_weight": math.nan}, TypeError, "distillation_weight must be a finite number, got nan"),
        ({"distillation_weight": True}, TypeError, "distillation_weight must be a finite number, got True"),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0, got 0.0"),
        ({"temperature": math.inf}, TypeError, "temperature must be a finite number, got inf"),
        ({"temperature": "2"}, TypeError, "temperature must be a finite number, got '2'"),
    ],
)
def test_numbers_are_checked(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        sla(**kwargs)


# ------------------------------------------------------------------------------ transformations
def test_rotations_of_a_hand_checked_2x2_image() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    assert TRANSFORMATIONS["rot90"](x)[0, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # counter-clockwise
    assert TRANSFORMATIONS["rot180"](x)[0, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert TRANSFORMATIONS["rot270"](x)[0, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]
    assert TRANSFORMATIONS["identity"](x) is x


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (2, 5, 5)], ids=["BCHW", "BHW"])
def test_rotations_compose(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    rot90, rot180, rot270 = (TRANSFORMATIONS[n] for n in ("rot90", "rot180", "rot270"))
    assert not torch.equal(rot90(x), x)
    assert torch.equal(rot90(rot90(rot90(rot90(x)))), x)
    assert torch.equal(rot180(x), rot90(rot90(x)))
    assert torch.equal(rot270(x), rot90(rot180(x)))
    assert rot90(x).shape == x.shape


@pytest.mark.parametrize("name", ["rot90", "rot180", "rot270"])
@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (2, 6), (5,)])
def test_a_rotation_needs_square_images(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name} rotates batches of square images") + r".*" + re.escape(f"got a batch of shape {shape}")):
        TRANSFORMATIONS[name](torch.zeros(shape))


# ------------------------------------------------------------------------------ the registry of transformations
@pytest.mark.usefixtures("restore_transformations")
def test_registering_a_taken_or_bad_transformation_raises() -> None:
    with pytest.raises(ValueError, match=r"a transformation named 'rot90' is already registered \(rot90\); choose another name"):
        register_transformation("rot90", lambda x: x)
    with pytest.raises(TypeError, match="transformation 'flip' must be callable \\(a function of a batch\\), got int"):
        register_transformation("flip", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a transformation's name must be a non-empty string, got ''"):
        register_transformation("", lambda x: x)
    assert "flip" not in TRANSFORMATIONS


@pytest.mark.usefixtures("restore_transformations")
def test_a_registered_transformation_works_by_name_and_a_lambda_directly() -> None:
    register_transformation("test-width-flip", lambda x: x.flip(-1))
    x, y = images(batch=2, size=3), torch.tensor([1, 0])
    by_name = SLALabels(HierarchyMask.uniform(2, 2), transformations=["identity", "test-width-flip"])
    direct = SLALabels(HierarchyMask.uniform(2, 2), transformations=["identity", lambda x: x.flip(-2)])
    x_all, y_all = by_name.augment(x, y)
    assert torch.equal(x_all[2:], x.flip(-1)) and torch.equal(y_all, torch.tensor([1, 0, 1, 0]))
    x_all, _ = direct.augment(x, y)
    assert torch.equal(x_all[2:], x.flip(-2)) and not torch.equal(x_all[2:], x.flip(-1))
    assert direct.transformation_names[1].endswith("<lambda>")


# ------------------------------------------------------------------------------ augment
@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (3, 4, 4)], ids=["BCHW", "BHW"])
def test_augment_stacks_the_transformed_copies_copy_by_copy(shape: tuple[int, ...]) -> None:
    generator = sla()
    x, y = torch.randn(shape, generator=torch.Generator().manual_seed(2)), torch.tensor([2, 0, 1])
    x_all, y_all = generator.augment(x, y)
    assert x_all.shape == (12, *shape[1:])
    assert torch.equal(x_all[:3], x)
    for j in range(4):
        for b in range(3):
            assert torch.equal(x_all[j * 3 + b], torch.rot90(x[b], j, dims=(-2, -1)))
    assert y_all.tolist() == [2, 0, 1] * 4


def test_augment_without_labels_at_inference() -> None:
    x = images(batch=2, size=4)
    x_all, y_all = sla().augment(x, None)
    assert y_all is None and x_all.shape == (8, 1, 4, 4)


def test_augment_refuses_labels_that_do_not_match_the_batch() -> None:
    with pytest.raises(ValueError, match=r"y must have shape \(2,\) to match x of shape \(2, 1, 3, 3\), got \(3,\)"):
        sla().augment(images(batch=2), torch.tensor([0, 1, 2]))


def test_the_first_transformation_must_be_the_identity() -> None:
    generator = SLALabels(MASK, transformations=["rot90", "identity", "rot180", "rot270"])
    with pytest.raises(ValueError, match=r"the first transformation must be the identity .* got 'rot90'; put 'identity' first"):
        generator.augment(images(), torch.tensor([0, 1]))
    noisy = SLALabels(HierarchyMask.uniform(3, 2), transformations=[lambda x: x + 1e-6, "rot180"])
    with pytest.raises(ValueError, match="the first transformation must be the identity"):
        noisy.augment(images(), torch.tensor([0, 1]))
    copy = SLALabels(HierarchyMask.uniform(3, 2), transformations=[torch.clone, "rot180"])
    assert torch.equal(copy.augment(images(), None)[0][:2], images())  # an exact copy is an identity


def test_a_transformation_that_changes_the_shape_is_refused() -> None:
    crop = SLALabels(HierarchyMask.uniform(3, 2), transformations=["identity", lambda x: x[..., 1:, 1:]])
    with pytest.raises(
        ValueError,
        match=r"transformation 1 \('.*<lambda>'\) changed the batch's shape from \(2, 1, 3, 3\) to \(2, 1, 2, 2\); every transformation must keep the shape",
    ):
        crop.augment(images(), torch.tensor([0, 1]))


def test_augment_of_non_square_images_names_the_shape() -> None:
    with pytest.raises(ValueError, match=r"rot90 rotates batches of square images.*got a batch of shape \(2, 1, 3, 5\)"):
        sla().augment(torch.zeros(2, 1, 3, 5), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------ forward: joint targets
@pytest.mark.parametrize(("dtype", "expected"), [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.uint8, torch.float32)])
def test_targets_are_one_hot_at_the_transformation_of_the_own_block(dtype: torch.dtype, expected: torch.dtype) -> None:
    generator = sla()
    x, y = images(batch=3, size=4).to(dtype), torch.tensor([2, 0, 2])
    x_all, y_all = generator.augment(x, y)
    targets = generator(x_all, y_all)
    assert targets.shape == (12, 12) and targets.dtype == expected
    for j in range(4):
        for b in range(3):
            row = targets[j * 3 + b]
            column = MASK.block(int(y[b])).start + j
            assert row[column] == 1 and row.sum() == 1
    assert (targets[~MASK.rows(y_all)] == 0).all()
    assert targets.argmax(1).tolist() == [8, 0, 8, 9, 1, 9, 10, 2, 10, 11, 3, 11]


def test_targets_need_a_multiple_of_the_transformations() -> None:
    generator = sla()
    with pytest.raises(ValueError, match="x has 6 rows, which is not a positive multiple of the 4 transformations"):
        generator(torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must have shape \(8,\) to match x"):
        generator(torch.zeros(8, 1, 2, 2), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------ aggregated inference
def test_aggregate_of_a_three_class_example_by_hand() -> None:
    # M = 2 transformations, C = 3 classes, K = 6, B = 1: row 0 is the identity, row 1 the rotation.
    generator = SLALabels(HierarchyMask.uniform(3, 2), transformations=["identity", "rot180"])
    aux = torch.tensor([[1.0, 10.0, 2.0, 20.0, 3.0, 30.0], [100.0, 4.0, 200.0, 6.0, 300.0, 8.0]])
    # class i reads column 2i of row 0 and column 2i + 1 of row 1.
    assert generator.aggregate(aux).tolist() == [[(1 + 4) / 2, (2 + 6) / 2, (3 + 8) / 2]]


@given(
    batch=st.integers(1, 5),
    num_classes=st.integers(1, 4),
    count=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_aggregate_equals_the_hand_loops(batch: int, num_classes: int, count: int, seed: int) -> None:
    mask = HierarchyMask.uniform(num_classes, count)
    generator = SLALabels(mask, transformations=["identity"] + [lambda x: x.flip(-1)] * (count - 1))
    aux = torch.randn(count * batch, mask.num_aux_classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scores = generator.aggregate(aux)
    assert scores.shape == (batch, num_classes) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, hand_aggregate(aux, mask, count), rtol=0, atol=1e-12)


def test_aggregate_checks_the_shape() -> None:
    generator = sla()
    with pytest.raises(ValueError, match=r"aux must have shape \(M \* B, 12\) for K=sum\(psi\)=12, got \(8, 10\)"):
        generator.aggregate(torch.zeros(8, 10))
    with pytest.raises(ValueError, match="aux has 6 rows, which is not a positive multiple of the 4 transformations"):
        generator.aggregate(torch.zeros(6, 12))


# ------------------------------------------------------------------------------ self-distillation
def hand_distillation(primary: Tensor, aux: Tensor, weight: float, temperature: float) -> Tensor:
    scores = hand_aggregate(aux.detach(), MASK, 4)
    teacher = torch.softmax(scores / temperature, dim=1)
    student = torch.softmax(primary / temperature, dim=1)
    kl = (teacher * (teacher.log() - student.log())).sum(1).mean()
    return weight * temperature**2 * kl


def test_no_distillation_at_weight_zero() -> None:
    assert sla().extra_loss(torch.zeros(2, 3), torch.zeros(8, 12), torch.tensor([0, 1])) is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_equals_the_hand_kl(temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    primary, aux = torch.randn(2, 3, generator=g, dtype=torch.float64), 3 * torch.randn(8, 12, generator=g, dtype=torch.float64)
    loss = sla(distillation_weight=0.7, temperature=temperature).extra_loss(primary, aux, torch.tensor([0, 1]))
    assert loss is not None and loss.shape == ()
    expected = hand_distillation(primary, aux, 0.7, temperature)
    torch.testing.assert_close(loss, expected)
    assert float(expected) > 1e-3  # a non-trivial KL: the test can tell a wrong loss from the right one


def test_distillation_trains_only_the_primary_head() -> None:
    g = torch.Generator().manual_seed(4)
    primary = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    aux = torch.randn(8, 12, generator=g, dtype=torch.float64, requires_grad=True)
    loss = sla(distillation_weight=1.0, temperature=2.0).extra_loss(primary, aux, torch.tensor([0, 1]))
    assert loss is not None
    grad_primary, grad_aux = torch.autograd.grad(loss, [primary, aux], allow_unused=True)
    assert grad_aux is None or not grad_aux.any()
    assert grad_primary is not None and grad_primary.abs().sum() > 1e-6


def test_distillation_checks_the_primary_shape() -> None:
    with pytest.raises(ValueError, match=r"primary must have shape \(2, 3\) \(B, C\) to match aux of shape \(8, 12\), got \(4, 3\)"):
        sla(distillation_weight=1.0).extra_loss(torch.zeros(4, 3), torch.zeros(8, 12), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------ inside MetaAuxWrapper
def sla_wrapper(**kwargs: Any) -> tuple[MetaAuxWrapper, TinyMLP]:
    """A 3-class wrapper with SLA (psi = 4) around an MLP on flattened 4x4 images (no BatchNorm)."""
    torch.manual_seed(0)
    model = TinyMLP(in_features=16, hidden=5, num_classes=3).double()
    return MetaAuxWrapper(model, num_classes=3, psi=4, generator="sla", **kwargs), model


def hand_joint_logits(wrapper: MetaAuxWrapper, model: TinyMLP, x: Tensor) -> tuple[Tensor, Tensor]:
    """Primary and auxiliary logits of the four rotations of ``x``, computed by hand."""
    x_all = torch.cat([torch.rot90(x, j, dims=(-2, -1)) for j in range(4)])
    features = torch.tanh(model.hidden(x_all.flatten(1)))
    assert wrapper.aux_head is not None
    return model.fc(features), wrapper.aux_head(features)


def image_labels(batch: int = 5, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0][:batch])


@pytest.mark.parametrize("distillation_weight", [0.0, 0.5])
def test_wrapper_loss_is_primary_ce_on_the_batch_plus_joint_ce_on_all_copies(distillation_weight: float) -> None:
    wrapper, model = sla_wrapper(aux_weight=0.3, generator_kwargs={"distillation_weight": distillation_weight, "temperature": 2.0})
    x, y = image_labels()
    primary, aux = hand_joint_logits(wrapper, model, x)
    columns = torch.cat([y * 4 + j for j in range(4)])  # copy j of a sample of class c: column 4c + j
    expected = nn.functional.cross_entropy(primary[:5], y) + 0.3 * nn.functional.cross_entropy(aux, columns)
    if distillation_weight:
        teacher = torch.softmax(hand_aggregate(aux.detach(), MASK, 4) / 2.0, dim=1)
        student = torch.log_softmax(primary[:5] / 2.0, dim=1)
        expected = expected + distillation_weight * 4.0 * (teacher * (teacher.log() - student)).sum(1).mean()
    torch.testing.assert_close(wrapper.loss(x, y), expected)
    # the rotated copies count: the loss of the untransformed rows alone differs
    alone = nn.functional.cross_entropy(primary[:5], y) + 0.3 * nn.functional.cross_entropy(aux[:5], columns[:5])
    assert not torch.allclose(alone, expected)


def test_wrapper_steps_train_both_heads() -> None:
    wrapper, model = sla_wrapper(generator_kwargs={"distillation_weight": 1.0})
    assert wrapper.aux_head is not None and wrapper.aux_head.out_features == 12
    before = {"fc": model.fc.weight.detach().clone(), "aux": wrapper.aux_head.weight.detach().clone()}
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    x, y = image_labels()
    losses = [float(wrapper.step(x, y, optimizer)) for _ in range(5)]
    assert not torch.equal(model.fc.weight, before["fc"])
    assert not torch.equal(wrapper.aux_head.weight, before["aux"])
    assert losses[-1] < losses[0]


def test_wrapper_aggregated_logits_average_the_joint_head_over_rotations() -> None:
    wrapper, model = sla_wrapper()
    torch.nn.init.normal_(wrapper.aux_head.weight)  # type: ignore[union-attr]
    x, _ = image_labels(batch=3)
    _, aux = hand_joint_logits(wrapper, model, x)
    scores = wrapper.aggregated_logits(x)
    assert scores.shape == (3, 3)
    torch.testing.assert_close(scores, hand_aggregate(aux.detach(), MASK, 4))
    # the rotated copies count: the identity copy alone gives other scores
    assert not torch.allclose(scores, aux[:3].detach().reshape(3, 3, 4)[:, :, 0])


def test_wrapper_refuses_a_psi_that_is_not_the_number_of_transformations() -> None:
    with pytest.raises(ValueError, match=r"generator 'sla' with 4 transformations needs psi=4 for every class, got psi=\[5, 5, 5\]"):
        MetaAuxWrapper(TinyMLP(in_features=16), num_classes=3, generator="sla")  # default psi=5
    with pytest.raises(ValueError, match=r"with 2 transformations needs psi=2 for every class, got psi=\[4, 4, 4\]"):
        MetaAuxWrapper(TinyMLP(in_features=16), num_classes=3, psi=4, generator="sla", generator_kwargs={"transformations": ["identity", "rot180"]})

