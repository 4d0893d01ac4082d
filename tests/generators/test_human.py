"""HumanLabels (``auxlab/generators/human.py``): the dataset's own fine labels as the auxiliary labels."""

from __future__ import annotations

import pytest
import torch

from auxlab import HierarchyMask
from auxlab.generators import HumanLabels
from tests.generators.generator_helpers import assert_inside_blocks

# ------------------------------------------------------------------------------ human labels
HUMAN_FINE_TO_COARSE = [
    0,
    1,
    0,
    2,
    1,
]  # class 0: fine 0, 2 -> columns 0, 1; class 1: fine 1, 4 -> 2, 3; class 2: fine 3 -> 4


def test_human_labels_map_fine_labels_to_their_columns() -> None:
    fine = torch.tensor([3, 0, 4, 2, 1, 1])
    y = torch.tensor(HUMAN_FINE_TO_COARSE)[fine]
    mask = HierarchyMask.from_fine_to_coarse(HUMAN_FINE_TO_COARSE)
    generator = HumanLabels(mask, fine_labels=fine.tolist(), fine_to_coarse=HUMAN_FINE_TO_COARSE)

    targets = generator(torch.zeros(6, 2), y, index=torch.arange(6))

    assert targets.argmax(1).tolist() == [4, 0, 3, 1, 2, 2]
    assert_inside_blocks(targets, mask, y)


def test_human_labels_need_the_mask_of_the_fine_to_coarse_map() -> None:
    with pytest.raises(
        ValueError,
        match=r"fine_to_coarse gives \[2, 2, 1\] fine labels per class but this hierarchy has psi=\[2, 2, 2\]",
    ):
        HumanLabels(HierarchyMask.uniform(3, 2), fine_labels=[0, 1], fine_to_coarse=HUMAN_FINE_TO_COARSE)


@pytest.mark.parametrize(
    ("fine_labels", "message"),
    [
        ([0, 5], r"fine_labels has label 5 but fine_to_coarse names 5 fine labels; fine labels must lie in \[0, 5\)"),
        ([-1, 0], "fine_labels has label -1"),
        ([0.0, 1.0], "fine_labels must be a non-empty 1-D sequence of integer labels, got torch.float32"),
        ([[0, 1]], r"of shape \(1, 2\)"),
        ([], "fine_labels must be a non-empty"),
    ],
    ids=["too-large", "negative", "float", "2d", "empty"],
)
def test_human_labels_reject_bad_fine_labels(fine_labels: list[object], message: str) -> None:
    mask = HierarchyMask.from_fine_to_coarse(HUMAN_FINE_TO_COARSE)
    with pytest.raises(ValueError, match=message):
        HumanLabels(mask, fine_labels=fine_labels, fine_to_coarse=HUMAN_FINE_TO_COARSE)  # type: ignore[arg-type]


def test_human_labels_reject_a_label_that_contradicts_the_fine_label() -> None:
    mask = HierarchyMask.from_fine_to_coarse(HUMAN_FINE_TO_COARSE)
    generator = HumanLabels(mask, fine_labels=[0, 3], fine_to_coarse=HUMAN_FINE_TO_COARSE)  # sample 1 is in class 2
    with pytest.raises(
        ValueError,
        match=r"sample with index 1 has label y=0 .* auxiliary column 4, outside block range\(0, 2\) of class 0",
    ):
        generator(torch.zeros(2, 2), torch.tensor([0, 0]), index=torch.tensor([0, 1]))
