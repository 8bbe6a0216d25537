"""Identities: a small certificate authority, per-party certificates, hashed tokens.

Every party has its own identity. A certificate names it twice: its common name is the
party's name (a participant's id) and one SPIFFE-style URI SAN,
`spiffe://flclustering/<role>/<name>`, says which role it plays (participant, clusterer,
aggregator, operator). Servers read the role and name from the peer's verified certificate,
so a participant cannot act for another or for a service.

Keys are ECDSA P-256 (fast to make: a federation of thousands gets its kit in seconds) and
written with mode 0600. Built on `cryptography` (the library pyca maintains and grpc's own
examples use), not on an `openssl` binary, so it runs wherever Python does.

Edge devices where certificates are impractical get per-participant tokens
(`<id>.<secret>`); the clusterer keeps only their SHA-256 and compares in constant time.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ConfigError

ROLES = ("participant", "clusterer", "aggregator", "operator")
TRUST_DOMAIN = "flclustering"
SERVER_ROLES = ("clusterer", "aggregator")
LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
MAX_NAME = 64


@dataclass(frozen=True)
class Identity:
    """Who a caller is: its role and its name (a participant's id).

    `role == "dev"` is the shared development token: it may call everything and is never
    used outside a developer's machine.
    """

    role: str
    name: str

    @property
    def is_dev(self) -> bool:
        """The shared development token (no per-party identity)."""
        return self.role == "dev"


def spiffe_id(role: str, name: str) -> str:
    """The URI a certificate of role/name carries."""
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


def parse_spiffe_id(uri: str) -> Identity | None:
    """role and name from a URI of this trust domain, or None."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 2 or parts[0] not in ROLES or not valid_name(parts[1]):
        return None
    return Identity(parts[0], parts[1])


def valid_name(name: str) -> bool:
    """A party name: 1-64 characters of [A-Za-z0-9._-] (it becomes a file name and a label)."""
    return (
        0 < len(name) <= MAX_NAME
        and name.isascii()
        and all(c.isalnum() or c in "._-" for c in name)
        and name not in (".", "..")
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key() -> object:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Authority:
    """A CA's certificate and key (PEM)."""

    cert: bytes
    key: bytes

    @classmethod
    def create(cls, name: str = "FLClustering CA", days: int = 3650) -> Authority:
        """A new self-signed CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())  # type: ignore[arg-type]
        )
        return cls(_pem_cert(cert), _pem_key(key))

    @classmethod
    def load(cls, directory: Path) -> Authority:
        """The CA kept in directory (ca.crt, ca.key)."""
        try:
            return cls((directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the CA in {directory}: {exc.strerror}") from None

    def issue(
        self,
        role: str,
        name: str,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        days: int = 825,
    ) -> tuple[bytes, bytes]:
        """(certificate, key) PEM for role/name. Services get server and client usage (the
        clusterer is the aggregator's client); participants and operators client only."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        if not valid_name(name):
            raise ConfigError(f"name {name[:64]!r} must be 1-{MAX_NAME} characters of A-Za-z0-9._-")
        ca_cert = x509.load_pem_x509_certificate(self.cert)
        ca_key = serialization.load_pem_private_key(self.key, password=None)
        key = _key()
        now = _now()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(role, name))]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in SERVER_ROLES:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        return _pem_cert(cert), _pem_key(key)


def write_file(path: Path, data: bytes, secret: bool) -> None:
    """Write a file (0600 for keys and tokens) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def participant_id(index: int) -> str:
    """The id of participant `index` (what its certificate names)."""
    return f"participant-{index:05d}"


def write_kit(
    directory: Path,
    participants: Iterable[str],
    service_names: Mapping[str, Iterable[str]] | None = None,
    operators: Iterable[str] = ("operator",),
    authority: Authority | None = None,
) -> Authority:
    """A startup kit in directory: ca.crt (+ ca.key), NAME.crt/NAME.key for the aggregator,
    the clusterer, each operator and each participant. Servers' certificates name
    localhost, 127.0.0.1 and ::1 plus the DNS names given per service."""
    ca = authority or Authority.create()
    names = dict(service_names or {})
    jobs: list[tuple[str, str, list[str], tuple[str, ...]]] = [
        (role, role, [*LOCAL_NAMES, role, *names.get(role, ())], LOCAL_IPS) for role in SERVER_ROLES
    ]
    jobs += [("operator", o, [], ()) for o in operators]
    jobs += [("participant", p, [], ()) for p in participants]
    seen: set[str] = set()
    for _, name, _, _ in jobs:
        if name in seen or name in ("ca", "tls"):
            raise ConfigError(f"the name {name!r} is taken twice (its files would clash)")
        seen.add(name)
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / "ca.crt", ca.cert, secret=False)
    write_file(directory / "ca.key", ca.key, secret=True)
    for role, name, dns, ips in jobs:
        cert, key = ca.issue(role, name, dict.fromkeys(dns), ips)
        write_file(directory / f"{name}.crt", cert, secret=False)
        write_file(directory / f"{name}.key", key, secret=True)
    return ca


def hand_out(kit: Path, holders: Mapping[str, Iterable[str]]) -> dict[str, Path]:
    """Give each holder (a process) a directory of its own under kit with ca.crt and only
    the certificates and keys of the parties it hosts; then remove the kit's own keys and
    the CA key (nothing more is issued). No process can read another party's key."""
    out = {}
    for holder, names in holders.items():
        d = kit / holder
        d.mkdir(mode=0o700)
        (d / "ca.crt").write_bytes((kit / "ca.crt").read_bytes())
        for name in names:
            (d / f"{name}.crt").write_bytes((kit / f"{name}.crt").read_bytes())
            write_file(d / f"{name}.key", (kit / f"{name}.key").read_bytes(), secret=True)
        out[holder] = d
    for leftover in kit.glob("*.key"):
        leftover.unlink()
    for leftover in kit.glob("*.crt"):
        if leftover.name != "ca.crt":
            leftover.unlink()
    return out


@dataclass(frozen=True)
class TlsFiles:
    """The PEM material one party presents: CA to trust (empty: none), own certificate and
    key, and the files they came from, so a server can pick up renewed ones."""

    ca: bytes
    cert: bytes
    key: bytes
    paths: tuple[Path | None, Path, Path] | None = None

    @classmethod
    def read(cls, ca: Path | None, cert: Path, key: Path) -> TlsFiles:
        """The files' contents (OSError when one cannot be read)."""
        return cls(
            ca.read_bytes() if ca else b"", cert.read_bytes(), key.read_bytes(), (ca, cert, key)
        )

    def renewed(self) -> TlsFiles | None:
        """The files again if any changed since these were read (cert-manager renews them
        in place), else None; a half-written renewal is ignored until it is whole."""
        if self.paths is None:
            return None
        try:
            again = TlsFiles.read(*self.paths)
        except OSError:
            return None
        if (again.ca, again.cert, again.key) == (self.ca, self.cert, self.key):
            return None
        return again if _matching_pair(again.cert, again.key) else None


def _matching_pair(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether cert_pem is a certificate for the private key key_pem (both whole)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt))


def load_tls(directory: str | Path, name: str, fallback: bool = True) -> TlsFiles:
    """ca.crt and NAME.crt/NAME.key from directory; with fallback, tls.crt/tls.key (the
    layout cert-manager's CSI driver mounts) when NAME's files are not there."""
    d = Path(directory)
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    if fallback and not cert.exists() and (d / "tls.crt").exists():
        cert, key = d / "tls.crt", d / "tls.key"
    try:
        return TlsFiles.read(d / "ca.crt", cert, key)
    except OSError as exc:
        raise ConfigError(
            f"--tls-dir {d}: cannot read {Path(exc.filename or '').name} ({exc.strerror}); "
            "make the files with `flclustering certs`"
        ) from None


def certificate_identity(pem: bytes) -> Identity | None:
    """The identity a PEM certificate names (its SPIFFE URI), or None."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    found = [i for i in map(parse_spiffe_id, uris) if i is not None]
    return found[0] if len(found) == 1 else None


# ---- per-participant tokens (edge devices) ---------------------------------------------


def token_digest(secret: str) -> str:
    """What the clusterer stores of a token's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_owner(token: str) -> str | None:
    """The participant a per-participant token (`<id>.<secret>`, as `new_token` makes it)
    names, or None for anything else (a shared development token)."""
    name, dot, secret = token.rpartition(".")
    if not dot or len(secret) < 32 or not valid_name(name):
        return None
    return name


def new_token(name: str) -> str:
    """A fresh `<name>.<secret>` token (256 random bits)."""
    return f"{name}.{secrets.token_urlsafe(32)}"


class TokenTable:
    """Per-participant tokens known only by their SHA-256, compared in constant time."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._digests = {k: bytes.fromhex(v) for k, v in digests.items()}

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """A JSON object {participant id: sha256 hex of its secret}."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"--participant-tokens {path}: {exc.strerror}") from None
        except ValueError:
            raise ConfigError(f"--participant-tokens {path}: not a JSON object") from None
        ok = isinstance(data, dict) and all(
            isinstance(k, str) and valid_name(k) and isinstance(v, str) and len(v) == 64
            for k, v in data.items()
        )
        if not ok:
            raise ConfigError(
                f"--participant-tokens {path}: expected {{participant id: sha256 hex}}"
            )
        try:
            return cls(data)
        except ValueError:
            raise ConfigError(f"--participant-tokens {path}: a digest is not hex") from None

    def identity(self, token: bytes) -> Identity | None:
        """The participant a token belongs to, or None."""
        name, _, secret = token.rpartition(b".")
        try:
            pid = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        want = self._digests.get(pid)
        # Hash either way: an unknown id costs the same as a wrong secret.
        got = hashlib.sha256(secret).digest()
        if want is None or not secret or not hmac.compare_digest(got, want):
            return None
        return Identity("participant", pid)


def write_tokens(directory: Path, participants: Iterable[str]) -> Path:
    """One token file per participant (NAME.token) and the digests for the clusterer
    (tokens.sha256.json); returns the digests' path."""
    ids = list(participants)
    for p in ids:
        if not valid_name(p):
            raise ConfigError(f"name {p[:64]!r} must be 1-{MAX_NAME} characters of A-Za-z0-9._-")
    if len(set(ids)) != len(ids):
        raise ConfigError("a participant is named twice")
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for p in ids:
        token = new_token(p)
        digests[p] = token_digest(token.rpartition(".")[2])
        write_file(directory / f"{p}.token", token.encode() + b"\n", secret=True)
    out = directory / "tokens.sha256.json"
    write_file(out, json.dumps(digests, indent=1).encode(), secret=False)
    return out
