"""The implicit-function engine (issue 17): its first term is MAXL's one-step hypergradient, and with more Neumann
terms it converges to the exact implicit hypergradient where the lower level can be solved exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import TinyBNNet, batch, flattened, multitask
from test_engines import INNER_LR, NUM_CLASSES, PSI, engine_hypergradient, make_wrapper, max_difference
from torch import Tensor, nn

from auxlab import MetaAuxWrapper
from auxlab.engines import ENGINES, ImplicitEngine, MetaProblem


def test_with_no_extra_term_it_is_the_one_step_hypergradient() -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    jvp = engine_hypergradient(make_wrapper(TinyBNNet, "jvp"), x, y)
    implicit = engine_hypergradient(make_wrapper(TinyBNNet, ImplicitEngine(terms=0)), x, y)  # type: ignore[arg-type]
    assert max_difference(jvp, implicit) == 0.0
    more = engine_hypergradient(make_wrapper(TinyBNNet, ImplicitEngine(terms=3)), x, y)  # type: ignore[arg-type]
    assert max_difference(jvp, more) > 1e-6  # further terms change it


def _solved_problem(num_samples: int = 100, features: int = 6, num_classes: int = 3) -> tuple[MetaProblem, MetaAuxWrapper]:
    """A one-hidden-layer classifier and its auxiliary head (sharing the hidden layer, so that the targets reach
    the primary task) at a minimiser of the training loss for fixed soft targets (L-BFGS), in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)  # random labels: no separation, a finite minimum
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, 4), nn.Tanh(), nn.Linear(4, num_classes)).double()
    wrapper = MetaAuxWrapper(model, num_classes=num_classes, psi=2, inner_lr=0.1)
    targets = wrapper.aux_targets(x, y).detach().requires_grad_()
    x_meta = torch.randn(num_samples, features, generator=g, dtype=torch.float64)
    y_meta = torch.randint(0, num_classes, (num_samples,), generator=g)
    problem = MetaProblem(net=multitask(wrapper), x=x, y=y, targets=targets, x_meta=x_meta, y_meta=y_meta,
                          inner_lr=wrapper.inner_lr, aux_weight=1.0, focal_gamma=0.0)
    params = list(problem.parameters().values())
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        primary, aux = problem.net(x)
        loss = problem.inner_loss(primary, aux, targets.detach())
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    for p in params:
        p.grad = None
    return problem, wrapper


def _exact_target_gradient(problem: MetaProblem) -> tuple[Tensor, float]:
    """``-d/dt [grad_theta L_train(theta*, t) . H^+ u]``, with the full Hessian; and its largest eigenvalue."""
    flat, unflatten = flattened(problem.parameters())

    def train_loss(vector: Tensor, targets: Tensor) -> Tensor:
        primary, aux = torch.func.functional_call(problem.net, unflatten(vector), (problem.x,))
        return problem.inner_loss(primary, aux, targets)

    def meta_loss(vector: Tensor) -> Tensor:
        primary, _ = torch.func.functional_call(problem.net, unflatten(vector), (problem.x_meta,), {"with_aux": False})
        return problem.primary_loss(primary, problem.y_meta)

    hessian = torch.autograd.functional.hessian(lambda v: train_loss(v, problem.targets.detach()), flat)
    u = torch.autograd.grad(meta_loss(flat), flat)[0] if flat.requires_grad else torch.func.grad(meta_loss)(flat)
    w = torch.linalg.pinv(hessian, rtol=1e-9, hermitian=True) @ u  # the symmetries (softmax shifts) span its null space
    gradient_at = torch.func.grad(train_loss)(flat, problem.targets)
    return torch.autograd.grad(-(gradient_at * w).sum(), problem.targets)[0], float(torch.linalg.eigvalsh(hessian).max())


def test_neumann_terms_converge_to_the_exact_implicit_hypergradient() -> None:
    problem, _ = _solved_problem()
    gradient_norm = torch.sqrt(sum((g**2).sum() for g in torch.autograd.grad(
        problem.inner_loss(*problem.net(problem.x), problem.targets.detach()), list(problem.parameters().values()))))
    assert float(gradient_norm) < 1e-7, "the lower level is not solved"
    exact, largest = _exact_target_gradient(problem)
    errors = []
    for terms in (0, 30, 300, 1500):
        engine = ImplicitEngine(terms=terms, step=1.9 / largest)  # below 2 / lambda_max: the series converges
        got = torch.autograd.grad(engine(problem), problem.targets)[0]
        errors.append(float((got - exact).norm() / exact.norm()))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[0] > 0.9 and errors[-1] < 1e-6, errors  # measured: 1.0, 0.44, 0.0047, 2e-10


def test_conjugate_gradient_converges_in_fewer_products_than_the_neumann_series() -> None:
    problem, _ = _solved_problem()
    exact, largest = _exact_target_gradient(problem)
    errors = {}
    for iterations in (0, 10, 40, 150):
        got = torch.autograd.grad(ImplicitEngine(terms=iterations, step=1.9 / largest, solver="cg")(problem), problem.targets)[0]
        errors[iterations] = float((got - exact).norm() / exact.norm())
    neumann = torch.autograd.grad(ImplicitEngine(terms=300, step=1.9 / largest)(problem), problem.targets)[0]
    neumann_error = float((neumann - exact).norm() / exact.norm())
    assert all(later <= earlier for earlier, later in itertools.pairwise(errors.values())), errors
    assert errors[0] > 0.9 and errors[150] < 1e-6, errors  # measured: 1.0, 0.17, 4.8e-8, 4.8e-8 (stopped at its tolerance)
    assert errors[40] < neumann_error, (errors, neumann_error)  # 41 products against 300


def test_conjugate_gradient_with_no_step_is_the_one_step_hypergradient() -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    jvp = engine_hypergradient(make_wrapper(TinyBNNet, "jvp"), x, y)
    cg = engine_hypergradient(make_wrapper(TinyBNNet, ImplicitEngine(terms=0, solver="cg")), x, y)  # type: ignore[arg-type]
    assert max_difference(jvp, cg) == 0.0


def test_the_default_engine_is_registered_and_arguments_are_checked() -> None:
    assert isinstance(ENGINES["implicit"], ImplicitEngine) and ENGINES["implicit"].terms == 3 and not ENGINES["implicit"].exact
    with pytest.raises(ValueError, match="terms must be an integer >= 0, got -1"):
        ImplicitEngine(terms=-1)
    with pytest.raises(ValueError, match="step must be > 0, got 0.0"):
        ImplicitEngine(step=0.0)
    with pytest.raises(ValueError, match="solver='lu' is not known; choose 'neumann'"):
        ImplicitEngine(solver="lu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distributed training needs engine='jvp' or 'finite_difference', got engine='implicit'"):
        MetaAuxWrapper(TinyBNNet(), num_classes=NUM_CLASSES, psi=PSI, engine="implicit", distributed=True)


def test_it_trains_through_step_and_changes_only_what_a_step_changes() -> None:
    wrapper = make_wrapper(TinyBNNet, "implicit", generator_optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert wrapper.engine == "implicit" and wrapper.inner_lr == INNER_LR
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    generator_before = [p.detach().clone() for p in wrapper.generator.parameters()]
    for _ in range(3):
        wrapper.step(x, y, optimizer)
    assert wrapper.steps == {"model": 3, "meta": 3} and "meta" in wrapper.last_losses
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, wrapper.generator.parameters()))
