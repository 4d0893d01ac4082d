"""The contract shared by the strategies with a fixed label table per training sample (random, k-means, human;
``auxlab/generators/_tables.py``): one-hot targets in the own block, looked up by dataset index, the table as the state."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from auxlab import AuxLabelGenerator
from auxlab.generators import RandomLabels
from tests.generators.generator_helpers import MASK, NUM_SAMPLES, TABLE_BUILDERS, assert_inside_blocks, toy_dataset

table_strategies = pytest.mark.parametrize("build", TABLE_BUILDERS.values(), ids=TABLE_BUILDERS.keys())


# ------------------------------------------------------------------------------ table strategies: shared contract
@table_strategies
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_table_targets_are_one_hot_in_the_own_block(build: Callable[[], AuxLabelGenerator], dtype: torch.dtype) -> None:
    generator = build()
    dataset = toy_dataset()[0]
    index = torch.tensor([7, 0, 29, 3, 3, 12])
    x, y = dataset.tensors[0][index].to(dtype), dataset.tensors[1][index]

    targets = generator(x, y, index=index)

    assert generator.needs_index
    assert targets.shape == (6, MASK.num_aux_classes)
    assert targets.dtype == dtype
    assert set(targets.unique().tolist()) == {0.0, 1.0}
    assert_inside_blocks(targets, MASK, y)
    assert torch.equal(targets[3], targets[4])  # one fixed label per sample


@table_strategies
def test_table_labels_follow_the_index_not_the_batch_position(build: Callable[[], AuxLabelGenerator]) -> None:
    generator = build()
    x, y = toy_dataset()[0].tensors
    full = generator(x, y, index=torch.arange(NUM_SAMPLES))
    order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(1))
    assert torch.equal(generator(x[order], y[order], index=order), full[order])


@table_strategies
def test_integer_inputs_give_default_dtype_targets(build: Callable[[], AuxLabelGenerator]) -> None:
    y = toy_dataset()[0].tensors[1][:2]
    targets = build()(torch.zeros(2, 4, dtype=torch.uint8), y, index=torch.tensor([0, 1]))
    assert targets.dtype == torch.get_default_dtype()


@table_strategies
def test_the_table_is_the_whole_state_dict(build: Callable[[], AuxLabelGenerator]) -> None:
    generator = build()
    state = generator.state_dict()
    assert list(state) == ["table"]
    assert state["table"].shape == (NUM_SAMPLES,)
    assert state["table"].dtype == torch.long
    assert torch.equal(state["table"], generator.table)


def test_loading_a_state_dict_restores_the_labels() -> None:
    saved, other = (
        RandomLabels(MASK, num_samples=NUM_SAMPLES, seed=1),
        RandomLabels(MASK, num_samples=NUM_SAMPLES, seed=2),
    )
    x, y = toy_dataset()[0].tensors
    index = torch.arange(NUM_SAMPLES)
    assert not torch.equal(other(x, y, index=index), saved(x, y, index=index))
    other.load_state_dict(saved.state_dict())
    assert torch.equal(other(x, y, index=index), saved(x, y, index=index))


@table_strategies
@pytest.mark.parametrize(
    ("index", "error", "message"),
    [
        (None, ValueError, r"assigns a fixed label per training sample and needs index=.*IndexedDataset"),
        (
            torch.tensor([0.0, 1.0]),
            TypeError,
            r"index must be an integer tensor of dataset indices, got a torch.float32 tensor",
        ),
        (torch.tensor([True, False]), TypeError, "got a torch.bool tensor"),
        ([0, 1], TypeError, "index must be an integer tensor of dataset indices, got list"),
        (torch.tensor([[0], [1]]), ValueError, r"index must have shape \(2,\) to match y, got \(2, 1\)"),
        (
            torch.tensor([0, NUM_SAMPLES]),
            ValueError,
            (
                rf"index has value {NUM_SAMPLES} but .* covers {NUM_SAMPLES} training samples; "
                rf"indices must lie in \[0, {NUM_SAMPLES}\)"
            ),
        ),
        (torch.tensor([-1, 0]), ValueError, "index has value -1"),
    ],
    ids=["missing", "float", "bool", "list", "2d", "too-large", "negative"],
)
def test_table_strategies_reject_bad_indices(
    build: Callable[[], AuxLabelGenerator], index: object, error: type[Exception], message: str
) -> None:
    x, y = toy_dataset()[0].tensors
    with pytest.raises(error, match=message):
        build()(x[:2], y[:2], index=index)  # type: ignore[arg-type]
