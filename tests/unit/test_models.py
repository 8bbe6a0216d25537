"""Models by name, sized from input shape and class count."""

from __future__ import annotations

import pytest
import torch

from services.core.errors import ConfigError
from services.core.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 7)])
def test_forward_shapes(name, shape, classes):
    model = build_model(name, shape, classes)
    for train in (True, False):  # a batch of one 8x8 image is fine in training mode too
        model.train(train)
        assert model(torch.zeros(1, *shape)).shape == (1, classes)
    assert model(torch.zeros(2, *shape)).shape == (2, classes)


def test_resnet18_has_nothing_but_parameters_to_average():
    # No BatchNorm running statistics in the state a participant sends (see models.resnet18).
    model = build_model("resnet18", (1, 8, 8), 10)
    assert not list(model.buffers())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    # Each residual branch starts as the identity (its last norm's scale is zero).
    assert all(not b.bn2.weight.detach().any() for b in model.layer1)


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
