"""A run's model file: safetensors weights and a card, loaded without the run."""

from __future__ import annotations

import json

import pytest
import torch

from services.core.errors import ConfigError
from services.core.model_file import (
    ModelCard,
    load_model_file,
    read_weights,
    write_model_file,
)
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


def test_weights_read_back_in_the_models_order(tmp_path):
    """safetensors stores tensors sorted by name (bias before weight); the aggregator's w0
    must list them in the model's order, the order every participant's upload follows."""
    from safetensors.torch import save_file

    state = build_model("cnn", (1, 8, 8), 10, seed=1).state_dict()
    assert list(state) != sorted(state)  # the case that matters: weight before bias
    write_model_file(tmp_path, state, CARD)
    weights = read_weights(tmp_path)
    assert list(weights) == list(state)
    assert all(torch.equal(weights[k], state[k]) for k in state)
    # A recorded order that does not list the file's tensors is refused in one line.
    tensors = {k: v.contiguous() for k, v in state.items()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), {"order": json.dumps(list(state)[:-1])})
    with pytest.raises(ConfigError, match="recorded tensor order"):
        read_weights(bad)
    # A file written elsewhere, without the order: the file's own.
    save_file(tensors, str(bad))
    assert list(read_weights(bad)) == sorted(state)
