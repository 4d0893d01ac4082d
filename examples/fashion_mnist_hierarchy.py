"""Coarse Fashion-MNIST: single task, human auxiliary labels and MAXL, on the same model, data and seeds.

The primary task has 5 groups of clothes: tops (T-shirt, pullover, coat, shirt), trouser, dress,
footwear (sandal, sneaker, ankle boot) and bag. Each group owns as many auxiliary sub-classes as it
has fine classes, psi = [4, 1, 1, 3, 1]. Three strategies train the same CNN:

- single: the 5-way task alone;
- human:  the dataset's 10 fine classes as the auxiliary labels (the paper's reference for MAXL);
- maxl:   auxiliary labels invented by MAXL's label generator, without the fine labels.

    python examples/fashion_mnist_hierarchy.py                    # 5,000 training images, 5 epochs, 3 seeds
    python examples/fashion_mnist_hierarchy.py --smoke            # seconds: 500 images, 1 epoch, 1 seed
    python examples/fashion_mnist_hierarchy.py --data-root ~/fmnist --limit-train 60000 --epochs 20

Needs the Fashion-MNIST idx files (Debian/Ubuntu: apt-get install -y dataset-fashion-mnist). It prints
the test accuracy of each strategy (mean ± std over seeds) and saves accuracy_curves.png (validation
accuracy per epoch) in the --out folder (default outputs/fashion_mnist_hierarchy). SGD with momentum and a cosine learning-rate schedule over the epochs;
MAXL's virtual step uses the model's current learning rate, as in the paper.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from auxlab import HierarchyMask, MetaAuxWrapper
from auxlab.data import IndexedDataset
from auxlab.datasets import (
    FASHION_MNIST_FINE_TO_COARSE,
    FASHION_MNIST_ROOT,
    ImageDataset,
    load_fashion_mnist,
    stratified_split_indices,
    train_val_split,
)

STRATEGIES = ("single", "human", "maxl")
LR = 0.05


class FashionCNN(nn.Module):
    """Three conv-BatchNorm-ReLU blocks, global average pooling, then a linear 5-way classifier."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)  # the primary head; the auxiliary head reads its input

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.classifier(self.features(x)))


def load_data(
    data_root: str, limit_train: int | None, limit_test: int | None
) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(train, val, test): a stratified subset of the training set, 10% of it held out for the curves."""
    full, test = (load_fashion_mnist(data_root, split=s, coarse=True) for s in ("train", "test"))
    if limit_train is not None and limit_train < len(full):
        full = full.subset(stratified_split_indices(full.labels, fraction=limit_train / len(full), seed=0)[1])
    if limit_test is not None and limit_test < len(test):
        test = test.subset(stratified_split_indices(test.labels, fraction=limit_test / len(test), seed=0)[1])
    train, val = train_val_split(full, val_fraction=0.1, seed=0)
    return train, val, test


def accuracy(model: nn.Module, data: ImageDataset) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=500))
    return correct / len(data)


def run(strategy: str, train: ImageDataset, val: ImageDataset, *, epochs: int, seed: int) -> tuple[list[float], nn.Module]:
    """Train a fresh FashionCNN with one strategy; returns the validation accuracy after each epoch, and the model."""
    torch.manual_seed(seed)  # the same initial weights for every strategy
    model = FashionCNN()
    mask = HierarchyMask.from_fine_to_coarse(FASHION_MNIST_FINE_TO_COARSE)  # psi = (4, 1, 1, 3, 1)
    kwargs = {"fine_labels": train.fine_labels, "fine_to_coarse": FASHION_MNIST_FINE_TO_COARSE} if strategy == "human" else None
    wrapper = MetaAuxWrapper(
        model, num_classes=5, mask=mask, generator=strategy, generator_kwargs=kwargs,
        inner_lr=LR, engine="jvp", seed=seed,
    )
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    batches = torch.Generator().manual_seed(seed)  # the same batch order for every strategy
    loader = DataLoader(IndexedDataset(train), batch_size=64, shuffle=True, generator=batches)
    curve = []
    for _ in range(epochs):
        wrapper.train()
        for x, y, index in loader:  # index: each sample's position in train, for the human labels
            wrapper.step(x, y, optimizer, index=index)  # model step + meta step (MAXL only) on this batch
        scheduler.step()
        wrapper.inner_lr = scheduler.get_last_lr()[0]  # the virtual step's learning rate follows the model's
        curve.append(accuracy(model, val))
    return curve, model


def plot(curves: dict[str, Tensor], path: Path) -> None:
    """Validation accuracy per epoch, mean over seeds with a band of +- 1 std."""
    from matplotlib.figure import Figure  # optional dependency: pip install "auxlab[plot]"

    seeds, epochs = next(iter(curves.values())).shape
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for strategy, runs in curves.items():  # runs: (seeds, epochs)
        mean, std = 100 * runs.mean(0), 100 * (runs.std(0) if seeds > 1 else torch.zeros(epochs))
        ax.plot(range(1, epochs + 1), mean, marker="o", label=strategy)
        ax.fill_between(range(1, epochs + 1), mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"Coarse Fashion-MNIST: mean ± std over {seeds} seed(s)")
    ax.set_xticks(range(1, epochs + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=FASHION_MNIST_ROOT, help="directory of the Fashion-MNIST idx files")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0 .. seeds-1")
    parser.add_argument("--limit-train", type=int, default=5000, help="stratified subset of the 60,000 training images")
    parser.add_argument("--limit-test", type=int, default=None, help="stratified subset of the 10,000 test images")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("outputs/fashion_mnist_hierarchy"), help="folder for accuracy_curves.png")
    parser.add_argument("--smoke", action="store_true", help="500 training and 500 test images, 1 epoch, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.limit_train, args.limit_test, args.epochs, args.seeds = 500, 500, 1, 1

    try:
        train, val, test = load_data(args.data_root, args.limit_train, args.limit_test)
    except FileNotFoundError as error:  # the message says how to install Fashion-MNIST
        parser.error(f"{error} (In this example, give the directory with --data-root.)")
    print(f"coarse Fashion-MNIST: {len(train)} train, {len(val)} val, {len(test)} test images; "
          f"{args.epochs} epoch(s), {args.seeds} seed(s)")
    curves: dict[str, Tensor] = {}
    rows: list[str] = []
    for strategy in STRATEGIES:
        start, runs, tests = time.perf_counter(), [], []  # runs: validation curves; tests: test accuracies
        for seed in range(args.seeds):
            curve, model = run(strategy, train, val, epochs=args.epochs, seed=seed)
            runs.append(curve)
            tests.append(accuracy(model, test))  # the test set is read once per run, after training
        curves[strategy], acc = torch.tensor(runs), 100 * torch.tensor(tests)
        std = acc.std().item() if args.seeds > 1 else 0.0
        rows.append(f"| {strategy:<8} | {acc.mean().item():6.2f} ± {std:4.2f} | {time.perf_counter() - start:8.1f} |")
    print("\n| strategy | test acc. (%) | time (s) |\n|----------|---------------|----------|")
    print("\n".join(rows))
    try:
        plot(curves, args.out / "accuracy_curves.png")
        print(f"saved accuracy_curves.png in {args.out}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
