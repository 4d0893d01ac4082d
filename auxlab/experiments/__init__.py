"""The experiments runner: compare auxiliary-label strategies on one dataset and model over seeds.

From the command line (every config field is an option; ``--help`` lists them with defaults)::

    python -m auxlab.experiments --dataset digits --strategies single,maxl --seeds 0,1,2 --epochs 10 --out runs/

or from Python::

    from auxlab.experiments import ExperimentConfig, run_experiment
    result = run_experiment(ExperimentConfig(strategies=("single", "maxl"), epochs=3))

Each (strategy, seed) pair trains a fresh model in the same loop; only ``generator=`` and
``weighting=`` of :class:`~auxlab.MetaAuxWrapper` differ (a strategy is ``generator[+weighting]``,
e.g. ``kmeans+gcs``; see :mod:`auxlab.experiments.strategies`). The run writes ``config.json``, per-epoch metrics
(``metrics.jsonl``, ``metrics.csv``), ``summary.md`` (final test accuracy, mean ± std over seeds)
and PNG plots under ``<out>/<name>/``. See docs/experiments.md.
"""

from auxlab.experiments.cli import main
from auxlab.experiments.config import SMOKE, ConfigError, ExperimentConfig, load_config, parse_args
from auxlab.experiments.models import MODELS, VGGBN, SmallCNN, build_model
from auxlab.experiments.run import ExperimentResult, collapse_diagnostic, run_experiment, train_one
from auxlab.experiments.tasks import TaskData, load_task

__all__ = [
    "MODELS",
    "SMOKE",
    "VGGBN",
    "ConfigError",
    "ExperimentConfig",
    "ExperimentResult",
    "SmallCNN",
    "TaskData",
    "build_model",
    "collapse_diagnostic",
    "load_config",
    "load_task",
    "main",
    "parse_args",
    "run_experiment",
    "train_one",
]
