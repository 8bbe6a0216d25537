"""Identities: what `flclustering certs` and `flclustering tokens` make, and how they read."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from services.core.errors import ConfigError
from services.transport.credentials import (
    Identity,
    TokenTable,
    certificate_identity,
    load_tls,
    parse_spiffe_id,
    participant_id,
    token_owner,
    valid_name,
    write_kit,
    write_tokens,
)


def test_a_kit_names_every_party_and_hides_its_keys(tmp_path):
    write_kit(tmp_path, [participant_id(0), "edge-7"])
    for name, role in (
        ("aggregator", "aggregator"),
        ("clusterer", "clusterer"),
        ("operator", "operator"),
        ("participant-00000", "participant"),
        ("edge-7", "participant"),
    ):
        tls = load_tls(tmp_path, name)
        assert certificate_identity(tls.cert) == Identity(role, name)
        assert stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_the_csi_layout_is_read_when_a_name_has_no_files(tmp_path):
    write_kit(tmp_path, [participant_id(3)])
    (tmp_path / "participant-00003.crt").rename(tmp_path / "tls.crt")
    (tmp_path / "participant-00003.key").rename(tmp_path / "tls.key")
    tls = load_tls(tmp_path, participant_id(3))
    assert certificate_identity(tls.cert) == Identity("participant", participant_id(3))
    with pytest.raises(ConfigError, match="flclustering certs"):
        load_tls(tmp_path, participant_id(3), fallback=False)


def test_names_are_checked_and_never_clash(tmp_path):
    for bad in ("", "a/b", "..", "x" * 65, "é", "a b"):
        assert not valid_name(bad)
        with pytest.raises(ConfigError):
            write_kit(tmp_path / "bad", [bad])
    with pytest.raises(ConfigError, match="taken twice"):
        write_kit(tmp_path / "clash", ["clusterer"])
    assert not (tmp_path / "clash").exists()  # nothing written when refused


def test_spiffe_ids_of_other_domains_or_roles_are_no_identity():
    assert parse_spiffe_id("spiffe://flclustering/participant/p-1") == Identity(
        "participant", "p-1"
    )
    for uri in (
        "spiffe://other/participant/p-1",
        "spiffe://flclustering/admin/p-1",
        "spiffe://flclustering/participant/p-1/x",
        "spiffe://flclustering/participant/",
    ):
        assert parse_spiffe_id(uri) is None


def test_tokens_are_kept_as_digests_and_act_for_their_owner(tmp_path):
    digests = write_tokens(tmp_path, [participant_id(0), participant_id(1)])
    kept = json.loads(digests.read_text())
    token = (tmp_path / "participant-00000.token").read_text().strip()
    assert token.partition(".")[2] not in digests.read_text()  # only the hash is kept
    assert set(kept) == {participant_id(0), participant_id(1)}
    table = TokenTable.load(digests)
    assert table.identity(token.encode()) == Identity("participant", participant_id(0))
    assert table.identity((token + "x").encode()) is None
    forged = participant_id(1) + "." + token.partition(".")[2]  # another's id, my secret
    assert table.identity(forged.encode()) is None
    assert table.identity(b"\xff\xfe.secret") is None
    assert token_owner(token) == participant_id(0)
    assert token_owner("a-shared-development-token") is None
    dotted = write_tokens(tmp_path / "dotted", ["edge.dev-1"])  # ids may hold dots
    dotted_token = (tmp_path / "dotted" / "edge.dev-1.token").read_text().strip()
    assert token_owner(dotted_token) == "edge.dev-1"
    assert TokenTable.load(dotted).identity(dotted_token.encode()) == Identity(
        "participant", "edge.dev-1"
    )
    assert stat.S_IMODE((tmp_path / "participant-00000.token").stat().st_mode) == 0o600


def test_token_tables_refuse_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    for text in ("[1]", "{", '{"p": "short"}', '{"a/b": "' + "0" * 64 + '"}'):
        bad.write_text(text)
        with pytest.raises(ConfigError, match="--participant-tokens"):
            TokenTable.load(bad)


def test_the_commands_write_kits_and_answer_bad_flags_in_one_line(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True
        )

    ok = cli("certs", "--out", str(tmp_path / "kit"), "--participants", "2")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "kit" / "participant-00001.key").exists()
    ok = cli("tokens", "--out", str(tmp_path / "tokens"), "--participant", "edge-1")
    assert ok.returncode == 0 and (tmp_path / "tokens" / "edge-1.token").exists()
    for args in (
        ("certs", "--participants", "many"),
        ("certs", "--out", str(tmp_path / "x"), "--ca-dir", str(tmp_path / "missing")),
        ("tokens", "--out", str(tmp_path / "y"), "--participant", "../up"),
    ):
        bad = cli(*args)
        assert bad.returncode == 2
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
