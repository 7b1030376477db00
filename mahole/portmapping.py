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

UPnP-IGD is asked too when `miniupnpc` is installed (`pip install mahole[upnp]`): the
reference client, by miniupnpd's author, a small C extension with no dependencies (the
other maintained clients pull in aiohttp or requests and lxml for one SOAP call). Its calls
block, so they run in a thread: SSDP discovery starts with PCP, and takes 2 s; by then a
router that speaks PCP or NAT-PMP has answered, and UPnP maps only if neither did. A UPnP
mapping does not need the node's socket (the request names the internal address and port),
is renewed at half its lease and deleted on exit. Not with an explicit gateway: SSDP is
multicast and cannot be pointed at one.
"""

import asyncio
import ipaddress
import logging
import socket
import sys
import threading

from . import portmap
from .ice.candidates import normalize_addr
from .wire import pcp

log = logging.getLogger(__name__)

UPNP_LEASE = 3600  # s asked of a UPnP gateway; renewed at half
UPNP_DISCOVER_MS = 2000  # SSDP discovery (miniupnpc's discoverdelay)
UPNP_DELETE_TIMEOUT = 2.0  # s a node's exit waits for the UPnP mapping to be deleted

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
        self.upnp = None  # UpnpMapping, when miniupnpc is installed
        self._upnp_task = None
        self._last_offered = None  # the mapped address sessions were last told of

    @property
    def endpoint(self):
        return self.node.endpoint

    @property
    def external_addr(self):
        core = self.core
        if core is not None and core.state == "mapped":
            return core.external_addr
        upnp = self.upnp
        return upnp.external_addr if upnp is not None and upnp.state == "mapped" else None

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
        if getattr(self.node.cfg, "port_mapping_gateway", None) is None and UpnpMapping.available():
            self.upnp = UpnpMapping(self.endpoint.local_address[1])
            self._upnp_task = asyncio.get_running_loop().create_task(self._run_upnp())

    async def _run_upnp(self):
        """Discover the IGD alongside PCP; map there only if PCP and NAT-PMP did not."""
        upnp = self.upnp
        try:
            igd = await _in_thread(upnp.discover)
            while True:
                core = self.core
                if core is not None and core.state == "mapped":
                    if upnp.state == "mapped" and core.external_addr[1] != upnp.port:
                        await _in_thread(upnp.delete)
                    upnp.state = "unused"
                    upnp.error = f"{core.protocol} mapped first"
                    return
                await _in_thread(upnp.add, igd)
                log.info("port mapping: upnp maps %s:%d to UDP port %d for %d s",
                         *upnp.external_addr, upnp.port, upnp.lease)
                self._offered(upnp.external_addr)
                await asyncio.sleep(max(upnp.lease / 2, 60) if upnp.lease else 3600)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - miniupnpc raises plain Exception
            upnp.state = "failed"
            # miniupnpc reports "no IGD found" as an exception saying "Success" (errno 0).
            upnp.error = (str(exc) if str(exc) not in ("", "Success")
                          else "no UPnP gateway answered")
            log.info("port mapping: no upnp mapping (%s)", upnp.error)

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
        if self._upnp_task is not None:
            self._upnp_task.cancel()

    async def stop(self):
        """close(), and wait (a little) for a UPnP mapping to be deleted."""
        self.close()
        upnp = self.upnp
        if upnp is not None and upnp.igd is not None and upnp.state == "mapped":
            try:
                await asyncio.wait_for(_in_thread(upnp.delete), UPNP_DELETE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001
                log.info("port mapping: the upnp mapping was not deleted (%s)", exc)

    def _timer(self, now):
        if self.core is not None:
            self.core.handle_timer(now)
            self._pump()

    def _offered(self, addr):
        """A mapped address is a candidate from now on; a new one may take sessions that
        punched without it direct (UPnP takes seconds, PCP a LAN round trip)."""
        if addr != self._last_offered:
            self._last_offered = addr
            self.node.candidates_grew()

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
                self._offered(event.external_addr)
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
        status = self.core.status(self.endpoint.now())
        upnp = self.upnp
        if upnp is not None:
            status["upnp"] = {"state": upnp.state, "error": upnp.error}
            if upnp.state == "mapped" and status["state"] != "mapped":
                host, port = upnp.external_addr
                status.update(state="mapped", protocol="upnp", external_addr=f"{host}:{port}",
                              lifetime_s=upnp.lease or None, expires_in_s=None)
        return status


def _in_thread(fn, *args):
    """A future of ``fn(*args)`` run in a daemon thread. Not the loop's default executor:
    `asyncio.run` joins its threads on exit, and miniupnpc's SSDP wait cannot be cut short,
    so a node stopped during discovery would take seconds to exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, exc):
        if not future.done():
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

    def run():
        try:
            result, exc = fn(*args), None
        except Exception as error:  # noqa: BLE001 - miniupnpc raises plain Exception
            result, exc = None, error
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=run, name="mahole-upnp", daemon=True).start()
    return future


class UpnpMapping:
    """One UDP mapping on a UPnP-IGD gateway through miniupnpc; every method blocks (run it
    in a thread) and raises Exception on failure."""

    def __init__(self, port):
        self.port = port
        self.state = "discovering"  # discovering, mapped, unused, failed
        self.error = None
        self.external_addr = None
        self.lease = UPNP_LEASE
        self.igd = None

    @staticmethod
    def available():
        try:
            import miniupnpc  # noqa: F401
        except ImportError:
            return False
        return True

    def discover(self):
        import miniupnpc

        igd = miniupnpc.UPnP()
        igd.discoverdelay = UPNP_DISCOVER_MS
        if not igd.discover():
            raise OSError("no UPnP gateway answered")
        igd.selectigd()
        self.igd = igd
        return igd

    def add(self, igd):
        external = igd.externalipaddress()
        try:
            ip = ipaddress.ip_address(external)
        except ValueError:
            raise OSError(f"the gateway's external address is {external!r}") from None
        if ip.version != 4 or ip.is_unspecified or ip.is_loopback or ip.is_multicast:
            raise OSError(f"the gateway's external address {ip} is unusable")
        try:
            igd.addportmapping(self.port, "UDP", igd.lanaddr, self.port, "mahole", "",
                               self.lease)
        except Exception as exc:  # noqa: BLE001
            if "725" not in str(exc) and "OnlyPermanent" not in str(exc):
                raise
            self.lease = 0  # IGDv1 with permanent leases only: deleted on exit
            igd.addportmapping(self.port, "UDP", igd.lanaddr, self.port, "mahole", "", 0)
        self.external_addr = (str(ip), self.port)
        self.state = "mapped"

    def delete(self):
        self.igd.deleteportmapping(self.port, "UDP")
        self.state = "deleted"
