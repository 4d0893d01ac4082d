"""Quickstart: single-task vs MAXL on scikit-learn's digits, in well under a minute on 2 CPU cores.

    python examples/quickstart.py            # 3 seeds, 10 epochs each
    python examples/quickstart.py --smoke    # a few batches, to check that it runs

The same loop trains both: only ``generator=`` differs. Digits is small and easy (about 98% for
both), so this shows how to use auxlab, not how much MAXL helps: see the experiments for that.
A progress bar per run needs tqdm (``pip install "auxlab[progress]"``); the script ends by saying
what the numbers it printed mean.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from auxlab import MetaAuxWrapper
from auxlab.datasets import load_digits
from auxlab.experiments.training import progress_bar

#: The loss parts the script reports, as ``wrapper.last_losses`` names them ("auxiliary" only with MAXL).
PARTS = ("primary", "auxiliary")

EXPLANATION = """\
What the numbers mean:
- test accuracy: the share of the 449 held-out test digits that the trained classifier gets right
  (mean +- standard deviation over the seeds). "single" trains the classifier alone; "maxl" trains
  the same classifier, on the same batches, with an auxiliary task whose labels MAXL's generator
  invents. Either way the classifier is used alone afterwards, so the two compare like for like.
  Digits is easy: both reach about 98%, and a few tenths of a point either way is seed noise.
- primary loss: the cross entropy of the digit predictions on the training batches (mean over the
  last epoch), the loss a plain training loop prints.
- auxiliary loss (maxl only): the auxiliary head's cross entropy against the generator's soft
  labels over each digit's 5 sub-classes. While those labels are nearly uniform it cannot fall
  below ln 5 = 1.61, however well the model learns: a value near 1.61 says the labels carry
  little yet, not that training failed. wrapper.loss() and wrapper.step() return
  primary + aux_weight * auxiliary (aux_weight is 1 here), which is why that sum is not comparable
  with a plain loop's loss; wrapper.last_losses holds the parts.
- time: wall time of all the seeds, in seconds; MAXL's meta step makes every batch cost more."""


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


def train(generator: str, *, epochs: int, seed: int, max_batches: int | None = None) -> tuple[float, dict[str, float]]:
    """Train a fresh SmallCNN with ``generator`` ("single" or "maxl"); return its test accuracy and the
    last epoch's mean training loss of each part ("primary", and "auxiliary" with MAXL)."""
    train_set, test_set = load_digits(split="train", seed=0), load_digits(split="test", seed=0)
    torch.manual_seed(seed)
    model = SmallCNN()
    wrapper = MetaAuxWrapper(model, num_classes=10, psi=5, generator=generator, seed=seed)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = progress_bar(epochs * batches, f"{generator} seed {seed}", True)  # a tqdm bar; None without tqdm
    for _ in range(epochs):
        model.train()
        losses: list[dict[str, float]] = []  # this epoch's loss parts, one dict per batch
        for step, (x, y) in enumerate(loader):
            if step >= batches:
                break
            loss = wrapper.loss(x, y)  # primary + aux_weight * auxiliary
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            wrapper.meta_step(x, y)
            losses.append({part: wrapper.last_losses[part].item() for part in PARTS if part in wrapper.last_losses})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({part: f"{value:.3f}" for part, value in losses[-1].items()}, refresh=False)
    if bar is not None:
        bar.close()
    model.eval()  # after training, the model alone is the classifier
    with torch.no_grad():
        predictions = model(test_set.images).argmax(1)
    last_epoch = {part: sum(batch[part] for batch in losses) / len(losses) for part in losses[0]}
    return (predictions == test_set.labels).float().mean().item(), last_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one epoch of two batches, one seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 1 is fastest for this tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, seeds, max_batches = (1, 1, 2) if args.smoke else (args.epochs, args.seeds, None)
    print(f"A small CNN on scikit-learn's digits, single task then MAXL: {seeds} seed(s) of {epochs} epoch(s) each.")
    if importlib.util.find_spec("tqdm") is None:
        print('(pip install "auxlab[progress]" to see a progress bar)')
    for generator in ("single", "maxl"):
        start = time.perf_counter()
        runs = [train(generator, epochs=epochs, seed=s, max_batches=max_batches) for s in range(seeds)]
        accuracies = torch.tensor([accuracy for accuracy, _ in runs])
        spread = f" +- {accuracies.std().item():.2%}" if seeds > 1 else ""
        losses = ", ".join(f"{part} {sum(parts[part] for _, parts in runs) / seeds:.3f}" for part in runs[0][1])
        print(f"{generator:>6}: test accuracy {accuracies.mean().item():.2%}{spread} over {seeds} seed(s); "
              f"last-epoch training loss: {losses}; {time.perf_counter() - start:.1f} s")
    print()
    print(EXPLANATION)


if __name__ == "__main__":
    main()
