"""Hole punching at a node: the asyncio shell around the sans-IO `mahole.ice` core.

One `Scheduler` (compiled, `mahole._fast`) paces and times the connectivity checks of every
session of the node (RFC 8445 §14.2: one new check per Ta across the agent). STUN datagrams
that reach the node's socket are offered to each session's hole punch in turn; the checks
they send leave from the same socket, so the NAT mappings they open are the ones QUIC uses.
"""

import logging

from ._fast import Scheduler
from .ice import HolePunch, gather

log = logging.getLogger(__name__)


class Puncher:
    def __init__(self, node):
        self.node = node
        self.scheduler = Scheduler()
        self.punches = {}  # session -> HolePunch
        self._timer = None
        self._timer_at = None
        self.unclaimed_stun = 0

    @property
    def endpoint(self):
        return self.node.endpoint

    def now(self):
        return self.endpoint.now()

    def local_description(self, session, controlling):
        """Gather candidates and make credentials for the offer (agent) or answer (connector)."""
        cfg = self.node.cfg
        self.forget(session)  # punching again (after a failover) starts afresh
        punch = HolePunch(controlling, self.scheduler, deadline=cfg.punch_deadline, key=session)
        self.punches[session] = punch
        host, port = self.endpoint.local_address[:2]
        candidates = gather(port, bound_host=host, observed_addr=self.node.control.observed_addr,
                            relay_addr=self.node.intermediate_addr[:2],
                            include_loopback=cfg.include_loopback)
        ufrag, pwd, local = punch.local_description(candidates, self.now())
        return ufrag, pwd, tuple(c.to_wire() for c in local)

    def remote_description(self, session, message):
        punch = self.punches.get(session)
        if punch is None:
            return
        try:
            punch.remote_description(message.ufrag, message.pwd, message.candidates, self.now())
        except ValueError as exc:
            log.warning("session %s: bad candidates from the peer: %s",
                        session.session_id.hex(), exc)
            return
        self._pump(session, punch)

    def start(self, session):
        punch = self.punches.get(session)
        if punch is not None:
            punch.start(self.now())
            self._pump(session, punch)

    def stun_received(self, data, addr):
        now = self.now()
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
                self.scheduler.cancel(key)

    def _pump(self, session, punch):
        datagrams = punch.datagrams_to_send()
        if datagrams:
            self.endpoint.send(datagrams)
        while True:
            result = punch.next_event()
            if result is None:
                break
            session.punch_result(result)
        self._arm()

    def _arm(self):
        when = self.scheduler.next_deadline()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self.endpoint.loop.call_at(when, self._fire)

    def _fire(self):
        self._timer = None
        self._timer_at = None
        now = self.now()
        for session, _kind in self.scheduler.pop_due(now):
            punch = self.punches.get(session)
            if punch is not None:
                punch.handle_timer(now)
                self._pump(session, punch)
        self._arm()
        self.endpoint.flush()

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
