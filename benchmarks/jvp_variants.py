"""Ways to compute the Jacobian-vector product of the jvp engine, against a forward+backward pass.

The ``"jvp"`` engine needs ``J_f(theta) u`` for the classifier's outputs ``f`` and a direction ``u``
over all parameters. This times, interleaved, with the minimum over repeats:

- ``forward``: a forward pass without graph;
- ``forward+backward``: the forward and backward pass of one training step (the unit);
- ``torch.func.jvp``: functorch's forward mode;
- ``forward_ad``: ``torch.autograd.forward_ad`` dual tensors (what ``auxlab.engines.forward_mode`` uses);
- ``reverse-over-reverse``: the double-backward trick (two reverse passes, the second through the first);
- with ``--compile``, ``torch.compile(torch.func.jvp)``: the same product through TorchInductor
  (compiled once, before the timing; the compile time is printed).

    python benchmarks/jvp_variants.py --width 16 --batch-size 64 --repeats 15
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import functional_call

from auxlab.experiments.models import SmallCNN


def variants(width: int, batch_size: int, *, compiled: bool = False) -> dict[str, Callable[[], object]]:
    """The timed callables, on one seeded SmallCNN and batch of 28x28 images."""
    torch.manual_seed(0)
    model = SmallCNN(10, 1, width=width)
    x = torch.randn(batch_size, 1, 28, 28)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p: dict[str, Tensor]) -> Tensor:
        out: Tensor = functional_call(model, (p, {k: b.clone() for k, b in buffers.items()}), (x,))
        return out

    def forward() -> object:
        with torch.no_grad():
            return f(params)

    def forward_backward() -> object:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        return torch.autograd.grad(f(p).logsumexp(1).sum(), list(p.values()))

    def func_jvp() -> object:
        with torch.no_grad():
            return torch.func.jvp(f, (params,), (direction,))[1]

    def dual_tensors() -> object:
        with torch.no_grad(), forward_ad.dual_level():
            return forward_ad.unpack_dual(f({k: forward_ad.make_dual(v, direction[k]) for k, v in params.items()})).tangent

    def reverse_over_reverse() -> object:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = f(p)
        v = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad((out * v).sum(), list(p.values()), create_graph=True)
        return torch.autograd.grad(sum((gi * direction[k]).sum() for gi, k in zip(g, p)), v)

    timed: dict[str, Callable[[], object]] = {
        "forward": forward,
        "forward+backward": forward_backward,
        "torch.func.jvp": func_jvp,
        "forward_ad": dual_tensors,
        "reverse-over-reverse": reverse_over_reverse,
    }
    if compiled:
        product = torch.compile(lambda p, d: torch.func.jvp(f, (p,), (d,))[1])

        def compiled_jvp() -> object:
            with torch.no_grad():
                return product(params, direction)

        start = time.perf_counter()
        error = (compiled_jvp() - func_jvp()).abs().max()  # type: ignore[operator]
        print(f"torch.compile: compiled in {time.perf_counter() - start:.1f} s; largest difference from torch.func.jvp {float(error):.2g}")
        timed["torch.compile(torch.func.jvp)"] = compiled_jvp
    return timed


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, ``repeats`` rounds that run every one of them once, in order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(torch.func.jvp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fns = variants(args.width, args.batch_size, compiled=args.compile)
    for fn in fns.values():  # warm-up
        fn()
    times = interleaved_times(fns, args.repeats)
    unit = min(times["forward+backward"])
    print(f"SmallCNN width {args.width}, batch {args.batch_size}x1x28x28, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; minimum of {args.repeats} interleaved repeats")
    print("| computation | ms | ratio to forward+backward |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {min(values) * 1000:.1f} | {min(values) / unit:.2f} |")


if __name__ == "__main__":
    main()
