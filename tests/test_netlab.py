"""The NAT lab's presets behave as their RFC 4787 names say, and the lab cleans up after itself.

Probes: two STUN-like reflectors (netlab/reflector.py processes) on public hosts A and B report
the source address they observe; host-side sockets are opened inside the host namespaces. A
packet the NAT must drop is proven dropped by the router's `unsolicited` counter (the packet
reached the router and died there), never by waiting and hoping.
"""

import select
import subprocess
import time

import pytest

import netlab
from netlab import lab  # noqa: F401  (pytest fixture)

EIM = ("none", "full-cone", "port-restricted")  # endpoint-independent mapping
OPEN = ("none", "full-cone")                     # endpoint-independent filtering


@pytest.fixture
def public(lab):  # noqa: F811
    """Reflectors A and B and a third public host T that nobody contacts first."""
    a, b, t = lab.public_host("a"), lab.public_host("b"), lab.public_host("t")
    return lab.reflector(a), lab.reflector(b), t


def assert_dropped(router, sock, send, counter="unsolicited"):
    """`send()` makes one packet that `router` must drop (counted in `counter`) before `sock`."""
    before = router.counter(counter)
    send()
    assert netlab.wait_until(lambda: router.counter(counter) > before, 2.0), \
        f"{router.name} did not drop the packet (counter {counter} stayed {before})"
    got = netlab.recv(sock, 0.05, match=not_late)
    assert got is None, f"a dropped packet arrived: {got}"


def not_late(data, src):
    return not netlab.late_answer(data)


def assert_arrives(sock, payload, src):
    """The next datagram on `sock` (late duplicate reflector answers aside) is `payload`."""
    got = netlab.recv(sock, 2.0, match=not_late)
    assert got == (payload, src), f"expected {payload!r} from {src}, got {got}"


def ns_names(prefix):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]


# -- mapping (RFC 4787 §4.1) ---------------------------------------------------------------

@pytest.mark.parametrize("preset", ["none", "full-cone", "port-restricted", "symmetric"])
def test_mapping_is_endpoint_independent_except_symmetric(lab, public, preset):  # noqa: F811
    refl_a, refl_b, _ = public
    host = lab.host(preset)
    sock = host.udp_socket()
    local_port = sock.getsockname()[1]

    seen_a = netlab.mapped_address(sock, refl_a.addr)
    seen_b = netlab.mapped_address(sock, refl_b.addr)

    assert seen_a[0] == seen_b[0] == host.public_ip
    if preset in EIM:
        assert seen_a == seen_b == (host.public_ip, local_port)  # same mapping, port preserved
    else:
        assert seen_a[1] != seen_b[1], "symmetric NAT reused one external port for two peers"


def test_symmetric_sequential_allocates_the_next_port_per_destination(lab):  # noqa: F811
    """Port prediction's premise: each new mapping, whatever socket or destination, takes the
    external port after the previous one (step 1 when nothing else uses the NAT)."""
    far = lab.public_host("far")
    refls = [lab.reflector(far, port=3478 + i) for i in range(4)]
    host = lab.host("symmetric-sequential")
    sock = host.udp_socket()
    seen = [netlab.mapped_address(sock, r.addr) for r in refls]
    other = host.udp_socket()  # another socket continues the same sequence
    seen.append(netlab.mapped_address(other, refls[0].addr))
    assert {ip for ip, _ in seen} == {host.public_ip}
    ports = [port for _, port in seen]
    assert [b - a for a, b in zip(ports, ports[1:])] == [1, 1, 1, 1], ports
    # An existing mapping keeps its port (only new ones move the counter).
    assert netlab.mapped_address(sock, refls[1].addr)[1] == ports[1]


# -- filtering (RFC 4787 §5) ----------------------------------------------------------------

@pytest.mark.parametrize("preset", ["none", "full-cone", "port-restricted", "symmetric"])
def test_filtering_of_unsolicited_inbound(lab, public, preset):  # noqa: F811
    refl_a, _, third = public
    host = lab.host(preset)
    sock = host.udp_socket()
    mapped = netlab.mapped_address(sock, refl_a.addr)

    # The contacted endpoint may always send again, at any moment.
    reply = netlab.token("reply")
    refl_a.send(mapped, reply)
    assert_arrives(sock, reply, refl_a.addr)

    # The contacted address from another port, and a third host nobody contacted.
    other_port = refl_a.host.udp_socket()
    stranger = third.udp_socket()
    for sender, sender_ip in ((other_port, refl_a.host.ip), (stranger, third.ip)):
        payload = netlab.token("unsolicited")
        src = (sender_ip, sender.getsockname()[1])
        if preset in OPEN:
            sender.sendto(payload, mapped)
            assert_arrives(sock, payload, src)
        else:
            assert_dropped(host.router, sock, lambda: sender.sendto(payload, mapped))

    # The contacted endpoint still gets through afterwards (and is the next thing to arrive).
    reply = netlab.token("reply")
    refl_a.send(mapped, reply)
    assert_arrives(sock, reply, refl_a.addr)


def test_full_cone_opens_only_ports_in_use(lab, public):  # noqa: F811
    refl_a, _, third = public
    host = lab.host("full-cone")
    sock = host.udp_socket()
    ip, port = netlab.mapped_address(sock, refl_a.addr)
    unused = port + 1 if port < 65535 else port - 1
    stranger = third.udp_socket()
    assert_dropped(host.router, sock, lambda: stranger.sendto(b"knock", (ip, unused)))


# -- hole punching by hand ------------------------------------------------------------------

def punch(sock1, mapped1, sock2, mapped2, rounds=10, interval=0.05):
    """Both hosts send to the other's mapped address at the same moment, once per `interval`
    for `rounds` rounds. Returns the first datagram `(data, src)` each received, or None."""
    got = {sock1: None, sock2: None}
    for _ in range(rounds):
        sock1.sendto(b"from1", mapped2)
        sock2.sendto(b"from2", mapped1)
        deadline = time.monotonic() + interval
        while None in got.values() and time.monotonic() < deadline:
            waiting = [s for s, g in got.items() if g is None]
            for s in select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))[0]:
                data, src = s.recvfrom(2048)
                if not netlab.late_answer(data):
                    got[s] = data, src
        if None not in got.values():
            break
    return got[sock1], got[sock2]


@pytest.mark.parametrize("preset1, preset2, succeeds", [
    ("port-restricted", "port-restricted", True),
    ("full-cone", "port-restricted", True),
    ("symmetric", "symmetric", False),
    ("port-restricted", "symmetric", False),
])
def test_hole_punching_by_hand(lab, public, preset1, preset2, succeeds):  # noqa: F811
    refl_a, _, _ = public
    host1, host2 = lab.host(preset1), lab.host(preset2)
    sock1, sock2 = host1.udp_socket(), host2.udp_socket()
    mapped1 = netlab.mapped_address(sock1, refl_a.addr)
    mapped2 = netlab.mapped_address(sock2, refl_a.addr)
    drops_before = [h.router.counter("unsolicited") for h in (host1, host2)]

    got1, got2 = punch(sock1, mapped1, sock2, mapped2)

    if succeeds:
        assert got1 == (b"from2", mapped2)
        assert got2 == (b"from1", mapped1)
    else:
        assert got1 is None and got2 is None
        drops_after = [h.router.counter("unsolicited") for h in (host1, host2)]
        assert drops_after[0] > drops_before[0] and drops_after[1] > drops_before[1]


# -- the conntrack pitfall ------------------------------------------------------------------

@pytest.mark.parametrize("preset, keeps_port", [
    ("port-restricted", True),
    # The same masquerade without the input drop: the unsolicited packet's conntrack entry
    # takes the mapped port, and the host's reply to that sender leaves from another one.
    ("masquerade-only", False),
])
def test_unsolicited_inbound_does_not_move_the_mapping(lab, public,  # noqa: F811
                                                       preset, keeps_port):
    refl_a, refl_b, third = public
    host = lab.host(preset)
    sock = host.udp_socket()
    mapped = netlab.mapped_address(sock, refl_a.addr)
    peer = third.udp_socket()
    peer_addr = (third.ip, peer.getsockname()[1])

    # The peer's punch arrives first (and must not reach the host)...
    if keeps_port:
        assert_dropped(host.router, sock, lambda: peer.sendto(b"early", mapped))
    else:
        peer.sendto(b"early", mapped)
        assert netlab.wait_until(lambda: len(host.router.conntrack_entries()) == 2, 2.0)
        assert netlab.recv(sock, 0.05, match=not_late) is None
    # ...then the host's own packet to the peer.
    sock.sendto(b"hello", peer_addr)
    got = netlab.recv(peer, 2.0)
    assert got is not None and got[0] == b"hello"
    if keeps_port:
        assert got[1] == mapped
        assert netlab.mapped_address(sock, refl_b.addr) == mapped
    else:
        assert got[1] != mapped, "the pitfall did not show: the control case proves nothing"


# -- flushing conntrack and timeouts --------------------------------------------------------

@pytest.mark.parametrize("preset", ["full-cone", "port-restricted", "symmetric"])
def test_flush_conntrack_forgets_mappings_but_not_behaviour(lab, public, preset):  # noqa: F811
    refl_a, refl_b, third = public
    host = lab.host(preset)
    router = host.router
    sock = host.udp_socket()
    before = netlab.mapped_address(sock, refl_a.addr)

    router.flush_conntrack()

    assert router.conntrack_entries() == []
    # The old mapping is gone: even the contacted reflector no longer gets through.
    assert_dropped(router, sock, lambda: refl_a.send(before, netlab.token("stale")))
    # The next outbound creates a fresh mapping: same port where ports are preserved.
    after = netlab.mapped_address(sock, refl_a.addr)
    if preset == "symmetric":
        assert after[0] == before[0] and after[1] != before[1]
    else:
        assert after == before
    # The preset's behaviour is unchanged.
    via_b = netlab.mapped_address(sock, refl_b.addr)
    assert (via_b == after) == (preset != "symmetric")
    stranger = third.udp_socket()
    if preset == "full-cone":
        stranger.sendto(b"hi", after)
        assert_arrives(sock, b"hi", (third.ip, stranger.getsockname()[1]))
    else:
        assert_dropped(router, sock, lambda: stranger.sendto(b"hi", after))


@pytest.mark.parametrize("preset", ["full-cone", "port-restricted", "symmetric"])
def test_set_udp_timeout_expires_idle_mappings(lab, public, preset):  # noqa: F811
    refl_a, _, third = public
    host = lab.host(preset)
    router = host.router
    bystander = lab.host(preset)
    key = "net.netfilter.nf_conntrack_udp_timeout"
    default = bystander.router.sysctl(key)

    router.set_udp_timeout(1)
    assert router.sysctl(key) == "1" and bystander.router.sysctl(key) == default  # per netns
    sock = host.udp_socket()
    before = netlab.mapped_address(sock, refl_a.addr)
    stranger = third.udp_socket()
    if preset == "full-cone":  # the mapping is open to anyone while it lives
        stranger.sendto(b"open", before)
        assert_arrives(sock, b"open", (third.ip, stranger.getsockname()[1]))

    # The kernel's timer, not a guess: the entries are gone within 1 s of the last packet.
    assert netlab.wait_until(lambda: router.conntrack_entries() == [], 3.0)

    if preset == "full-cone":
        assert_dropped(router, sock, lambda: stranger.sendto(b"closed", before))
    assert_dropped(router, sock, lambda: refl_a.send(before, netlab.token("late")))
    after = netlab.mapped_address(sock, refl_a.addr)
    assert (after == before) == (preset != "symmetric")


# -- cutting and blocking -------------------------------------------------------------------

def test_drop_flow_and_block_udp_from(lab, public):  # noqa: F811
    refl_a, refl_b, _ = public
    host = lab.host("port-restricted")
    router = host.router
    sock = host.udp_socket()
    port = sock.getsockname()[1]
    mapped = netlab.mapped_address(sock, refl_a.addr)

    router.drop_flow(remote=refl_a.addr[0])
    assert_dropped(router, sock, lambda: sock.sendto(b"x", refl_a.addr), counter="cut")
    assert netlab.mapped_address(sock, refl_b.addr) == mapped  # other paths unaffected
    router.restore_flow()
    assert netlab.mapped_address(sock, refl_a.addr) == mapped

    router.drop_flow(local_port=port)
    assert_dropped(router, sock, lambda: sock.sendto(b"x", refl_b.addr), counter="cut")
    assert_dropped(router, sock, lambda: refl_a.send(mapped, b"in"), counter="cut")
    router.restore_flow(local_port=port)
    assert netlab.mapped_address(sock, refl_b.addr) == mapped

    router.block_udp_from(refl_a.addr)  # the reflector's answers are dropped on arrival
    assert_dropped(router, sock, lambda: sock.sendto(b"x", refl_a.addr), counter="blocked")
    assert netlab.mapped_address(sock, refl_b.addr) == mapped
    router.unblock_udp_from(refl_a.addr)
    assert netlab.mapped_address(sock, refl_a.addr) == mapped


def test_lab_routes_stay_inside(lab):  # noqa: F811
    public = lab.public_host()
    host = lab.host("port-restricted")
    assert public.run(["ip", "route", "show", "default"]).stdout.strip() == ""
    assert host.router.run(["ip", "route", "show", "default"]).stdout.strip() == ""
    assert host.run(["ip", "route", "show", "default"]).stdout.split()[:3] == \
        ["default", "via", host.router.lan_ip]
    assert host.router.sysctl("net.ipv4.ip_forward") == "1"


# -- teardown -------------------------------------------------------------------------------

def test_teardown_removes_everything_even_when_the_body_raises():
    netlab.require()
    with pytest.raises(RuntimeError, match="test body failed"):
        with netlab.Lab() as lab_:
            prefix = lab_.prefix
            refl = lab_.reflector(lab_.public_host())
            host = lab_.host("symmetric")
            sock = host.udp_socket()
            sleeper = host.popen(["sleep", "60"])
            assert len(ns_names(prefix)) == 4
            raise RuntimeError("test body failed")
    assert ns_names(prefix) == []
    assert refl.proc.poll() is not None and sleeper.poll() is not None
    assert sock.fileno() == -1


def test_sweep_removes_only_namespaces_of_dead_runs(lab):  # noqa: F811
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = f"mhl{gone.pid}x1-pub"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        netlab.sweep()
        assert ns_names(leftover) == []
        assert ns_names(lab.prefix) == [lab.prefix + "pub"]  # a live run's lab is left alone
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)


# -- require() ------------------------------------------------------------------------------

def test_require_skips_or_fails_when_the_lab_cannot_run(monkeypatch):
    monkeypatch.setattr(netlab, "problem", lambda: "no namespaces here")
    monkeypatch.delenv(netlab.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no namespaces here"):
        netlab.require()
    monkeypatch.setenv(netlab.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="MAHOLE_REQUIRE_NETLAB=1 but no namespaces"):
        netlab.require()
