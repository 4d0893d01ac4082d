"""A meta-learned strategy written outside the package: one strategy class, one learner class, a
registry entry, and nothing in the wrapper. It trains through ``meta_step`` and ``step``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
import torch
from helpers import TinyCNN, image_batch, snapshot
from torch import Tensor, nn

from auxlab import AuxLabelGenerator, HierarchyMask, MetaAuxWrapper
from auxlab.context import Batch, StepContext
from auxlab.generators import GENERATORS
from auxlab.learners import HypergradientLearner, MetaLearner, MetaUpdate


class PrimaryOnlyLearner(MetaLearner):
    """A learner of our own: the hypergradient of the meta loss through the wrapper's engine, with no
    entropy term (MAXL's objective without its regulariser), stepped by Adam unless told otherwise."""

    @staticmethod
    def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-3)

    def update(self, ctx: StepContext, batch: Batch) -> MetaUpdate | None:
        targets, buffers = ctx.targets(batch.x, batch.y, batch.index)
        meta_loss = ctx.engine.meta_loss(ctx.problem(batch, targets))
        return self.gradient(ctx, meta_loss, {"meta loss": meta_loss}, buffers=buffers)


@pytest.fixture
def table_labels() -> Iterator[type[AuxLabelGenerator]]:
    """A strategy with one learned score per auxiliary class, registered as "test-table" for the test only."""

    class TableLabels(AuxLabelGenerator, name="test-table"):
        learner = PrimaryOnlyLearner

        def __init__(self, mask: HierarchyMask) -> None:
            super().__init__(mask)
            self.scores = nn.Parameter(torch.linspace(-0.5, 0.5, mask.num_aux_classes))

        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.mask.softmax(self.scores.expand(y.shape[0], -1), y)

    try:
        yield TableLabels
    finally:
        del GENERATORS["test-table"]


def test_a_strategy_with_its_own_learner_trains_through_every_path(table_labels: type[AuxLabelGenerator]) -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator="test-table", engine="jvp", inner_lr=0.5)
    assert isinstance(wrapper.generator, table_labels) and isinstance(wrapper.meta_learner, PrimaryOnlyLearner)
    assert wrapper.generator_optimizer is wrapper.meta_learner.optimizer  # the learner's default_optimizer, Adam
    assert isinstance(wrapper.generator_optimizer, torch.optim.Adam)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.05)
    assert all(p is not wrapper.generator.scores for p in wrapper.parameters())  # the user's optimizer never steps it
    x, y = image_batch(32)
    scores = wrapper.generator.scores.detach().clone()

    objective = wrapper.meta_step(x, y)
    assert objective is not None and not torch.equal(wrapper.generator.scores, scores)
    for _ in range(5):
        wrapper.step(x, y, optimizer)
    assert wrapper.steps == {"model": 5, "meta": 6} and wrapper.last_meta_objective is not None

    # the optimizer state is the learner's and travels in the wrapper's state
    state = wrapper.state_dict()
    assert state["_extra_state"]["meta_learner"]["optimizer"]["state"]
    torch.manual_seed(1)
    other = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=3, generator="test-table", engine="jvp", inner_lr=0.5)
    other.load_state_dict(state)
    assert other.generator_optimizer is not None
    assert other.generator_optimizer.state_dict()["state"][0]["step"] == 6
    before = snapshot(other)
    other.step(x, y, torch.optim.SGD(other.parameters(), lr=0.05))
    assert not torch.equal(before["generator.scores"], other.generator.scores)


def test_the_learner_equals_maxls_learner_without_the_entropy_term(table_labels: type[AuxLabelGenerator]) -> None:
    class MAXLTable(table_labels):  # type: ignore[misc,valid-type]  # the same labels learnt by MAXL's learner; not registered
        learner = HypergradientLearner

    x, y = image_batch(16, seed=3)
    grads = {}
    for strategy in (table_labels, MAXLTable):
        torch.manual_seed(0)
        wrapper = MetaAuxWrapper(
            TinyCNN(), num_classes=10, psi=3, generator=strategy(HierarchyMask.uniform(10, 3)), entropy_weight=0.0,
            generator_optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
        )
        assert type(wrapper.meta_learner) is strategy.learner
        wrapper.meta_step(x, y)
        grads[strategy] = wrapper.generator.scores.grad.clone()  # type: ignore[union-attr]
    assert grads[table_labels].abs().max() > 0
    torch.testing.assert_close(grads[table_labels], grads[MAXLTable], rtol=0, atol=0)
