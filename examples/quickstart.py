"""Quickstart: single-task vs MAXL on scikit-learn's digits, in well under a minute on 2 CPU cores.

    python examples/quickstart.py            # 3 seeds, 10 epochs each
    python examples/quickstart.py --smoke    # a few batches, to check that it runs

The same loop trains both: only ``generator=`` differs. Digits is small and easy (about 98% for
both), so this shows how to use auxlab, not how much MAXL helps: see the experiments for that.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from auxlab import MetaAuxWrapper
from auxlab.datasets import load_digits


class SmallCNN(nn.Module):
    """Two 3x3 conv layers with BatchNorm, then a linear classifier: the user's own model."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(generator: str, *, epochs: int, seed: int, max_batches: int | None = None) -> float:
    """Train a fresh SmallCNN with ``generator`` ("single" or "maxl"); return its test accuracy."""
    train_set, test_set = load_digits(split="train", seed=0), load_digits(split="test", seed=0)
    torch.manual_seed(seed)
    model = SmallCNN()
    wrapper = MetaAuxWrapper(model, num_classes=10, psi=5, generator=generator, seed=seed)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        for step, (x, y) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            loss = wrapper.loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            wrapper.meta_step(x, y)
    model.eval()  # after training, the model alone is the classifier
    with torch.no_grad():
        predictions = model(test_set.images).argmax(1)
    return (predictions == test_set.labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one epoch of two batches, one seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 1 is fastest for this tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, seeds, max_batches = (1, 1, 2) if args.smoke else (args.epochs, args.seeds, None)
    for generator in ("single", "maxl"):
        start = time.perf_counter()
        accuracies = torch.tensor([train(generator, epochs=epochs, seed=s, max_batches=max_batches) for s in range(seeds)])
        spread = f" +- {accuracies.std().item():.2%}" if seeds > 1 else ""
        print(f"{generator:>6}: test accuracy {accuracies.mean().item():.2%}{spread} over {seeds} seed(s), "
              f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
