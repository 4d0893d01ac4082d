"""How strongly each term of MAXL's meta objective pulls on the label generator, during training.

The generator minimises ``L_pri(theta') + entropy_weight * sum_k pbar_k log pbar_k``. This trains the
Fashion-MNIST small CNN with ``wrapper.step`` (the runner's setting) and, every ``--every`` steps,
prints the norm of the generator's gradient from each of the two terms on the current batch, and
the mean largest probability of the targets (0.2 = flat for psi 5).

    python benchmarks/hypergradient_balance.py --steps 300 --every 100
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from auxlab import MetaAuxWrapper
from auxlab.datasets import load_fashion_mnist
from auxlab.engines import MetaProblem, get_engine
from auxlab.experiments.models import SmallCNN
from auxlab.losses import negative_entropy
from auxlab.multitask import MultiTaskNet


def gradient_norms(wrapper: MetaAuxWrapper, x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """(|grad of L_pri(theta')|, |grad of entropy_weight * entropy term|, mean max target probability)."""
    assert wrapper.generator is not None and wrapper.aux_head is not None
    targets = wrapper.generator(x, y)
    net = MultiTaskNet(wrapper.model, wrapper.head_name, wrapper.aux_head)
    problem = MetaProblem(net=net, x=x, y=y, targets=targets, x_meta=x, y_meta=y, inner_lr=wrapper.inner_lr,
                          aux_weight=wrapper.aux_weight, focal_gamma=wrapper.focal_gamma)
    params = [p for p in wrapper.generator.parameters() if p.requires_grad]
    meta = torch.autograd.grad(get_engine(wrapper.engine)(problem), params, retain_graph=True, allow_unused=True)
    entropy = torch.autograd.grad(wrapper.entropy_weight * negative_entropy(targets.mean(0)), params, allow_unused=True)

    def norm(grads: tuple[Tensor | None, ...]) -> float:
        return float(torch.sqrt(sum(((g**2).sum() for g in grads if g is not None), torch.zeros(()))))

    confidence = float(targets.detach().max(1).values.mean())
    return norm(meta), norm(entropy), confidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--entropy-weight", type=float, default=0.2)
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist(split="train")
    torch.manual_seed(args.seed)
    wrapper = MetaAuxWrapper(
        SmallCNN(10, 1, width=16), num_classes=10, psi=5, engine="jvp", entropy_weight=args.entropy_weight, seed=args.seed,
        generator_optimizer=lambda p: torch.optim.SGD(p, lr=args.generator_lr, weight_decay=5e-4),
    )
    optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = torch.Generator().manual_seed(args.seed)
    print("| step | grad norm, L_pri(theta') | grad norm, entropy term | ratio | mean max target prob. |\n|---:|---:|---:|---:|---:|")
    for step in range(args.steps + 1):
        index = torch.randint(0, len(data), (64,), generator=batches)
        x, y = data.images[index], data.labels[index]
        if step % args.every == 0:
            meta, entropy, confidence = gradient_norms(wrapper, x, y)
            print(f"| {step} | {meta:.3e} | {entropy:.3e} | {meta / entropy:.3f} | {confidence:.3f} |", flush=True)
        wrapper.step(x, y, optimizer)


if __name__ == "__main__":
    main()
