"""Hole punching at a node: the asyncio shell around the sans-IO `mahole.ice` core.

The endpoint's one timer `Scheduler` (compiled, `mahole._fast`) also paces and times the
connectivity checks of every session of the node (RFC 8445 §14.2: one new check per Ta
across the agent). STUN datagrams
that reach the node's socket are offered to each session's hole punch in turn; the checks
they send leave from the same socket, so the NAT mappings they open are the ones QUIC uses.

Port prediction (docs/architecture.md, "Port prediction"): once registered, the node asks the
intermediate's main STUN port and then its second observer (OTHER-ADDRESS) from the same
socket (`MappingProbe`); when the two new mappings got ports a small step apart, the NAT
allocates in sequence and each offer carries the next ports as predicted srflx candidates.
The verdict, with the router's port mapping and IPv6, goes to the intermediate as a
`NatSummary` (control protocol /3), from which it chooses each session's punching strategy.
"""

import ipaddress
import logging

from .ice import HolePunch, MappingProbe, gather, predicted_candidates
from .ice.candidates import host_addresses, ip_version, normalize_addr
from .wire import control

# Pairs checked per session (RFC 8445 §6.1.2.5 suggests 100): with at most 16 remote
# candidates and a handful of local ones, 32 covers every useful pair while bounding the
# checks a hostile offer can make this node send (each pair is tried at most 5 times).
MAX_PAIRS = 32
# Predicted ports offered when the NAT allocates in sequence (mahole.ice.prediction).
PREDICTED_PORTS = 6
_PROBE_TIMER = "mapping-probe"
# MappingProbe.allocation -> NatSummary.mapping (RFC 4787 §4.1): one port for two observers
# is an endpoint-independent mapping; two ports, one per destination.
_MAPPINGS = {"preserving": "endpoint-independent", "sequential": "endpoint-dependent",
             "random": "endpoint-dependent"}

log = logging.getLogger(__name__)


class Puncher:
    def __init__(self, node):
        self.node = node
        self.scheduler = node.endpoint.scheduler
        self.punches = {}  # session -> HolePunch
        self.unclaimed_stun = 0
        # Signaling repeated or out of order (a second StartPunching or answer for the same
        # attempt): ignored, counted.
        self.duplicate_signaling = 0
        self.probe = None  # the MappingProbe of the current registration
        # Answers still to come to offers this node replaced before they were answered (a
        # network that changed twice in a round trip): the intermediate forwards answers in
        # the order of the offers, so that many answers are an earlier round's and skipped;
        # their credentials would fail every check of the current one.
        self._stale_answers = {}  # session -> count
        self.stale_answers = 0

    def probe_mapping(self):
        """Observe the socket's mappings again (after registering, or when the observed
        address moved): two STUN requests to the intermediate, retransmitted a few times."""
        try:
            probe = MappingProbe(self.node.intermediate_addr[:2], self.now())
        except ValueError:  # an intermediate named by host name: nothing to compare
            self.node.nat_changed()
            return
        self.probe = probe
        self.endpoint.on_timer(_PROBE_TIMER, self._probe_timer)
        self._probe_pump(probe)

    def prediction_status(self):
        probe = self.probe
        if probe is None:
            return None
        return {"done": probe.done, "allocation": probe.allocation, "step": probe.step,
                "observed_ports": list(probe.ports), "predicted_ports": probe.predict(
                    PREDICTED_PORTS)}

    def _probe_timer(self, now):
        probe = self.probe
        if probe is not None:
            probe.handle_timer(now)
            self._probe_pump(probe)

    def _probe_pump(self, probe):
        datagrams = probe.datagrams_to_send()
        if datagrams:
            self.endpoint.send(datagrams)
        when = probe.get_timer()
        if when is None:
            self.endpoint.cancel_timer(_PROBE_TIMER)
            log.info("port allocation %s (ports %s seen by the intermediate)%s",
                     probe.allocation or "unknown", probe.ports,
                     f"; offering predicted ports {probe.predict(PREDICTED_PORTS)}"
                     if probe.predict() else "")
            self.node.nat_changed()
        else:
            self.scheduler.schedule(_PROBE_TIMER, when)
            self.endpoint.rearm()

    def nat_summary(self):
        """What this node knows of its NAT, for the intermediate (`control.NatSummary`).
        Filtering is not measured at start (it needs the intermediate's second IP address;
        ``mahole netcheck`` measures it): null."""
        probe = self.probe
        allocation = probe.allocation if probe is not None and probe.done else None
        mapping = _MAPPINGS.get(allocation)
        dependent = mapping == "endpoint-dependent"
        return control.NatSummary(
            mapping=mapping, allocation=allocation if dependent else None,
            step=probe.step if allocation == "sequential" else None, filtering=None,
            mapped_port=self.node.mapped_addr() is not None, ipv6=self._global_ipv6())

    def _global_ipv6(self):
        """Whether the socket can reach the IPv6 Internet from an address of its own."""
        host = self.endpoint.local_address[0]
        if host not in ("", "::") and ip_version(host.split("%", 1)[0]) != 6:
            return False
        hosts = host_addresses() if host in ("", "::") else [host]
        return any(ip_version(h.split("%", 1)[0]) == 6
                   and ipaddress.ip_address(h.split("%", 1)[0]).is_global for h in hosts)

    def _predicted(self, candidates):
        """Predicted srflx candidates after the observed one, when the NAT allocates ports
        in sequence (never otherwise: the peer checks every candidate offered)."""
        probe, observed_addr = self.probe, self.node.control.observed_addr
        if probe is None or observed_addr is None or not probe.predict():
            return []
        observed_addr = normalize_addr(observed_addr)
        if observed_addr[0] != probe.public_ip:
            return []
        observed = next((c for c in candidates if c.type == "srflx"
                         and c.addr == observed_addr), None)
        if observed is None:
            return []
        return predicted_candidates(observed, probe.predict(PREDICTED_PORTS))

    @property
    def endpoint(self):
        return self.node.endpoint

    def now(self):
        return self.endpoint.now()

    def local_description(self, session, controlling):
        """Gather candidates and make credentials for the offer (agent) or answer (connector)."""
        cfg = self.node.cfg
        previous = self.punches.get(session)
        if controlling and previous is not None and previous.remote_ufrag is None \
                and previous.started_at is None:
            self._stale_answers[session] = self._stale_answers.get(session, 0) + 1
        self.forget(session)  # punching again (after a failover) starts afresh
        host, port = self.endpoint.local_address[:2]
        # A node that itself lives on loopback (a test or a one-machine deployment) may be
        # reached there; any other node never sends checks to loopback addresses.
        on_loopback = cfg.include_loopback or ipaddress.ip_address(host).is_loopback
        punch = HolePunch(controlling, self.scheduler, deadline=cfg.punch_deadline, key=session,
                          max_pairs=MAX_PAIRS, allow_loopback=on_loopback)
        self.punches[session] = punch
        for key in ((session, "check"), (session, "deadline")):
            self.endpoint.on_timer(key, lambda now, s=session: self._fire(s, now))
        candidates = gather(port, bound_host=host, observed_addr=self.node.control.observed_addr,
                            relay_addr=self.node.intermediate_addr[:2],
                            mapped_addr=self.node.mapped_addr(),
                            include_loopback=cfg.include_loopback)
        candidates += self._predicted(candidates)
        ufrag, pwd, local = punch.local_description(candidates, self.now())
        return ufrag, pwd, tuple(c.to_wire() for c in local)

    def remote_description(self, session, message):
        punch = self.punches.get(session)
        if self._stale_answers.get(session):
            self._stale_answers[session] -= 1
            self.stale_answers += 1
            return
        if punch is None or punch.remote_ufrag is not None:
            self.duplicate_signaling += 1
            return
        try:
            punch.remote_description(message.ufrag, message.pwd, message.candidates, self.now())
        except ValueError as exc:
            log.warning("session %s: bad candidates from the peer: %s",
                        session.tag, exc)
            return
        self._pump(session, punch)

    def start(self, session, strategy=None):
        """StartPunching: check now (or skip the checks when the intermediate found that the
        two NATs leave no direct path: strategy "relay")."""
        punch = self.punches.get(session)
        if punch is None or punch.started_at is not None or punch.result is not None:
            self.duplicate_signaling += 1
            return
        if strategy == "relay":
            punch.close(self.now(), "the two NATs leave no direct path (strategy relay)")
        else:
            punch.start(self.now())
        self._pump(session, punch)

    def stun_received(self, data, addr):
        now = self.now()
        probe = self.probe
        if probe is not None and not probe.done and probe.receive_stun(data, addr, now):
            if len(probe.ports) == 1:  # the mapping toward the intermediate's own address
                self.node.mapping_observed((probe.public_ip, probe.ports[0]))
            self._probe_pump(probe)
            return True
        for session, punch in list(self.punches.items()):
            if punch.receive_stun(data, addr, now):
                self._pump(session, punch)
                return True
        self.unclaimed_stun += 1
        return False

    def forget(self, session):
        punch = self.punches.pop(session, None)
        if punch is not None:
            punch.close(self.now())
            for key in ((session, "check"), (session, "deadline")):
                self.endpoint.cancel_timer(key)

    def _pump(self, session, punch):
        datagrams = punch.datagrams_to_send()
        if datagrams:
            self.endpoint.send(datagrams)
        while True:
            result = punch.next_event()
            if result is None:
                break
            session.punch_result(result)
        self.endpoint.rearm()

    def _fire(self, session, now):
        punch = self.punches.get(session)
        if punch is not None:
            punch.handle_timer(now)
            self._pump(session, punch)

    def close(self):
        for session in list(self.punches):
            self.forget(session)
        if self.probe is not None:
            self.endpoint.cancel_timer(_PROBE_TIMER)
            self.probe = None
