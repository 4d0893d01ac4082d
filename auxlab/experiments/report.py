"""The experiment's files: config.json, metrics.jsonl, metrics.csv and the Markdown summary.

The summary's final number per run is the test accuracy of the model after the **last** epoch;
no epoch or checkpoint is selected, on the test set or otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from auxlab._build import SINGLE_TASK
from auxlab.experiments.config import ExperimentConfig

__all__ = [
    "NOISE_FACTOR",
    "StrategySummary",
    "read_metrics_jsonl",
    "summarise",
    "summary_markdown",
    "verdict",
    "write_config",
    "write_metrics_csv",
    "write_metrics_jsonl",
]

NOISE_FACTOR = 2.0
_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}
"""A gain over single task counts as beyond the seed noise when it exceeds this many standard errors."""

#: Scalar columns of metrics.csv, in order; per-class columns ``used_<c>``, ``entropy_<c>``, ``confidence_<c>`` follow.
CSV_COLUMNS = (
    "strategy", "seed", "epoch", "lr", "batches", "train_loss", "meta_loss", "time_s",
    "val_acc", "val_loss", "test_acc", "test_loss", "val_acc_aggregated", "test_acc_aggregated", "train_samples", "dev_samples",
    "labels", "subclasses_used_total",
)


def write_config(config: ExperimentConfig, path: Path) -> Path:
    """``config.json``: every field; ``python -m auxlab.experiments --config path`` runs it again. Written
    atomically: ``--resume`` reads it, so a run killed while writing must keep no partial file."""
    with _replacing(path) as file:
        file.write(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


def write_metrics_jsonl(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """``metrics.jsonl``: one JSON object per (strategy, seed, epoch), with the per-class diagnostics.

    Written atomically (a temporary file renamed over ``path``), as is ``metrics.csv``: a run that
    stops while writing keeps the previous file whole.
    """
    with _replacing(path) as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    return path


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if the file does not exist); a line that is not JSON raises a ValueError."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error}); delete the file to rebuild it from the checkpoints") from error
    return records


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[TextIO]:
    """A text file that replaces ``path`` in one rename when the block ends without an error."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as file:
            yield file
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_metrics_csv(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """``metrics.csv``: the scalar metrics of each (strategy, seed, epoch), and per class the number of
    sub-classes used (``used_<c>``), the entropy of their shares (``entropy_<c>``) and the targets'
    mean largest probability (``confidence_<c>``). Empty cells are None."""
    num_classes = max((len(r["subclasses_used"]) for r in records if r.get("subclasses_used") is not None), default=0)
    per_class = ("used", "entropy", "confidence")
    header = [*CSV_COLUMNS, *(f"{name}_{c}" for name in per_class for c in range(num_classes))]
    with _replacing(path) as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for r in records:
            used = r.get("subclasses_used")
            row = [r.get(k) for k in CSV_COLUMNS[:-1]] + [sum(used) if used is not None else None]
            for key in ("subclasses_used", "subclass_entropy", "target_confidence"):
                values = r.get(key)
                row += list(values) if values is not None else [None] * num_classes
            writer.writerow(["" if v is None else v for v in row])
    return path


@dataclass(frozen=True)
class StrategySummary:
    """One strategy's final numbers over seeds (accuracies as fractions).

    ``subclasses_used`` and ``subclasses_used_start`` are the collapse diagnostic's sub-classes in
    use, summed over classes and averaged over seeds, after the last epoch and at epoch 0 (None for
    single task, or when ``records`` has no epoch 0); ``confidence`` and ``confidence_start`` the
    targets' mean largest probability, averaged over the classes with more than one sub-class and
    over seeds.

    ``test_std`` and ``val_std`` are sample standard deviations (None with one seed). ``gain`` is the
    difference of mean test accuracy to single task and ``gain_se`` its standard error
    ``sqrt(std_a^2 / n_a + std_single^2 / n_single)``; both None for single task itself, when single
    task was not run, or (``gain_se``) with fewer than two seeds.
    """

    strategy: str
    seeds: int
    test_mean: float
    test_std: float | None
    val_mean: float
    val_std: float | None
    epoch_time_s: float
    subclasses_used: float | None
    subclasses_used_start: float | None
    confidence: float | None
    confidence_start: float | None
    gain: float | None
    gain_se: float | None

    @property
    def beyond_noise(self) -> bool | None:
        """Whether ``|gain| > NOISE_FACTOR * gain_se``; None when it cannot be told."""
        if self.gain is None or self.gain_se is None:
            return None
        if self.gain_se == 0:
            return self.gain != 0
        return abs(self.gain) > NOISE_FACTOR * self.gain_se


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), (float(tensor.std()) if len(values) > 1 else None)


def summarise(records: Sequence[dict[str, Any]]) -> list[StrategySummary]:
    """The final numbers of each strategy, in the order the strategies first appear in ``records``.

    Per (strategy, seed) the last epoch's record counts: its test accuracy, validation accuracy and
    number of sub-classes used; the epoch time is averaged over all trained epochs (not epoch 0) and seeds.
    A strategy whose records hold ``test_acc_aggregated`` (one that augments the batch, e.g. sla) gets a
    second row right after its own, ``"<strategy> (aggregated)"``: the same runs judged by the
    aggregated inference's accuracy, without the label diagnostics.
    """
    groups: list[_Group] = []
    for strategy in dict.fromkeys(r["strategy"] for r in records):
        runs = [r for r in records if r["strategy"] == strategy]
        final_epoch = {seed: max(r["epoch"] for r in runs if r["seed"] == seed) for seed in dict.fromkeys(r["seed"] for r in runs)}
        finals = [r for r in runs if r["epoch"] == final_epoch[r["seed"]]]
        times = [r["time_s"] for r in runs if r["epoch"] > 0] or [0.0]
        groups.append(_Group(strategy, finals, [r for r in runs if r["epoch"] == 0], times, ""))
        if all(r.get("test_acc_aggregated") is not None for r in finals):
            groups.append(_Group(f"{strategy} (aggregated)", finals, [], times, "_aggregated"))
    stats = {g.label: _mean_std([r["test_acc" + g.suffix] for r in g.finals]) for g in groups}
    single = next((g for g in groups if g.label == SINGLE_TASK), None)
    rows = []
    for g in groups:
        test_mean, test_std = stats[g.label]
        val_mean, val_std = _mean_std([r["val_acc" + g.suffix] for r in g.finals])
        diagnostics = g.finals if not g.suffix else []
        used = [sum(r["subclasses_used"]) for r in diagnostics if r.get("subclasses_used") is not None]
        used_start = [sum(r["subclasses_used"]) for r in g.firsts if r.get("subclasses_used") is not None]
        confidence = [_confidence(r) for r in diagnostics if r.get("target_confidence") is not None]
        confidence_start = [_confidence(r) for r in g.firsts if r.get("target_confidence") is not None]
        gain = gain_se = None
        if single is not None and g is not single:
            base_mean, base_std = stats[SINGLE_TASK]
            gain = test_mean - base_mean
            if test_std is not None and base_std is not None:
                gain_se = math.sqrt(test_std**2 / len(g.finals) + base_std**2 / len(single.finals))
        rows.append(
            StrategySummary(
                strategy=g.label,
                seeds=len(g.finals),
                test_mean=test_mean,
                test_std=test_std,
                val_mean=val_mean,
                val_std=val_std,
                epoch_time_s=sum(g.times) / len(g.times),
                subclasses_used=sum(used) / len(used) if used else None,
                subclasses_used_start=sum(used_start) / len(used_start) if used_start else None,
                confidence=sum(confidence) / len(confidence) if confidence else None,
                confidence_start=sum(confidence_start) / len(confidence_start) if confidence_start else None,
                gain=gain,
                gain_se=gain_se,
            )
        )
    return rows


@dataclass(frozen=True)
class _Group:
    """The records behind one row of the summary: the last epoch's of each seed, epoch 0's, the epoch times,
    and the suffix of the accuracy fields the row reports (``""`` or ``"_aggregated"``)."""

    label: str
    finals: list[dict[str, Any]]
    firsts: list[dict[str, Any]]
    times: list[float]
    suffix: str


def _confidence(record: dict[str, Any]) -> float:
    """Mean target confidence over the classes with more than one sub-class (all classes if none has)."""
    values = [v for v, share in zip(record["target_confidence"], record["subclass_share"]) if len(share) > 1]
    values = values or list(record["target_confidence"])
    return float(sum(values)) / len(values)


def _percent(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def verdict(row: StrategySummary) -> str:
    """The summary's "beyond noise" column of a row: empty for ``single``, ``"no"``, ``"yes"``, ``"yes, worse"`` or ``"n/a (1 seed)"``."""
    if row.gain is None:
        return ""
    if row.gain_se is None:
        return "n/a (1 seed)"
    if not row.beyond_noise:
        return "no"
    return "yes" if row.gain > 0 else "yes, worse"


def summary_table(rows: Sequence[StrategySummary], *, num_aux_classes: int) -> str:
    """The Markdown table of :func:`summarise`'s rows."""
    header = (
        "| strategy | test acc. (%) | val acc. (%) | seeds | gain over single (pp) | s.e. of gain (pp) "
        f"| beyond {NOISE_FACTOR:g} s.e.? | sub-classes used (of {num_aux_classes}), start → end "
        "| target confidence, start → end | s / epoch |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|"]
    for r in rows:
        gain = f"{100 * r.gain:+.2f}" if r.gain is not None else ""
        se = f"{100 * r.gain_se:.2f}" if r.gain_se is not None else ""
        used = ""
        if r.subclasses_used is not None and r.subclasses_used_start is not None:
            used = f"{r.subclasses_used_start:.1f} → {r.subclasses_used:.1f}"
        sure = ""
        if r.confidence is not None and r.confidence_start is not None:
            sure = f"{r.confidence_start:.2f} → {r.confidence:.2f}"
        lines.append(
            f"| {r.strategy} | {_percent(r.test_mean, r.test_std)} | {_percent(r.val_mean, r.val_std)} | {r.seeds} "
            f"| {gain} | {se} | {verdict(r)} | {used} | {sure} | {r.epoch_time_s:.2f} |"
        )
    return "\n".join(lines)


def _setup(config: ExperimentConfig, description: str) -> list[str]:
    assert config.psi is not None
    model = f"`{config.model}`" + (f" {json.dumps(config.model_kwargs)}" if config.model_kwargs else "")
    budget = f"{config.epochs} epochs" + (f" of at most {config.max_batches} batches" if config.max_batches else "")
    schedule = f", lr x{config.lr_gamma:g} every {config.lr_step} epochs" if config.lr_step else ""
    inner_lr = config.inner_lr if config.inner_lr is not None else config.lr
    loss = f"focal loss gamma {config.focal_gamma:g}" if config.focal_gamma else "cross entropy"
    meta = f"engine `{config.engine}`"
    if config.meta_every > 1:
        meta += f", a meta step every {config.meta_every} batches"
    if config.virtual_params is not None:
        meta += f", virtual step on {', '.join(config.virtual_params)} only"
    training = (
        f"- Training: {budget}, batch {config.batch_size}, schedule `{config.schedule}`, SGD lr {config.lr:g} "
        f"momentum {config.momentum:g} weight decay {config.weight_decay:g}{schedule}; generator {_OPTIMIZER_NAMES[config.generator_optimizer]} lr "
        f"{config.generator_lr:g} weight decay {config.generator_weight_decay:g}; inner lr {inner_lr:g}, "
        f"aux weight {config.aux_weight:g}, entropy weight {config.entropy_weight:g}, {loss}; {meta}."
    )
    lines = [
        f"- Data: {description}.",
        f"- Model: {model}; psi = {list(config.psi)} (K = {sum(config.psi)} auxiliary classes).",
        training,
    ]
    if config.generator_kwargs:
        lines.append(f"- Generator arguments: {'; '.join(f'`{g}` {json.dumps(kw)}' for g, kw in config.generator_kwargs.items())}.")
    if config.weighting_kwargs:
        lines.append(f"- Weighting arguments: {'; '.join(f'`{w}` {json.dumps(kw)}' for w, kw in config.weighting_kwargs.items())}.")
    return [*lines, f"- Seeds: {', '.join(str(s) for s in config.seeds)}."]


def _run_notes(records: Sequence[dict[str, Any]], config: ExperimentConfig) -> list[str]:
    """Where some rows differ from the setup: a hierarchy of their own, a development split, an aggregated row."""
    assert config.psi is not None
    first = {r["strategy"]: r for r in records if r["epoch"] == 0}
    notes = []
    for strategy, record in first.items():
        psi = record.get("psi")
        if psi is not None and list(psi) != list(config.psi):
            notes.append(f"- `{strategy}` runs with its own hierarchy, psi = {list(psi)} (K = {sum(psi)}): one sub-class per "
                         "transformation of the batch, whatever the psi above. Its labels are fixed by construction, so it has "
                         "no sub-class diagnostics.")
    with_dev = {s: r for s, r in first.items() if r.get("dev_samples") is not None}
    if with_dev:
        record = next(iter(with_dev.values()))
        total = record["train_samples"] + record["dev_samples"]
        names = ", ".join(f"`{s}`" for s in with_dev)
        notes.append(
            f"- {names} train on {record['train_samples']} of the {total} training samples: a stratified development split of "
            f"{record['dev_samples']} (dev_fraction {config.dev_fraction:g}, data_seed {config.data_seed}) gives their meta batches "
            f"(x_meta, y_meta), from which the meta step learns. The other rows train on all {total}."
        )
    aggregated = [s for s, r in first.items() if r.get("val_acc_aggregated") is not None]
    if aggregated:
        notes.append(
            f"- {', '.join(f'`{s} (aggregated)`' for s in aggregated)}: the same runs and models as the row above it, judged by "
            "the aggregated inference of the auxiliary head over the transformations (`wrapper.aggregated_logits`) instead of "
            "the classifier's own head."
        )
    return notes


_READING = (
    "Test accuracy is that of the model after the last epoch (epoch {epochs}) of each run: no epoch or checkpoint "
    "was selected, and the test set was read only for this number. Validation accuracy is measured on a split "
    "carved out of the training set, at the same last epoch. Mean ± sample standard deviation over seeds.\n\n"
    "Gain: difference of mean test accuracy to `single`, in percentage points; s.e. = "
    "sqrt(std_a²/n_a + std_single²/n_single). \"yes\" means the gain exceeds {factor} s.e. (\"yes, worse\": a loss that large), a rough screen against "
    "seed noise, not a significance test (with 3 seeds a t-test would ask for more).\n\n"
    "Sub-classes used (the label-collapse diagnostic): summed over primary classes, the sub-classes that hold more "
    "than half of a uniform share (1 / (2 psi[c])) of the class's probe samples, by argmax of the auxiliary "
    "target; before training (epoch 0) → after the last epoch, mean over seeds. Target confidence: the mean "
    "largest probability of the soft targets, over the classes with more than one sub-class; 1/psi means flat "
    "targets (the argmax then says little), 1 hard labels. s / epoch: training wall time per epoch, without evaluation."
)


def summary_markdown(
    records: Sequence[dict[str, Any]], config: ExperimentConfig, *, description: str, command: str | None = None
) -> str:
    """``summary.md``: the setup, the table of final test accuracy (mean ± std over seeds) and how to read it."""
    assert config.psi is not None
    epochs = max(r["epoch"] for r in records)
    lines = [f"# auxlab experiment `{config.name}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += _setup(config, description)
    lines += _run_notes(records, config)
    lines += ["", summary_table(summarise(records), num_aux_classes=sum(config.psi)), ""]
    lines += [_READING.format(epochs=epochs, factor=f"{NOISE_FACTOR:g}"), ""]
    return "\n".join(lines)
