"""Auxiliary-label strategies: one small :class:`AuxLabelGenerator` subclass per module, each
registered under a name that ``MetaAuxWrapper(generator="name")`` accepts.

| name | class | labels |
|---|---|---|
| ``"maxl"`` | :class:`~auxlab.generators.maxl.MAXLGenerator` | meta-learned (default) |
| ``"maxl-light"`` | :class:`~auxlab.generators.maxl.LightMAXLGenerator` | meta-learned, MLP on the classifier's features |
| ``"maxl-balanced"`` | :class:`~auxlab.generators.maxl.BalancedMAXLGenerator` | meta-learned, balanced over each batch (Sinkhorn), temperature 0.5 |
| ``"maxl-light-balanced"`` | :class:`~auxlab.generators.maxl.BalancedLightMAXLGenerator` | the light generator, balanced the same way |
| ``"random"`` | :class:`~auxlab.generators.random_labels.RandomLabels` | fixed, random |
| ``"kmeans"`` | :class:`~auxlab.generators.kmeans.KMeansLabels` | fixed, clusters per class |
| ``"human"`` | :class:`~auxlab.generators.human.HumanLabels` | fixed, the dataset's fine labels |
| ``"rl"`` | :class:`~auxlab.generators.rl_labels.PolicyLabels` | sampled by a policy on the classifier's features, trained by REINFORCE |
| ``"sla"`` | :class:`~auxlab.generators.sla.SLALabels` | fixed, (class, transformation) of rotated copies |
| ``"dtg"`` | :class:`~auxlab.generators.dtg.JointDataTaskGenerator` | meta-learned with generated auxiliary data (DTG-AuxL) |
"""

from auxlab.generators.base import GENERATORS, AuxLabelGenerator
from auxlab.generators.dtg import JointDataTaskGenerator
from auxlab.generators.human import HumanLabels
from auxlab.generators.kmeans import KMeansLabels
from auxlab.generators.maxl import BalancedLightMAXLGenerator, BalancedMAXLGenerator, LightMAXLGenerator, MAXLGenerator
from auxlab.generators.random_labels import RandomLabels
from auxlab.generators.rl_labels import PolicyLabels
from auxlab.generators.sla import SLALabels

__all__ = [
    "GENERATORS", "AuxLabelGenerator", "BalancedLightMAXLGenerator", "BalancedMAXLGenerator", "HumanLabels", "JointDataTaskGenerator", "KMeansLabels",
    "LightMAXLGenerator", "MAXLGenerator", "PolicyLabels", "RandomLabels", "SLALabels"]
