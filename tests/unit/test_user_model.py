"""A user's model from a package outside this repository: built by its factory where a
party's own settings name it, written as w0 by init-model in the model's own tensor order,
run by `local`, `centralised` and `compare`, saved and loaded back for `predict`; and
every way a factory can be wrong is one line."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from services.aggregator.settings import AggregatorConfig
from services.centralised import run_centralised
from services.core.errors import ConfigError
from services.core.factory import call_factory
from services.core.model_file import load_model_file, read_weights, write_model_file
from services.experiment import CentralisedConfig, ExperimentConfig, InitModelConfig
from services.initmodel import init_model
from services.local import run_local

_names = itertools.count()

PACKAGE = '''
from torch import nn


class Net(nn.Module):
    """Layers named so that their alphabetical order is not the model's."""

    def __init__(self, features, outputs):
        super().__init__()
        self.zeta = nn.Linear(features, 32)
        self.alpha = nn.Linear(32, outputs)

    def forward(self, x):
        return self.alpha(self.zeta(x.flatten(1)).relu())


def make(input_shape, outputs):
    c, h, w = input_shape
    return Net(c * h * w, outputs)


def fixed():
    return Net(64, 10)


def not_a_model(input_shape):
    return "a string"


def doubles(outputs):
    return nn.Linear(4, outputs).double()


def broken():
    raise RuntimeError("the owners' factory broke")


VALUE = 3
'''


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh package (a new name each test: no module cache) on sys.path."""
    name = f"usermodel{next(_names)}"
    (tmp_path / "pkg" / name).mkdir(parents=True)
    (tmp_path / "pkg" / name / "__init__.py").write_text(PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    return name


def test_the_factory_gets_what_it_declares(package: str) -> None:
    model = call_factory(f"{package}:make", (1, 8, 8), 10)
    assert model.zeta.in_features == 64 and model.alpha.out_features == 10
    assert call_factory(f"{package}:fixed", (3, 32, 32), 2).alpha.out_features == 10


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("missing:make", "no module 'missing'"),
        ("{p}:absent", "no callable 'absent'"),
        ("{p}:VALUE", "no callable 'VALUE'"),
        ("{p}:not_a_model", "returned a str, not a torch.nn.Module"),
        ("{p}:doubles", "must be float32"),
        ("{p}:broken", "the factory failed: RuntimeError: the owners' factory broke"),
    ],
)
def test_a_wrong_factory_is_one_line(package: str, factory: str, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        call_factory(factory.format(p=package), (1, 8, 8), 10)
    assert words in str(refused.value)
    assert "\n" not in str(refused.value)


def test_init_model_keeps_the_models_order_and_the_aggregator_needs_it(
    package: str, tmp_path: Path
) -> None:
    config = InitModelConfig.build(
        federation={"model": f"{package}:make", "dataset": "digits", "seed": 4},
        run={"out": str(tmp_path / "w0")},
    )
    written = init_model(config)
    weights = read_weights(written[0])
    model = call_factory(f"{package}:make", (1, 8, 8), 10)
    assert (
        list(weights)
        == list(model.state_dict())
        == [
            "zeta.weight",
            "zeta.bias",
            "alpha.weight",
            "alpha.bias",
        ]
    )
    # The same seed, the same w0: what participants build is what the aggregator starts from.
    again = read_weights(init_model(config.replace(out=str(tmp_path / "again")))[0])
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # The aggregator never imports the factory: a user's model needs --initial-model.
    with pytest.raises(ConfigError, match="never imports"):
        AggregatorConfig.build(federation={"model": f"{package}:make"})
    AggregatorConfig.build(
        federation={"model": f"{package}:make"}, store={"initial_model": str(written[0])}
    )


def test_read_weights_refuses_what_cannot_start_a_federation(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(bad))
    with pytest.raises(ConfigError, match="NaN"):
        read_weights(bad)
    half = tmp_path / "half.safetensors"
    save_file({"w": torch.ones(2, dtype=torch.float16)}, str(half))
    with pytest.raises(ConfigError, match="not float32"):
        read_weights(half)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        read_weights(junk)


@pytest.mark.slow
def test_local_and_centralised_train_a_user_model(package: str, tmp_path: Path) -> None:
    federation = {
        "model": f"{package}:make",
        "participants": 6,
        "select": 6,
        "rounds": 4,
        "clusters": 3,
        "eval_per_cluster": 2,
    }
    result = run_local(
        ExperimentConfig.build(federation=federation, run={"out": str(tmp_path / "local")})
    )
    assert result.final["mean_accuracy"] >= 0.8, result.final
    assert result.card is not None and result.card.model == f"{package}:make"
    # Saved and loaded back (predict's path): the factory rebuilds it, the weights fit.
    write_model_file(tmp_path / "model", result.weights, result.card)
    model, card = load_model_file(tmp_path / "model")
    assert card.model == f"{package}:make"
    x = torch.zeros(2, 1, 8, 8)
    assert model(card.normalise(x)).shape == (2, 10)
    central = run_centralised(
        CentralisedConfig.build(federation=federation, run={"out": str(tmp_path / "central")})
    )
    assert central.final["mean_accuracy"] >= 0.8, central.final
