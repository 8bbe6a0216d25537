"""Listening ports: plain, server TLS and mutual TLS, and how a service authenticates.

A taken port is one clear ConfigError (checked before gRPC logs its own complaint); a TLS
port follows its certificate's renewals on disk without a restart; `credentials` decides
from a service's transport settings how it authenticates its callers (mutual TLS, tokens,
or a development setup said once the port is bound).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any, Protocol

import grpc

from services.core.errors import ConfigError
from services.transport.auth import Authenticator
from services.transport.credentials import TlsFiles, TokenTable, load_tls

logger = logging.getLogger(__name__)


class Binds(Protocol):
    """A server ports are bound on: grpc.Server or AioServer."""

    def add_insecure_port(self, address: str) -> int:
        """Bind a plain-text port."""

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials) -> int:
        """Bind a TLS port."""


class TransportConfig(Protocol):
    """What `credentials` reads of a service's transport settings (the TransportSettings of
    services.common.settings, which sits above this package)."""

    @property
    def tls_dir(self) -> str | None:
        """Directory of the mutual-TLS material (None: no TLS)."""

    def token(self) -> str | None:
        """The shared development token, if any."""


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError if host:port is taken (checked before gRPC logs its own complaint)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's own listeners do
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: port in use ({exc.strerror})"
            ) from exc


def bind(server: Binds, host: str, port: int) -> int:
    """Bind host:port (0 picks a free port); a taken port is one clear ConfigError."""
    check_port_free(host, port)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: port in use or not allowed") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}: port in use or not allowed")
    return bound


def _add_secure_port(server: Binds, host: str, port: int, creds: grpc.ServerCredentials) -> int:
    """Bind a TLS port; a taken port is one ConfigError."""
    check_port_free(host, port)
    try:
        bound = server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use")
    return bound


def bind_tls(server: Binds, host: str, port: int, cert: str, key: str) -> int:
    """Bind a server-TLS port (edge participants with tokens) from PEM files, following
    renewals like the mutual-TLS port; errors are one ConfigError."""
    try:
        tls = TlsFiles.read(None, Path(cert), Path(key))
    except OSError as exc:
        raise ConfigError(f"cannot read TLS certificate or key: {exc}") from exc
    renewing = _Renewing(tls)
    creds = grpc.dynamic_ssl_server_credentials(renewing.config(tls), renewing.fetch)
    return _add_secure_port(server, host, port, creds)


def credentials(
    transport: TransportConfig, name: str, tokens: TokenTable | None = None
) -> tuple[Authenticator, TlsFiles | None]:
    """How a service named `name` authenticates its callers, and its mutual-TLS material
    (None: it listens without TLS, behind tokens or nothing)."""
    tls = load_tls(transport.tls_dir, name) if transport.tls_dir else None
    shared = transport.token()
    if tls is not None and shared is not None:
        raise ConfigError(
            "--tls-dir and a shared --auth-token exclude each other: the shared token would "
            "give anyone holding it every identity (it is for development only)"
        )
    open_ = tls is None and shared is None and tokens is None
    auth = Authenticator(shared, tokens, open_)
    if shared is not None:
        auth.warning = (
            f"{name}: a shared --auth-token gives every holder every role: development only "
            "(deployments use --tls-dir)"
        )
    if open_:
        auth.warning = (
            f"{name}: no credentials configured: any caller may call it (development only)"
        )
    return auth, tls


def bind_service(
    server: Binds, host: str, port: int, tls: TlsFiles | None, auth: Authenticator
) -> int:
    """Bind the service's main port: mutual TLS with tls, plain otherwise. A development
    setup (shared token, no credentials) is said once the port is bound."""
    bound = bind(server, host, port) if tls is None else bind_mtls(server, host, port, tls)
    if auth.warning:
        logger.warning("%s", auth.warning)
    return bound


RELOAD_EVERY_S = 60.0


class _Renewing:
    """The certificate a mutual-TLS port serves, re-read when its files change."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.checked = time.monotonic()

    @staticmethod
    def config(t: TlsFiles) -> Any:
        """gRPC's configuration of t: clients verified against t's CA when it has one."""
        return grpc.ssl_server_certificate_configuration(
            [(t.key, t.cert)], root_certificates=t.ca or None
        )

    def fetch(self) -> Any:
        """Called by gRPC before a handshake: a new configuration, or None to keep it."""
        if time.monotonic() - self.checked < RELOAD_EVERY_S:
            return None
        self.checked = time.monotonic()
        fresh = self.tls.renewed()
        if fresh is None:
            return None
        logger.info("TLS certificate renewed on disk: serving the new one")
        self.tls = fresh
        return self.config(fresh)


def bind_mtls(server: Binds, host: str, port: int, tls: TlsFiles) -> int:
    """Bind a mutual-TLS port whose certificate follows its files: a new handshake checks
    them at most once a minute, so a renewed certificate (cert-manager renews in place)
    is served without a restart."""
    renewing = _Renewing(tls)
    creds = grpc.dynamic_ssl_server_credentials(
        renewing.config(tls), renewing.fetch, require_client_authentication=True
    )
    return _add_secure_port(server, host, port, creds)
