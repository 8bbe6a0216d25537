"""The devices the tensor algorithms are tested on: the CPU always, CUDA where present."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each test that takes it runs once per available device."""
    return torch.device(request.param)
