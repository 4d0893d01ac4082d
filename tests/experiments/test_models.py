"""The experiments' classifiers, by name or import path."""

from __future__ import annotations

import pytest
import torch

from auxlab import MetaAuxWrapper
from auxlab.experiments import VGGBN, SmallCNN, build_model


@pytest.mark.parametrize("model_class", [SmallCNN, VGGBN])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32), (3, 5)])
def test_models_fit_every_input_size(model_class: type, channels: int, size: int) -> None:
    model = model_class(num_classes=7, in_channels=channels, width=4)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)
    MetaAuxWrapper(model, num_classes=7, psi=2)  # the wrapper finds the primary head


def test_build_model_by_name_and_import_path() -> None:
    assert isinstance(build_model("vgg-bn", num_classes=3, in_channels=1), VGGBN)
    model = build_model("auxlab.experiments.models:SmallCNN", num_classes=3, in_channels=3, kwargs={"width": 4})
    assert isinstance(model, SmallCNN) and model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)
    tiny_cnn = build_model("helpers:TinyCNN", num_classes=4, in_channels=1)  # takes num_classes, not in_channels
    assert tiny_cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_model("no_such_module:Net", num_classes=3, in_channels=1)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        build_model("auxlab.experiments.models:Nope", num_classes=3, in_channels=1)
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_model("collections:OrderedDict", num_classes=3, in_channels=1)

