"""The base class of the label strategies (``auxlab/generators/base.py``): the registry of names, the mask check,
``learns`` and ``one_hot``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import TinyMLP
from torch import Tensor, nn

from auxlab import AuxLabelGenerator
from auxlab.generators import GENERATORS, HumanLabels, KMeansLabels, MAXLGenerator, RandomLabels
from tests.generators.generator_helpers import MASK, TABLE_BUILDERS, build_random, toy_dataset


# ------------------------------------------------------------------------------ registry and base class
@pytest.mark.parametrize(
    ("name", "cls"),
    [("maxl", MAXLGenerator), ("random", RandomLabels), ("kmeans", KMeansLabels), ("human", HumanLabels)],
)
def test_builtin_strategies_are_registered(name: str, cls: type[AuxLabelGenerator]) -> None:
    assert GENERATORS[name] is cls
    assert cls.name == name


@pytest.mark.usefixtures("restore_registry")
def test_a_user_subclass_registers_under_its_name() -> None:
    class Mine(AuxLabelGenerator, name="mine"):
        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.mask.softmax(torch.zeros(len(y), self.mask.num_aux_classes), y)

    assert GENERATORS["mine"] is Mine
    assert Mine.name == "mine"
    assert not Mine(MASK).learns
    targets = Mine(MASK)(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    assert torch.allclose(targets[1], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3, 0]))


@pytest.mark.usefixtures("restore_registry")
def test_registering_a_taken_name_raises() -> None:
    with pytest.raises(ValueError, match=r"a label generator named 'random' is already registered \(RandomLabels\)"):

        class Impostor(AuxLabelGenerator, name="random"):
            pass

    assert GENERATORS["random"] is RandomLabels


def test_a_subclass_without_a_name_is_not_registered() -> None:
    class Unnamed(AuxLabelGenerator):
        pass

    assert Unnamed.name is None
    assert Unnamed not in GENERATORS.values()
    with pytest.raises(NotImplementedError, match=r"Unnamed must implement forward\(x, y, index=None\)"):
        Unnamed(MASK)(torch.zeros(1, 4), torch.tensor([0]))


@pytest.mark.parametrize(
    "build",
    [
        lambda mask: RandomLabels(mask, num_samples=3),
        lambda mask: HumanLabels(mask, fine_labels=[0], fine_to_coarse=[0]),
        lambda mask: KMeansLabels(mask, dataset=toy_dataset()[0]),
        lambda mask: MAXLGenerator(mask, network=nn.Linear(4, 1)),
        lambda mask: MAXLGenerator.from_model(mask, TinyMLP(), head_name="fc"),
    ],
    ids=["random", "human", "kmeans", "maxl", "maxl.from_model"],
)
def test_strategies_reject_a_psi_list_for_the_mask(build: Callable[[object], AuxLabelGenerator]) -> None:
    with pytest.raises(TypeError, match=r"mask must be a HierarchyMask, got list; build one with HierarchyMask\(psi\)"):
        build([1])


def test_only_maxl_learns() -> None:
    assert MAXLGenerator.from_model(MASK, TinyMLP(in_features=4), head_name="fc").learns
    for build in TABLE_BUILDERS.values():
        assert not build().learns


def test_one_hot_has_the_aux_width_and_dtype() -> None:
    assert build_random().one_hot(torch.tensor([5, 0]), dtype=torch.float64).tolist() == [
        [0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0],
    ]


def test_a_subclass_of_a_registered_strategy_is_not_registered_under_its_parents_name() -> None:
    class MyRandom(RandomLabels):
        """Random labels under another class."""

    assert MyRandom.name is None and GENERATORS["random"] is RandomLabels
    table = MyRandom(MASK, num_samples=4)
    with pytest.raises(ValueError, match="the 'MyRandom' strategy assigns a fixed label per training sample"):
        table(torch.zeros(2, 4), torch.tensor([0, 1]))
