"""Malformed input thrown at the public API: a clear ValueError/TypeError or a correct result,
never a crash deep inside torch, and never a changed parameter after a rejected call."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from helpers import TinyCNN, TinyMLP, assert_unchanged, snapshot
from hypothesis import given
from torch import Tensor

from auxlab import HierarchyMask, MetaAuxWrapper

CLEAR_ERRORS = (ValueError, TypeError, FloatingPointError)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def tensors(draw: st.DrawFn, *, shapes: st.SearchStrategy[tuple[int, ...]], dtypes: list[torch.dtype], low: int, high: int) -> Tensor:
    shape, dtype = draw(shapes), draw(st.sampled_from(dtypes))
    values = torch.randint(low, high, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    return values.to(dtype)


def _call_and_check(wrapper: MetaAuxWrapper, call: str, *args: object, **kwargs: object) -> None:
    before = snapshot(wrapper)
    try:
        result = getattr(wrapper, call)(*args, **kwargs)
    except CLEAR_ERRORS as error:
        assert str(error), "an error without a message"
        assert_unchanged(wrapper, before)
        return
    assert result is None or bool(torch.isfinite(result).all())


# x keeps the feature width and a floating dtype the toy model can take: what a model accepts (an
# integer batch for an embedding model, another width) is the model's own business, and its own
# error. Batch size, dtype against the model's, labels and indices are auxlab's to check.
@given(
    x=tensors(shapes=st.tuples(st.integers(0, 5), st.just(6)), dtypes=[torch.float32, torch.float64, torch.float16], low=-3, high=4),
    y=tensors(shapes=st.tuples(st.integers(0, 5)) | st.tuples(st.integers(0, 5), st.integers(1, 2)) | st.just(()), dtypes=DTYPES, low=-2, high=5),
    call=st.sampled_from(["loss", "meta_step", "aux_targets"]),
)
def test_malformed_batches_raise_clear_errors(x: Tensor, y: Tensor, call: str) -> None:
    torch.manual_seed(0)
    _call_and_check(MetaAuxWrapper(TinyMLP(), num_classes=3, psi=[1, 2, 3]), call, x, y)


@given(
    index=tensors(shapes=st.tuples(st.integers(0, 6)) | st.tuples(st.just(4), st.just(1)), dtypes=DTYPES, low=-3, high=14),
    call=st.sampled_from(["loss", "meta_step", "aux_targets"]),
)
def test_malformed_indices_raise_clear_errors(index: Tensor, call: str) -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, generator="random", generator_kwargs={"num_samples": 12})
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    _call_and_check(wrapper, call, x, y, index=index)


@given(psi=st.one_of(
    st.lists(st.integers(-2, 4), max_size=4),
    st.integers(-2, 4),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3),
    st.text(max_size=3),
))
def test_any_psi_is_accepted_correctly_or_rejected_clearly(psi: object) -> None:
    try:
        wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=psi)  # type: ignore[arg-type]
    except CLEAR_ERRORS as error:
        assert str(error)
        return
    expected = [psi] * 3 if isinstance(psi, int) else psi
    assert list(wrapper.mask.psi) == expected and all(p >= 1 for p in wrapper.mask.psi)
    assert wrapper.aux_head.out_features == sum(wrapper.mask.psi)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_channels_last_and_non_contiguous_batches_give_the_same_result(layout: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    odd = x.to(memory_format=torch.channels_last) if layout == "channels_last" else torch.randn(6, 1, 8, 16)[..., ::2]
    if layout == "non_contiguous":
        x = odd.contiguous()
    assert odd.stride() != x.stride()
    results = []
    for batch_x in (x, odd):
        torch.manual_seed(0)
        wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=2)
        results.append((wrapper.loss(batch_x, y).detach(), wrapper.meta_step(batch_x, y)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_mask_softmax_rejects_bad_labels_shape() -> None:
    with pytest.raises(ValueError, match=r"y must have shape \(2,\) to match scores"):
        HierarchyMask([1, 2]).softmax(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
