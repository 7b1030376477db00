"""A router that hands out port mappings: miniupnpd (PCP and NAT-PMP) on a lab router.

`Lab.site(nat, port_mapping=True)` runs miniupnpd (Debian package `miniupnpd-nftables`) in
the router's namespace, listening on the LAN side (`lan`), mapping on the WAN side (`wan`),
with its rules in a table of its own, `inet miniupnpd`, in front of the NAT preset's
`ip netlab`. The preset's forward chain lets DNAT-ed inbound through (`ct status dnat`), so
a mapping is reachable whatever the preset filters; everything else stays as the preset says.
With `port_mapping="upnp"` it speaks UPnP-IGD only (SSDP, and SOAP on HTTP port
`UPNP_HTTP_PORT`), PCP and NAT-PMP off; with `True`, PCP and NAT-PMP only.

miniupnpd refuses to map when its WAN address is private or reserved, and the lab's public
segment is 203.0.113.0/24 (RFC 5737, reserved). With `ext_perform_stun` it asks a STUN server
instead whether that address is reachable unfiltered; the lab runs a small STUN responder
(`STUN_SERVER`) on a public host of its own for that. It answers every Binding request from
the address it was asked on, ignoring CHANGE-REQUEST, which is all miniupnpd's check needs
(four answers, one external address and ports unchanged).
"""

import select
import subprocess
import time

from ._ns import NetlabError

STUN_PORT = 3478
UPNP_HTTP_PORT = 5000
MIN_LIFETIME = 10  # s: the shortest lease the lab router grants (renewals in seconds)

# RFC 8489: a Binding success response with XOR-MAPPED-ADDRESS (§14.2) and MAPPED-ADDRESS
# (§14.1, for RFC 3489 clients such as miniupnpd 2.3).
STUN_SERVER = r"""
import socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, (ip, port) = sock.recvfrom(2048)
    if len(data) < 20 or data[:2] != b"\x00\x01":
        continue
    tid = data[4:20]
    packed = socket.inet_aton(ip)
    cookie = 0x2112A442
    xport = port ^ (cookie >> 16)
    xip = bytes(a ^ b for a, b in zip(packed, struct.pack("!I", cookie)))
    attrs = struct.pack("!HHBBH", 0x0001, 8, 0, 1, port) + packed
    attrs += struct.pack("!HHBBH", 0x0020, 8, 0, 1, xport) + xip
    sock.sendto(struct.pack("!HH", 0x0101, len(attrs)) + tid + attrs, (ip, port))
"""

# The chains miniupnpd fills (names as in its nft_init.sh, table named in the config). The
# router's own traffic leaves with its ports kept (a NAT binding made here is the one used:
# the preset's masquerade, fully-random on a symmetric router, does not touch it), so
# miniupnpd's STUN check sees its WAN address unchanged; hosts' traffic is untouched.
TABLE = """
table inet miniupnpd {
    chain miniupnpd {
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
    chain forward {
        type filter hook forward priority filter - 5; policy accept;
        jump miniupnpd
    }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority srcnat - 5; policy accept;
        oifname "wan" ip saddr %(wan_ip)s snat to %(wan_ip)s
        jump postrouting_miniupnpd
    }
}
"""

CONFIG = """ext_ifname=wan
listening_ip=lan
http_port={http_port}
enable_upnp={upnp}
enable_natpmp={natpmp}
secure_mode=yes
ext_perform_stun=yes
ext_stun_host={stun_host}
ext_stun_port={stun_port}
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
min_lifetime={min_lifetime}
max_lifetime=86400
lease_file={lease_file}
uuid=3d3cec3a-8cf0-11e0-98ee-{tag}
allow 1024-65535 {lan} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def start_stun_server(host):
    """The STUN responder on a public lab host; returns its (ip, port)."""
    proc = host.python(STUN_SERVER, str(STUN_PORT), stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if line != "ready":
        raise NetlabError(f"STUN responder on {host.name} did not start ({line!r})")
    return host.ip, STUN_PORT


def start(router, lan, stun, workdir, upnp=False, timeout=10.0):
    """miniupnpd on `router` for LAN `lan` (a network), asking `stun` (ip, port); returns
    once it listens (PCP / NAT-PMP, or UPnP-IGD with `upnp`) and port forwarding is on."""
    router.nft(TABLE % {"wan_ip": router.wan_ip})
    # The preset's forward chain drops unsolicited inbound: let what a mapping DNATs pass.
    router.nft('insert rule ip netlab forward iifname "wan" oifname "lan" ct status dnat '
               'accept\n')
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"{router.ns}.conf"
    log = workdir / f"{router.ns}.log"
    tag = f"{abs(hash(router.ns)) % (1 << 48):012x}"
    conf.write_text(CONFIG.format(stun_host=stun[0], stun_port=stun[1], lan=lan,
                                  min_lifetime=MIN_LIFETIME, tag=tag,
                                  http_port=UPNP_HTTP_PORT if upnp else 0,
                                  upnp="yes" if upnp else "no", natpmp="no" if upnp else "yes",
                                  lease_file=workdir / f"{router.ns}.leases"))
    with open(log, "w") as out:  # the child keeps its own copy
        router.upnpd = router.popen(["miniupnpd", "-d", "-f", str(conf), "-P",
                                     str(workdir / f"{router.ns}.pid")],
                                    stdout=out, stderr=out)
    router.upnpd_log = log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        listening = "HTTP listening on port" if upnp else "Listening for NAT-PMP"
        if "Port forwarding is now enabled" in text and listening in text:
            return
        if router.upnpd.poll() is not None:
            break
        time.sleep(0.05)
    raise NetlabError(f"miniupnpd on {router.name} did not start:\n{log.read_text()[-2000:]}")


def mappings(router):
    """The router's port mappings: miniupnpd's DNAT rules, as `nft list` lines."""
    out = router.run(["nft", "list", "chain", "inet", "miniupnpd",
                      "prerouting_miniupnpd"]).stdout
    return [line.strip() for line in out.splitlines() if "dnat" in line]

