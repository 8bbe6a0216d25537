"""Models by name, sized from the input shape and class count (docs/algorithm.md, section 1).

In the learning core because the participant trains them and the aggregator builds w0 from
them. Their names and the dataset shapes are in services.core.catalog (no torch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from services.core.catalog import DATASET_SHAPES, DATASETS, MODEL_NAMES, Shape, is_reference
from services.core.factory import call_factory
from services.core.registry import Registry

__all__ = ["DATASETS", "DATASET_SHAPES", "MODELS", "Shape", "build_model"]


def _flat_dim(features: nn.Module, shape: Shape) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *shape)).numel())


class CNN(nn.Module):
    """The seed's CNN: conv16-pool-conv32-pool-fc128-fc(classes), 5x5 'same' convolutions."""

    def __init__(self, shape: Shape, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_dim(self.features, shape), 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp(shape: Shape, classes: int, hidden: tuple[int, ...]) -> nn.Module:
    """A fully connected network over the flattened image."""
    dims = [shape[0] * shape[1] * shape[2], *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], classes))
    return nn.Sequential(*layers)


class RowLSTM(nn.Module):
    """An LSTM reading the image row by row; the last hidden state feeds the classifier."""

    def __init__(self, shape: Shape, classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(shape[0] * shape[2], hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(b, h, c * w)
        out, _ = self.lstm(rows)
        return self.fc(out[:, -1])


class KerasCNN(nn.Module):
    """Seed 002's Keras CNN: conv32-pool-conv32-pool-dense128-drop-dense128-drop-dense.

    Keras uses 'valid' convolutions; images under 14 pixels (digits) would shrink to nothing,
    so they get 'same' padding instead.
    """

    def __init__(self, shape: Shape, classes: int) -> None:
        super().__init__()
        pad = 0 if min(shape[1], shape[2]) >= 14 else 1
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_dim(self.features, shape), 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


RESNET_GROUPS = 32  # GroupNorm groups (Wu and He's default); every ResNet-18 width divides


def resnet18(shape: Shape, classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (3x3 conv, no max-pool), GroupNorm
    in place of BatchNorm and each residual branch's last norm starting at zero.

    Why, measured (`flclustering local --model resnet18 --participants 12 --select 6`, digits,
    3 rounds): with BatchNorm the running statistics travel in every delta and are averaged
    across non-IID participants; clustering purity fell to 0.50 and accuracy to 0.17 (0.48 at
    lr 0.002). GroupNorm has no statistics to average (Hsieh et al., ICML 2020): purity 1.00.
    Zero-initialised residual branches (Goyal et al., 2017) let it train at the small CNN's
    learning rate (0.05): 0.11 without them, 0.51 with, and 0.97 by round 13 of `simulate`.
    """
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(
        weights=None,
        num_classes=classes,
        norm_layer=lambda channels: nn.GroupNorm(RESNET_GROUPS, channels),
        zero_init_residual=True,
    )
    model.conv1 = nn.Conv2d(shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: Registry[Callable[[Shape, int], nn.Module]] = Registry(
    "model",
    {
        "cnn": CNN,
        "mclr": lambda s, c: mlp(s, c, (512, 512)),
        "2nn": lambda s, c: mlp(s, c, (200, 200)),
        "lstm": RowLSTM,
        "resnet18": resnet18,
        "keras-cnn": KerasCNN,
    },
)

if tuple(MODELS) != MODEL_NAMES:  # the catalog names exactly the models built here
    raise AssertionError(f"catalog.MODEL_NAMES {MODEL_NAMES} != models {tuple(MODELS)}")


def build_model(name: str, input_shape: Shape, num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same (name, shape, classes, seed) gives the same w0.

    `name` is a built-in or a user's `package.module:factory` (services.core.factory),
    which is imported here: only for a name from this party's own settings.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_reference(name):
            return call_factory(name, input_shape, num_classes)
        return MODELS[name](input_shape, num_classes)
