"""Codecs: one object per upload scheme, between a participant's update and an upload's
named tensors on the wire (the stream format of services/common/wire.py).

| codec | setting | header kind | the payload means |
|---|---|---|---|
| `RawCodec` | `--compression none` | `weights` | the trained weights, float32 as the model's |
| `Fp16Codec` | `--compression fp16` | `delta:fp16` | the delta, float16 |
| `Int8Codec` | `--compression int8` | `delta:int8` | the delta, int8 and a scale per tensor |
| `TopKCodec` | `--compression topk:F` | `delta:topk:F` | the delta's largest F share |
| `CkksCodec` | `--secure he` | `he:ckks` | `n_i * w_i`, CKKS ciphertexts |

Every codec has one interface: `name`, `payload` (what the payload means: `Payload`),
`kind` (the header's), `streamed` (whether a receiver reads the floats straight into their
place), `check` (the tensors a header lists, against the model: INVALID_ARGUMENT before
any data), `encode` and `decode`. `codec_named` is the registry by scheme name,
`codec_of_kind` by header kind. The mathematics is the learning core's
(services/core/quantise.py, services/core/ckks.py); what an upload must satisfy as a whole
(kinds, sizes, content) is services/common/uploads.py's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import Enum

import torch

from services.common.homomorphic import (
    KEY,
    as_bytes,
    check_key,
    ciphertexts_of,
    upload_spec,
    upload_tensors,
)
from services.common.homomorphic import KIND as HE_KIND
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.wire import check_header_spec, invalid, spec_from_pb
from services.core import ckks, quantise
from services.core.ckks import HeKeys
from services.core.errors import ConfigError
from services.core.quantise import INDICES, VALUES, Compression, ErrorFeedback, float_sizes
from services.core.tensors import TensorSpec, float_specs

Parts = Iterator[tuple[int, torch.Tensor]]  # (flat offset, float32 values) per float tensor


class Payload(str, Enum):
    """What an upload's payload means."""

    WEIGHTS = "weights"  # the trained weights
    DELTA = "delta"  # the trained weights minus the model they started from
    WEIGHTED = "n*w"  # the weights times the sample count (summed, then divided by N)


class Codec(ABC):
    """One upload scheme: its name, what its payload means, its header kind and checks."""

    name: str  # as the setting writes it: none, fp16, int8, topk:F, he
    payload: Payload
    kind: str  # the upload header's kind
    streamed: bool  # the floats lie as the model's: read straight into their place
    content: str  # how a refusal of its content starts ("int8 payload: ...")

    @property
    def setting(self) -> str:
        """The flag that chose this scheme, as a refusal names it."""
        return f"--compression {self.name}"

    @abstractmethod
    def check(
        self, items: Sequence[tensors_pb2.TensorSpec], model: Sequence[TensorSpec]
    ) -> tuple[TensorSpec, ...]:
        """The tensors an upload's header lists, checked against what this scheme sends for
        a model of `model`; INVALID_ARGUMENT otherwise. Counted first: a header of 300,000
        specs costs one comparison."""

    @abstractmethod
    def decode(self, payload: Mapping[str, torch.Tensor], model: Sequence[TensorSpec]) -> Parts:
        """The payload's float values a tensor at a time, every check done before the first
        part (a PayloadError of the learning core names what is out of range)."""


class DeltaCodec(Codec):
    """A compressed delta (the learning core's `Compression`)."""

    payload = Payload.DELTA

    def __init__(self, scheme: Compression) -> None:
        self.scheme = scheme
        self.name = str(scheme)
        self.kind = scheme.kind
        self.streamed = scheme.streamed
        self.content = f"{scheme} payload"

    def check(
        self, items: Sequence[tensors_pb2.TensorSpec], model: Sequence[TensorSpec]
    ) -> tuple[TensorSpec, ...]:
        return payload_spec_of(items, model, self.scheme)

    def encode(
        self,
        delta: torch.Tensor,
        model: Sequence[TensorSpec],
        generator: torch.Generator | None = None,
        memory: ErrorFeedback | None = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """The payload of a flat float32 delta; with `memory` (a participant's), what top-k
        did not send before is added and what it does not send now kept."""
        if memory is not None:
            return memory.send(delta, model, self.scheme, generator)
        return quantise.encode(delta, model, self.scheme, generator)

    def decode(self, payload: Mapping[str, torch.Tensor], model: Sequence[TensorSpec]) -> Parts:
        return quantise.decode_parts(payload, model, self.scheme)


class Fp16Codec(DeltaCodec):
    """The delta as float16 (2x fewer bytes)."""

    def __init__(self) -> None:
        super().__init__(Compression("fp16"))


class Int8Codec(DeltaCodec):
    """The delta as int8, a float32 scale per tensor, stochastically rounded (4x fewer)."""

    def __init__(self) -> None:
        super().__init__(Compression("int8"))


class TopKCodec(DeltaCodec):
    """The delta's `share` of coordinates largest in magnitude; the rest carried over."""

    def __init__(self, share: float) -> None:
        super().__init__(Compression("topk", share))


class RawCodec(Codec):
    """No compression: the trained weights as the model's own tensors (float32 mostly)."""

    name = "none"
    payload = Payload.WEIGHTS
    kind = "weights"
    streamed = True
    content = "none payload"

    def check(
        self, items: Sequence[tensors_pb2.TensorSpec], model: Sequence[TensorSpec]
    ) -> tuple[TensorSpec, ...]:
        return payload_spec_of(items, model, Compression())

    def encode(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The weights as they are: nothing is flattened or copied."""
        return weights

    def decode(self, payload: Mapping[str, torch.Tensor], model: Sequence[TensorSpec]) -> Parts:
        at = 0
        for s in float_specs(model):
            yield at, payload[s.name].reshape(-1).to(torch.float32)
            at += s.numel


class CkksCodec(Codec):
    """`n_i * w_i` as CKKS ciphertexts of this federation's key (`--secure he`); `keys`:
    the secret context (a participant's) or the public one (the aggregator's)."""

    name = "he"
    payload = Payload.WEIGHTED
    kind = HE_KIND
    streamed = False  # ciphertexts, parsed whole
    content = "encrypted upload"

    def __init__(self, keys: HeKeys | None = None) -> None:
        self.keys = keys

    @property
    def setting(self) -> str:
        return "--secure he"

    def _keys(self) -> HeKeys:
        if self.keys is None:
            raise ConfigError("--secure he needs the federation's CKKS context")
        return self.keys

    def check(
        self, items: Sequence[tensors_pb2.TensorSpec], model: Sequence[TensorSpec]
    ) -> tuple[TensorSpec, ...]:
        return upload_spec(items, model)

    def encode(self, flat: torch.Tensor, samples: int) -> OrderedDict[str, torch.Tensor]:
        """`samples * flat`, encrypted (ValueError for non-finite values or past CKKS's
        range: nothing is sent)."""
        keys = self._keys()
        return self.pack(keys.encrypt(flat, samples))

    def pack(self, ciphertexts: Sequence[bytes]) -> OrderedDict[str, torch.Tensor]:
        """Ciphertexts as the upload's tensors, tagged with this federation's key."""
        return upload_tensors(self._keys(), ciphertexts)

    def ciphertexts(
        self, payload: Mapping[str, torch.Tensor], model: Sequence[TensorSpec]
    ) -> list[bytes]:
        """An upload's ciphertexts, checked: this federation's key (FAILED_PRECONDITION),
        every ciphertext parsed against the context, of its size, scale and level (a
        PayloadError of the learning core)."""
        keys = self._keys()
        check_key(as_bytes(payload[KEY]), keys)
        out = ciphertexts_of(payload)
        keys.check(out, sum(s.numel for s in float_specs(model)))
        return out

    def decode(self, payload: Mapping[str, torch.Tensor], model: Sequence[TensorSpec]) -> Parts:
        """The secret key's holder only: n_i * w_i, decrypted (float32)."""
        floats = sum(s.numel for s in float_specs(model))
        flat = self._keys().decrypt(self.ciphertexts(payload, model), floats)
        return iter([(0, flat.to(torch.float32))])


# ---- the registry ----------------------------------------------------------------------
REGISTRY: dict[str, Callable[[float, HeKeys | None], Codec]] = {
    "none": lambda share, keys: RawCodec(),
    "fp16": lambda share, keys: Fp16Codec(),
    "int8": lambda share, keys: Int8Codec(),
    "topk": lambda share, keys: TopKCodec(share),
    "he": lambda share, keys: CkksCodec(keys),
}


def codec_named(name: str, keys: HeKeys | None = None) -> Codec:
    """The codec of a scheme's name: `none`, `fp16`, `int8`, `topk:F` (a ConfigError
    otherwise, as --compression) or `he` (with the federation's CKKS context)."""
    if name == "he":
        return REGISTRY["he"](1.0, keys)
    return codec_of(Compression.parse(name))


def codec_of(scheme: Compression) -> Codec:
    """The codec of a compression scheme (the learning core's `Compression`)."""
    return REGISTRY[scheme.scheme](scheme.share, None)


def federation_codec(compression: str, secure: str, keys: HeKeys | None = None) -> Codec:
    """The codec a federation's settings choose: --secure he, else --compression."""
    return codec_named("he", keys) if secure == "he" else codec_named(compression)


def codec_of_kind(kind: str, encrypted: CkksCodec | None = None) -> Codec:
    """The codec an upload's header kind names: `weights`, `delta:SCHEME`, or (given an
    `encrypted` codec to answer with) `he:ckks`; INVALID_ARGUMENT otherwise."""
    if encrypted is not None and kind == encrypted.kind:
        return encrypted
    return codec_of(upload_scheme(kind))


# ---- the header checks of the delta schemes --------------------------------------------
def upload_scheme(kind: str) -> Compression:
    """The compression of an upload from its header's kind: `weights` (none) or
    `delta:SCHEME`; INVALID_ARGUMENT otherwise."""
    if kind == "weights":
        return Compression()
    if kind.startswith("delta:"):
        try:
            scheme = Compression.parse(kind[len("delta:") :])
        except ConfigError:
            scheme = Compression()
        if scheme.scheme != "none":
            return scheme
    raise invalid(f"unknown update kind {kind[:32]!r} (weights, or delta:fp16|int8|topk:F)")


def payload_spec_of(
    items: Sequence[tensors_pb2.TensorSpec], spec: Sequence[TensorSpec], scheme: Compression
) -> tuple[TensorSpec, ...]:
    """The tensors an upload's header lists, checked against what `scheme` sends for a
    model of `spec` (top-k: the count it declares, within its share); INVALID_ARGUMENT
    otherwise. Counted first: a header of 300,000 specs costs one comparison."""
    count = 0
    if scheme.scheme == "topk":
        floats = sum(float_sizes(spec))
        if len(items) != 2 or len(items[0].shape) != 1:
            raise invalid(f"a top-k upload lists {INDICES} and {VALUES}, each of one dimension")
        count = int(items[0].shape[0])
        if not 1 <= count <= scheme.max_count(floats):
            raise invalid(
                f"a {scheme} upload carries 1 to {scheme.max_count(floats)} values, not {count}"
            )
    expected = scheme.payload_spec(spec, count)
    if len(items) != len(expected):
        raise invalid(f"the header lists {len(items)} tensors, a {scheme} upload {len(expected)}")
    check_header_spec(spec_from_pb(items), expected)
    return expected


# What `decode` (and `CkksCodec.ciphertexts`) raise for content out of range: INVALID_ARGUMENT.
CONTENT_ERRORS = (quantise.PayloadError, ckks.PayloadError)
