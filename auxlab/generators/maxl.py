"""MAXL: auxiliary labels from a label-generation network trained by meta-learning."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from auxlab._seeding import seeded
from auxlab.generators.base import AuxLabelGenerator, check_mask
from auxlab.hierarchy import HierarchyMask


class MAXLGenerator(AuxLabelGenerator, name="maxl"):
    """Meta-learned auxiliary labels: MAXL (Liu, Davison & Johns, *Self-Supervised Generalisation
    with Meta Auxiliary Learning*, NeurIPS 2019, arXiv:1901.08933).

    A network ``g_phi`` scores the ``K`` auxiliary classes; the targets are the masked softmax of
    those scores over each sample's own block (``mask.softmax``). :class:`~auxlab.MetaAuxWrapper`
    trains ``phi`` in ``meta_step`` so that the labels help the primary task.

    Args:
        mask: the class-to-sub-class hierarchy.
        network: maps a batch ``x`` to ``(B, K)`` scores. :meth:`from_model` builds the paper's
            default, a re-initialised copy of the classifier with a 2-layer MLP head.
    """

    def __init__(self, mask: HierarchyMask, *, network: nn.Module) -> None:
        super().__init__(mask)
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be an nn.Module mapping x to (B, {mask.num_aux_classes}) scores, got {type(network).__name__}")
        self.network = network

    @classmethod
    def from_model(cls, mask: HierarchyMask, model: nn.Module, *, head_name: str, seed: int = 0) -> MAXLGenerator:
        """The paper's generator: a copy of ``model``, re-initialised, whose head becomes an MLP.

        Every submodule with ``reset_parameters`` is re-initialised (seeded by ``seed``; the
        caller's random state is left as it was), and the ``nn.Linear`` named ``head_name`` is
        replaced by ``Linear(d, d) -> ReLU -> Linear(d, K)`` with ``d`` its input width. ``model``
        itself is not changed.
        """
        check_mask(mask)
        network = copy.deepcopy(model)
        head = network.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head {head_name!r} must be an nn.Linear, got {type(head).__name__}")
        width, device, dtype = head.in_features, head.weight.device, head.weight.dtype
        with seeded(seed, head.weight.device):
            for module in network.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
            mlp = nn.Sequential(
                nn.Linear(width, width, device=device, dtype=dtype),
                nn.ReLU(),
                nn.Linear(width, mask.num_aux_classes, device=device, dtype=dtype),
            )
        network.set_submodule(head_name, mlp)
        return cls(mask, network=network)

    @classmethod
    def from_wrapper(
        cls, mask: HierarchyMask, *, model: nn.Module, head_name: str, default_seed: int, **kwargs: Any
    ) -> MAXLGenerator:
        """``generator_kwargs`` may give ``network=``; otherwise the paper's copy of ``model``."""
        if "network" in kwargs:
            return cls(mask, **kwargs)
        return cls.from_model(mask, model, head_name=head_name, **{"seed": default_seed, **kwargs})

    def forward(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> Tensor:
        scores = self.network(x)
        expected = (y.shape[0], self.mask.num_aux_classes)
        if scores.shape != expected:
            raise ValueError(f"the generator network must return scores of shape {expected} (B, K=sum(psi)), got {tuple(scores.shape)}")
        return self.mask.softmax(scores, y)
