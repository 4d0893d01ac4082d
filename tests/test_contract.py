"""The contract every registered strategy and weighting keeps, discovered from the registries.

For each pair of a label strategy (:data:`auxlab.generators.GENERATORS`, and ``"single"``) and a
weighting (:data:`auxlab.weighting.WEIGHTINGS`), built only from what the classes declare (their
``kwargs_from_data``): the wrapper either refuses the pair with a clear error when it is built, or
it trains through every public path (``loss`` + ``meta_step``, and ``step``), round-trips its
``state_dict`` into a fresh wrapper that then trains identically, and refuses a bad batch with
nothing changed. A strategy registered later joins the table with no edit here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyCNN, snapshot
from torch import Tensor
from torch.utils.data import TensorDataset

from auxlab import MetaAuxWrapper
from auxlab.data import TrainingData
from auxlab.generators import GENERATORS
from auxlab.weighting import WEIGHTINGS

NUM_CLASSES, PSI, SAMPLES = 3, 4, 12
FINE_TO_COARSE = [c for c in range(NUM_CLASSES) for _ in range(PSI)]
PAIRS = [(g, w) for g in ["single", *sorted(GENERATORS)] for w in sorted(WEIGHTINGS)]


def _data() -> tuple[Tensor, Tensor, TrainingData]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(SAMPLES, 1, 8, 8, generator=g)
    labels = torch.arange(SAMPLES) % NUM_CLASSES
    fine = labels * PSI + torch.randint(0, PSI, (SAMPLES,), generator=g)
    return images, labels, TrainingData(TensorDataset(images, labels), fine_labels=fine, fine_to_coarse=FINE_TO_COARSE)


def _build(generator: str, weighting: str, *, seed: int) -> MetaAuxWrapper:
    *_, data = _data()
    kwargs: dict[str, Any] = {} if generator == "single" else GENERATORS[generator].kwargs_from_data(data)
    torch.manual_seed(seed)
    return MetaAuxWrapper(
        TinyCNN(num_classes=NUM_CLASSES), num_classes=NUM_CLASSES, psi=PSI, generator=generator, generator_kwargs=kwargs,
        weighting=weighting, seed=seed, generator_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), inner_lr=0.1,
    )


def _train(wrapper: MetaAuxWrapper, optimizer: torch.optim.Optimizer, calls: int = 2) -> None:
    images, labels, _ = _data()
    index = torch.arange(SAMPLES)
    x_meta, y_meta = images.flip(0), labels.flip(0)
    for _ in range(calls):
        wrapper.step(images, labels, optimizer, index=index, x_meta=x_meta, y_meta=y_meta)


@pytest.mark.parametrize(("generator", "weighting"), PAIRS, ids=[f"{g}+{w}" for g, w in PAIRS])
def test_every_registered_pair_trains_round_trips_and_refuses_bad_input(generator: str, weighting: str) -> None:
    try:
        wrapper = _build(generator, weighting, seed=0)
    except ValueError as error:  # a pair the declarations rule out: refused when built, saying why
        assert f"weighting={weighting!r}" in str(error) or f"generator={generator!r}" in str(error), str(error)
        assert weighting != "constant", f"generator={generator!r} must work with the constant weighting"
        return
    images, labels, _ = _data()
    index = torch.arange(SAMPLES)
    learner = wrapper.meta_learner
    learner_before = [p.detach().clone() for p in learner.params] if learner is not None else []
    assert learner is None or (learner.params and learner.optimizer is not None)

    # loss + meta_step: the model's parameters move by the user's optimizer, the learner's by the meta step
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = snapshot(wrapper)
    loss = wrapper.loss(images, labels, index=index)
    assert loss.shape == () and torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    objective = wrapper.meta_step(images, labels, images.flip(0), labels.flip(0), index=index)
    assert (objective is not None) == (learner is not None)
    after = snapshot(wrapper)
    assert not torch.equal(before["model.classifier.weight"], after["model.classifier.weight"])
    if learner is not None:
        # (a bias right before a BatchNorm has no gradient: one moved parameter is asked, not all)
        assert any(not torch.equal(b, p) for b, p in zip(learner_before, learner.params)), "the meta step trained nothing"

    # step, then a state_dict round trip into a fresh wrapper that trains identically from there
    _train(wrapper, optimizer)
    assert wrapper.steps["model"] == 3 and wrapper.steps["meta"] == (3 if wrapper.meta_learner is not None else 0)
    fresh = _build(generator, weighting, seed=1)
    fresh.load_state_dict(wrapper.state_dict())
    assert fresh.steps == wrapper.steps
    for one in (wrapper, fresh):
        _train(one, torch.optim.SGD(one.parameters(), lr=0.1), calls=1)
    assert snapshot(fresh).keys() == snapshot(wrapper).keys()
    for key, value in snapshot(wrapper).items():
        assert torch.equal(value, snapshot(fresh)[key]), key

    # a bad batch is refused, naming the argument, and changes nothing, the counters included
    before, steps = snapshot(wrapper), dict(wrapper.steps)
    bad = labels.clone()
    bad[0] = NUM_CLASSES
    with pytest.raises(ValueError, match=rf"y has label {NUM_CLASSES} but num_classes={NUM_CLASSES}"):
        wrapper.step(images, bad, optimizer, index=index)
    with pytest.raises(ValueError, match="x has batch size"):
        wrapper.meta_step(images[:5], labels, index=index)
    after = snapshot(wrapper)
    assert all(torch.equal(before[k], after[k]) for k in before) and wrapper.steps == steps


def test_the_table_covers_every_registered_strategy_and_weighting() -> None:
    assert {g for g, _ in PAIRS} == {"single", *GENERATORS} and {w for _, w in PAIRS} == set(WEIGHTINGS)
    assert {"maxl", "maxl-light", "random", "kmeans", "human", "rl", "sla"} <= set(GENERATORS)


@pytest.mark.parametrize("generator", ["maxl", "maxl-balanced", "maxl-light", "rl", "random", "single"])
def test_a_model_that_is_its_own_head_works(generator: str) -> None:
    """``nn.Linear`` alone is a classifier: its head is the whole model (issue 15, defect 6)."""
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    kwargs = {"num_samples": 8} if generator == "random" else None
    wrapper = MetaAuxWrapper(torch.nn.Linear(4, 3), num_classes=3, psi=2, generator=generator, generator_kwargs=kwargs)
    assert wrapper.head_name == ""
    before = snapshot(wrapper)
    wrapper.step(x, y, torch.optim.SGD(wrapper.parameters(), lr=0.1), index=torch.arange(8))
    assert not torch.equal(before["model.weight"], wrapper.model.weight)
    if wrapper.meta_learner is not None:
        assert any(not torch.equal(before[f"generator.{n}"], p) for n, p in wrapper.generator.named_parameters())  # type: ignore[union-attr]
