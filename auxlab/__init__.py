"""auxlab: auxiliary learning for PyTorch classifiers.

Wrap the classifier you already have with :class:`MetaAuxWrapper` to train it with MAXL's
meta-learned auxiliary labels (Liu, Davison & Johns, NeurIPS 2019) or a baseline strategy; write
your own strategy as a subclass of :class:`AuxLabelGenerator`; describe the class-to-sub-class
structure with :class:`HierarchyMask`.
"""

from auxlab.generators import AuxLabelGenerator
from auxlab.hierarchy import HierarchyMask
from auxlab.wrapper import MetaAuxWrapper

__version__ = "0.1.0"

__all__ = ["AuxLabelGenerator", "HierarchyMask", "MetaAuxWrapper", "__version__"]
