"""Can the jvp engine's directional derivative be compiled? A hook-free way to get the auxiliary logits.

The engine differentiates ``c(theta)``, the soft-target coefficients of the auxiliary logits, along
``u``. ``MultiTaskNet`` reads the head's input with a forward pre-hook registered for each call,
which ``torch.compile`` cannot put inside ``torch.func.jvp``. For a model whose output *is* its
head's output, the auxiliary logits are also the model's output with the head's weight and bias
replaced by the auxiliary head's (``functional_call``), with no hook. This script times, on the
step-cost benchmark's CNN with a ``Linear(128, 50)`` auxiliary head, interleaved, the median of
``--repeats``:

- the engine's way: ``forward_ad`` dual tensors through the hook-based forward (eager);
- the weight swap under ``torch.compile(torch.func.jvp)`` (compiled once before the timing).

    python benchmarks/jvp_weight_swap.py --repeats 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call

from auxlab.losses import soft_target_coefficients
from benchmarks.jvp_variants import interleaved_times
from benchmarks.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, aux_head = build_model("cnn", num_classes=10), nn.Linear(128, 50)
    x = torch.randn(args.batch_size, 3, 32, 32)
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    params.update({f"aux_head.{n}": p.detach() for n, p in aux_head.named_parameters()})
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def model_params(p: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n.removeprefix("model."): v for n, v in p.items() if n.startswith("model.")}

    def with_hook(p: dict[str, Tensor]) -> Tensor:
        captured: list[Tensor] = []
        handle = model.classifier.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
        try:
            functional_call(model, (model_params(p), {k: v.clone() for k, v in buffers.items()}), (x,))
        finally:
            handle.remove()
        return soft_target_coefficients(nn.functional.linear(captured[0], p["aux_head.weight"], p["aux_head.bias"]))

    def weight_swap(p: dict[str, Tensor]) -> Tensor:
        swapped = {**model_params(p), "classifier.weight": p["aux_head.weight"], "classifier.bias": p["aux_head.bias"]}
        logits: Tensor = functional_call(model, (swapped, {k: v.clone() for k, v in buffers.items()}), (x,))
        return soft_target_coefficients(logits)

    def eager_dual() -> Tensor:
        with forward_ad.dual_level():
            tangent: Tensor = forward_ad.unpack_dual(with_hook({n: forward_ad.make_dual(v, direction[n]) for n, v in params.items()})).tangent  # type: ignore[no-untyped-call]
            return tangent

    compiled = torch.compile(lambda p, d: torch.func.jvp(weight_swap, (p,), (d,))[1])
    with torch.no_grad():
        start = time.perf_counter()
        error = (compiled(params, direction) - eager_dual()).abs().max()
        print(f"compiled in {time.perf_counter() - start:.1f} s; largest difference from the eager product {float(error):.2g}")
        variants: dict[str, Callable[[], object]] = {
            "forward_ad, hook (the engine's way), eager": eager_dual,
            "torch.func.jvp, weight swap, torch.compile": lambda: compiled(params, direction),
        }
        times = interleaved_times(variants, args.repeats)
    print(f"cnn, batch {args.batch_size}x3x32x32, {args.threads} thread(s), torch {torch.__version__}; median of {args.repeats} interleaved repeats")
    print("| directional derivative of the coefficients | ms |\n|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {1000 * sorted(values)[len(values) // 2]:.1f} |")


if __name__ == "__main__":
    main()
