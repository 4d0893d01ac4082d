"""``python -m benchmarks.step_cost``: time the variants (or, with ``--profile``, profile them) and write the report."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as ``python benchmarks/step_cost``: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch

from benchmarks.step_cost.config import config_from_args, parse_args
from benchmarks.step_cost.machine import auxlab_version
from benchmarks.step_cost.profiling import launch_blocking_for_cuda_profiles, profile_engine
from benchmarks.step_cost.report import profile_markdown, results_markdown
from benchmarks.step_cost.timing import measure


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and args.profile:
        launch_blocking_for_cuda_profiles()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    command = "python -m benchmarks.step_cost " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.profile:
        version = auxlab_version()
        profiles = {e: profile_engine(config, e, iterations=args.profile_iterations) for e in config.engines}
        report = profile_markdown(config, profiles, command, args.profile_iterations, version)
    else:
        from tqdm import tqdm

        result = measure(config, progress=lambda it: tqdm(it, desc=f"{config.model} repeats", unit="repeat"))
        report = results_markdown(result, command)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
