"""Path MTU discovery and large UDP datagrams behind NATs (the NAT lab, real processes).

The agent's link to its router has a 1,400-byte MTU (the agent's ceiling: the kernel says so),
the connector's 1,500 bytes (a ceiling the path does not carry), and every mahole socket sets the
don't-fragment bit: packets larger than the link carries are dropped on the way (the router
drops them when forwarding, the agent's kernel refuses to send them), as behind a PPPoE or
tunnelled uplink. (The narrow link is a routed hop, not a veth the bridge feeds: a veth
accepts frames four bytes over its MTU, room for a VLAN tag.) Each route finds its own
packet size (the relay's is 17 bytes smaller, the relay header rides in the same datagram),
and DNS-, WireGuard- and 8,000-byte datagrams still arrive through a UDP forward, whole and
byte-identical.
"""

import os
import socket
import time

import pytest

from labroles import Deployment, wait
from netlab import _ns, lab  # noqa: F401 - the fixture

UDP_ECHO_PORT = 7001
UDP_FORWARD_PORT = 8081
LINK_MTU = 1400
# The largest UDP payload through the 1,400-byte link: less 20 (IPv4) and 8 (UDP) bytes.
PATH_PAYLOAD = LINK_MTU - 28
RELAY_HEADER = 17
RESOLUTION = 8  # mahole.pmtu.SEARCH_RESOLUTION

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


def udp_deployment(lab, tmp_path, agent_args=()):
    d = Deployment(
        lab, tmp_path, "port-restricted", "port-restricted",
        agent_args=("--forward", f"udp:127.0.0.1:{UDP_FORWARD_PORT}=echo-udp", *agent_args),
        connector_args=("--service", f"echo-udp=udp:127.0.0.1:{UDP_ECHO_PORT}"))
    d.connector_host.python(UDP_ECHO, str(UDP_ECHO_PORT))
    set_link_mtu(d, LINK_MTU)
    d.wait_registered()
    return d


def set_link_mtu(d, mtu):
    """The MTU of the link between the agent and its router, both ends."""
    d.agent_host.router.run(["ip", "link", "set", "lan", "mtu", str(mtu)])
    d.agent_host.run(["ip", "link", "set", "eth0", "mtu", str(mtu)])


def udp_echo(d, payloads, *, timeout=3.0, attempts=5):
    """Each payload through the agent's UDP forward and back: the replies (None if lost)."""
    with _ns.entered(d.agent_host.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    replies = []
    with sock:
        sock.connect(("127.0.0.1", UDP_FORWARD_PORT))
        for payload in payloads:
            reply = None
            for _ in range(attempts):  # UDP: a datagram caught in a route change may be lost
                sock.send(payload)
                deadline = time.monotonic() + timeout
                while reply is None and time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        data = sock.recv(65535)
                    except socket.timeout:
                        break
                    if data == payload:
                        reply = data
                if reply is not None:
                    break
            replies.append(reply)
    return replies


def udp_session(d, proc):
    sessions = (d.status(proc) or {}).get("sessions") or []
    return next((s for s in sessions if s["service"] == "echo-udp"), None)


def route_mtu(session):
    """The in-use route's path MTU entry once its search is complete, else None."""
    for mtu in (session or {}).get("mtu") or ():
        if mtu["in_use"] and mtu["state"] == "search complete":
            return mtu
    return None


def settled(d, route):
    """Both ends on `route` with their path MTU searches complete: the two entries."""
    def both():
        found = []
        for proc in (d.agent, d.connector):
            session = udp_session(d, proc)
            mtu = route_mtu(session)
            if session is None or session["path"] != route or mtu is None:
                return None
            found.append(mtu)
        return found
    return wait(both, 60, f"path MTU discovery on the {route} route at both ends", d)


SIZES = (1200, 1232, 1420, 8000)


@pytest.mark.parametrize("route", ["direct", "relay"])
def test_each_route_finds_its_packet_size_and_large_datagrams_get_through(lab, tmp_path,
                                                                         route):
    d = udp_deployment(lab, tmp_path, agent_args=("--relay-only",) if route == "relay" else ())
    assert udp_echo(d, [b"open"]) == [b"open"], d.logs()
    agent_mtu, connector_mtu = settled(d, route)
    limit = PATH_PAYLOAD - (RELAY_HEADER if route == "relay" else 0)
    for mtu in (agent_mtu, connector_mtu):
        # Both directions cross the narrow link: each end finds the same size.
        assert limit - RESOLUTION <= mtu["size"] <= limit, (mtu, d.logs())
    # The agent's ceiling is its own link's; the connector's, its 1,500-byte link's, was
    # tried and failed.
    assert agent_mtu["ceiling"] == limit, agent_mtu
    header = RELAY_HEADER if route == "relay" else 0
    assert connector_mtu["ceiling"] == 1472 - header and connector_mtu["probes_lost"] >= 3
    payloads = [os.urandom(n) for n in SIZES]
    assert udp_echo(d, payloads) == payloads, d.logs()
    status = udp_session(d, d.agent)
    assert status["datagrams_dropped_oversize"] == 0


def test_a_link_that_shrinks_under_a_direct_session_is_noticed(lab, tmp_path):
    d = udp_deployment(lab, tmp_path)
    assert udp_echo(d, [b"open"]) == [b"open"], d.logs()
    settled(d, "direct")
    set_link_mtu(d, 1300)  # a tunnel appeared on the way
    # 8,000-byte datagrams travel in full-size packets that now vanish; their losses make the
    # size suspect, the confirmation probes fail, and the route falls back and searches again.
    payload = os.urandom(8000)
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if udp_echo(d, [payload], timeout=1.0, attempts=1) == [payload]:
            mtu = route_mtu(udp_session(d, d.agent))
            if mtu is not None and mtu["size"] <= 1300 - 28:
                break
    else:
        raise AssertionError(f"no 8,000-byte datagram after the link shrank\n{d.logs()}")
    assert mtu["black_holes"] >= 1 and mtu["route"] == "direct"
    assert 1300 - 28 - RESOLUTION <= mtu["size"] <= 1300 - 28
