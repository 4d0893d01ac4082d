"""MAXLGenerator (``auxlab/generators/maxl.py``): a label network, given or built from the classifier with from_model.

The light variant, LightMAXLGenerator ("maxl-light") of the same module, is tested in test_maxl_light.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import TinyBNNet, TinyCNN, TinyMLP, assert_unchanged, batch, image_batch, snapshot
from torch import Tensor, nn

from auxlab.generators import MAXLGenerator
from tests.generators.generator_helpers import MASK, assert_inside_blocks

# ------------------------------------------------------------------------------ MAXL
MAXL_MODELS = {
    "mlp": (lambda: TinyMLP(in_features=4), "fc", lambda: batch(6, 4, 3)),
    "bn": (lambda: TinyBNNet(in_features=4), "fc", lambda: batch(6, 4, 3)),
    "cnn": (lambda: TinyCNN(num_classes=3), "classifier", lambda: (image_batch(6, 3)[0], batch(6, 4, 3)[1])),
    "nested-head": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        "3",
        lambda: batch(6, 4, 3),
    ),
}
maxl_models = pytest.mark.parametrize(
    ("make_model", "head_name", "make_batch"), MAXL_MODELS.values(), ids=MAXL_MODELS.keys()
)


@maxl_models
def test_from_model_leaves_the_model_unchanged(
    make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    model = make_model()
    before = snapshot(model)
    MAXLGenerator.from_model(MASK, model, head_name=head_name)
    assert_unchanged(model, before)
    assert isinstance(model.get_submodule(head_name), nn.Linear)


@maxl_models
def test_from_model_reinitialises_a_copy_with_an_mlp_head(
    make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    model = make_model()
    model.train()
    model(make_batch()[0])  # move any BatchNorm running statistics away from their initial values
    generator = MAXLGenerator.from_model(MASK, model, head_name=head_name, seed=0)
    network = generator.network

    head = network.get_submodule(head_name)
    width = model.get_submodule(head_name).in_features
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (width, width, MASK.num_aux_classes)

    originals = dict(model.named_modules())
    for name, module in network.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not name.startswith(head_name):
            assert module is not originals[name]
            assert not torch.equal(module.weight, originals[name].weight), f"{name} was not re-initialised"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert (module.running_mean == 0).all() and int(module.num_batches_tracked) == 0


@maxl_models
def test_from_model_is_deterministic_and_keeps_the_global_random_state(
    make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    model = make_model()

    def state(seed: int, global_seed: int) -> dict[str, Tensor]:
        torch.manual_seed(global_seed)
        rng = torch.get_rng_state()
        generator = MAXLGenerator.from_model(MASK, model, head_name=head_name, seed=seed)
        assert torch.equal(torch.get_rng_state(), rng)
        return generator.state_dict()

    same, other_global, other_seed = state(7, 0), state(7, 1), state(8, 0)
    assert all(torch.equal(same[k], other_global[k]) for k in same)
    assert not all(torch.equal(same[k], other_seed[k]) for k in same)


@maxl_models
def test_maxl_targets_are_block_softmaxes(
    make_model: Callable[[], nn.Module], head_name: str, make_batch: Callable[[], tuple[Tensor, Tensor]]
) -> None:
    generator = MAXLGenerator.from_model(MASK, make_model(), head_name=head_name)
    x, y = make_batch()
    targets = generator(x, y)
    assert targets.shape == (6, MASK.num_aux_classes)
    assert_inside_blocks(targets, MASK, y)
    assert not generator.needs_index


def test_maxl_targets_are_differentiable_in_float64() -> None:
    model = TinyMLP(in_features=4).double()
    generator = MAXLGenerator.from_model(MASK, model, head_name="fc")
    x, y = batch(6, 4, 3, dtype=torch.float64)
    targets = generator(x, y)
    assert targets.dtype == torch.float64
    grads = torch.autograd.grad((targets * torch.arange(6.0, dtype=torch.float64)).sum(), list(generator.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_maxl_uses_the_given_network() -> None:
    network = nn.Linear(4, MASK.num_aux_classes)
    generator = MAXLGenerator(MASK, network=network)
    x, y = batch(6, 4, 3)
    assert generator.network is network
    assert torch.allclose(generator(x, y), MASK.softmax(network(x), y))


def test_maxl_rejects_a_network_of_the_wrong_width() -> None:
    generator = MAXLGenerator(MASK, network=nn.Linear(4, MASK.num_aux_classes + 1))
    with pytest.raises(ValueError, match=r"must return scores of shape \(6, 6\) \(B, K=sum\(psi\)\), got \(6, 7\)"):
        generator(*batch(6, 4, 3))


def test_maxl_rejects_a_network_that_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"network must be an nn.Module mapping x to \(B, 6\) scores, got function"):
        MAXLGenerator(MASK, network=lambda x: x)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make_model", "head_name", "kind"), [(TinyBNNet, "bn", "BatchNorm1d"), (TinyCNN, "features", "Sequential")]
)
def test_from_model_requires_a_linear_head(make_model: Callable[[], nn.Module], head_name: str, kind: str) -> None:
    with pytest.raises(TypeError, match=rf"head '{head_name}' must be an nn.Linear, got {kind}"):
        MAXLGenerator.from_model(MASK, make_model(), head_name=head_name)
