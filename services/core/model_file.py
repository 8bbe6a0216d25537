"""A trained model as files anyone can load: `model.safetensors` and `model.json`.

The weights are safetensors (nothing is unpickled when they are read back); the card beside
them says what is needed to use them without this project's run: the architecture's name,
the input shape, the classes, and the per-channel normalisation the model was trained
with (pixels in [0, 1], then (x - mean) / std). `load_model_file` rebuilds the model from
the card and checks the weights against its spec.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.core.errors import ConfigError, SpecMismatchError
from services.core.models import build_model
from services.core.tensors import check_spec, spec_of

WEIGHTS = "model.safetensors"
CARD = "model.json"
ORDER = "order"  # metadata of model.safetensors: the tensors' names in the model's order


@dataclass(frozen=True)
class ModelCard:
    """What a saved model is and how its inputs were prepared."""

    model: str
    dataset: str
    input_shape: tuple[int, int, int]  # channels, height, width
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of pixels in [0, 1]
    std: tuple[float, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # run facts: strategy, rounds, accuracy
    # Own data (--dataset own): the federation's schema (services.common.schema), which says
    # what a sample is. Its normalisation may be each owner's own: then mean and std are
    # empty and a user standardises inputs with their own statistics, as owners did.
    sample: dict[str, Any] = field(default_factory=dict)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (N, C, H, W) as the model was trained on them (as they are,
        when the card declares no normalisation)."""
        if not self.mean:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    @property
    def outputs(self) -> int:
        """The model's outputs: one per class, or one value (regression)."""
        return len(self.classes) or 1

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> ModelCard:
        """A card read back; a missing or malformed field is one ConfigError."""
        try:
            shape = tuple(int(v) for v in data["input_shape"])
            card = ModelCard(
                str(data["model"]),
                str(data["dataset"]),
                (shape[0], shape[1], shape[2]),
                tuple(str(c) for c in data["classes"]),
                tuple(float(v) for v in data["mean"]),
                tuple(float(v) for v in data["std"]),
                dict(data.get("extra", {})),
                dict(data.get("sample", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"not a model card: {type(exc).__name__} {exc}") from None
        if len(shape) != 3 or len(card.mean) != len(card.std):
            raise ConfigError("a model card needs C,H,W and as many means as stds")
        if not card.sample and len(card.mean) != shape[0]:
            raise ConfigError("a model card needs one mean and std per channel")
        regression = card.sample.get("target") == "regression"
        if (len(card.classes) < 2 and not regression) or any(s <= 0 for s in card.std):
            raise ConfigError("a model card needs two or more classes and positive stds")
        return card


def write_model_file(
    directory: Path, weights: Mapping[str, torch.Tensor], card: ModelCard
) -> list[Path]:
    """Write model.safetensors and model.json into directory; the paths written.

    safetensors stores tensors sorted by dtype and name, not in the model's order; the order
    of `weights` (a state_dict's: what participants send) is kept in the file's metadata
    (ORDER), and read_weights gives the tensors back in it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    metadata = {"model": card.model, ORDER: json.dumps(list(tensors))}
    save_file(tensors, str(directory / WEIGHTS), metadata)
    (directory / CARD).write_text(json.dumps(asdict(card), indent=2) + "\n")
    return [directory / WEIGHTS, directory / CARD]


def read_weights(path: Path) -> OrderedDict[str, torch.Tensor]:
    """The tensors of a safetensors file (model.safetensors, or its directory), checked
    as a starting model must be: readable, not empty, floating point in float32 (what
    travels and is aggregated), every value finite. Nothing is imported or unpickled: this
    is how the aggregator starts from a user's model without running its code.

    The tensors come in the model's order when the file records it (write_model_file, so
    `flclustering init-model` and `export`): the order every upload's tensors must follow.
    A file without it (written by another tool) gives them in the file's order."""
    weights_path = path / WEIGHTS if path.is_dir() else path
    weights, metadata = _read(weights_path)
    recorded = metadata.get(ORDER)
    if not any(t.is_floating_point() for t in weights.values()):
        raise ConfigError(f"{weights_path}: holds no floating-point tensors to train")
    for name, t in weights.items():
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ConfigError(f"{weights_path}: tensor {name[:80]!r} is {t.dtype}, not float32")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{weights_path}: tensor {name[:80]!r} holds NaN or infinities")
    if recorded is None:
        return OrderedDict(weights.items())
    try:
        order = json.loads(recorded)
    except ValueError:
        order = None
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(weights):
        raise ConfigError(f"{weights_path}: its recorded tensor order does not list its tensors")
    return OrderedDict((name, weights[name]) for name in order)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, in one opening; a missing or unreadable
    file is one ConfigError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())  # a safetensors handle, not a dict: it has no __iter__
            return {k: fh.get_tensor(k) for k in names}, dict(fh.metadata() or {})
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a safetensors file ({exc})") from None


def load_model_file(path: Path) -> tuple[nn.Module, ModelCard]:
    """The model saved at path (model.safetensors, or its directory) in eval mode, and its
    card (model.json beside it); wrong or missing files are one clear error."""
    weights_path = path / WEIGHTS if path.is_dir() else path
    card_path = weights_path.with_name(CARD)
    try:
        card = ModelCard.from_json(json.loads(card_path.read_text()))
    except OSError as exc:
        raise ConfigError(f"{card_path}: {exc.strerror} (the card beside the weights)") from None
    except ValueError as exc:
        raise ConfigError(f"{card_path}: not JSON ({exc})") from None
    model = build_model(card.model, card.input_shape, card.outputs)
    weights, _ = _read(weights_path)
    expected = spec_of(model.state_dict())
    try:
        check_spec(weights, expected)
    except SpecMismatchError as exc:
        raise ConfigError(f"{weights_path} does not fit a {card.model}: {exc}") from None
    model.load_state_dict(weights)
    model.eval()
    return model, card
