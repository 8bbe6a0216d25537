"""The names of the built-in models and datasets, and the datasets' shapes, without torch.

Settings, flags and `flclustering simulate` need these names to check a command line; they
must not pay for importing torch (seconds of CPU and about 500 MB per process) to do so.
`services.core.models` builds the models these names stand for.
"""

from __future__ import annotations

import re

Shape = tuple[int, int, int]

MODEL_NAMES = ("cnn", "mclr", "2nn", "lstm", "resnet18", "keras-cnn")
# A user's model: `package.module:factory`, imported on the machine that names it (a
# participant, init-model, predict), never taken from the network (services.core.factory).
MODEL_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
MAX_REFERENCE = 200


def is_reference(model: str) -> bool:
    """Whether a model name is a user's factory (`package.module:factory`), not a built-in."""
    return len(model) <= MAX_REFERENCE and MODEL_REFERENCE.fullmatch(model) is not None


# Models that pool over image rows: a vector dataset (one row of features) does not fit them.
IMAGE_MODELS = frozenset({"cnn", "keras-cnn"})

# Input shape and class count of the built-in datasets; `folder` datasets bring their own.
# `synthetic` is a vector of 60 features (one row).
DATASET_SHAPES: dict[str, tuple[Shape, int]] = {
    "digits": ((1, 8, 8), 10),
    "digits28": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "fmnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "synthetic": ((1, 1, 60), 10),
}
DATASETS = (*DATASET_SHAPES, "folder", "own")


# How the clusterer may group pre-training deltas (services.core.clustering).
CLUSTER_METHODS = ("hierarchical", "kmeans", "dbscan")


def fits(model: str, shape: Shape) -> bool:
    """Whether a model can read inputs of this shape (image models need more than a row)."""
    return shape[1] > 1 or model not in IMAGE_MODELS
