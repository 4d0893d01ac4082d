"""Classifiers for the experiments, and building any ``nn.Module`` from an import path.

Both built-in models end in an ``nn.Linear`` that produces the ``(B, C)`` logits, so
:class:`~auxlab.MetaAuxWrapper` finds the primary head by itself, and both pool adaptively before
the head, so one definition serves 8x8 (digits), 28x28 (Fashion-MNIST) and 32x32 (CIFAR-style)
inputs of any channel count. Max-pools use ``ceil_mode`` so that inputs down to 1x1 still fit.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import Tensor, nn

__all__ = ["MODELS", "VGGBN", "SmallCNN", "build_model", "import_object"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


class SmallCNN(nn.Module):
    """Three conv-BatchNorm-ReLU layers (``width``, ``2 width``, ``4 width`` channels), two
    max-pools, a 2x2 adaptive average pool, then ``Linear(16 width, num_classes)``.

    Args:
        num_classes: C, the number of logits.
        in_channels: channels of the input images (1 for grey, 3 for RGB).
        width: channels of the first layer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(16 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` images -> ``(B, num_classes)`` logits."""
        return cast(Tensor, self.classifier(self.features(x)))


class VGGBN(nn.Module):
    """A VGG-style network with BatchNorm, scaled down for CPU experiments.

    ``stages[s]`` conv-BatchNorm-ReLU layers of ``width * 2**s`` channels, each stage followed by a
    2x2 max-pool; then a global average pool and the VGG head ``Linear(d, d) -> ReLU -> Linear(d, C)``
    (the head of the MAXL code's VGG-16), so the auxiliary head reads the ``d``-dimensional hidden
    layer. The defaults (``width=16``, ``stages=(2, 2, 3, 3)``) give 10 convolutions.

    Args:
        num_classes: C, the number of logits.
        in_channels: channels of the input images.
        width: channels of the first stage.
        stages: number of convolutions in each stage.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width: int = 16, stages: Sequence[int] = (2, 2, 3, 3)) -> None:
        super().__init__()
        if not stages or any(int(n) < 1 for n in stages):
            raise ValueError(f"stages must be a non-empty sequence of convolution counts >= 1, got {list(stages)}")
        layers: list[nn.Module] = []
        channels = in_channels
        for s, count in enumerate(stages):
            out = width * 2**s
            for _ in range(int(count)):
                layers += _conv_bn_relu(channels, out)
                channels = out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` images -> ``(B, num_classes)`` logits."""
        return cast(Tensor, self.classifier(self.features(x)))


MODELS: dict[str, type[nn.Module]] = {"small-cnn": SmallCNN, "vgg-bn": VGGBN}
"""The built-in models by name, as the ``model`` config field accepts them."""


def import_object(path: str) -> Any:
    """The object at ``package.module:name`` (or ``package.module.name``), imported.

    Raises:
        ValueError: if the path has no module part, the module cannot be imported or lacks the name.
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not an import path; write package.module:Name")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} of {path!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def build_model(spec: str, *, num_classes: int, in_channels: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a classifier from a name of :data:`MODELS` or an import path ``package.module:Class``.

    The class (or factory function) gets ``num_classes=`` and ``in_channels=`` for those of the two
    it accepts, plus ``kwargs``. Call it after seeding torch: the initialisation draws from torch's
    global generator.

    Raises:
        ValueError: if the path cannot be imported or the arguments do not fit.
        TypeError: if the path does not name something that builds an ``nn.Module``.
    """
    factory = MODELS[spec] if spec in MODELS else import_object(spec)
    if not callable(factory):
        raise TypeError(f"model {spec!r} is not a class or function that builds an nn.Module")
    arguments: dict[str, Any] = {}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if name in parameters or takes_any:
            arguments[name] = value
    arguments.update(kwargs or {})
    try:
        model = factory(**arguments)
    except TypeError as error:
        raise ValueError(f"could not build model {spec!r} with arguments {arguments}: {error}") from error
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec!r} built a {type(model).__name__}, not an nn.Module")
    return model
