"""Model weights as ordered name -> tensor maps, and their flat float32 vector form.

Robust rules and clustering work on an (n, d) matrix of flattened updates; services keep
and ship named tensors. The spec (names, shapes, dtypes) is what every received model is
checked against.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from services.core.errors import SpecMismatchError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor of a model."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for s in self.shape:
            n *= s
        return n


def spec_of(weights: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """The specification of a set of named tensors, in their order."""
    return tuple(TensorSpec(k, tuple(v.shape), v.dtype) for k, v in weights.items())


def float_specs(spec: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The floating-point tensors of a spec: the ones that are learnt and aggregated."""
    return tuple(s for s in spec if s.dtype.is_floating_point)


def check_spec(weights: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec]) -> None:
    """Raise SpecMismatchError naming the first difference between weights and spec."""
    expected = {s.name: s for s in spec}
    got = set(weights)
    missing = [s.name for s in spec if s.name not in got]
    extra = [k for k in weights if k not in expected]
    if missing:
        raise SpecMismatchError(f"missing tensor(s): {', '.join(missing[:5])}")
    if extra:
        raise SpecMismatchError(f"unknown tensor name(s): {', '.join(extra[:5])}")
    for name, t in weights.items():
        s = expected[name]
        if tuple(t.shape) != s.shape:
            raise SpecMismatchError(
                f"tensor {name!r} has shape {tuple(t.shape)}, expected {s.shape}"
            )
        if t.dtype != s.dtype:
            raise SpecMismatchError(f"tensor {name!r} has dtype {t.dtype}, expected {s.dtype}")


def flatten(weights: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec]) -> torch.Tensor:
    """Concatenate the floating tensors named in spec into one float32 vector."""
    parts = [weights[s.name].reshape(-1).to(torch.float32) for s in float_specs(spec)]
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def unflatten(
    vector: torch.Tensor,
    spec: Sequence[TensorSpec],
    reference: Mapping[str, torch.Tensor] | None = None,
    share: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """Inverse of flatten: float tensors from the vector, the others copied from reference.

    Non-float tensors (BatchNorm's step counters) are not averaged; they come from the
    reference model, usually the current global model. `share`: float32 tensors are views
    of the vector (for a reader of a vector nobody changes: no copy of a big model).
    """
    fspecs = float_specs(spec)
    total = sum(s.numel for s in fspecs)
    if vector.numel() != total:
        raise SpecMismatchError(f"vector has {vector.numel()} elements, spec needs {total}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for s in spec:
        if s.dtype.is_floating_point:
            part = vector[offset : offset + s.numel].reshape(s.shape)
            same = share and s.dtype == vector.dtype
            out[s.name] = part if same else part.to(s.dtype).clone()
            offset += s.numel
        else:
            if reference is None:
                raise SpecMismatchError(f"non-float tensor {s.name!r} needs a reference model")
            out[s.name] = reference[s.name].detach().clone()
    return out


def state_of(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A detached CPU copy of a model's state (parameters and buffers)."""
    return OrderedDict((k, v.detach().to("cpu").clone()) for k, v in model.state_dict().items())
