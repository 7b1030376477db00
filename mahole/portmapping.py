"""Port mapping at a node: the asyncio shell around the sans-IO `mahole.portmap` core.

The requests leave from the node's one UDP socket (the router maps the port they come
from, so the mapping forwards to the socket that QUIC and the checks use). Answers reach
the node like STUN (PCP's first byte is 2, NAT-PMP's 0: both in STUN's range 0x00-0x03);
the node hands every datagram from the gateway's port 5351 to `PortMapping.datagram`
before STUN sees it.

When a node asks (`PortMapping.decide`): port mapping is on (`--no-port-mapping` turns it
off), the socket is bound to a wildcard and reaches IPv4 (a node bound to one address
chose that address), and a default IPv4 gateway exists (from /proc/net/route). A node
whose intermediate is on loopback is on one machine with it and has no router between
them: it does not ask, so tests and the demo never send anything to the host's real
router. ``port_mapping_gateway`` names the gateway explicitly (tests point it at a fake
one on loopback), skipping those checks but the setting itself.
"""

import ipaddress
import logging
import socket
import sys

from . import portmap
from .ice.candidates import normalize_addr
from .wire import pcp

log = logging.getLogger(__name__)

ROUTE_FILE = "/proc/net/route"
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2  # linux/route.h


def default_gateway(path=ROUTE_FILE):
    """The IPv4 default route's gateway (lowest metric), or None; read from the kernel's
    route table, never from a command's output."""
    try:
        with open(path) as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return None
    best = None
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest, gateway, flags = (int(f, 16) for f in fields[1:4])
            metric, mask = int(fields[6]), int(fields[7], 16)
        except ValueError:
            continue
        if dest or mask or not gateway or (flags & (_RTF_UP | _RTF_GATEWAY)) != (
                _RTF_UP | _RTF_GATEWAY):
            continue
        # The kernel prints the address as a host-order u32 of network-order bytes.
        address = str(ipaddress.IPv4Address(gateway.to_bytes(4, sys.byteorder)))
        if best is None or metric < best[0]:
            best = (metric, address)
    return None if best is None else best[1]


def source_address(gateway, port):
    """The address this host sends from to reach the gateway (PCP carries it, RFC 6887
    §11.1): a connected UDP socket's name; connecting sends nothing."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((gateway, port))
        return probe.getsockname()[0]
    finally:
        probe.close()


class PortMapping:
    """A node's port mapping: decides whether to ask, drives the core, keeps its state."""

    def __init__(self, node):
        self.node = node
        self.core = None
        self.off = None  # why the node does not ask, for status

    @property
    def endpoint(self):
        return self.node.endpoint

    @property
    def external_addr(self):
        core = self.core
        return core.external_addr if core is not None and core.state == "mapped" else None

    def decide(self):
        """(gateway, port) to ask, or None with self.off saying why not."""
        cfg = self.node.cfg
        if not getattr(cfg, "port_mapping", True):
            self.off = "turned off (--no-port-mapping)"
            return None
        explicit = getattr(cfg, "port_mapping_gateway", None)
        if explicit is not None:
            return explicit[0], explicit[1]
        host = self.endpoint.local_address[0]
        if not ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
            self.off = f"the socket is bound to {host}, not a wildcard"
            return None
        if self.endpoint.sock.family == socket.AF_INET6:
            try:
                v6only = self.endpoint.sock.getsockopt(socket.IPPROTO_IPV6,
                                                       socket.IPV6_V6ONLY)
            except OSError:
                v6only = 1
            if v6only:
                self.off = "the socket reaches IPv6 only"
                return None
        if any(ipaddress.ip_address(addr[0]).is_loopback for addr, _ in self.node.homes):
            self.off = "the intermediate is on loopback: no router in between"
            return None
        gateway = default_gateway()
        if gateway is None:
            self.off = "no IPv4 default gateway"
            return None
        return gateway, pcp.PORT

    def start(self):
        target = self.decide()
        if target is None:
            log.debug("port mapping: not asking (%s)", self.off)
            return
        gateway, port = target
        try:
            client = source_address(gateway, port)
        except OSError as exc:
            self.off = f"cannot reach the gateway {gateway}: {exc.strerror or exc}"
            log.info("port mapping: %s", self.off)
            return
        self.core = portmap.PortMapper(gateway, client, self.endpoint.local_address[1],
                                       port=port)
        log.debug("port mapping: asking %s:%d for UDP port %d", gateway, port,
                  self.core.internal_port)
        self.core.start(self.endpoint.now())
        self._pump()

    def datagram(self, data, addr):
        """True if the datagram came from the gateway's port (it is the mapper's, usable or
        not: the core counts what it drops)."""
        core = self.core
        if core is None:
            return False
        try:
            addr = normalize_addr(addr)
        except ValueError:
            return False
        if addr != core.gateway:
            return False
        core.datagram_received(data, addr, self.endpoint.now())
        self._pump()
        return True

    def network_changed(self):
        """The node's public address moved: a new network may have another gateway."""
        core = self.core
        if core is None:
            return
        explicit = getattr(self.node.cfg, "port_mapping_gateway", None)
        gateway = explicit[0] if explicit is not None else default_gateway()
        if gateway != core.gateway[0]:
            self.close()
            self.core = None
            self.start()

    def close(self):
        core = self.core
        if core is None:
            return
        core.close(self.endpoint.now())
        self._pump()
        self.endpoint.cancel_timer((self, "portmap"))

    def _timer(self, now):
        if self.core is not None:
            self.core.handle_timer(now)
            self._pump()

    def _pump(self):
        core = self.core
        datagrams = []
        while True:
            event = core.next_event()
            if event is None:
                break
            if isinstance(event, portmap.Send):
                datagrams.append((event.data, event.addr))
            elif isinstance(event, portmap.MappingUp):
                host, port = event.external_addr
                log.info("port mapping: %s maps %s to UDP port %d for %d s", event.protocol,
                         f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                         core.internal_port, event.lifetime)
            elif isinstance(event, portmap.MappingLost):
                log.warning("port mapping lost: %s", event.reason)
            elif isinstance(event, portmap.MappingFailed):
                log.info("port mapping: none (%s)", event.reason)
        if datagrams:
            self.endpoint.send(datagrams)
        when = core.next_timer()
        if when is None:
            self.endpoint.cancel_timer((self, "portmap"))
        else:
            self.endpoint.set_timer((self, "portmap"), when, self._timer)

    def status(self):
        if self.core is None:
            return {"state": "off", "reason": self.off}
        return self.core.status(self.endpoint.now())
