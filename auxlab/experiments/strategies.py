"""What a strategy of the experiments names: ``generator[+weighting]``, and what its runs need.

A strategy is a label generator (any name of :data:`auxlab.generators.GENERATORS`, or ``single``)
optionally followed by ``+`` and an auxiliary-loss weighting (any name of
:data:`auxlab.weighting.WEIGHTINGS`): ``single``, ``maxl``, ``kmeans+gcs``, ``random+maoal``,
``sla``. Without a weighting the wrapper's default, ``constant``, applies.

What a run needs is read from the generator's and the weighting's classes, never from their names:

- a development split, when the meta step learns from the primary loss on held-out batches
  (a learner that declares ``held_out_meta_batch``: a ``meta_learned`` weighting, or a
  policy-gradient generator);
- its own hierarchy, when the generator ``augments`` the batch (SLA: one sub-class per
  transformation, whatever the experiment's ``psi``);
- the collapse diagnostic and the sub-class grid, for every strategy with auxiliary labels except
  those that augment (their labels are the transformations, by construction).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from auxlab._build import SINGLE_TASK
from auxlab.experiments.errors import ConfigError
from auxlab.generators import GENERATORS, AuxLabelGenerator
from auxlab.weighting import WEIGHTINGS

__all__ = ["DEFAULT_WEIGHTING", "Strategy", "augmenting_psi"]

DEFAULT_WEIGHTING = "constant"

#: Sub-classes per class of an augmenting strategy whose class does not tell: SLA's four rotations.
_DEFAULT_TRANSFORMATIONS = 4


@dataclass(frozen=True)
class Strategy:
    """One entry of ``strategies``: a generator and a weighting.

    Attributes:
        name: as written in the config, e.g. ``"kmeans+gcs"``; names the run's records and files.
        generator: ``"single"`` or a name of :data:`~auxlab.generators.GENERATORS`.
        weighting: a name of :data:`~auxlab.weighting.WEIGHTINGS`; ``"constant"`` when none is given.
    """

    name: str
    generator: str
    weighting: str

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """Read ``generator[+weighting]``.

        Raises:
            ConfigError: naming the strategy and the choices, if the generator or the weighting is
                not registered, or a weighting is put on ``single`` (which has no auxiliary loss).
        """
        generator, plus, weighting = text.partition("+")
        generators = sorted([SINGLE_TASK, *GENERATORS])
        if generator not in generators:
            raise ConfigError(f"strategies has unknown strategy {text!r}{_hint(generator, generators)}; known strategies: "
                              f"{', '.join(generators)}, each optionally +weighting ({', '.join(sorted(WEIGHTINGS))})")
        if not plus:
            return cls(text, generator, DEFAULT_WEIGHTING)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"strategies has {text!r} with unknown weighting {weighting!r}{_hint(weighting, sorted(WEIGHTINGS))}; "
                              f"write generator+weighting with a weighting among {', '.join(sorted(WEIGHTINGS))}")
        if generator == SINGLE_TASK:
            raise ConfigError(f"strategies has {text!r}, but {SINGLE_TASK!r} trains without an auxiliary loss, so there is nothing to "
                              f"weight; put +{weighting} on a strategy whose labels do not learn, e.g. kmeans+{weighting}")
        return cls(text, generator, weighting)

    @property
    def generator_class(self) -> type[AuxLabelGenerator] | None:
        """The generator's class; None for ``single``."""
        return GENERATORS.get(self.generator) if self.generator != SINGLE_TASK else None

    @property
    def augments(self) -> bool:
        """Whether the generator trains the auxiliary head on transformed copies of the batch (SLA)."""
        cls = self.generator_class
        return cls is not None and cls.augments

    @property
    def needs_dev_split(self) -> bool:
        """Whether the meta step learns from the primary loss on a development split: a meta-learned
        weighting (``maoal``) or a policy-gradient generator (``rl``)."""
        cls = self.generator_class
        learners = [WEIGHTINGS[self.weighting].learner, cls.learner if cls is not None else None]
        return any(learner is not None and learner.held_out_meta_batch for learner in learners)

    @property
    def has_label_diagnostics(self) -> bool:
        """Whether the collapse diagnostic and the sub-class grid apply: auxiliary labels that are not
        the transformations of an augmenting strategy."""
        return self.generator_class is not None and not self.augments

    def psi(self, experiment_psi: Sequence[int]) -> tuple[int, ...]:
        """The hierarchy the strategy runs with: the experiment's, or for an augmenting strategy one
        sub-class per transformation for every class (see :func:`augmenting_psi`)."""
        cls = self.generator_class
        if cls is not None and cls.augments:
            return (augmenting_psi(cls),) * len(experiment_psi)
        return tuple(experiment_psi)


def augmenting_psi(cls: type[AuxLabelGenerator]) -> int:
    """Sub-classes per class of an augmenting strategy built with its default transformations.

    Read from the class: the length of its constructor's default ``transformations``; 4 (SLA's
    rotations) when the constructor has no such default.
    """
    parameter = inspect.signature(cls).parameters.get("transformations")
    default = parameter.default if parameter is not None else inspect.Parameter.empty
    if isinstance(default, Sequence) and not isinstance(default, str) and default:
        return len(default)
    return _DEFAULT_TRANSFORMATIONS


def _hint(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
