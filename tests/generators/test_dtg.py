"""DTG-AuxL (``generator="dtg"``): generated auxiliary data and labels, learned through the primary task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TinyBNNet, TinyMLP
from torch import Tensor, nn
from torch.func import functional_call

from auxlab import HierarchyMask, MetaAuxWrapper
from auxlab.engines import ImplicitEngine, get_engine
from auxlab.generators import JointDataTaskGenerator
from auxlab.losses import model_step_losses

NUM_CLASSES, PSI, B = 3, 2, 9


def _batch(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, x_meta = torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randn(B, 6, generator=g, dtype=torch.float64)
    y, y_meta = torch.arange(B) % NUM_CLASSES, torch.randint(0, NUM_CLASSES, (B,), generator=g)
    return x, y, x_meta, y_meta


def _wrapper(engine: object = "jvp", *, lr: float = 1.0, instance_weight: float = 0.0, entropy_weight: float = 0.0, model: nn.Module | None = None) -> MetaAuxWrapper:
    torch.manual_seed(0)
    model = (model or TinyMLP()).double()
    wrapper = MetaAuxWrapper(
        model, num_classes=NUM_CLASSES, psi=PSI, generator="dtg", engine=engine, inner_lr=0.3, aux_weight=0.7, entropy_weight=entropy_weight,
        generator_kwargs={"instance_weight": instance_weight}, generator_optimizer=lambda p: torch.optim.SGD(p, lr=lr),
    )
    generator = wrapper.generator
    assert isinstance(generator, JointDataTaskGenerator)
    with torch.no_grad():  # move the feature generator off its zero start, so that every path carries a gradient
        for p in generator.feature_generator.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return wrapper


def _exact_one_step_gradient(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor) -> list[Tensor]:
    """d/dphi L_pri(theta'(phi); x_meta) with theta' = theta - inner_lr * grad_theta [L_pri + aux_weight * L_aux](theta, phi),
    by automatic differentiation through the virtual step (a second-order graph)."""
    generator = wrapper.generator
    assert isinstance(generator, JointDataTaskGenerator)
    model, aux_head = wrapper.model, wrapper.aux_head
    assert aux_head is not None
    phi = {name: p.detach().clone().requires_grad_() for name, p in generator.named_parameters()}
    theta = {name: p.detach().clone().requires_grad_() for name, p in [*(("model." + n, p) for n, p in model.named_parameters()),
                                                                       *(("aux_head." + n, p) for n, p in aux_head.named_parameters())]}

    def features(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return torch.tanh(inputs @ params["model.hidden.weight"].T + params["model.hidden.bias"])

    h = features(theta, x)
    targets = functional_call(generator, phi, (h.detach(), y))
    fg = {name.removeprefix("feature_generator."): p for name, p in phi.items() if name.startswith("feature_generator.")}
    h_aux = h + functional_call(generator.feature_generator, fg, (h,))
    aux = h_aux @ theta["aux_head.weight"].T + theta["aux_head.bias"]
    primary = h @ theta["model.fc.weight"].T + theta["model.fc.bias"]
    primary_loss, aux_loss = model_step_losses(primary, y, aux, targets, focal_gamma=0.0)
    grads = torch.autograd.grad(primary_loss + wrapper.aux_weight * aux_loss, list(theta.values()), create_graph=True)
    moved = {name: p - wrapper.inner_lr * g for (name, p), g in zip(theta.items(), grads)}
    meta = nn.functional.cross_entropy(features(moved, x_meta) @ moved["model.fc.weight"].T + moved["model.fc.bias"], y_meta)
    return list(torch.autograd.grad(meta, list(phi.values())))


def _meta_gradient(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor) -> list[Tensor]:
    """The gradient the meta step applied: ``-(phi after - phi before)`` under SGD with lr 1."""
    assert wrapper.generator is not None
    before = [p.detach().clone() for p in wrapper.generator.parameters()]
    wrapper.meta_step(x, y, x_meta, y_meta)
    return [b - p.detach() for b, p in zip(before, wrapper.generator.parameters())]


def test_the_one_step_hypergradient_through_data_and_labels_is_exact() -> None:
    x, y, x_meta, y_meta = _batch()
    wrapper = _wrapper("jvp")
    expected = _exact_one_step_gradient(wrapper, x, y, x_meta, y_meta)
    got = _meta_gradient(wrapper, x, y, x_meta, y_meta)
    assert any(float(e.abs().max()) > 1e-4 for e in expected)  # both generators receive a gradient
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_the_implicit_engine_with_no_extra_term_is_the_one_step_hypergradient_and_more_terms_change_it() -> None:
    x, y, x_meta, y_meta = _batch(1)
    one_step = _meta_gradient(_wrapper("jvp"), x, y, x_meta, y_meta)
    zero_terms = _meta_gradient(_wrapper(ImplicitEngine(terms=0)), x, y, x_meta, y_meta)
    three_terms = _meta_gradient(_wrapper("implicit"), x, y, x_meta, y_meta)
    for a, b in zip(one_step, zero_terms):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max(float((a - c).abs().max()) for a, c in zip(one_step, three_terms)) > 1e-8


def test_step_equals_loss_then_meta_step() -> None:
    x, y, x_meta, y_meta = _batch(2)
    fused, apart = _wrapper("implicit", lr=0.1, instance_weight=0.5, entropy_weight=0.2), _wrapper("implicit", lr=0.1, instance_weight=0.5, entropy_weight=0.2)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_apart = torch.optim.SGD(apart.parameters(), lr=0.1)
    for _ in range(2):
        fused.step(x, y, opt_fused, x_meta=x_meta, y_meta=y_meta)
        loss = apart.loss(x, y)
        apart.meta_step(x, y, x_meta, y_meta)
        opt_apart.zero_grad()
        loss.backward()
        opt_apart.step()
    for (name, a), b in zip(fused.state_dict().items(), apart.state_dict().values()):
        if isinstance(a, Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_the_model_step_trains_the_auxiliary_head_on_generated_data_and_leaves_the_generator_alone() -> None:
    x, y, _, _ = _batch(3)
    wrapper = _wrapper()
    generator = wrapper.generator
    assert isinstance(generator, JointDataTaskGenerator)
    wrapper.loss(x, y).backward()
    assert all(p.grad is None for p in generator.parameters())
    assert wrapper.aux_head is not None and wrapper.aux_head.weight.grad is not None
    before = float(wrapper.loss(x, y).detach())
    with torch.no_grad():
        generator.feature_generator[2].bias.add_(1.0)  # type: ignore[operator]
    assert float(wrapper.loss(x, y).detach()) != pytest.approx(before)  # the auxiliary head reads h + G_f(h)


def test_the_generated_data_starts_as_the_primary_data() -> None:
    model = TinyMLP()
    generator = JointDataTaskGenerator(HierarchyMask([PSI] * NUM_CLASSES), model=model, head_name="fc")
    h = generator.features(torch.randn(5, 6))
    torch.testing.assert_close(generator.auxiliary_features(h), h)
    assert float(generator.instance_loss(h).detach()) == 0.0
    targets = generator(h, torch.arange(5) % NUM_CLASSES)
    assert targets.shape == (5, NUM_CLASSES * PSI)
    torch.testing.assert_close(targets.sum(1), torch.ones(5))


def test_the_instance_regularisation_pulls_the_generated_data_back_to_its_sample() -> None:
    x, y, _, _ = _batch(4)
    wrapper = _wrapper("jvp", lr=0.05, instance_weight=10.0)
    wrapper.inner_lr = 1e-9  # the primary hypergradient switched off: only the explicit term moves G_f
    generator = wrapper.generator
    assert isinstance(generator, JointDataTaskGenerator)
    h = generator.features(x)
    start = float(generator.instance_loss(h))
    for _ in range(20):
        wrapper.meta_step(x, y)
    assert float(generator.instance_loss(h)) < 0.5 * start


def test_batchnorm_statistics_move_once_per_model_step_and_never_in_the_meta_step() -> None:
    x, y, x_meta, y_meta = _batch(5)
    wrapper = _wrapper("implicit", model=TinyBNNet())
    stats = [b.clone() for b in wrapper.model.buffers()]
    wrapper.meta_step(x, y, x_meta, y_meta)
    assert all(torch.equal(a, b) for a, b in zip(stats, wrapper.model.buffers()))
    wrapper.step(x, y, torch.optim.SGD(wrapper.parameters(), lr=0.1))
    assert not torch.equal(stats[0], next(iter(wrapper.model.buffers())))


@pytest.mark.parametrize("engine", ["functional", "higher"])
def test_an_engine_without_a_horizon_is_refused(engine: str) -> None:
    with pytest.raises(ValueError, match=r"generator='dtg'.*'implicit'.*engine='" + engine):
        MetaAuxWrapper(TinyMLP(), num_classes=NUM_CLASSES, psi=PSI, generator="dtg", engine=get_engine(engine))


@pytest.mark.parametrize(("kwargs", "match"), [({"instance_weight": -1.0}, "instance_weight"), ({"temperature": 0.0}, "temperature"), ({"hidden": 0}, "hidden")])
def test_bad_arguments_name_themselves(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetaAuxWrapper(TinyMLP(), num_classes=NUM_CLASSES, psi=PSI, generator="dtg", generator_kwargs=kwargs)


def test_features_of_the_wrong_width_are_refused() -> None:
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=NUM_CLASSES, psi=PSI, generator="dtg")
    generator = wrapper.generator
    assert isinstance(generator, JointDataTaskGenerator)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        generator(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))


def test_a_learner_that_does_not_differentiate_through_generated_data_is_refused() -> None:
    from auxlab.learners import HypergradientLearner

    class OneStepOnly(JointDataTaskGenerator):
        learner = HypergradientLearner

    generator = OneStepOnly(HierarchyMask([PSI] * NUM_CLASSES), model=TinyMLP(), head_name="fc")
    with pytest.raises(ValueError, match="generates the auxiliary head's data with HypergradientLearner"):
        MetaAuxWrapper(generator.classifier, num_classes=NUM_CLASSES, psi=PSI, generator=generator)


def test_a_checkpoint_resumes_training_exactly(tmp_path: Path) -> None:
    from auxlab.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "dtg.pt"
    x, y, x_meta, y_meta = _batch(6)
    first = _wrapper("implicit", lr=0.01, instance_weight=0.5, entropy_weight=0.2)
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    first.step(x, y, optimizer, x_meta=x_meta, y_meta=y_meta)
    save_checkpoint(path, first, optimizer=optimizer, step=1)
    resumed = _wrapper("implicit", lr=0.01, instance_weight=0.5, entropy_weight=0.2)
    with torch.no_grad():  # a different start, overwritten by the checkpoint
        for p in resumed.parameters():
            p.add_(1.0)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    assert load_checkpoint(path, resumed, optimizer=resumed_optimizer) == {"step": 1}
    for wrapper, opt in ((first, optimizer), (resumed, resumed_optimizer)):
        wrapper.step(x, y, opt, x_meta=x_meta, y_meta=y_meta)
    for (name, a), b in zip(first.state_dict().items(), resumed.state_dict().values()):
        if isinstance(a, Tensor):
            assert torch.equal(a, b), name


def test_a_non_finite_batch_is_refused_before_anything_changes() -> None:
    x, y, _, _ = _batch(7)
    wrapper = _wrapper("implicit")
    before = {k: v.clone() for k, v in wrapper.state_dict().items() if isinstance(v, Tensor)}
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        wrapper.step(bad, y, torch.optim.SGD(wrapper.parameters(), lr=0.1))
    assert all(torch.equal(before[k], v) for k, v in wrapper.state_dict().items() if isinstance(v, Tensor))
    assert wrapper.steps == {"model": 0, "meta": 0}
