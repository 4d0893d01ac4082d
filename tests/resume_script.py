"""Train a few steps, optionally stopping to save and resuming from a checkpoint in a new process.

Used by tests/test_checkpoint.py. The loop draws its batches from torch's, NumPy's and Python's
global random generators and the model uses dropout, so an exact continuation needs every random
state, the optimizer, the scheduler and the generator optimizer restored.
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch
from torch import nn

from auxlab import MetaAuxWrapper
from auxlab.checkpoint import load_checkpoint, save_checkpoint


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def build() -> tuple[MetaAuxWrapper, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    wrapper = MetaAuxWrapper(DropoutNet(), num_classes=3, psi=[2, 1, 3], generator_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return wrapper, optimizer, scheduler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True, help="run until this many steps in total")
    parser.add_argument("--save", help="write a checkpoint here at the end")
    parser.add_argument("--load", help="resume from this checkpoint")
    parser.add_argument("--out", required=True, help="write the final state and losses here")
    args = parser.parse_args()

    wrapper, optimizer, scheduler = build()
    start, losses = 0, []
    if args.load:
        counters = load_checkpoint(args.load, wrapper, optimizer=optimizer, scheduler=scheduler)
        start = int(counters["step"])
    else:
        torch.manual_seed(1)
        np.random.seed(1)
        random.seed(1)
    for _ in range(start, args.steps):
        x = torch.randn(10, 6) + float(np.random.uniform()) + random.random()
        y = torch.randint(0, 3, (10,))
        loss = wrapper.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        wrapper.meta_step(x, y)
        losses.append(loss.detach())
    if args.save:
        save_checkpoint(args.save, wrapper, optimizer=optimizer, scheduler=scheduler, step=args.steps)
    torch.save({"state": wrapper.state_dict(), "losses": losses, "optimizer": optimizer.state_dict()}, args.out)


if __name__ == "__main__":
    sys.exit(main())
