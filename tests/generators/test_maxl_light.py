"""The light MAXL generator ("maxl-light"): an MLP on the classifier's own detached features."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from helpers import TinyBNNet, TinyCNN, TinyMLP, assert_unchanged, batch, image_batch, snapshot
from hypothesis import given
from hypothesis import strategies as st
from test_engines import EXACT_ENGINES, INNER_LR, NUM_CLASSES, PSI, TOLERANCE, engine_hypergradient, max_difference
from torch import Tensor, nn

from auxlab import HierarchyMask, MetaAuxWrapper
from auxlab.engines import ENGINES
from auxlab.generators import GENERATORS, LightMAXLGenerator, MAXLGenerator

MASK = HierarchyMask(PSI)

MODELS: dict[str, tuple[Callable[[], nn.Module], str, Callable[[], tuple[Tensor, Tensor]]]] = {
    "mlp": (lambda: TinyMLP(), "fc", lambda: batch(7, 6, NUM_CLASSES)),
    "bn": (lambda: TinyBNNet(), "fc", lambda: batch(7, 6, NUM_CLASSES)),
    "cnn": (lambda: TinyCNN(num_classes=NUM_CLASSES), "classifier", lambda: (image_batch(7, NUM_CLASSES)[0], batch(7, 6, NUM_CLASSES)[1])),
    "nested-head": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)),
        "3",
        lambda: batch(7, 6, NUM_CLASSES),
    ),
}
models = pytest.mark.parametrize(("make_model", "head_name", "make_batch"), MODELS.values(), ids=MODELS.keys())


def head_input(model: nn.Module, head_name: str, x: Tensor) -> Tensor:
    """The input of the head in a plain forward of a copy of ``model`` (its statistics move, the original's do not)."""
    twin = copy.deepcopy(model)
    captured: list[Tensor] = []
    twin.get_submodule(head_name).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        twin(x)
    return captured[0]


# ------------------------------------------------------------------------------ building
def test_registered_as_maxl_light_and_seeded() -> None:
    assert GENERATORS["maxl-light"] is LightMAXLGenerator
    assert LightMAXLGenerator.name == "maxl-light" and LightMAXLGenerator.seeded
    assert not issubclass(LightMAXLGenerator, MAXLGenerator)  # a sibling: no `network` to copy


@models
def test_the_mlp_reads_the_head_input_width(make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]) -> None:
    model = make_model()
    width = model.get_submodule(head_name).in_features
    for hidden, expected in ((None, width), (9, 9)):
        generator = LightMAXLGenerator(MASK, model=model, head_name=head_name, hidden=hidden)
        assert [type(m) for m in generator.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
        first, last = generator.mlp[0], generator.mlp[2]
        assert (first.in_features, first.out_features, last.out_features) == (width, expected, MASK.num_aux_classes)
        assert generator.learns and not generator.needs_index
        assert generator.classifier is model


def test_the_wrapper_builds_it_by_name_with_hidden_and_seed() -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=NUM_CLASSES, psi=PSI, generator="maxl-light", generator_kwargs={"hidden": 4, "seed": 3})
    generator = wrapper.generator
    assert isinstance(generator, LightMAXLGenerator)
    assert generator.classifier is wrapper.model and generator.head_name == "fc"
    assert generator.mlp[0].out_features == 4
    assert torch.equal(generator.mlp[0].weight, LightMAXLGenerator(MASK, model=TinyBNNet(), head_name="fc", hidden=4, seed=3).mlp[0].weight)


def test_classifier_parameters_are_not_the_generators() -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=NUM_CLASSES, psi=PSI, generator="maxl-light")
    generator = wrapper.generator
    assert isinstance(generator, LightMAXLGenerator)
    classifier = {id(p) for p in wrapper.model.parameters()}
    mlp = {id(p) for p in generator.mlp.parameters()}
    assert {id(p) for p in generator.parameters()} == mlp and not mlp & classifier
    assert list(generator.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    assert [name for name, _ in generator.named_modules()] == ["", "mlp", "mlp.0", "mlp.1", "mlp.2"]
    optimizer = wrapper.generator_optimizer
    assert optimizer is not None
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == mlp
    # the wrapper's checkpoint holds the classifier once, under model.*, and the MLP under generator.*
    generator_keys = [k for k in wrapper.state_dict() if k.startswith("generator.")]
    assert generator_keys == ["generator.mlp.0.weight", "generator.mlp.0.bias", "generator.mlp.2.weight", "generator.mlp.2.bias"]


def test_generator_mode_and_device_moves_leave_the_classifier_alone() -> None:
    model = TinyBNNet().train()
    generator = LightMAXLGenerator(MASK, model=model, head_name="fc")
    generator.eval()
    assert model.training
    generator.to(torch.float64)
    assert generator.mlp[0].weight.dtype == torch.float64 and model.fc.weight.dtype == torch.float32


def test_seeded_initialisation_keeps_the_global_random_state() -> None:
    model = TinyBNNet()

    def state(seed: int) -> dict[str, Tensor]:
        rng = torch.get_rng_state()
        built = LightMAXLGenerator(MASK, model=model, head_name="fc", seed=seed).state_dict()
        assert torch.equal(torch.get_rng_state(), rng)
        return built

    torch.manual_seed(0)
    same = state(5)
    torch.manual_seed(1)
    again, other = state(5), state(6)
    assert all(torch.equal(same[k], again[k]) for k in same)
    assert not all(torch.equal(same[k], other[k]) for k in same)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"head_name": "bn"}, TypeError, "head 'bn' must be an nn.Linear, got BatchNorm1d"),
        ({"head_name": "nope"}, ValueError, "head_name='nope' is not a submodule of the model"),
        ({"hidden": 0}, ValueError, r"hidden must be a positive integer \(the MLP's hidden width\), got 0"),
        ({"hidden": 2.5}, ValueError, "hidden must be a positive integer"),
        ({"seed": "1"}, TypeError, "seed must be an integer, got '1'"),
        ({"model": "net"}, TypeError, "model must be the classifier, an nn.Module, got str"),
    ],
    ids=["head-not-linear", "no-such-head", "hidden-0", "hidden-float", "seed-str", "model-str"],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    arguments: dict[str, object] = {"model": TinyBNNet(), "head_name": "fc", **kwargs}
    with pytest.raises(error, match=message):
        LightMAXLGenerator(MASK, **arguments)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ targets
@models
def test_targets_are_block_softmaxes_of_the_mlp_on_the_head_input(
    make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    model = make_model().train()
    generator = LightMAXLGenerator(MASK, model=model, head_name=head_name)
    x, y = make_batch()
    targets = generator(generator.features(x), y)
    assert targets.shape == (7, MASK.num_aux_classes)
    assert (targets[~MASK.rows(y)] == 0).all()
    assert torch.allclose(targets.sum(1), torch.ones(7))
    features = head_input(model, head_name, x)  # train mode: the batch's own statistics, as the model step's forward
    assert torch.equal(generator.features(x), features)
    assert torch.allclose(targets, MASK.softmax(generator.mlp(features), y))


def test_in_eval_mode_the_features_use_the_running_statistics() -> None:
    model = TinyBNNet()
    model.train()(batch(16, seed=3)[0])  # running statistics away from their initial values
    model.eval()
    x, _ = batch(7)
    generator = LightMAXLGenerator(MASK, model=model, head_name="fc")
    assert torch.equal(generator.features(x), head_input(model, "fc", x))
    assert not torch.allclose(generator.features(x), head_input(model.train(), "fc", x))


@given(
    psi=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    batch_size=st.integers(2, 9),
    hidden=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_targets_stay_in_their_blocks_for_any_hierarchy(psi: list[int], batch_size: int, hidden: int, seed: int) -> None:
    mask = HierarchyMask(psi)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, len(psi)))
    generator = LightMAXLGenerator(mask, model=model, head_name="3", hidden=hidden, seed=seed)
    x = 10 * torch.randn(batch_size, 4, generator=g)
    y = torch.randint(0, len(psi), (batch_size,), generator=g)
    targets = generator(generator.features(x), y)
    assert targets.shape == (batch_size, mask.num_aux_classes)
    assert bool(torch.isfinite(targets).all()) and bool((targets >= 0).all())
    assert (targets[~mask.rows(y)] == 0).all()
    assert torch.allclose(targets.sum(1), torch.ones(batch_size))


def test_same_seed_same_targets() -> None:
    x, y = batch(7)
    model = TinyBNNet()
    a, b, c = (LightMAXLGenerator(MASK, model=model, head_name="fc", seed=seed) for seed in (2, 2, 3))
    a, b, c = (generator(generator.features(x), y) for generator in (a, b, c))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------ the classifier is left alone
@models
def test_a_forward_changes_nothing_of_the_classifier(
    make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    model = make_model().train()
    x, y = make_batch()
    nn.functional.cross_entropy(model(x), y).backward()  # every parameter has a .grad, and the statistics moved once
    before, grads = snapshot(model), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    generator = LightMAXLGenerator(MASK, model=model, head_name=head_name)
    targets = generator(generator.features(x), y)
    (targets * torch.arange(MASK.num_aux_classes)).sum().backward()
    assert_unchanged(model, before)
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert model.training
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(p.grad is not None for p in generator.parameters())  # the MLP has its gradient


def test_the_features_are_detached_from_the_classifier() -> None:
    model = TinyBNNet()
    generator = LightMAXLGenerator(MASK, model=model, head_name="fc")
    x, y = batch(7)
    assert not generator.features(x).requires_grad
    grads = torch.autograd.grad(generator(generator.features(x), y).pow(2).sum(), list(model.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


def test_a_head_that_runs_twice_is_refused_and_no_hook_is_left() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, NUM_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) + self.fc(x)

    model = Twice()
    generator = LightMAXLGenerator(MASK, model=model, head_name="fc")
    with pytest.raises(RuntimeError, match="the head 'fc' ran 2 times in one forward pass"):
        generator.features(batch(7)[0])
    assert not model.fc._forward_pre_hooks


def test_forward_reads_features_and_refuses_a_batch_of_inputs() -> None:
    model = TinyCNN(num_classes=NUM_CLASSES)
    generator = LightMAXLGenerator(MASK, model=model, head_name="classifier")
    x, y = image_batch(7, num_classes=NUM_CLASSES)
    assert generator.reads_features
    with pytest.raises(ValueError, match=r"reads the classifier's features, \(B, 16\); got \(7, 1, 8, 8\)"):
        generator(x, y)
    assert generator(generator.features(x), y).shape == (7, MASK.num_aux_classes)


@pytest.mark.parametrize("engine", ["jvp", "functional"])
def test_the_wrapper_runs_no_extra_classifier_forward_for_the_targets(engine: str) -> None:
    calls = {"maxl": 0, "maxl-light": 0}
    for name in ("maxl", "maxl-light"):
        torch.manual_seed(0)
        model = TinyBNNet()
        wrapper = MetaAuxWrapper(model, num_classes=NUM_CLASSES, mask=MASK, generator=name, engine=engine)
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
        x, y = batch(7)
        model.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        wrapper.step(x, y, optimizer)
        wrapper.loss(x, y)
    # jvp: the same classifier forwards as with the paper's generator, a separate network: the targets
    # come from the forward at theta. functional: its meta step computes the targets with one forward of its own.
    assert calls["maxl-light"] == calls["maxl"] + (engine == "functional")


# ------------------------------------------------------------------------------ the hypergradient
def light_wrapper(model_cls: type[nn.Module], engine: str, *, seed: int = 0, generator_lr: float = 0.0) -> MetaAuxWrapper:
    torch.manual_seed(seed)
    return MetaAuxWrapper(
        model_cls(num_classes=NUM_CLASSES).double(),
        num_classes=NUM_CLASSES,
        psi=PSI,
        generator="maxl-light",
        generator_optimizer=lambda params: torch.optim.SGD(params, lr=generator_lr),  # lr 0 keeps the hypergradient in .grad
        inner_lr=INNER_LR,
        entropy_weight=0.3,
        aux_weight=0.7,
        engine=engine,
        seed=seed,
    )


@pytest.mark.parametrize("model_cls", [TinyMLP, TinyBNNet], ids=["no-batchnorm", "batchnorm"])
def test_every_engine_agrees_with_the_functional_engine(model_cls: type[nn.Module]) -> None:
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    grads = {engine: engine_hypergradient(light_wrapper(model_cls, engine), x, y) for engine in sorted(ENGINES)}
    functional = grads["functional"]
    assert max(float(g.abs().max()) for g in functional) > 1e-3, "degenerate case: the hypergradient is ~0"
    for engine in EXACT_ENGINES:
        assert max_difference(functional, grads[engine]) <= TOLERANCE, engine
    assert max_difference(functional, grads["finite_difference"]) <= 1e-4


def test_hypergradient_matches_finite_differences_of_the_meta_objective() -> None:
    """Central differences over the MLP's parameters of the meta objective's value, which test_engines
    checks against a hand-written reference; the gradient comes from the functional engine."""
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    wrapper = light_wrapper(TinyBNNet, "functional")
    before = snapshot(wrapper)
    exact = engine_hypergradient(wrapper, x, y)
    assert_unchanged(wrapper, before)  # lr 0: the meta step changed nothing, not even BatchNorm statistics
    eps = 1e-6
    for p, g in zip(wrapper.generator.parameters(), exact):
        flat = p.data.view(-1)
        numeric = torch.zeros_like(flat)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = wrapper.meta_step(x, y)
            flat[i] = original - eps
            minus = wrapper.meta_step(x, y)
            flat[i] = original
            assert plus is not None and minus is not None
            numeric[i] = (plus - minus) / (2 * eps)
        assert float((numeric - g.view(-1)).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_training_steps_the_mlp_and_never_the_classifier_through_the_generator(engine: str) -> None:
    wrapper = light_wrapper(TinyBNNet, engine, generator_lr=0.1)
    x, y = batch(9, num_classes=NUM_CLASSES, dtype=torch.float64)
    model_before, mlp_before = snapshot(wrapper.model), snapshot(wrapper.generator)
    wrapper.meta_step(x, y)
    assert_unchanged(wrapper.model, model_before)  # the meta step changes only the generator
    assert any(not torch.equal(v, wrapper.generator.state_dict()[k]) for k, v in mlp_before.items())
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    wrapper.step(x, y, optimizer)
    assert any(not torch.equal(v, wrapper.model.state_dict()[k]) for k, v in model_before.items())


# ------------------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip_restores_labels_and_training() -> None:
    x, y = batch(9, num_classes=NUM_CLASSES)

    def build(seed: int) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        wrapper = MetaAuxWrapper(
            TinyBNNet(), num_classes=NUM_CLASSES, psi=PSI, generator="maxl-light", engine="jvp", seed=seed,
            generator_optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        )
        return wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1)

    trained, optimizer = build(0)
    for _ in range(3):
        trained.step(x, y, optimizer)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored, restored_optimizer = build(1)
    assert not torch.equal(restored.aux_targets(x, y), trained.aux_targets(x, y))
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    restored_optimizer.load_state_dict(optimizer.state_dict())
    assert torch.equal(restored.aux_targets(x, y), trained.aux_targets(x, y))
    assert restored.generator.classifier is restored.model  # still reads its own classifier
    trained.step(x, y, optimizer)
    restored.step(x, y, restored_optimizer)  # momentum of the generator optimizer came back too
    assert all(torch.equal(a, b) for a, b in zip(snapshot(trained).values(), snapshot(restored).values()))


def test_a_deep_copy_of_the_wrapper_reads_its_own_classifier() -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=NUM_CLASSES, psi=PSI, generator="maxl-light")
    twin = copy.deepcopy(wrapper)
    assert isinstance(twin.generator, LightMAXLGenerator)
    assert twin.generator.classifier is twin.model and twin.model is not wrapper.model
