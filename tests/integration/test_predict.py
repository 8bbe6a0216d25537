"""`flclustering predict` reads lines of held-out handwritten digits with a run's model."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch

from services.cli import main
from services.core.model_file import load_model_file
from services.participant.datasets import load_dataset
from services.predict import expression_value

matplotlib.use("Agg")
SCALE = 4  # the composed images are drawn 4x larger than the 8x8 digits, as a scan would be


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["local", "--rounds", "12", "--seed", "1", "--out", str(out)])
    assert code == 0
    return out


def compose(tiles: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Digits side by side, dark ink on white paper, with random gaps and slight offsets."""
    big = [np.kron(t, np.ones((SCALE, SCALE))) for t in tiles]
    size = 8 * SCALE
    gaps = rng.integers(3, 12, size=len(big) + 1)
    offsets = rng.integers(0, 5, size=len(big))
    canvas = np.zeros((size + 12, int(gaps.sum()) + size * len(big)))
    x = int(gaps[0])
    for tile, gap, dy in zip(big, gaps[1:], offsets, strict=True):
        canvas[2 + dy : 2 + dy + size, x : x + size] = tile
        x += size + int(gap)
    return 1.0 - canvas  # paper is white


def test_predict_reads_lines_of_held_out_digits(trained, tmp_path, capsys):
    model, card = load_model_file(trained)
    data = load_dataset("digits")
    raw = (data.x_test * card.std[0] + card.mean[0]).clamp(0, 1)  # pixels in [0, 1]
    with torch.no_grad():
        direct = model(data.x_test).argmax(1)
    rng = np.random.default_rng(0)
    images, truth, direct_right = [], [], []
    start = 0
    for n in (3, 4, 5, 6) * 10:
        idx = list(range(start, start + n))
        start += n
        path = tmp_path / f"line{len(images)}.png"
        matplotlib.image.imsave(path, compose([raw[i, 0].numpy() for i in idx], rng), cmap="gray")
        images.append(str(path))
        truth.append("".join(str(int(data.y_test[i])) for i in idx))
        direct_right += [bool(direct[i] == data.y_test[i]) for i in idx]
    capsys.readouterr()
    assert (
        main(["predict", "--model-file", str(trained / "model.safetensors"), "--json", *images])
        == 0
    )
    reports = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in reports] == images
    # Every symbol is found, in reading order, with a probability.
    assert [len(r["text"]) for r in reports] == [len(t) for t in truth]
    read_right = [
        a == b
        for r, t in zip(reports, truth, strict=True)
        for a, b in zip(r["text"], t, strict=True)
    ]
    model_accuracy = float(np.mean(direct_right))
    assert model_accuracy > 0.85
    assert float(np.mean(read_right)) >= model_accuracy - 0.05
    assert all(0 < s["probability"] <= 1 for r in reports for s in r["symbols"])
    # The plain output: one line per image.
    assert main(["predict", "--model-file", str(trained), images[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{images[0]}: {reports[0]['text']}  (probabilities ")


def test_predict_errors_are_one_line(trained, tmp_path, capsys):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    for argv in (
        ["predict", "--model-file", str(trained), str(tmp_path / "missing.png")],
        ["predict", "--model-file", str(trained), str(bad)],
        ["predict", "--model-file", str(tmp_path / "nothing.safetensors"), str(bad)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flclustering: error:"), err


@pytest.mark.parametrize(
    ("tokens", "value"),
    [
        ("12+3*4", 24.0),
        ("(1+2)*3=9", 9.0),
        ("8/2-5", -1.0),
        ("-3+10", 7.0),
        ("1+", None),
        ("4/0", None),
        ("2(3", None),
        ("", None),
    ],
)
def test_expressions_are_parsed_not_evaluated(tokens, value):
    assert expression_value(list(tokens)) == value
