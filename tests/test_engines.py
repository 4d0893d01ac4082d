"""The meta step's hypergradient: both engines against a hand-written reference, in float64.

The reference writes the toy networks, the block softmax, the losses and the entropy term out by
hand (no auxlab code, no functional_call, no second-order autograd) and differentiates the meta
objective with respect to the generator's parameters by central finite differences.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from helpers import TinyBNNet, TinyMLP, assert_unchanged, batch, multitask, snapshot
from torch import Tensor, nn

import auxlab.engines
from auxlab import HierarchyMask, MetaAuxWrapper
from auxlab.engines import ENGINES, MetaProblem, get_engine, virtual_step
from auxlab.generators import MAXLGenerator
from auxlab.losses import negative_batch_entropy

PSI = [1, 2, 3]
NUM_CLASSES = len(PSI)
INNER_LR = 0.5  # large, so that the second-order term is far above the tolerance
TOLERANCE = 1e-6
EXACT_ENGINES = sorted(name for name, engine in ENGINES.items() if engine.exact)


# ------------------------------------------------------------------------------ the reference
def hand_forward(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Primary logits and head features of TinyMLP / TinyBNNet, written out by hand."""
    z = x @ params["model.hidden.weight"].T + params["model.hidden.bias"]
    if isinstance(model, TinyBNNet):
        eps = model.bn.eps
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps) * params["model.bn.weight"] + params["model.bn.bias"]
    h = torch.tanh(z)
    return h @ params["model.fc.weight"].T + params["model.fc.bias"], h


def hand_cross_entropy(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    log_p = logits - logits.logsumexp(1, keepdim=True)
    return -(target * (1 - log_p.exp()) ** gamma * log_p).sum(1).mean()


def hand_block_softmax(scores: Tensor, y: Tensor, psi: list[int]) -> Tensor:
    starts = [sum(psi[:c]) for c in range(len(psi))]
    rows = []
    for b in range(scores.shape[0]):
        c = int(y[b])
        block = scores[b, starts[c] : starts[c] + psi[c]]
        row = torch.zeros(sum(psi), dtype=scores.dtype)
        row[starts[c] : starts[c] + psi[c]] = torch.exp(block - block.max()) / torch.exp(block - block.max()).sum()
        rows.append(row)
    return torch.stack(rows)


def reference_objective(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor) -> Tensor:
    """The meta objective as a plain function of the generator's current parameters."""
    gamma, model = wrapper.focal_gamma, wrapper.model
    with torch.no_grad():
        targets = hand_block_softmax(wrapper.generator.network(x), y, PSI)
    theta = {name: p.detach().clone().requires_grad_() for name, p in wrapper.named_parameters()}
    logits, h = hand_forward(model, theta, x)
    aux = h @ theta["aux_head.weight"].T + theta["aux_head.bias"]
    one_hot = nn.functional.one_hot(y, NUM_CLASSES).to(x.dtype)
    inner = hand_cross_entropy(logits, one_hot, gamma) + wrapper.aux_weight * hand_cross_entropy(aux, targets, gamma)
    grads = torch.autograd.grad(inner, list(theta.values()))
    moved = {name: p.detach() - wrapper.inner_lr * g for (name, p), g in zip(theta.items(), grads)}
    meta_logits, _ = hand_forward(model, moved, x_meta)
    p_bar = targets.mean(0)
    p_bar = p_bar[p_bar > 0]
    one_hot_meta = nn.functional.one_hot(y_meta, NUM_CLASSES).to(x.dtype)
    return hand_cross_entropy(meta_logits, one_hot_meta, gamma) + wrapper.entropy_weight * (p_bar * p_bar.log()).sum()


def reference_hypergradient(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, x_meta: Tensor, y_meta: Tensor, eps: float = 1e-6) -> list[Tensor]:
    """Central finite differences of :func:`reference_objective` over every generator parameter."""
    grads = []
    for p in wrapper.generator.parameters():
        grad = torch.zeros_like(p)
        flat, flat_grad = p.data.view(-1), grad.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = reference_objective(wrapper, x, y, x_meta, y_meta)
            flat[i] = original - eps
            minus = reference_objective(wrapper, x, y, x_meta, y_meta)
            flat[i] = original
            flat_grad[i] = (plus - minus).detach() / (2 * eps)
        grads.append(grad)
    return grads


def max_difference(grads: list[Tensor], reference: list[Tensor]) -> float:
    return max(float((g - r).abs().max()) for g, r in zip(grads, reference))


def hypergradient_matches(grads: list[Tensor], reference: list[Tensor]) -> bool:
    """The reference check: every entry within TOLERANCE."""
    return max_difference(grads, reference) <= TOLERANCE


# ------------------------------------------------------------------------------ fixtures
def make_wrapper(
    model_cls: type[nn.Module], engine: str, *, focal_gamma: float = 0.0, seed: int = 0, generator_optimizer: Any = None, **kwargs: Any
) -> MetaAuxWrapper:
    torch.manual_seed(seed)
    model = model_cls(num_classes=NUM_CLASSES).double()
    mask = HierarchyMask(PSI)
    generator = MAXLGenerator(mask, network=nn.Linear(6, mask.num_aux_classes).double())
    return MetaAuxWrapper(
        model,
        num_classes=NUM_CLASSES,
        mask=mask,
        generator=generator,
        generator_optimizer=generator_optimizer or (lambda params: torch.optim.SGD(params, lr=0.0)),  # keep the hypergradient in .grad
        inner_lr=INNER_LR,
        entropy_weight=0.3,
        aux_weight=0.7,
        focal_gamma=focal_gamma,
        engine=engine,
        seed=seed,
        **kwargs,
    )


def engine_hypergradient(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, x_meta: Tensor | None = None, y_meta: Tensor | None = None) -> list[Tensor]:
    wrapper.meta_step(x, y, x_meta, y_meta)
    return [p.grad.clone() for p in wrapper.generator.parameters()]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("engine", EXACT_ENGINES)
@pytest.mark.parametrize("model_cls", [TinyMLP, TinyBNNet], ids=["no-batchnorm", "batchnorm"])
@pytest.mark.parametrize("focal_gamma", [0.0, 2.0], ids=["cross-entropy", "focal"])
def test_engine_matches_hand_written_reference(engine: str, model_cls: type[nn.Module], focal_gamma: float) -> None:
    wrapper = make_wrapper(model_cls, engine, focal_gamma=focal_gamma)
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    reference = reference_hypergradient(wrapper, x, y, x, y)
    grads = engine_hypergradient(wrapper, x, y)
    assert max(float(g.abs().max()) for g in grads) > 1e-3, "degenerate case: the hypergradient is ~0"
    assert hypergradient_matches(grads, reference), max_difference(grads, reference)


@pytest.mark.parametrize("engine", EXACT_ENGINES)
def test_separate_meta_batch_matches_reference(engine: str) -> None:
    wrapper = make_wrapper(TinyBNNet, engine)
    x, y = batch(9, num_classes=NUM_CLASSES, seed=1, dtype=torch.float64)
    x_meta, y_meta = batch(6, num_classes=NUM_CLASSES, seed=2, dtype=torch.float64)
    reference = reference_hypergradient(wrapper, x, y, x_meta, y_meta)
    assert hypergradient_matches(engine_hypergradient(wrapper, x, y, x_meta, y_meta), reference)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_meta_objective_value_matches_reference(engine: str) -> None:
    wrapper = make_wrapper(TinyBNNet, engine)
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    expected = reference_objective(wrapper, x, y, x, y)
    assert torch.allclose(wrapper.meta_step(x, y), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_cls", [TinyMLP, TinyBNNet], ids=["no-batchnorm", "batchnorm"])
def test_engines_agree_on_default_generator(model_cls: type[nn.Module]) -> None:
    """The paper's generator (a re-initialised copy of the classifier with an MLP head)."""
    grads = {}
    for engine in EXACT_ENGINES:
        torch.manual_seed(0)
        model = model_cls(num_classes=NUM_CLASSES).double()
        wrapper = MetaAuxWrapper(
            model, num_classes=NUM_CLASSES, psi=PSI, inner_lr=INNER_LR, engine=engine,
            generator_optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
        )
        x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
        grads[engine] = engine_hypergradient(wrapper, x, y)
    functional = grads["functional"]
    assert max(float(g.abs().max()) for g in functional) > 1e-4
    for engine in EXACT_ENGINES:
        assert max_difference(functional, grads[engine]) <= TOLERANCE, engine


def problem_for(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, targets: Tensor) -> MetaProblem:
    return MetaProblem(
        net=multitask(wrapper), x=x, y=y, targets=targets, x_meta=x, y_meta=y, inner_lr=wrapper.inner_lr,
        aux_weight=wrapper.aux_weight, focal_gamma=wrapper.focal_gamma,
    )


def wrong_hypergradient(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor, *, detach_targets: bool, entropy: bool) -> list[Tensor]:
    """Hypergradients with known mistakes: targets detached in the virtual step, or no entropy term."""
    targets = wrapper.generator(x, y)
    meta = ENGINES["functional"](problem_for(wrapper, x, y, targets.detach() if detach_targets else targets))
    objective = meta + (wrapper.entropy_weight * negative_batch_entropy(targets) if entropy else 0.0)
    return list(torch.autograd.grad(objective, list(wrapper.generator.parameters())))


@pytest.mark.parametrize(("detach_targets", "entropy"), [(True, True), (False, False)], ids=["detached-targets", "no-entropy"])
def test_reference_check_catches_a_wrong_hypergradient(detach_targets: bool, entropy: bool) -> None:
    wrapper = make_wrapper(TinyBNNet, "functional")
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    reference = reference_hypergradient(wrapper, x, y, x, y)
    assert hypergradient_matches(wrong_hypergradient(wrapper, x, y, detach_targets=False, entropy=True), reference)
    wrong = wrong_hypergradient(wrapper, x, y, detach_targets=detach_targets, entropy=entropy)
    assert not hypergradient_matches(wrong, reference)
    assert max_difference(wrong, reference) > 100 * TOLERANCE


def test_virtual_step_is_plain_sgd() -> None:
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    moved = virtual_step(params, [torch.tensor([0.5, -1.0]), None], 0.1)
    assert torch.equal(moved["a"], torch.tensor([0.95, 2.1]))
    assert moved["b"] is params["b"]


def test_unknown_engine_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"engine='adam' is not known; choose one of \['finite_difference', 'functional', 'higher', 'implicit', 'jvp'\]"):
        get_engine("adam")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_changes_nothing_of_the_network(engine: str) -> None:
    wrapper = make_wrapper(TinyBNNet, engine)
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    before = snapshot(multitask(wrapper))
    loss = get_engine(engine)(problem_for(wrapper, x, y, wrapper.generator(x, y)))
    grads = torch.autograd.grad(loss, list(wrapper.generator.parameters()))
    assert_unchanged(multitask(wrapper), before)
    assert all(p.grad is None for p in multitask(wrapper).parameters())
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert not wrapper.model.fc._forward_pre_hooks


@pytest.mark.parametrize("frozen", ["model.hidden.weight", "model.bn.bias"])
def test_frozen_parameters_take_no_virtual_step(frozen: str) -> None:
    grads = {}
    for engine in EXACT_ENGINES:
        wrapper = make_wrapper(TinyBNNet, engine)
        dict(wrapper.named_parameters())[frozen].requires_grad_(False)
        x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
        grads[engine] = engine_hypergradient(wrapper, x, y)
    for engine in EXACT_ENGINES:
        assert max_difference(grads["functional"], grads[engine]) <= TOLERANCE, engine


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_memory_stays_flat_over_many_meta_steps(engine: str) -> None:
    """No graph, gradient or tensor outlives a meta step: the count of live tensors stays constant."""
    wrapper = make_wrapper(TinyBNNet, engine, generator_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))

    counts = []
    for _ in range(25):
        result = wrapper.meta_step(x, y)
        counts.append(live_tensors())
    assert result is not None and result.grad_fn is None
    assert counts[3:] == [counts[3]] * 22, counts  # after warm-up (optimizer state, .grad) nothing accumulates
    assert all(p.grad is not None and p.grad.grad_fn is None for p in wrapper.generator.parameters())


# ------------------------------------------------------------------------------ cheap modes
@pytest.mark.parametrize("model_cls", [TinyMLP, TinyBNNet], ids=["no-batchnorm", "batchnorm"])
def test_finite_difference_error_shrinks_quadratically_with_eps(model_cls: type[nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    exact = engine_hypergradient(make_wrapper(model_cls, "functional"), x, y)
    errors = []
    for scale in (1e-1, 1e-2, 1e-3):
        monkeypatch.setattr(auxlab.engines, "FINITE_DIFFERENCE_SCALE", scale)
        errors.append(max_difference(engine_hypergradient(make_wrapper(model_cls, "finite_difference"), x, y), exact))
    assert errors[0] > 0
    assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30, errors  # O(eps^2): 100x per decade
    assert errors[2] < TOLERANCE


def test_meta_every_one_is_the_default_and_k_skips_the_calls_between() -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    default, every_one = make_wrapper(TinyBNNet, "jvp"), make_wrapper(TinyBNNet, "jvp", meta_every=1)
    assert default.meta_every == every_one.meta_every == 1
    assert torch.equal(default.meta_step(x, y), every_one.meta_step(x, y))

    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyBNNet(num_classes=NUM_CLASSES), num_classes=NUM_CLASSES, psi=PSI, meta_every=3)
    changed = []
    for _ in range(7):
        before = snapshot(wrapper.generator)
        result = wrapper.meta_step(x.float(), y)
        changed.append(result is not None)
        assert changed[-1] == any(not torch.equal(v, snapshot(wrapper.generator)[k]) for k, v in before.items())
    assert changed == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("engine", EXACT_ENGINES)
def test_virtual_step_over_every_parameter_equals_the_default(engine: str) -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    exact = engine_hypergradient(make_wrapper(TinyBNNet, engine), x, y)
    wrapper = make_wrapper(TinyBNNet, engine, virtual_params=["model", "aux_head"])
    assert max_difference(engine_hypergradient(wrapper, x, y), exact) == 0.0


def test_virtual_step_over_a_subset_agrees_across_engines_and_differs_from_all() -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    grads = {}
    for engine in sorted(ENGINES):
        wrapper = make_wrapper(TinyBNNet, engine, virtual_params=["aux_head", "model.fc"])
        assert wrapper.virtual_params == {"aux_head.weight", "aux_head.bias", "model.fc.weight", "model.fc.bias"}
        grads[engine] = engine_hypergradient(wrapper, x, y)
    for engine in EXACT_ENGINES:
        assert max_difference(grads["functional"], grads[engine]) <= TOLERANCE, engine
    assert max_difference(grads["functional"], grads["finite_difference"]) <= 1e-4
    assert max_difference(grads["functional"], engine_hypergradient(make_wrapper(TinyBNNet, "functional"), x, y)) > 1e-4


def test_virtual_params_are_checked() -> None:
    with pytest.raises(ValueError, match=r"virtual_params entry 'model.nope' matches no trainable parameter; modules with parameters: \['aux_head', 'model.bn', 'model.fc', 'model.hidden'\]"):
        MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, virtual_params=["model.nope"])
    with pytest.raises(TypeError, match="virtual_params must be a non-empty list"):
        MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, virtual_params="aux_head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="meta_every must be a positive integer, got 0"):
        MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, meta_every=0)


def test_forward_mode_equals_torch_func_jvp_and_reverse_over_reverse() -> None:
    from auxlab.engines import central_difference, forward_mode

    torch.manual_seed(0)
    net = TinyBNNet().double()
    x, _ = batch(9, dtype=torch.float64)
    at = {k: v.detach() for k, v in net.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in at.items()}

    def f(p: dict[str, Tensor]) -> Tensor:
        out: Tensor = torch.func.functional_call(net, (p, {k: b.clone() for k, b in net.named_buffers()}), (x,))
        return out

    expected = torch.func.jvp(f, (at,), (direction,))[1]
    assert torch.allclose(forward_mode(f, at, direction), expected, rtol=0, atol=1e-12)
    error = torch.linalg.vector_norm(central_difference(f, at, direction) - expected)
    assert error <= 1e-3 * torch.linalg.vector_norm(expected)  # O(eps^2), eps * ||direction|| = 0.01


def test_jvp_names_the_fix_when_an_operation_has_no_forward_mode_derivative() -> None:
    class NoForwardMode(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            return grad * 2

    class Doubling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(6, 5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(NoForwardMode.apply(torch.tanh(self.hidden(x))))

    x, y = batch(8)
    wrapper = MetaAuxWrapper(Doubling(), num_classes=3, psi=2)  # the default engine, jvp
    before = snapshot(wrapper)
    with pytest.raises(NotImplementedError, match="engine='jvp' needs a forward-mode derivative.*Pass engine='functional'"):
        wrapper.meta_step(x, y)
    assert all(torch.equal(v, snapshot(wrapper)[k]) for k, v in before.items())
    exact = MetaAuxWrapper(Doubling(), num_classes=3, psi=2, engine="functional")
    assert exact.meta_step(x, y) is not None


@pytest.mark.parametrize("engine", ["jvp", "finite_difference"])
def test_the_directional_derivative_runs_in_float32_under_bfloat16_autocast(engine: str) -> None:
    from helpers import TinyCNN, image_batch

    from auxlab.engines import central_difference, forward_mode, linearised_step

    derivatives = {"jvp": forward_mode, "finite_difference": central_difference}

    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyCNN(channels=8), num_classes=10, psi=5)
    x, y = image_batch(32)
    targets = wrapper.aux_targets(x, y).requires_grad_()
    problem = MetaProblem(net=multitask(wrapper), x=x, y=y, targets=targets, x_meta=x, y_meta=y, inner_lr=0.01, aux_weight=1.0, focal_gamma=0.0)

    def target_gradient(derivative: Any, autocast: bool) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            surrogate = linearised_step(problem, derivative).surrogate
        return torch.autograd.grad(surrogate, targets)[0]

    exact = target_gradient(derivatives["jvp"], autocast=False)
    seen: list[torch.dtype] = []

    def recording(function: Any, at: dict[str, Tensor], direction: dict[str, Tensor]) -> Tensor:
        result = derivatives[engine](function, at, direction)
        seen.append(result.dtype)
        assert not torch.is_autocast_enabled("cpu")
        return result

    mixed = target_gradient(recording, autocast=True)
    assert seen == [torch.float32]
    # the gradients at theta and theta' are bfloat16-rounded, the directional derivative is not
    # (a difference quotient in bfloat16 is off by more than 100% here)
    assert float((mixed - exact).norm() / exact.norm()) < 0.2
