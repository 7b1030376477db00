"""The node's watch on its own network: rtnetlink notifications, debounced (asyncio shell).

A move to another network (Wi-Fi to LTE, a cable pulled) shows in the kernel before any
peer can see it: an address goes, a default route changes. `NetworkMonitor` feeds the
notifications to the sans-IO `mahole.netlink.NetworkView`, waits for a burst to settle (a
move is several messages) and hands a real change to the node (`local_network_changed`).
Where rtnetlink cannot be used (not Linux, no permission) it says why in /status and the
node relies on the intermediate's observed address alone.
"""

import asyncio
import errno
import logging
import socket
import sys

from .netlink import GROUPS, NetworkView

log = logging.getLogger(__name__)

# The first notification of a burst is acted on at once (a move must not wait), the rest of
# the burst as one more change once quiet this long, and at the latest this long after its
# first message: a move is an address and a route or two, within milliseconds.
SETTLE = 0.03
SETTLE_MAX = 0.2
_RECV_SIZE = 1 << 16
_READS_PER_WAKE = 64  # bounded work per wake-up; the rest waits for the next one


class NetworkMonitor:
    def __init__(self, on_change):
        self.on_change = on_change  # called with a netlink.Change
        self.view = NetworkView()
        self.state = "off"  # "netlink", or why not
        self._sock = None
        self._loop = None
        self._settle = None  # the pending call_later
        self._burst_started = None

    def start(self):
        """Open the rtnetlink socket and dump the current state; False (and why in
        `state`) where that is not possible."""
        if not sys.platform.startswith("linux") or not hasattr(socket, "AF_NETLINK"):
            self.state = "unavailable: rtnetlink needs Linux"
            return False
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except OSError as exc:
            self.state = f"unavailable: {exc.strerror or exc}"
            return False
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:
                pass
            sock.bind((0, GROUPS))
        except OSError as exc:
            sock.close()
            self.state = f"unavailable: {exc.strerror or exc}"
            return False
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.state = "netlink"
        self._flush()
        return True

    def close(self):
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def status(self):
        view = self.view
        return {"monitor": self.state,
                "addresses": sorted(view.usable_addresses()) if view.ready else None,
                "malformed": view.malformed, "overruns": view.overruns}

    def _flush(self):
        for datagram in self.view.datagrams_to_send():
            try:
                self._sock.send(datagram)
            except OSError as exc:  # a full socket buffer: the view dumps again later
                log.debug("netlink request not sent: %s", exc)

    def _readable(self):
        sock = self._sock
        fed = False
        for _ in range(_READS_PER_WAKE):
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # notifications lost: start over
                    self.view.overruns += 1
                    self.view.resync()
                    continue
                log.warning("network monitor stopped: %s", exc)
                self.state = f"stopped: {exc.strerror or exc}"
                self.close()
                return
            if not data:
                break
            self.view.feed(data)
            fed = True
        self._flush()
        if fed and self.view.ready:
            now = self._loop.time()
            if self._settle is None:  # the first of a burst is acted on at once
                self._burst_started = now
                self._check()
            else:
                self._settle.cancel()
            # The rest of the burst, once quiet, as one more change if it is one.
            when = min(now + SETTLE, self._burst_started + SETTLE_MAX)
            self._settle = self._loop.call_at(when, self._settled)

    def _settled(self):
        self._settle = None
        self._check()

    def _check(self):
        change = self.view.changed()
        if change is None:
            return
        log.info("network changed: %s", change.reason)
        self.on_change(change)
