"""The experiment configuration: one frozen dataclass, checked when built, read from and written to JSON.

Every field of :class:`ExperimentConfig` is also a command-line option (``batch_size`` is
``--batch-size``); the command line is :mod:`auxlab.experiments.cli`'s, and the conversion of a
field's value from a string is :mod:`auxlab.experiments.conversion`'s. A run's ``config.json`` is
:meth:`ExperimentConfig.to_dict` as JSON, and :func:`load_config` reads such a file back.

Values are checked when the config is built, and an error names the field, the value received
and what is allowed: ``ConfigError("epochs must be an integer >= 1, got 0")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auxlab.engines import ENGINES
from auxlab.experiments.conversion import convert, jsonable
from auxlab.experiments.errors import ConfigError
from auxlab.experiments.strategies import Strategy
from auxlab.generators import GENERATORS
from auxlab.weighting import WEIGHTINGS

if TYPE_CHECKING:
    from auxlab.experiments.cli import build_parser, parse_args

__all__ = [
    "RESUME_MAY_DIFFER",
    "SMOKE",
    "ConfigError",
    "ExperimentConfig",
    "build_parser",
    "field_default",
    "load_config",
    "parse_args",
    "resume_differences",
]

DATASETS = ("digits", "fashion-mnist", "folder")
TASKS = ("fine", "coarse")
IMAGE_MODES = ("L", "RGB")
SCHEDULES = ("per-batch", "alternating")
AUTOCAST_DTYPES = ("bf16", "fp16")
GENERATOR_OPTIMIZERS = ("sgd", "adam")
BUILTIN_MODELS = ("small-cnn", "vgg-bn")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one comparison of auxiliary-label strategies depends on.

    Each run trains one fresh model per (strategy, seed) pair with the same data, model, schedule
    and budget; only the strategy (``generator=`` and ``weighting=`` of :class:`~auxlab.MetaAuxWrapper`)
    differs, and with it what the strategy needs: a development split (``dev_fraction``), a hierarchy
    of its own (sla).
    Field values may be given as strings (as on the command line: ``seeds="0,1,2"``,
    ``psi="4,1,1,3,1"``, ``limit_train="none"``); they are converted and checked on construction.
    """

    # --- data
    dataset: str = field(default="digits", metadata=_help(
        "digits (scikit-learn's 8x8 digits, seconds), fashion-mnist (local idx files), or folder (root/train/<class>/*.png and root/test/...)"))
    task: str = field(default="fine", metadata=_help(
        "fine: the dataset's own classes; coarse (fashion-mnist only): 5 groups as primary classes, the 10 fine classes as human labels"))
    data_root: str | None = field(default=None, metadata=_help(
        "directory of the data: fashion-mnist's idx files (default /usr/share/datasets/fashion-mnist), or the image folder (required)"))
    image_mode: str = field(default="RGB", metadata=_help("folder only: L (1 grey channel) or RGB (3 channels)"))
    image_size: int | None = field(default=None, metadata=_help("folder only: resize images to size x size; none keeps the files' size"))
    val_fraction: float = field(default=0.1, metadata=_help(
        "share of the training set carved out, stratified, as the validation set (the test set is used only for the final report)"))
    dev_fraction: float = field(default=0.1, metadata=_help(
        "share of the training split carved out, stratified, as the development split whose batches are the meta batches "
        "(x_meta, y_meta) of the strategies that learn from them (+maoal, rl); those train on the rest, the others on all of it"))
    held_out_meta_batch: tuple[str, ...] = field(default=(), metadata=_help(
        "comma-separated strategies (of --strategies) whose meta step learns from the development split's batches (x_meta, y_meta) "
        "instead of the training batch, as +maoal and rl always do; they train on the rest of the training split"))
    data_seed: int = field(default=0, metadata=_help(
        "seed of the data splits and subsets (digits train/test, validation, limit_*, the collapse subset); the same for every training seed"))
    limit_train: int | None = field(default=None, metadata=_help(
        "use a stratified subset of this many samples of the training set (before the validation split); none: all"))
    limit_test: int | None = field(default=None, metadata=_help("use a stratified subset of this many test samples; none: all"))
    # --- model and strategies
    model: str = field(default="small-cnn", metadata=_help(
        "small-cnn, vgg-bn, or any nn.Module class as package.module:Class (called with num_classes= and in_channels= if it takes them)"))
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        'extra keyword arguments for the model, as a JSON object, e.g. \'{"width": 16}\''))
    strategies: tuple[str, ...] = field(default=("single", "random", "kmeans", "maxl"), metadata=_help(
        "comma-separated strategies to compare, each generator[+weighting]: a generator single (STL), random, kmeans, human (needs "
        "fine labels: --task coarse; with the constant weight 1 it is the Equal baseline), maxl, maxl-light, sla, rl, dtg (DTG-AuxL: "
        "generated auxiliary data and labels; --engine implicit for its implicit gradient) or any registered name, optionally + a "
        "weighting of the auxiliary loss (constant, gcs, uncertainty, maoal) for a generator whose labels do not learn, e.g. kmeans+gcs"))
    weighting_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        'keyword arguments of each weighting, as a JSON object of weighting name -> object, e.g. \'{"gcs": {"mode": "scale"}}\'; '
        "a weighting not named gets its defaults"))
    generator_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        'extra keyword arguments of each generator, as a JSON object of generator name -> object, e.g. '
        '\'{"sla": {"distillation_weight": 1.0}}\'; added to the data the runner gives random, kmeans and human'))
    psi: tuple[int, ...] | None = field(default=None, metadata=_help(
        "sub-classes per primary class: one int for all classes or one per class; none: the dataset's fine-label hierarchy if it has one "
        "(fashion-mnist coarse: 4,1,1,3,1), else 5"))
    kmeans_features: str = field(default="pixels", metadata=_help(
        "features k-means clusters: pixels (the flattened inputs) or package.module:function mapping a batch x to (B, D) features, "
        "given as features= to every generator whose constructor takes it"))
    # --- training
    schedule: str = field(default="per-batch", metadata=_help(
        "per-batch: a model step and a meta step on every batch, wrapper.step (the paper's algorithm); alternating: an epoch of model steps, "
        "then an epoch of meta steps (the original code)"))
    epochs: int = field(default=10, metadata=_help("training epochs per (strategy, seed)"))
    batch_size: int = field(default=64, metadata=_help("training batch size (the original MAXL code: 100)"))
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=_help(
        "comma-separated training seeds: model initialisation, batch order and the strategy's own draws"))
    lr: float = field(default=0.01, metadata=_help("learning rate of the classifier's SGD (paper: 0.01)"))
    momentum: float = field(default=0.9, metadata=_help("momentum of the classifier's SGD (the original MAXL code: 0, plain SGD)"))
    weight_decay: float = field(default=5e-4, metadata=_help("weight decay of the classifier's SGD (the original MAXL code: 0)"))
    lr_step: int = field(default=0, metadata=_help(
        "multiply both learning rates by lr_gamma every lr_step epochs (original code: 50, 0.5); 0: constant"))
    lr_gamma: float = field(default=0.5, metadata=_help("factor of the step learning-rate schedule"))
    generator_optimizer: str = field(default="sgd", metadata=_help(
        "optimizer of the label generator: sgd (the original code's) or adam (scale-free steps: moves the generator even when its hypergradient is small)"))
    generator_lr: float = field(default=1e-3, metadata=_help("learning rate of the label generator's optimizer (original code: SGD, 1e-3)"))
    generator_weight_decay: float = field(default=5e-4, metadata=_help("weight decay of the label generator's optimizer"))
    inner_lr: float | None = field(default=None, metadata=_help(
        "learning rate of the meta step's virtual SGD step; none: the classifier's current lr, following its schedule (as in the paper and the original code)"))
    aux_weight: float = field(default=1.0, metadata=_help("weight of the auxiliary loss (paper: 1.0)"))
    entropy_weight: float = field(default=0.2, metadata=_help("weight of the generator's entropy regulariser (paper: 0.2)"))
    focal_gamma: float = field(default=0.0, metadata=_help("0: cross entropy on both heads; 2: the paper's focal loss"))
    engine: str = field(default="jvp", metadata=_help(
        "hypergradient engine of auxlab.engines: functional (exact, torch.func), higher, jvp (exact, forward mode) or finite_difference (first order)"))
    meta_every: int = field(default=1, metadata=_help("take the meta step on every meta_every-th batch only; 1: every batch, as in the paper"))
    virtual_params: tuple[str, ...] | None = field(default=None, metadata=_help(
        "comma-separated names or name prefixes of the parameters the virtual step moves (e.g. aux_head,model.classifier); none: all, as in the paper"))
    recalibrate_bn: bool = field(default=False, metadata=_help(
        "before each evaluation, recompute the classifier's BatchNorm running statistics at its current weights by one pass over the "
        "training split (torch.optim.swa_utils.update_bn; training itself is unchanged). The original MAXL code got this as a side "
        "effect of its train-mode meta pass"))
    max_batches: int | None = field(default=None, metadata=_help("stop each epoch (each phase, when alternating) after this many batches; none: all"))
    device: str = field(default="cpu", metadata=_help("torch device to train on, e.g. cpu or cuda"))
    autocast: str | None = field(default=None, metadata=_help(
        "mixed-precision training: bf16 or fp16 runs the training steps under torch.autocast with that dtype (fp16 with a "
        "torch.amp.GradScaler; per-batch schedule, and engine jvp or finite_difference); evaluation stays float32; none: float32"))
    threads: int | None = field(default=None, metadata=_help(
        "torch CPU threads during the run (restored afterwards); none: torch's default. 1 is often fastest for the small models on a busy machine"))
    # --- diagnostics and output
    collapse_samples: int = field(default=1000, metadata=_help(
        "size of the fixed, stratified subset of training samples on which the label-collapse diagnostic is measured each epoch; 0: all"))
    eval_batch_size: int = field(default=500, metadata=_help("batch size of evaluation and of the collapse diagnostic"))
    grid_classes: int = field(default=4, metadata=_help("primary classes shown in subclass_grid.png"))
    grid_images: int = field(default=8, metadata=_help("example images per sub-class in subclass_grid.png"))
    out: str = field(default="runs", metadata=_help("output directory; each run writes to <out>/<name>/"))
    name: str | None = field(default=None, metadata=_help(
        "run name; none: <dataset>-<task>-<date>-<time>. An existing run of that name is overwritten (unless --resume)"))
    plots: bool = field(default=True, metadata=_help("write the PNG plots (needs matplotlib)"))
    progress: bool = field(default=True, metadata=_help("show a tqdm progress bar per epoch (if tqdm is installed)"))
    resume: bool = field(default=False, metadata=_help(
        "continue the experiment <out>/<name> where it stopped: finished runs are not re-run, an unfinished run continues from its "
        "last checkpoint. Needs name, and the experiment-defining fields of its config.json"))

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = convert(f.name, getattr(self, f.name), hints[f.name], default=functools.partial(field_default, f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    # ----------------------------------------------------------------------------------- checks
    def _validate(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("task", self.task, TASKS)
        if self.task == "coarse" and self.dataset != "fashion-mnist":
            raise ConfigError(f"task='coarse' exists only for dataset='fashion-mnist', got dataset={self.dataset!r}; use task='fine'")
        if self.dataset == "folder" and not self.data_root:
            raise ConfigError("dataset='folder' needs data_root, the directory holding train/<class>/*.png and test/<class>/*.png")
        _choice("image_mode", self.image_mode, IMAGE_MODES)
        _at_least("image_size", self.image_size, 1)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not 0 < self.dev_fraction <= 0.5:
            raise ConfigError(f"dev_fraction must lie in (0, 0.5], got {self.dev_fraction}")
        _at_least("data_seed", self.data_seed, 0)
        _at_least("limit_train", self.limit_train, 2)
        _at_least("limit_test", self.limit_test, 1)
        if self.model not in BUILTIN_MODELS and not _is_dotted(self.model):
            raise ConfigError(f"model must be one of {', '.join(BUILTIN_MODELS)} or an import path package.module:Class, got {self.model!r}")
        if self.kmeans_features != "pixels" and not _is_dotted(self.kmeans_features):
            raise ConfigError(f"kmeans_features must be 'pixels' or an import path package.module:function, got {self.kmeans_features!r}")
        self._validate_strategies()
        for i, p in enumerate(self.psi or ()):
            if p < 1:
                raise ConfigError(f"psi must hold integers >= 1 (sub-classes per class), got {p} at position {i} of psi={list(self.psi or ())}")
        if self.psi is not None and not self.psi:
            raise ConfigError("psi must not be empty: give one int for all classes, one per class, or none")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("generator_optimizer", self.generator_optimizer, GENERATOR_OPTIMIZERS)
        for name in ("epochs", "batch_size", "eval_batch_size", "grid_images"):
            _at_least(name, getattr(self, name), 1)
        _at_least("grid_classes", self.grid_classes, 1)
        _at_least("max_batches", self.max_batches, 1)
        _at_least("threads", self.threads, 1)
        _at_least("lr_step", self.lr_step, 0)
        _at_least("collapse_samples", self.collapse_samples, 0)
        if not self.seeds:
            raise ConfigError("seeds must hold at least one seed, e.g. seeds=0 or seeds=0,1,2")
        _no_duplicates("seeds", self.seeds)
        for s in self.seeds:
            _at_least("seeds", s, 0)
        for name in ("lr", "generator_lr", "inner_lr", "lr_gamma"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        for name in ("momentum", "weight_decay", "generator_weight_decay", "aux_weight", "entropy_weight", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum}")
        _choice("engine", self.engine, sorted(ENGINES))
        if self.autocast is not None:
            _choice("autocast", self.autocast, AUTOCAST_DTYPES)
        if self.autocast == "fp16" and self.schedule != "per-batch":
            raise ConfigError(f"autocast='fp16' trains with a GradScaler, which wrapper.step takes: it needs schedule='per-batch', got {self.schedule!r}")
        if self.autocast == "fp16" and self.engine not in ("jvp", "finite_difference"):
            raise ConfigError(f"autocast='fp16' needs engine 'jvp' or 'finite_difference' (loss scaling through a second-order graph is not implemented), got {self.engine!r}")
        _at_least("meta_every", self.meta_every, 1)
        if self.virtual_params is not None and not self.virtual_params:
            raise ConfigError("virtual_params must name at least one parameter prefix, or be none (all parameters)")
        if not self.out:
            raise ConfigError("out must be a directory path, got an empty string")
        if self.name is not None and (not self.name or os.sep in self.name or self.name in (".", "..")):
            raise ConfigError(f"name must be a plain directory name (no {os.sep!r}), got {self.name!r}")
        if self.resume and self.name is None:
            raise ConfigError("name must be given with resume=True: the experiment to continue is <out>/<name>; got name=None")

    def _validate_strategies(self) -> None:
        if not self.strategies:
            raise ConfigError("strategies must name at least one strategy, e.g. strategies=single,maxl")
        _no_duplicates("strategies", self.strategies)
        for s in self.strategies:
            Strategy.parse(s)
        _no_duplicates("held_out_meta_batch", self.held_out_meta_batch)
        for s in self.held_out_meta_batch:
            if s not in self.strategies:
                raise ConfigError(f"held_out_meta_batch has {s!r}, which is not among strategies ({', '.join(self.strategies)})")
        for name, kwargs in self.generator_kwargs.items():
            if name not in GENERATORS:
                raise ConfigError(f"generator_kwargs has unknown generator {name!r}; its keys must be generators among {', '.join(sorted(GENERATORS))}")
            if not isinstance(kwargs, Mapping):
                raise ConfigError(f"generator_kwargs[{name!r}] must be a JSON object of keyword arguments, got {kwargs!r}")
        for name, kwargs in self.weighting_kwargs.items():
            if name not in WEIGHTINGS:
                raise ConfigError(f"weighting_kwargs has unknown weighting {name!r}; its keys must be weightings among {', '.join(sorted(WEIGHTINGS))}")
            if not isinstance(kwargs, Mapping):
                raise ConfigError(f"weighting_kwargs[{name!r}] must be a JSON object of keyword arguments, got {kwargs!r}")

    # ----------------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (tuples become lists); ``from_dict`` reads it back."""
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Build a config from a mapping of field names; unknown names raise a ConfigError naming them."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a mapping of field names to values, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config field {key!r}{hint}; the fields are: {', '.join(names)}")
        return cls(**dict(values))

    def smoke(self) -> ExperimentConfig:
        """This config with the :data:`SMOKE` budget: one epoch of a few batches on a small subset."""
        return dataclasses.replace(self, **SMOKE)


RESUME_MAY_DIFFER = ("out", "name", "threads", "plots", "progress", "resume", "grid_classes", "grid_images")
"""Fields that may differ between an experiment and its ``--resume``: where it is, how it is shown, how many threads run it.
Every other field defines the experiment and must be the same."""


def resume_differences(given: ExperimentConfig, stored: ExperimentConfig, *, ignore: Sequence[str] = ()) -> list[str]:
    """The experiment-defining fields (all but :data:`RESUME_MAY_DIFFER` and ``ignore``) in which ``given`` differs from ``stored``.

    Each difference reads ``"epochs (given 3, the experiment has 2)"``.
    """
    names = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in RESUME_MAY_DIFFER and f.name not in ignore]
    ours, theirs = given.to_dict(), stored.to_dict()
    return [f"{n} (given {_shown_value(ours[n])}, the experiment has {_shown_value(theirs[n])})" for n in names if ours[n] != theirs[n]]


def _shown_value(value: Any) -> str:
    if value is None:
        return "none"
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


SMOKE: dict[str, Any] = {
    "epochs": 1,
    "max_batches": 3,
    "limit_train": 300,
    "limit_test": 200,
    "collapse_samples": 200,
    "seeds": (0,),
}
"""The ``--smoke`` budget: enough to check that a configuration runs end to end, in seconds."""


def field_default(name: str) -> Any:
    """The default value of the config field ``name``."""
    f = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value}")


def _no_duplicates(name: str, values: Sequence[Any]) -> None:
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise ConfigError(f"{name} lists {', '.join(repeated)} more than once: {list(values)}")


def _is_dotted(path: str) -> bool:
    """``package.module:Name`` (or ``package.module.Name``)."""
    module, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    return bool(module) and bool(attribute) and all(part.isidentifier() for part in [*module.split("."), *attribute.split(".")])


# --------------------------------------------------------------------------------------- files
def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object of a config file (field name -> value), e.g. a run's ``config.json``."""
    file = Path(path)
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"config file {file} does not exist") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {file} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {file} must hold a JSON object of field names to values, got {type(values).__name__}")
    return values


def __getattr__(name: str) -> Any:
    """``build_parser`` and ``parse_args``, which live in :mod:`auxlab.experiments.cli`, still importable from here."""
    if name in ("build_parser", "parse_args"):
        from auxlab.experiments import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
