"""Each service's command line: bad flags, missing files and taken ports are one clear line."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "module,args,needle",
    [
        ("services.aggregator", ["--port", "abc"], "--port"),
        ("services.aggregator", ["--model", "vgg"], "--model"),
        ("services.aggregator", ["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        ("services.aggregator", ["--dataset", "folder"], "--input-shape"),
        ("services.clusterer", ["--rounds", "-"], "--rounds"),
        ("services.clusterer", ["--min-share", "2"], "--min-share"),
        ("services.clusterer", ["--tls-port", "50443"], "--tls-cert"),
        ("services.clusterer", ["--metrics-port", "70000"], "--metrics-port"),
        ("services.participant", ["--index", "40", "--participants", "30"], "--index"),
        ("services.participant", ["--device", "tpu"], "device"),
        (
            "services.participant",
            ["--dataset", "mnist", "--data-dir", "/nonexistent", "--download", "false"],
            "not found",
        ),
        ("services.participant", ["--tls-ca", "/nonexistent/ca.crt"], "CA file"),
        ("services.participant", ["--attack-jitter", "nan"], "--attack-jitter"),
        ("services.participant", ["--attack-boost", "-1"], "--attack-boost"),
        ("services.participant", ["--attack-poison-share", "1.5"], "--attack-poison-share"),
        (
            "services.participant",
            ["--attack", "backdoor", "--attack-target", "99", "--auth-token", "t"],
            "target class 99",
        ),
    ],
)
def test_bad_input_is_one_line(module, args, needle):
    proc = run(module, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_taken_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run(
            "services.aggregator", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"
        )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "INFO" not in ln]
    assert len(lines) == 1 and "in use" in lines[0], proc.stderr
