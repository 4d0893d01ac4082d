"""The label strategies, used directly: registry, table strategies (random, k-means, human) and MAXL."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from helpers import TinyBNNet, TinyCNN, TinyMLP, assert_unchanged, batch, image_batch, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from auxlab import AuxLabelGenerator, HierarchyMask
from auxlab.data import IndexedDataset
from auxlab.generators import GENERATORS, HumanLabels, KMeansLabels, MAXLGenerator, RandomLabels
from auxlab.generators.kmeans import kmeans

PSI = [2, 3, 1]
MASK = HierarchyMask(PSI)
#: Six fine labels under the three classes of PSI: class 0 owns fine 1, 4; class 1 owns 0, 3, 5; class 2 owns 2.
FINE_TO_COARSE = [1, 0, 2, 1, 0, 1]
NUM_SAMPLES = 30


def toy_dataset() -> tuple[TensorDataset, Tensor]:
    """``(x, y)`` items whose labels ``y`` come from fine labels ``arange(N) % 6``; also returns the fine labels."""
    fine = torch.arange(NUM_SAMPLES) % len(FINE_TO_COARSE)
    y = torch.tensor(FINE_TO_COARSE)[fine]
    x = torch.randn(NUM_SAMPLES, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, y), fine


def build_random() -> RandomLabels:
    return RandomLabels(MASK, num_samples=NUM_SAMPLES, seed=0)


def build_kmeans() -> KMeansLabels:
    return KMeansLabels(MASK, dataset=toy_dataset()[0], seed=0)


def build_human() -> HumanLabels:
    return HumanLabels(MASK, fine_labels=toy_dataset()[1], fine_to_coarse=FINE_TO_COARSE)


TABLE_BUILDERS = {"random": build_random, "kmeans": build_kmeans, "human": build_human}
table_strategies = pytest.mark.parametrize("build", TABLE_BUILDERS.values(), ids=TABLE_BUILDERS.keys())


def assert_inside_blocks(targets: Tensor, mask: HierarchyMask, y: Tensor) -> None:
    assert (targets[~mask.rows(y)] == 0).all()
    assert torch.allclose(targets.sum(1), torch.ones(len(y), dtype=targets.dtype))


# ------------------------------------------------------------------------------ registry and base class
@pytest.fixture
def restore_registry() -> Iterator[None]:
    before = dict(GENERATORS)
    yield
    GENERATORS.clear()
    GENERATORS.update(before)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("maxl", MAXLGenerator), ("random", RandomLabels), ("kmeans", KMeansLabels), ("human", HumanLabels)],
)
def test_builtin_strategies_are_registered(name: str, cls: type[AuxLabelGenerator]) -> None:
    assert GENERATORS[name] is cls
    assert cls.name == name


@pytest.mark.usefixtures("restore_registry")
def test_a_user_subclass_registers_under_its_name() -> None:
    class Mine(AuxLabelGenerator, name="mine"):
        def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
            return self.mask.softmax(torch.zeros(len(y), self.mask.num_aux_classes), y)

    assert GENERATORS["mine"] is Mine
    assert Mine.name == "mine"
    assert not Mine(MASK).learns
    targets = Mine(MASK)(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    assert torch.allclose(targets[1], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3, 0]))


@pytest.mark.usefixtures("restore_registry")
def test_registering_a_taken_name_raises() -> None:
    with pytest.raises(ValueError, match=r"a label generator named 'random' is already registered \(RandomLabels\)"):

        class Impostor(AuxLabelGenerator, name="random"):
            pass

    assert GENERATORS["random"] is RandomLabels


def test_a_subclass_without_a_name_is_not_registered() -> None:
    class Unnamed(AuxLabelGenerator):
        pass

    assert Unnamed.name is None
    assert Unnamed not in GENERATORS.values()
    with pytest.raises(NotImplementedError, match=r"Unnamed must implement forward\(x, y, index=None\)"):
        Unnamed(MASK)(torch.zeros(1, 4), torch.tensor([0]))


@pytest.mark.parametrize(
    "build",
    [
        lambda mask: RandomLabels(mask, num_samples=3),
        lambda mask: HumanLabels(mask, fine_labels=[0], fine_to_coarse=[0]),
        lambda mask: KMeansLabels(mask, dataset=toy_dataset()[0]),
        lambda mask: MAXLGenerator(mask, network=nn.Linear(4, 1)),
        lambda mask: MAXLGenerator.from_model(mask, TinyMLP(), head_name="fc"),
    ],
    ids=["random", "human", "kmeans", "maxl", "maxl.from_model"],
)
def test_strategies_reject_a_psi_list_for_the_mask(build: Callable[[object], AuxLabelGenerator]) -> None:
    with pytest.raises(TypeError, match=r"mask must be a HierarchyMask, got list; build one with HierarchyMask\(psi\)"):
        build([1])


def test_only_maxl_learns() -> None:
    assert MAXLGenerator.from_model(MASK, TinyMLP(in_features=4), head_name="fc").learns
    for build in TABLE_BUILDERS.values():
        assert not build().learns


def test_one_hot_has_the_aux_width_and_dtype() -> None:
    assert build_random().one_hot(torch.tensor([5, 0]), dtype=torch.float64).tolist() == [
        [0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0],
    ]


# ------------------------------------------------------------------------------ table strategies: shared contract
@table_strategies
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_table_targets_are_one_hot_in_the_own_block(build: Callable[[], AuxLabelGenerator], dtype: torch.dtype) -> None:
    generator = build()
    dataset = toy_dataset()[0]
    index = torch.tensor([7, 0, 29, 3, 3, 12])
    x, y = dataset.tensors[0][index].to(dtype), dataset.tensors[1][index]

    targets = generator(x, y, index=index)

    assert generator.needs_index
    assert targets.shape == (6, MASK.num_aux_classes)
    assert targets.dtype == dtype
    assert set(targets.unique().tolist()) == {0.0, 1.0}
    assert_inside_blocks(targets, MASK, y)
    assert torch.equal(targets[3], targets[4])  # one fixed label per sample


@table_strategies
def test_table_labels_follow_the_index_not_the_batch_position(build: Callable[[], AuxLabelGenerator]) -> None:
    generator = build()
    x, y = toy_dataset()[0].tensors
    full = generator(x, y, index=torch.arange(NUM_SAMPLES))
    order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(1))
    assert torch.equal(generator(x[order], y[order], index=order), full[order])


@table_strategies
def test_integer_inputs_give_default_dtype_targets(build: Callable[[], AuxLabelGenerator]) -> None:
    y = toy_dataset()[0].tensors[1][:2]
    targets = build()(torch.zeros(2, 4, dtype=torch.uint8), y, index=torch.tensor([0, 1]))
    assert targets.dtype == torch.get_default_dtype()


@table_strategies
def test_the_table_is_the_whole_state_dict(build: Callable[[], AuxLabelGenerator]) -> None:
    generator = build()
    state = generator.state_dict()
    assert list(state) == ["table"]
    assert state["table"].shape == (NUM_SAMPLES,)
    assert state["table"].dtype == torch.long
    assert torch.equal(state["table"], generator.table)


def test_loading_a_state_dict_restores_the_labels() -> None:
    saved, other = (
        RandomLabels(MASK, num_samples=NUM_SAMPLES, seed=1),
        RandomLabels(MASK, num_samples=NUM_SAMPLES, seed=2),
    )
    x, y = toy_dataset()[0].tensors
    index = torch.arange(NUM_SAMPLES)
    assert not torch.equal(other(x, y, index=index), saved(x, y, index=index))
    other.load_state_dict(saved.state_dict())
    assert torch.equal(other(x, y, index=index), saved(x, y, index=index))


@table_strategies
@pytest.mark.parametrize(
    ("index", "error", "message"),
    [
        (None, ValueError, r"assigns a fixed label per training sample and needs index=.*IndexedDataset"),
        (
            torch.tensor([0.0, 1.0]),
            TypeError,
            r"index must be an integer tensor of dataset indices, got a torch.float32 tensor",
        ),
        (torch.tensor([True, False]), TypeError, "got a torch.bool tensor"),
        ([0, 1], TypeError, "index must be an integer tensor of dataset indices, got list"),
        (torch.tensor([[0], [1]]), ValueError, r"index must have shape \(2,\) to match y, got \(2, 1\)"),
        (
            torch.tensor([0, NUM_SAMPLES]),
            ValueError,
            (
                rf"index has value {NUM_SAMPLES} but .* covers {NUM_SAMPLES} training samples; "
                rf"indices must lie in \[0, {NUM_SAMPLES}\)"
            ),
        ),
        (torch.tensor([-1, 0]), ValueError, "index has value -1"),
    ],
    ids=["missing", "float", "bool", "list", "2d", "too-large", "negative"],
)
def test_table_strategies_reject_bad_indices(
    build: Callable[[], AuxLabelGenerator], index: object, error: type[Exception], message: str
) -> None:
    x, y = toy_dataset()[0].tensors
    with pytest.raises(error, match=message):
        build()(x[:2], y[:2], index=index)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ RandomLabels
def test_random_labels_are_seeded() -> None:
    def table(seed: int) -> Tensor:
        return RandomLabels(MASK, num_samples=100, seed=seed).table

    assert torch.equal(table(3), table(3))
    assert not torch.equal(table(3), table(4))


@given(psi=st.lists(st.integers(1, 7), min_size=1, max_size=12), data=st.data())
def test_random_labels_stay_inside_the_block(psi: list[int], data: st.DataObject) -> None:
    mask = HierarchyMask(psi)
    num_samples = data.draw(st.integers(1, 50))
    batch_size = data.draw(st.integers(1, 8))
    index = torch.tensor(data.draw(st.lists(st.integers(0, num_samples - 1), min_size=batch_size, max_size=batch_size)))
    y = torch.tensor(data.draw(st.lists(st.integers(0, len(psi) - 1), min_size=batch_size, max_size=batch_size)))

    targets = RandomLabels(mask, num_samples=num_samples, seed=data.draw(st.integers(0, 2**31)))(
        torch.zeros(batch_size, 1), y, index=index
    )

    assert_inside_blocks(targets, mask, y)


def test_random_labels_are_roughly_uniform_over_sub_classes() -> None:
    mask = HierarchyMask([2, 5, 3])
    num_samples = 30_000
    y = torch.arange(num_samples) % 3
    targets = RandomLabels(mask, num_samples=num_samples, seed=0)(
        torch.zeros(num_samples, 1), y, index=torch.arange(num_samples)
    )
    for c in range(3):
        counts = targets[y == c][:, mask.block(c).start : mask.block(c).stop].sum(0)
        expected = counts.sum() / len(counts)
        chi_square = ((counts - expected) ** 2 / expected).sum().item()
        assert chi_square < 30, f"class {c}: counts {counts.tolist()}"  # df <= 4: p < 1e-5


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True, "10", None])
def test_random_labels_reject_a_bad_num_samples(num_samples: object) -> None:
    with pytest.raises(ValueError, match=r"num_samples must be a positive integer \(the training set size\)"):
        RandomLabels(MASK, num_samples=num_samples)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ k-means
def blobs(sizes: list[int], *, points_per_blob: int = 12, dim: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Well-separated gaussian blobs, ``sizes[c]`` of them in class ``c``, shuffled.

    Returns ``(x, y, blob)``: inputs, class labels and the blob of each sample.
    """
    g = torch.Generator().manual_seed(seed)
    num_blobs = sum(sizes)
    centres = 100 * torch.randn(num_blobs, dim, generator=g)
    blob = torch.arange(num_blobs).repeat_interleave(points_per_blob)
    owner = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    x = centres[blob] + 0.1 * torch.randn(len(blob), dim, generator=g)
    order = torch.randperm(len(blob), generator=g)
    return x[order], owner[blob][order], blob[order]


def assert_same_partition(labels: Tensor, groups: Tensor) -> None:
    """``labels`` are constant within each group and distinct between groups."""
    pairs = set(zip(groups.tolist(), labels.tolist()))
    assert len(pairs) == len(set(groups.tolist())) == len(set(labels.tolist()))


def test_kmeans_labels_recover_the_blobs_of_each_class() -> None:
    x, y, blob = blobs(PSI)
    generator = KMeansLabels(MASK, dataset=TensorDataset(x, y), seed=0)
    assert_same_partition(generator.table, blob)
    targets = generator(x, y, index=torch.arange(len(y)))
    assert_inside_blocks(targets, MASK, y)


def test_kmeans_labels_are_seeded() -> None:
    x, y = batch(60, 4, 3, seed=5)  # no cluster structure: the seed decides
    mask = HierarchyMask.uniform(3, 4)

    def table(seed: int) -> Tensor:
        return KMeansLabels(mask, dataset=TensorDataset(x, y), seed=seed).table

    assert torch.equal(table(0), table(0))
    assert not torch.equal(table(0), table(1))


def test_kmeans_labels_cluster_the_given_features() -> None:
    # dimension 0 separates groups "a", dimension 1 (far larger) separates groups "b"
    i = torch.arange(40)
    group_a, group_b = i % 2, (i // 2) % 2
    x = torch.stack([10.0 * group_a, 1000.0 * group_b], dim=1) + 0.01 * torch.randn(
        40, 2, generator=torch.Generator().manual_seed(0)
    )
    dataset = IndexedDataset(TensorDataset(x, torch.zeros(40, dtype=torch.long)))  # extra items are ignored
    mask = HierarchyMask([2])
    calls = []

    def first_dimension(inputs: Tensor) -> Tensor:
        calls.append(len(inputs))
        return inputs[:, :1]

    assert_same_partition(KMeansLabels(mask, dataset=dataset, features=first_dimension, batch_size=16).table, group_a)
    assert calls == [16, 16, 8]
    assert_same_partition(KMeansLabels(mask, dataset=dataset).table, group_b)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 0, 1, 1, 1, 2], r"class 2 has 1 samples in dataset, fewer than psi\[2\]=2 clusters"),
        ([0, 0, 1, 1, 3, 2], r"dataset has label 3 but the hierarchy has 3 classes; labels must lie in \[0, 3\)"),
        ([0, 0, 1, -1, 2, 2], "dataset has label -1"),
    ],
    ids=["too-few-samples", "label-too-large", "negative-label"],
)
def test_kmeans_labels_reject_a_dataset_that_does_not_fit(labels: list[int], message: str) -> None:
    dataset = TensorDataset(torch.randn(6, 2), torch.tensor(labels))
    with pytest.raises(ValueError, match=message):
        KMeansLabels(HierarchyMask([2, 1, 2]), dataset=dataset)


def test_kmeans_labels_reject_an_empty_dataset() -> None:
    with pytest.raises(ValueError, match="dataset is empty"):
        KMeansLabels(MASK, dataset=TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


def test_kmeans_function_recovers_blobs() -> None:
    x, _, blob = blobs([4], points_per_blob=20)
    assignment = kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert assignment.shape == (80,)
    assert assignment.dtype == torch.long
    assert_same_partition(assignment, blob)


def test_kmeans_function_converges_to_a_lloyd_fixed_point() -> None:
    points = torch.randn(60, 2, generator=torch.Generator().manual_seed(3))
    assignment = kmeans(points, 5, generator=torch.Generator().manual_seed(0))
    centres = torch.stack([points[assignment == j].mean(0) for j in range(5)])
    assert torch.equal(torch.cdist(points, centres).argmin(1), assignment)  # every point sits with its nearest mean


def test_kmeans_function_is_deterministic_for_a_generator_seed() -> None:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))

    def assign(seed: int) -> Tensor:
        return kmeans(x, 5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(assign(1), assign(1))
    assert not torch.equal(assign(1), assign(2))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_kmeans_function_handles_duplicate_points_and_k_up_to_n(k: int) -> None:
    points = torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3)
    assignment = kmeans(points, k, generator=torch.Generator().manual_seed(0))
    assert ((0 <= assignment) & (assignment < k)).all()
    if k == 1:
        assert (assignment == 0).all()
    else:
        assert assignment[0] != assignment[3]


@pytest.mark.parametrize("k", [0, 7, 2.0, True])
def test_kmeans_function_rejects_a_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, 6\] for 6 points, got {k!r}"):
        kmeans(torch.randn(6, 2), k, generator=torch.Generator())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ human labels
HUMAN_FINE_TO_COARSE = [
    0,
    1,
    0,
    2,
    1,
]  # class 0: fine 0, 2 -> columns 0, 1; class 1: fine 1, 4 -> 2, 3; class 2: fine 3 -> 4


def test_human_labels_map_fine_labels_to_their_columns() -> None:
    fine = torch.tensor([3, 0, 4, 2, 1, 1])
    y = torch.tensor(HUMAN_FINE_TO_COARSE)[fine]
    mask = HierarchyMask.from_fine_to_coarse(HUMAN_FINE_TO_COARSE)
    generator = HumanLabels(mask, fine_labels=fine.tolist(), fine_to_coarse=HUMAN_FINE_TO_COARSE)

    targets = generator(torch.zeros(6, 2), y, index=torch.arange(6))

    assert targets.argmax(1).tolist() == [4, 0, 3, 1, 2, 2]
    assert_inside_blocks(targets, mask, y)


def test_human_labels_need_the_mask_of_the_fine_to_coarse_map() -> None:
    with pytest.raises(
        ValueError,
        match=r"fine_to_coarse gives \[2, 2, 1\] fine labels per class but this hierarchy has psi=\[2, 2, 2\]",
    ):
        HumanLabels(HierarchyMask.uniform(3, 2), fine_labels=[0, 1], fine_to_coarse=HUMAN_FINE_TO_COARSE)


@pytest.mark.parametrize(
    ("fine_labels", "message"),
    [
        ([0, 5], r"fine_labels has label 5 but fine_to_coarse names 5 fine labels; fine labels must lie in \[0, 5\)"),
        ([-1, 0], "fine_labels has label -1"),
        ([0.0, 1.0], "fine_labels must be a non-empty 1-D sequence of integer labels, got torch.float32"),
        ([[0, 1]], r"of shape \(1, 2\)"),
        ([], "fine_labels must be a non-empty"),
    ],
    ids=["too-large", "negative", "float", "2d", "empty"],
)
def test_human_labels_reject_bad_fine_labels(fine_labels: list[object], message: str) -> None:
    mask = HierarchyMask.from_fine_to_coarse(HUMAN_FINE_TO_COARSE)
    with pytest.raises(ValueError, match=message):
        HumanLabels(mask, fine_labels=fine_labels, fine_to_coarse=HUMAN_FINE_TO_COARSE)  # type: ignore[arg-type]


def test_human_labels_reject_a_label_that_contradicts_the_fine_label() -> None:
    mask = HierarchyMask.from_fine_to_coarse(HUMAN_FINE_TO_COARSE)
    generator = HumanLabels(mask, fine_labels=[0, 3], fine_to_coarse=HUMAN_FINE_TO_COARSE)  # sample 1 is in class 2
    with pytest.raises(
        ValueError,
        match=r"sample with index 1 has label y=0 .* auxiliary column 4, outside block range\(0, 2\) of class 0",
    ):
        generator(torch.zeros(2, 2), torch.tensor([0, 0]), index=torch.tensor([0, 1]))


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


def test_a_subclass_of_a_registered_strategy_is_not_registered_under_its_parents_name() -> None:
    class MyRandom(RandomLabels):
        """Random labels under another class."""

    assert MyRandom.name is None and GENERATORS["random"] is RandomLabels
    table = MyRandom(MASK, num_samples=4)
    with pytest.raises(ValueError, match="the 'MyRandom' strategy assigns a fixed label per training sample"):
        table(torch.zeros(2, 4), torch.tensor([0, 1]))
