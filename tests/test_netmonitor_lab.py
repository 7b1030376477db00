"""The network monitor against a real kernel: a namespace of the NAT lab loses its uplink's
address and default route, and the monitor hands the node one change that says so."""

import asyncio

from netlab import _ns
from netlab import lab  # noqa: F401 - the fixture

from mahole.netmonitor import NetworkMonitor


def test_the_monitor_sees_an_uplink_go_and_the_backup_route_take_over(lab):
    host = lab.host("port-restricted", name="phone")
    backup = lab.add_uplink(host, "port-restricted")
    backup_ip = host.uplinks[0][1]

    async def main():
        changes = []
        seen = asyncio.Event()
        monitor = NetworkMonitor(lambda change: (changes.append(change), seen.set()))
        with _ns.entered(host.ns):
            assert monitor.start(), monitor.state
        try:
            # The backup link's carrier comes up a moment after its address (linkwatch).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while monitor.status()["addresses"] != sorted([host.ip, backup_ip]):
                assert loop.time() < deadline, monitor.status()
                await asyncio.sleep(0.01)
            changes.clear()
            seen.clear()
            await asyncio.to_thread(host.leave_uplink)
            await asyncio.wait_for(seen.wait(), 5)
            return changes[0], monitor.status()
        finally:
            monitor.close()

    change, status = asyncio.run(main())
    assert "10.0.1.2" in change.gone and change.routes
    assert f"via {backup.lan_ip}" in change.reason
    assert status["monitor"] == "netlink" and status["addresses"] == [backup_ip]
    assert status["malformed"] == 0
