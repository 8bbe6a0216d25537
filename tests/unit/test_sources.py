"""A participant's own data (services/participant/sources.py), read from real files written
here as their owners would write them: PNG folders, IDX and CIFAR files, CSV and Parquet
tables, and Hugging Face folders saved by the `datasets` package itself."""

from __future__ import annotations

import gzip
import hashlib
import multiprocessing
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

from services.common.schema import SchemaSettings
from services.core.errors import ConfigError, DatasetUnavailableError
from services.participant.examples import Examples, LoaderExamples, TensorExamples
from services.participant.sources import ImageDecodeError, open_own_data

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as 28x28 grey uint8 images (bilinear upsampling)."""
    x, y = load_digits(return_X_y=True)
    small = (x.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((28, 28), Image.Resampling.BILINEAR))
            for im in small
        ]
    )
    return big, y.astype(np.int64)


def image_schema(**changes: Any) -> SchemaSettings:
    settings: dict[str, Any] = {
        "data_kind": "image",
        "class_names": NAMES,
        "sample_shape": (1, 28, 28),
        "normalise": "none",
    }
    return SchemaSettings.build(**{**settings, **changes})


def write_folder(
    root: Path, digits: tuple[np.ndarray, np.ndarray], classes: tuple[int, ...], per_class: int
) -> int:
    """per_class PNGs of each class in root/<name>/; how many were written."""
    x, y = digits
    for c in classes:
        folder = root / NAMES[c]
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(y == c)[:per_class]):
            Image.fromarray(x[i]).save(folder / f"{k}.png")
    return len(classes) * per_class


def read_all(examples: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example, in order, as one batch."""
    parts = list(examples.batches(64, CPU))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def one_line_error(exc: pytest.ExceptionInfo[BaseException], *names: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for name in names:
        assert name in text, (name, text)


# --- image folders --------------------------------------------------------------------------


def test_image_folder_made_split_some_classes(tmp_path, digits):
    n = write_folder(tmp_path, digits, (1, 4, 7), 10)
    (tmp_path / "seven" / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    data = open_own_data(tmp_path, image_schema(test_fraction=0.2, split_seed=3), workers=0)
    assert isinstance(data.train, LoaderExamples)
    x, y = read_all(data.train)
    assert x.shape == (24, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert sorted(set(y.tolist())) == [1, 4, 7]  # indices of the names, not of the folders
    assert data.facts == {
        "format": "image-folder",
        "root": str(tmp_path),
        "n_train": 24,
        "n_test": n - 24,
        "classes": ["one", "four", "seven"],
        "split": {"made": 0.2, "seed": 3},
        "normalise": "none",
        "ignored": ["1 files without an image suffix"],
    }
    _, y_test = read_all(data.test)
    assert torch.bincount(y_test, minlength=10)[[1, 4, 7]].tolist() == [2, 2, 2]  # stratified


def test_made_split_is_determined_by_the_seed(tmp_path, digits):
    write_folder(tmp_path, digits, (0, 1), 10)

    def test_set(seed: int) -> list[str]:
        data = open_own_data(tmp_path, image_schema(split_seed=seed), workers=0)
        x, _ = read_all(data.test)
        return sorted(hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in x)

    assert test_set(5) == test_set(5)
    assert test_set(5) != test_set(6)


def test_given_split_and_resize(tmp_path, digits):
    x, _ = digits
    for split, sl in (("train", slice(0, 20)), ("test", slice(20, 30))):
        for c in (2, 3):
            (tmp_path / split / NAMES[c]).mkdir(parents=True)
        for k in range(sl.start, sl.stop):
            c = (2, 3)[k % 2]
            im = Image.fromarray(x[k]).resize((20, 16)).convert("RGB")  # another size, RGB
            im.save(tmp_path / split / NAMES[c] / f"{k}.jpg")
    for shape in ((1, 28, 28), (3, 24, 24)):
        data = open_own_data(tmp_path, image_schema(sample_shape=shape), workers=0)
        assert data.facts["split"] == {"given": True}
        assert (data.facts["n_train"], data.facts["n_test"]) == (20, 10)
        assert read_all(data.train)[0].shape == (20, *shape)
        assert read_all(data.test)[0].shape == (10, *shape)


def test_augmentation_changes_training_items_only(tmp_path, digits):
    write_folder(tmp_path, digits, (0, 1), 10)
    plain = open_own_data(tmp_path, image_schema(), workers=0)
    augmented = open_own_data(tmp_path, image_schema(augment_crop=4, augment_flip=True), workers=0)
    torch.manual_seed(0)
    x_plain, y_plain = read_all(plain.train)
    x_aug, y_aug = read_all(augmented.train)
    assert torch.equal(y_plain, y_aug) and x_aug.shape == x_plain.shape
    changed = (x_aug - x_plain).abs().flatten(1).amax(dim=1) > 0
    assert int(changed.sum()) >= len(changed) // 2
    assert torch.equal(read_all(plain.test)[0], read_all(augmented.test)[0])


def test_own_normalisation_standardises_training_images(tmp_path, digits):
    write_folder(tmp_path, digits, (0, 1, 2), 12)
    data = open_own_data(tmp_path, image_schema(normalise="own"), workers=0)
    x, _ = read_all(data.train)
    assert abs(float(x.mean())) < 1e-4
    assert float(x.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    assert "mean" not in data.facts and "std" not in data.facts  # statistics stay local
    declared = open_own_data(
        tmp_path, image_schema(normalise="declared", mean=(0.5,), std=(0.25,)), 0
    )
    plain = open_own_data(tmp_path, image_schema(), workers=0)
    assert torch.allclose(read_all(declared.test)[0], (read_all(plain.test)[0] - 0.5) / 0.25)


def test_workers_read_every_example_once_per_epoch(tmp_path, digits):
    n = write_folder(tmp_path, digits, (3, 5, 8), 8)
    data = open_own_data(tmp_path, image_schema(test_fraction=0.25), workers=2)
    assert isinstance(data.train, LoaderExamples) and data.train.workers == 2
    expected = sorted(
        hashlib.sha1(im.numpy().tobytes()).hexdigest()
        for im in read_all(
            open_own_data(tmp_path, image_schema(test_fraction=0.25), workers=0).train
        )[0]
    )
    seen = [
        hashlib.sha1(im.numpy().tobytes()).hexdigest()
        for x, _ in data.train.batches(5, CPU, torch.Generator().manual_seed(1))
        for im in x
    ]
    assert len(seen) == len(data.train) == n - data.facts["n_test"]
    assert sorted(seen) == expected


def test_both_splits_share_one_set_of_workers(tmp_path, digits):
    """Training and test images, at every batch size, are read by the same `workers`
    processes (each forked worker counts the participant's shared pages in its resident
    set: benchmarks/data_memory.py); the `own` statistics' workers have ended by then."""
    write_folder(tmp_path, digits, (2, 6), 8)
    schema = image_schema(normalise="own", test_fraction=0.25)
    before = set(multiprocessing.active_children())
    data = open_own_data(tmp_path, schema, workers=2)
    assert set(multiprocessing.active_children()) - before == set()
    assert isinstance(data.train, LoaderExamples) and isinstance(data.test, LoaderExamples)
    assert data.train.readers is data.test.readers
    alone = open_own_data(tmp_path, schema, workers=0)
    for _ in range(2):
        for size in (3, 64):
            assert torch.equal(read_all(data.test)[0], read_all(alone.test)[0])
            gen, same = torch.Generator().manual_seed(size), torch.Generator().manual_seed(size)
            shared = list(data.train.batches(size, CPU, gen))
            assert len(shared[0][1]) == min(size, len(data.train))
            expected = torch.cat([x for x, _ in alone.train.batches(size, CPU, same)])
            assert torch.equal(torch.cat([x for x, _ in shared]), expected)
    assert len(set(multiprocessing.active_children()) - before) == 2
    unfinished = data.train.batches(2, CPU)
    next(unfinished)
    read_all(data.test)  # another pass ends the unfinished one
    with pytest.raises(RuntimeError, match="another pass"):
        list(unfinished)
    data.train.readers.close()


def test_a_file_that_is_no_image_is_named_before_joining(tmp_path, digits):
    write_folder(tmp_path, digits, (0, 1), 3)
    bad = tmp_path / "one" / "broken.png"
    bad.write_bytes(b"these bytes are no PNG" * 10)
    with pytest.raises(DatasetUnavailableError) as exc:
        open_own_data(tmp_path, image_schema(), workers=0)
    one_line_error(exc, str(bad), "not an image")


def test_pixels_that_fail_to_decode_in_a_worker_are_named(tmp_path, digits):
    write_folder(tmp_path, digits, (0, 1), 4)
    bad = tmp_path / "zero" / "0.png"
    bad.write_bytes(bad.read_bytes()[:80])  # the header parses; the pixels are cut short
    data = open_own_data(tmp_path, image_schema(test_fraction=0.25), workers=2)
    with pytest.raises(ImageDecodeError) as exc:
        for _ in range(2):  # the file is in the training or the test split
            list(data.train.batches(4, CPU))
            list(data.test.batches(4, CPU))
    one_line_error(exc, str(bad), "cannot decode")
    # The traceback holds the DataLoader's iterator in a reference cycle; collected by gc,
    # its workers are joined after a 5 s timeout each. Clearing the frames frees it now.
    traceback.clear_frames(exc.tb)


def test_a_folder_of_an_unknown_class_is_named(tmp_path, digits):
    write_folder(tmp_path, digits, (0, 1), 2)
    (tmp_path / "ten").mkdir()
    with pytest.raises(DatasetUnavailableError) as exc:
        open_own_data(tmp_path, image_schema(), workers=0)
    one_line_error(exc, str(tmp_path / "ten"), "'ten'", "--class-names")


# --- IDX and CIFAR --------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_files_in_mnist_raw(tmp_path, digits):
    x, y = digits
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", x[:100])
    write_idx(raw / "train-labels-idx1-ubyte", y[:100])
    write_idx(raw / "t10k-images-idx3-ubyte", x[100:130])
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", y[100:130])
    data = open_own_data(tmp_path, image_schema(), workers=0)
    assert isinstance(data.train, TensorExamples)
    assert data.facts["format"] == "idx" and data.facts["split"] == {"given": True}
    assert data.train.x.shape == (100, 1, 28, 28)
    assert torch.equal(data.train.y, torch.from_numpy(y[:100]))
    assert torch.allclose(data.test.x[:, 0], torch.from_numpy(x[100:130] / 255.0).float())


def test_cifar_binary_batches(tmp_path, device):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name, n in (("data_batch_1.bin", 30), ("data_batch_2.bin", 20), ("test_batch.bin", 10)):
        records = rng.integers(0, 256, (n, 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        records.tofile(folder / name)
    data = open_own_data(tmp_path, image_schema(sample_shape=(3, 32, 32)), workers=0)
    assert data.facts["format"] == "cifar10-binary"
    assert (data.facts["n_train"], data.facts["n_test"]) == (50, 10)
    assert isinstance(data.train, TensorExamples) and data.train.x.shape == (50, 3, 32, 32)
    grey = open_own_data(tmp_path, image_schema(augment_flip=True, augment_crop=2), workers=0)
    x, y = next(grey.train.batches(64, device, torch.Generator().manual_seed(0)))
    assert x.shape == (50, 1, 28, 28) and y.dtype == torch.int64 and x.device.type == device.type
    again = next(grey.train.batches(64, device, torch.Generator().manual_seed(0)))[0]
    assert torch.equal(x, again)  # augmentation draws from the epoch's generator


# --- tables -------------------------------------------------------------------------------


def cancer_table(label_names: bool = True) -> tuple[pa.Table, SchemaSettings]:
    data = load_breast_cancer()
    columns = {f"f{i}": data.data[:, i] for i in range(6)}
    label = data.target_names[data.target] if label_names else data.target
    table = pa.table({**columns, "diagnosis": label, "unused": np.zeros(len(label))})
    schema = SchemaSettings.build(
        data_kind="table",
        class_names=("benign", "malignant"),  # the reverse of scikit-learn's label order
        features=[f"f{i}" for i in range(6)],
        label_column="diagnosis",
        normalise="none",
    )
    return table, schema


def rows(table: pa.Table, schema: SchemaSettings) -> list[bytes]:
    """Each row's features as float32 bytes: a key to find the row after the split."""
    x = np.stack([table[name].to_numpy() for name in schema.columns], axis=1)
    return [r.tobytes() for r in x.astype(np.float32)]


def rows_of(x: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in x.reshape(len(x), -1).numpy()]


def test_csv_labels_by_name_and_made_split(tmp_path):
    table, schema = cancer_table()
    pacsv.write_csv(table, tmp_path / "patients.csv")
    data = open_own_data(tmp_path, schema, workers=0)
    assert data.facts["format"] == "csv" and data.facts["split"] == {"made": 0.2, "seed": 0}
    assert data.facts["classes"] == ["benign", "malignant"]
    assert isinstance(data.train, TensorExamples)
    assert data.train.x.shape == (data.facts["n_train"], 1, 1, 6)
    assert data.facts["n_test"] == 114  # ceil(0.2 * 569)
    malignant = (table["diagnosis"].to_numpy() == "malignant").astype(int).tolist()
    expected = dict(zip(rows(table, schema), malignant, strict=True))
    for part in (data.train, data.test):
        x, y = read_all(part)
        assert [expected[row] for row in rows_of(x)] == y.tolist()


def test_parquet_given_split_own_normalisation_float_labels(tmp_path):
    table, schema = cancer_table(label_names=False)
    table = table.set_column(
        table.schema.get_field_index("diagnosis"),
        "diagnosis",
        pa.array(
            table["diagnosis"].to_numpy().astype(np.float64)  # 0.0 / 1.0, as pandas writes
        ),
    )
    pq.write_table(table.slice(0, 400), tmp_path / "train.parquet")
    pq.write_table(table.slice(400), tmp_path / "test.parquet")
    schema = schema.replace(class_names=("0", "1"), normalise="own")
    data = open_own_data(tmp_path, schema, workers=0)
    assert data.facts["format"] == "parquet" and data.facts["split"] == {"given": True}
    x, y = read_all(data.train)
    assert torch.allclose(x.mean(dim=0), torch.zeros(1, 1, 6), atol=1e-5)
    assert torch.allclose(x.std(dim=0, correction=0), torch.ones(1, 1, 6), atol=1e-5)
    assert torch.equal(y, torch.from_numpy(table["diagnosis"].to_numpy()[:400].astype(np.int64)))


def test_regression_targets_are_standardised(tmp_path):
    data = load_diabetes()
    table = pa.table({"age": data.data[:, 0], "bmi": data.data[:, 2], "progression": data.target})
    pacsv.write_csv(table.slice(0, 300), tmp_path / "train.csv")
    pacsv.write_csv(table.slice(300), tmp_path / "test.csv")
    schema = SchemaSettings.build(
        data_kind="table",
        target="regression",
        features=["age", "bmi"],
        label_column="progression",
        target_mean=150.0,
        target_std=75.0,
        normalise="none",
    )
    own = open_own_data(tmp_path, schema, workers=0)
    assert own.facts["classes"] == [] and own.facts["n_test"] == 142
    _, y = read_all(own.test)
    assert y.dtype == torch.float32
    assert torch.allclose(y, torch.from_numpy((data.target[300:] - 150.0) / 75.0).float())


def test_table_errors_name_the_column_and_the_file(tmp_path):
    table, schema = cancer_table()
    path = tmp_path / "patients.csv"
    cases = [
        (table.drop_columns(["diagnosis"]), ("'diagnosis'", "no column")),
        (table.drop_columns(["f3"]), ("'f3'", "no column")),
        (
            table.set_column(0, "f0", pa.array(["x"] * 7 + ["1.5"] * (len(table) - 7))),
            ("'f0'", "not numeric", "7 of 569 rows"),
        ),
        (
            table.set_column(6, "diagnosis", pa.array(["benign"] * 560 + ["unsure"] * 9)),
            ("'unsure' (9 rows)", "--class-names"),
        ),
    ]
    for broken, words in cases:
        pacsv.write_csv(broken, path)
        with pytest.raises(DatasetUnavailableError) as exc:
            open_own_data(tmp_path, schema, workers=0)
        one_line_error(exc, str(path), *words)


def test_declared_kind_must_match_what_is_found(tmp_path, digits):
    _, schema = cancer_table()
    write_folder(tmp_path, digits, (0, 1), 2)
    with pytest.raises(DatasetUnavailableError, match="no table data found"):
        open_own_data(tmp_path, schema, workers=0)
    with pytest.raises(ConfigError, match="data schema"):
        open_own_data(tmp_path, SchemaSettings.build(), workers=0)


# --- Hugging Face datasets folders ------------------------------------------------------------


def test_hf_image_folder_given_and_made_split(tmp_path, digits):
    datasets = pytest.importorskip("datasets")
    x, y = digits
    keep = np.flatnonzero(y < 3)[:60]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["two", "zero", "one"]),  # another order
        }
    )
    local = {0: 1, 1: 2, 2: 0}  # digit -> index among the folder's own names
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(x[i]).resize((14, 14)) for i in keep],
            "label": [local[int(y[i])] for i in keep],
        },
        features=features,
    )
    datasets.DatasetDict(
        {"train": ds.select(range(40)), "test": ds.select(range(40, 60))}
    ).save_to_disk(tmp_path / "dict")
    data = open_own_data(tmp_path / "dict", image_schema(), workers=0)
    assert data.facts["format"] == "hf-datasets" and data.facts["split"] == {"given": True}
    assert data.facts["classes"] == ["zero", "one", "two"]
    x_train, y_train = read_all(data.train)
    assert x_train.shape == (40, 1, 28, 28)
    assert torch.equal(y_train, torch.from_numpy(y[keep[:40]]))  # mapped by name
    ds.save_to_disk(tmp_path / "one")
    made = open_own_data(tmp_path / "one", image_schema(normalise="own"), workers=0)
    assert made.facts["split"] == {"made": 0.2, "seed": 0} and made.facts["n_test"] == 12
    assert abs(float(read_all(made.train)[0].mean())) < 1e-4


def test_hf_table_with_classlabel(tmp_path):
    datasets = pytest.importorskip("datasets")
    table, schema = cancer_table(label_names=False)
    columns = {name: table[name].to_pylist() for name in schema.columns}
    features = datasets.Features(
        {
            **{name: datasets.Value("float64") for name in columns},
            "diagnosis": datasets.ClassLabel(names=["malignant", "benign"]),
        }
    )
    datasets.Dataset.from_dict(
        {**columns, "diagnosis": table["diagnosis"].to_pylist()}, features=features
    ).save_to_disk(tmp_path)
    data = open_own_data(tmp_path, schema, workers=0)
    x, y = read_all(data.train)
    assert data.facts["format"] == "hf-datasets" and x.shape[1:] == (1, 1, 6)
    target = dict(zip(rows(table, schema), table["diagnosis"].to_pylist(), strict=True))
    assert [1 - target[row] for row in rows_of(x)] == y.tolist()  # benign is 1 in the folder


def test_a_feature_constant_in_own_data_is_centred_not_blown_up(tmp_path):
    """A one-hot column this owner never sets: its test rows that do set it stay near 1,
    not 1e6 (std under the floor divides by 1)."""
    n = 40
    train = pa.table(
        {
            "x": pa.array(np.linspace(-1, 1, n)),
            "rare": pa.array(np.zeros(n)),
            "label": pa.array([str(k % 2) for k in range(n)]),
        }
    )
    test = pa.table(
        {"x": pa.array([0.0, 0.5]), "rare": pa.array([0.0, 1.0]), "label": pa.array(["0", "1"])}
    )
    pacsv.write_csv(train, str(tmp_path / "train.csv"))
    pacsv.write_csv(test, str(tmp_path / "test.csv"))
    schema = SchemaSettings.build(data_kind="table", features="x,rare", class_names="0,1")
    data = open_own_data(tmp_path, schema, workers=0)
    x, _ = read_all(data.test)
    assert x[:, 0, 0, 1].tolist() == [0.0, 1.0]
    x_train, _ = read_all(data.train)
    assert abs(float(x_train[:, 0, 0, 0].std(correction=0)) - 1) < 1e-5  # x still scaled
