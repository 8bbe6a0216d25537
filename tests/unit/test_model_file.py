"""A run's model file: safetensors weights and a card, loaded without the run."""

from __future__ import annotations

import json

import pytest
import torch

from services.core.errors import ConfigError
from services.core.model_file import ModelCard, load_model_file, write_model_file
from services.core.models import build_model

CARD = ModelCard("cnn", "digits", (1, 8, 8), tuple("0123456789"), (0.3,), (0.4,), {"rounds": 1})


def test_a_written_model_loads_and_predicts_alike(tmp_path):
    model = build_model("cnn", (1, 8, 8), 10, seed=3).eval()
    write_model_file(tmp_path, model.state_dict(), CARD)
    loaded, card = load_model_file(tmp_path)  # the directory or the weights file
    assert card == CARD
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(card.normalise(x)), model(CARD.normalise(x)))
    assert load_model_file(tmp_path / "model.safetensors")[1] == CARD
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_bad_model_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.json"):
        load_model_file(tmp_path / "model.safetensors")
    write_model_file(tmp_path, build_model("cnn", (1, 8, 8), 10).state_dict(), CARD)
    card = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**card, "model": "mclr"}))
    with pytest.raises(ConfigError, match="does not fit a mclr"):
        load_model_file(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**card, "std": [0.0]}))
    with pytest.raises(ConfigError, match="positive stds"):
        load_model_file(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(card))
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_model_file(tmp_path)
