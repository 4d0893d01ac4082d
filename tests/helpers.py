"""Toy models and data shared by the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from auxlab import MetaAuxWrapper
from auxlab.multitask import MultiTaskNet


class TinyMLP(nn.Module):
    """Linear -> tanh -> Linear: no BatchNorm. Smooth, so finite differences are accurate."""

    def __init__(self, in_features: int = 6, hidden: int = 5, num_classes: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.hidden(x.flatten(1))))


class TinyBNNet(nn.Module):
    """Linear -> BatchNorm1d -> tanh -> Linear: BatchNorm with running statistics."""

    def __init__(self, in_features: int = 6, hidden: int = 5, num_classes: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.bn(self.hidden(x.flatten(1)))))


class TinyCNN(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> pool -> Linear, for image-shaped inputs (B, 1, 8, 8)."""

    def __init__(self, num_classes: int = 10, channels: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.classifier = nn.Linear(channels * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def batch(num_samples: int = 8, in_features: int = 6, num_classes: int = 3, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A random batch ``(x, y)`` in which every class appears at least once when possible."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, in_features, generator=g, dtype=dtype)
    y = torch.arange(num_samples) % num_classes
    return x, y[torch.randperm(num_samples, generator=g)]


def image_batch(num_samples: int = 8, num_classes: int = 10, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random image batch ``(B, 1, 8, 8)`` with labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_samples, 1, 8, 8, generator=g), torch.randint(0, num_classes, (num_samples,), generator=g)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer, to check that nothing changed."""
    return {name: t.detach().clone() for name, t in module.state_dict().items() if isinstance(t, Tensor)}


def assert_unchanged(module: nn.Module, before: dict[str, Tensor]) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed"


def multitask(wrapper: MetaAuxWrapper) -> MultiTaskNet:
    """The wrapper's multi-task network (classifier and auxiliary head), built from its public attributes."""
    return MultiTaskNet(wrapper.model, wrapper.head_name, wrapper.aux_head)


@contextlib.contextmanager
def restored(registry: MutableMapping[str, Any]) -> Iterator[None]:
    """Put ``registry`` (e.g. ``GENERATORS``) back as it was when the block ends, whatever a test registered in it."""
    before = dict(registry)
    try:
        yield
    finally:
        registry.clear()
        registry.update(before)


def flattened(named: Mapping[str, Tensor]) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """``named``'s tensors as one detached vector, and the function that maps such a vector back to views by name
    (for dense references: full Hessians and Jacobians over a model's parameters)."""
    names, shapes = list(named), [t.shape for t in named.values()]
    flat = torch.cat([t.detach().reshape(-1) for t in named.values()])

    def unflatten(vector: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = vector[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    return flat, unflatten
