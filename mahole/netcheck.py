"""What kind of network this node is on: NAT behaviour discovery (RFC 5780), sans-IO.

`NetCheck` sends STUN Binding requests to the intermediates (mahole.stun_server answers them)
and classifies what comes back; `mahole.netcheck_cli` is its shell (`mahole netcheck`). The
core never reads the clock and does no I/O: ``start(now)``, ``datagram_received(sock, data,
addr, now)``, ``datagrams_to_send(now) -> [(sock, bytes, addr)]``, ``get_timer()``,
``handle_timer(now)``, then ``report()`` once ``done``. Sockets are named by the shell and given
with their local address: ``"main"`` (the mapping tests and the RTTs), ``"filter"`` (the
filtering tests) and ``"port0"``… (one fresh socket each, for port allocation).

The tests, RFC 5780 §4 with the observers an intermediate has (mahole.stun_server: primary
(A1, P1), alternate port (A1, P2), alternate IP and port (A2, P2)); every request is
retransmitted (RTO doubling from ``first_rto``) until it is answered or ``probe_timeout`` has
passed since its first sending:

- UDP and RTT: a Binding request from ``main`` to every address of every intermediate.
- Mapping (§4.3): ``main``'s mapped address X1 at (A1, P1), X2 at (A1, P2), X3 at (A2, P2) —
  and, beside X3, at every other intermediate's address of the family. X1 = the local address:
  no NAT. X1 ≠ X2: address-and-port-dependent. X1 = X2 and X1 = X3: endpoint-independent;
  X1 = X2 ≠ X3: address-dependent. Without a second IP (no --stun-alt-ip, one intermediate)
  X1 = X2 is reported as ``port-independent``: endpoint-independent or address-dependent.
- Filtering (§4.4), from ``filter``, which has sent to (A1, P1) only (so no test opens the NAT
  for the answers it waits for): a CHANGE-REQUEST for IP and port answered (from A2:P2):
  endpoint-independent; else one for port only answered (from A1:P2): address-dependent; else
  address-and-port-dependent. Without a second IP, port only answered is ``port-independent``.
  An answer to a CHANGE-REQUEST that does not come from the address it names proves nothing
  (a server ignoring the attribute): the verdict is then unknown.
- Port allocation: each ``portN`` socket sends one request to (A1, P1), in order. Every mapped
  port equal to its local port: ``preserving``; a constant non-zero difference between
  consecutive ones: ``sequential`` with that ``port_step``; else ``random``.

- Hairpinning (RFC 4787 §6), with a socket ``hairpin``: once ``main``'s mapped address X1 is
  known, ``hairpin`` sends a Binding request to X1; ``main`` receiving it means the NAT loops
  packets between two of its own hosts through their public addresses.
- Port mapping (with ``gateway``, the default IPv4 gateway): from socket ``gateway``, a
  NAT-PMP external address request (RFC 6886 §3.2) and a PCP ANNOUNCE (RFC 6887 §14.1) to
  its port 5351, neither of which changes anything on the router, retried like the STUN
  requests (RFC 6886 §3.1 also starts at 250 ms). Only answers from (gateway, 5351) count.
  ``port_mapping`` says which protocol answered, and NAT-PMP's external address; UPnP-IGD
  (SSDP multicast and 2 s of discovery) is not asked.

Each verdict is None when its tests could not run (no answer, no alternate observer).

Binding lifetime (RFC 5780 §4.6) is `mahole.binding_lifetime`'s, run by the shell after these
checks against their target (``netcheck --lifetime`` / ``--quick``), in ``binding_lifetime``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from .wire import natpmp, pcp, stun

__all__ = [
    "ADDRESS_AND_PORT_DEPENDENT",
    "ADDRESS_DEPENDENT",
    "ENDPOINT_INDEPENDENT",
    "PORT_INDEPENDENT",
    "NetCheck",
    "Report",
    "classify_filtering",
    "classify_mapping",
    "classify_ports",
]

# RFC 4787 §4.1, §5 / RFC 5780 §4.3, §4.4 names, one spelling everywhere (JSON and table).
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
PORT_INDEPENDENT = "port-independent"  # one of the first two; no second IP to tell which

PROBE_TIMEOUT = 1.5  # seconds a request is retransmitted before it counts as unanswered
FIRST_RTO = 0.25  # RFC 8489 §6.2.1 starts at 500 ms; a one-shot check can afford less


def _same(a, b):
    return a is not None and b is not None and tuple(a) == tuple(b)


def _ip(host):
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def classify_mapping(local, x1, x2, x3=(), local_ips=()):
    """RFC 5780 §4.3. ``local``: the socket's local address; ``x1``, ``x2``: mapped addresses
    seen by (A1, P1) and (A1, P2); ``x3``: those seen by observers at other IPs. Returns
    (nat, mapping): nat None / True / False, mapping a name or None."""
    if x1 is None:
        return None, None
    nat = not (x1[1] == local[1] and (_same(x1, local) or x1[0] in local_ips))
    if not nat:
        return False, ENDPOINT_INDEPENDENT
    if x2 is None:  # no alternate port: other IPs seeing the same mapping still prove it
        return True, (ENDPOINT_INDEPENDENT if x3 and all(_same(x1, x) for x in x3) else None)
    if not _same(x1, x2):
        return True, ADDRESS_AND_PORT_DEPENDENT
    if not x3:
        return True, PORT_INDEPENDENT
    if all(_same(x1, x) for x in x3):
        return True, ENDPOINT_INDEPENDENT
    return True, ADDRESS_DEPENDENT


def classify_filtering(change_both, change_port):
    """RFC 5780 §4.4. Each argument: True (answered from the address it asked for), False (no
    answer), None (not possible here: no such observer, or an answer that proves nothing)."""
    if change_both:
        return ENDPOINT_INDEPENDENT
    if change_port is None:
        return None
    if change_port:
        return ADDRESS_DEPENDENT if change_both is False else PORT_INDEPENDENT
    return ADDRESS_AND_PORT_DEPENDENT


def classify_ports(samples):
    """Port allocation from [(local port, mapped port)] of fresh sockets, in the order their
    mappings were made: (allocation, step)."""
    if len(samples) < 2:
        return None, None
    if all(local == mapped for local, mapped in samples):
        return "preserving", None
    mapped = [m for _, m in samples]
    steps = {(b - a) % 65536 for a, b in zip(mapped, mapped[1:])}
    if len(steps) == 1:
        step = steps.pop()
        step = step - 65536 if step > 32768 else step
        if step and abs(step) <= 64:
            return "sequential", step
    return "random", None


@dataclasses.dataclass
class Report:
    """The verdicts; ``as_dict()`` is `mahole netcheck --json`."""

    udp: bool = False
    public_ipv4: str | None = None
    public_ipv6: str | None = None
    nat: bool | None = None
    mapping: str | None = None
    filtering: str | None = None
    port_allocation: str | None = None
    port_step: int | None = None
    alternate_observer: bool = False
    # {"gateway", "nat_pmp", "pcp", "external_ipv4"} when the gateway was asked, else None
    port_mapping: dict | None = None
    hairpinning: bool | None = None
    # mahole.binding_lifetime.LifetimeResult.as_dict() when measured, else None
    binding_lifetime: dict | None = None
    # one per intermediate: {"name", "addresses": [...], "rtt_ms": float | None}
    intermediates: list = dataclasses.field(default_factory=list)
    mapped: dict = dataclasses.field(default_factory=dict)  # test name -> "host:port"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Probe:
    __slots__ = ("name", "sock", "dest", "change", "request", "data", "first_sent",
                 "next_at", "rto", "answer", "source", "answered_at", "last_sent", "given_up")

    def __init__(self, name, sock, dest, change, now, first_rto, data=None):
        self.name, self.sock, self.dest, self.change = name, sock, tuple(dest), change
        if data is None:
            attrs = {"change_request": change} if change else {}
            self.request = stun.binding_request(**attrs)
            self.data = stun.encode(self.request)
        else:  # a request to the gateway (NAT-PMP, PCP)
            self.request, self.data = None, data
        self.first_sent = self.last_sent = None
        self.next_at = now
        self.rto = first_rto
        self.answer = self.source = self.answered_at = None
        self.given_up = False


def _fmt(addr):
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NetCheck:
    """The checks against ``intermediates``: [(name, [(host, port), ...])], the addresses of
    each as resolved; the NAT tests use the first address of the first intermediate that
    answers with OTHER-ADDRESS (else the first that answers). ``sockets``: {name: local
    (host, port)}; ``local_ips``: this machine's addresses (a mapped address among them is no
    NAT)."""

    def __init__(self, intermediates, sockets, *, local_ips=(), probe_timeout=PROBE_TIMEOUT,
                 first_rto=FIRST_RTO, gateway=None, gateway_client_ip=None):
        self.intermediates = [(name, [tuple(a) for a in addrs]) for name, addrs in intermediates]
        self.sockets = dict(sockets)
        self.local_ips = {str(_ip(h)) for h in local_ips if _ip(h) is not None}
        self.probe_timeout = probe_timeout
        self.first_rto = first_rto
        self.probes: dict[bytes | str, _Probe] = {}  # transaction id (gateway: name) -> probe
        self._by_name: dict[str, _Probe] = {}
        self._started = False
        self._target = None  # (A1, P1) of the NAT tests
        self._other = None  # OTHER-ADDRESS of the target, the unspecified host resolved
        self._nat_started = False
        # (gateway ip, the address this host reaches it from); socket "gateway" asks it
        self.gateway = (gateway, gateway_client_ip) if gateway and "gateway" in sockets else None
        self.malformed = 0  # datagrams that are not STUN
        self.ignored = 0  # STUN that answers nothing of ours (or a repeat answer)

    @property
    def target(self):
        """(A1, P1): the intermediate address the NAT tests use, once one answered."""
        return self._target

    @property
    def other(self):
        """Its alternate observer (OTHER-ADDRESS, an unspecified host made A1), or None."""
        return self._other

    # --- probes -------------------------------------------------------------------------
    def _probe(self, name, sock, dest, now, change=None):
        if name in self._by_name or sock not in self.sockets:
            return
        probe = _Probe(name, sock, dest, change, now, self.first_rto)
        self.probes[probe.request.transaction_id] = probe
        self._by_name[name] = probe

    def _pending(self):
        return [p for p in self.probes.values() if p.answer is None and not p.given_up]

    def _deadline(self, probe):
        return (probe.first_sent if probe.first_sent is not None else probe.next_at) \
            + self.probe_timeout

    def start(self, now):
        self._started = True
        for i, (_, addrs) in enumerate(self.intermediates):
            for addr in addrs:
                self._probe(f"rtt {i} {_fmt(addr)}", "main", addr, now)
        if self.gateway is not None:
            gateway, client = self.gateway
            to = (gateway, pcp.PORT)
            for name, data in (("nat-pmp", natpmp.external_address_request()),
                               ("pcp", pcp.announce_request(client or "0.0.0.0"))):
                probe = _Probe(name, "gateway", to, None, now, self.first_rto, data)
                self.probes[name] = probe
                self._by_name[name] = probe

    @property
    def done(self):
        return self._started and not self._pending() and (
            self._nat_started or self._target is None)

    def datagrams_to_send(self, now):
        out = []
        for probe in self._pending():
            if probe.next_at <= now and probe.next_at < self._deadline(probe):
                out.append((probe.sock, probe.data, probe.dest))
                if probe.first_sent is None:
                    probe.first_sent = now
                probe.last_sent = now
                probe.next_at = now + probe.rto
                probe.rto *= 2
        return out

    def get_timer(self):
        pending = self._pending()
        if not pending:
            return None
        return min(min(p.next_at, self._deadline(p)) for p in pending)

    def handle_timer(self, now):
        for probe in self._pending():
            if probe.first_sent is not None and now >= self._deadline(probe):
                probe.given_up = True
        self._without_alternate(now)

    def datagram_received(self, sock, data, addr, now):
        """A datagram on socket ``sock`` from ``addr`` (plain host, not ::ffff:-mapped)."""
        if sock == "gateway":
            self._gateway_answer(data, addr, now)
            return
        try:
            message = stun.decode(data)
        except ValueError:
            self.malformed += 1
            return
        probe = self.probes.get(message.transaction_id)
        if (probe is not None and probe.name == "hairpin" and sock == "main"
                and message.message_class == stun.CLASS_REQUEST):
            # Our own request, looped back by the NAT to the mapped address of main.
            if probe.answer is None:
                probe.answer, probe.source, probe.answered_at = message, tuple(addr[:2]), now
            return
        if (probe is None or probe.sock != sock or probe.answer is not None
                or message.message_class not in (stun.CLASS_SUCCESS, stun.CLASS_ERROR)
                or (message.message_class == stun.CLASS_SUCCESS
                    and "XOR-MAPPED-ADDRESS" not in message.attributes)):
            self.ignored += 1
            return
        probe.answer, probe.source, probe.answered_at = message, tuple(addr[:2]), now
        self._next_tests(probe, now)
        self._without_alternate(now)

    def _gateway_answer(self, data, addr, now):
        """RFC 6886 §3.1: only answers from the gateway's port 5351 count."""
        if self.gateway is None or tuple(addr[:2]) != (self.gateway[0], pcp.PORT):
            self.ignored += 1
            return
        if len(data) >= 4 and data[0] == 0 and data[1] == natpmp.RESPONSE_BIT and \
                int.from_bytes(data[2:4], "big") == natpmp.UNSUPPORTED_VERSION:
            # RFC 6887 §9: a NAT-PMP-only router refuses the PCP request (version 2) with
            # its "unsupported version": an answer, and a no.
            name, answer = "pcp", False
        elif data[:1] == b"\x00":
            try:
                answer = natpmp.decode(data)
            except ValueError:
                self.malformed += 1
                return
            if not isinstance(answer, natpmp.ExternalAddress):
                self.ignored += 1
                return
            name = "nat-pmp"
        elif len(data) >= 24 and data[0] == pcp.VERSION and \
                data[1] == pcp.RESPONSE_BIT | pcp.OP_ANNOUNCE:
            name, answer = "pcp", True  # RFC 6887 §7.2: any answer is a PCP server
        else:
            self.malformed += 1
            return
        probe = self._by_name[name]
        if probe.answer is None:
            probe.answer, probe.source, probe.answered_at = answer, tuple(addr[:2]), now

    def _next_tests(self, probe, now):
        if probe.name.startswith("rtt ") and not self._nat_started:
            if "OTHER-ADDRESS" in probe.answer.attributes or self._target is None:
                self._target = probe.dest
                other = probe.answer.attributes.get("OTHER-ADDRESS")
                if other is not None:
                    host = other[0]
                    if _ip(host) is None or _ip(host).is_unspecified:
                        host = probe.dest[0]
                    self._other = (host, other[1])
                    self._start_nat_tests(now)
        if probe.name.startswith("rtt ") and probe.dest == self._target:
            # Hairpinning: from another socket, to the public address of main.
            self._probe("hairpin", "hairpin", probe.answer.attributes["XOR-MAPPED-ADDRESS"],
                        now)
        if probe.name == "filter base" and self._other is not None:
            self._probe("filter change-both", "filter", self._target, now, (True, True))
            self._probe("filter change-port", "filter", self._target, now, (False, True))

    def _start_nat_tests(self, now):
        self._nat_started = True
        target, other = self._target, self._other
        self._probe("map alt-port", "main", (target[0], other[1]), now)
        if other[0] != target[0]:
            self._probe("map alt-ip", "main", other, now)
        self._probe("filter base", "filter", target, now)
        for name in sorted(s for s in self.sockets if s.startswith("port")):
            self._probe(f"alloc {name}", name, target, now)

    def _without_alternate(self, now):
        """Once every RTT probe is over and no answer had OTHER-ADDRESS: run what needs no
        alternate observer (port allocation) against the first intermediate that answered."""
        if self._nat_started or self._target is None or any(
                p.name.startswith("rtt ") for p in self._pending()):
            return
        self._nat_started = True
        for name in sorted(s for s in self.sockets if s.startswith("port")):
            self._probe(f"alloc {name}", name, self._target, now)

    # --- verdicts -----------------------------------------------------------------------
    def _mapped(self, name):
        probe = self._by_name.get(name)
        if probe is None or probe.answer is None:
            return None
        return probe.answer.attributes.get("XOR-MAPPED-ADDRESS")

    def _change(self, name, expected):
        """True: answered from ``expected``; False: no answer; None: not possible here."""
        probe = self._by_name.get(name)
        if probe is None:
            return None
        if probe.answer is None:
            return False
        if probe.answer.message_class != stun.CLASS_SUCCESS or not _same(probe.source,
                                                                         expected):
            return None
        return True

    def report(self):
        report = Report()
        family_of_target = _ip(self._target[0]).version if self._target else None
        for i, (name, addrs) in enumerate(self.intermediates):
            rtts = []
            for addr in addrs:
                probe = self._by_name.get(f"rtt {i} {_fmt(addr)}")
                if probe is None or probe.answer is None:
                    continue
                report.udp = True
                # Karn: a sample after a retransmission is measured from the last sending.
                rtts.append(probe.answered_at - probe.last_sent)
                mapped = probe.answer.attributes.get("XOR-MAPPED-ADDRESS")
                if mapped is not None:
                    field = "public_ipv4" if _ip(mapped[0]).version == 4 else "public_ipv6"
                    if getattr(report, field) is None:
                        setattr(report, field, mapped[0])
                    report.mapped[f"{name} {_fmt(addr)}"] = _fmt(mapped)
            report.intermediates.append({
                "name": name, "addresses": [_fmt(a) for a in addrs],
                "rtt_ms": round(min(rtts) * 1000, 2) if rtts else None})
        if self.gateway is not None:
            natpmp_answer = self._by_name["nat-pmp"].answer
            nat_pmp = isinstance(natpmp_answer, natpmp.ExternalAddress) and \
                natpmp_answer.result == natpmp.SUCCESS
            report.port_mapping = {
                "gateway": self.gateway[0], "nat_pmp": nat_pmp,
                "pcp": self._by_name["pcp"].answer is True,
                "external_ipv4": natpmp_answer.address if nat_pmp else None}
        if "hairpin" in self._by_name:
            report.hairpinning = self._by_name["hairpin"].answer is not None
        if self._target is None:
            return report
        report.alternate_observer = self._other is not None
        target_probe = next(p for p in self.probes.values()
                            if p.name.startswith("rtt ") and p.dest == self._target)
        x1 = target_probe.answer.attributes.get("XOR-MAPPED-ADDRESS")
        x2 = self._mapped("map alt-port")
        x3 = [self._mapped("map alt-ip")] if "map alt-ip" in self._by_name else []
        # Other intermediates at other IPs of the same family also see main's mapping.
        for probe in self.probes.values():
            if (probe.name.startswith("rtt ") and probe is not target_probe
                    and probe.dest[0] != self._target[0]
                    and _ip(probe.dest[0]).version == family_of_target):
                x3.append(probe.answer.attributes.get("XOR-MAPPED-ADDRESS")
                          if probe.answer is not None else None)
        x3 = [x for x in x3 if x is not None]
        report.nat, report.mapping = classify_mapping(self.sockets["main"], x1, x2, x3,
                                                      self.local_ips)
        if self._other is not None and self._mapped("filter base") is not None:
            both = (self._change("filter change-both", self._other)
                    if self._other[0] != self._target[0] else None)
            port = self._change("filter change-port", (self._target[0], self._other[1]))
            report.filtering = classify_filtering(both, port)
        samples = []
        for name in sorted(s for s in self.sockets if s.startswith("port")):
            mapped = self._mapped(f"alloc {name}")
            if mapped is not None:
                samples.append((self.sockets[name][1], mapped[1]))
        if report.nat is False:
            report.port_allocation = "preserving" if samples else None
        else:
            report.port_allocation, report.port_step = classify_ports(samples)
        for name in ("map alt-port", "map alt-ip", "filter base"):
            mapped = self._mapped(name)
            if mapped is not None:
                report.mapped[name] = _fmt(mapped)
        return report
