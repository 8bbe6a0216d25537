"""Homomorphically encrypted aggregation (`--secure he`): CKKS through TenSEAL.

Participants hold the secret key; the aggregator holds the public context only, so it can
add ciphertexts but read neither an update nor the model it makes. A participant uploads
its weights multiplied by its sample count, `n_i * w_i`, as CKKS ciphertexts of 2,048
values each; the aggregator adds a round's ciphertexts and the sample counts, and keeps
the sum and `N = sum n_i` as the next global model; participants decrypt it and divide by
`N`: FedAvg, computed on ciphertexts. The CKKS arithmetic (parameters, keys, encrypt,
add, decrypt, the checks of a ciphertext) is the learning core's, services/core/ckks.py;
this module is how it travels, and its codec is `CkksCodec` (services/common/codecs.py).

On the wire an encrypted upload or model is ordinary named tensors (the stream format, its
limits and checksum stay one): `he:key` (uint8[32], the SHA-256 of the public key, so an
update encrypted under another key is refused by name instead of silently corrupting the
sum), `he:0` .. `he:{m-1}` (uint8, one serialised ciphertext each), and in a model also
`he:examples` (int64[1], `N`) and the model's non-float tensors in the clear.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.wire import WireError, invalid, spec_from_pb
from services.core.ckks import (
    MAX_CIPHERTEXT_BYTES,
    PUBLIC_FILE,
    SECRET_FILE,
    HeKeys,
    PayloadError,
    chunk_name,
    chunks,
)
from services.core.errors import ConfigError
from services.core.tensors import TensorSpec, float_specs, unflatten

KIND = "he:ckks"  # the header kind of an encrypted upload or model
KEY = "he:key"
EXAMPLES = "he:examples"


def write_keys(directory: Path) -> tuple[Path, Path, HeKeys]:
    """A new key pair in `directory`: the secret context (0600) and the public one."""
    from services.transport.credentials import write_file

    keys = HeKeys.create()
    directory.mkdir(parents=True, exist_ok=True)
    secret, public = directory / SECRET_FILE, directory / PUBLIC_FILE
    write_file(secret, keys.secret_bytes(), secret=True)
    write_file(public, keys.public_bytes(), secret=False)
    return secret, public, keys


def key_tensor(keys: HeKeys) -> torch.Tensor:
    """`he:key`: the public key's fingerprint as uint8[32]."""
    return torch.frombuffer(bytearray(keys.fingerprint), dtype=torch.uint8)


def as_bytes(t: torch.Tensor) -> bytes:
    """A uint8 tensor's bytes."""
    return t.detach().cpu().contiguous().reshape(-1).numpy().tobytes()


def upload_tensors(keys: HeKeys, ciphertexts: Sequence[bytes]) -> OrderedDict[str, torch.Tensor]:
    """An encrypted upload as named tensors."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict({KEY: key_tensor(keys)})
    for i, data in enumerate(ciphertexts):
        out[chunk_name(i)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def model_tensors(
    keys: HeKeys, ciphertexts: Sequence[bytes], examples: int, others: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """An encrypted global model as named tensors: key, N, the non-float tensors, the sum."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict({KEY: key_tensor(keys)})
    out[EXAMPLES] = torch.tensor([examples], dtype=torch.int64)
    out.update(others)
    for i, data in enumerate(ciphertexts):
        out[chunk_name(i)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def ciphertexts_of(tensors: Mapping[str, torch.Tensor]) -> list[bytes]:
    """The ciphertexts among named tensors, in order."""
    out = []
    i = 0
    while chunk_name(i) in tensors:
        out.append(as_bytes(tensors[chunk_name(i)]))
        i += 1
    return out


def check_key(got: bytes, keys: HeKeys) -> None:
    """An upload encrypted under this federation's key; FAILED_PRECONDITION otherwise (a
    participant given another key pair: its sum would be noise)."""
    if got != keys.fingerprint:
        raise WireError(
            "FAILED_PRECONDITION",
            f"the update is encrypted under another key ({got.hex()[:16]}, this federation's "
            f"is {keys.short()}): every participant needs the {SECRET_FILE} of one "
            "flclustering he-keys",
        )


def upload_spec(
    items: Sequence[tensors_pb2.TensorSpec], model: Sequence[TensorSpec]
) -> tuple[TensorSpec, ...]:
    """The tensors an encrypted upload's header lists, checked before any data: he:key,
    then one ciphertext per SLOTS float values of the model, each 1 to
    MAX_CIPHERTEXT_BYTES bytes; INVALID_ARGUMENT otherwise. Counted first."""
    m = chunks(sum(s.numel for s in float_specs(model)))
    if len(items) != m + 1:
        raise invalid(
            f"an encrypted upload lists {KEY} and {m} ciphertexts, not {len(items)} tensors"
        )
    got = spec_from_pb(items)
    if got[0] != TensorSpec(KEY, (32,), torch.uint8):
        raise invalid(f"an encrypted upload starts with {KEY} (uint8, 32 bytes)")
    for i, s in enumerate(got[1:]):
        if s.name != chunk_name(i) or s.dtype != torch.uint8 or len(s.shape) != 1:
            raise invalid(f"tensor {i + 1} of an encrypted upload is {chunk_name(i)} (uint8, 1-D)")
        if not 1 <= s.shape[0] <= MAX_CIPHERTEXT_BYTES:
            raise invalid(f"{s.name} is 1 to {MAX_CIPHERTEXT_BYTES} bytes, not {s.shape[0]}")
    return got


def open_model(
    tensors: Mapping[str, torch.Tensor], keys: HeKeys, spec: Sequence[TensorSpec]
) -> OrderedDict[str, torch.Tensor]:
    """An encrypted global model (`model_tensors`), decrypted: sum / N as the model's
    named tensors (ConfigError for a model of another key, PayloadError for bad content)."""
    if KEY not in tensors or EXAMPLES not in tensors:
        raise PayloadError(f"an encrypted model carries {KEY} and {EXAMPLES}")
    if as_bytes(tensors[KEY]) != keys.fingerprint:
        raise ConfigError(
            f"the model is encrypted under another key than {keys.source or 'this one'} "
            f"({keys.short()})"
        )
    examples = int(tensors[EXAMPLES].reshape(-1)[0])
    if examples <= 0:
        raise PayloadError(f"{EXAMPLES} must be positive, not {examples}")
    floats = sum(s.numel for s in float_specs(spec))
    flat = keys.decrypt(ciphertexts_of(tensors), floats) / examples
    others = {s.name: tensors[s.name] for s in spec if not s.dtype.is_floating_point}
    return unflatten(flat.to(torch.float32), spec, others)


def load_keys(he_key: str | None, tls_dir: str | None, secret: bool) -> HeKeys:
    """A service's context for --secure he: --he-key, else its file in --tls-dir (where
    `flclustering he-keys` material is handed out with the certificates)."""
    name = SECRET_FILE if secret else PUBLIC_FILE
    path = he_key or (str(Path(tls_dir) / name) if tls_dir else None)
    if path is None:
        raise ConfigError(f"--secure he needs --he-key (the {name} of flclustering he-keys)")
    return HeKeys.load(path, secret)
