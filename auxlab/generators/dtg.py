"""DTG-AuxL: a joint generator of auxiliary data and of its auxiliary task, learned through the primary task."""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from auxlab._checks import check_number
from auxlab.generators._features import FeatureReader, check_features, feature_mlp
from auxlab.generators.maxl import label_options, scored_targets
from auxlab.hierarchy import HierarchyMask
from auxlab.learners.joint import JointHypergradientLearner

__all__ = ["JointDataTaskGenerator"]


class JointDataTaskGenerator(FeatureReader, name="dtg"):
    """A joint data-task generator (after Chen, Wang, Zhou, Qin, Guan & Zhu, *Joint Data-Task Generation for
    Auxiliary Learning*, NeurIPS 2023): for each primary sample it generates auxiliary data and that data's
    auxiliary label, and both are learned so that training on them helps the primary task.

    - The feature generator acts on the classifier's features ``h`` (the ``(B, d)`` input of its primary
      head): ``h_aux = h + G_f(h)``, ``G_f`` an MLP whose last layer starts at zero (the generated data starts
      as the primary data). The auxiliary head trains on ``h_aux``, and its gradient reaches the classifier
      through ``h``; ``G_f`` itself is held fixed in the model step.
    - The label generator scores the generated data: the targets are the masked softmax of
      ``G_l(h_aux) / temperature`` over each sample's block of the hierarchy (as MAXL's), ``h`` detached.
    - The instance regularisation, :meth:`instance_loss`, keeps each generated sample near its own primary
      sample: ``mean_i ||G_f(h_i)||^2 / mean_i ||h_i||^2``, weighted by ``instance_weight``.

    Its learner (:class:`~auxlab.learners.joint.JointHypergradientLearner`) minimises the primary loss after
    the model's step through both generators, plus the entropy term and the instance regularisation;
    ``engine="implicit"`` gives the paper's implicit (Neumann-series) gradient, ``"jvp"`` one virtual step.
    Generating in the feature space applies to any classifier the wrapper can wrap (images or not) and costs
    no second pass of the classifier; see docs/methods/dtg.md for what differs from the paper.

    Args:
        mask: the class-to-sub-class hierarchy.
        model: the classifier whose features are read; the wrapper passes the wrapped model.
        head_name: name of the classifier's primary ``nn.Linear``.
        hidden: both MLPs' hidden width; default ``d``.
        seed: seeds both MLPs' initialisation; the caller's random state is left as it was.
        instance_weight: weight of the instance regularisation in the meta objective (>= 0).
        temperature: divides the label scores before the softmax.
    """

    generates_features = True
    learner = JointHypergradientLearner
    feature_generator: nn.Sequential
    label_generator: nn.Sequential

    def __init__(
        self, mask: HierarchyMask, *, model: nn.Module, head_name: str, hidden: int | None = None, seed: int = 0,
        instance_weight: float = 1.0, temperature: float = 1.0,
    ) -> None:
        super().__init__(mask, model=model, head_name=head_name)
        self.temperature, _ = label_options(temperature, 0)
        self.instance_weight = check_number(instance_weight, "instance_weight")
        self.feature_generator = feature_mlp(self.head, hidden=hidden, out_features=self.head.in_features, seed=seed)
        last = self.feature_generator[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.label_generator = feature_mlp(self.head, hidden=hidden, out_features=mask.num_aux_classes, seed=seed + 1)

    def auxiliary_features(self, features: Tensor, differentiable: bool = False) -> Tensor:
        """``h + G_f(h)``: the generated auxiliary data of each sample, from its ``(B, d)`` features ``h``
        (with their gradient); with ``differentiable=False`` the feature generator's parameters are held fixed."""
        check_features(features, self.feature_generator, "the DTG feature generator")
        if differentiable:
            shift: Tensor = self.feature_generator(features)
        else:
            # copies: the meta step may update the parameters in place before this loss's backward pass
            fixed = {name: p.detach().clone() for name, p in self.feature_generator.named_parameters()}
            shift = functional_call(self.feature_generator, fixed, (features,))
        return features + shift

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        """Targets of the generated data: ``x`` is the ``(B, d)`` head input (``reads_features``).

        :class:`~auxlab.MetaAuxWrapper` passes the features of its own forward pass; on its own, call
        ``generator(generator.features(x), y)``.
        """
        check_features(x, self.label_generator, "the DTG label generator")
        scores = self.label_generator(self.auxiliary_features(x, differentiable=True))
        return scored_targets(self.mask, scores, y, temperature=self.temperature, balance_iterations=0)

    def instance_loss(self, features: Tensor) -> Tensor:
        """``mean_i ||G_f(h_i)||^2 / mean_i ||h_i||^2``: how far the generated data moved from the primary data,
        relative to the features' own size (0 when each generated sample is its primary sample)."""
        check_features(features, self.feature_generator, "the DTG feature generator")
        shift: Tensor = self.feature_generator(features)
        return shift.pow(2).sum(dim=1).mean() / features.pow(2).sum(dim=1).mean().clamp_min(1e-12)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, instance_weight={self.instance_weight}, temperature={self.temperature}"
