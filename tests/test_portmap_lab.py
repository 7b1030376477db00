"""Port mapping behind real routers: miniupnpd (PCP, NAT-PMP) in front of symmetric NATs.

Symmetric × symmetric stays on the relay without help (tests/test_nat_matrix.py): each NAT
shows the peer another port than the intermediate saw. With miniupnpd on both routers
(netlab/upnpd.py) each node gets a mapped port from its router and offers it as a candidate,
and the session goes direct through it; with --no-port-mapping it stays on the relay; a node
that exits deletes its mapping from the router's table.
"""

import os
import shutil
import signal
import time

import pytest

from labroles import Deployment, wait
from netlab import lab, upnpd  # noqa: F401 - the fixture

MAPPING = {"port_mapping": True}


@pytest.fixture(autouse=True)
def _miniupnpd():
    if shutil.which("miniupnpd") is None:
        if os.environ.get("MAHOLE_REQUIRE_NETLAB") == "1":
            pytest.fail("MAHOLE_REQUIRE_NETLAB=1 but miniupnpd is not installed "
                        "(apt-get install miniupnpd-nftables)", pytrace=False)
        pytest.skip("miniupnpd is not installed (apt-get install miniupnpd-nftables)")


def _mapping(d, proc):
    return wait(lambda: ((d.status(proc) or {}).get("port_mapping") or {}).get("state")
                == "mapped" and d.status(proc)["port_mapping"], 15,
                f"{proc.log_path.stem}'s port mapping", d)


def test_symmetric_nats_with_port_mapping_go_direct_through_the_mapped_port(lab, tmp_path):
    d = Deployment(lab, tmp_path, "symmetric", "symmetric", agent_site=MAPPING,
                   connector_site=MAPPING)
    d.wait_registered()
    agent_map, conn_map = _mapping(d, d.agent), _mapping(d, d.connector)
    assert agent_map["protocol"] == "pcp" and conn_map["protocol"] == "pcp"
    assert agent_map["external_addr"].startswith(d.agent_host.router.wan_ip + ":")
    assert conn_map["external_addr"].startswith(d.connector_host.router.wan_ip + ":")
    assert len(upnpd.mappings(d.connector_host.router)) == 1
    data = os.urandom(512 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   15, "hole punching to finish", d)
    assert session["path"] == "direct", f"{session['punch']}\n{d.logs()}"
    assert d.round_trip(data) == data, d.logs()  # byte-identical on the direct path
    # The path is one of the mappings: the agent sends to the connector's mapped port, or
    # the connector answers the agent's (the other's NAT port is a reply to that).
    conn_session = (d.status(d.connector) or {}).get("sessions", [{}])[0]
    assert (d.session()["direct_addr"] == conn_map["external_addr"]
            or conn_session.get("direct_addr") == agent_map["external_addr"]), d.logs()
    # A node that exits deletes its mapping (lifetime 0) from the router's table.
    d.connector.send_signal(signal.SIGTERM)
    d.connector.wait(10)
    wait(lambda: not upnpd.mappings(d.connector_host.router), 5,
         "the connector's mapping to be deleted", d)
    assert upnpd.mappings(d.agent_host.router)  # the agent's is still there


def test_with_no_port_mapping_symmetric_nats_stay_on_the_relay(lab, tmp_path):
    d = Deployment(lab, tmp_path, "symmetric", "symmetric", agent_site=MAPPING,
                   connector_site=MAPPING, agent_args=["--no-port-mapping"],
                   connector_args=["--no-port-mapping"])
    d.wait_registered()
    data = os.urandom(256 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   15, "hole punching to finish", d)
    assert session["path"] == "relay", d.logs()
    assert d.status(d.agent)["port_mapping"] == {"state": "off",
                                                 "reason": "turned off (--no-port-mapping)"}
    assert not upnpd.mappings(d.agent_host.router)
    assert not upnpd.mappings(d.connector_host.router)


def test_a_upnp_only_router_maps_through_upnp_igd_and_the_session_goes_direct(lab, tmp_path):
    """Routers that speak UPnP-IGD only (PCP and NAT-PMP off): nodes map through miniupnpc
    (SSDP, then AddPortMapping) and symmetric × symmetric goes direct; exit deletes."""
    pytest.importorskip("miniupnpc", reason="UPnP needs miniupnpc (pip install mahole[upnp])")
    upnp = {"port_mapping": "upnp"}
    d = Deployment(lab, tmp_path, "symmetric", "symmetric", agent_site=upnp,
                   connector_site=upnp)
    d.wait_registered()
    conn_map = _mapping(d, d.connector)
    assert conn_map["protocol"] == "upnp", conn_map
    assert conn_map["external_addr"].startswith(d.connector_host.router.wan_ip + ":")
    assert _mapping(d, d.agent)["protocol"] == "upnp"
    data = os.urandom(256 << 10)
    assert d.round_trip(data) == data, d.logs()
    session = wait(lambda: (s := d.session()) and s["punch"] and s["punch"]["path"] and s,
                   15, "hole punching to finish", d)
    assert session["path"] == "direct", f"{session['punch']}\n{d.logs()}"
    assert d.round_trip(data) == data, d.logs()
    d.connector.send_signal(signal.SIGTERM)
    d.connector.wait(10)
    wait(lambda: not upnpd.mappings(d.connector_host.router), 5,
         "the connector's upnp mapping to be deleted", d)


def test_a_node_stopped_while_upnp_discovery_waits_exits_at_once(lab, tmp_path):
    """Behind a router that answers no port-mapping protocol, SSDP discovery waits its 2 s
    (and miniupnpc cannot be interrupted): a node stopped meanwhile exits at once anyway,
    not when discovery gives up."""
    pytest.importorskip("miniupnpc", reason="UPnP needs miniupnpc (pip install mahole[upnp])")
    d = Deployment(lab, tmp_path, "symmetric", "port-restricted")
    d.wait_registered()
    upnp = ((d.status(d.connector) or {}).get("port_mapping") or {}).get("upnp") or {}
    if upnp.get("state") != "discovering":
        pytest.skip(f"discovery ended before the node registered: {upnp}")
    d.connector.send_signal(signal.SIGTERM)
    start = time.monotonic()
    d.connector.wait(10)
    took = time.monotonic() - start
    assert took < 1.0, f"exit took {took:.2f} s\n{d.logs()}"
