"""Named tensors, their spec and the flat vector form."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from services.core.errors import SpecMismatchError
from services.core.tensors import check_spec, flatten, spec_of, unflatten


def test_flatten_round_trip_keeps_int_buffers_from_reference():
    # BatchNorm's num_batches_tracked is an int buffer (the built-in models use GroupNorm).
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = model.state_dict()
    assert any(not v.dtype.is_floating_point for v in state.values())
    spec = spec_of(state)
    vec = flatten(state, spec)
    assert vec.numel() == sum(p.numel() for k, p in state.items() if p.dtype.is_floating_point)
    back = unflatten(vec, spec, state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(SpecMismatchError):
        unflatten(vec, spec)  # int buffers need a reference
    with pytest.raises(SpecMismatchError):
        unflatten(vec[:-1], spec, state)


def test_check_spec_names_the_difference():
    w = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    spec = spec_of(w)
    check_spec(w, spec)
    with pytest.raises(SpecMismatchError, match="missing"):
        check_spec(OrderedDict(a=w["a"]), spec)
    with pytest.raises(SpecMismatchError, match="unknown"):
        check_spec(OrderedDict(**w, c=torch.zeros(1)), spec)
    with pytest.raises(SpecMismatchError, match="shape"):
        check_spec(OrderedDict(a=torch.zeros(3, 2), b=w["b"]), spec)
    with pytest.raises(SpecMismatchError, match="dtype"):
        check_spec(OrderedDict(a=w["a"], b=torch.zeros(4, dtype=torch.float64)), spec)
