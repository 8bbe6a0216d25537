"""A user's model, from the factory its owners name: `--model package.module:factory`.

The factory is a callable in the user's own package (importable on the machine that runs
it: installed, or on PYTHONPATH) that returns a `torch.nn.Module`. It is named only in a
party's own settings (a participant's flags or run file, `flclustering init-model`,
`predict`), never taken from the network: importing a module runs its code, so nothing a
peer sends may choose what is imported. The aggregator never imports it at all: it starts
from the weights `flclustering init-model` writes (`--initial-model`), and checks every
upload against that file's tensor specs.

The factory is called with the keyword arguments it declares of `input_shape` (C, H, W; a
table's is (1, 1, features)) and `outputs` (classes, or 1 for regression), so a fixed
architecture can ignore them and a configurable one can size itself from the schema.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from services.core.catalog import is_reference
from services.core.errors import ConfigError

Shape = tuple[int, int, int]


def load_factory(reference: str) -> Callable[..., Any]:
    """The callable `package.module:factory` names; each failure is one ConfigError line."""
    if not is_reference(reference):
        raise ConfigError(f"--model {reference[:80]!r} is not package.module:factory")
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"--model {reference}: no module {exc.name!r} (install the package or add its "
            "directory to PYTHONPATH)"
        ) from None
    except Exception as exc:  # the user's module failed while importing
        raise ConfigError(
            f"--model {reference}: importing {module_name} failed: {type(exc).__name__}: "
            f"{str(exc)[:200]}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"--model {reference}: {module_name} has no callable {attr!r}")
    return factory


def call_factory(reference: str, input_shape: Shape, outputs: int) -> nn.Module:
    """The model the factory builds, given the keywords it declares (see the module)."""
    factory = load_factory(reference)
    offered: dict[str, Any] = {"input_shape": tuple(input_shape), "outputs": outputs}
    try:
        params = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: call it bare
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(
            f"--model {reference}: the factory failed: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"--model {reference}: the factory returned a {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not floats or any(t.dtype != torch.float32 for t in floats):
        raise ConfigError(
            f"--model {reference}: the model's floating-point tensors must be float32 "
            "(what travels and is aggregated)"
        )
    return model
