"""The lab: a small internet of network namespaces, built per test and always torn down.

```
             public segment 203.0.113.0/24 (bridge br0 in namespace <prefix>pub)
   ┌──────────────┬─────────────┴───────┬──────────────────────┐
 public host    public host        router r1 (wan .x)      router r2 (wan .y)
 (preset none)                     NAT preset, nft         NAT preset, nft
                                      │ lan 10.0.1.1/24        │ lan 10.0.2.1/24
                                   host h1 10.0.1.2         host h2 10.0.2.2
```
Nothing in the lab routes beyond it: public hosts and routers know only their connected
subnets, hosts have a default route to their router only, and the host namespace is untouched.
IPv6 is disabled inside the lab namespaces (no link-local chatter, one address family) unless
asked for:

- `public_host(ipv6=True)` also has 2001:db8::N/64 on the public segment (N is the last
  byte of its IPv4 address 203.0.113.N, read as hex digits: 203.0.113.2 is 2001:db8::2).
- `site(nat, ipv6=True)` is dual-stack: IPv4 behind the NAT preset as before, and a global
  /64 (2001:db8:<n>::/64, router ::1, host ::2) that the router routes *without NAT*
  behind a stateful firewall (nat.FIREWALL6: outbound allowed, replies and related ICMPv6
  allowed, unsolicited inbound dropped and counted, like a home router).
  `site(nat, ipv6_only=True)` is the same with no IPv4 on the host (loopback aside).
- Every IPv6 member of the public segment (public hosts, routers) has a route to each
  site's /64 via that site's router, and nothing else: still no route beyond the lab.
- Duplicate address detection is off (`accept_dad=0`, `nodad`) and router advertisements
  are ignored, so addresses are usable at once and only the routes the lab sets exist.
"""

import atexit
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import _ns, upnpd, wire
from . import nat as presets
from ._ns import NetlabError

PUBLIC_NET = ipaddress.ip_network("203.0.113.0/24")
# RFC 3849 documentation prefix: the public segment and one /64 per site.
PUBLIC6_NET = ipaddress.ip_network("2001:db8::/64")
SITE6_FORMAT = "2001:db8:{index:x}::/64"
REFLECTOR_PATH = Path(__file__).with_name("reflector.py")
WIRE_PATH = Path(__file__).with_name("wire.py")
STUN_PORT = 3478
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")

_lab_seq = 0
_swept = False


def _next_prefix():
    global _lab_seq, _swept
    if not _swept:
        _swept = True
        _ns.sweep()  # namespaces of earlier runs whose process died
        pid = os.getpid()
        atexit.register(_ns.sweep, only_pid=pid)
    _lab_seq += 1
    return f"mhl{os.getpid()}x{_lab_seq}-"


def _quiet_sysctls(forwarding=False):
    values = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}
    if not os.path.exists("/proc/sys/net/ipv6"):
        values = {}
    if forwarding:
        values["net.ipv4.ip_forward"] = 1
    return values


def _ipv6_sysctls(forwarding=False):
    """IPv6 on and usable at once: no duplicate address detection (its second of
    "tentative" would make the first sends fail), no router advertisements or
    autoconfiguration (the lab sets every address and route itself)."""
    values = {}
    for scope in ("all", "default"):
        values.update({f"net.ipv6.conf.{scope}.disable_ipv6": 0,
                       f"net.ipv6.conf.{scope}.accept_dad": 0,
                       f"net.ipv6.conf.{scope}.dad_transmits": 0,
                       f"net.ipv6.conf.{scope}.accept_ra": 0,
                       f"net.ipv6.conf.{scope}.autoconf": 0,
                       f"net.ipv6.conf.{scope}.router_solicitations": 0})
    if forwarding:
        values["net.ipv6.conf.all.forwarding"] = 1
    return values


def _public6(ipv4):
    """The public segment's IPv6 address of a member with IPv4 address 203.0.113.N."""
    return str(ipaddress.ip_address(f"{PUBLIC6_NET.network_address}{ipv4.rsplit('.', 1)[1]}"))


def _wait_ipv6_ready(ns, timeout=5.0):
    """Until no IPv6 address in `ns` is tentative (DAD is off, so this checks, not waits)."""
    deadline = time.monotonic() + timeout
    while True:
        out = _ns.run(["ip", "-n", ns, "-6", "addr", "show", "tentative"]).stdout
        if not out.strip():
            return
        if time.monotonic() > deadline:
            raise NetlabError(f"IPv6 addresses in {ns} still tentative: {out.strip()}")
        time.sleep(0.02)


class Node:
    """A namespace of the lab: run commands and processes in it, open sockets in it."""

    def __init__(self, lab, name, ns):
        self.lab = lab
        self.name = name
        self.ns = ns

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} ns={self.ns}>"

    def _argv(self, cmd):
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        return ["ip", "netns", "exec", self.ns, *map(str, cmd)]

    def run(self, cmd, *, check=True, timeout=30, **kwargs):
        """subprocess.run in this namespace (cmd: argv list, or a string for `sh -c`).

        Output is captured as text unless stdout/stderr are given; check=True raises
        NetlabError with stderr on a non-zero exit."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs["capture_output"] = True
        kwargs.setdefault("text", True)
        proc = subprocess.run(self._argv(cmd), timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise NetlabError(f"[{self.name}] {cmd!r} exited {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout or '').strip()}")
        return proc

    def popen(self, cmd, **kwargs):
        """subprocess.Popen in this namespace, in its own process group (pgid = pid), which
        the lab ends at teardown (SIGTERM, then SIGKILL). stdin defaults to /dev/null."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs["start_new_session"] = True
        proc = subprocess.Popen(self._argv(cmd), **kwargs)
        self.lab._procs.append(proc)
        return proc

    def python(self, code, *args, **kwargs):
        """popen(`python -c code args…`) with this interpreter."""
        return self.popen([sys.executable, "-c", code, *args], **kwargs)

    def udp_socket(self, port=0, ip="0.0.0.0"):
        """A UDP socket created and bound inside this namespace (IPv6 when `ip` is an IPv6
        address); the lab closes it at teardown."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with _ns.entered(self.ns):
            sock = socket.socket(family, socket.SOCK_DGRAM)
        self.lab._sockets.append(sock)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.close()
            raise
        return sock

    def sysctl(self, key):
        return _ns.read_sysctl(self.ns, key)


class Host(Node):
    """An end host. `ip` is its own IPv4 address: public for preset none, private behind a
    router, None on an IPv6-only site. `ip6` is its global IPv6 address, or None."""

    def __init__(self, lab, name, ns, ip, router=None, ip6=None):
        super().__init__(lab, name, ns)
        self.ip = ip
        self.ip6 = ip6
        self.router = router
        self.site = None
        self.uplinks = []  # (router, own address, wire) of each lab.add_uplink

    def leave_uplink(self):
        """The first uplink goes away as Wi-Fi does when out of range: eth0 loses its
        address (and with it the default route through it), in one command, so the host's
        traffic leaves through the next uplink (lab.add_uplink). Returns that uplink's
        Router, now `router`."""
        if not self.uplinks:
            raise ValueError(f"{self.name} has no other uplink (lab.add_uplink)")
        router, ip, _wire = self.uplinks.pop(0)
        self.run(["ip", "addr", "flush", "dev", "eth0"])
        self.router, self.ip = router, ip
        return router

    @property
    def public_ip(self):
        """The address the public segment sees: the router's WAN address, or the host's own."""
        return self.router.wan_ip if self.router else self.ip


class Wire(Node):
    """A link with delay, jitter, loss or a rate (netlab/wire.py) between two namespaces:
    its own namespace, with the two ends of the link as interfaces `wa` and `wb` and the
    forwarder process copying frames between them."""

    def __init__(self, lab, name, ns, link):
        super().__init__(lab, name, ns)
        self.link = link
        self.proc = None

    def set(self, link, timeout=5.0):
        """Give the running link new settings (a preset name or settings, as at build time);
        returns once the wire applies them to the frames that arrive from then on. Frames
        already on the way keep the delay they were given."""
        settings = wire.settings(link)  # a bad setting fails here, not in the wire
        self.proc.stdin.write(json.dumps(settings) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != "ok":
            raise NetlabError(f"wire {self.name} did not take {settings} ({line!r})")
        self.link = link


class Router(Node):
    """A NAT router: WAN on the public segment, LAN with one host; rules in table `ip netlab`.
    On a dual-stack site also IPv6 (`wan_ip6`, `lan_ip6`, `prefix6`), routed without NAT
    through the stateful firewall of table `ip6 netlab6` (nat.FIREWALL6)."""

    def __init__(self, lab, name, ns, preset, wan_ip, lan_ip):
        super().__init__(lab, name, ns)
        self.preset = preset
        self.wan_ip = wan_ip
        self.lan_ip = lan_ip
        self.wan_ip6 = self.lan_ip6 = self.prefix6 = None
        self.host = None

    def firewall_counter(self, name="unsolicited"):
        """Packets counted by the IPv6 firewall's counter `name` (nat.FIREWALL6_COUNTERS):
        `unsolicited` is inbound IPv6 from the WAN that no outbound flow asked for, dropped."""
        out = self.run(["nft", "-j", "list", "counter", "ip6", "netlab6", name]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return item["counter"]["packets"]
        raise NetlabError(f"no IPv6 counter {name} in {self.ns}")

    def nft(self, script):
        """Apply an nft script in this router's namespace."""
        return _ns.nft(self.ns, script)

    def ruleset(self):
        return self.run(["nft", "list", "ruleset"]).stdout

    def counter(self, name):
        """Packets counted so far by named counter `name` (see nat.COUNTERS): `unsolicited`
        (inbound dropped by the filtering), `blocked` (block_udp_from), `cut` (drop_flow)."""
        out = self.run(["nft", "-j", "list", "counter", "ip", "netlab", name]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return item["counter"]["packets"]
        raise NetlabError(f"no counter {name} in {self.ns}")

    @staticmethod
    def _element(addr):
        if isinstance(addr, str):
            return "hosts", addr
        ip, port = addr
        return "endpoints", f"{ip} . {int(port)}"

    def block_udp_from(self, addr):
        """Drop inbound UDP from `addr` ("ip" or (ip, port)) before conntrack sees it."""
        kind, elem = self._element(addr)
        self.nft(f"add element ip netlab blocked_{kind} {{ {elem} }}\n")

    def unblock_udp_from(self, addr):
        kind, elem = self._element(addr)
        self.nft(f"delete element ip netlab blocked_{kind} {{ {elem} }}\n")

    def drop_flow(self, local_port=None, remote=None):
        """Cut traffic both ways: of the host's UDP `local_port`, and/or with `remote`
        ("ip" or (ip, port)). Several cuts may be active; restore_flow() lifts them."""
        if local_port is None and remote is None:
            raise ValueError("drop_flow needs local_port or remote")
        lines = []
        if local_port is not None:
            lines.append(f"add element ip netlab cut_ports {{ {int(local_port)} }}")
        if remote is not None:
            kind, elem = self._element(remote)
            lines.append(f"add element ip netlab cut_{kind} {{ {elem} }}")
        self.nft("\n".join(lines) + "\n")

    def restore_flow(self, local_port=None, remote=None):
        """Lift the cut for `local_port` / `remote`, or every cut when called without arguments."""
        if local_port is None and remote is None:
            self.nft("flush set ip netlab cut_ports\nflush set ip netlab cut_hosts\n"
                     "flush set ip netlab cut_endpoints\n")
            return
        lines = []
        if local_port is not None:
            lines.append(f"delete element ip netlab cut_ports {{ {int(local_port)} }}")
        if remote is not None:
            kind, elem = self._element(remote)
            lines.append(f"delete element ip netlab cut_{kind} {{ {elem} }}")
        self.nft("\n".join(lines) + "\n")

    def flush_conntrack(self):
        """Forget every flow and mapping (conntrack -F; full-cone also forgets its open ports).
        The rules stay: the next outbound packet creates a fresh mapping."""
        self.run(["conntrack", "-F"])
        if self.preset == "full-cone":
            self.nft("flush set ip netlab mapped\n")

    def conntrack_entries(self):
        """The router's UDP conntrack entries, as `conntrack -L` lines (for diagnostics)."""
        out = self.run(["conntrack", "-L", "-p", "udp"]).stdout
        return [line for line in out.splitlines() if line.strip()]

    def set_udp_timeout(self, seconds, stream=None):
        """Set this router's UDP conntrack timeouts (per-namespace sysctls
        nf_conntrack_udp_timeout and nf_conntrack_udp_timeout_stream, the latter = `stream`
        or `seconds`). They apply from each flow's next packet; a full-cone router's port
        mappings use the larger value from their next outbound packet."""
        stream = seconds if stream is None else stream
        _ns.write_sysctls(self.ns, {"net.netfilter.nf_conntrack_udp_timeout": int(seconds),
                                    "net.netfilter.nf_conntrack_udp_timeout_stream": int(stream)})
        if self.preset == "full-cone":
            rule = presets.mapping_rule(max(int(seconds), int(stream))).strip()
            self.nft(f"flush chain ip netlab mapping\nadd rule ip netlab mapping {rule}\n")


@dataclass
class Site:
    """A NAT router and the host behind it (router is None for preset none)."""
    name: str
    preset: str
    router: Router | None
    host: Host
    link_wire: Wire | None = None  # the host's link, if built with link=
    uplink_wire: Wire | None = None  # the router's link to the public segment (uplink=)

    def set_link(self, link):
        """Change the host's link while it runs (netlab/wire.py preset or settings)."""
        if self.link_wire is None:
            raise ValueError(f"site {self.name} was built without link=: give link='lan' "
                             "to change it later")
        self.link_wire.set(link)

    def set_uplink(self, link):
        """Change the router's link to the public segment while it runs."""
        if self.uplink_wire is None:
            raise ValueError(f"site {self.name} was built without uplink=: give "
                             "uplink='lan' to change it later")
        self.uplink_wire.set(link)


class Reflector:
    """A STUN-like reflector process (netlab/reflector.py) on a lab host."""

    def __init__(self, host, port, proc):
        self.host = host
        self.port = port
        self.proc = proc
        self.addr = (host.ip, port)
        self._buf = b""

    def _line(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"reflector on {self.host.name} silent for {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise NetlabError(f"reflector on {self.host.name} exited "
                                  f"({self.proc.wait()}): {self.proc.stderr.read().decode()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send(self, to, payload, timeout=5.0):
        """Send `payload` (bytes without spaces) from the reflector's socket to `to`."""
        self.proc.stdin.write(f"send {to[0]} {int(to[1])} {payload.decode()}\n".encode())
        self.proc.stdin.flush()
        line = self._line(timeout)
        if line != "sent":
            raise NetlabError(f"reflector answered {line!r}")


class Lab:
    """Per-test internet. Use as a context manager; everything is removed on exit, also when
    the body raises (sockets closed, processes' groups ended, namespaces deleted)."""

    def __init__(self):
        self.prefix = _next_prefix()
        self.namespaces = []
        self.sites = []
        self.hosts = []
        self.wires = []
        self._procs = []
        self._sockets = []
        self._public_ips = (str(a) for a in list(PUBLIC_NET.hosts())[1:])  # .2 … .254
        self._names = set()
        self._counts = {}
        self._v6_members = []  # namespaces with an IPv6 address on the public segment
        self._v6_sites = []  # (a site's /64, its router's public IPv6 address)
        self._closed = False
        self._stun = None  # (ip, port) of the STUN responder miniupnpd asks (upnpd.py)
        self._workdir = None
        try:
            self.pub = self._namespace("pub")
            _ns.write_sysctls(self.pub, _quiet_sysctls())
            _ns.ip(self.pub, "link add br0 type bridge", "link set lo up", "link set br0 up")
            if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
                try:  # keep bridged public traffic out of the pub namespace's netfilter
                    _ns.write_sysctls(self.pub, {"net.bridge.bridge-nf-call-iptables": 0})
                except OSError:
                    pass
        except BaseException:
            self.close(raise_errors=False)
            raise

    # -- building -----------------------------------------------------------------------

    def _name(self, name, kind):
        if name is None:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            name = f"{kind}{self._counts[kind]}"
        if not _NAME_RE.match(name) or name == "pub":
            raise ValueError(f"bad lab name {name!r}: lower-case letters and digits, 1-10 chars")
        if name in self._names:
            raise ValueError(f"lab name {name!r} already used")
        self._names.add(name)
        return name

    def _namespace(self, role):
        ns = self.prefix + role
        _ns.run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        return ns

    def _plug_public(self, ns, ifname, port_name, link=None):
        """A link from `ns` (interface `ifname`) to the public bridge."""
        node = self._link(ns, ifname, self.pub, port_name, link)
        _ns.ip(self.pub, f"link set {port_name} master br0", f"link set {port_name} up")
        return node

    def _link(self, ns_a, if_a, ns_b, if_b, link=None, seed=None):
        """A veth pair from `ns_a` (`if_a`) to `ns_b` (`if_b`); with `link` (a preset of
        netlab/wire.py, or its settings) through a Wire of that character."""
        if link is None:
            _ns.ip(None, f"link add {if_a} netns {ns_a} type veth peer name {if_b} netns {ns_b}")
            return None
        wire.settings(link)  # a bad preset fails before anything is built
        name = self._name(None, "w")
        wns = self._namespace(name)
        _ns.write_sysctls(wns, _quiet_sysctls())
        _ns.ip(None, f"link add name {if_a} netns {ns_a} type veth peer name wa netns {wns}",
               f"link add name wb netns {wns} type veth peer name {if_b} netns {ns_b}")
        # Segment before the wire: it forwards and drops frames, not 64 KB GSO trains.
        for ns, ifname in ((ns_a, if_a), (wns, "wa"), (wns, "wb"), (ns_b, if_b)):
            _ns.ip(ns, f"link set dev {ifname} gso_max_segs 1")
        _ns.ip(wns, "link set lo up", "link set wa promisc on", "link set wb promisc on",
               "link set wa up", "link set wb up")
        node = Wire(self, name, wns, link)
        node.proc = node.popen([sys.executable, str(WIRE_PATH), "wa", "wb", "--control",
                                *wire.argv(link, seed)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([node.proc.stdout], [], [], 10)
        line = node.proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            raise NetlabError(f"wire {name} did not start ({line!r})")
        self.wires.append(node)
        return node

    def public_host(self, name=None, link=None, ipv6=False):
        """A host directly on the public segment (preset none), through a `link` if given
        (netlab/wire.py: a preset name or settings)."""
        return self.site("none", name=name, link=link, ipv6=ipv6).host

    def add_public_ip(self, host):
        """One more public IPv4 address for public host `host` (on its eth0), returned: for a
        service that needs two, such as the intermediate's RFC 5780 STUN observers."""
        if host.router is not None or host.ip is None:
            raise ValueError(f"{host.name} is not a public IPv4 host")
        ip = next(self._public_ips)
        _ns.ip(host.ns, f"addr add {ip}/{PUBLIC_NET.prefixlen} dev eth0")
        return ip

    def host(self, nat="none", name=None, **kwargs):
        """A host behind a new router running NAT preset `nat` (or on the public segment for
        none); `.router` is its Router (None for none)."""
        return self.site(nat, name=name, **kwargs).host

    def site(self, nat="none", name=None, lan=None, link=None, uplink=None, ipv6=False,
             ipv6_only=False, port_mapping=False, udp_timeout=None):
        """A Site: for a NAT preset a router `<name>r` (WAN on the public segment) with host
        `<name>` behind it on `lan` (default 10.0.<n>.0/24, router .1, host .2).

        `link` gives the host's own link (to its router, or to the public segment) and
        `uplink` the router's link to the public segment the character of a netlab/wire.py
        preset (or settings): delay, jitter, loss, bursts, a rate.

        `ipv6=True` makes the site dual-stack: a public host gets 2001:db8::N as well, a
        router routes 2001:db8:<n>::/64 to its host without NAT, behind the stateful firewall
        nat.FIREWALL6. `ipv6_only=True` (behind a router) leaves the host without IPv4.
        `port_mapping=True` runs miniupnpd on the router (PCP, NAT-PMP: netlab/upnpd.py),
        `port_mapping="upnp"` the same speaking UPnP-IGD only. `udp_timeout` (seconds) is how
        long the router keeps an idle UDP mapping, new or established (Router.set_udp_timeout;
        Linux's defaults are 30 s and 120 s): the binding lifetime a node measures."""
        if udp_timeout is not None and nat == "none":
            raise ValueError("a public host has no router: udp_timeout needs a NAT preset")
        if ipv6_only:
            if nat == "none":
                raise ValueError("an IPv6-only site needs a router (a NAT preset): its "
                                 "firewall is what stands in front of the host")
            ipv6 = True
        if nat not in presets.PRESETS:
            raise ValueError(f"unknown NAT preset {nat!r}; "
                             f"choose one of {', '.join(presets.PRESETS)}")
        if nat == "none":
            if uplink is not None:
                raise ValueError("a public host has no router: give its link as link=")
            name = self._name(name, "p")
            ns = self._namespace(name)
            ip = next(self._public_ips)
            _ns.write_sysctls(ns, _ipv6_sysctls() if ipv6 else _quiet_sysctls())
            link_wire = self._plug_public(ns, "eth0", f"v-{name}", link)
            _ns.ip(ns, f"addr add {ip}/{PUBLIC_NET.prefixlen} dev eth0", "link set lo up",
                   "link set eth0 up")
            ip6 = None
            if ipv6:
                ip6 = _public6(ip)
                _ns.ip(ns, f"addr add {ip6}/{PUBLIC6_NET.prefixlen} dev eth0 nodad")
                self._join_public6(ns)
                _wait_ipv6_ready(ns)
            host = Host(self, name, ns, ip, ip6=ip6)
            site = Site(name, nat, None, host, link_wire=link_wire)
        else:
            name = self._name(name, "h")
            router_name = self._name(name + "r", "r")
            index = sum(1 for s in self.sites if s.router) + 1
            net = ipaddress.ip_network(lan or f"10.0.{index}.0/24")
            if not net.is_private:
                raise ValueError(f"LAN {net} is not a private range")
            lan_ip, host_ip = (str(a) for a in list(net.hosts())[:2])
            wan_ip = next(self._public_ips)
            rns = self._namespace(router_name)
            hns = self._namespace(name)
            if ipv6:
                _ns.write_sysctls(rns, {**_quiet_sysctls(forwarding=True),
                                        **_ipv6_sysctls(forwarding=True)})
                _ns.write_sysctls(hns, _ipv6_sysctls())
            else:
                _ns.write_sysctls(rns, _quiet_sysctls(forwarding=True))
                _ns.write_sysctls(hns, _quiet_sysctls())
            uplink_wire = self._plug_public(rns, "wan", f"v-{router_name}", uplink)
            link_wire = self._link(rns, "lan", hns, "eth0", link)
            _ns.ip(rns, f"addr add {wan_ip}/{PUBLIC_NET.prefixlen} dev wan",
                   f"addr add {lan_ip}/{net.prefixlen} dev lan",
                   "link set lo up", "link set wan up", "link set lan up")
            if ipv6_only:
                _ns.ip(hns, "link set lo up", "link set eth0 up")
            else:
                _ns.ip(hns, f"addr add {host_ip}/{net.prefixlen} dev eth0", "link set lo up",
                       "link set eth0 up", f"route add default via {lan_ip}")
            router = Router(self, router_name, rns, nat, wan_ip, lan_ip)
            router.nft(presets.ruleset(nat, wan_ip=wan_ip, host_ip=host_ip))
            if udp_timeout is not None:
                router.set_udp_timeout(udp_timeout)
            if port_mapping:
                self._start_upnpd(router, net, upnp=port_mapping == "upnp")
            host_ip6 = None
            if ipv6:
                prefix6 = ipaddress.ip_network(SITE6_FORMAT.format(index=index))
                router.prefix6 = str(prefix6)
                router.wan_ip6 = _public6(wan_ip)
                router.lan_ip6 = str(prefix6.network_address + 1)
                host_ip6 = str(prefix6.network_address + 2)
                _ns.ip(rns, f"addr add {router.wan_ip6}/{PUBLIC6_NET.prefixlen} dev wan nodad",
                       f"addr add {router.lan_ip6}/{prefix6.prefixlen} dev lan nodad")
                _ns.ip(hns, f"addr add {host_ip6}/{prefix6.prefixlen} dev eth0 nodad",
                       f"route add ::/0 via {router.lan_ip6}")
                router.nft(presets.FIREWALL6)
                self._join_public6(rns, prefix6, router.wan_ip6)
                _wait_ipv6_ready(rns)
                _wait_ipv6_ready(hns)
            host = Host(self, name, hns, None if ipv6_only else host_ip, router, ip6=host_ip6)
            router.host = host
            site = Site(name, nat, router, host, link_wire=link_wire,
                        uplink_wire=uplink_wire)
        host.site = site
        self.sites.append(site)
        self.hosts.append(host)
        return site

    def add_uplink(self, host, nat="port-restricted", link=None, metric=200):
        """A second way out for `host` (behind a router): a new router running NAT preset
        `nat` on a LAN of its own, reached by the host's interface `eth1`, through a `link`
        if given. Its default route has `metric` (the first uplink's is 0), so it is the
        backup a phone's LTE is to its Wi-Fi until `host.leave_uplink()`. Returns the Router."""
        if host.router is None or host.ip is None:
            raise ValueError(f"{host.name} has no router: a second uplink needs a first one")
        router_name = self._name(host.name + "b", "r")
        index = sum(1 for s in self.sites if s.router) + 1 + len(host.uplinks)
        net = ipaddress.ip_network(f"10.0.{100 + index}.0/24")
        lan_ip, host_ip = (str(a) for a in list(net.hosts())[:2])
        wan_ip = next(self._public_ips)
        rns = self._namespace(router_name)
        _ns.write_sysctls(rns, _quiet_sysctls(forwarding=True))
        self._plug_public(rns, "wan", f"v-{router_name}")
        wire_node = self._link(rns, "lan", host.ns, "eth1", link)
        _ns.ip(rns, f"addr add {wan_ip}/{PUBLIC_NET.prefixlen} dev wan",
               f"addr add {lan_ip}/{net.prefixlen} dev lan",
               "link set lo up", "link set wan up", "link set lan up")
        _ns.ip(host.ns, f"addr add {host_ip}/{net.prefixlen} dev eth1", "link set eth1 up",
               f"route add default via {lan_ip} metric {int(metric)}")
        router = Router(self, router_name, rns, nat, wan_ip, lan_ip)
        router.nft(presets.ruleset(nat, wan_ip=wan_ip, host_ip=host_ip))
        router.host = host
        host.uplinks.append((router, host_ip, wire_node))
        return router

    def _start_upnpd(self, router, net, upnp):
        if self._stun is None:
            self._stun = upnpd.start_stun_server(self.public_host(name="stun"))
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=self.prefix))
        upnpd.start(router, net, self._stun, self._workdir, upnp=upnp)

    def _join_public6(self, ns, prefix6=None, via=None):
        """IPv6 routes on the public segment: `ns` learns every site's /64, and with
        `prefix6` (a new site, routed by `via`) every member learns that one."""
        lines = [f"route add {p} via {v}" for p, v in self._v6_sites]
        if lines:
            _ns.ip(ns, *lines)
        if prefix6 is not None:
            for member in self._v6_members:
                _ns.ip(member, f"route add {prefix6} via {via}")
            self._v6_sites.append((str(prefix6), via))
        self._v6_members.append(ns)

    def reflector(self, host, port=STUN_PORT, timeout=10.0):
        """Start a reflector (netlab/reflector.py) on `host`:`port`; returns once it is bound."""
        proc = host.popen([sys.executable, str(REFLECTOR_PATH), str(port)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        refl = Reflector(host, port, proc)
        line = refl._line(timeout)
        if line != f"ready {port}":
            raise NetlabError(f"reflector on {host.name} said {line!r}")
        return refl

    # -- teardown -------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(raise_errors=exc_type is None)
        return False

    def close(self, raise_errors=True):
        """Close sockets, end process groups, delete namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for sock in self._sockets:
            sock.close()
        self._stop_processes()
        for ns in reversed(self.namespaces):
            err = _ns.delete_namespace(ns)
            if err:
                errors.append(err)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        if errors and raise_errors:
            raise NetlabError("lab teardown: " + "; ".join(errors))

    def _stop_processes(self):
        running = [p for p in self._procs if p.poll() is None]
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            for proc in running:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for proc in running:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            running = [p for p in running if p.poll() is None]
            if not running:
                break
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

