"""HierarchyMask: the block layout, its constructors and errors, and the masked softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from auxlab import HierarchyMask

#: Tolerance of a row sum (and of the comparison with the float64 reference) for each dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)

psi_lists = st.lists(st.integers(1, 7), min_size=1, max_size=12)


@st.composite
def score_batches(draw: st.DrawFn, dtype: torch.dtype) -> tuple[HierarchyMask, Tensor, Tensor]:
    """A mask, ``(B, K)`` scores in ``dtype`` (extremes included) and ``(B,)`` labels."""
    mask = HierarchyMask(draw(psi_lists))
    batch_size, width = draw(st.integers(1, 6)), mask.num_aux_classes
    y = draw(st.lists(st.integers(0, mask.num_classes - 1), min_size=batch_size, max_size=batch_size))
    extreme = st.sampled_from([1e4, -1e4, 0.0])
    kind = draw(st.sampled_from(["any", "extremes", "all equal"]))
    if kind == "all equal":
        values = [draw(st.floats(-1e4, 1e4) | extreme)] * (batch_size * width)
    else:
        element = extreme if kind == "extremes" else st.floats(-1e4, 1e4) | extreme
        values = draw(st.lists(element, min_size=batch_size * width, max_size=batch_size * width))
    scores = torch.tensor(values, dtype=torch.float64).reshape(batch_size, width).to(dtype)
    return mask, scores, torch.tensor(y)


def reference_softmax(mask: HierarchyMask, scores: Tensor, y: Tensor) -> Tensor:
    """Softmax over each sample's own block only, in float64, zero elsewhere."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for b, label in enumerate(y.tolist()):
        block = mask.block(label)
        out[b, block.start : block.stop] = torch.softmax(scores[b, block.start : block.stop].double(), dim=0)
    return out


# ------------------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    "psi",
    [[2, 3, 1], (2, 3, 1), np.array([2, 3, 1]), np.array([2, 3, 1], dtype=np.int32), torch.tensor([2, 3, 1])],
    ids=["list", "tuple", "numpy", "numpy-int32", "tensor"],
)
def test_constructor_accepts_sequences_arrays_and_tensors(psi: object) -> None:
    mask = HierarchyMask(psi)  # type: ignore[arg-type]
    assert mask.psi == (2, 3, 1)
    assert all(type(p) is int for p in mask.psi)
    assert mask.num_classes == 3
    assert mask.num_aux_classes == 6


def test_uniform_repeats_the_count() -> None:
    mask = HierarchyMask.uniform(4, 5)
    assert mask.psi == (5, 5, 5, 5)
    assert mask.num_aux_classes == 20


def test_blocks_are_contiguous_and_in_class_order() -> None:
    mask = HierarchyMask([2, 3, 1])
    assert [mask.block(c) for c in range(3)] == [range(2), range(2, 5), range(5, 6)]


@pytest.mark.parametrize("c", [-1, 3])
def test_block_rejects_a_class_outside_the_range(c: int) -> None:
    with pytest.raises(ValueError, match=rf"class {c} is outside \[0, 3\)"):
        HierarchyMask([2, 3, 1]).block(c)


@pytest.mark.parametrize(
    ("psi", "error", "message"),
    [
        ([], ValueError, "psi must not be empty"),
        ([2, 0], ValueError, r"psi\[1\] must be >= 1, got 0"),
        ([2, 3, -1], ValueError, r"psi\[2\] must be >= 1, got -1"),
        ([True, 2], TypeError, r"psi\[0\] must be an integer, got True"),
        ([2, 1.0], TypeError, r"psi\[1\] must be an integer, got 1.0"),
        (np.array([1.5, 2.0]), TypeError, r"psi\[0\] must be an integer"),
        (torch.tensor([[1, 2]]), TypeError, r"psi\[0\] must be an integer"),
        (5, TypeError, r"psi must be a sequence.*HierarchyMask\.uniform"),
        (np.int64(5), TypeError, r"psi must be a sequence.*HierarchyMask\.uniform"),
        ("23", TypeError, "psi must be a sequence of integers, got str"),
    ],
    ids=["empty", "zero", "negative", "bool", "float", "float-array", "2d-tensor", "int", "numpy-int", "str"],
)
def test_constructor_rejects_bad_psi(psi: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        HierarchyMask(psi)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("num_classes", "psi", "error", "message"),
    [
        (0, 2, ValueError, "num_classes must be >= 1, got 0"),
        (3, 0, ValueError, "psi must be >= 1, got 0"),
        (3, 2.5, TypeError, "psi must be an integer, got 2.5"),
        (True, 2, TypeError, "num_classes must be an integer, got True"),
    ],
)
def test_uniform_rejects_bad_counts(num_classes: object, psi: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        HierarchyMask.uniform(num_classes, psi)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ fine labels
def test_from_fine_to_coarse_counts_fine_labels_per_class() -> None:
    assert HierarchyMask.from_fine_to_coarse([1, 0, 1, 2, 0, 1]).psi == (2, 3, 1)


def test_fine_label_columns_fill_each_block_in_increasing_fine_label_order() -> None:
    fine_to_coarse = [1, 0, 1, 2, 0]  # class 0: fine 1, 4; class 1: fine 0, 2; class 2: fine 3
    mask = HierarchyMask.from_fine_to_coarse(fine_to_coarse)
    assert mask.psi == (2, 2, 1)
    assert mask.fine_label_columns(fine_to_coarse) == [2, 0, 3, 4, 1]


@given(st.lists(st.integers(0, 6), min_size=1, max_size=30))
def test_fine_label_columns_are_a_block_respecting_permutation(coarse: list[int]) -> None:
    fine_to_coarse = [sorted(set(coarse)).index(c) for c in coarse]  # every class owns a fine label
    mask = HierarchyMask.from_fine_to_coarse(fine_to_coarse)
    columns = mask.fine_label_columns(fine_to_coarse)
    assert sorted(columns) == list(range(mask.num_aux_classes))
    for c in range(mask.num_classes):
        own = [column for column, owner in zip(columns, fine_to_coarse) if owner == c]
        assert own == list(mask.block(c))  # increasing fine label -> increasing column, whole block


@pytest.mark.parametrize(
    ("fine_to_coarse", "message"),
    [
        ([0, 2, 2], r"fine_to_coarse maps no fine label to primary class\(es\) \[1\]"),
        ([], "fine_to_coarse must not be empty"),
        ([0, -1], r"fine_to_coarse\[1\] must be a non-negative integer class, got -1"),
        ([0, 1.0], r"fine_to_coarse\[1\] must be a non-negative integer class, got 1.0"),
        ([True, 0], r"fine_to_coarse\[0\] must be a non-negative integer class, got True"),
    ],
    ids=["class-without-fine-labels", "empty", "negative", "float", "bool"],
)
def test_from_fine_to_coarse_rejects_bad_maps(fine_to_coarse: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HierarchyMask.from_fine_to_coarse(fine_to_coarse)  # type: ignore[arg-type]


def test_from_fine_to_coarse_rejects_a_non_sequence() -> None:
    with pytest.raises(TypeError, match="fine_to_coarse must be a sequence of integers, got int"):
        HierarchyMask.from_fine_to_coarse(3)  # type: ignore[arg-type]


def test_fine_label_columns_rejects_a_map_for_another_hierarchy() -> None:
    with pytest.raises(
        ValueError, match=r"fine_to_coarse gives \[1, 2\] fine labels per class but this hierarchy has psi=\[2, 1\]"
    ):
        HierarchyMask([2, 1]).fine_label_columns([0, 1, 1])


# ------------------------------------------------------------------------------ matrix views
@given(psi_lists)
def test_as_matrix_has_one_contiguous_block_per_row(psi: list[int]) -> None:
    mask = HierarchyMask(psi)
    matrix = mask.as_matrix()
    assert matrix.dtype == torch.bool
    assert matrix.shape == (len(psi), sum(psi))
    assert matrix.sum(1).tolist() == psi
    assert matrix.sum(0).tolist() == [1] * sum(psi)
    for c in range(len(psi)):
        assert matrix[c].nonzero().squeeze(1).tolist() == list(mask.block(c))


def test_as_matrix_takes_a_dtype() -> None:
    matrix = HierarchyMask([1, 2]).as_matrix(dtype=torch.float64)
    assert matrix.dtype == torch.float64
    assert matrix.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


@given(psi_lists, st.data())
def test_per_sample_views_agree_with_the_blocks(psi: list[int], data: st.DataObject) -> None:
    mask = HierarchyMask(psi)
    labels = data.draw(st.lists(st.integers(0, len(psi) - 1), min_size=1, max_size=8))
    subs = [data.draw(st.integers(0, psi[c] - 1)) for c in labels]
    y, sub = torch.tensor(labels), torch.tensor(subs)

    assert torch.equal(mask.rows(y), mask.as_matrix()[y])
    assert mask.sizes_of(y).tolist() == [psi[c] for c in labels]
    assert mask.column(y, sub).tolist() == [mask.block(c)[s] for c, s in zip(labels, subs)]
    assert mask.sizes_of(y).dtype == mask.column(y, sub).dtype == torch.long


# ------------------------------------------------------------------------------ value semantics
def test_equality_and_hash_depend_only_on_psi() -> None:
    mask = HierarchyMask([2, 2])
    assert mask == HierarchyMask.uniform(2, 2) == HierarchyMask(np.array([2, 2]))
    assert hash(mask) == hash(HierarchyMask.uniform(2, 2))
    assert mask != HierarchyMask([2, 3])
    assert mask != HierarchyMask([2, 2, 2])
    assert mask != [2, 2]
    assert len({mask, HierarchyMask((2, 2)), HierarchyMask([1])}) == 2


def test_repr_round_trips() -> None:
    mask = HierarchyMask([2, 3, 1])
    assert repr(mask) == "HierarchyMask(psi=[2, 3, 1])"
    assert eval(repr(mask)) == mask


# ------------------------------------------------------------------------------ masked softmax
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_softmax_is_the_block_softmax(dtype: torch.dtype, data: st.DataObject) -> None:
    mask, scores, y = data.draw(score_batches(dtype))
    probs = mask.softmax(scores, y)

    assert probs.dtype == dtype
    assert probs.shape == scores.shape
    assert torch.isfinite(probs).all()
    assert (probs[~mask.rows(y)] == 0).all()
    assert torch.allclose(probs.double().sum(1), torch.ones(len(y), dtype=torch.float64), rtol=0, atol=TOLERANCE[dtype])
    assert torch.allclose(probs.double(), reference_softmax(mask, scores, y), rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data(), shift=st.floats(-1e4, 1e4))
def test_softmax_ignores_out_of_block_scores(dtype: torch.dtype, data: st.DataObject, shift: float) -> None:
    mask, scores, y = data.draw(score_batches(dtype))
    outside = ~mask.rows(y)
    shifted = torch.where(outside, scores + shift, scores)
    assert torch.equal(mask.softmax(shifted, y), mask.softmax(scores, y))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(data=st.data())
def test_softmax_gradient_is_finite_and_zero_outside_the_block(dtype: torch.dtype, data: st.DataObject) -> None:
    mask, scores, y = data.draw(score_batches(dtype))
    scores.requires_grad_()
    upstream = torch.linspace(-1, 2, scores.numel(), dtype=dtype).reshape(scores.shape)
    (grad,) = torch.autograd.grad((mask.softmax(scores, y) * upstream).sum(), scores)
    assert torch.isfinite(grad).all()
    assert (grad[~mask.rows(y)] == 0).all()


def test_softmax_gradcheck() -> None:
    mask = HierarchyMask([2, 3, 1])
    scores = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda s: mask.softmax(s, y), (scores,))


def test_softmax_accepts_an_empty_batch() -> None:
    probs = HierarchyMask([2, 3]).softmax(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert probs.shape == (0, 5)


@pytest.mark.parametrize(
    ("scores_shape", "y_shape", "message"),
    [
        ((4, 7), (4,), r"scores must have shape \(B, 6\).*got \(4, 7\)"),
        ((6,), (6,), r"got \(6,\)"),
        ((4, 6), (3,), r"y must have shape \(4,\).*got \(3,\)"),
    ],
    ids=["wrong-width", "1d-scores", "y-length"],
)
def test_softmax_rejects_bad_shapes(scores_shape: tuple[int, ...], y_shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HierarchyMask([2, 3, 1]).softmax(torch.zeros(scores_shape), torch.zeros(y_shape, dtype=torch.long))


# ------------------------------------------------------------------------------ the pitfalls in MAXL_NOTES
def naive_masked_softmax(scores: Tensor, rows: Tensor, *, floor: float = 0.0) -> Tensor:
    """``exp(x) * mask / sum``, as in straightforward re-implementations of MAXL."""
    weight = rows.to(scores.dtype).clamp_min(floor)
    unnormalised = scores.exp() * weight
    return unnormalised / unnormalised.sum(1, keepdim=True)


def test_naive_formula_overflows_near_100_but_ours_does_not() -> None:
    mask, y = HierarchyMask([2, 2]), torch.tensor([0, 1])
    scores = torch.tensor([[100.0, 99.0, 100.0, 0.0], [100.0, 0.0, 99.0, 100.0]])

    assert torch.isnan(naive_masked_softmax(scores, mask.rows(y))).any()
    probs = mask.softmax(scores, y)
    expected_pair = [1 / (1 + math.e), math.e / (1 + math.e)]
    assert torch.allclose(probs, torch.tensor([[expected_pair[1], expected_pair[0], 0, 0], [0, 0, *expected_pair]]))


def test_near_zero_mask_leaks_probability_but_ours_is_exactly_zero() -> None:
    mask, y = HierarchyMask([2, 1]), torch.tensor([0])
    scores = torch.tensor([[0.0, 0.0, 20.0]])  # the out-of-block column is 20 above the block
    leaked = naive_masked_softmax(scores, mask.rows(y), floor=1e-8)[0, 2]
    assert leaked > 0.5
    assert mask.softmax(scores, y)[0].tolist() == [0.5, 0.5, 0.0]


# ------------------------------------------------------------------------------ balance (Sinkhorn-Knopp)
@given(
    psi=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    batch=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_balance_keeps_distributions_in_their_blocks_and_equalises_the_sub_classes(psi: list[int], batch: int, seed: int) -> None:
    mask = HierarchyMask(psi)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(psi), (batch,), generator=g)
    probs = mask.softmax(torch.randn(batch, mask.num_aux_classes, generator=g, dtype=torch.float64), y)
    balanced = mask.balance(probs, y, iterations=1000)
    assert torch.allclose(balanced.sum(1), torch.ones(batch, dtype=torch.float64))
    assert torch.equal(balanced[~mask.rows(y)], torch.zeros_like(balanced[~mask.rows(y)]))  # exactly 0 outside each block
    for c, size in enumerate(psi):
        n_c = int((y == c).sum())
        columns = balanced[:, mask.block(c).start : mask.block(c).stop].sum(0)
        assert torch.allclose(columns, torch.full((size,), n_c / size, dtype=torch.float64), atol=1e-6), (c, columns)
    assert torch.equal(mask.balance(probs, y, iterations=0), probs)


def test_balance_spreads_a_collapsed_batch_and_has_a_gradient() -> None:
    mask = HierarchyMask.uniform(2, 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([[5.0, 0.0, 0.0]] * 3 + [[0.0, 0.0, 5.0]] * 3).repeat(1, 2).requires_grad_()
    probs = mask.softmax(scores, y)
    assert probs.argmax(1).tolist() == [0, 0, 0, 5, 5, 5]  # every sample of a class on one sub-class
    balanced = mask.balance(probs, y, iterations=3)
    assert balanced.sum(0).tolist() == pytest.approx([1.0] * 6, abs=0.05)  # spread: n_c / psi = 1 per sub-class
    (grad,) = torch.autograd.grad(balanced[0, 1], scores)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_balance_refuses_bad_arguments() -> None:
    mask = HierarchyMask.uniform(2, 2)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="iterations must be a non-negative integer, got -1"):
        mask.balance(torch.full((2, 4), 0.5), y, iterations=-1)
    with pytest.raises(ValueError, match=r"probs must have shape \(B, 4\) and y \(B,\)"):
        mask.balance(torch.full((2, 3), 0.5), y)
