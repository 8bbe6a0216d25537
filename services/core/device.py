"""Choosing the torch device a service computes on (participants train, the aggregator defends)."""

from __future__ import annotations

import torch

from services.core.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else the CPU; `cpu` and `cuda[:n]` are checked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu or cuda[:n]") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {spec!r}; use auto, cpu or cuda[:n]")
    return device
