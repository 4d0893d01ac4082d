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

The modules, one job each:

- :mod:`~auxlab.experiments.errors`: :class:`ConfigError`;
- :mod:`~auxlab.experiments.config`: :class:`ExperimentConfig`, its checks, and JSON in and out
  (:mod:`~auxlab.experiments.conversion`: a field's value from a string or JSON value);
- :mod:`~auxlab.experiments.cli`: the command line (all of argparse) and :func:`main`;
- :mod:`~auxlab.experiments.strategies`: ``generator[+weighting]`` and what a strategy's runs need;
- :mod:`~auxlab.experiments.tasks`: the data splits; :mod:`~auxlab.experiments.models`: the classifiers;
- :mod:`~auxlab.experiments.build`: a run's split, generator arguments and wrapper, and the checks
  that refuse what cannot run;
- :mod:`~auxlab.experiments.training`: the epochs of one run (:func:`train_one`) and one epoch's steps;
  :mod:`~auxlab.experiments.meta_batches`: the development split's meta batches;
- :mod:`~auxlab.experiments.run_checkpoint`: a run's state, saved after every epoch and restored on resume;
- :mod:`~auxlab.experiments.randomness`: random states kept, and written as text;
- :mod:`~auxlab.experiments.diagnostics`: accuracies and the label-collapse diagnostic;
- :mod:`~auxlab.experiments.run`: the experiment, every run in order, and its resume;
- :mod:`~auxlab.experiments.report` and :mod:`~auxlab.experiments.plots`: the files written.
"""

from auxlab.experiments.cli import main, parse_args
from auxlab.experiments.config import SMOKE, ExperimentConfig, load_config
from auxlab.experiments.diagnostics import collapse_diagnostic
from auxlab.experiments.errors import ConfigError
from auxlab.experiments.models import MODELS, VGGBN, SmallCNN, build_model
from auxlab.experiments.run import ExperimentResult, run_experiment
from auxlab.experiments.tasks import TaskData, load_task
from auxlab.experiments.training import train_one

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
