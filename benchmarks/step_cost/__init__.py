"""What one training step costs with auxlab, as a ratio to plain single-task training.

Times, in one process, after warm-up, with the variants interleaved round-robin inside every repeat
(so that load from other processes hits all of them alike):

1. ``single-task step``: a plain model, cross entropy, ``SGD.step``: a user's loop without auxlab;
2. ``auxlab single-task step``: the same through ``MetaAuxWrapper(generator="single")``;
3. ``auxlab model step``: ``wrapper.loss`` + ``backward`` + ``opt.step`` with the MAXL generator;
4. ``meta step (<engine>)``: ``wrapper.meta_step`` alone, per hypergradient engine (default: every
   engine auxlab registers);
5. ``MAXL iteration (<engine>)``: a model step followed by a meta step, per engine;
6. ``wrapper.step (<engine>)``: ``wrapper.step(x, y, opt)``, both steps in one call, per engine;

(3) to (6) are repeated for every label generator of ``--generators`` (default ``maxl``, the
paper's copy of the classifier); a generator other than ``maxl`` is named in the variant, e.g.
``wrapper.step (jvp, maxl-light)``.

7. ``wrapper.step [<method>]``: for every method of ``--methods``, written as the experiments
   runner's strategies ``generator[+weighting]`` (e.g. ``random+gcs``, ``random+maoal``, ``sla``,
   ``rl``): ``wrapper.step(x, y, opt, index=..., x_meta=..., y_meta=...)`` with a development batch
   of the same size as the meta batch (used by ``maoal`` and ``rl``). ``random`` stands for every
   fixed-label strategy (``kmeans`` and ``human`` cost the same: a table lookup); ``sla`` uses
   ``psi = 4``, its four rotations.

All of them run in the same round-robin, so their ratios are comparable with each other.

and reports each one's median time, interquartile range and fastest time, its ratio to (1) and its
peak memory as a ratio to (1)'s. ``--profile`` instead runs ``torch.profiler`` over a few labelled
MAXL iterations per engine and reports where the time goes, by the library's ``auxlab.*`` ranges.
benchmarks/README.md says how to run it; docs/performance.md has the results.

The modules, by job: :mod:`~benchmarks.step_cost.config` (what to measure, the options),
:mod:`~benchmarks.step_cost.variants` (what is timed), :mod:`~benchmarks.step_cost.timing` (timing
and peak memory), :mod:`~benchmarks.step_cost.profiling` (``--profile``),
:mod:`~benchmarks.step_cost.report` (Markdown), :mod:`~benchmarks.step_cost.machine` (what ran
where). Run from the repository root (``python benchmarks/step_cost`` works too)::

    python -m benchmarks.step_cost --model cnn --batch-size 64 --psi 5 --repeats 40 --warmup 3 \\
        --out benchmarks/results/step_cost/cpu_cnn.md
    python -m benchmarks.step_cost --model cnn --batch-size 64 --psi 5 --profile --profile-iterations 10 --warmup 2 \\
        --out benchmarks/results/step_cost/profile_cpu_cnn.md
"""

from benchmarks.step_cost.config import (
    AUTOCAST_DTYPES,
    AUXLAB_SINGLE,
    DEFAULT_GENERATOR,
    MODEL_STEP,
    SINGLE,
    Config,
    config_from_args,
    default_engines,
    iteration_name,
    meta_step_name,
    method_step_name,
    model_step_name,
    parse_args,
    step_name,
)
from benchmarks.step_cost.machine import auxlab_version, machine_description
from benchmarks.step_cost.profiling import (
    LIBRARY_RANGES,
    EngineProfile,
    Labeller,
    labelled_ranges,
    profile_engine,
    read_profile,
)
from benchmarks.step_cost.report import (
    breakdown_markdown,
    inside_markdown,
    profile_markdown,
    results_markdown,
    table_markdown,
)
from benchmarks.step_cost.timing import Result, Row, measure, peak_step_memory
from benchmarks.step_cost.variants import Variant, base_model, build_variants, make_batch, make_wrapper

__all__ = [
    "AUTOCAST_DTYPES", "AUXLAB_SINGLE", "DEFAULT_GENERATOR", "LIBRARY_RANGES", "MODEL_STEP", "SINGLE",
    "Config", "EngineProfile", "Labeller", "Result", "Row", "Variant",
    "auxlab_version", "base_model", "breakdown_markdown", "build_variants", "config_from_args", "default_engines",
    "inside_markdown", "iteration_name", "labelled_ranges", "machine_description", "make_batch", "make_wrapper", "measure",
    "meta_step_name", "method_step_name", "model_step_name", "parse_args", "peak_step_memory",
    "profile_engine", "profile_markdown", "read_profile", "results_markdown", "step_name", "table_markdown",
]
