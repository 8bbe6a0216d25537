"""CKKS aggregation (--secure he): sums that decrypt to FedAvg, a public context that cannot
decrypt, and ciphertexts from anywhere else refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.aggregator.sealed import SealedState
from services.aggregator.state import RoundClose
from services.common.homomorphic import (
    KEY,
    as_bytes,
    load_keys,
    model_tensors,
    open_model,
    upload_spec,
    upload_tensors,
    write_keys,
)
from services.common.settings import DefenceSettings
from services.common.wire import WireError, spec_to_pb
from services.core.ckks import PUBLIC_FILE, SECRET_FILE, SLOTS, HeKeys, PayloadError
from services.core.errors import ConfigError, StateError
from services.core.strategies import get_strategy
from services.core.tensors import TensorSpec, flatten, spec_of

SPEC = (
    TensorSpec("w", (3000,), torch.float32),
    TensorSpec("steps", (), torch.int64),  # never averaged: served in the clear
    TensorSpec("b", (7,), torch.float32),
)
FLOATS = 3007


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[HeKeys, HeKeys, Path]:
    """A participant's (secret) and the aggregator's (public) contexts, read from the files
    `flclustering he-keys` writes."""
    d = tmp_path_factory.mktemp("he")
    write_keys(d)
    return HeKeys.load(d / SECRET_FILE, secret=True), HeKeys.load(d / PUBLIC_FILE, False), d


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3000, generator=g),
        "steps": torch.tensor(seed),
        "b": torch.randn(7, generator=g),
    }


def test_key_files_split_the_secret(pair: tuple[HeKeys, HeKeys, Path]) -> None:
    secret, public, d = pair
    assert secret.private and not public.private
    assert secret.fingerprint == public.fingerprint
    assert (d / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    # Each role refuses the other's file: the aggregator never loads the secret key.
    with pytest.raises(ConfigError, match="holds the secret key"):
        HeKeys.load(d / SECRET_FILE, secret=False)
    with pytest.raises(ConfigError, match="holds no secret key"):
        HeKeys.load(d / PUBLIC_FILE, secret=True)
    with pytest.raises(ConfigError, match="needs --he-key"):
        load_keys(None, None, secret=True)
    assert load_keys(None, str(d), secret=False).fingerprint == public.fingerprint


def test_unreadable_or_foreign_key_files_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ctx"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(ConfigError, match="is not a CKKS context"):
        HeKeys.load(junk, secret=False)
    with pytest.raises(ConfigError, match="No such file"):
        HeKeys.load(tmp_path / "missing.ctx", secret=True)


def test_sum_of_weighted_uploads_decrypts_to_fedavg(pair: tuple[HeKeys, HeKeys, Path]) -> None:
    secret, public, _ = pair
    samples = [40, 75, 12]
    models = [weights(s) for s in range(3)]
    uploads = [secret.encrypt(flatten(m, SPEC), n) for m, n in zip(models, samples, strict=True)]
    assert len(uploads[0]) == -(-FLOATS // SLOTS)
    for u in uploads:
        public.check(u, FLOATS)
    total = public.add(uploads, FLOATS)
    # The aggregator's context adds, and cannot read what it added.
    with pytest.raises(ConfigError, match="no secret key"):
        public.decrypt(total, FLOATS)
    served = model_tensors(public, total, sum(samples), {"steps": torch.tensor(0)})
    got = open_model(served, secret, SPEC)
    want = sum(n * flatten(m, SPEC).double() for m, n in zip(models, samples, strict=True))
    want = want / sum(samples)
    assert torch.allclose(flatten(got, SPEC).double(), want, atol=1e-5)
    assert int(got["steps"]) == 0  # the non-float tensors come in the clear
    assert spec_of(got) == SPEC


def test_tenseal_public_context_cannot_decrypt(pair: tuple[HeKeys, HeKeys, Path]) -> None:
    """Beyond this module's own guard: TenSEAL itself has no secret key to use."""
    import tenseal as ts

    secret, public, _ = pair
    data = secret.encrypt(torch.ones(10))[0]
    vector = ts.ckks_vector_from(public.context, data)
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()


def test_foreign_ciphertexts_are_refused(pair: tuple[HeKeys, HeKeys, Path]) -> None:
    secret, public, _ = pair
    good = secret.encrypt(flatten(weights(0), SPEC))
    other = HeKeys.create()  # same parameters, another key: indistinguishable, so the key tag
    assert other.fingerprint != public.fingerprint
    bad_cases = {
        "empty": [b"", *good[1:]],
        "random": [os.urandom(len(good[0])), *good[1:]],
        "truncated": [good[0][: len(good[0]) // 2], *good[1:]],
        "swapped sizes": [good[1], good[0]],
        "one short": good[:1],
    }
    for name, cts in bad_cases.items():
        with pytest.raises(PayloadError):
            public.check(cts, FLOATS)
        assert name
    # Another ring degree or scale (a context not made by he-keys).
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 49])
    ctx.global_scale = 2.0**20
    scaled = [bytes(ts.ckks_vector(ctx, [0.5] * SLOTS).serialize()), good[1]]
    with pytest.raises(PayloadError, match="scale"):
        public.check(scaled, FLOATS)
    with pytest.raises(ValueError, match="non-finite"):
        secret.encrypt(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="range"):
        secret.encrypt(torch.tensor([1.0]), 2.0**29)


def test_upload_header_is_checked_before_data(pair: tuple[HeKeys, HeKeys, Path]) -> None:
    secret, _, _ = pair
    tensors = upload_tensors(secret, secret.encrypt(flatten(weights(0), SPEC)))
    items = spec_to_pb(spec_of(tensors))
    assert [s.name for s in upload_spec(items, SPEC)] == list(tensors)
    for cut, message in (
        (items[:-1], "lists he:key and 2 ciphertexts"),
        (items[1:] + items[:1], "starts with he:key"),
        ([items[0], items[2], items[1]], "is he:0"),
    ):
        with pytest.raises(WireError, match=message) as err:
            upload_spec(cut, SPEC)
        assert err.value.code == "INVALID_ARGUMENT"
    big = spec_to_pb([*spec_of(tensors)[:-1], TensorSpec("he:1", (10**8,), torch.uint8)])
    with pytest.raises(WireError, match="bytes, not"):
        upload_spec(big, SPEC)


def _initial() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3000), "steps": torch.tensor(0), "b": torch.zeros(7)}


def test_sealed_state_round_survives_a_restart(
    pair: tuple[HeKeys, HeKeys, Path], tmp_path: Path
) -> None:
    """Accepted updates persist before they count, the encrypted version after Aggregate;
    a new process with the public key resumes both and serves what the first would."""
    from collections import OrderedDict

    secret, public, _ = pair
    state = SealedState(OrderedDict(_initial()), public)
    with pytest.raises(StateError, match="encrypted"):
        state.weights()
    assert state.served()[1] == "weights"  # w0 is public
    for i, n in enumerate((10, 30)):
        state.begin_update(f"p{i}", 0, 0)
        upload = upload_tensors(secret, secret.encrypt(flatten(weights(i), SPEC), n))
        update = state.sealed_update(f"p{i}", 0, n, dict(upload))
        state.persist(update, 0, tmp_path)
        state.end_update(update, 0)
    restarted = SealedState(OrderedDict(_initial()), public)
    assert restarted.restore(tmp_path) and sorted(restarted.pending) == ["p0", "p1"]
    fedavg = get_strategy("fedavg")
    report = restarted.aggregate(RoundClose(0, fedavg, {}, DefenceSettings(), 0.05))
    assert report.version == 1 and report.updates == 2
    restarted.save(tmp_path)
    again = SealedState(OrderedDict(_initial()), public)
    assert again.restore(tmp_path)
    assert again.aggregate(RoundClose(0, fedavg, {}, DefenceSettings(), 0.05)).replayed
    version, kind, served = again.served()
    assert (version, kind) == (1, "he:ckks")
    got = flatten(open_model(served, secret, SPEC), SPEC)
    want = (10 * flatten(weights(0), SPEC) + 30 * flatten(weights(1), SPEC)) / 40
    assert torch.allclose(got, want, atol=1e-5)
    # An upload under another key: refused by name (FAILED_PRECONDITION), nothing kept.
    other = HeKeys.create()
    foreign = upload_tensors(other, other.encrypt(flatten(weights(2), SPEC), 5))
    with pytest.raises(WireError, match="another key") as err:
        again.sealed_update("p2", 0, 5, dict(foreign))
    assert err.value.code == "FAILED_PRECONDITION"
    assert as_bytes(foreign[KEY]) == other.fingerprint
    assert not again.pending


def test_a_tasks_secure_value_is_checked_and_never_echoed_whole() -> None:
    """A participant's own --secure decides: a task asking for another mode (a downgrade,
    a mode it holds no key for, or junk of any length) is refused in one short line."""
    from services.participant.worker import check_secure

    check_secure("he", encrypts=True)
    check_secure("", encrypts=False)  # an older clusterer leaves the field empty: clear
    check_secure("none", encrypts=False)
    for asked, encrypts in (("", True), ("none", True), ("he", False), ("HE", True)):
        with pytest.raises(StateError, match="set up for --secure"):
            check_secure(asked, encrypts)
    with pytest.raises(StateError) as err:
        check_secure("x" * 100_000, encrypts=True)
    assert len(str(err.value)) < 200
