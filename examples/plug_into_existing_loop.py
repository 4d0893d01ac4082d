"""Adding MAXL to a plain PyTorch training loop: three lines change, and a fourth keeps the logged loss comparable.

    python examples/plug_into_existing_loop.py            # 10 epochs, 3 seeds, before and after
    python examples/plug_into_existing_loop.py --smoke    # 200 training images, 1 epoch, 1 seed

``train_before`` is an ordinary loop (model, optimizer, DataLoader, loop) on scikit-learn's digits;
``train_after`` is the same function with MAXL added. The four lines that differ end with
``# auxlab: changed line``:

    from auxlab import MetaAuxWrapper       # new
    model = MetaAuxWrapper(SmallCNN(), num_classes=10, psi=5, engine="jvp", seed=seed)
                                            # was: model = SmallCNN()
    model.step(x, y, optimizer)             # was: loss = nn.functional.cross_entropy(model(x), y)
    losses.append(model.last_losses["primary"].item())
                                            # was: losses.append(loss.item())

``model.step`` does the loop's update itself (zero_grad, backward, optimizer.step) and MAXL's meta
step on the same batch, so the three update lines that followed the loss go. It returns the loss
it trained on, primary + auxiliary, which is larger than the plain loop's loss without anything
being wrong; ``model.last_losses["primary"]`` is the plain loop's figure, so the log line reads it.
Everything else stays: the optimizer takes ``model.parameters()`` (now the classifier's and the
auxiliary head's), and ``model.train()``, ``model.eval()`` and ``model(x)`` work as before. The
script runs both loops on the same data and seeds and prints both test accuracies and both
training losses.
"""

from __future__ import annotations

import argparse
import time
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from auxlab import MetaAuxWrapper  # auxlab: changed line
from auxlab.datasets import ImageDataset, load_digits, stratified_split_indices


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


def train_before(train_set: ImageDataset, test_set: ImageDataset, *, epochs: int, seed: int) -> tuple[float, float]:
    """The loop as it was: plain supervised training. Returns the last epoch's mean loss and the test accuracy."""
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        losses = []
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_set.images).argmax(1) == test_set.labels).float().mean().item()
    return sum(losses) / len(losses), accuracy


def train_after(train_set: ImageDataset, test_set: ImageDataset, *, epochs: int, seed: int) -> tuple[float, float]:
    """The same loop with MAXL (three lines differ here, and the import). It logs the primary loss, as before."""
    torch.manual_seed(seed)
    model = MetaAuxWrapper(SmallCNN(), num_classes=10, psi=5, engine="jvp", seed=seed)  # auxlab: changed line
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        model.train()
        losses = []
        for x, y in loader:
            model.step(x, y, optimizer)  # auxlab: changed line
            losses.append(model.last_losses["primary"].item())  # auxlab: changed line
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_set.images).argmax(1) == test_set.labels).float().mean().item()
    return sum(losses) / len(losses), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="200 training images, 1 epoch, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = load_digits(split="train", seed=0), load_digits(split="test", seed=0)
    if args.smoke:
        args.epochs, args.seeds = 1, 1
        train_set = train_set.subset(stratified_split_indices(train_set.labels, fraction=0.15, seed=0)[1])
    for name, train in (("before (plain loop)", train_before), ("after (with MAXL)", train_after)):
        start = time.perf_counter()
        results = torch.tensor([train(train_set, test_set, epochs=args.epochs, seed=seed) for seed in range(args.seeds)])
        loss, accuracy = results[:, 0], 100 * results[:, 1]
        spread = f" ± {accuracy.std().item():.2f}" if args.seeds > 1 else ""
        print(f"{name:>19}: test accuracy {accuracy.mean().item():.2f}{spread} % over {args.seeds} seed(s) "
              f"(per seed: {', '.join(f'{a:.2f}' for a in accuracy.tolist())}), "
              f"last-epoch primary loss {loss.mean().item():.3f}, {time.perf_counter() - start:.1f} s")
    print("primary loss: the training batches' cross entropy on the digits, what the plain loop logs. With MAXL,\n"
          "model.step returns primary + auxiliary (the auxiliary head's loss on MAXL's labels, at least ln 5 = 1.61\n"
          "while they are nearly uniform); model.last_losses holds both parts.")


if __name__ == "__main__":
    main()
