"""The data schema a federation declares, and the scores of its two kinds of task."""

from __future__ import annotations

import pytest
import torch

from services.common.schema import SchemaSettings, check_federation, schema_from_wire
from services.core.errors import ConfigError
from services.core.objectives import OBJECTIVES, Tally

IMAGES = {"data_kind": "image", "sample_shape": "1,28,28", "class_names": "a,b,c"}
TABLE = {"data_kind": "table", "features": "age:int,bmi,smoker:bool", "label_column": "y"}


def test_a_declaration_travels_and_compares_as_canonical_text() -> None:
    mine = SchemaSettings.build(**IMAGES)
    assert mine.input_shape == (1, 28, 28) and mine.outputs == 3 and mine.declared
    again = schema_from_wire(mine.text())
    assert again == mine and again.digest() == mine.digest()
    assert mine.difference(again) is None
    other = SchemaSettings.build(**{**IMAGES, "sample_shape": "1,32,32"})
    assert other.digest() != mine.digest()
    assert mine.difference(other) == (
        "sample-shape: the federation's is '(1, 28, 28)', this participant's '(1, 32, 32)'"
    )


def test_a_table_is_a_row_of_features() -> None:
    table = SchemaSettings.build(**TABLE, target="regression")
    assert table.input_shape == (1, 1, 3) and table.outputs == 1
    assert table.columns == ("age", "bmi", "smoker")
    assert not SchemaSettings().declared  # a named dataset's: no schema


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({**IMAGES, "sample_shape": "2,28,28"}, "1 (grey) or 3 (RGB) channels"),
        ({**IMAGES, "sample_shape": ""}, "need --sample-shape"),
        ({**IMAGES, "class_names": "a"}, "two or more --class-names"),
        ({**IMAGES, "class_names": "a,a"}, "distinct"),
        ({**IMAGES, "target": "regression"}, "regression has no --class-names"),
        ({**IMAGES, "normalise": "declared", "mean": "0.5"}, "needs 1 --mean and --std"),
        ({**IMAGES, "mean": "0.5", "std": "0.2"}, "with --normalise declared only"),
        ({**IMAGES, "normalise": "declared", "mean": "0", "std": "0"}, "must be positive"),
        ({**TABLE, "class_names": "0,1", "features": "age:text"}, "NAME:TYPE"),
        ({**TABLE, "class_names": "0,1", "label_column": "age"}, "is also a feature"),
        ({**TABLE, "class_names": "0,1", "augment_flip": True}, "describe images"),
        ({"data_kind": "table", "class_names": "0,1"}, "needs --features"),
        ({**IMAGES, "test_fraction": float("nan")}, "test_fraction"),
    ],
)
def test_a_bad_declaration_is_one_line(changes: dict, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        SchemaSettings.build(**changes)
    assert words in str(refused.value).replace("--test-fraction", "test_fraction")
    assert "\n" not in str(refused.value)


def test_what_a_participant_sends_is_checked_before_it_is_read() -> None:
    with pytest.raises(ConfigError, match="at most"):
        schema_from_wire('{"class_names": ["' + "x" * 20_000 + '"]}')
    with pytest.raises(ConfigError, match="not a data schema"):
        schema_from_wire('{"data_kind": "video"}')
    with pytest.raises(ConfigError, match="not a data schema"):
        schema_from_wire("[1, 2")
    with pytest.raises(ConfigError, match="not a data schema"):
        schema_from_wire('{"target_std": NaN}')


def test_own_data_and_its_schema_come_together() -> None:
    check_federation("own", SchemaSettings.build(**IMAGES))
    check_federation("digits", SchemaSettings())
    with pytest.raises(ValueError, match="needs the federation's data schema"):
        check_federation("own", SchemaSettings())
    with pytest.raises(ValueError, match="use --dataset own"):
        check_federation("digits", SchemaSettings.build(**IMAGES))


def score(target: str, out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    objective, tally = OBJECTIVES[target], Tally()
    for k in range(0, len(y), 3):  # in batches, as evaluate adds them
        objective.add(tally, out[k : k + 3], y[k : k + 3])
    return tally.loss_sum / tally.n, objective.score(tally)


def test_regression_is_served_as_well_as_its_r_squared() -> None:
    y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert score("regression", y.unsqueeze(1), y) == (0.0, 1.0)  # perfect
    mean = torch.full((7, 1), float(y.mean()))
    loss, r2 = score("regression", mean, y)  # the mean explains nothing
    assert r2 == pytest.approx(0.0, abs=1e-12) and loss == pytest.approx(4.0)
    half = (y + 0.5 * (y.mean() - y)).unsqueeze(1)  # a quarter of the variance left
    assert score("regression", half, y)[1] == pytest.approx(0.75)
    assert score("regression", -y.unsqueeze(1), y)[1] == 0.0  # worse than the mean: 0
    assert OBJECTIVES["regression"].loss(half, y) == pytest.approx(1.0)


def test_classification_is_served_as_well_as_its_accuracy() -> None:
    out = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    loss, acc = score("classification", out, torch.tensor([0, 1, 1, 1]))
    assert acc == 0.75 and loss > 0
