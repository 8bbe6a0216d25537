"""What one sample of the federation's data is: the schema every data owner checks against.

With `--dataset own` every participant trains on the data in its own `--data-dir` (an image
folder, IDX or CIFAR files, a CSV or Parquet table, a Hugging Face `datasets` folder). Those
folders are written by different people with different tools, so the federation declares
once, in its run file, what a sample is: images of a shape with named classes, or a table
with named feature columns and a label column, for classification or regression. A
participant checks its data against that declaration before it joins (a wrong file is named
in one line, and it does not join with part of its data), and sends the declaration it
checked at `Join`; the clusterer refuses a participant whose declaration differs from its
own, naming the first difference (docs/own-data.md, "What one sample is").

Normalisation: `own` (the default) standardises each participant's inputs with statistics of
its own training data, which are never sent anywhere (per-site standardisation: it also
removes a scanner's or a sensor's offset); `declared` uses the run file's mean and std, the
same for everyone; `none` leaves inputs as read (pixels in [0, 1]). Whatever `predict` and
`export` need comes from this declaration, never from one participant's data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from typing_extensions import Self

from services.common.settings import Settings, Shape3, choice, cut, one_line
from services.core.errors import ConfigError

MAX_SCHEMA_BYTES = 16 << 10  # the declaration a participant sends at Join
MAX_NAMES = 1000  # classes or feature columns
MAX_NAME = 200  # characters of one class or column name
FEATURE_TYPES = ("float", "int", "bool")
KINDS = ("", "image", "table")
TARGETS = ("classification", "regression")


def _csv_strs(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


def _csv_floats(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(float(p) for p in value.split(",") if p.strip())
    return value


def _names(value: tuple[str, ...]) -> tuple[str, ...]:
    if len(value) > MAX_NAMES:
        raise ValueError(f"at most {MAX_NAMES} names, got {len(value):,}")
    for name in value:
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"a name must be 1 to {MAX_NAME} printable characters: {cut(name)!r}")
    if len(set(value)) != len(value):
        raise ValueError("names must be distinct")
    return value


StrList = Annotated[tuple[str, ...], BeforeValidator(_csv_strs)]
Names = Annotated[StrList, AfterValidator(_names)]
FloatList = Annotated[tuple[float, ...], BeforeValidator(_csv_floats), Field(max_length=MAX_NAMES)]


def feature_name(column: str) -> tuple[str, str]:
    """A `features` entry as (column, type): `age:int`, `bmi` (float by default)."""
    name, _, kind = column.rpartition(":") if ":" in column else (column, "", "float")
    return name, kind


class SchemaSettings(Settings):
    """What one sample is (--dataset own): its kind, target, shape or columns, and classes."""

    data_kind: Annotated[str, choice(KINDS)] = Field(
        "", description="own data: image or table (empty: a named dataset, no schema)"
    )
    target: Annotated[str, choice(TARGETS)] = Field(
        "classification", description="own data: classification or regression"
    )
    class_names: Names = Field(
        (), description="own data: the class names, in label order (classification)"
    )
    sample_shape: Shape3 = Field(
        (), description="own images: C,H,W the model reads; other sizes are resized to it"
    )
    features: Names = Field(
        (), description="own tables: feature columns, NAME or NAME:float|int|bool, in order"
    )
    label_column: str = Field(
        "label", min_length=1, max_length=MAX_NAME, description="own tables: the label column"
    )
    normalise: Annotated[str, choice(("own", "declared", "none"))] = Field(
        "own",
        description="own data: standardise inputs with each participant's own statistics "
        "(never sent), with the declared --mean/--std, or not at all",
    )
    mean: FloatList = Field((), description="own data, --normalise declared: mean per channel")
    std: FloatList = Field((), description="own data, --normalise declared: std per channel")
    target_mean: float = Field(
        0.0, description="own regression data: targets are learnt as (y - target_mean) / target_std"
    )
    target_std: float = Field(1.0, gt=0, description="own regression data: see --target-mean")
    augment_crop: int = Field(
        0, ge=0, le=64, description="own images: random crop after padding this many pixels"
    )
    augment_flip: bool = Field(False, description="own images: random horizontal flips")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="own data without a test split: the share held out"
    )
    split_seed: int = Field(0, ge=0, lt=2**32, description="own data: seed of that split")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.data_kind:
            return self
        for entry in self.features:
            name, kind = feature_name(entry)
            if not name or kind not in FEATURE_TYPES:
                raise ValueError(
                    f"feature {cut(entry)!r}: write NAME or NAME:TYPE, TYPE one of "
                    f"{', '.join(FEATURE_TYPES)}"
                )
        if self.data_kind == "image":
            if not self.sample_shape:
                raise ValueError("own images need --sample-shape C,H,W")
            if self.sample_shape[0] not in (1, 3):
                raise ValueError("own images have 1 (grey) or 3 (RGB) channels")
            if self.features:
                raise ValueError("--features describe tables, not images")
        if self.data_kind == "table":
            if not self.features:
                raise ValueError("an own table needs --features (its feature columns)")
            if self.sample_shape or self.augment_crop or self.augment_flip:
                raise ValueError("--sample-shape and augmentation describe images, not tables")
            if self.label_column in {feature_name(f)[0] for f in self.features}:
                raise ValueError(f"--label-column {self.label_column!r} is also a feature")
        if self.target == "classification" and len(self.class_names) < 2:
            raise ValueError("own classification data needs two or more --class-names")
        if self.target == "regression" and self.class_names:
            raise ValueError("regression has no --class-names")
        if self.normalise == "declared":
            width = self.channels
            if len(self.mean) != width or len(self.std) != width:
                raise ValueError(
                    f"--normalise declared needs {width} --mean and --std values (one per "
                    f"{'channel' if self.data_kind == 'image' else 'feature'})"
                )
            if min(self.std) <= 0:
                raise ValueError("--std values must be positive")
        elif self.mean or self.std:
            raise ValueError("--mean and --std are used with --normalise declared only")
        return self

    @property
    def declared(self) -> bool:
        """Whether this is a schema at all (own data), not a named dataset's empty one."""
        return bool(self.data_kind)

    @property
    def channels(self) -> int:
        """What normalisation runs over: an image's channels or a table's features."""
        return self.sample_shape[0] if self.data_kind == "image" else len(self.features)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model's input: (C, H, W), or (1, 1, F) for a table (as the synthetic set)."""
        if self.data_kind == "image":
            c, h, w = self.sample_shape
            return (c, h, w)
        return (1, 1, len(self.features))

    @property
    def outputs(self) -> int:
        """The model's outputs: one per class, or one value (regression)."""
        return len(self.class_names) if self.target == "classification" else 1

    @property
    def columns(self) -> tuple[str, ...]:
        """The feature columns' names (without their types)."""
        return tuple(feature_name(f)[0] for f in self.features)

    def text(self) -> str:
        """The declaration as canonical JSON (sorted keys, no spaces): what Join carries."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 of the canonical declaration: equal digests, equal schemas."""
        return hashlib.sha256(self.text().encode()).hexdigest()

    def difference(self, other: SchemaSettings) -> str | None:
        """The first setting in which other differs from this one, as one line, or None."""
        mine, theirs = self.model_dump(), other.model_dump()
        for key in type(self).model_fields:
            if mine[key] != theirs[key]:
                return (
                    f"{key.replace('_', '-')}: the federation's is {cut(mine[key], 80)!r}, "
                    f"this participant's {cut(theirs[key], 80)!r}"
                )
        return None


def check_federation(dataset: str, schema: SchemaSettings) -> None:
    """Own data comes with its schema, and only own data has one (ValueError otherwise)."""
    if dataset == "own" and not schema.declared:
        raise ValueError(
            "--dataset own needs the federation's data schema: --data-kind image or table, "
            "with --sample-shape or --features, and --class-names (a run file's sample group)"
        )
    if dataset != "own" and schema.declared:
        raise ValueError(f"--data-kind describes own data: use --dataset own, not {dataset}")


def schema_from_wire(text: str) -> SchemaSettings:
    """A declaration a participant sent at Join; a ConfigError (one line) if it is none."""
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise ConfigError(f"a data schema is at most {MAX_SCHEMA_BYTES:,} bytes")
    try:
        return SchemaSettings.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"not a data schema: {one_line(exc)}") from None


__all__ = ["MAX_SCHEMA_BYTES", "SchemaSettings", "feature_name", "schema_from_wire"]
