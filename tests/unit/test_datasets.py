"""Dataset loaders on real digits and on small files made in the formats they read."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from services.core.errors import ConfigError, DatasetUnavailableError
from services.participant.datasets import (
    DIGITS28_COPIES,
    jittered_copies,
    load_dataset,
    load_digits28_dataset,
    load_digits_dataset,
    read_cifar10_batch,
    stratified_split,
)


def test_digits_is_the_offline_default():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert set(d.y_test.tolist()) == set(range(10))
    again = load_dataset("digits")
    assert torch.equal(d.y_test, again.y_test)  # the split is fixed


def test_digits28_is_the_digits_made_mnist_sized():
    d = load_dataset("digits28")
    digits = load_digits_dataset()
    n_train, n_test = DIGITS28_COPIES
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert d.x_train.shape == (n_train * len(digits.y_train), 1, 28, 28)
    assert d.x_test.shape == (n_test * len(digits.y_test), 1, 28, 28)
    assert abs(float(d.x_train.mean())) < 1e-5 and abs(float(d.x_train.std()) - 1) < 1e-3
    again = load_dataset("digits28")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.x_test, again.x_test)
    # Each class keeps its share of the digits split, in both splits.
    for y, base, copies in (
        (d.y_train, digits.y_train, n_train),
        (d.y_test, digits.y_test, n_test),
    ):
        assert torch.equal(torch.bincount(y, minlength=10), copies * torch.bincount(base))


def test_digits28_copies_each_side_only_from_its_own_digits():
    digits = load_digits_dataset()
    d = load_digits28_dataset()
    test_digits = {x.numpy().tobytes() for x in digits.x_test}
    for name, (x, y, originals, labels, copies, seed) in {
        "train": (d.x_train, d.y_train, digits.x_train, digits.y_train, DIGITS28_COPIES[0], 0),
        "test": (d.x_test, d.y_test, digits.x_test, digits.y_test, DIGITS28_COPIES[1], 1),
    }.items():
        made, source = jittered_copies(originals, copies, torch.Generator().manual_seed(seed))
        assert torch.equal(made, x) and torch.equal(labels[source], y), name
        sources = {originals[i].numpy().tobytes() for i in source.tolist()}
        assert len(sources) == len(originals)  # every digit of the side, copied
        if name == "train":
            assert not sources & test_digits  # no test digit behind a train image
        else:
            assert sources == test_digits


def test_a_jittered_copy_depends_on_its_own_digit_only():
    digits = load_digits_dataset().x_test[:20]
    copies, source = jittered_copies(digits, 2, torch.Generator().manual_seed(5))
    changed = digits.clone()
    changed[3] = 1.0 - changed[3]
    again, _ = jittered_copies(changed, 2, torch.Generator().manual_seed(5))
    differs = (copies != again).flatten(1).any(dim=1)
    assert torch.equal(differs, source == 3)
    # Each copy keeps its digit's ink inside the 28x28 canvas (shift and scale leave room).
    assert float(copies.sum()) > 0.75 * 2 * (20 / 8) ** 2 * float(digits.sum())


def write_idx(path, array: np.ndarray) -> None:
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fmnist", "FashionMNIST")])
def test_idx_datasets_load_from_data_dir(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images[prefix] = rng.integers(0, 256, (n, 28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) * 3) % 10)
    d = load_dataset(name, tmp_path, download=False)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.y_train.tolist() == [(i * 3) % 10 for i in range(12)]
    assert d.num_classes == 10 and len(d.classes) == 10
    if name == "fmnist":
        assert d.classes[0] == "T-shirt/top"
    # Pixels arrive in order, standardised with the train split's mean and std.
    x = images["t10k"][3].astype(np.float64) / 255.0
    pixels = images["train"].astype(np.float64) / 255.0
    expected = (x - pixels.mean()) / pixels.std()
    assert np.allclose(d.x_test[3, 0].numpy(), expected, atol=1e-3)


def test_cifar10_loads_its_binary_release_from_data_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, n in enumerate(names):
        labels = np.array([(i + j) % 10 for j in range(4)], dtype=np.uint8)
        pixels = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        (folder / n).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
    d = load_dataset("cifar10", tmp_path, download=False)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.y_train[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert d.y_test.tolist() == [5, 6, 7, 8]
    assert d.classes[3] == "cat" and len(d.mean) == 3
    # A batch missing is one line naming what is expected.
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetUnavailableError, match=r"data_batch_3\.bin") as err:
        load_dataset("cifar10", tmp_path, download=False)
    assert "data_batch_2" not in str(err.value) and "test_batch" not in str(err.value)


@pytest.mark.parametrize("name", ["mnist", "fmnist", "cifar10"])
def test_missing_dataset_gives_one_clear_line(tmp_path, name):
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset(name, tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message and "expected" in message


def test_cifar10_binary_reader(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([3, 9, 0], dtype=np.uint8)
    pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "batch.bin"
    path.write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
    x, y = read_cifar10_batch(path)
    assert y.tolist() == [3, 9, 0] and x.shape == (3, 3, 32, 32)
    assert abs(float(x[1, 2, 31, 31]) - pixels[1, -1] / 255.0) < 1e-6
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetUnavailableError):
        read_cifar10_batch(tmp_path / "bad.bin")


def test_folder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("plus", "minus", "times"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            arr = rng.integers(0, 256, (45, 45), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "plus" / "notes.txt").write_text("not an image")
    d = load_dataset("folder", tmp_path)
    assert d.classes == ("minus", "plus", "times")
    assert d.input_shape == (1, 45, 45)
    assert len(d.y_train) == 24 and len(d.y_test) == 6
    assert np.bincount(d.y_test.numpy()).tolist() == [2, 2, 2]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="not a directory"):
        load_dataset("folder", tmp_path / "nope")
    (tmp_path / "only").mkdir()
    with pytest.raises(DatasetUnavailableError, match="at least 2"):
        load_dataset("folder", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="choose one of"):
        load_dataset("imagenet")


def test_digits_are_scikit_learns_digits_and_split_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=0.25, stratify=bunch.target, random_state=0
    )
    ds = load_digits_dataset()
    assert torch.equal(ds.x_train, torch.from_numpy(x_tr))
    assert torch.equal(ds.x_test, torch.from_numpy(x_te))
    assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()
    # Other sizes and seeds split alike too (ties in the remainders are drawn).
    y = np.repeat(np.arange(7), [5, 9, 2, 11, 3, 8, 6])
    for seed, fraction in [(0, 0.3), (3, 0.5), (11, 0.17)]:
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
        mine = stratified_split(y, fraction, seed)
        assert mine[0].tolist() == tr.tolist() and mine[1].tolist() == te.tolist()
    code = (
        "import sys; from services.participant.datasets import load_digits_dataset as f; "
        "f(); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "scheme", ["iid", "practical-noniid", "dirichlet", "rotated-groups", "noniid"]
)
def test_digits28_splits_by_every_partition_into_cnn_inputs(scheme):
    from services.core.models import build_model
    from services.participant.partition import partition, shard_tensors

    d = load_dataset("digits28")
    shards = partition(d.y_train.numpy(), d.y_test.numpy(), scheme, 30, 0, 10, alpha=0.3)
    assert len(shards) == 30 and all(len(s.train) and len(s.test) for s in shards)
    x, y, xt, _ = shard_tensors(d, shards[-1])
    assert x.shape[1:] == xt.shape[1:] == (1, 28, 28) and len(x) == len(y)
    model = build_model("cnn", d.input_shape, d.num_classes)
    assert model(x[:4]).shape == (min(4, len(x)), 10)
