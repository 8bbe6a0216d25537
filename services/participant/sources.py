"""A participant's own data (`--dataset own`): everything in its data folder, checked against
the federation's schema before it joins.

Data owners write their folders with different tools, so the format is detected from what
the folder holds (an image folder, IDX or CIFAR-10 binary files, a CSV or Parquet table, a
Hugging Face `datasets` folder) and said in the facts. Whatever the format, the participant
gets the same thing: inputs of the schema's shape (float32), labels as class indices in the
schema's order (int64) or standardised regression targets (float32), a training and a test
split. A file that cannot be read is named in one line before the participant joins (no
participant joins silently with part of its data); a file whose pixels fail to decode only
during training is named in one line then, never skipped.

Images on disk are read per item by a DataLoader's workers and never held in memory (the
dataset keeps one numpy array of relative paths and one of labels: no per-item Python
objects, which forked workers would copy page by page as they touch their reference
counts). Hugging Face folders are memory-mapped Arrow files, read with pyarrow alone: the
`datasets` package (pandas, an HTTP stack) is not needed to read what it wrote. Tables,
IDX and CIFAR files are small enough to hold as tensors.

Normalisation `own` standardises with statistics of this participant's training data; they
stay in this process (never in the facts, never sent).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from services.common.schema import SchemaSettings, feature_name
from services.common.settings import cut
from services.core.errors import ConfigError, DatasetUnavailableError
from services.participant.datasets import IMAGE_SUFFIXES, read_cifar10_batch, stratified_split
from services.participant.examples import (
    Batch,
    Examples,
    LoaderExamples,
    Readers,
    TensorExamples,
)

SUFFIXES = (*IMAGE_SUFFIXES, ".webp")
TABLE_SUFFIXES = (".csv", ".parquet")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
STATS_SAMPLE = 2000  # images whose pixels give `own` statistics (see image_stats)
STATS_BATCH = 256
STD_FLOOR = 1e-6
_NUMBER = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


class ImageDecodeError(DatasetUnavailableError):
    """An image whose pixels cannot be decoded, named in one line even from a worker.

    A DataLoader re-raises a worker's exception as its class built from the worker's whole
    traceback; the message users see (the CLI prints it) is then a page. This class keeps
    only its own message: the traceback's last line.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


@dataclass(frozen=True)
class OwnData:
    """A participant's own training and test examples, and what was found (JSON-able)."""

    train: Examples
    test: Examples
    facts: dict[str, Any]


# --- images read per item ---------------------------------------------------------------


class ImageSource(Protocol):
    """Images by index, opened lazily (PIL reads the header; pixels on first access)."""

    def __len__(self) -> int: ...

    def open(self, i: int) -> Image.Image: ...

    def name(self, i: int) -> str: ...


class ImageFiles:
    """Image files under a folder: one numpy array of relative paths (bytes), no pixels."""

    def __init__(self, root: Path, relative: Sequence[str]) -> None:
        self.root = str(root)
        self.relative = np.array([os.fsencode(r) for r in relative], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.relative)

    def name(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.relative[i]))

    def open(self, i: int) -> Image.Image:
        return Image.open(self.name(i))


class ArrowImages:
    """A Hugging Face Image column (struct of bytes and path) in memory-mapped Arrow files.

    Each process maps the files on first use: a worker started by spawn receives paths, not
    the mapped tables (pickling a table would copy all its bytes).
    """

    def __init__(self, files: Sequence[Path], lengths: Sequence[int], column: str) -> None:
        self.files = [str(f) for f in files]
        self.starts = np.cumsum([0, *lengths]).astype(np.int64)
        self.column = column
        self._mapped: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mapped": {}}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, i - int(self.starts[f])

    def name(self, i: int) -> str:
        f, row = self._locate(i)
        return f"{self.files[f]} row {row}"

    def open(self, i: int) -> Image.Image:
        f, row = self._locate(i)
        if f not in self._mapped:
            self._mapped[f] = read_arrow(Path(self.files[f])).column(self.column)
        data = self._mapped[f][row]["bytes"]
        if not data.is_valid:
            raise ImageDecodeError(f"{self.name(i)}: no image bytes (only a path, not read)")
        return Image.open(pa.BufferReader(data.as_buffer()))


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return cut(text, 160)


def check_headers(source: ImageSource) -> None:
    """Read every image's header (not its pixels): a file that is no image is named now,
    before the participant joins, not halfway through its first round."""
    for i in range(len(source)):
        try:
            with source.open(i) as im:
                im.size  # noqa: B018 (the header is parsed by open; size proves it)
        except ImageDecodeError:
            raise
        except Exception as exc:  # PIL raises many kinds on bytes that are no image
            raise DatasetUnavailableError(
                f"{source.name(i)}: not an image ({_reason(exc)})"
            ) from None


def decode(source: ImageSource, i: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Image i as float32 (C, H, W) in [0, 1]: grey or RGB by C, resized to (H, W) when its
    size differs. A decoder's failure on the file's bytes names the file."""
    c, h, w = shape
    try:
        with source.open(i) as raw:
            im = raw.convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
    except ImageDecodeError:
        raise
    except Exception as exc:  # any failure of the decoder on the owner's bytes
        raise ImageDecodeError(f"{source.name(i)}: cannot decode ({_reason(exc)})") from None
    pixels = torch.from_numpy(np.array(im, dtype=np.uint8)).to(torch.float32).div_(255.0)
    return pixels[None] if c == 1 else pixels.permute(2, 0, 1).contiguous()


def augment(
    x: torch.Tensor, crop: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A batch (N, C, H, W) padded by `crop` pixels (black) and cropped back at a random
    offset per image, and flipped left to right with probability 1/2 per image. Draws come
    from generator (CPU), or torch's default one (a DataLoader seeds it per worker)."""
    n, _, h, w = x.shape
    if crop:
        padded = F.pad(x, (crop, crop, crop, crop))
        top = torch.randint(0, 2 * crop + 1, (n,), generator=generator).to(x.device)
        left = torch.randint(0, 2 * crop + 1, (n,), generator=generator).to(x.device)
        rows = top[:, None] + torch.arange(h, device=x.device)
        cols = left[:, None] + torch.arange(w, device=x.device)
        who = torch.arange(n, device=x.device)[:, None, None]
        x = padded[who, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


# --- what was found: parts of examples, before the split and normalisation ---------------


@dataclass(frozen=True)
class Tensors:
    """Examples in memory: inputs (N, *input_shape), images in [0, 1], tables as read."""

    x: torch.Tensor
    y: np.ndarray


@dataclass(frozen=True)
class Images:
    """Examples read per item: rows of an image source, with their labels."""

    source: ImageSource
    rows: np.ndarray
    y: np.ndarray


Part = Tensors | Images


@dataclass(frozen=True)
class Found:
    """A format's examples: a training part, and a test part when the data has one."""

    format: str
    train: Part
    test: Part | None
    ignored: tuple[str, ...] = ()


Stats = tuple[torch.Tensor, torch.Tensor]  # mean and std, shaped to broadcast over inputs


def take(part: Part, idx: np.ndarray) -> Part:
    """The examples of part at idx."""
    if isinstance(part, Images):
        return Images(part.source, part.rows[idx], part.y[idx])
    return Tensors(part.x[torch.from_numpy(idx)], part.y[idx])


class ImageItems(TorchDataset):
    """Images of a part, decoded per item: augmented (training) and normalised."""

    def __init__(
        self,
        part: Images,
        shape: tuple[int, int, int],
        crop: int = 0,
        flip: bool = False,
        stats: Stats | None = None,
    ) -> None:
        self.part = part
        self.shape = shape
        self.crop = crop
        self.flip = flip
        self.stats = stats

    def __len__(self) -> int:
        return len(self.part.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = decode(self.part.source, int(self.part.rows[i]), self.shape)
        if self.crop or self.flip:
            x = augment(x[None], self.crop, self.flip)[0]
        return normalised(x, self.stats), torch.tensor(self.part.y[i])


class AugmentedTensors:
    """Images held as tensors in [0, 1], augmented per batch, then normalised (training).

    Augmentation is part of the federation's schema, so IDX and CIFAR files, which fit in
    memory, are augmented like image folders: per batch, on the batch's device, with draws
    from the epoch's generator (a run is reproducible).
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, crop: int, flip: bool, stats: Stats | None
    ) -> None:
        self.plain = TensorExamples(x, y)
        self.crop = crop
        self.flip = flip
        self.stats = stats

    def __len__(self) -> int:
        return len(self.plain)

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        for x, y in self.plain.batches(batch_size, device, generator):
            yield normalised(augment(x, self.crop, self.flip, generator), self.stats), y


def normalised(x: torch.Tensor, stats: Stats | None) -> torch.Tensor:
    """x standardised by stats (moved to x's device), or x itself without any."""
    if stats is None:
        return x
    mean, std = stats
    return (x - mean.to(x.device)) / std.to(x.device)


# --- labels and numbers from Arrow columns (tables, Hugging Face folders) -----------------


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column without dictionary encoding (pandas' categoricals in Parquet)."""
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def numbers(col: pa.ChunkedArray, kind: str, name: str, where: str) -> np.ndarray:
    """A column as float64 values of the declared kind (float, int or bool); text is read
    as numbers when every row is one. Anything else, empty rows included, is one line
    naming the column, the file and how many rows."""
    col = _plain(col)
    n = len(col)
    if col.null_count:
        raise DatasetUnavailableError(
            f"{where}: column {name!r}: {col.null_count:,} of {n:,} rows have no value "
            "(empty, NA or NaN)"
        )
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        ok = pc.match_substring_regex(col, _NUMBER)
        bad = n - int(pc.sum(ok).as_py() or 0)
        if bad:
            first = pc.filter(col, pc.invert(ok))[0].as_py()
            raise DatasetUnavailableError(
                f"{where}: column {name!r} is not numeric: {bad:,} of {n:,} rows are not "
                f"numbers (such as {cut(first)!r})"
            )
        col = pc.cast(pc.utf8_trim_whitespace(col), pa.float64())
    elif not any(
        test(col.type)
        for test in (
            pa.types.is_integer,
            pa.types.is_floating,
            pa.types.is_boolean,
            pa.types.is_decimal,
        )
    ):
        raise DatasetUnavailableError(
            f"{where}: column {name!r} holds {col.type}, not numbers ({n:,} rows)"
        )
    values = np.asarray(pc.cast(col, pa.float64()).to_numpy(), dtype=np.float64)
    problems = (
        (~np.isfinite(values), "are not finite numbers"),
        ((kind == "int") & (values != np.round(values)), "are not whole numbers (declared int)"),
        ((kind == "bool") & (values != 0) & (values != 1), "are neither 0 nor 1 (declared bool)"),
    )
    for mask, what in problems:
        if np.any(mask):
            raise DatasetUnavailableError(
                f"{where}: column {name!r}: {int(np.sum(mask)):,} of {n:,} rows {what}"
            )
    return values


def label_text(col: pa.ChunkedArray, names: Sequence[str] | None, where: str) -> pa.Array:
    """Class labels as text: a ClassLabel's names, text as written, numbers as they read
    (whole numbers without ".0": a label 3.0 from a float column is class "3")."""
    col = _plain(col)
    if names is not None:
        codes = np.asarray(pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False))
        outside = int(np.sum((codes < 0) | (codes >= len(names))))
        if outside:
            raise DatasetUnavailableError(
                f"{where}: {outside:,} rows have no class (ClassLabel values outside "
                f"0..{len(names) - 1})"
            )
        return pc.take(pa.array(list(names), pa.string()), pa.array(codes))
    t = col.type
    if pa.types.is_floating(t):
        whole = pc.equal(col, pc.round(col))
        as_int = pc.cast(pc.cast(col, pa.int64(), safe=False), pa.string())
        return pc.if_else(whole, as_int, pc.cast(col, pa.string())).combine_chunks()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.cast(col, pa.string()).combine_chunks()
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return pc.cast(col, pa.string()).combine_chunks()
    raise DatasetUnavailableError(f"{where}: the label column holds {t}, not class labels")


def labels(
    col: pa.ChunkedArray, schema: SchemaSettings, where: str, names: Sequence[str] | None = None
) -> np.ndarray:
    """Labels as int64 indices into schema.class_names (matched by name), or float32
    regression targets (y - target_mean) / target_std. An unknown label is named with how
    many rows carry it."""
    column = schema.label_column
    if schema.target == "regression":
        y = numbers(col, "float", column, where)
        return ((y - schema.target_mean) / schema.target_std).astype(np.float32)
    if col.null_count:
        raise DatasetUnavailableError(
            f"{where}: column {column!r}: {col.null_count:,} of {len(col):,} rows have no label"
        )
    text = label_text(col, names, where)
    idx = pc.index_in(text, value_set=pa.array(list(schema.class_names), pa.string()))
    if idx.null_count:
        unknown = pc.value_counts(pc.filter(text, pc.is_null(idx))).to_pylist()
        unknown.sort(key=lambda vc: -vc["counts"])
        shown = ", ".join(f"{cut(vc['values'])!r} ({vc['counts']:,} rows)" for vc in unknown[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise DatasetUnavailableError(
            f"{where}: column {column!r} has labels that are not --class-names: {shown}{more}"
        )
    return np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)


def require_columns(present: Sequence[str], needed: Sequence[str], where: str) -> None:
    """Every needed column is there; the first missing one is named with the file."""
    missing = [c for c in needed if c not in set(present)]
    if missing:
        also = f" (nor {', '.join(map(repr, missing[1:4]))})" if len(missing) > 1 else ""
        raise DatasetUnavailableError(
            f"{where}: no column {missing[0]!r}{also}; its columns are {cut(list(present), 120)}"
        )


def table_part(
    table: pa.Table, schema: SchemaSettings, where: str, names: Sequence[str] | None = None
) -> Tensors:
    """A table's feature columns as float32 (N, 1, 1, F) and its labels."""
    cols = [
        numbers(table.column(name), kind, name, where)
        for name, kind in map(feature_name, schema.features)
    ]
    x = np.stack(cols, axis=1).astype(np.float32).reshape(-1, *schema.input_shape)
    return Tensors(
        torch.from_numpy(x), labels(table.column(schema.label_column), schema, where, names)
    )


# --- formats --------------------------------------------------------------------------------


def _visible(folder: Path) -> list[Path]:
    """A folder's entries, sorted, without hidden ones (.DS_Store, .ipynb_checkpoints)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_folders(folder: Path, schema: SchemaSettings) -> tuple[Images, int]:
    """Images in one sub-folder per class (at any depth below it), and how many files were
    not images by their suffix. A folder whose name is not a declared class is an error:
    a participant may hold only some classes, never others."""
    index = {name: i for i, name in enumerate(schema.class_names)}
    relative: list[str] = []
    y: list[int] = []
    ignored = 0
    for entry in _visible(folder):
        if not entry.is_dir():
            ignored += 1
            continue
        if entry.name not in index:
            raise DatasetUnavailableError(
                f"{entry}: a folder of class {cut(entry.name)!r}, which is not one of "
                f"--class-names ({cut(', '.join(schema.class_names), 120)})"
            )
        for here, dirs, files in os.walk(entry):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(f for f in files if not f.startswith(".")):
                if Path(f).suffix.lower() not in SUFFIXES:
                    ignored += 1
                    continue
                relative.append(os.path.relpath(os.path.join(here, f), folder))
                y.append(index[entry.name])
    source = ImageFiles(folder, relative)
    check_headers(source)
    return Images(source, np.arange(len(y)), np.array(y, dtype=np.int64)), ignored


def find_image_folder(root: Path, schema: SchemaSettings) -> Found | None:
    """One sub-folder per class, or train/ and test/ folders laid out that way."""
    dirs = [p.name for p in _visible(root) if p.is_dir()]
    if not dirs:
        return None
    if schema.target != "classification":
        raise ConfigError(
            f"{root}: an image folder's labels are its class folders; regression needs a "
            "table or a Hugging Face folder with a numeric label column"
        )
    split = {"train", "test"}
    if split <= set(dirs) and not split & set(schema.class_names):
        train, skipped_train = _class_folders(root / "train", schema)
        test, skipped_test = _class_folders(root / "test", schema)
        skipped = skipped_train + skipped_test
    else:
        (train, skipped), test = _class_folders(root, schema), None
    ignored = (f"{skipped:,} files without an image suffix",) if skipped else ()
    return Found("image-folder", train, test, ignored)


def fit_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] converted to shape's channels (grey as PIL's luma, or
    grey repeated) and resized (bilinear, antialiased) to its height and width."""
    c, h, w = shape
    if x.shape[1] == 3 and c == 1:
        x = torch.einsum("nchw,c->nhw", x, torch.tensor(_GREY))[:, None]
    elif x.shape[1] == 1 and c == 3:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


def class_indices(y: np.ndarray, schema: SchemaSettings, where: str) -> np.ndarray:
    """Labels stored as numbers (IDX, CIFAR) as indices into schema.class_names."""
    if schema.target != "classification":
        raise ConfigError(f"{where}: these labels are classes; regression needs a table")
    if len(y) and int(y.max()) >= len(schema.class_names):
        raise DatasetUnavailableError(
            f"{where}: label {int(y.max())} has no name: --class-names lists "
            f"{len(schema.class_names)} classes"
        )
    return y.astype(np.int64)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format): magic 0, 0, 0x08, ndim; then ndim
    big-endian int32 sizes; then the bytes."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetUnavailableError(f"{path}: cannot be read ({_reason(exc)})") from None
    if len(data) < 4 + 4 * ndim or data[:3] != b"\0\0\x08" or data[3] != ndim:
        raise DatasetUnavailableError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DatasetUnavailableError(
            f"{path}: holds {body.size:,} bytes of data; its header says {math.prod(dims):,}"
        )
    return body.reshape(dims)


def _idx_pair(folder: Path, images: str, labels_: str, schema: SchemaSettings) -> Tensors:
    x_path, y_path = folder / images, folder / labels_
    x = read_idx(x_path, 3)
    y = read_idx(y_path, 1)
    if len(x) != len(y):
        raise DatasetUnavailableError(f"{x_path}: {len(x):,} images but {y_path} has {len(y):,}")
    pixels = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    return Tensors(fit_images(pixels, schema.input_shape), class_indices(y, schema, str(y_path)))


def find_idx(root: Path, schema: SchemaSettings) -> Found | None:
    """MNIST-format files (optionally gzipped) in root, root/MNIST/raw or
    root/FashionMNIST/raw: the training pair, and the t10k pair when present."""
    for folder in (root, root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        names = [
            next((n + s for s in ("", ".gz") if (folder / (n + s)).is_file()), None)
            for n in IDX_FILES
        ]
        if not any(names):
            continue
        missing = [IDX_FILES[i] for i, n in enumerate(names) if n is None]
        if names[0] is None or names[1] is None or (names[2] is None) != (names[3] is None):
            raise DatasetUnavailableError(f"{folder}: IDX files, but no {missing[0]}")
        train = _idx_pair(folder, str(names[0]), str(names[1]), schema)
        test = None if names[2] is None else _idx_pair(folder, str(names[2]), str(names[3]), schema)
        return Found("idx", train, test)
    return None


def _cifar_part(files: Sequence[Path], schema: SchemaSettings) -> Tensors:
    read = [read_cifar10_batch(f) for f in files]
    x = torch.cat([x for x, _ in read])
    y = np.concatenate([y.numpy() for _, y in read])
    return Tensors(fit_images(x, schema.input_shape), class_indices(y, schema, str(files[0])))


def find_cifar(root: Path, schema: SchemaSettings) -> Found | None:
    """CIFAR-10's binary release (cifar-10-batches-bin/ or its files in root): every
    data_batch_N.bin for training, test_batch.bin when present for testing."""
    for folder in (root / "cifar-10-batches-bin", root):
        if not folder.is_dir():
            continue
        batches = sorted(
            (p for p in folder.glob("data_batch_*.bin") if p.stem[11:].isdigit()),
            key=lambda p: int(p.stem[11:]),
        )
        if not batches:
            continue
        test = folder / "test_batch.bin"
        return Found(
            "cifar10-binary",
            _cifar_part(batches, schema),
            _cifar_part([test], schema) if test.is_file() else None,
        )
    return None


def table_columns(path: Path) -> list[str]:
    """A CSV's or Parquet file's column names, from its header or footer only."""
    if path.suffix == ".parquet":
        return list(pq.read_schema(path).names)
    with pacsv.open_csv(path) as reader:
        return list(reader.schema.names)


def read_table(path: Path, schema: SchemaSettings) -> Tensors:
    """A CSV or Parquet file's feature and label columns (only those are read)."""
    needed = [*schema.columns, schema.label_column]
    try:
        require_columns(table_columns(path), needed, str(path))
        if path.suffix == ".parquet":
            table = pq.read_table(path, columns=needed)
        else:
            table = pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(include_columns=needed)
            )
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, DatasetUnavailableError):
            raise
        raise DatasetUnavailableError(
            f"{path}: not a readable {path.suffix[1:]} table ({_reason(exc)})"
        ) from None
    return table_part(table, schema, str(path))


def find_table(root: Path, schema: SchemaSettings) -> Found | None:
    """One CSV or Parquet file (the split is made here), or train.* and test.* (given)."""
    tables = [p for p in _visible(root) if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES]
    by_name = {p.name.lower(): p for p in tables}
    pairs = [(by_name.get(f"train{s}"), by_name.get(f"test{s}")) for s in TABLE_SUFFIXES]
    given = [(tr, te) for tr, te in pairs if tr is not None and te is not None]
    if len(given) == 1 and len(tables) == 2:
        train, test = given[0]
        return Found(train.suffix[1:].lower(), read_table(train, schema), read_table(test, schema))
    if len(tables) == 1:
        return Found(tables[0].suffix[1:].lower(), read_table(tables[0], schema), None)
    if not tables:
        return None
    raise DatasetUnavailableError(
        f"{root}: holds {len(tables)} tables ({cut(', '.join(p.name for p in tables), 120)}): "
        "keep one table, or train.csv and test.csv (or .parquet)"
    )


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetUnavailableError(f"{path}: not readable JSON ({_reason(exc)})") from None


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC stream file (what `save_to_disk` writes), memory-mapped: its pages are
    read when touched, and a table of images costs no memory of its own."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise DatasetUnavailableError(f"{path}: not an Arrow stream ({_reason(exc)})") from None


def _hf_split(folder: Path, schema: SchemaSettings) -> Part:
    """One split written by `Dataset.save_to_disk`: state.json lists its Arrow files,
    dataset_info.json its features (which column is an Image, a ClassLabel's names)."""
    state = _json(folder / "state.json")
    features = _json(folder / "dataset_info.json").get("features") or {}
    try:
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise DatasetUnavailableError(f"{folder / 'state.json'}: lists no data files") from None
    where = str(folder)
    if not files:
        raise DatasetUnavailableError(f"{where}: a datasets folder without data files")
    tables = [read_arrow(f) for f in files]
    present = tables[0].schema.names
    label = features.get(schema.label_column) or {}
    names = label.get("names") if label.get("_type") == "ClassLabel" else None
    if schema.data_kind == "table":
        cols = [*schema.columns, schema.label_column]
        require_columns(present, cols, where)
        return table_part(pa.concat_tables([t.select(cols) for t in tables]), schema, where, names)
    images = [k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Image"]
    if len(images) != 1:
        raise DatasetUnavailableError(
            f"{where}: needs one Image column, found {len(images)} ({cut(images)})"
        )
    require_columns(present, [*images, schema.label_column], where)
    column = pa.chunked_array(
        [c for t in tables for c in t.column(schema.label_column).chunks],
        type=tables[0].schema.field(schema.label_column).type,
    )
    y = labels(column, schema, where, names)
    source = ArrowImages(files, [t.num_rows for t in tables], images[0])
    check_headers(source)
    return Images(source, np.arange(len(y)), y)


def find_hf(root: Path, schema: SchemaSettings) -> Found | None:
    """A folder of `Dataset.save_to_disk` (state.json), or of `DatasetDict.save_to_disk`
    (dataset_dict.json): its train and test splits when it has both, else its train split
    (or its only one), split here."""
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        return Found("hf-datasets", _hf_split(root, schema), None)
    if not (root / "dataset_dict.json").is_file():
        return None
    splits = _json(root / "dataset_dict.json").get("splits") or []
    if {"train", "test"} <= set(splits):
        used = ["train", "test"]
    elif "train" in splits or len(splits) == 1:
        used = ["train" if "train" in splits else splits[0]]
    else:
        raise DatasetUnavailableError(
            f"{root}: a DatasetDict with splits {cut(splits)}: it needs a 'train' split"
        )
    parts = [_hf_split(root / s, schema) for s in used]
    ignored = tuple(f"split {s!r}" for s in splits if s not in used)
    return Found("hf-datasets", parts[0], parts[1] if len(parts) > 1 else None, ignored)


def find(root: Path, schema: SchemaSettings) -> Found:
    """The first format whose files are in root, in this order: a Hugging Face folder
    (its marker files are unambiguous), IDX, CIFAR, then an image folder (images) or a
    table (tables)."""
    finders = (
        (find_hf, find_idx, find_cifar, find_image_folder)
        if schema.data_kind == "image"
        else (find_hf, find_table)
    )
    for finder in finders:
        found = finder(root, schema)
        if found is not None:
            return found
    expected = (
        "class folders of images, train/ and test/ class folders, IDX, CIFAR-10 binary or a "
        "Hugging Face datasets folder"
        if schema.data_kind == "image"
        else "a .csv or .parquet file, train and test ones, or a Hugging Face datasets folder"
    )
    raise DatasetUnavailableError(f"{root}: no {schema.data_kind} data found (expected {expected})")


# --- split, statistics, checks ------------------------------------------------------------


def held_out(found: Found, schema: SchemaSettings, root: Path) -> tuple[Part, Part, dict[str, Any]]:
    """Training and test parts: the data's own split, or one made here (stratified for
    classification) from schema.test_fraction and schema.split_seed, and which it was."""
    if found.test is not None:
        return found.train, found.test, {"given": True}
    y = found.train.y
    if len(y) < 2:
        raise DatasetUnavailableError(
            f"{root}: {len(y)} example{'s' if len(y) != 1 else ''} ({found.format}), too few "
            "to hold out a test split"
        )
    if schema.target == "classification":
        train, test = stratified_split(y, schema.test_fraction, schema.split_seed)
    else:
        order = np.random.RandomState(schema.split_seed).permutation(len(y))
        n_test = math.ceil(schema.test_fraction * len(y))
        test, train = order[:n_test], order[n_test:]
    made = {"made": schema.test_fraction, "seed": schema.split_seed}
    return take(found.train, np.sort(train)), take(found.train, np.sort(test)), made


def image_stats(part: Images, shape: tuple[int, int, int], seed: int, workers: int) -> Stats:
    """Mean and std per channel of a seeded sample of at most STATS_SAMPLE training images
    (decoded by the workers, without augmentation): the pixels of a few thousand images
    pin these to a few parts in a thousand, and reading every image would cost an epoch."""
    n = len(part.y)
    pick = np.sort(np.random.RandomState(seed).choice(n, min(n, STATS_SAMPLE), replace=False))
    readers = Readers(workers)
    sample = LoaderExamples(
        ImageItems(Images(part.source, part.rows[pick], part.y[pick]), shape), readers=readers
    )
    total = torch.zeros(shape[0], dtype=torch.float64)
    squares = torch.zeros(shape[0], dtype=torch.float64)
    count = 0
    try:
        for x, _ in sample.batches(STATS_BATCH, torch.device("cpu")):
            x = x.to(torch.float64)
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
    finally:
        readers.close()  # its workers end here, before the training ones start
    mean = total / count
    return mean.float(), (squares / count - mean.square()).clamp(min=0).sqrt().float()


def statistics(train: Part, schema: SchemaSettings, workers: int) -> Stats | None:
    """What inputs are standardised with: this participant's training data (own; population
    std), the declared mean and std, or nothing. Shaped (C, 1, 1) for images and (F,) for
    tables, to broadcast over one input or a batch. A channel or feature that is constant in
    this participant's data (std under STD_FLOOR: a one-hot column it never sets, a blank
    channel) is centred but not scaled: dividing by its near-zero std would turn a test
    value that differs into millions."""
    if schema.normalise == "none":
        return None
    if schema.normalise == "declared":
        mean = torch.tensor(schema.mean, dtype=torch.float32)
        std = torch.tensor(schema.std, dtype=torch.float32)
    elif isinstance(train, Images):
        mean, std = image_stats(train, schema.input_shape, schema.split_seed, workers)
    else:
        dims = (0, 2, 3) if schema.data_kind == "image" else (0, 1, 2)
        std, mean = torch.std_mean(train.x, dim=dims, correction=0)
    std = torch.where(std < STD_FLOOR, torch.ones_like(std), std)
    if schema.data_kind == "image":
        return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
    return mean, std


def examples(
    part: Part, schema: SchemaSettings, stats: Stats | None, training: bool, readers: Readers
) -> Examples:
    """What the training loop reads: images on disk through the readers' worker processes
    (shared by the training and the test images), tensors in memory; training images
    augmented as the schema says."""
    crop = schema.augment_crop if training else 0
    flip = schema.augment_flip and training
    if isinstance(part, Images):
        items = ImageItems(part, schema.input_shape, crop, flip, stats)
        return LoaderExamples(items, readers=readers)
    y = torch.from_numpy(part.y)
    if crop or flip:
        return AugmentedTensors(part.x, y, crop, flip, stats)
    return TensorExamples(normalised(part.x, stats), y)


def class_names_present(y: np.ndarray, schema: SchemaSettings) -> list[str]:
    """The declared classes this participant trains on (has training examples of), in
    label order: a participant may hold only some of the federation's classes."""
    if schema.target != "classification":
        return []
    return [schema.class_names[int(i)] for i in np.unique(y)]


def open_own_data(root: Path | str, schema: SchemaSettings, workers: int = 2) -> OwnData:
    """Everything in root, as the schema declares a sample, split into training and test
    examples; the facts say what was found (format, counts, classes, split, normalisation).

    Every file is checked before this returns (image headers, table columns and values, label
    names): an error is one line naming the file, and a participant never joins with part
    of its data. `workers` read images on disk (0: in this process).
    """
    if not schema.declared:
        raise ConfigError("--dataset own needs the federation's data schema (--data-kind)")
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailableError(f"{root}: not a directory (--data-dir of own data)")
    found = find(root, schema)
    train, test, split = held_out(found, schema, root)
    for what, part in (("training", train), ("test", test)):
        if len(part.y) == 0:
            raise DatasetUnavailableError(f"{root}: no {what} examples ({found.format})")
    stats = statistics(train, schema, workers)
    facts = {
        "format": found.format,
        "root": str(root),
        "n_train": len(train.y),
        "n_test": len(test.y),
        "classes": class_names_present(train.y, schema),
        "split": split,
        "normalise": schema.normalise,
        "ignored": list(found.ignored),
    }
    readers = Readers(workers)  # one set of worker processes for both splits
    return OwnData(
        examples(train, schema, stats, True, readers),
        examples(test, schema, stats, False, readers),
        facts,
    )


__all__ = ["ImageDecodeError", "OwnData", "open_own_data"]
