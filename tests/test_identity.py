"""Deployment CA, node certificates, peer verification, `mahole certs` and a real TLS handshake."""

import argparse
import datetime
import ipaddress
import os
import stat

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mahole import certs_cli, identity
from mahole.identity import IdentityError, Peer

UTC = datetime.timezone.utc


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _cert(path):
    return identity.load_certificate(path)


@pytest.fixture
def ca_dir(tmp_path):
    directory = tmp_path / "certs"
    identity.init_ca(directory)
    return directory


@pytest.fixture
def ca(ca_dir):
    return identity.load_ca(ca_dir / "ca.crt")


@pytest.fixture
def rogue_dir(tmp_path):
    """Another CA with the very same subject name: only the signature tells them apart."""
    directory = tmp_path / "rogue"
    identity.init_ca(directory)
    return directory


def _load(directory, name):
    return identity.load_identity(directory / f"{name}.crt", directory / f"{name}.key")


# --- files ----------------------------------------------------------------------------------


def test_init_and_issue_write_files_with_private_keys(ca_dir):
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.key"]
    cert_path, key_path = identity.issue(ca_dir, "connector", "web1")
    assert (cert_path, key_path) == (str(ca_dir / "web1.crt"), str(ca_dir / "web1.key"))
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.key", "web1.crt", "web1.key"]
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) & 0o077 in (0o044, 0o000)  # readable certs, umask permitting


def test_init_refuses_to_overwrite_a_ca_unless_forced(ca_dir):
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(IdentityError, match="a CA already exists in .*refusing to overwrite"):
        identity.init_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == before
    identity.init_ca(ca_dir, force=True)
    assert (ca_dir / "ca.key").read_bytes() != before
    assert _mode(ca_dir / "ca.key") == 0o600
    assert [p for p in os.listdir(ca_dir) if p.endswith(".tmp")] == []


def test_issue_refuses_to_overwrite_a_node_unless_forced(ca_dir):
    identity.issue(ca_dir, "agent", "alice")
    before = (ca_dir / "alice.key").read_bytes()
    with pytest.raises(IdentityError, match="alice.crt already exists"):
        identity.issue(ca_dir, "agent", "alice")
    assert (ca_dir / "alice.key").read_bytes() == before
    identity.issue(ca_dir, "agent", "alice", force=True)
    assert (ca_dir / "alice.key").read_bytes() != before


@pytest.mark.parametrize("role, name, message", [
    ("admin", "x", "invalid role 'admin'"),
    ("agent", "", "invalid name ''"),
    ("agent", "../evil", "invalid name '../evil'"),
    ("agent", "a" * 65, "invalid name"),
    ("agent", "-rf", "invalid name '-rf'"),
    ("agent", "CA", "reserved for the CA"),
    ("agent", "has space", "invalid name"),
])
def test_issue_refuses_bad_role_or_name(ca_dir, role, name, message):
    with pytest.raises(IdentityError, match=message):
        identity.issue(ca_dir, role, name)
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.key"]


def test_issue_refuses_bad_host_and_days(ca_dir):
    with pytest.raises(IdentityError, match="invalid host 'a b'"):
        identity.issue(ca_dir, "intermediate", "relay", hosts=["a b"])
    with pytest.raises(IdentityError, match="days must be a positive"):
        identity.issue(ca_dir, "intermediate", "relay", days=0)


def test_issue_without_a_ca_says_how_to_make_one(tmp_path):
    with pytest.raises(IdentityError, match=r"no CA in .*nowhere.*certs init --dir"):
        identity.issue(tmp_path / "nowhere", "agent", "alice")


# --- what a certificate says ------------------------------------------------------------------


def test_intermediate_certificate_carries_role_name_and_hosts(ca_dir):
    cert_path, _ = identity.issue(ca_dir, "intermediate", "relay.example.net",
                                  hosts=["203.0.113.7", "2001:db8::1", "Relay2.Example.Net"])
    cert = _cert(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "relay.example.net"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == \
        ["mahole://intermediate/relay.example.net"]
    assert san.get_values_for_type(x509.DNSName) == ["relay.example.net", "relay2.example.net"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert identity.role_and_name(cert) == ("intermediate", "relay.example.net")


def test_agent_certificate_has_no_dns_name_for_its_name(ca_dir):
    cert = _cert(identity.issue(ca_dir, "agent", "alice")[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert identity.role_and_name(cert) == ("agent", "alice")


def test_issue_days_and_never_outlives_the_ca(tmp_path):
    identity.init_ca(tmp_path, days=30)
    short = _cert(identity.issue(tmp_path, "agent", "a", days=7)[0])
    lifetime = identity.valid_until(short) - identity.valid_from(short)
    assert datetime.timedelta(days=7) <= lifetime < datetime.timedelta(days=7, minutes=11)
    long = _cert(identity.issue(tmp_path, "agent", "b")[0])  # 825 days asked, CA has 30
    assert identity.valid_until(long) == identity.valid_until(_cert(tmp_path / "ca.crt"))


# --- verify_peer ------------------------------------------------------------------------------


def test_verify_peer_accepts_a_good_certificate(ca_dir, ca):
    identity.issue(ca_dir, "connector", "web1")
    node = _load(ca_dir, "web1")
    assert (node.role, node.name) == ("connector", "web1")
    assert node.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    peer = identity.verify_peer([node.certificate], ca, expected_role="connector",
                                expected_name="web1")
    assert peer == Peer("connector", "web1")
    assert str(peer) == "connector 'web1'"
    # a bare certificate and a set of acceptable roles work too
    assert identity.verify_peer(node.certificate, ca[0],
                                expected_role=("agent", "connector")) == peer


def test_verify_peer_refuses_a_certificate_from_another_ca(ca, rogue_dir):
    identity.issue(rogue_dir, "connector", "web1")
    rogue = _load(rogue_dir, "web1")
    # the rogue CA even has the same name as ours
    assert _cert(rogue_dir / "ca.crt").subject == ca[0].subject
    with pytest.raises(IdentityError,
                       match="certificate of connector 'web1' is not trusted by this deploy"):
        identity.verify_peer([rogue.certificate], ca, expected_role="connector")


def test_verify_peer_refuses_the_rogue_ca_certificate_itself_in_the_chain(ca, rogue_dir):
    identity.issue(rogue_dir, "agent", "mallory")
    rogue = _load(rogue_dir, "mallory")
    with pytest.raises(IdentityError, match="not trusted"):
        identity.verify_peer([rogue.certificate, _cert(rogue_dir / "ca.crt")], ca)


def test_verify_peer_refuses_an_expired_certificate(ca_dir, ca):
    start = datetime.datetime.now(UTC) - datetime.timedelta(days=30)
    identity.issue(ca_dir, "agent", "old", days=1, not_before=start)
    old = _load(ca_dir, "old")  # loading is fine; trusting it is not
    expiry = (start + datetime.timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S UTC")
    with pytest.raises(IdentityError, match=f"^certificate expired on {expiry} \\(agent 'old'\\)"):
        identity.verify_peer([old.certificate], ca)


def test_verify_peer_checks_dates_against_now(ca_dir, ca):
    identity.issue(ca_dir, "agent", "alice", days=10)
    cert = _load(ca_dir, "alice").certificate
    later = datetime.datetime.now(UTC) + datetime.timedelta(days=11)
    with pytest.raises(IdentityError, match="certificate expired on"):
        identity.verify_peer(cert, ca, now=later)
    with pytest.raises(IdentityError, match="certificate is not valid until .*check the clocks"):
        identity.verify_peer(cert, ca, now=datetime.datetime(2000, 1, 1))
    assert identity.verify_peer(cert, ca, now=later.timestamp() - 2 * 86400).name == "alice"


def test_verify_peer_refuses_the_wrong_role(ca_dir, ca):
    identity.issue(ca_dir, "connector", "web1")
    cert = _load(ca_dir, "web1").certificate
    with pytest.raises(IdentityError, match="^certificate is for a connector, expected an agent"):
        identity.verify_peer(cert, ca, expected_role="agent")
    with pytest.raises(IdentityError,
                       match="is for a connector, expected an intermediate or an agent"):
        identity.verify_peer(cert, ca, expected_role=["intermediate", "agent"])


def test_verify_peer_refuses_the_wrong_name(ca_dir, ca):
    identity.issue(ca_dir, "connector", "web1")
    cert = _load(ca_dir, "web1").certificate
    with pytest.raises(IdentityError, match="certificate is for connector 'web1', expected 'db'"):
        identity.verify_peer(cert, ca, expected_role="connector", expected_name="db")


def test_verify_peer_refuses_no_certificate_and_non_mahole_certificates(ca_dir, ca):
    with pytest.raises(IdentityError, match="presented no certificate"):
        identity.verify_peer([], ca)
    with pytest.raises(IdentityError, match="not a mahole certificate"):
        identity.verify_peer(ca, ca)  # the CA certificate is no node


def test_verify_peer_without_the_client_verifier(ca_dir, ca, rogue_dir, monkeypatch):
    """The fallback for cryptography 42 (no ClientVerifier): direct signature check."""
    monkeypatch.setattr(identity, "_HAVE_CLIENT_VERIFIER", False)
    identity.issue(ca_dir, "agent", "alice")
    identity.issue(rogue_dir, "agent", "alice")
    assert identity.verify_peer(_load(ca_dir, "alice").certificate, ca) == Peer("agent", "alice")
    with pytest.raises(IdentityError, match="not trusted"):
        identity.verify_peer(_load(rogue_dir, "alice").certificate, ca)


# --- load_identity / load_ca errors -----------------------------------------------------------


def test_load_identity_missing_files(ca_dir):
    identity.issue(ca_dir, "agent", "alice")
    missing = ca_dir / "nobody.crt"
    with pytest.raises(IdentityError, match=f"^certificate file not found: {missing}$"):
        identity.load_identity(missing, ca_dir / "alice.key")
    with pytest.raises(IdentityError, match="^key file not found: .*nobody.key$"):
        identity.load_identity(ca_dir / "alice.crt", ca_dir / "nobody.key")


def test_load_identity_garbage_pem(ca_dir, tmp_path):
    identity.issue(ca_dir, "agent", "alice")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                        b"-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError, match="garbage.pem does not hold a PEM certificate"):
        identity.load_identity(garbage, ca_dir / "alice.key")
    with pytest.raises(IdentityError, match="garbage.pem does not hold a PEM private key"):
        identity.load_identity(ca_dir / "alice.crt", garbage)
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(IdentityError, match="does not hold a PEM certificate"):
        identity.load_ca(empty)


def test_load_identity_key_must_match_certificate(ca_dir):
    identity.issue(ca_dir, "agent", "alice")
    identity.issue(ca_dir, "agent", "bob")
    with pytest.raises(IdentityError, match="bob.key does not match certificate .*alice.crt"):
        identity.load_identity(ca_dir / "alice.crt", ca_dir / "bob.key")


def test_load_identity_refuses_a_non_mahole_certificate(ca_dir):
    with pytest.raises(IdentityError, match="ca.crt: certificate is not a mahole certificate"):
        identity.load_identity(ca_dir / "ca.crt", ca_dir / "ca.key")


def test_load_ca_refuses_a_node_certificate(ca_dir):
    identity.issue(ca_dir, "agent", "alice")
    with pytest.raises(IdentityError, match="alice.crt holds a certificate that is not a CA"):
        identity.load_ca(ca_dir / "alice.crt")
    with pytest.raises(IdentityError, match="^CA certificate file not found: "):
        identity.load_ca(ca_dir / "nope.crt")


# --- CLI ------------------------------------------------------------------------------------------


def _cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="mahole")
    certs_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = certs_cli.run(args)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_cli_round_trip(tmp_path, capsys):
    directory = str(tmp_path / "certs")
    code, out, err = _cli(["certs", "init", "--dir", directory], capsys)
    assert (code, err) == (0, [])
    assert len(out) == 2
    assert out[0].startswith(f"wrote CA certificate {directory}/ca.crt")
    assert out[1].startswith(f"wrote CA private key {directory}/ca.key")

    code, out, err = _cli(["certs", "issue", "--dir", directory, "--role", "intermediate",
                           "--name", "relay", "--host", "198.51.100.1", "--host", "relay.lan",
                           "--days", "30"], capsys)
    assert (code, err) == (0, [])
    assert out[0].startswith(f"wrote intermediate certificate {directory}/relay.crt "
                             "(mahole://intermediate/relay, valid until ")
    assert out[1] == f"wrote intermediate private key {directory}/relay.key (mode 0600)"
    node = identity.load_identity(f"{directory}/relay.crt", f"{directory}/relay.key")
    ca = identity.load_ca(f"{directory}/ca.crt")
    assert identity.verify_peer(node.certificate, ca, "intermediate", "relay").name == "relay"
    san = node.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay", "relay.lan"]
    life = identity.valid_until(node.certificate) - identity.valid_from(node.certificate)
    assert life < datetime.timedelta(days=31)


def test_cli_init_twice_is_one_error_line(tmp_path, capsys):
    directory = str(tmp_path / "certs")
    assert _cli(["certs", "init", "--dir", directory], capsys)[0] == 0
    code, out, err = _cli(["certs", "init", "--dir", directory], capsys)
    assert (code, out) == (2, [])
    assert len(err) == 1 and err[0].startswith("mahole certs: error: a CA already exists in")
    code, out, err = _cli(["certs", "init", "--dir", directory, "--force"], capsys)
    assert (code, err) == (0, [])


def test_cli_issue_without_ca_dir_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    code, out, err = _cli(["certs", "issue", "--dir", str(missing), "--role", "agent",
                           "--name", "alice"], capsys)
    assert (code, out) == (2, [])
    assert err == [f"mahole certs: error: no CA in {missing}: {missing}/ca.crt not found "
                   f"(create one with: python -m mahole certs init --dir {missing})"]
    assert not missing.exists()


def test_cli_issue_bad_name_is_one_error_line(tmp_path, capsys):
    directory = str(tmp_path)
    _cli(["certs", "init", "--dir", directory], capsys)
    code, out, err = _cli(["certs", "issue", "--dir", directory, "--role", "agent",
                           "--name", "../x"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("mahole certs: error: invalid name")


def test_cli_defaults_and_bad_role(capsys):
    parser = argparse.ArgumentParser(prog="mahole")
    certs_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", "issue", "--role", "agent", "--name", "a"])
    assert (args.dir, args.days, args.hosts, args.func) == ("certs", 825, None, certs_cli.run)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["certs", "issue", "--role", "admin", "--name", "a"])
    assert exc.value.code == 2
    assert "invalid choice: 'admin'" in capsys.readouterr().err


# --- a real TLS 1.3 handshake (aioquic sans-IO, in memory) ----------------------------------------

CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 4433)


def _pump(client, server, now=1000.0, rounds=30):
    """Exchange datagrams until quiet; return the events each side produced."""
    client.connect(SERVER_ADDR, now=now)
    seen = {"client": [], "server": []}
    for _ in range(rounds):
        moved = 0
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT_ADDR, now=now)
            moved += 1
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
            moved += 1
        for side, conn in (("client", client), ("server", server)):
            while (event := conn.next_event()) is not None:
                seen[side].append(event)
        if not moved:
            break
    return seen


def _completed(evts):
    return any(isinstance(e, events.HandshakeCompleted) for e in evts)


def _server_config(directory, name):
    config = QuicConfiguration(is_client=False, alpn_protocols=["mahole"])
    config.load_cert_chain(directory / f"{name}.crt", directory / f"{name}.key")
    return config


def _client_config(ca_file, server_name):
    config = QuicConfiguration(is_client=True, alpn_protocols=["mahole"],
                               server_name=server_name)
    config.load_verify_locations(cafile=str(ca_file))
    return config


def _handshake(client_config, server_config, server_cls=QuicConnection):
    client = QuicConnection(configuration=client_config)
    odcid = client.original_destination_connection_id
    server = server_cls(configuration=server_config, original_destination_connection_id=odcid)
    return client, server, _pump(client, server)


def test_tls_handshake_with_the_intermediate_certificate(ca_dir):
    identity.issue(ca_dir, "intermediate", "relay.example.net")
    client, server, seen = _handshake(_client_config(ca_dir / "ca.crt", "relay.example.net"),
                                      _server_config(ca_dir, "relay.example.net"))
    assert _completed(seen["client"]) and _completed(seen["server"])
    # what the client saw is the intermediate, as verify_peer reads it
    presented = client.tls._peer_certificate
    assert identity.verify_peer(presented, identity.load_ca(ca_dir / "ca.crt"),
                                expected_role="intermediate") == \
        Peer("intermediate", "relay.example.net")


@pytest.mark.parametrize("case", ["other CA", "wrong server_name"])
def test_tls_handshake_fails_for_a_client_that_must_not_trust_it(ca_dir, rogue_dir, case):
    identity.issue(ca_dir, "intermediate", "relay")
    ca_file = rogue_dir / "ca.crt" if case == "other CA" else ca_dir / "ca.crt"
    server_name = "relay" if case == "other CA" else "evil"
    client, _server, seen = _handshake(_client_config(ca_file, server_name),
                                       _server_config(ca_dir, "relay"))
    assert not _completed(seen["client"])
    client.handle_timer(client.get_timer())  # the closing period ends (RFC 9000 §10.2)
    while (event := client.next_event()) is not None:
        seen["client"].append(event)
    terminated = [e for e in seen["client"] if isinstance(e, events.ConnectionTerminated)]
    assert len(terminated) == 1, seen["client"]
    assert terminated[0].error_code == 0x100 + 42  # TLS bad_certificate alert (RFC 9001 §4.8)
    expected = ("unable to get local issuer certificate" if case == "other CA"
                else "hostname 'evil' doesn't match")
    assert expected in terminated[0].reason_phrase


class _ServerAskingClientCertificate(QuicConnection):
    """aioquic 1.x has no public switch for client certificates (and never verifies them),
    so mahole must ask for one itself and verify it with verify_peer."""

    def _initialize(self, peer_cid):
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


@pytest.mark.parametrize("issuer", ["our CA", "rogue CA"])
def test_client_certificate_through_tls_is_checked_by_verify_peer(ca_dir, rogue_dir, issuer):
    identity.issue(ca_dir, "intermediate", "relay")
    agent_dir = ca_dir if issuer == "our CA" else rogue_dir
    identity.issue(agent_dir, "agent", "alice")
    client_config = _client_config(ca_dir / "ca.crt", "relay")
    client_config.load_cert_chain(agent_dir / "alice.crt", agent_dir / "alice.key")
    client, server, seen = _handshake(client_config, _server_config(ca_dir, "relay"),
                                      server_cls=_ServerAskingClientCertificate)
    if not hasattr(server.tls, "_peer_certificate"):  # pragma: no cover
        pytest.skip("this aioquic keeps the peer certificate elsewhere")
    assert _completed(seen["server"])  # aioquic itself accepts any client certificate...
    presented = [server.tls._peer_certificate] + server.tls._peer_certificate_chain
    ca = identity.load_ca(ca_dir / "ca.crt")
    if issuer == "our CA":
        assert identity.verify_peer(presented, ca, "agent", "alice") == Peer("agent", "alice")
    else:  # ...so verify_peer is what refuses the rogue agent
        with pytest.raises(IdentityError, match="agent 'alice' is not trusted"):
            identity.verify_peer(presented, ca, "agent")
