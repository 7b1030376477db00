"""`mahole netcheck` behind the lab's NAT presets (tests/netlab): each is classified as
nftables implements it (tests/netlab/nat.py): mapping, filtering and port allocation.

One lab: the intermediate on the public segment with a second address and a second STUN port
(--stun-alt-ip, --stun-alt-port), and one host per preset, all running netcheck at once; one
more symmetric site's router speaks NAT-PMP and PCP (miniupnpd), which netcheck reports, and
its NAT is still classified as the preset's."""

import json
import subprocess
import sys
import time

from mahole import identity
from netlab import PRESETS, lab  # noqa: F401 - the fixture

PORT, ALT_PORT = 4478, 3479
EI, AD, APD = "endpoint-independent", "address-dependent", "address-and-port-dependent"
# preset -> (behind a NAT, mapping, filtering, port allocation), from nat.py's rulesets.
EXPECTED = {
    "none": (False, EI, EI, "preserving"),
    # snat persistent + a DNAT set of used ports: anyone may send to a used port.
    "full-cone": (True, EI, EI, "preserving"),
    # masquerade: the source port kept, one mapping for every destination; conntrack lets
    # in only what answers a flow (address and port).
    "port-restricted": (True, EI, APD, "preserving"),
    # masquerade fully-random: a random port per conntrack entry, so per destination.
    "symmetric": (True, APD, APD, "random"),
    # snat to a counter of ports: the next port per conntrack entry.
    "symmetric-sequential": (True, APD, APD, "sequential"),
    # masquerade without the router's input filter: conntrack still lets in only replies.
    "masquerade-only": (True, EI, APD, "preserving"),
    # symmetric, its router running miniupnpd (port mapping does not change the NAT).
    "symmetric+pm": (True, APD, APD, "random"),
}
MAPPING = {"symmetric+pm"}  # the sites whose router maps ports


def _netcheck(host, relay):
    return host.popen([sys.executable, "-m", "mahole", "netcheck", "--intermediate", relay,
                       "--json", "--timeout", "1"], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)


def test_netcheck_classifies_every_nat_preset(lab, tmp_path):
    public = lab.public_host(name="inter")
    alt_ip = lab.add_public_ip(public)
    names = {"none": "pub1", "full-cone": "cone", "port-restricted": "prc", "symmetric": "sym",
             "symmetric-sequential": "seq", "masquerade-only": "masq", "symmetric+pm": "sympm"}
    # symmetric+pm's router also runs miniupnpd (NAT-PMP and PCP, netlab/upnpd.py).
    hosts = {site: lab.host(site.removesuffix("+pm"), name=names[site],
                            port_mapping=site in MAPPING)
             for site in EXPECTED}
    assert set(EXPECTED) >= set(PRESETS), "a lab preset netcheck is not run behind"
    identity.init_ca(tmp_path)
    identity.issue(tmp_path, "intermediate", "intermediate", hosts=[public.ip])
    log = open(tmp_path / "intermediate.log", "w")
    public.popen([sys.executable, "-m", "mahole", "intermediate", "--listen", f"0.0.0.0:{PORT}",
                  "--stun-alt-port", str(ALT_PORT), "--stun-alt-ip", alt_ip,
                  "--stun-rate", "100", "--allow", "*=*", "--control-socket", "",
                  "--ca", str(tmp_path / "ca.crt"),
                  "--cert", str(tmp_path / "intermediate.crt"),
                  "--key", str(tmp_path / "intermediate.key")], stdout=log,
                 stderr=subprocess.STDOUT)
    relay = f"{public.ip}:{PORT}"
    deadline = time.monotonic() + 20
    while True:  # the intermediate is up once the public host's netcheck is answered
        proc = _netcheck(hosts["none"], relay)
        out, err = proc.communicate(timeout=30)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert proc.returncode == 0, (err, (tmp_path / "intermediate.log").read_text())
    procs = {preset: _netcheck(host, relay) for preset, host in hosts.items()}
    seen, mapping, hairpin = {}, {}, {}
    for preset, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (preset, err)
        report = json.loads(out)
        seen[preset] = (report["nat"], report["mapping"], report["filtering"],
                        report["port_allocation"])
        assert report["udp"] and report["alternate_observer"]
        assert report["public_ipv4"] == hosts[preset].public_ip
        assert report["intermediates"][0]["rtt_ms"] > 0
        mapping[preset] = report["port_mapping"]
        hairpin[preset] = report["hairpinning"]
    print("netcheck verdicts per preset:", json.dumps(seen, indent=1))
    assert seen == EXPECTED
    # No preset loops a packet to its own WAN address back to the LAN (their DNAT, if any,
    # is for packets from the WAN); a public host reaches its own address.
    assert hairpin == {site: site == "none" for site in EXPECTED}
    # The router is asked, never the public segment: a public host has no default gateway.
    print("port mapping per preset:", json.dumps(mapping))
    assert mapping["none"] is None
    assert {site for site in EXPECTED if site != "none"
            and (mapping[site]["nat_pmp"] or mapping[site]["pcp"])} == MAPPING
    sym = hosts["symmetric+pm"]
    assert mapping["symmetric+pm"] == {"gateway": sym.router.lan_ip, "nat_pmp": True,
                                       "pcp": True, "external_ipv4": sym.public_ip}
