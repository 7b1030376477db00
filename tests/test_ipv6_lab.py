"""IPv6 in the NAT lab: dual-stack and IPv6-only sites, real role processes.

A dual-stack site (tests/netlab, `site(nat, ipv6=True)`) keeps its IPv4 NAT preset and routes
a global IPv6 /64 to its host without NAT, behind a stateful firewall that drops unsolicited
inbound packets, as home routers do. Two such hosts that send to each other at the same time
open each other's pinholes, so IPv6 goes direct even where the IPv4 NATs are both symmetric;
nodes offer their global IPv6 address as a host candidate, which outranks every IPv4 pair
(RFC 8421), so the IPv6 pair is chosen whenever it works. An IPv6-only node reaches the
intermediate over IPv6, and a peer of the other family only through the relay, which
bridges the two.
"""

import ipaddress
import itertools
import os

import pytest

import netlab
from labroles import Deployment, wait
from netlab import lab  # noqa: F401 - the fixture


def nominated(session):
    """The peer address of the selected pair ("host [2001:db8:2::2]:40000" -> the address)."""
    selected = session["punch"]["selected"]
    remote = selected["remote"].split()[1]
    host = remote.rsplit(":", 1)[0].strip("[]")
    return ipaddress.ip_address(host)


def settled(d, timeout=15):
    """The agent's session once hole punching has ended and the session is on the path it
    chose (a punch that ends direct moves the session a moment later)."""
    return wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"]
                and s["path"] == s["punch"]["path"] and s,
                timeout, "hole punching to finish and the session to take its path", d)


def on_ipv6_direct(d, session, cell):
    """The session is direct to the connector's global IPv6 address: the pair nominated and
    the route its packets take (say how long it took to get there)."""
    assert session["path"] == "direct", f"{session['punch']}\n{d.logs()}"
    assert nominated(session) == ipaddress.ip_address(d.connector_host.ip6), session["punch"]
    assert session["direct_addr"].startswith(f"[{d.connector_host.ip6}]:"), session
    print(f"{cell}: direct over IPv6 {session['switch_ms']:.0f} ms after the session opened, "
          f"pairs {session['punch']['pairs_by_family']}")


def through(d, size=256 << 10):
    """Bytes through the agent's forward come back identical (on whatever path is current)."""
    data = os.urandom(size)
    assert d.round_trip(data) == data, d.logs()


# -- the firewall ------------------------------------------------------------------------------

def test_the_ipv6_firewall_drops_unsolicited_inbound_and_lets_replies_in(lab):  # noqa: F811
    outside = lab.public_host(name="out", ipv6=True)
    site = lab.site("symmetric", name="home", ipv6=True)
    stranger_sock = outside.udp_socket(ip="::")
    host_sock = site.host.udp_socket(ip="::")
    host_port = host_sock.getsockname()[1]
    before = site.router.firewall_counter()

    # Unsolicited: dropped at the router, counted, never delivered.
    stranger_sock.sendto(b"knock", (site.host.ip6, host_port))
    assert netlab.wait_until(lambda: site.router.firewall_counter() > before, 2.0), \
        "the firewall let an unsolicited packet through or never saw it"
    assert netlab.recv(host_sock, 0.05) is None

    # Solicited: the host sends first, the answer from that address and port comes in,
    # with no address translation on the way (the host's own global address is seen).
    host_sock.sendto(b"hello", (outside.ip6, stranger_sock.getsockname()[1]))
    data, src = netlab.recv(stranger_sock, 2.0)
    assert data == b"hello" and src[0] == site.host.ip6 and src[1] == host_port
    stranger_sock.sendto(b"reply", src[:2])
    data, src = netlab.recv(host_sock, 2.0)
    assert data == b"reply" and src[0] == outside.ip6

    # The pinhole is for that address and port only (address-and-port-dependent filtering).
    other_sock = outside.udp_socket(ip="::")
    before = site.router.firewall_counter()
    other_sock.sendto(b"knock", (site.host.ip6, host_port))
    assert netlab.wait_until(lambda: site.router.firewall_counter() > before, 2.0)
    assert netlab.recv(host_sock, 0.05) is None


def test_two_firewalls_open_for_simultaneous_sends(lab):  # noqa: F811
    a = lab.site("symmetric", name="a", ipv6=True)
    b = lab.site("symmetric", name="b", ipv6=True)
    sock_a, sock_b = a.host.udp_socket(ip="::"), b.host.udp_socket(ip="::")
    addr_a = (a.host.ip6, sock_a.getsockname()[1])
    addr_b = (b.host.ip6, sock_b.getsockname()[1])
    before = b.router.firewall_counter()
    sock_a.sendto(b"first", addr_b)  # dropped by b's firewall, but opens a's pinhole
    assert netlab.wait_until(lambda: b.router.firewall_counter() > before, 2.0)
    sock_b.sendto(b"second", addr_a)  # gets in through a's pinhole, opens b's
    assert netlab.recv(sock_a, 2.0)[0] == b"second"
    sock_a.sendto(b"third", addr_b)
    assert netlab.recv(sock_b, 2.0)[0] == b"third"


def test_an_ipv6_only_host_has_no_ipv4(lab):  # noqa: F811
    site = lab.site("port-restricted", name="v6only", ipv6_only=True)
    assert site.host.ip is None and site.host.ip6.startswith("2001:db8:")
    out = site.host.run(["ip", "-4", "addr", "show", "scope", "global"]).stdout
    assert not out.strip(), out
    assert not site.host.run(["ip", "-4", "route"]).stdout.strip()
    with pytest.raises(ValueError, match="needs a router"):
        lab.site("none", ipv6_only=True)


# -- mahole over IPv6 --------------------------------------------------------------------------

DUAL = {"ipv6": True}
V6_ONLY = {"ipv6_only": True}


def test_dual_stack_goes_direct_over_ipv6_where_ipv4_nats_are_both_symmetric(lab, tmp_path):  # noqa: F811
    d = Deployment(lab, tmp_path, "symmetric", "symmetric", agent_site=DUAL,
                   connector_site=DUAL)
    d.wait_registered()
    through(d)
    on_ipv6_direct(d, settled(d), "dual-stack x dual-stack, symmetric IPv4 NATs")
    data = os.urandom(512 << 10)
    assert d.round_trip(data) == data, d.logs()
    assert d.session()["path"] == "direct"


def test_dual_stack_prefers_the_ipv6_pair_where_ipv4_would_work_too(lab, tmp_path):  # noqa: F811
    d = Deployment(lab, tmp_path, "full-cone", "port-restricted", agent_site=DUAL,
                   connector_site=DUAL)
    d.wait_registered()
    through(d)
    session = settled(d)
    on_ipv6_direct(d, session, "dual-stack x dual-stack, easy IPv4 NATs")
    # IPv4 pairs were there to be had: the IPv6 one won on priority, not for want of others.
    assert session["punch"]["pairs_by_family"].get("ipv4"), session["punch"]
    through(d)


def test_dual_stack_falls_back_to_ipv4_when_ipv6_does_not_get_through(lab, tmp_path):  # noqa: F811
    """RFC 8421: IPv6 first, but not IPv6 or nothing. The connector's router drops every
    IPv6 packet it would forward (a broken IPv6 uplink); the easy IPv4 NATs still go direct."""
    d = Deployment(lab, tmp_path, "full-cone", "port-restricted", agent_site=DUAL,
                   connector_site=DUAL)
    d.connector_host.router.nft("insert rule ip6 netlab6 forward counter drop\n")
    d.wait_registered()
    through(d)
    session = settled(d)
    assert session["path"] == "direct", f"{session['punch']}\n{d.logs()}"
    assert nominated(session).version == 4, session["punch"]
    assert session["punch"]["pairs_by_family"].get("ipv6"), session["punch"]
    assert session["punch"]["elapsed_ms"] < 1000, session["punch"]  # no wait for IPv6 timeouts
    through(d)


def test_a_dual_stack_agent_registered_over_ipv6_goes_direct_over_ipv6(lab, tmp_path):  # noqa: F811
    """The agent reaches the intermediate over IPv6, so the address it is told is its own
    global one (no NAT on the way) and it learns no IPv4 mapping; IPv6 still goes direct."""
    d = Deployment(lab, tmp_path, "symmetric", "symmetric", agent_site=DUAL,
                   connector_site=DUAL, over_ipv6=("agent",))
    d.wait_registered()
    agent = d.status(d.agent)
    assert agent["intermediate"]["addr"].startswith(f"[{d.public.ip6}]:"), agent["intermediate"]
    assert agent["intermediate"]["observed_addr"].startswith(f"[{d.agent_host.ip6}]:")
    through(d)
    on_ipv6_direct(d, settled(d), "dual-stack over IPv6 x dual-stack")
    through(d)


def test_an_ipv6_only_agent_reaches_a_dual_stack_connector_directly(lab, tmp_path):  # noqa: F811
    d = Deployment(lab, tmp_path, "port-restricted", "symmetric", agent_site=V6_ONLY,
                   connector_site=DUAL)
    d.wait_registered()
    agent = d.status(d.agent)
    assert agent["intermediate"]["observed_addr"] == f"[{d.agent_host.ip6}]:" + \
        agent["local_addr"].rsplit(":", 1)[1], agent["intermediate"]
    through(d)
    on_ipv6_direct(d, settled(d), "IPv6-only x dual-stack")
    through(d)


def test_an_ipv6_only_agent_and_an_ipv4_only_connector_meet_through_the_relay(lab, tmp_path):  # noqa: F811
    d = Deployment(lab, tmp_path, "port-restricted", "full-cone", agent_site=V6_ONLY)
    d.wait_registered()
    assert d.status(d.connector)["intermediate"]["observed_addr"].startswith(
        d.connector_host.public_ip + ":")
    through(d)
    session = settled(d)
    assert session["path"] == "relay", f"{session['punch']}\n{d.logs()}"
    assert "no candidate pairs" in (session["punch"]["reason"] or ""), session["punch"]
    data = os.urandom(512 << 10)
    assert d.round_trip(data) == data, d.logs()


# -- the address-family matrix -----------------------------------------------------------------

FAMILIES = {"dual-stack": DUAL, "ipv6-only": V6_ONLY, "ipv4-only": {}}
# Cells run elsewhere: dual-stack x dual-stack above, IPv4-only x IPv4-only in
# tests/test_nat_matrix.py (symmetric x symmetric: relay).
COVERED = {("dual-stack", "dual-stack"), ("ipv4-only", "ipv4-only")}


@pytest.mark.parametrize("agent_family, connector_family",
                         [c for c in itertools.product(FAMILIES, FAMILIES) if c not in COVERED],
                         ids=lambda f: f)
def test_family_matrix_behind_symmetric_ipv4_nats(lab, tmp_path, agent_family, connector_family):  # noqa: F811
    """The other pairs of site kinds, IPv4 behind symmetric NATs (which alone never go
    direct): direct over IPv6 exactly when both sides have IPv6, the relay otherwise, and
    the data arrives either way."""
    d = Deployment(lab, tmp_path, "symmetric", "symmetric",
                   agent_site=FAMILIES[agent_family], connector_site=FAMILIES[connector_family])
    d.wait_registered()
    through(d)
    session = settled(d)
    cell = f"{agent_family} x {connector_family}"
    if "ipv4-only" in (agent_family, connector_family):
        assert session["path"] == "relay", f"{cell}: {session['punch']}\n{d.logs()}"
        print(f"{cell}: relay")
    else:
        on_ipv6_direct(d, session, cell)
    through(d)
