"""Homomorphically encrypted aggregation (`--secure he`): CKKS through TenSEAL.

Participants hold the secret key; the aggregator holds the public context only, so it can
add ciphertexts but read neither an update nor the model it makes. A participant uploads
its weights multiplied by its sample count, `n_i * w_i`, as CKKS ciphertexts of 2,048
values each; the aggregator adds a round's ciphertexts and the sample counts, and keeps
the sum and `N = sum n_i` as the next global model; participants decrypt it and divide by
`N`: FedAvg, computed on ciphertexts. No multiplication happens under encryption, so the
parameters are the smallest 128-bit-secure CKKS set that holds the sums: ring degree 4096,
one 60-bit data prime plus the 49-bit special prime (109 bits, the standard's bound for
4096), scale 2^30 (30 bits of integer range above the fraction: sums up to 5e8).

Why TenSEAL: it wraps Microsoft SEAL (a well-kept CKKS implementation) with wheels for this
Python, and its serialisation is SEAL's own format with a protobuf wrapper: a hostile byte
string is parsed and checked against the context, never unpickled.

On the wire an encrypted upload or model is ordinary named tensors (the stream format, its
limits and checksum stay one): `he:key` (uint8[32], the SHA-256 of the public key, so an
update encrypted under another key is refused by name instead of silently corrupting the
sum), `he:0` .. `he:{m-1}` (uint8, one serialised ciphertext each), and in a model also
`he:examples` (int64[1], `N`) and the model's non-float tensors in the clear.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.wire import spec_from_pb
from services.core.errors import ConfigError, WireError, invalid
from services.core.tensors import TensorSpec, float_specs, unflatten

KIND = "he:ckks"  # the header kind of an encrypted upload or model
KEY = "he:key"
EXAMPLES = "he:examples"
PREFIX = "he:"
SECRET_FILE = "he-secret.ctx"  # participants (and an operator who exports the model)
PUBLIC_FILE = "he-public.ctx"  # the aggregator
POLY_DEGREE = 4096
COEFF_BITS = (60, 49)
SCALE = 2.0**30
SLOTS = POLY_DEGREE // 2
# A fresh ciphertext at the one data level: two polynomials of 4096 64-bit coefficients
# (65,575 bytes serialised); room for SEAL's and TenSEAL's headers.
MAX_CIPHERTEXT_BYTES = 2 * POLY_DEGREE * 8 + 4096
MAX_KEY_FILE_BYTES = 16 << 20


class PayloadError(ValueError):
    """An encrypted payload that is not what this federation's context makes."""


def chunk_name(i: int) -> str:
    """The tensor name of ciphertext `i`."""
    return f"{PREFIX}{i}"


def chunks(floats: int) -> int:
    """Ciphertexts for a model of `floats` float values."""
    return max(1, math.ceil(floats / SLOTS))


def slot_counts(floats: int) -> list[int]:
    """Values each ciphertext of a model of `floats` values holds (the last one fewer)."""
    m = chunks(floats)
    return [min(SLOTS, floats - i * SLOTS) for i in range(m)] if floats else [0]


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:  # an install without the dependency: one clear line
        raise ConfigError("--secure he needs the tenseal package (pip install tenseal)") from None
    return tenseal


class HeKeys:
    """One CKKS context (secret, or public only) and what it does; calls are serialised
    (one lock): SEAL objects are shared by the threads of a service or a participant
    process."""

    def __init__(self, context: Any, source: str = "") -> None:
        self.context = context
        self.source = source
        self.private = bool(context.is_private())
        self._lock = threading.Lock()
        self.fingerprint = hashlib.sha256(self.public_bytes()).digest()
        self._check_parameters()

    # ---- keys ------------------------------------------------------------------------
    @classmethod
    def create(cls) -> HeKeys:
        """A new secret key and its public context."""
        ts = _tenseal()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_BITS),
        )
        context.global_scale = SCALE
        return cls(context, "new")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "") -> HeKeys:
        """A context serialised by `secret_bytes` or `public_bytes` (TenSEAL's protobuf
        and SEAL's format: parsed and checked, nothing unpickled); ConfigError otherwise."""
        ts = _tenseal()
        try:
            context = ts.context_from(data)
        except Exception:  # TenSEAL raises ValueError or RuntimeError on foreign bytes
            raise ConfigError(f"{source or 'the HE key'} is not a CKKS context") from None
        context.global_scale = SCALE
        return cls(context, source)

    @classmethod
    def load(cls, path: str | Path, secret: bool) -> HeKeys:
        """The context in `path`; `secret`: a participant's (it must hold the secret key),
        else the aggregator's (it must not). One ConfigError line otherwise."""
        p = Path(path)
        try:
            if p.stat().st_size > MAX_KEY_FILE_BYTES:
                raise ConfigError(f"--he-key {p}: larger than a CKKS context")
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--he-key {p}: {exc.strerror or exc}") from None
        keys = cls.from_bytes(data, f"--he-key {p}")
        if secret and not keys.private:
            raise ConfigError(
                f"--he-key {p} holds no secret key: participants decrypt the global model "
                f"and need {SECRET_FILE}"
            )
        if not secret and keys.private:
            raise ConfigError(
                f"--he-key {p} holds the secret key: the aggregator must not be able to "
                f"decrypt; give it {PUBLIC_FILE}"
            )
        return keys

    def _check_parameters(self) -> None:
        """The parameters this module assumes (ring degree, one data prime, the scale)."""
        with self._lock:
            probe = _tenseal().ckks_vector(self.context, [0.0]).data.ciphertext()[0]
            ok = probe.poly_modulus_degree() == POLY_DEGREE and probe.coeff_modulus_size() == 1
        if not ok:
            raise ConfigError(
                f"{self.source or 'the HE key'}: CKKS parameters other than this version's "
                f"(degree {POLY_DEGREE}, primes {COEFF_BITS}): make keys with flclustering he-keys"
            )

    def public_bytes(self) -> bytes:
        """The public context: the public key, no secret key, no evaluation keys."""
        return self._serialized(secret=False)

    def secret_bytes(self) -> bytes:
        """The context with the secret key (participants' file)."""
        if not self.private:
            raise ConfigError("this context holds no secret key")
        return self._serialized(secret=True)

    def _serialized(self, secret: bool) -> bytes:
        # No relinearisation or Galois keys: nothing here multiplies or rotates.
        return bytes(
            self.context.serialize(
                save_public_key=True,
                save_secret_key=secret,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    def short(self) -> str:
        """The key's fingerprint as people compare it."""
        return self.fingerprint.hex()[:16]

    # ---- ciphertexts -----------------------------------------------------------------
    def encrypt(self, flat: torch.Tensor, weight: float = 1.0) -> list[bytes]:
        """`weight * flat` as serialised ciphertexts of SLOTS values each."""
        values = flat.detach().to("cpu", torch.float64).reshape(-1).numpy() * float(weight)
        if not np.isfinite(values).all():
            raise ValueError("non-finite weights are not encrypted")
        top = float(np.abs(values).max()) if values.size else 0.0
        if top >= 2.0**28:  # a quarter of the range a sum has: never encrypt what wraps
            raise ValueError(f"a weighted value of {top:.3g} is past CKKS's range here")
        ts = _tenseal()
        out = []
        with self._lock:
            for at in range(0, max(1, values.size), SLOTS):
                part = values[at : at + SLOTS].tolist()
                out.append(bytes(ts.ckks_vector(self.context, part).serialize()))
        return out

    def _vector(self, data: bytes, size: int, what: str) -> Any:
        """A ciphertext parsed and checked against this context (call with the lock held)."""
        ts = _tenseal()
        try:
            vector = ts.ckks_vector_from(self.context, data)
            parts = vector.data.ciphertext()
        except Exception:  # SEAL refuses what is not a ciphertext of these parameters
            raise PayloadError(f"{what} is not a CKKS ciphertext of this federation") from None
        if vector.size() != size:
            raise PayloadError(f"{what} holds {vector.size()} values, not {size}")
        if len(parts) != 1:
            raise PayloadError(f"{what} must be one ciphertext")
        ct = parts[0]
        if ct.size() != 2 or ct.scale != SCALE or ct.coeff_modulus_size() != 1:
            raise PayloadError(f"{what} is not a fresh ciphertext at this federation's scale")
        if ct.is_transparent():
            raise PayloadError(f"{what} is transparent (not encrypted)")
        return vector

    def check(self, ciphertexts: Sequence[bytes], floats: int) -> None:
        """Every ciphertext of an upload of a model of `floats` values parses, holds its
        share of values and sits at the scale and level fresh encryption gives; a
        PayloadError names the first that does not."""
        sizes = slot_counts(floats)
        if len(ciphertexts) != len(sizes):
            raise PayloadError(f"{len(ciphertexts)} ciphertexts, not {len(sizes)}")
        with self._lock:
            for i, (data, size) in enumerate(zip(ciphertexts, sizes, strict=True)):
                self._vector(data, size, chunk_name(i))

    def add(self, uploads: Sequence[Sequence[bytes]], floats: int) -> list[bytes]:
        """The ciphertexts of the sum of checked uploads (exact: CKKS addition is modular
        integer addition, so the order does not change a bit)."""
        ts = _tenseal()
        out = []
        with self._lock:
            for i, size in enumerate(slot_counts(floats)):
                total = self._vector(uploads[0][i], size, chunk_name(i))
                for upload in uploads[1:]:
                    total.add_(ts.ckks_vector_from(self.context, upload[i]))
                out.append(bytes(total.serialize()))
        return out

    def decrypt(self, ciphertexts: Sequence[bytes], floats: int) -> torch.Tensor:
        """The flat float64 values of ciphertexts (secret key needed)."""
        if not self.private:
            raise ConfigError("this context holds no secret key: it cannot decrypt")
        ts = _tenseal()
        parts = []
        with self._lock:
            for i, data in enumerate(ciphertexts):
                try:
                    vector = ts.ckks_vector_from(self.context, data)
                except Exception:
                    raise PayloadError(f"{chunk_name(i)} is not a CKKS ciphertext") from None
                parts.append(np.asarray(vector.decrypt(), dtype=np.float64))
        flat = np.concatenate(parts) if parts else np.zeros(0)
        if flat.size != floats:
            raise PayloadError(f"the ciphertexts hold {flat.size} values, the model {floats}")
        return torch.from_numpy(flat)


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
