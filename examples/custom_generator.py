"""A label strategy of your own: k-means clusters of a pretrained network's features, on digits.

    python examples/custom_generator.py            # 10 epochs, 3 seeds
    python examples/custom_generator.py --smoke    # 200 training images, 1 epoch, 1 seed

``PretrainedKMeans`` subclasses ``auxlab.AuxLabelGenerator``. When it is built, it clusters the
penultimate features of a pretrained network within each primary class into psi clusters, and
from then on gives every training sample its cluster as a fixed auxiliary label (looked up by the
sample's dataset index, hence ``needs_index = True``). The "pretrained" network here is a copy of
the classifier trained for one epoch on the same training set. ``name="pretrained-kmeans"``
registers the class, so the wrapper can build it by name as well as take an instance; with the
same seed both give the same run. Single task and the built-in "kmeans" (k-means on the pixels)
train alongside for comparison. Saves subclasses.png (example digits of each sub-class) in the --out
folder (default outputs/custom_generator).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from auxlab import AuxLabelGenerator, HierarchyMask, MetaAuxWrapper
from auxlab.data import IndexedDataset
from auxlab.datasets import ImageDataset, load_digits, stratified_split_indices
from auxlab.generators.kmeans import kmeans

PSI = 5  # auxiliary sub-classes per digit


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU layers, a max-pool, then a linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.classifier(self.features(x)))


class PretrainedKMeans(AuxLabelGenerator, name="pretrained-kmeans"):
    """Sub-class = k-means cluster of the sample's pretrained features, within its primary class.

    Args:
        mask: the hierarchy; class c gets psi[c] clusters.
        extractor: maps (B, ...) images to (B, D) features; used once, here, and not kept.
        dataset: the training set; labels are given to its samples by their index in it.
        seed: seed of the k-means++ initialisation.
    """

    needs_index = True  # forward reads the samples' dataset indices
    seeded = True       # built by name, it gets the wrapper's seed
    table: Tensor

    def __init__(self, mask: HierarchyMask, *, extractor: nn.Module, dataset: ImageDataset, seed: int = 0) -> None:
        super().__init__(mask)
        with torch.no_grad():
            features = extractor.eval()(dataset.images).flatten(1)  # (N, D)
        generator = torch.Generator().manual_seed(seed)
        table = torch.empty(len(dataset), dtype=torch.long)
        for c, k in enumerate(mask.psi):
            members = (dataset.labels == c).nonzero().squeeze(1)
            table[members] = mask.block(c).start + kmeans(features[members], k, generator=generator)
        self.register_buffer("table", table)  # (N,) auxiliary column of each training sample, saved in state_dict

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        assert index is not None, "needs_index: the wrapper passes index="
        return self.one_hot(self.table[index], dtype=x.dtype)  # (B, K), one 1 inside block y


def pretrain(train_set: ImageDataset) -> nn.Module:
    """One epoch of plain training; its penultimate layer (``features``) is the extractor."""
    torch.manual_seed(100)
    network = SmallCNN()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(100))
    network.train()
    for x, y in loader:
        loss = nn.functional.cross_entropy(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.features


def train(wrapper: MetaAuxWrapper, train_set: ImageDataset, *, epochs: int, seed: int) -> None:
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    wrapper.train()
    for _ in range(epochs):
        for x, y, index in loader:  # index: each sample's position in train_set
            wrapper.step(x, y, optimizer, index=index)


def build(strategy: str, seed: int, *, mask: HierarchyMask, extractor: nn.Module, train_set: ImageDataset) -> MetaAuxWrapper:
    """The same classifier (the same initial weights for a seed), with each strategy's auxiliary labels."""
    torch.manual_seed(seed)
    model = SmallCNN()
    kwargs: dict[str, Any] | None = None
    if strategy == "pretrained-kmeans (instance)":  # an instance: you build it, with its own arguments
        labels = PretrainedKMeans(mask, extractor=extractor, dataset=train_set, seed=seed)
        return MetaAuxWrapper(model, num_classes=10, mask=mask, generator=labels, seed=seed)
    if strategy == "pretrained-kmeans (by name)":  # by name: the wrapper builds it from generator_kwargs...
        kwargs = {"extractor": extractor, "dataset": train_set}  # ...and adds seed=seed, since it is seeded
    if strategy == "kmeans":  # the built-in k-means, on the pixels
        kwargs = {"dataset": train_set}
    name = strategy.removesuffix(" (by name)")
    return MetaAuxWrapper(model, num_classes=10, mask=mask, generator=name, generator_kwargs=kwargs, seed=seed)


def plot_subclasses(labels: PretrainedKMeans, images: Tensor, path: Path, *, classes: int = 3, shown: int = 8) -> None:
    """The first training images of each sub-class of the first ``classes`` digits, one row per sub-class."""
    from matplotlib.figure import Figure  # optional dependency: pip install "auxlab[plot]"

    columns = [(c, k) for c in range(classes) for k in labels.mask.block(c)]
    figure = Figure(figsize=(0.6 * shown + 1.2, 0.6 * len(columns)), layout="constrained")
    axes = figure.subplots(len(columns), shown, squeeze=False)
    for row, (c, k) in enumerate(columns):
        members = (labels.table == k).nonzero().squeeze(1)
        for j, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(members):
                ax.imshow(images[members[j], 0], cmap="gray_r")
            else:
                ax.set_frame_on(False)
        sub = k - labels.mask.block(c).start
        axes[row][0].set_ylabel(f"digit {c}, sub {sub}\n{len(members)} images", rotation=0, ha="right", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("outputs/custom_generator"), help="folder for subclasses.png")
    parser.add_argument("--smoke", action="store_true", help="200 training images, 1 epoch, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = load_digits(split="train", seed=0), load_digits(split="test", seed=0)
    if args.smoke:
        args.epochs, args.seeds = 1, 1
        train_set = train_set.subset(stratified_split_indices(train_set.labels, fraction=0.15, seed=0)[1])
    extractor = pretrain(train_set)
    mask = HierarchyMask.uniform(10, PSI)
    try:
        plot_subclasses(PretrainedKMeans(mask, extractor=extractor, dataset=train_set), train_set.images, args.out / "subclasses.png")
        print(f"saved subclasses.png in {args.out}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")

    for strategy in ("single", "kmeans", "pretrained-kmeans (instance)", "pretrained-kmeans (by name)"):
        start, accuracies = time.perf_counter(), []
        for seed in range(args.seeds):
            wrapper = build(strategy, seed, mask=mask, extractor=extractor, train_set=train_set)
            train(wrapper, train_set, epochs=args.epochs, seed=seed)
            wrapper.eval()
            with torch.no_grad():
                accuracies.append((wrapper(test_set.images).argmax(1) == test_set.labels).float().mean().item())
        acc = 100 * torch.tensor(accuracies)
        spread = f" ± {acc.std().item():.2f}" if args.seeds > 1 else ""
        print(f"{strategy:>29}: test accuracy {acc.mean().item():.2f}{spread} % over {args.seeds} seed(s), "
              f"{time.perf_counter() - start:.1f} s  (per seed: {', '.join(f'{a:.2f}' for a in acc.tolist())})")


if __name__ == "__main__":
    main()
