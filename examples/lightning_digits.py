"""MAXL under PyTorch Lightning: a small CNN on scikit-learn's digits, trained by a ``Trainer``.

    python examples/lightning_digits.py                        # 10 epochs on one CPU process
    python examples/lightning_digits.py --smoke                # a few batches, to check that it runs
    python examples/lightning_digits.py --devices 2            # two CPU processes (strategy="ddp")
    python examples/lightning_digits.py --resume outputs/lightning_digits/checkpoints/last.ckpt --epochs 12

The classifier is an ordinary ``nn.Module``; ``auxlab.lightning.MetaAuxModule`` turns it into a
``LightningModule`` that trains it with MAXL (a label generator meta-learns the sub-class labels of
an auxiliary head). Everything the run writes goes under ``--out`` (default ``outputs/lightning_digits/``):
``logs/version_N/metrics.csv`` (every logged loss, label diagnostic and accuracy, by Lightning's
CSVLogger; a new version for each run) and ``checkpoints/`` (the best epoch by validation accuracy
and ``last.ckpt``, from which ``--resume`` continues exactly). Needs ``pip install "auxlab[lightning,examples]"``.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from auxlab.datasets import load_digits, stratified_split_indices, train_val_split
from auxlab.lightning import MetaAuxModule


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

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.classifier(self.features(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (1 with --smoke)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; more than 1 trains with strategy='ddp'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/lightning_digits"), help="folder for logs/ and checkpoints/")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint to continue from (e.g. OUT/checkpoints/last.ckpt)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--smoke", action="store_true", help="about 180 training images (2 batches), 1 epoch by default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)

    train_set, val_set = train_val_split(load_digits(split="train", seed=0), val_fraction=0.1, seed=0)
    test_set = load_digits(split="test", seed=0)
    if args.epochs is None:
        args.epochs = 1 if args.smoke else 10
    if args.smoke:
        train_set = train_set.subset(stratified_split_indices(train_set.labels, fraction=0.15, seed=0)[1])
    batch_size = 64 // args.devices  # the same global batch on any number of processes

    module = MetaAuxModule(
        SmallCNN(), num_classes=10, psi=5, seed=args.seed, diagnostics_every=5,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    logger = CSVLogger(args.out, name="logs")  # a new logs/version_N/ for each run, a resumed one too
    checkpoints = ModelCheckpoint(dirpath=args.out / "checkpoints", monitor="val/accuracy", mode="max", save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        logger=logger, callbacks=[checkpoints], log_every_n_steps=1 if args.smoke else 5,
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(
        module, DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True),
        DataLoader(val_set, batch_size=256), ckpt_path=args.resume,
    )
    trained = {name: float(value) for name, value in trainer.callback_metrics.items()}
    tested = trainer.test(module, DataLoader(test_set, batch_size=256), verbose=False)[0]
    if trainer.is_global_zero:
        print(f"MAXL with Lightning: {trainer.current_epoch} epoch(s), {trainer.global_step} steps on {args.devices} process(es), "
              f"{time.perf_counter() - start:.1f} s")
        print(f"  last epoch: training loss {trained['train/loss_epoch']:.3f} (primary {trained['train/primary_loss_epoch']:.4f}, "
              f"auxiliary {trained['train/auxiliary_loss_epoch']:.3f}), validation accuracy {100 * trained['val/accuracy']:.2f} %")
        print(f"  labels: confidence {trained['train/label_confidence']:.3f}, "
              f"{100 * trained['train/subclasses_used']:.0f} % of the sub-classes in use")
        print(f"  test accuracy {100 * tested['test/accuracy']:.2f} %")
        print(f"  wrote {Path(logger.log_dir) / 'metrics.csv'} and {args.out / 'checkpoints'}/ (last.ckpt resumes with --resume)")


if __name__ == "__main__":
    main()
