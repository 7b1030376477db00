"""--keylog and --qlog-dir on a real deployment, and the Wireshark dissector of relay frames
(docs/debugging.md, contrib/wireshark/)."""

import json
import logging
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from aio_helpers import run
from mahole import cli
from mahole.config import IntermediateConfig
from mahole.demo import LocalDeployment, issue_certificates, tcp_round_trip
from mahole.roles.intermediate import Intermediate
from mahole.roles.node import StartupError

ROOT = Path(__file__).parent.parent
DISSECTOR = ROOT / "contrib" / "wireshark" / "mahole.lua"
ROLES = ("intermediate", "connector", "agent")


def client_randoms(path, label="CLIENT_HANDSHAKE_TRAFFIC_SECRET"):
    """The client randoms (one per TLS connection) of `label` lines in a keylog file."""
    return {line.split()[1] for line in Path(path).read_text().splitlines()
            if line.split()[:1] == [label]}


@pytest.fixture(autouse=True)
def control_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MAHOLE_CONTROL_DIR", str(tmp_path / "control"))


@pytest.mark.parametrize("relay_only", [False, True], ids=["direct", "relay"])
def test_keylog_and_qlog_cover_control_and_end_to_end_connections(tmp_path, relay_only):
    debug = {role: {"keylog": str(tmp_path / f"{role}.keys"),
                    "qlog_dir": str(tmp_path / f"qlog-{role}")} for role in ROLES}
    # A keylog file that already exists is appended to, not truncated.
    Path(debug["agent"]["keylog"]).write_text("# earlier run\n")

    async def main():
        async with LocalDeployment(intermediate_kwargs=debug["intermediate"],
                                   connector_kwargs=debug["connector"],
                                   agent_kwargs={**debug["agent"], "relay_only": relay_only}
                                   ) as d:
            data = os.urandom(50_000)
            received = await tcp_round_trip(d.forward_address(d.tcp_forward), data)
            assert received == data
    run(main())

    keys = {role: client_randoms(debug[role]["keylog"]) for role in ROLES}
    control_agent = keys["agent"] & keys["intermediate"]
    control_connector = keys["connector"] & keys["intermediate"]
    end_to_end = keys["agent"] & keys["connector"]
    # Each TLS connection's secrets appear at both of its ends, so Wireshark can decrypt a
    # capture with either end's file.
    assert len(control_agent) == 1 and len(control_connector) == 1
    assert len(end_to_end) == 1
    assert keys["intermediate"] == control_agent | control_connector  # no e2e keys there
    for role in ROLES:
        path = debug[role]["keylog"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        text = Path(path).read_text()
        assert "CLIENT_TRAFFIC_SECRET_0" in text and "SERVER_TRAFFIC_SECRET_0" in text
    assert Path(debug["agent"]["keylog"]).read_text().startswith("# earlier run\n")

    # qlog: one file per connection, written at the latest when the role stops.
    traces = {}
    for role in ROLES:
        files = sorted(Path(debug[role]["qlog_dir"]).glob("*.qlog"))
        traces[role] = [json.loads(f.read_text())["traces"][0] for f in files]
    assert len(traces["intermediate"]) == 2  # the agent's and the connector's control
    assert len(traces["agent"]) == 2 and len(traces["connector"]) == 2  # control + e2e
    for role in ROLES:
        for trace in traces[role]:
            names = {event["name"] for event in trace["events"]}
            assert "transport:packet_received" in names and "transport:packet_sent" in names
    odcids = {role: {t["common_fields"]["ODCID"] for t in traces[role]} for role in ROLES}
    assert odcids["agent"] & odcids["connector"]  # the end-to-end connection, seen from both
    assert len(odcids["agent"] & odcids["intermediate"]) == 1


def test_a_keylog_that_cannot_be_opened_is_one_clear_error(tmp_path):
    issue_certificates(str(tmp_path), "alice", "connector1")
    creds = {"ca": str(tmp_path / "ca.crt"), "cert": str(tmp_path / "intermediate.crt"),
             "key": str(tmp_path / "intermediate.key")}
    with pytest.raises(StartupError, match="cannot open keylog file .*/missing/keys"):
        Intermediate(IntermediateConfig(keylog=str(tmp_path / "missing" / "keys"), **creds))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StartupError, match="cannot use qlog directory"):
        Intermediate(IntermediateConfig(qlog_dir=str(blocker / "qlog"), **creds))


@pytest.mark.parametrize("role, extra", [
    ("intermediate", []),
    ("connector", ["--intermediate", "relay", "--service", "web=tcp:127.0.0.1:80"]),
    ("agent", ["--intermediate", "relay", "--forward", "tcp:127.0.0.1:0=web"]),
])
def test_every_role_takes_keylog_and_qlog_dir(role, extra, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda args, role_cls, cfg: seen.setdefault("cfg", cfg)
                        and 0)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        monkeypatch.setenv("MAHOLE_QLOG_DIR", "/tmp/q")
        assert cli.main([role, "--cert", "x.crt", "--key", "x.key", *extra,
                         "--keylog", "keys.log"]) == 0
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    assert (seen["cfg"].keylog, seen["cfg"].qlog_dir) == ("keys.log", "/tmp/q")


# --- the Wireshark dissector --------------------------------------------------------------


def pcap(*udp_payloads, src=("127.0.0.1", 40000), dst=("127.0.0.1", 4478)):
    """A classic pcap file (LINKTYPE_RAW: IPv4 packets) holding one UDP datagram each."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)]
    for i, payload in enumerate(udp_payloads):
        udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                         bytes(map(int, src[0].split("."))), bytes(map(int, dst[0].split("."))))
        packet = ip + udp
        out.append(struct.pack("<IIII", 1 + i, 0, len(packet), len(packet)) + packet)
    return b"".join(out)


def test_the_dissector_file_is_plausible_lua():
    text = DISSECTOR.read_text()
    assert 'Proto("mahole"' in text and 'register_heuristic("udp"' in text
    assert 'Dissector.get("quic")' in text
    luac = shutil.which("luac") or shutil.which("luac5.4") or shutil.which("luac5.3")
    if luac:
        subprocess.run([luac, "-p", str(DISSECTOR)], check=True)


def client_initial():
    """A new QUIC client Initial (Wireshark decrypts Initials without keys: RFC 9001 §5.2)."""
    client = QuicConnection(configuration=QuicConfiguration(is_client=True,
                                                             alpn_protocols=["mahole-test"]))
    client.connect(("127.0.0.1", 4478), now=0.0)
    return client.datagrams_to_send(now=0.0)[0][0]


def tshark(capture, *fields, options=()):
    out = subprocess.run(
        ["tshark", "-n", "-X", f"lua_script:{DISSECTOR}", *options, "-r", str(capture),
         "-T", "fields", "-E", "separator=|", *(a for f in fields for a in ("-e", f))],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


FIELDS = ("mahole.session_id", "mahole.relay_token", "quic.long.packet_type",
          "tls.handshake.type", "stun.type", "_ws.col.Protocol")


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("port, options", [(4478, ()), (9999, ("-d", "udp.port==9999,mahole"))],
                         ids=["default-port", "decode-as"])
def test_tshark_shows_the_relay_header_and_the_quic_packet_inside(tmp_path, port, options):
    """On the intermediate's port one flow carries a control connection (plain QUIC), relay
    frames and STUN: each is decoded as what it is, the relay frame's inner packet as QUIC."""
    session, token = bytes(range(1, 9)), bytes.fromhex("a1a2a3a4a5a6a7a8")
    stun_request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)
    capture = tmp_path / "relay.pcap"
    relay_frame = b"\x10" + session + token + client_initial()
    capture.write_bytes(pcap(client_initial(), relay_frame, stun_request,
                             dst=("127.0.0.1", port)))
    control, relayed, stun = tshark(capture, *FIELDS, options=options)
    assert control == ["", "", "0", "1", "", "QUIC"]
    assert relayed == [session.hex(), token.hex(), "0", "1", "", "mahole/QUIC"]
    assert stun[:2] == ["", ""] and stun[4] == "0x0001"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_finds_relay_frames_on_any_port_by_their_first_byte(tmp_path):
    session, token = os.urandom(8), os.urandom(8)
    capture = tmp_path / "relay.pcap"
    capture.write_bytes(pcap(b"\x10" + session + token + client_initial(),
                             b"\x10" + session,  # too short to be a relay frame
                             dst=("127.0.0.1", 40001)))
    frame, short = tshark(capture, *FIELDS)
    assert frame[:3] == [session.hex(), token.hex(), "0"] and frame[5] == "mahole/QUIC"
    assert short[:2] == ["", ""]
