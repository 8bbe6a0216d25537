"""The clusterer's TLS port for participants outside the cluster (edge devices)."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from services.clusterer.server import build_service
from services.clusterer.settings import ClustererConfig
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.core.errors import ConfigError
from services.transport.client import call_metadata, channel


@pytest.fixture
def certificate(tmp_path):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make a test certificate"
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=clusterer.example",
            "-addext",
            "subjectAltName=DNS:clusterer.example,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_participants_join_over_tls(certificate):
    cert, key = certificate
    config = ClustererConfig().replace(
        host="127.0.0.1",
        port=0,
        aggregator="127.0.0.1:1",
        tls_port=0,
        tls_cert=str(cert),
        tls_key=str(key),
        auth_token="t",
        metrics_port=None,
    )
    service = build_service(config)
    service.server.start()
    try:
        assert service.tls_port
        address = f"127.0.0.1:{service.tls_port}"
        stub = pb_grpc.ClustererStub(channel(address, str(cert)))
        reply = stub.Join(
            pb.JoinRequest(participant_id="edge-1", num_train=5, num_test=5),
            metadata=call_metadata("t"),
            timeout=10,
        )
        assert reply.participants == 1
        # The certificate's name, not the address, when they differ.
        named = pb_grpc.ClustererStub(channel(address, str(cert), "clusterer.example"))
        named.Join(pb.JoinRequest(participant_id="edge-2"), metadata=call_metadata("t"), timeout=10)
        # Plaintext to the TLS port does not get through.
        plain = pb_grpc.ClustererStub(channel(address))
        with pytest.raises(grpc.RpcError) as err:
            plain.Join(
                pb.JoinRequest(participant_id="edge-3"), metadata=call_metadata("t"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.server.stop(0).wait()


def test_tls_needs_cert_and_key():
    with pytest.raises(ConfigError, match="--tls-cert"):
        ClustererConfig().replace(tls_port=50443)
