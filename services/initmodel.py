"""`flclustering init-model`: the starting weights w0 of a federation, written as a file.

The aggregator starts from this file (`--initial-model`) instead of building w0: for a
user's model it must, since it never imports user code, and for pretrained weights it is
how they enter the federation. It is written where the model's code is trusted (the
owners' machine), by the same factory participants call with the same seed, so the
participants' models and the aggregator's w0 have the same tensors; every upload is then
checked against this file's names, shapes and dtypes. The card beside it (model.json)
records what a sample is, for `predict` and `export`.
"""

from __future__ import annotations

from pathlib import Path

from services.core.model_file import write_model_file
from services.core.models import build_model
from services.core.tensors import state_of
from services.experiment import InitModelConfig
from services.local import described


def init_model(config: InitModelConfig) -> list[Path]:
    """Build the model of `config` with its seed and write model.safetensors and model.json
    into --out; the paths written."""
    fed = config.federation
    about = described(fed, config.data, config.sample)
    model = build_model(fed.model, about.input_shape, about.outputs, fed.seed)
    card = about.card({"seed": fed.seed, "initial": True})
    return write_model_file(Path(config.run.out), state_of(model), card)
