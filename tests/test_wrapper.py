"""MetaAuxWrapper: the user's snippet, construction, the model step, the meta step's contract,
bad input, strategies by name, and checkpoints."""

from __future__ import annotations

import io

import hypothesis.strategies as st
import pytest
import torch
from helpers import TinyBNNet, TinyCNN, TinyMLP, assert_unchanged, batch, image_batch, multitask, snapshot
from hypothesis import given
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import auxlab
from auxlab import AuxLabelGenerator, HierarchyMask, MetaAuxWrapper
from auxlab.data import IndexedDataset
from auxlab.generators import HumanLabels, KMeansLabels, MAXLGenerator, RandomLabels
from auxlab.losses import classification_loss


def test_public_surface_is_pinned() -> None:
    assert auxlab.__all__ == ["AuxLabelGenerator", "HierarchyMask", "MetaAuxWrapper", "__version__"]
    assert isinstance(auxlab.__version__, str)


def test_the_readme_snippet_runs_and_trains_the_model_in_place() -> None:
    torch.manual_seed(0)
    model = TinyCNN(num_classes=10)
    x_all, y_all = image_batch(64, num_classes=10)
    loader = DataLoader(TensorDataset(x_all, y_all), batch_size=16, shuffle=True)
    before = snapshot(model)
    generator_before = None

    wrapper = MetaAuxWrapper(model, num_classes=10, psi=5)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.01)
    generator_before = snapshot(wrapper.generator)
    for x, y in loader:
        loss = wrapper.loss(x, y)
        opt.zero_grad(); loss.backward(); opt.step()
        wrapper.meta_step(x, y)
    logits = wrapper(x)

    assert logits.shape == (x.shape[0], 10)
    assert torch.equal(logits, model(x))
    after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the user's model was not trained in place"
    assert any(not torch.equal(v, snapshot(wrapper.generator)[k]) for k, v in generator_before.items())
    assert wrapper.model is model
    assert not model.classifier._forward_pre_hooks, "a hook was left on the user's model"


# ------------------------------------------------------------------------------ construction
def test_parameters_are_classifier_and_aux_head_only() -> None:
    model = TinyCNN()
    wrapper = MetaAuxWrapper(model, num_classes=10, psi=5)
    ids = {id(p) for p in wrapper.parameters()}
    expected = {id(p) for p in model.parameters()} | {id(p) for p in wrapper.aux_head.parameters()}
    assert ids == expected
    assert not ids & {id(p) for p in wrapper.generator.parameters()}
    assert any(k.startswith("generator.") for k in wrapper.state_dict())


def test_aux_head_reads_the_heads_input_on_its_device_and_dtype() -> None:
    model = TinyMLP(in_features=6, hidden=5, num_classes=3).double()
    wrapper = MetaAuxWrapper(model, num_classes=3, psi=[1, 2, 4])
    assert wrapper.head_name == "fc"
    assert (wrapper.aux_head.in_features, wrapper.aux_head.out_features) == (5, 7)
    assert wrapper.aux_head.weight.dtype == torch.float64
    x, _ = batch(4, dtype=torch.float64)
    features = torch.tanh(model.hidden(x))
    primary, aux = multitask(wrapper)(x)
    assert torch.allclose(aux, wrapper.aux_head(features))
    assert torch.equal(primary, model(x))


class ThreeLinears(nn.Module):
    """Two layers with 3 outputs, and a final layer that is not the primary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.out = nn.Linear(3, 3)
        self.extra = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.embed(x)))


def test_final_linear_is_the_default_head() -> None:
    model = TinyMLP(hidden=3, num_classes=3)  # the hidden layer has num_classes outputs too
    assert MetaAuxWrapper(model, num_classes=3, psi=2).head_name == "fc"


def test_several_candidate_heads_need_head_argument() -> None:
    with pytest.raises(ValueError, match=r"final nn.Linear 'extra' does not have num_classes=3 outputs and several others do: \['embed', 'out'\]; pick .* head="):
        MetaAuxWrapper(ThreeLinears(), num_classes=3, psi=2)
    wrapper = MetaAuxWrapper(ThreeLinears(), num_classes=3, psi=2, head="out")
    assert wrapper.aux_head.in_features == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_classes": 4}, ValueError, r"no nn.Linear with num_classes=4 outputs .*'fc' \(5->3\)"),
        ({"num_classes": 3, "head": "hidden"}, ValueError, r"head='hidden' has 5 outputs but num_classes=3"),
        ({"num_classes": 3, "head": "nope"}, ValueError, r"head='nope' is not an nn.Linear of the model"),
        ({"num_classes": 0}, ValueError, r"num_classes must be a positive integer, got 0"),
        ({"num_classes": 3, "psi": 0}, ValueError, r"psi must be >= 1, got 0"),
        ({"num_classes": 3, "psi": []}, ValueError, r"psi must not be empty"),
        ({"num_classes": 3, "psi": [2, 0, 1]}, ValueError, r"psi\[1\] must be >= 1, got 0"),
        ({"num_classes": 3, "psi": [2, 2]}, ValueError, r"psi has 2 entries but num_classes=3"),
        ({"num_classes": 3, "psi": 2.5}, TypeError, r"psi must be a sequence of integers, got float"),
        ({"num_classes": 3, "mask": HierarchyMask([1, 1])}, ValueError, r"mask has 2 classes \(psi=\[1, 1\]\) but num_classes=3"),
        ({"num_classes": 3, "psi": 2, "mask": HierarchyMask([1, 1, 1])}, ValueError, r"give psi or mask, not both"),
        ({"num_classes": 3, "inner_lr": 0.0}, ValueError, r"inner_lr must be > 0, got 0.0"),
        ({"num_classes": 3, "aux_weight": -1}, ValueError, r"aux_weight must be >= 0, got -1"),
        ({"num_classes": 3, "entropy_weight": float("nan")}, TypeError, r"entropy_weight must be a finite number"),
        ({"num_classes": 3, "focal_gamma": -2}, ValueError, r"focal_gamma must be >= 0"),
        ({"num_classes": 3, "engine": "jax"}, ValueError, r"engine='jax' is not known; choose one of"),
        ({"num_classes": 3, "generator": "learned"}, ValueError, r"generator='learned' is not known; choose one of \[.*'human', 'kmeans', 'maxl', 'maxl-balanced', 'maxl-light', 'maxl-light-balanced', 'random'.*'single'.*\]"),
        ({"num_classes": 3, "generator": 3}, TypeError, r"generator must be a strategy name or an AuxLabelGenerator, got int"),
        ({"num_classes": 3, "generator": "random"}, TypeError, r"could not build generator='random' from generator_kwargs=\{\}"),
        ({"num_classes": 3, "generator": "single", "generator_kwargs": {"a": 1}}, ValueError, r"generator_kwargs has no meaning"),
        ({"num_classes": 3, "seed": 1.5}, TypeError, r"seed must be an integer"),
    ],
)
def test_bad_construction_arguments_name_the_problem(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        MetaAuxWrapper(TinyMLP(), **kwargs)


def test_generator_instance_must_share_the_hierarchy() -> None:
    generator = RandomLabels(HierarchyMask([2, 2, 2]), num_samples=10)
    with pytest.raises(ValueError, match=r"generator's hierarchy psi=\[2, 2, 2\] differs from the wrapper's psi=\[3, 3, 3\]"):
        MetaAuxWrapper(TinyMLP(), num_classes=3, psi=3, generator=generator)
    with pytest.raises(ValueError, match="generator_kwargs is only for a generator given by name"):
        MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, generator=generator, generator_kwargs={"seed": 1})


def test_construction_leaves_the_model_and_global_rng_alone() -> None:
    model = TinyBNNet()
    before, rng = snapshot(model), torch.get_rng_state()
    MetaAuxWrapper(model, num_classes=3, psi=2)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_same_seed_same_wrapper_different_seed_different() -> None:
    a = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, seed=3).state_dict()
    b = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, seed=3).state_dict()
    c = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, seed=4).state_dict()
    assert torch.equal(a["aux_head.weight"], b["aux_head.weight"])
    assert torch.equal(a["generator.network.hidden.weight"], b["generator.network.hidden.weight"])
    assert not torch.equal(a["aux_head.weight"], c["aux_head.weight"])


# ------------------------------------------------------------------------------ the model step
@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_loss_is_primary_plus_weighted_auxiliary(focal_gamma: float) -> None:
    model = TinyMLP()
    wrapper = MetaAuxWrapper(model, num_classes=3, psi=[1, 2, 3], aux_weight=0.4, focal_gamma=focal_gamma)
    x, y = batch(6)
    targets = wrapper.aux_targets(x, y)
    primary, aux = multitask(wrapper)(x)
    expected = classification_loss(primary, y, focal_gamma=focal_gamma) + 0.4 * classification_loss(aux, targets, focal_gamma=focal_gamma)
    assert torch.allclose(wrapper.loss(x, y), expected)


def test_loss_detaches_the_targets() -> None:
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2)
    x, y = batch(6)
    wrapper.loss(x, y).backward()
    assert all(p.grad is None for p in wrapper.generator.parameters())
    assert all(p.grad is not None for p in wrapper.parameters())


def test_batchnorm_statistics_move_once_per_loss_and_never_in_meta_step() -> None:
    model = TinyBNNet()
    wrapper = MetaAuxWrapper(model, num_classes=3, psi=2)
    x, y = batch(6)
    generator_bn = wrapper.generator.network.bn
    wrapper.loss(x, y)
    assert int(model.bn.num_batches_tracked) == 1 and int(generator_bn.num_batches_tracked) == 0
    wrapper.meta_step(x, y)
    assert int(model.bn.num_batches_tracked) == 1 and int(generator_bn.num_batches_tracked) == 1
    wrapper.aux_targets(x, y)
    assert int(generator_bn.num_batches_tracked) == 1


# ------------------------------------------------------------------------------ the meta step
@pytest.mark.parametrize("engine", ["functional", "higher"])
def test_meta_step_changes_only_the_generator(engine: str) -> None:
    model = TinyBNNet()
    wrapper = MetaAuxWrapper(model, num_classes=3, psi=2, engine=engine)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9)
    x, y = batch(6)
    wrapper.loss(x, y).backward()
    opt.step()
    net_before, grads_before = snapshot(multitask(wrapper)), [p.grad.clone() for p in wrapper.parameters()]
    opt_before = [s["momentum_buffer"].clone() for s in opt.state.values()]
    generator_before = snapshot(wrapper.generator)
    value = wrapper.meta_step(x, y)
    assert value is not None and value.dim() == 0 and torch.isfinite(value)
    assert_unchanged(multitask(wrapper), net_before)
    assert all(torch.equal(p.grad, g) for p, g in zip(wrapper.parameters(), grads_before))
    assert all(torch.equal(s["momentum_buffer"], b) for s, b in zip(opt.state.values(), opt_before))
    assert any(not torch.equal(v, snapshot(wrapper.generator)[k]) for k, v in generator_before.items() if v.is_floating_point())


def test_custom_generator_with_parameters_is_meta_trained_and_without_is_fixed() -> None:
    class Scores(AuxLabelGenerator):
        """Scores from a linear map of x."""

        def __init__(self, mask: HierarchyMask) -> None:
            super().__init__(mask)
            self.linear = nn.Linear(6, mask.num_aux_classes)

        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.mask.softmax(self.linear(x), y)

    class FirstSubclass(AuxLabelGenerator):
        """Always the first sub-class of the block."""

        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.one_hot(self.mask.column(y, torch.zeros_like(y)))

    mask = HierarchyMask([2, 2, 2])
    x, y = batch(6)
    learned = MetaAuxWrapper(TinyMLP(), num_classes=3, mask=mask, generator=Scores(mask))
    before = snapshot(learned.generator)
    assert learned.meta_step(x, y) is not None
    assert not torch.equal(before["linear.weight"], learned.generator.linear.weight)

    fixed = MetaAuxWrapper(TinyMLP(), num_classes=3, mask=mask, generator=FirstSubclass(mask))
    assert fixed.generator_optimizer is None and fixed.meta_step(x, y) is None
    assert torch.equal(fixed.aux_targets(x, y).argmax(1), torch.tensor([0, 2, 4])[y])


# ------------------------------------------------------------------------------ strategies by name
def _fine_dataset(num_samples: int = 24) -> tuple[TensorDataset, Tensor, list[int]]:
    fine_to_coarse = [0, 1, 0, 2, 1, 2]
    g = torch.Generator().manual_seed(0)
    fine = torch.arange(num_samples) % 6
    x = torch.randn(num_samples, 6, generator=g)
    coarse = torch.tensor(fine_to_coarse)[fine]
    return TensorDataset(x, coarse), fine, fine_to_coarse


@pytest.mark.parametrize("name", ["random", "kmeans", "human"])
def test_fixed_strategies_by_name_need_index_and_learn_nothing(name: str) -> None:
    dataset, fine, fine_to_coarse = _fine_dataset()
    kwargs = {
        "random": {"num_samples": len(dataset)},
        "kmeans": {"dataset": dataset},
        "human": {"fine_labels": fine, "fine_to_coarse": fine_to_coarse},
    }[name]
    mask = HierarchyMask.from_fine_to_coarse(fine_to_coarse)
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, mask=mask, generator=name, generator_kwargs=kwargs)
    assert type(wrapper.generator) is {"random": RandomLabels, "kmeans": KMeansLabels, "human": HumanLabels}[name]
    assert wrapper.generator_optimizer is None
    x, y, index = next(iter(DataLoader(IndexedDataset(dataset), batch_size=8, shuffle=True)))
    with pytest.raises(ValueError, match=r"needs index=: .*IndexedDataset"):
        wrapper.loss(x, y)
    before = snapshot(wrapper)
    assert wrapper.meta_step(x, y, index=index) is None
    assert_unchanged(wrapper, before)
    loss = wrapper.loss(x, y, index=index)
    assert torch.isfinite(loss)
    targets = wrapper.aux_targets(x, y, index=index)
    assert torch.equal(targets.sum(1), torch.ones(8)) and bool((targets * ~mask.rows(y)).eq(0).all())
    if name == "human":
        columns = torch.tensor(mask.fine_label_columns(fine_to_coarse))
        assert torch.equal(targets.argmax(1), columns[fine[index]])


def test_wrapper_seed_reaches_seeded_strategies_unless_overridden() -> None:
    def table(**kwargs: object) -> Tensor:
        return MetaAuxWrapper(TinyMLP(), num_classes=3, psi=3, generator="random", **kwargs).generator.table

    assert torch.equal(table(seed=5, generator_kwargs={"num_samples": 50}), table(seed=5, generator_kwargs={"num_samples": 50}))
    assert not torch.equal(table(seed=5, generator_kwargs={"num_samples": 50}), table(seed=6, generator_kwargs={"num_samples": 50}))
    assert torch.equal(table(seed=5, generator_kwargs={"num_samples": 50, "seed": 6}), table(seed=6, generator_kwargs={"num_samples": 50}))


def test_maxl_by_name_takes_a_user_network() -> None:
    network = nn.Linear(6, 6)
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, generator="maxl", generator_kwargs={"network": network})
    assert isinstance(wrapper.generator, MAXLGenerator) and wrapper.generator.network is network


def test_single_task_mode_has_no_aux_head_and_no_meta_step() -> None:
    model = TinyBNNet()
    wrapper = MetaAuxWrapper(model, num_classes=3, generator="single")
    assert wrapper.is_single_task and wrapper.aux_head is None and wrapper.generator is None
    assert {id(p) for p in wrapper.parameters()} == {id(p) for p in model.parameters()}
    x, y = batch(6)
    assert torch.allclose(wrapper.loss(x, y), nn.functional.cross_entropy(model(x), y), atol=1e-6)
    assert wrapper.meta_step(x, y) is None
    with pytest.raises(ValueError, match="no targets"):
        wrapper.aux_targets(x, y)


# ------------------------------------------------------------------------------ bad input
class WrongWidth(TinyMLP):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, :2]


@pytest.mark.parametrize(
    ("x", "y", "error", "message"),
    [
        (torch.randn(4, 6), torch.tensor([0, 1, 2, 12]), ValueError, r"y has label 12 but num_classes=3; labels must lie in \[0, 3\)"),
        (torch.randn(4, 6), torch.tensor([0, -1, 2, 1]), ValueError, r"y has label -1 but num_classes=3"),
        (torch.randn(4, 6), torch.tensor([0.0, 1.0, 2.0, 1.0]), TypeError, r"y must be an integer tensor of class labels .* got torch.float32"),
        (torch.randn(4, 6), torch.tensor([True, False, True, True]), TypeError, r"y must be an integer tensor"),
        (torch.randn(4, 6), torch.zeros(4, 1, dtype=torch.long), ValueError, r"y must have shape \(B,\), got \(4, 1\)"),
        (torch.randn(5, 6), torch.zeros(4, dtype=torch.long), ValueError, r"x has batch size 5 but y has 4; they must match"),
        (torch.randn(0, 6), torch.zeros(0, dtype=torch.long), ValueError, r"y is an empty batch"),
        ([[0.0] * 6], torch.zeros(1, dtype=torch.long), TypeError, r"x must be a torch.Tensor, got list"),
        (torch.randn(4, 6), [0, 1, 2, 1], TypeError, r"y must be a torch.Tensor of class labels, got list"),
    ],
)
@pytest.mark.parametrize("call", ["loss", "meta_step"])
def test_bad_batches_raise_before_anything_changes(call: str, x: object, y: object, error: type, message: str) -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = snapshot(wrapper)
    with pytest.raises(error, match=message):
        getattr(wrapper, call)(x, y)
    assert_unchanged(wrapper, before)
    assert not opt.state


def test_meta_batch_is_checked_too() -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2)
    x, y = batch(6)
    before = snapshot(wrapper)
    with pytest.raises(ValueError, match="give both x_meta and y_meta"):
        wrapper.meta_step(x, y, x_meta=x)
    with pytest.raises(ValueError, match=r"y_meta has label 7 but num_classes=3"):
        wrapper.meta_step(x, y, x, torch.tensor([0, 1, 2, 7, 0, 1]))
    assert_unchanged(wrapper, before)


def test_model_output_width_is_checked() -> None:
    wrapper = MetaAuxWrapper(WrongWidth(), num_classes=3, psi=2)
    with pytest.raises(ValueError, match=r"the model returned shape \(6, 2\) but \(B, num_classes\) = \(6, 3\)"):
        wrapper.loss(*batch(6))


def test_index_out_of_range_is_reported() -> None:
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, generator="random", generator_kwargs={"num_samples": 24})
    x, y = batch(3)
    with pytest.raises(ValueError, match=r"index has value 24 but the 'random' table covers 24 training samples"):
        wrapper.loss(x, y, index=torch.tensor([0, 1, 24]))


@given(
    psi=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_shapes_for_any_hierarchy_and_batch(psi: list[int], batch_size: int, seed: int) -> None:
    num_classes = len(psi)
    torch.manual_seed(seed)
    wrapper = MetaAuxWrapper(TinyMLP(num_classes=num_classes), num_classes=num_classes, psi=psi)
    x = torch.randn(batch_size, 6)
    y = torch.randint(0, num_classes, (batch_size,))
    targets = wrapper.aux_targets(x, y)
    assert targets.shape == (batch_size, sum(psi))
    assert bool((targets * ~wrapper.mask.rows(y)).eq(0).all())
    primary, aux = multitask(wrapper)(x)
    assert primary.shape == (batch_size, num_classes) and aux.shape == (batch_size, sum(psi))
    loss = wrapper.loss(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    if batch_size > 1:  # BatchNorm-free model, so a batch of one is fine too; keep the meta step on >1
        value = wrapper.meta_step(x, y)
        assert value is not None and torch.isfinite(value)


# ------------------------------------------------------------------------------ checkpoints
def _trained(seed: int = 0, psi: int = 2) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    wrapper = MetaAuxWrapper(
        TinyBNNet(), num_classes=3, psi=psi, seed=seed,
        generator_optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
    )
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(6, seed=step)
        loss = wrapper.loss(x, y)
        opt.zero_grad(); loss.backward(); opt.step()
        wrapper.meta_step(x, y)
    return wrapper, opt


def test_state_dict_restores_everything_through_a_weights_only_load() -> None:
    wrapper, _ = _trained(seed=0)
    buffer = io.BytesIO()
    torch.save(wrapper.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored, _ = _trained(seed=1)
    restored.load_state_dict(state)
    for key, value in wrapper.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, restored.state_dict()[key]), key
    assert restored.generator_optimizer.state_dict()["state"][0]["step"] == 3
    x, y = batch(6, seed=9)
    assert torch.equal(wrapper.meta_step(x, y), restored.meta_step(x, y))
    assert torch.equal(wrapper.generator.network.fc[0].weight, restored.generator.network.fc[0].weight)


def test_loading_a_checkpoint_of_another_hierarchy_or_model_changes_nothing() -> None:
    wrapper, _ = _trained(psi=2)
    other, _ = _trained(psi=3)
    before = snapshot(wrapper)
    with pytest.raises(ValueError, match=r"checkpoint was made for psi=\[3, 3, 3\] but this wrapper has psi=\[2, 2, 2\]"):
        wrapper.load_state_dict(other.state_dict())
    single = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, generator="single")
    with pytest.raises(ValueError, match="made for auxiliary training but this wrapper is single-task"):
        single.load_state_dict(wrapper.state_dict())
    bigger = MetaAuxWrapper(TinyBNNet(hidden=7), num_classes=3, psi=2)
    with pytest.raises(ValueError, match=r"does not fit this wrapper's shapes: \['model.hidden.weight"):
        wrapper.load_state_dict(bigger.state_dict())
    plain = {k: v for k, v in wrapper.state_dict().items() if k != "_extra_state"}
    with pytest.raises(ValueError, match="no '_extra_state' entry"):
        wrapper.load_state_dict(plain)
    assert_unchanged(wrapper, before)


# ------------------------------------------------------------------------------ non-finite losses
def _poisoned_batch() -> tuple[Tensor, Tensor]:
    x, y = batch(6)
    x[2, 1] = float("nan")
    return x, y


@pytest.mark.parametrize("generator", ["maxl", "single"])
def test_a_nan_batch_raises_naming_the_step_and_changes_nothing(generator: str) -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, generator=generator)
    wrapper.loss(*batch(6))
    before = snapshot(wrapper)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at model step 2: primary loss = nan.*nonfinite='skip'"):
        wrapper.loss(*_poisoned_batch())
    assert_unchanged(wrapper, before)  # the BatchNorm statistics included


def test_a_nan_batch_in_the_meta_step_raises_and_leaves_the_generator() -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2)
    before = snapshot(wrapper)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at meta step 1: primary loss at theta' = nan"):
        wrapper.meta_step(*_poisoned_batch())
    assert_unchanged(wrapper, before)
    assert all(p.grad is None for p in wrapper.generator.parameters())


def test_skip_mode_warns_counts_and_updates_nothing() -> None:
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, nonfinite="skip")
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    before = snapshot(wrapper)
    x, y = _poisoned_batch()
    with pytest.warns(RuntimeWarning, match=r"skipped model step 1: non-finite loss .*1 model step\(s\) skipped so far"):
        loss = wrapper.loss(x, y)
    assert float(loss) == 0.0
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in wrapper.parameters())
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="skipped meta step 1"):
        assert wrapper.meta_step(x, y) is None
    assert_unchanged(wrapper, before)
    assert wrapper.skipped_steps == {"model": 1, "meta": 1} and wrapper.steps == {"model": 0, "meta": 0}  # skipped: counted there only
    assert torch.isfinite(wrapper.loss(*batch(6)))  # training goes on
    assert wrapper.steps == {"model": 1, "meta": 0}


@pytest.mark.parametrize("call", ["meta_step", "step"])
def test_a_refused_step_leaves_the_counters_and_the_meta_every_schedule(call: str) -> None:
    """Issue 15, defect 5: a call that raised "nothing was updated" counted as a step, so with meta_every=2 the
    next two calls stepped as [None, value] instead of [value, None]."""
    wrapper = MetaAuxWrapper(TinyBNNet(), num_classes=3, psi=2, meta_every=2)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)

    def take(x: Tensor, y: Tensor) -> Tensor | None:
        if call == "step":
            wrapper.step(x, y, optimizer)
            return wrapper.last_meta_objective
        return wrapper.meta_step(x, y)

    with pytest.raises(FloatingPointError, match="nothing was updated"):
        take(*_poisoned_batch())
    assert wrapper.steps == {"model": 0, "meta": 0} and wrapper.skipped_steps == {"model": 0, "meta": 0}
    assert [take(*batch(6)) is not None for _ in range(4)] == [True, False, True, False]
    assert wrapper.steps == {"model": 4 if call == "step" else 0, "meta": 4}


def test_last_losses_holds_the_parts_of_the_latest_steps() -> None:
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, seed=1)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    assert wrapper.last_losses == {}
    x, y = batch(6)
    returned = wrapper.step(x, y, optimizer)
    parts = wrapper.last_losses
    assert set(parts) == {"primary", "auxiliary", "meta"} and not any(v.requires_grad for v in parts.values())
    torch.testing.assert_close(returned, parts["primary"] + wrapper.aux_weight * parts["auxiliary"])
    assert parts["meta"] is wrapper.last_meta_objective
    with pytest.raises(FloatingPointError):
        wrapper.loss(*_poisoned_batch())
    assert wrapper.last_losses == parts  # a refused step publishes nothing
    single = MetaAuxWrapper(TinyMLP(), num_classes=3, generator="single")
    single.loss(x, y)
    assert set(single.last_losses) == {"primary"}


def test_huge_logits_stay_finite() -> None:
    class Loud(TinyMLP):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 1e4

    wrapper = MetaAuxWrapper(Loud(), num_classes=3, psi=2)
    x, y = batch(6)
    loss = wrapper.loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in wrapper.parameters())
    assert wrapper.meta_step(x, y) is not None


def test_nonfinite_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="nonfinite='ignore' is not known; choose 'raise' or 'skip'"):
        MetaAuxWrapper(TinyMLP(), num_classes=3, nonfinite="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", ["single", "maxl", "maxl-light", "random", "kmeans", "human"])
def test_same_seed_same_training_run_for_every_strategy(name: str) -> None:
    """Two runs from the same seed give bit-identical states on CPU (tables, k-means fits, generators)."""
    dataset, fine, fine_to_coarse = _fine_dataset()
    kwargs = {
        "single": {}, "maxl": {}, "maxl-light": {},
        "random": {"num_samples": len(dataset)},
        "kmeans": {"dataset": dataset},
        "human": {"fine_labels": fine, "fine_to_coarse": fine_to_coarse},
    }[name]

    def run(global_seed: int) -> dict[str, Tensor]:
        torch.manual_seed(7)
        model = TinyBNNet()
        torch.manual_seed(global_seed)  # the wrapper and its strategy must draw only from seed=7
        mask = HierarchyMask.from_fine_to_coarse(fine_to_coarse)
        wrapper = MetaAuxWrapper(model, num_classes=3, mask=mask, generator=name, generator_kwargs=kwargs or None, seed=7)
        optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(IndexedDataset(dataset), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
        for x, y, index in loader:
            loss = wrapper.loss(x, y, index=index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            wrapper.meta_step(x, y, index=index)
        return snapshot(wrapper)

    first, second = run(global_seed=1), run(global_seed=2)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_engine_is_fixed_at_construction_and_every_meta_step_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import auxlab.engines

    used = []

    class Counting(auxlab.engines.FunctionalEngine):
        name = "counting"

        def meta_loss(self, problem: auxlab.engines.MetaProblem) -> torch.Tensor:
            used.append(self.name)
            return super().meta_loss(problem)

    monkeypatch.setitem(auxlab.engines.ENGINES, "counting", Counting())
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, engine="counting")
    x, y = batch(6)
    wrapper.meta_step(x, y)
    with pytest.raises(AttributeError):
        wrapper.engine = "jvp"  # type: ignore[misc]
    wrapper.meta_step(x, y)
    assert wrapper.engine == "counting" and used == ["counting", "counting"]


def test_a_fixed_generator_with_batchnorm_does_not_move_its_statistics() -> None:
    class FrozenExtractorLabels(AuxLabelGenerator):
        """Nearest sub-class from a frozen extractor that has BatchNorm, left in train mode."""

        def __init__(self, mask: HierarchyMask) -> None:
            super().__init__(mask)
            self.extractor = TinyBNNet(num_classes=mask.num_aux_classes).requires_grad_(False)

        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.mask.softmax(self.extractor(x), y)

    mask = HierarchyMask([2, 2, 2])
    wrapper = MetaAuxWrapper(TinyMLP(), num_classes=3, mask=mask, generator=FrozenExtractorLabels(mask))
    before = snapshot(wrapper.generator)
    x, y = batch(6)
    wrapper.loss(x, y)
    wrapper.aux_targets(x, y)
    assert wrapper.meta_step(x, y) is None
    assert_unchanged(wrapper.generator, before)


# ------------------------------------------------------------------------------ the fused step
def _pair(engine: str, **kwargs: object) -> tuple[MetaAuxWrapper, torch.optim.Optimizer]:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(
        TinyBNNet().double(), num_classes=3, psi=[1, 2, 3], engine=engine, inner_lr=0.3,
        generator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), **kwargs,  # type: ignore[arg-type]
    )
    return wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize("engine", ["functional", "higher", "jvp", "finite_difference"])
def test_step_equals_loss_then_meta_step_then_the_model_update(engine: str, max_grad_norm: float | None) -> None:
    fused, fused_optimizer = _pair(engine)
    apart, apart_optimizer = _pair(engine)
    for seed in range(3):
        x, y = batch(9, seed=seed, dtype=torch.float64)
        loss = fused.step(x, y, fused_optimizer, max_grad_norm=max_grad_norm)
        expected = apart.loss(x, y)
        meta = apart.meta_step(x, y)
        assert meta is not None and apart.last_meta_objective is meta
        assert fused.last_meta_objective is not None
        assert torch.allclose(fused.last_meta_objective, meta, rtol=0, atol=1e-12)
        apart_optimizer.zero_grad()
        expected.backward()
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(apart.parameters(), max_grad_norm)
            assert norm > 2 * max_grad_norm  # the clipping acts
        apart_optimizer.step()
        assert torch.allclose(loss, expected.detach(), rtol=0, atol=1e-12)
    after_fused, after_apart = snapshot(fused), snapshot(apart)
    for key, value in after_apart.items():
        assert torch.allclose(after_fused[key].double(), value.double(), rtol=0, atol=1e-9), key
    assert fused.steps == apart.steps == {"model": 3, "meta": 3}


def test_step_rejects_a_bad_max_grad_norm_before_anything_changes() -> None:
    wrapper, optimizer = _pair("jvp")
    before = snapshot(wrapper)
    for bad, error in ((0.0, ValueError), (-1.0, ValueError), (float("nan"), TypeError)):
        with pytest.raises(error, match="max_grad_norm must be"):
            wrapper.step(*batch(9, dtype=torch.float64), optimizer, max_grad_norm=bad)
    assert_unchanged(wrapper, before)
    assert wrapper.steps == {"model": 0, "meta": 0}


def test_step_follows_meta_every_and_fixed_strategies() -> None:
    wrapper, optimizer = _pair("jvp", meta_every=2)
    changed = []
    for seed in range(4):
        before = snapshot(wrapper.generator)
        model_before = snapshot(wrapper.model)
        wrapper.step(*batch(9, seed=seed, dtype=torch.float64), optimizer)
        changed.append(any(not torch.equal(v, snapshot(wrapper.generator)[k]) for k, v in before.items()))
        assert (wrapper.last_meta_objective is not None) == changed[-1]
        assert any(not torch.equal(v, snapshot(wrapper.model)[k]) for k, v in model_before.items())
    assert changed == [True, False, True, False]

    fixed = MetaAuxWrapper(TinyMLP(), num_classes=3, psi=2, generator="random", generator_kwargs={"num_samples": 9})
    x, y = batch(9)
    assert torch.isfinite(fixed.step(x, y, torch.optim.SGD(fixed.parameters(), lr=0.1), index=torch.arange(9)))


@pytest.mark.parametrize("engine", ["functional", "jvp"])
def test_step_on_a_nan_batch_raises_or_skips_without_changing_anything(engine: str) -> None:
    wrapper, optimizer = _pair(engine)
    x, y = batch(9, dtype=torch.float64)
    x[0, 0] = float("nan")
    before = snapshot(wrapper)
    with pytest.raises(FloatingPointError, match="non-finite loss at (model|meta) step 1"):
        wrapper.step(x, y, optimizer)
    assert_unchanged(wrapper, before)
    assert not optimizer.state

    wrapper.nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="skipped"):
        wrapper.step(x, y, optimizer)
    assert_unchanged(wrapper, before)
    assert not optimizer.state and sum(wrapper.skipped_steps.values()) >= 1


@pytest.mark.parametrize("engine", ["functional", "higher", "jvp", "finite_difference"])
def test_everything_stays_finite_under_bfloat16_autocast(engine: str) -> None:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=5, engine=engine)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01)
    x, y = image_batch(16)
    x = x * 1e3  # large activations
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wrapper.loss(x, y)
        meta = wrapper.meta_step(x, y)
    assert loss.dtype == torch.float32  # the losses are computed in float32 from half-precision logits
    loss.backward()
    assert torch.isfinite(loss) and meta is not None and torch.isfinite(meta)
    assert all(torch.isfinite(p.grad).all() for p in wrapper.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(wrapper.step(x, y, optimizer))
    assert all(torch.isfinite(p).all() for p in wrapper.state_dict().values() if isinstance(p, Tensor) and p.is_floating_point())


@pytest.mark.parametrize(
    ("generator", "weighting", "psi"),
    [("sla", "constant", 4), ("rl", "constant", 5), ("random", "gcs", 5), ("random", "uncertainty", 5), ("random", "maoal", 5)],
)
def test_the_other_methods_stay_finite_under_bfloat16_autocast(generator: str, weighting: str, psi: int) -> None:
    torch.manual_seed(0)
    kwargs = {"num_samples": 16} if generator == "random" else None
    wrapper = MetaAuxWrapper(TinyCNN(), num_classes=10, psi=psi, generator=generator, generator_kwargs=kwargs, weighting=weighting)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01)
    x, y = image_batch(16)
    x = x * 1e3  # large activations
    x_meta, y_meta = image_batch(16, seed=1)
    index = torch.arange(16)
    before = snapshot(wrapper)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapper.step(x, y, optimizer, index=index, x_meta=x_meta, y_meta=y_meta)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    after = snapshot(wrapper)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(before["model.classifier.weight"], after["model.classifier.weight"])  # it trained
    if generator == "sla":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(wrapper.aggregated_logits(x)).all()
