"""Auxiliary-loss weighting rules: constant, gradient cosine similarity, uncertainty, module-level (MAOAL)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from auxlab import AuxLabelGenerator, HierarchyMask, MetaAuxWrapper
from auxlab.engines import MetaProblem, gradients_at_theta, meta_loss_after
from auxlab.weighting import WEIGHTINGS, AuxWeighting, GradientCosineWeighting, ModuleWeighting, UncertaintyWeighting
from tests.helpers import TinyMLP, batch, flattened, multitask, snapshot


class SignLabels(AuxLabelGenerator):
    """Fixed labels without parameters: sub-class 1 of the block when x[:, 0] > 0, else sub-class 0."""

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        sub = (x[:, 0] > 0).long() % self.mask.sizes_of(y)
        return self.one_hot(self.mask.column(y, sub), dtype=x.dtype)


def make(weighting: str | AuxWeighting = "constant", *, psi: int = 2, seed: int = 0, **kwargs: object) -> MetaAuxWrapper:
    torch.manual_seed(seed)
    model = TinyMLP().double()
    return MetaAuxWrapper(model, num_classes=3, psi=psi, generator=SignLabels(HierarchyMask.uniform(3, psi)), weighting=weighting, seed=seed, **kwargs).double()  # type: ignore[arg-type]


def grads_of(wrapper: MetaAuxWrapper, loss: Tensor) -> dict[str, Tensor]:
    wrapper.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in wrapper.named_parameters() if p.grad is not None}


def separate_gradients(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``grad L_pri`` and ``grad L_aux`` by the wrapper's parameter names, computed by hand."""
    net = multitask(wrapper)
    primary, aux = net(x)
    targets = wrapper.aux_targets(x, y)
    l_pri = nn.functional.cross_entropy(primary, y)
    l_aux = -(targets * torch.log_softmax(aux, 1)).sum(1).mean()
    names, params = zip(*wrapper.named_parameters())
    g_pri = torch.autograd.grad(l_pri, params, retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(l_aux, params, allow_unused=True)
    zero = [torch.zeros_like(p) for p in params]
    return (
        {n: g if g is not None else z for n, g, z in zip(names, g_pri, zero)},
        {n: g if g is not None else z for n, g, z in zip(names, g_aux, zero)},
    )


def test_registry_names_every_rule() -> None:
    assert {"constant", "gcs", "uncertainty", "maoal"} <= set(WEIGHTINGS)


# ------------------------------------------------------------------------------------- GCS
def conflicting_wrapper(mode: str) -> tuple[MetaAuxWrapper, Tensor, Tensor]:
    """psi = 1 and an auxiliary head that is minus the primary head: the auxiliary task asks the
    features for the opposite of what the primary task asks, so the gradients conflict."""
    wrapper = make("gcs", psi=1, weighting_kwargs={"mode": mode})
    head = wrapper.model.fc
    assert wrapper.aux_head is not None
    with torch.no_grad():
        wrapper.aux_head.weight.copy_(-head.weight)
        wrapper.aux_head.bias.copy_(-head.bias)
    x, y = batch(12, dtype=torch.float64)
    return wrapper, x, y


def shared_cosine(g_pri: dict[str, Tensor], g_aux: dict[str, Tensor]) -> float:
    shared = ["model.hidden.weight", "model.hidden.bias"]
    a = torch.cat([g_pri[n].flatten() for n in shared])
    b = torch.cat([g_aux[n].flatten() for n in shared])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("mode", ["drop", "scale"])
def test_gcs_drops_a_conflicting_auxiliary_gradient_on_the_shared_layers(mode: str) -> None:
    wrapper, x, y = conflicting_wrapper(mode)
    g_pri, g_aux = separate_gradients(wrapper, x, y)
    cosine = shared_cosine(g_pri, g_aux)
    assert cosine < -0.5  # the toy really conflicts
    got = grads_of(wrapper, wrapper.loss(x, y))
    assert isinstance(wrapper.weighting, GradientCosineWeighting)
    assert wrapper.weighting.last_cosine == pytest.approx(cosine, abs=1e-12)
    for name in ("model.hidden.weight", "model.hidden.bias"):  # shared: the primary gradient alone
        torch.testing.assert_close(got[name], g_pri[name], rtol=1e-12, atol=1e-14)
    for name in ("aux_head.weight", "aux_head.bias"):  # the auxiliary head keeps its own gradient
        torch.testing.assert_close(got[name], g_aux[name], rtol=1e-12, atol=1e-14)
    for name in ("model.fc.weight", "model.fc.bias"):
        torch.testing.assert_close(got[name], g_pri[name], rtol=1e-12, atol=1e-14)
    constant = make("constant", psi=1)
    constant.load_state_dict(wrapper.state_dict())
    plain = grads_of(constant, constant.loss(x, y))
    assert not torch.allclose(plain["model.hidden.weight"], got["model.hidden.weight"])  # the rule changed something


def test_gcs_agreeing_gradients_drop_keeps_all_and_scale_weights_by_the_cosine() -> None:
    x, y = batch(12, dtype=torch.float64)
    for seed in range(20):  # find an initialisation where the two gradients agree
        drop = make("gcs", seed=seed)
        g_pri, g_aux = separate_gradients(drop, x, y)
        cosine = shared_cosine(g_pri, g_aux)
        if cosine > 0.05:
            break
    else:
        pytest.fail("no seed with agreeing gradients")
    constant = make("constant", seed=seed)
    got = grads_of(drop, drop.loss(x, y))
    plain = grads_of(constant, constant.loss(x, y))
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-10, atol=1e-13)
    scale = make("gcs", seed=seed, weighting_kwargs={"mode": "scale"})
    got = grads_of(scale, scale.loss(x, y))
    for name in ("model.hidden.weight", "model.hidden.bias"):
        torch.testing.assert_close(got[name], g_pri[name] + cosine * g_aux[name], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got["aux_head.weight"], g_aux["aux_head.weight"], rtol=1e-10, atol=1e-13)


def test_gcs_loss_value_is_the_unweighted_sum_and_step_matches_loss_backward() -> None:
    wrapper, x, y = conflicting_wrapper("drop")
    other = copy.deepcopy(wrapper)
    loss = wrapper.loss(x, y)
    primary_loss = nn.functional.cross_entropy(wrapper(x), y).detach()
    assert float(loss.detach()) > float(primary_loss)  # includes the auxiliary loss
    opt_a = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    opt_a.zero_grad()
    loss.backward()
    opt_a.step()
    opt_b = torch.optim.SGD(other.parameters(), lr=0.1)
    stepped = other.step(x, y, opt_b)
    assert float(stepped) == pytest.approx(float(loss.detach()), rel=1e-12)
    for (name, a), b in zip(wrapper.state_dict().items(), other.state_dict().values()):
        if isinstance(a, Tensor):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_gcs_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode='project' is not known"):
        GradientCosineWeighting("project")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- uncertainty
def test_uncertainty_weighting_is_the_kendall_loss_and_trains_with_the_model() -> None:
    wrapper = make("uncertainty")
    names = dict(wrapper.named_parameters())
    assert "weighting.log_variances" in names  # the user's optimizer trains it
    x, y = batch(10, dtype=torch.float64)
    constant = make("constant")
    assert float(wrapper.loss(x, y).detach()) == pytest.approx(float(constant.loss(x, y).detach()), rel=1e-12)  # s = 0: the constant rule
    assert isinstance(wrapper.weighting, UncertaintyWeighting)
    with torch.no_grad():
        wrapper.weighting.log_variances.copy_(torch.tensor([0.5, -1.0]))
    primary, aux = multitask(wrapper)(x)
    l_pri = nn.functional.cross_entropy(primary, y)
    l_aux = -(wrapper.aux_targets(x, y) * torch.log_softmax(aux, 1)).sum(1).mean()
    expected = torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * l_pri + 0.25 + torch.exp(torch.tensor(1.0, dtype=torch.float64)) * l_aux - 0.5
    assert float(wrapper.loss(x, y).detach()) == pytest.approx(float(expected), rel=1e-10)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = wrapper.weighting.log_variances.detach().clone()
    wrapper.step(x, y, opt)
    assert not torch.equal(before, wrapper.weighting.log_variances.detach())


def test_uncertainty_rejects_a_non_finite_start() -> None:
    with pytest.raises(TypeError, match="initial_log_variance must be a finite number"):
        UncertaintyWeighting(float("nan"))


# ------------------------------------------------------------------------------------- MAOAL
def test_maoal_default_modules_and_parameters() -> None:
    wrapper = make("maoal")
    assert isinstance(wrapper.weighting, ModuleWeighting)
    assert wrapper.weighting.module_names == ("hidden",)  # every top-level child but the head
    assert not any(name.startswith("weighting.") for name, _ in wrapper.named_parameters())  # meta-learned, not the user's
    assert "weighting.weights" in wrapper.state_dict()


def test_maoal_weights_of_one_reproduce_the_constant_weight_run() -> None:
    constant, maoal = make("constant"), make("maoal")
    opt_c = torch.optim.SGD(constant.parameters(), lr=0.1, momentum=0.9)
    opt_m = torch.optim.SGD(maoal.parameters(), lr=0.1, momentum=0.9)
    for step in range(6):
        x, y = batch(10, seed=step, dtype=torch.float64)
        loss_c = constant.loss(x, y)
        opt_c.zero_grad()
        loss_c.backward()
        opt_c.step()
        loss_m = maoal.loss(x, y)  # no meta step: the weights stay 1
        opt_m.zero_grad()
        loss_m.backward()
        opt_m.step()
        assert float(loss_m) == pytest.approx(float(loss_c), rel=1e-13)
    for name, p in constant.named_parameters():
        torch.testing.assert_close(dict(maoal.named_parameters())[name], p, rtol=1e-12, atol=1e-14)


def test_maoal_scales_the_auxiliary_gradient_per_module() -> None:
    wrapper = make("maoal")
    assert isinstance(wrapper.weighting, ModuleWeighting)
    with torch.no_grad():
        wrapper.weighting.weights.fill_(0.25)
    x, y = batch(10, dtype=torch.float64)
    g_pri, g_aux = separate_gradients(wrapper, x, y)
    got = grads_of(wrapper, wrapper.loss(x, y))
    torch.testing.assert_close(got["model.hidden.weight"], g_pri["model.hidden.weight"] + 0.25 * g_aux["model.hidden.weight"])
    torch.testing.assert_close(got["aux_head.weight"], g_aux["aux_head.weight"])  # outside every module: weight 1


def maoal_meta_loss(wrapper: MetaAuxWrapper, weights: Tensor, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor) -> Tensor:
    """The MAOAL meta objective as a function of the weights, written out by hand."""
    problem = MetaProblem(
        net=multitask(wrapper), x=x, y=y, targets=wrapper.aux_targets(x, y), x_meta=x_meta, y_meta=y_meta,
        inner_lr=wrapper.inner_lr, aux_weight=wrapper.aux_weight, focal_gamma=0.0,
    )
    at_theta = gradients_at_theta(problem)
    step = {}
    for name, gp in at_theta.primary_grads.items():
        ga = at_theta.aux_grads[name]
        scale = weights[0] if name.startswith("model.hidden.") else 1.0
        total = (gp if gp is not None else 0) + (scale * ga if ga is not None else 0)
        step[name] = total
    return meta_loss_after(problem, step)


def test_maoal_meta_step_follows_the_exact_hypergradient_and_changes_only_the_weights() -> None:
    wrapper = make("maoal", weighting_optimizer=lambda params: torch.optim.SGD(params, lr=1.0), inner_lr=0.5)
    assert isinstance(wrapper.weighting, ModuleWeighting)
    x, y = batch(10, dtype=torch.float64)
    x_meta, y_meta = batch(10, seed=5, dtype=torch.float64)
    eps = 1e-6
    w = wrapper.weighting.weights.detach().clone()
    numeric = (maoal_meta_loss(wrapper, w + eps, x, y, x_meta, y_meta) - maoal_meta_loss(wrapper, w - eps, x, y, x_meta, y_meta)) / (2 * eps)
    before = {k: v for k, v in snapshot(wrapper).items() if not k.startswith("weighting.")}
    wrapper.meta_step(x, y, x_meta, y_meta)
    after = {k: v for k, v in snapshot(wrapper).items() if not k.startswith("weighting.")}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    moved = w - wrapper.weighting.weights.detach()  # SGD lr 1: the step is the hypergradient
    assert float(numeric) != 0.0
    torch.testing.assert_close(moved, numeric.reshape(1), rtol=1e-6, atol=1e-12)
    assert wrapper.steps["meta"] == 1


def test_maoal_weights_are_clipped_at_zero() -> None:
    wrapper = make("maoal", weighting_optimizer=lambda params: torch.optim.SGD(params, lr=1e6), inner_lr=0.5)
    assert isinstance(wrapper.weighting, ModuleWeighting)
    x, y = batch(10, dtype=torch.float64)
    x_meta, y_meta = batch(10, seed=5, dtype=torch.float64)
    wrapper.meta_step(x, y, x_meta, y_meta)
    assert float(wrapper.weighting.weights.min()) >= 0.0


def test_maoal_weighting_optimizer_state_is_checkpointed() -> None:
    wrapper = make("maoal")
    x, y = batch(10, dtype=torch.float64)
    wrapper.meta_step(x, y, *batch(10, seed=3, dtype=torch.float64))
    state = wrapper.state_dict()
    assert state["_extra_state"]["meta_learner"]["optimizer"]["state"]  # Adam moments
    other = make("maoal", seed=1)
    other.load_state_dict(state)
    assert other.weighting_optimizer is not None
    assert other.weighting_optimizer.state_dict()["state"][0]["step"] == 1
    torch.testing.assert_close(other.weighting.weights, wrapper.weighting.weights)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modules": ["nope"]}, ValueError, r"modules entry 'nope' is not a submodule of the model"),
        ({"modules": "hidden"}, TypeError, r"modules must be a non-empty list of module names"),
        ({"modules": ["hidden", "hidden"]}, ValueError, r"modules lists a module twice"),
        ({"unknown": 1}, TypeError, r"could not build weighting='maoal' from weighting_kwargs"),
    ],
)
def test_maoal_bad_modules_are_named(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make("maoal", weighting_kwargs=kwargs)


# ------------------------------------------------------------------------------------- wrapper-level errors
def test_a_non_constant_weighting_needs_fixed_labels() -> None:
    with pytest.raises(ValueError, match="weighting='gcs' needs labels that do not learn, but generator='maxl'"):
        MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, weighting="gcs")
    with pytest.raises(ValueError, match="weighting='uncertainty' needs an auxiliary loss to weight"):
        MetaAuxWrapper(TinyMLP(), num_classes=3, generator="single", weighting="uncertainty")
    with pytest.raises(ValueError, match=r"weighting='equal' is not known; choose one of \['constant', 'gcs', 'maoal', 'uncertainty'"):
        make("equal")
    with pytest.raises(ValueError, match="weighting_kwargs is only for a weighting given by name"):
        make(GradientCosineWeighting(), weighting_kwargs={"mode": "drop"})


def test_nan_loss_under_gcs_raises_before_anything_changes() -> None:
    wrapper = make("gcs")
    x, y = batch(10, dtype=torch.float64)
    x[0, 0] = float("nan")
    before = snapshot(wrapper)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="non-finite loss at model step"):
        wrapper.step(x, y, opt)
    after = snapshot(wrapper)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_maoal_step_shares_its_work_and_equals_loss_meta_step_backward() -> None:
    """``step`` computes the gradients at theta once for the model step and the weights' meta step;
    it must equal loss(), then meta_step(), then backward and optimizer.step (same theta and weights)."""
    sgd = {"weighting_optimizer": lambda params: torch.optim.SGD(params, lr=5.0), "inner_lr": 0.5}
    fused, plain = make("maoal", **sgd), make("maoal", **sgd)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x, y = batch(10, seed=step, dtype=torch.float64)
        x_meta, y_meta = batch(10, seed=100 + step, dtype=torch.float64)
        loss_f = fused.step(x, y, opt_f, x_meta=x_meta, y_meta=y_meta, max_grad_norm=0.2)
        loss_p = plain.loss(x, y)
        plain.meta_step(x, y, x_meta, y_meta)
        opt_p.zero_grad()
        loss_p.backward()
        assert torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.2) > 0.2  # the clipping acts
        opt_p.step()
        assert float(loss_f) == pytest.approx(float(loss_p.detach()), rel=1e-12)
    assert fused.steps == plain.steps == {"model": 4, "meta": 4}
    assert isinstance(fused.weighting, ModuleWeighting)
    assert not torch.allclose(fused.weighting.weights, torch.ones(1, dtype=torch.float64))  # the weights moved
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        if isinstance(a, Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


def _flat_field(wrapper: MetaAuxWrapper, weights: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]], Callable[[Tensor], Tensor]]:
    """MAOAL's reweighted update direction ``G(theta) = g_pri + scale * g_aux`` as a function of the flattened
    parameters (the weights fixed), for a dense reference: ``(theta flattened, unflatten, G)``."""
    net = multitask(wrapper)
    flat, unflatten = flattened({name: p for name, p in net.named_parameters() if p.requires_grad})
    targets = wrapper.aux_targets(x, y)

    def field(vector: Tensor) -> Tensor:
        params = unflatten(vector)
        primary, aux = torch.func.functional_call(net, params, (x,))
        l_pri = nn.functional.cross_entropy(primary, y)
        l_aux = -(targets * torch.log_softmax(aux, 1)).sum(1).mean()
        g_pri = torch.autograd.grad(l_pri, list(params.values()), create_graph=True, allow_unused=True)
        g_aux = torch.autograd.grad(l_aux, list(params.values()), create_graph=True, allow_unused=True)
        parts = []
        for name, gp, ga, p in zip(params, g_pri, g_aux, params.values()):
            scale = weights[0] if name.startswith("model.hidden.") else 1.0
            parts.append((gp if gp is not None else torch.zeros_like(p)) + scale * wrapper.aux_weight * (ga if ga is not None else torch.zeros_like(p)))
        return torch.cat([t.reshape(-1) for t in parts])

    return flat, unflatten, field


@pytest.mark.parametrize("terms", [0, 4])
def test_maoal_with_the_implicit_engine_follows_the_neumann_series_of_its_reweighted_jacobian(terms: int) -> None:
    from auxlab.engines import ImplicitEngine

    inner_lr = 0.3
    wrapper = make("maoal", weighting_optimizer=lambda params: torch.optim.SGD(params, lr=1.0), inner_lr=inner_lr, engine=ImplicitEngine(terms=terms))
    assert isinstance(wrapper.weighting, ModuleWeighting)
    with torch.no_grad():
        wrapper.weighting.weights.fill_(0.3)  # not 1: the reweighted field is then not the training loss's gradient
    x, y = batch(10, dtype=torch.float64)
    x_meta, y_meta = batch(10, seed=5, dtype=torch.float64)
    w = wrapper.weighting.weights.detach().clone()
    flat, unflatten, field = _flat_field(wrapper, w, x, y)
    moved_flat = flat - inner_lr * field(flat.clone().requires_grad_()).detach()

    def meta(vector: Tensor) -> Tensor:
        primary, _ = torch.func.functional_call(multitask(wrapper), unflatten(vector), (x_meta,), {"with_aux": False})
        return nn.functional.cross_entropy(primary, y_meta)

    u = torch.func.grad(meta)(moved_flat.detach())
    jacobian = torch.autograd.functional.jacobian(field, flat.detach())  # J[i, j] = dG_i / dtheta_j
    term, p = u.clone(), u.clone()
    for _ in range(terms):
        term = term - inner_lr * (jacobian.T @ term)
        p = p + term
    weights = w.clone().requires_grad_()  # d/dw [G(theta, w) . p]: G depends on w through the hidden layer's scale
    grad_w = torch.autograd.grad((_flat_field(wrapper, weights, x, y)[2](flat.clone().requires_grad_()) * p).sum(), weights)[0]
    expected = -inner_lr * grad_w
    wrapper.meta_step(x, y, x_meta, y_meta)
    torch.testing.assert_close(w - wrapper.weighting.weights.detach(), expected, rtol=1e-8, atol=1e-12)
    if terms == 0:  # the one-step path gives the same update
        one_step = make("maoal", weighting_optimizer=lambda params: torch.optim.SGD(params, lr=1.0), inner_lr=inner_lr)
        with torch.no_grad():
            one_step.weighting.weights.fill_(0.3)
        one_step.meta_step(x, y, x_meta, y_meta)
        torch.testing.assert_close(one_step.weighting.weights, wrapper.weighting.weights, rtol=1e-10, atol=1e-14)


def test_maoal_refuses_conjugate_gradient_and_a_scaler_with_the_implicit_engine() -> None:
    from auxlab.engines import ImplicitEngine

    with pytest.raises(ValueError, match="conjugate gradient needs a symmetric Hessian"):
        make("maoal", engine=ImplicitEngine(solver="cg"))
    wrapper = make("maoal", engine="implicit")
    x, y = batch(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="scaler= is not supported by weighting='maoal' with engine='implicit'"):
        wrapper.step(x, y, torch.optim.SGD(wrapper.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu"))
