"""The label-collapse diagnostic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from auxlab import AuxLabelGenerator, MetaAuxWrapper
from auxlab.datasets import ImageDataset
from auxlab.experiments import SmallCNN, collapse_diagnostic
from auxlab.generators import PolicyLabels
from auxlab.hierarchy import HierarchyMask
from tests.helpers import assert_unchanged, snapshot


class _OneSubclass(AuxLabelGenerator):
    """Every sample of class c takes sub-class 0 of block c: total collapse."""

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        return self.one_hot(self.mask.column(y, torch.zeros_like(y)))


class _RoundRobin(AuxLabelGenerator):
    """Sample i takes sub-class i mod psi[y]: every sub-class used equally."""

    needs_index = True

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        assert index is not None
        return self.one_hot(self.mask.column(y, index % self.mask.sizes_of(y)))


def test_collapse_diagnostic_definition() -> None:
    # 30 consecutive samples per class, so that index mod psi spreads each class evenly.
    data = ImageDataset(torch.rand(300, 1, 8, 8), torch.arange(300) // 30, tuple("abcdefghij"))
    mask = HierarchyMask([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    probe = torch.arange(300)
    collapsed = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, mask=mask, generator=_OneSubclass(mask))
    stats, distribution = collapse_diagnostic(collapsed, data, probe, batch_size=64, device=torch.device("cpu"))
    assert stats["subclasses_used"] == [1] * 10
    assert stats["subclass_entropy"] == [0.0] * 10
    assert all(share[0] == 1.0 and sum(share) == 1.0 for share in stats["subclass_share"])
    assert stats["target_confidence"] == [1.0] * 10 and stats["subclass_soft_share"] == stats["subclass_share"]
    assert distribution.shape == (300, mask.num_aux_classes)
    assert stats["confidence"] == 1.0 and stats["used_fraction"] == 10 / mask.num_aux_classes and "fine_nmi" not in stats

    spread = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, mask=mask, generator=_RoundRobin(mask))
    stats, _ = collapse_diagnostic(spread, data, probe, batch_size=64, device=torch.device("cpu"))
    assert stats["subclasses_used"] == list(mask.psi)
    for c, entropy in enumerate(stats["subclass_entropy"]):
        assert entropy == pytest.approx(math.log(mask.psi[c]), abs=0.05)


def test_collapse_diagnostic_of_a_policy_reads_its_probabilities_and_draws_nothing() -> None:
    data = ImageDataset(torch.rand(60, 1, 8, 8), torch.arange(60) // 6, tuple("abcdefghij"))
    probe = torch.arange(60)
    wrapper = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, psi=3, generator="rl", seed=0)
    assert isinstance(wrapper.generator, PolicyLabels)
    wrapper.aux_targets(data.images[:4], data.labels[:4])  # one draw: the policy's random stream exists
    rng_before = wrapper.generator.get_extra_state()["rng"]
    # one batch of 60, so that the features below see the same BatchNorm batch statistics
    stats, _ = collapse_diagnostic(wrapper, data, probe, batch_size=60, device=torch.device("cpu"))
    assert torch.equal(wrapper.generator.get_extra_state()["rng"][1], rng_before[1])
    x, y = data.images, data.labels
    with torch.no_grad():
        probs = wrapper.generator.policy(wrapper.generator.features(x), y)[0].double()
    for c in range(10):
        block = probs[y == c][:, 3 * c : 3 * c + 3]
        assert stats["target_confidence"][c] == pytest.approx(float(block.max(1).values.mean()), abs=1e-9)
        assert stats["subclass_soft_share"][c] == pytest.approx(block.mean(0).tolist(), abs=1e-9)
    assert max(stats["target_confidence"]) < 0.9  # an untrained policy is far from one-hot draws



@pytest.mark.parametrize("generator", ["maxl", "maxl-light"])
def test_the_diagnostic_reads_the_targets_and_leaves_the_run_as_it_was(generator: str) -> None:
    # the distribution is what wrapper.aux_targets gives, on what the generator reads (x, or the classifier's features).
    data = ImageDataset(torch.rand(60, 1, 8, 8), torch.arange(60) // 6, tuple("abcdefghij"))
    wrapper = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, psi=3, generator=generator, seed=0)
    wrapper.train()  # BatchNorm in training mode, as the runner measures
    assert wrapper.generator is not None and wrapper.generator.reads_features == (generator == "maxl-light")
    before = snapshot(wrapper)
    distribution = wrapper.aux_targets(data.images, data.labels, distribution=True)
    assert_unchanged(wrapper, before)  # maxl's BatchNorm statistics, the classifier's, the rng states
    assert torch.equal(distribution, wrapper.aux_targets(data.images, data.labels))
    _, probe_distribution = collapse_diagnostic(wrapper, data, torch.arange(60), batch_size=60, device=torch.device("cpu"))
    assert_unchanged(wrapper, before)
    assert torch.equal(probe_distribution, distribution.double())


def test_a_single_task_wrapper_has_no_diagnostic() -> None:
    data = ImageDataset(torch.rand(20, 1, 8, 8), torch.arange(20) // 2, tuple("abcdefghij"))
    wrapper = MetaAuxWrapper(SmallCNN(width=4), num_classes=10, psi=2, generator="single")
    with pytest.raises(ValueError, match="generator='single' trains without auxiliary labels"):
        collapse_diagnostic(wrapper, data, torch.arange(20), batch_size=20, device=torch.device("cpu"))
