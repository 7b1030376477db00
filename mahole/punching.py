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

Birthday probing (strategy "birthday", `mahole.ice.birthday`): the hard side opens K extra
sockets that send to the easy side's offered address, the easy side probes random ports of
the hard side's offered IP. The hard side's socket that an authentic probe (or answer)
reaches becomes the route to the easy side (`Endpoint.add_side_socket`, the one-socket
exception); the others close at once, and all of them when the punch is forgotten.
"""

import ipaddress
import logging
import socket

from .ice import HolePunch, MappingProbe, gather, predicted_candidates
from .ice.birthday import DEFAULT_INTERVAL, BirthdayOpeners, BirthdayProber, ProbeBudget
from .ice.candidates import format_addr as _fmt
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

# Birthday probing: after the last probe, how long the landed pair's checks may take.
BIRTHDAY_CHECK_TIME = 3.0

log = logging.getLogger(__name__)


class _Birthday:
    """One session's birthday probing at this node: the prober (easy side) or the openers
    and their sockets (hard side)."""

    def __init__(self, target):
        self.target = target  # the peer address the sockets send to, or the probed IP
        self.prober = None
        self.openers = None
        self.sockets = []  # hard side: index -> socket, None once closed
        self.won = None  # hard side: the peer address the winning socket routes
        self.ends_at = None
        self.finished = False  # _birthday_done ran


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
        self.birthdays = {}  # session -> _Birthday
        self.probe_budget = None  # ProbeBudget, made on first use (needs the clock)
        self.birthday_sockets = node.cfg.birthday_sockets
        self.birthday_probes = node.cfg.birthday_probes
        self.birthday_interval = DEFAULT_INTERVAL
        self.birthday_counters = dict.fromkeys(("started_hard", "started_easy", "landed",
                                                "won", "missed", "refused"), 0)

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
        stale = self._stale_answers.get(session, 0) + (
            controlling and previous is not None and previous.remote_ufrag is None
            and previous.started_at is None)
        self.forget(session)  # punching again (after a failover) starts afresh
        if stale:
            self._stale_answers[session] = stale
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
        stale = self._stale_answers.pop(session, 0)
        if stale:
            if stale > 1:
                self._stale_answers[session] = stale - 1
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
        elif strategy == "birthday":
            self._start_birthday(session, punch)
        else:
            punch.start(self.now())
        self._pump(session, punch)

    # Birthday probing ----------------------------------------------------------------------
    def _start_birthday(self, session, punch):
        """Start the checks and, when this node's own NAT agrees with its side, birthday
        probing; refused (plain checks) otherwise."""
        now = self.now()
        checklist = punch.checklist
        mine = self.nat_summary()
        hard = session.hard_side == self.node.role
        why = None
        if checklist is None:
            why = "the peer's candidates are not in"
        elif (self.birthday_sockets if hard else self.birthday_probes) <= 0:
            why = "turned off (--birthday-sockets / --birthday-probes 0)"
        elif hard and (mine.mapping, mine.allocation) != ("endpoint-dependent", "random"):
            why = "this node's NAT does not map at random"
        elif not hard and mine.mapping != "endpoint-independent":
            why = "this node's NAT does not map endpoint-independently"
        peer = [c for c in punch.remote_candidates
                if c.type == "srflx" and ipaddress.ip_address(c.addr[0]).version == 4]
        if why is None and not peer:
            why = "the peer offered no public IPv4 address"
        if why is not None:
            self.birthday_counters["refused"] += 1
            log.info("session %s: no birthday probing (%s)", session.tag, why)
            punch.start(now)
            return
        window = self.birthday_probes * self.birthday_interval
        punch.deadline = max(punch.deadline, window + BIRTHDAY_CHECK_TIME)
        punch.start(now)
        checklist.awaiting = True  # no verdict before the probing ends
        birthday = _Birthday(peer[0].addr)
        birthday.ends_at = now + window + 0.5
        key = (session, "birthday")
        self.endpoint.on_timer(key, lambda t, s=session: self._birthday_timer(s, t))
        try:
            if hard:
                self._open_birthday_sockets(session, birthday, checklist, now)
            else:
                if self.probe_budget is None:
                    self.probe_budget = ProbeBudget(now)
                birthday.prober = BirthdayProber(
                    peer[0].addr[0], [c.addr for c in punch.remote_candidates],
                    checklist.probe_request, checklist.authentic, now,
                    probes=self.birthday_probes, interval=self.birthday_interval,
                    budget=self.probe_budget)
                self.birthday_counters["started_easy"] += 1
        except (OSError, ValueError) as exc:
            log.warning("session %s: birthday probing not started: %s", session.tag, exc)
            self._close_birthday(birthday)
            checklist.awaiting = False
            return
        self.birthdays[session] = birthday
        log.info("session %s: birthday probing as the %s side (%s to %s)", session.tag,
                 "hard" if hard else "easy",
                 f"{self.birthday_sockets} sockets" if hard
                 else f"up to {self.birthday_probes} probes", _fmt(birthday.target))
        self._birthday_pump(session, birthday, now)

    def _open_birthday_sockets(self, session, birthday, checklist, now):
        loop = self.endpoint.loop
        for index in range(self.birthday_sockets):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            birthday.sockets.append(sock)
            sock.bind(("0.0.0.0", 0))
            loop.add_reader(sock.fileno(), self._birthday_readable, session, index)
        birthday.openers = BirthdayOpeners(birthday.target, self.birthday_sockets,
                                           checklist.probe_request, checklist.authentic, now)
        self.birthday_counters["started_hard"] += 1

    def _birthday_readable(self, session, index):
        birthday = self.birthdays.get(session)
        sock = birthday.sockets[index] if birthday is not None else None
        if sock is None:
            return
        now = self.now()
        for _ in range(16):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            addr = addr[:2]
            if birthday.openers.receive(index, data, addr, now):
                self._birthday_won(session, birthday, index, data, addr)
                return

    def _birthday_won(self, session, birthday, index, data, addr):
        """Socket ``index`` heard the peer: it becomes the route to the peer's address, the
        others close, and what it heard goes to the check list like any datagram."""
        sock = birthday.sockets[index]
        birthday.sockets[index] = None
        self.endpoint.loop.remove_reader(sock.fileno())
        self._close_birthday(birthday)
        birthday.won = addr
        self.endpoint.add_side_socket(sock, addr)
        self.birthday_counters["won"] += 1
        log.info("session %s: birthday socket %d of %d heard %s; it is the route there now",
                 session.tag, index, self.birthday_sockets, _fmt(addr))
        self._birthday_done(session, birthday)
        self.stun_received(data, addr)
        self.endpoint.flush()

    def _birthday_timer(self, session, now):
        birthday = self.birthdays.get(session)
        if birthday is not None:
            self._birthday_pump(session, birthday, now)

    def _birthday_pump(self, session, birthday, now):
        key = (session, "birthday")
        prober, openers = birthday.prober, birthday.openers
        when = None
        if prober is not None and not prober.done:
            prober.handle_timer(now)
            datagrams = prober.datagrams_to_send()
            if datagrams:
                self.endpoint.send(datagrams)
            when = prober.get_timer()
            if prober.done:
                self._birthday_done(session, birthday)
        elif openers is not None and not openers.done:
            if now >= birthday.ends_at:
                openers.stop()
                self.birthday_counters["missed"] += 1
                self._close_birthday(birthday)
                self._birthday_done(session, birthday)
            else:
                openers.handle_timer(now)
                for index, data, addr in openers.datagrams_to_send():
                    sock = birthday.sockets[index]
                    try:
                        sock.sendto(data, addr)
                    except OSError:
                        pass
                when = min(openers.get_timer() or birthday.ends_at, birthday.ends_at)
        if when is None:
            self.endpoint.cancel_timer(key)
        else:
            self.scheduler.schedule(key, when)
            self.endpoint.rearm()

    def _birthday_done(self, session, birthday):
        """Probing ended (landed, spent, won or timed out): the check list may conclude."""
        if birthday.finished:
            return
        birthday.finished = True
        punch = self.punches.get(session)
        checklist = punch.checklist if punch is not None else None
        prober = birthday.prober
        if prober is not None and checklist is not None:
            if prober.landed is not None:
                self.birthday_counters["landed"] += 1
                log.info("session %s: birthday probe %d landed at %s", session.tag,
                         prober.sent, _fmt(prober.landed))
                checklist.learn_remote(prober.landed, self.now())
            else:
                self.birthday_counters["missed"] += 1
                log.info("session %s: birthday probing ended: %s", session.tag, prober.reason)
        if checklist is not None:
            checklist.awaiting = False
        if punch is not None:
            punch.handle_timer(self.now())  # the check list fails now if nothing is left
            self._pump(session, punch)

    def _close_birthday(self, birthday):
        """Close the sockets that did not win (at once: they are mappings on the NAT)."""
        loop = self.endpoint.loop
        for index, sock in enumerate(birthday.sockets):
            if sock is not None:
                try:
                    loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
                sock.close()
                birthday.sockets[index] = None

    def _forget_birthday(self, session):
        birthday = self.birthdays.pop(session, None)
        if birthday is None:
            return
        self.endpoint.cancel_timer((session, "birthday"))
        if birthday.openers is not None:
            birthday.openers.stop()
        if birthday.prober is not None:
            birthday.prober.stop("the hole punch was forgotten")
        self._close_birthday(birthday)
        if birthday.won is not None:
            self.endpoint.remove_side_socket(birthday.won)

    def birthday_status(self, session):
        birthday = self.birthdays.get(session)
        if birthday is None:
            return None
        prober, openers = birthday.prober, birthday.openers
        if prober is not None:
            return {"side": "easy", "probes_sent": prober.sent, "landed": _fmt(prober.landed)
                    if prober.landed else None, "done": prober.done, "reason": prober.reason}
        return {"side": "hard", "sockets": self.birthday_sockets, "openers_sent": openers.sent,
                "route": _fmt(birthday.won) if birthday.won else None, "done": openers.done}

    def stun_received(self, data, addr):
        now = self.now()
        probe = self.probe
        if probe is not None and not probe.done and probe.receive_stun(data, addr, now):
            if len(probe.ports) == 1:  # the mapping toward the intermediate's own address
                self.node.mapping_observed((probe.public_ip, probe.ports[0]))
            self._probe_pump(probe)
            return True
        for session, birthday in list(self.birthdays.items()):
            prober = birthday.prober
            if prober is not None and prober.receive_stun(data, addr, now):
                if prober.landed is not None:
                    self.endpoint.cancel_timer((session, "birthday"))
                    self._birthday_done(session, birthday)
                return True
        for session, punch in list(self.punches.items()):
            if punch.receive_stun(data, addr, now):
                self._pump(session, punch)
                return True
        self.unclaimed_stun += 1
        return False

    def forget(self, session):
        self._stale_answers.pop(session, None)
        self._forget_birthday(session)
        punch = self.punches.pop(session, None)
        if punch is not None:
            punch.close(self.now())
            session.nominating(None)
            for key in ((session, "check"), (session, "deadline")):
                self.endpoint.cancel_timer(key)

    def confirm_nomination(self, session, addr):
        """The peer's authenticated QUIC packet came from the remote address of the pair the
        agent is nominating: the nomination is complete (the session's punch result)."""
        punch = self.punches.get(session)
        if punch is not None and punch.confirm_nomination(addr, self.now()):
            self._pump(session, punch)

    def _pump(self, session, punch):
        datagrams = punch.datagrams_to_send()
        if datagrams:
            self.endpoint.send(datagrams)
        pair = punch.nominating
        session.nominating(None if pair is None else pair.remote.addr)
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
