"""How strongly each term of a generator's meta objective pulls on it, during training.

MAXL's generator minimises ``L_pri(theta') + entropy_weight * sum_k pbar_k log pbar_k``. This trains the
Fashion-MNIST small CNN with ``wrapper.step`` (the runner's setting) and, every ``--every`` steps,
prints the norm of the generator's gradient from the primary term and from the entropy term on the
current batch, their cosine (:func:`auxlab.diagnostics.hypergradient_parts`), and the targets' mean
largest probability (0.2 = flat for psi 5).

    python -m benchmarks.hypergradient_balance --steps 300 --every 100
    python -m benchmarks.hypergradient_balance --generator maxl-light-balanced --generator-optimizer adam
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from auxlab import MetaAuxWrapper
from auxlab.datasets import ImageDataset, load_fashion_mnist
from auxlab.diagnostics import hypergradient_parts
from auxlab.experiments.models import SmallCNN


def balance_rows(data: ImageDataset, *, steps: int, every: int, generator: str = "maxl", generator_optimizer: str = "sgd",
                 generator_lr: float = 1e-3, entropy_weight: float = 0.2, seed: int = 0) -> list[dict[str, float]]:
    """Train the small CNN (width 16, psi 5, ``engine="jvp"``) on random batches of 64 of ``data`` and, every
    ``every`` steps from step 0 to ``steps``, measure the generator's meta gradient by term on the batch."""
    torch.manual_seed(seed)
    optimizers = {"sgd": lambda p: torch.optim.SGD(p, lr=generator_lr, weight_decay=5e-4), "adam": lambda p: torch.optim.Adam(p, lr=generator_lr)}
    wrapper = MetaAuxWrapper(SmallCNN(10, 1, width=16), num_classes=10, psi=5, generator=generator, engine="jvp", entropy_weight=entropy_weight,
                             seed=seed, generator_optimizer=optimizers[generator_optimizer])
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(steps + 1):
        index = torch.randint(0, len(data), (64,), generator=batches)
        x, y = data.images[index], data.labels[index]
        if step % every == 0:
            parts = hypergradient_parts(wrapper, x, y)
            with torch.no_grad():
                confidence = float(wrapper.aux_targets(x, y, distribution=True).max(1).values.mean())
            rows.append({"step": step, "primary_norm": parts["primary_norm"], "entropy_norm": parts["entropy_norm"], "cosine": parts["cosine"], "confidence": confidence})
        wrapper.step(x, y, optimizer)
    return rows


def markdown(rows: Sequence[dict[str, float]]) -> str:
    """The rows as a markdown table (ratio: primary over entropy gradient norm; inf where the entropy term's is 0)."""
    lines = ["| step | grad norm, L_pri(theta') | grad norm, entropy term | ratio | cosine | mean max target prob. |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["primary_norm"] / r["entropy_norm"] if r["entropy_norm"] > 0 else float("inf")
        lines.append(f"| {r['step']:.0f} | {r['primary_norm']:.3e} | {r['entropy_norm']:.3e} | {ratio:.3f} | {r['cosine']:.3f} | {r['confidence']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--generator", default="maxl", help="a generator whose objective has an entropy term (maxl, maxl-light, the balanced ones)")
    parser.add_argument("--generator-optimizer", choices=("sgd", "adam"), default="sgd", help="sgd: the original's (weight decay 5e-4); adam: none")
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    parser.add_argument("--entropy-weight", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = balance_rows(load_fashion_mnist(split="train"), steps=args.steps, every=args.every, generator=args.generator,
                        generator_optimizer=args.generator_optimizer, generator_lr=args.generator_lr, entropy_weight=args.entropy_weight, seed=args.seed)
    print(markdown(rows))


if __name__ == "__main__":
    main()
