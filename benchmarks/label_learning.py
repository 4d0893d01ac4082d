"""Do a strategy's labels learn from the primary task? A run of the experiment runner against its control.

The *control* is the same experiment with the primary hypergradient switched off (``--inner-lr 1e-9``:
the one-step hypergradient is proportional to the inner learning rate). If a strategy ends with the
same labels as its control, the primary task did not shape them, whatever its accuracy. This script
reads two runner folders (``python -m auxlab.experiments ... --name RUN`` and ``--name CONTROL``) and
writes, per strategy learnt in both, over the seeds both ran (mean +- standard error):

- test accuracy, and its gain over the run's ``single`` (and over ``human`` when it ran);
- the final labels: confidence, share of sub-classes in use, agreement with the true fine labels
  (within-class NMI, when the task has them), the generator's relative movement; in the run and in
  the control;
- the total variation between the run's and the control's final labels on the same probe samples;
- a PNG of the fine-label NMI and the confidence over the epochs, run against control.

Usage::

    python -m benchmarks.label_learning --run runs/coarse-balanced-adam --control runs/coarse-balanced-adam-control \\
        --out benchmarks/results/fashion_mnist/learning_generator_coarse.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from auxlab.diagnostics import total_variation


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_epochs(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The last epoch's record of each (strategy, seed)."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for record in rows:
        key = (record["strategy"], record["seed"])
        if key not in last or record["epoch"] > last[key]["epoch"]:
            last[key] = record
    return last


def mean_se(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, standard error of the mean and count of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return math.nan, math.nan, 0
    se = statistics.stdev(present) / math.sqrt(len(present)) if len(present) > 1 else math.nan
    return statistics.fmean(present), se, len(present)


def _cell(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean, se, n = mean_se([None if v is None else v * scale for v in values])
    if n == 0:
        return ""
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _gain(final: dict[tuple[str, int], dict[str, Any]], strategy: str, baseline: str, seeds: Sequence[int]) -> str:
    """Mean gain of ``strategy`` over ``baseline`` in test accuracy (pp) with the s.e. of the difference of means."""
    a = [100 * final[strategy, s]["test_acc"] for s in seeds if (strategy, s) in final]
    b = [100 * final[baseline, s]["test_acc"] for s in seeds if (baseline, s) in final]
    if len(a) < 2 or len(b) < 2:
        return ""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    gain = statistics.fmean(a) - statistics.fmean(b)
    return f"{gain:+.2f} ± {se:.2f}{' (> 2 s.e.)' if abs(gain) > 2 * se else ''}"


def compare(run: Path, control: Path, baselines: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The Markdown report, and the per-epoch curves for the plot. ``baselines``: another experiment of
    the same task and seeds whose strategies the run lacks (e.g. ``single`` and ``human``)."""
    run_final, control_final = final_epochs(records(run)), final_epochs(records(control))
    if baselines is not None:
        extra = final_epochs(records(baselines))
        run_final = {**{k: v for k, v in extra.items() if k[0] not in {s for s, _ in run_final}}, **run_final}
    # the strategies whose labels learn (a generator that moves), run in both
    learnt = sorted({s for (s, _), r in control_final.items() if r.get("generator_movement") is not None} & {s for s, _ in run_final})
    seeds = sorted({seed for _, seed in run_final})
    lines = [
        f"Run: `{run.name}`; control (primary hypergradient off): `{control.name}`"
        + (f"; baselines from `{baselines.name}`" if baselines is not None else "")
        + f"; seeds {seeds}. Mean ± standard error over seeds.",
        "",
        "| strategy | test acc. (%) | gain over single (pp) | gain over human (pp) |",
        "|---|---:|---:|---:|",
    ]
    for strategy in sorted({s for s, _ in run_final}, key=lambda s: (s != "single", s)):
        accs = [run_final[strategy, s]["test_acc"] for s in seeds if (strategy, s) in run_final]
        over_single = _gain(run_final, strategy, "single", seeds) if strategy != "single" else ""
        over_human = _gain(run_final, strategy, "human", seeds) if strategy not in ("single", "human") and any(k[0] == "human" for k in run_final) else ""
        lines.append(f"| {strategy} | {_cell(accs, 100)} | {over_single} | {over_human} |")
    for strategy in learnt:
        accs = [control_final[strategy, s]["test_acc"] for s in seeds if (strategy, s) in control_final]
        lines.append(f"| {strategy} (control) | {_cell(accs, 100)} | | |")
    lines += [
        "",
        "Final labels on the probe samples (run / control):",
        "",
        "| strategy | confidence | sub-classes in use | fine-label NMI | generator movement | TV(run, control) |",
        "|---|---|---|---|---|---:|",
    ]
    curves: dict[str, Any] = {}
    for strategy in learnt:
        both = [s for s in seeds if (strategy, s) in run_final and (strategy, s) in control_final]
        cells = []
        for key in ("confidence", "used_fraction", "fine_nmi", "generator_movement"):
            cells.append(f"{_cell([run_final[strategy, s].get(key) for s in both], digits=3)} / "
                         f"{_cell([control_final[strategy, s].get(key) for s in both], digits=3)}")
        distances = []
        for s in both:
            a = torch.load(run / "labels" / f"{strategy}-seed{s}.pt")
            b = torch.load(control / "labels" / f"{strategy}-seed{s}.pt")
            if not torch.equal(a["probe"], b["probe"]):
                raise ValueError(f"{strategy} seed {s}: the run and the control probed different samples")
            distances.append(total_variation(a["distribution"], b["distribution"]))
        lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {_cell(distances, digits=3)} |")
        for name, folder in (("run", run), ("control", control)):
            by_epoch: dict[int, list[dict[str, Any]]] = {}
            for record in records(folder):
                if record["strategy"] == strategy and record["seed"] in both:
                    by_epoch.setdefault(record["epoch"], []).append(record)
            curves[f"{strategy} {name}"] = {
                key: [mean_se([r.get(key) for r in by_epoch[e]])[0] for e in sorted(by_epoch)] for key in ("fine_nmi", "confidence")
            }
    lines += [
        "",
        ("Confidence: the mean largest probability of a sample's label distribution. Sub-classes in use: the share of the K "
        "sub-classes that are the most likely one of more than half a uniform share of their class's samples. Fine-label NMI: "
        "normalised mutual information of the most likely sub-class with the true fine label, within each class, weighted by "
        "class size (auxlab.diagnostics.label_statistics). Generator movement: ||phi - phi_0|| / ||phi_0||. TV: the mean total "
        "variation between the run's and the control's final label distributions of the same probe samples (0: same labels)."),
    ]
    return "\n".join(lines), curves


def plot(curves: dict[str, Any], path: Path, title: str) -> None:
    """Fine-label NMI (when the task has fine labels) and confidence over the epochs, run (solid) against control (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in (("fine_nmi", "fine-label NMI (within class)"), ("confidence", "label confidence"))
              if any(not math.isnan(v) for values in curves.values() for v in values[key])]  # no NMI without fine labels
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for name, values in curves.items():
        style = "--" if name.endswith("control") else "-"
        for axis, (key, _) in zip(axes, panels):
            axis.plot(range(len(values[key])), values[key], style, marker="o", label=name)
    for axis, (_, label) in zip(axes, panels):
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the runner's folder of the experiment")
    parser.add_argument("--control", type=Path, required=True, help="the runner's folder of its control (--inner-lr 1e-9)")
    parser.add_argument("--baselines", type=Path, help="an experiment of the same task and seeds with the strategies the run lacks (single, human)")
    parser.add_argument("--out", type=Path, help="write the report here (Markdown) and the plot beside it (PNG)")
    args = parser.parse_args(argv)
    text, curves = compare(args.run, args.control, args.baselines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        plot(curves, args.out.with_suffix(".png"), title=f"{args.run.name} against its control")


if __name__ == "__main__":
    main()
