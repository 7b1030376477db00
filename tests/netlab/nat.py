"""NAT presets as nftables rulesets, named by their RFC 4787 behaviour.

| preset | mapping (RFC 4787 §4.1) | filtering (§5) |
|---|---|---|
| ``none`` | no NAT: the host sits on the public segment | none |
| ``full-cone`` | endpoint-independent, port preserved | endpoint-independent |
| ``port-restricted`` | endpoint-independent, port preserved where free | address-and-port-dependent |
| ``symmetric`` | endpoint-dependent, random port per destination | address-and-port-dependent |
| ``symmetric-sequential`` | endpoint-dependent, the next port per new mapping | address-and-port-dependent |
| ``masquerade-only`` | like port-restricted, *without* the unsolicited-inbound drop | (conntrack pitfall demo) |

Every router runs one table, ``ip netlab``, made of a common part and a preset part.

Common part, all presets:
- ``raw_prerouting`` (priority raw, before conntrack): ``block_udp_from`` drops here, so a
  blocked packet never creates a conntrack entry.
- ``input``: from the WAN only ``ct state established,related`` is accepted; everything else is
  counted in ``unsolicited`` and dropped. This is the rule a stock Linux box lacks: without it an
  unsolicited packet to the router's address is *confirmed* as a conntrack entry (it reaches the
  local input path, is answered with ICMP port unreachable), its tuple then blocks the port the
  host's later outbound packet to that sender would have been mapped to, and masquerade picks
  another port — exactly when hole punching sends the peer's first packet. A drop in a filter
  chain happens before conntrack confirmation, so the half-made entry dies with the packet.
- ``cut`` (forward, priority -10): ``drop_flow`` drops a host port / remote address / remote
  endpoint in both directions here. Conntrack has already seen these packets, so attempts keep
  the mapping alive: it models the path failing beyond the NAT, not the NAT forgetting.
- ``forward`` (policy drop): accepts ``established,related``, new flows from LAN to WAN, and for
  full-cone the DNAT-ed unsolicited inbound; anything else from the WAN is counted in
  ``unsolicited``.

IPv6 on a dual-stack site (``Lab.site(..., ipv6=True)``) is routed, not translated: the router
loads ``FIREWALL6`` as a second table, ``ip6 netlab6``, beside the NAT preset's. It is the
"simple security" of home routers (RFC 6092): from the LAN anything goes out; from the WAN
only ``ct state established,related`` comes in (replies to what the host sent, ICMPv6 errors
about it); anything else from the WAN is counted in ``unsolicited`` and dropped, before
conntrack confirms it. Filtering is address-and-port-dependent, like port-restricted: a host
that sends to a peer's address and port opens the pinhole for the peer's packets from that
address and port, so two firewalled hosts that send to each other at the same time get through
(hole punching without NAT). The router itself accepts neighbour discovery from the WAN (no
IPv6 works without it) and drops other unsolicited input.

Preset part:
- port-restricted: ``oifname "wan" masquerade`` — Linux keeps the source port when the resulting
  tuple is free, the same external port for every destination.
- symmetric: ``oifname "wan" masquerade fully-random`` — a fresh random port per conntrack
  entry, so per destination.
- symmetric-sequential: ``oifname "wan" meta l4proto udp snat to WAN:numgen inc mod 1024 map
  { 0 : 40000, 1 : 40001, ... }`` — a counter: every new UDP conntrack entry (so every new
  destination) takes the next external port from 40000 on, step 1, wrapping after 1024. The map
  is needed: ``numgen ... offset`` yields a host-order number that nat reads as a port in
  network order (step 256 on x86). Plain ``masquerade`` or
  ``snat`` to a port range does not do it on Linux: the mapping is chosen once (the source port
  if free and in range, else a search from a random offset, nf_nat_l4proto_unique_tuple) and
  kept for every destination whose tuple is unique, so a probe of ``masquerade to
  :20000-20999`` saw one port for four destinations: endpoint-independent, not symmetric. The nat chain sees only a
  flow's first packet, so the counter moves once per mapping. Other protocols are masqueraded.
- full-cone: ``oifname "wan" snat to WAN persistent`` (port preserved), a dynamic set ``mapped``
  of external ports refreshed by every outbound packet (postrouting, after NAT, timeout = the
  mapping lifetime, ``set_udp_timeout`` changes it), and ``iifname "wan" udp dport @mapped dnat
  to HOST`` in prerouting: once a host port has been used outbound, anyone may send to
  WAN:port and it reaches HOST:port (the port is the same since it is preserved). An unused port
  stays closed, as on a real full-cone NAT; ``flush_conntrack`` empties ``mapped`` too.
"""

PRESETS = ("none", "full-cone", "port-restricted", "symmetric", "masquerade-only",
           "symmetric-sequential")
NAT_PRESETS = PRESETS[1:]
DEFAULT_MAPPING_TIMEOUT = 120  # seconds, Linux's default nf_conntrack_udp_timeout_stream

COUNTERS = ("unsolicited", "blocked", "cut")

_COMMON = """
table ip netlab {
    counter unsolicited { }
    counter blocked { }
    counter cut { }
    set blocked_hosts { type ipv4_addr; }
    set blocked_endpoints { type ipv4_addr . inet_service; }
    set cut_ports { type inet_service; }
    set cut_hosts { type ipv4_addr; }
    set cut_endpoints { type ipv4_addr . inet_service; }

    chain raw_prerouting {
        type filter hook prerouting priority raw; policy accept;
        iifname "wan" meta l4proto udp ip saddr @blocked_hosts counter name "blocked" drop
        iifname "wan" ip saddr . udp sport @blocked_endpoints counter name "blocked" drop
    }
    chain cut {
        type filter hook forward priority -10; policy accept;
        iifname "lan" udp sport @cut_ports counter name "cut" drop
        iifname "wan" udp dport @cut_ports counter name "cut" drop
        iifname "lan" ip daddr @cut_hosts counter name "cut" drop
        iifname "wan" ip saddr @cut_hosts counter name "cut" drop
        iifname "lan" ip daddr . udp dport @cut_endpoints counter name "cut" drop
        iifname "wan" ip saddr . udp sport @cut_endpoints counter name "cut" drop
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
%(forward_extra)s        iifname "wan" counter name "unsolicited" drop
    }
%(input)s%(preset)s}
"""

_INPUT_FILTER = """    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" counter name "unsolicited" drop
    }
"""

_MASQUERADE = """    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade%(flags)s
    }
"""

_FULL_CONE = """    set mapped { type inet_service; flags dynamic,timeout; timeout %(timeout)ds; }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" udp dport @mapped dnat to %(host_ip)s
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" snat to %(wan_ip)s persistent
    }
    chain mapping {
        type filter hook postrouting priority srcnat + 10; policy accept;
%(mapping_rule)s    }
"""


SEQUENTIAL_BASE, SEQUENTIAL_SPAN = 40000, 1024  # symmetric-sequential's external ports

_SEQUENTIAL = """    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" meta l4proto udp snat to %(wan_ip)s:numgen inc mod %(span)d map %(ports)s
        oifname "wan" masquerade
    }
"""


def mapping_rule(timeout):
    """The full-cone rule that (re)starts an external port's mapping lifetime, after SNAT."""
    return ('        oifname "wan" meta l4proto udp '
            f'update @mapped {{ udp sport timeout {int(timeout)}s }}\n')


def ruleset(preset, *, wan_ip, host_ip, mapping_timeout=DEFAULT_MAPPING_TIMEOUT):
    """The nft script for a router running `preset` (one of NAT_PRESETS)."""
    if preset not in NAT_PRESETS:
        raise ValueError(f"unknown NAT preset {preset!r}; choose one of {', '.join(PRESETS)}")
    forward_extra = ""
    if preset == "full-cone":
        forward_extra = '        iifname "wan" oifname "lan" ct status dnat accept\n'
        body = _FULL_CONE % {"timeout": mapping_timeout, "host_ip": host_ip, "wan_ip": wan_ip,
                             "mapping_rule": mapping_rule(mapping_timeout)}
    elif preset == "symmetric":
        body = _MASQUERADE % {"flags": " fully-random"}
    elif preset == "symmetric-sequential":
        ports = "{ " + ", ".join(f"{i} : {SEQUENTIAL_BASE + i}"
                                 for i in range(SEQUENTIAL_SPAN)) + " }"
        body = _SEQUENTIAL % {"wan_ip": wan_ip, "span": SEQUENTIAL_SPAN, "ports": ports}
    else:
        body = _MASQUERADE % {"flags": ""}
    input_chain = "" if preset == "masquerade-only" else _INPUT_FILTER
    return _COMMON % {"forward_extra": forward_extra, "input": input_chain, "preset": body}


FIREWALL6_COUNTERS = ("unsolicited",)

# RFC 6092 §3.2 (simple security): outbound and its replies pass, unsolicited inbound does not.
FIREWALL6 = """
table ip6 netlab6 {
    counter unsolicited { }

    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
        iifname "wan" counter name "unsolicited" drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
        iifname "wan" counter name "unsolicited" drop
    }
}
"""
