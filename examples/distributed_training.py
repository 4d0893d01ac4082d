"""Data-parallel MAXL across processes with torch.distributed (gloo on CPU, nccl on GPUs).

    torchrun --nproc_per_node 2 examples/distributed_training.py   # under torchrun
    python examples/distributed_training.py                        # spawns 2 CPU processes itself
    python examples/distributed_training.py --smoke                # a few batches, to check that it runs

Each rank trains on its own shard of every epoch (DistributedSampler) with
``MetaAuxWrapper(..., distributed=True, engine="jvp")``; ``wrapper.step`` averages the model
step's gradient and computes the hypergradient of the whole global batch, so all ranks keep
identical classifiers and generators, which the script checks at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from auxlab import MetaAuxWrapper
from auxlab.datasets import load_digits


def make_model(num_classes: int = 10) -> nn.Module:
    """The user's classifier: a small CNN ending in a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes)
    )


def train(args: argparse.Namespace) -> None:
    """One rank's training loop; the process group is already initialised."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    train_set, test_set = load_digits(split="train"), load_digits(split="test")
    torch.manual_seed(args.seed)
    model = make_model()
    wrapper = MetaAuxWrapper(model, num_classes=10, psi=5, engine="jvp", distributed=True, seed=args.seed)
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.05, momentum=0.9)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for step, (x, y) in enumerate(loader):
            if args.max_batches is not None and step >= args.max_batches:
                break
            wrapper.step(x, y, optimizer)  # returns primary + aux_weight * auxiliary
        if rank == 0:  # the latest batch's loss parts and meta objective, global-batch values
            losses = wrapper.last_losses
            print(f"epoch {epoch + 1}/{args.epochs}: primary loss {float(losses['primary']):.4f} "
                  f"(auxiliary {float(losses['auxiliary']):.4f}), meta objective {float(wrapper.last_meta_objective or 0):.4f}")

    # every rank holds the same networks: compare a checksum of all parameters across ranks
    checksum = torch.stack([p.detach().double().sum() for p in wrapper.state_dict().values() if isinstance(p, torch.Tensor)]).sum()
    checksums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(checksums, checksum)
    if rank == 0:  # evaluate (and, in a real run, save checkpoints) on one rank only
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_set.images).argmax(1) == test_set.labels).float().mean().item()
        print(f"{world} ranks, identical parameters: {all(torch.equal(c, checksums[0]) for c in checksums)}; "
              f"test accuracy {accuracy:.2%}")


def _spawned(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(args)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size, split evenly over the ranks")
    parser.add_argument("--processes", type=int, default=2, help="ranks to spawn when not run under torchrun")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    parser.add_argument("--smoke", action="store_true", help="one epoch of three batches")
    args = parser.parse_args()
    args.max_batches = 3 if args.smoke else None
    args.epochs = 1 if args.smoke else args.epochs
    if "RANK" in os.environ:  # launched by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
        dist.init_process_group("gloo")
        try:
            train(args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_spawned, args=(args.processes, os.path.join(directory, "init"), args), nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
