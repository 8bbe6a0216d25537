"""Models by name, sized from input shape and class count."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import ConfigError
from services.common.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 7)])
def test_forward_shapes(name, shape, classes):
    if name == "resnet18" and shape[1] != 32:
        shape = (shape[0], 32, 32)
    model = build_model(name, shape, classes)
    model.eval()
    out = model(torch.zeros(2, *shape))
    assert out.shape == (2, classes)


def test_same_seed_same_weights():
    a = build_model("cnn", (1, 8, 8), 10, seed=3).state_dict()
    b = build_model("cnn", (1, 8, 8), 10, seed=3).state_dict()
    c = build_model("cnn", (1, 8, 8), 10, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seed_architectures():
    mclr = build_model("mclr", (1, 28, 28), 10)
    sizes = [m.out_features for m in mclr.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [512, 512, 10]
    two = build_model("2nn", (1, 28, 28), 10)
    assert [m.out_features for m in two.modules() if isinstance(m, torch.nn.Linear)] == [
        200,
        200,
        10,
    ]
    keras = build_model("keras-cnn", (1, 45, 45), 45)
    convs = [m for m in keras.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32] and convs[0].padding == (0, 0)


def test_unknown_model():
    with pytest.raises(ConfigError, match="choose one of"):
        build_model("vgg", (1, 8, 8), 10)
