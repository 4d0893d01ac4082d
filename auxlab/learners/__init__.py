"""Meta learners: what learns in the meta step, one class per way of learning, each in its own module.

A strategy or weighting names its learner in its ``learner`` class attribute; the wrapper builds
one when the strategy has trainable parameters, checks what it declares, and delegates every meta
step to it (see docs/architecture.md). To add a meta-learned strategy, write a subclass of
:class:`~auxlab.learners.base.MetaLearner` beside it and name it in the strategy's class.

| learner | learns |
|---|---|
| :class:`~auxlab.learners.hypergradient.HypergradientLearner` | a label generator, by MAXL's hypergradient (``"maxl"``, ``"maxl-light"``) |
| :class:`~auxlab.learners.hypergradient.ScaleFreeHypergradientLearner` | the same, with Adam by default (``"maxl-balanced"``, ``"maxl-light-balanced"``) |
| :class:`~auxlab.learners.policy_gradient.PolicyGradientLearner` | a label policy, by REINFORCE (``"rl"``) |
| :class:`~auxlab.learners.joint.JointHypergradientLearner` | a generator of auxiliary data and labels, by a mixed second derivative along the engine's horizon (``"dtg"``) |
| :class:`~auxlab.learners.module_weighting.GradientScaleLearner` | a gradient-level weighting's scales (``"maoal"``) |
"""

from auxlab.learners.base import MetaLearner, MetaUpdate, ModelStep
from auxlab.learners.hypergradient import HypergradientLearner, ScaleFreeHypergradientLearner
from auxlab.learners.joint import JointHypergradientLearner
from auxlab.learners.module_weighting import GradientScaleLearner
from auxlab.learners.policy_gradient import PolicyGradientLearner

__all__ = ["GradientScaleLearner", "HypergradientLearner", "JointHypergradientLearner", "MetaLearner", "MetaUpdate", "ModelStep", "PolicyGradientLearner", "ScaleFreeHypergradientLearner"]
