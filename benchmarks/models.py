"""The classifiers the benchmarks time, as plain ``nn.Module`` s (no torchvision).

Each ends in an ``nn.Linear`` that produces the ``(B, num_classes)`` logits, so
:class:`auxlab.MetaAuxWrapper` finds the primary head on its own.

- ``cnn``: a small 3-convolution network (conv-BN-ReLU-maxpool x3, global average pool,
  ``Linear(128, C)``); works on any input of at least 8x8.
- ``vgg16``: VGG-16 with BatchNorm, CIFAR variant for 32x32 inputs: 13 convolutions, 5 max-pools,
  then ``Linear(512, 512) -> ReLU -> Linear(512, C)`` (the head used by the MAXL code's VGG-16).
- ``resnet18``: ResNet-18, CIFAR variant (3x3 stem, no stem max-pool), BasicBlock x [2, 2, 2, 2],
  global average pool, ``Linear(512, C)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "VGG16BN", "BasicBlock", "ResNet18", "SmallCNN", "build_model"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (32, 64, 128 channels), global average pool, ``Linear(128, C)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 32), (32, 64), (64, 128)):
            layers += [*_conv_bn_relu(c_in, c_out), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.features(x))
        return logits


VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs: 13 convolutions and a 2-layer classifier ending in ``Linear(512, C)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)
                layers += _conv_bn_relu(channels, item)
                channels = item
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        if features.shape[1] != 512:
            raise ValueError(f"VGG16BN expects 32x32 inputs (five 2x2 max-pools down to 1x1); got input of shape {tuple(x.shape)}")
        logits: Tensor = self.classifier(features)
        return logits


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, four stages of two BasicBlocks, ``Linear(512, C)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, 64))
        stages: list[nn.Module] = []
        channels = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width, 1)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.fc(self.pool(self.stages(self.stem(x))))
        return logits


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": SmallCNN, "vgg16": VGG16BN, "resnet18": ResNet18}


def build_model(name: str, *, num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model named ``name`` (one of :data:`MODELS`), seeded by ``seed``.

    The global random state is restored afterwards.
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not known; choose one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](num_classes=num_classes)
