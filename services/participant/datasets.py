"""Datasets by name, as in-memory tensors with a fixed train/test split.

`digits` (scikit-learn's embedded 8x8 digits) is the offline default; `digits28` is the same
digits made MNIST-sized offline (jittered 28x28 copies, so a 3x3 backdoor trigger has room).
`mnist`, `fmnist` and
`cifar10` come from a data directory (downloaded there when the machine is online); `folder`
reads a participant's own images, one sub-folder per class. CIFAR-10 is read from its binary
release, never from the pickled Python release: a participant must not unpickle files.
`synthetic` (LEAF's Synthetic(alpha, beta), no files) is generated per participant by
`synthetic_dataset`, not loaded whole: its samples come with their owners.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from services.core.catalog import DATASETS
from services.core.errors import ConfigError, DatasetUnavailableError
from services.core.registry import Registry
from services.participant import synthetic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Dataset:
    """Images as float tensors (N, C, H, W) with int64 labels, train and test.

    Pixels are standardised per channel with the train split's mean and standard deviation
    (a property of the dataset, like MNIST's well-known 0.1307 / 0.3081): from-scratch
    models then leave the initial plateau in a few steps instead of a few hundred.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    # The participant each sample belongs to, for data generated per participant (synthetic);
    # None for a dataset that a partition scheme splits.
    train_owner: np.ndarray | None = None
    test_owner: np.ndarray | None = None
    # The per-channel standardisation applied to pixels in [0, 1] (a saved model's card).
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one example."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))


def standardised(ds: Dataset) -> Dataset:
    """The dataset with pixels scaled to zero mean and unit variance per channel."""
    dims = (0, 2, 3)
    mean = ds.x_train.mean(dim=dims, keepdim=True)
    std = ds.x_train.std(dim=dims, keepdim=True).clamp(min=1e-6)
    return replace(
        ds,
        x_train=(ds.x_train - mean) / std,
        x_test=(ds.x_test - mean) / std,
        mean=tuple(float(v) for v in mean.flatten()),
        std=tuple(float(v) for v in std.flatten()),
    )


def digits_file() -> Path:
    """scikit-learn's embedded digits (a gzipped CSV in its package), found without
    importing scikit-learn: that import (SciPy with it) costs every participant process
    about a second of CPU, more than its share of a default run's training."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError("the digits dataset comes with scikit-learn: install it")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"


def approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `draws` come from each class: the floor of each class's share, the rest
    to the largest remainders, ties drawn at random (scikit-learn's _approximate_mode)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, each class split in proportion: the arithmetic and random
    draws of scikit-learn's train_test_split(stratify=y, random_state=seed), so the split
    is the one the project always used (tests compare both)."""
    n_test = math.ceil(test_fraction * len(y))
    n_train = len(y) - n_test
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = approximate_mode(counts, n_train, rng)
    t_i = approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(by_class):
        shuffled = members.take(rng.permutation(counts[i]), mode="clip")
        train.extend(shuffled[: n_i[i]])
        test.extend(shuffled[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def load_digits_dataset(test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 1,797 embedded 8x8 digits, split once, stratified, with a fixed seed.

    The split is part of the dataset's definition (seed 0), not of an experiment's seed,
    so every participant agrees on it without talking to anyone.
    """
    with gzip.open(digits_file(), "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    x = (data[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0)[:, None, :, :]
    y = data[:, -1].astype(np.int64)
    train, test = stratified_split(y, test_fraction, 0)
    return Dataset(
        "digits",
        torch.from_numpy(x[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(x[test]),
        torch.from_numpy(y[test]),
        10,
        tuple(str(i) for i in range(10)),
    )


# digits28: jittered copies per train and per test digit (about 4,000 train, 900 test images),
# the seeds of their draws, and the ranges of the draws (MNIST's digits sit in a 20x20 box
# centred in 28x28).
DIGITS28_COPIES = (3, 2)
DIGITS28_SEEDS = (0, 1)
DIGITS28_SHIFT = 3.0  # pixels, either way on each axis
DIGITS28_ROTATION = 12.0  # degrees, either way
DIGITS28_SCALE = (0.9, 1.1)


def jittered_copies(
    x: torch.Tensor, copies: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` jittered 28x28 versions of each 8x8 image (N, 1, 8, 8), and the index of the
    image each copy comes from: upsampled to 20x20, centred in 28x28, then shifted, turned
    and scaled by a random draw per copy (one batched affine resampling)."""
    source = torch.arange(len(x)).repeat_interleave(copies)
    n = len(source)
    big = torch.nn.functional.interpolate(
        x[source], size=(20, 20), mode="bilinear", align_corners=False
    )
    canvas = torch.nn.functional.pad(big, (4, 4, 4, 4))

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    angle = torch.deg2rad(uniform(-DIGITS28_ROTATION, DIGITS28_ROTATION))
    scale = uniform(*DIGITS28_SCALE)
    shift = uniform(-DIGITS28_SHIFT, DIGITS28_SHIFT), uniform(-DIGITS28_SHIFT, DIGITS28_SHIFT)
    # theta maps an output position to where it reads the input (coordinates in [-1, 1]):
    # the inverse of "scale, turn, then shift".
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    tx, ty = (-2 * s / 28 for s in shift)
    theta = torch.stack(
        [
            torch.stack([cos, sin, cos * tx + sin * ty], dim=1),
            torch.stack([-sin, cos, -sin * tx + cos * ty], dim=1),
        ],
        dim=1,
    ).to(torch.float32)
    grid = torch.nn.functional.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
    out = torch.nn.functional.grid_sample(
        canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.clamp_(0.0, 1.0), source


def load_digits28_dataset() -> Dataset:
    """The digits as MNIST-sized 28x28 images: the `digits` split first, then jittered copies
    of each side's own images (no test digit has a copy in train). Fixed seeds: the copies
    are part of the dataset's definition, like the split."""
    digits = load_digits_dataset()
    (n_train, n_test), (s_train, s_test) = DIGITS28_COPIES, DIGITS28_SEEDS
    x_tr, src_tr = jittered_copies(digits.x_train, n_train, torch.Generator().manual_seed(s_train))
    x_te, src_te = jittered_copies(digits.x_test, n_test, torch.Generator().manual_seed(s_test))
    return replace(
        digits,
        name="digits28",
        x_train=x_tr,
        y_train=digits.y_train[src_tr],
        x_test=x_te,
        y_test=digits.y_test[src_te],
    )


def _unavailable(name: str, root: Path, files: list[str], reason: str) -> DatasetUnavailableError:
    listed = ", ".join(str(root / f) for f in files)
    return DatasetUnavailableError(
        f"{name}: not found in {root} (expected {listed}) and not downloadable: {reason}"
    )


def _load_torchvision_idx(name: str, root: Path, download: bool) -> Dataset:
    """MNIST or Fashion-MNIST through torchvision (idx files, no pickle)."""
    from torchvision import datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    folder = cls.__name__
    files = [
        f"{folder}/raw/{f}"
        for f in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:  # torchvision raises RuntimeError or URLError variants
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not download:
            reason = "download disabled"
        raise _unavailable(name, root, files, reason) from exc

    def images(ds: tvd.MNIST) -> torch.Tensor:
        return ds.data.to(torch.float32).div_(255.0).unsqueeze(1)

    return Dataset(
        name,
        images(train),
        train.targets.to(torch.int64),
        images(test),
        test.targets.to(torch.int64),
        10,
        tuple(str(c) for c in train.classes),
    )


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar10_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 binary batch: records of 1 label byte and 3,072 pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DatasetUnavailableError(
            f"cifar10: {path} is not a CIFAR-10 binary batch ({raw.size} bytes)"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    if int(labels.max()) > 9:
        raise DatasetUnavailableError(f"cifar10: {path} holds labels above 9")
    images = torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return images, labels


def _load_cifar10(root: Path, download: bool) -> Dataset:
    folder = root / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    if not all((folder / n).is_file() for n in names):
        files = [f"cifar-10-batches-bin/{n}" for n in names if not (folder / n).is_file()]
        if not download:
            raise _unavailable("cifar10", root, files, "download disabled")
        try:
            from torchvision.datasets.utils import download_url

            download_url(CIFAR10_URL, str(root), md5=CIFAR10_MD5)
            with tarfile.open(root / "cifar-10-binary.tar.gz") as tar:
                tar.extractall(root, filter="data")
        except Exception as exc:
            raise _unavailable("cifar10", root, files, str(exc).splitlines()[0]) from exc
    train = [read_cifar10_batch(folder / n) for n in names[:5]]
    x_te, y_te = read_cifar10_batch(folder / names[5])
    return Dataset(
        "cifar10",
        torch.cat([x for x, _ in train]),
        torch.cat([y for _, y in train]),
        x_te,
        y_te,
        10,
        CIFAR10_CLASSES,
    )


def load_image_folder(
    root: Path,
    size: tuple[int, int] | None = None,
    grayscale: bool = True,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Dataset:
    """Images in one sub-folder per class (sorted names are the classes), split per class.

    Seed 002's handwritten maths symbols are such a folder (45x45 grey images). The image
    size defaults to the first image's.
    """
    from PIL import Image

    if not root.is_dir():
        raise DatasetUnavailableError(f"folder: {root} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise DatasetUnavailableError(
            f"folder: {root} needs at least 2 class sub-folders, found {len(class_dirs)}"
        )
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            with Image.open(f) as raw:
                im = raw.convert("L" if grayscale else "RGB")
            if size is None:
                size = (im.height, im.width)
            if (im.height, im.width) != size:
                im = im.resize((size[1], size[0]))
            arr = np.asarray(im, dtype=np.float32) / 255.0
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DatasetUnavailableError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    x = torch.from_numpy(np.stack(xs))
    y = torch.tensor(ys, dtype=torch.int64)
    gen = torch.Generator().manual_seed(split_seed)
    test_idx: list[int] = []
    for label in range(len(class_dirs)):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(idx.numel() * test_fraction)
        test_idx.extend(idx[:n_test].tolist())
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test_idx] = True
    return Dataset(
        "folder",
        x[~is_test],
        y[~is_test],
        x[is_test],
        y[is_test],
        len(class_dirs),
        tuple(d.name for d in class_dirs),
    )


def synthetic_dataset(
    participants: Iterable[int],
    seed: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
) -> Dataset:
    """Synthetic(alpha, beta) samples (1, 1, 60) of the given participants only, with owners.

    Each participant's samples are its own pure function (services.participant.synthetic), so
    this is the same data whichever other participants are generated with it. Features are
    not standardised: statistics over the generated participants would make one's data
    depend on the others' (the generator's features are near unit scale anyway).
    """
    who = list(participants)
    parts = [synthetic.participant_samples(k, seed, alpha, beta, iid) for k in who]

    def cat(arrays: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> torch.Tensor:
        joined = np.concatenate(arrays) if arrays else np.empty((0,), dtype)
        return torch.from_numpy(joined.reshape(shape))

    features = (-1, 1, 1, synthetic.FEATURES)
    return Dataset(
        "synthetic",
        cat([p.x_train for p in parts], features, np.float32),
        cat([p.y_train for p in parts], (-1,), np.int64),
        cat([p.x_test for p in parts], features, np.float32),
        cat([p.y_test for p in parts], (-1,), np.int64),
        synthetic.CLASSES,
        tuple(str(i) for i in range(synthetic.CLASSES)),
        np.repeat(np.array(who, dtype=np.int64), [len(p.y_train) for p in parts]),
        np.repeat(np.array(who, dtype=np.int64), [len(p.y_test) for p in parts]),
    )


def _generated_per_participant(root: Path, download: bool) -> Dataset:
    raise ConfigError(
        "synthetic is generated per participant from the federation's seed: build it with "
        "synthetic_dataset(participants, seed, alpha, beta) or partition.federation_data"
    )


def _owned(root: Path, download: bool) -> Dataset:
    raise ConfigError(
        "--dataset own is each participant's own data, opened against the federation's schema "
        "by services.participant.sources.open_own_data, not loaded whole"
    )


# Every loader takes (data_dir, download); `folder` reads data_dir itself.
LOADERS: Registry[Callable[[Path, bool], Dataset]] = Registry(
    "dataset",
    {
        "digits": lambda root, download: load_digits_dataset(),
        "digits28": lambda root, download: load_digits28_dataset(),
        "mnist": lambda root, download: _load_torchvision_idx("mnist", root, download),
        "fmnist": lambda root, download: _load_torchvision_idx("fmnist", root, download),
        "cifar10": _load_cifar10,
        "synthetic": _generated_per_participant,
        "folder": lambda root, download: load_image_folder(root),
        "own": _owned,
    },
)
assert tuple(LOADERS) == DATASETS, "every dataset the settings accept has a loader"


def load_dataset(name: str, data_dir: str | Path = "data", download: bool = True) -> Dataset:
    """Load a dataset by name; `data_dir` is where files live (the folder itself for `folder`)."""
    return standardised(LOADERS[name](Path(data_dir), download))
