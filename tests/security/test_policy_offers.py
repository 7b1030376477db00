"""With the real roles on loopback: a rogue connector cannot take over a service.

A connector with a certificate of the deployment CA registered `web`, and after the real
connector reconnected an agent's next session went to the rogue and its data was read there.
Now the intermediate's `--offer CONNECTOR_GLOB=SERVICE_GLOB` rules say who may offer what; the
rogue's Register is refused (DENIED, named in the close reason) however often it tries.
"""

import asyncio
import contextlib
import os

from aio_helpers import run, wait_for

from mahole import identity, signaling
from mahole.config import ConnectorConfig, Service
from mahole.demo import LocalDeployment, tcp_round_trip
from mahole.roles import intermediate as intermediate_module
from mahole.roles.connector import Connector


def policy(monkeypatch, offers=None, **limits):
    """Have the intermediate's shell build its core with these `--offer` rules and limits
    (what `SignalingCore.from_config` reads from an `IntermediateConfig` with them)."""
    real = signaling.SignalingCore

    def configure(core):
        if offers is not None:
            core.offers = [signaling.OfferRule(rule) for rule in offers]
        if limits:
            core.limits = signaling.Limits(**limits)
        return core

    class Factory:
        def __call__(self, **kwargs):
            return configure(real(**kwargs))

        def from_config(self, cfg, **kwargs):
            return configure(real.from_config(cfg, **kwargs))

    monkeypatch.setattr(intermediate_module, "SignalingCore", Factory())


def connector(d, name, services):
    if not os.path.exists(os.path.join(d.dir, f"{name}.crt")):
        identity.issue(d.dir, "connector", name)
    return Connector(ConnectorConfig(
        services=tuple(Service.parse(s) for s in services),
        intermediate=d.intermediate.local_address[:2], bind=("127.0.0.1", 0),
        reconnect_min=0.05, reconnect_max=0.2, **d.creds(name)))


def refusal(node):
    failed = getattr(node, "failed", None)
    return " | ".join([node.control.last_error or "",
                       failed.result() if failed is not None and failed.done() else ""])


def test_a_rogue_connector_never_serves_an_agents_session(monkeypatch):
    policy(monkeypatch, offers=("connector1=*",))

    async def main():
        async with LocalDeployment() as d:
            inter = d.intermediate
            rogue = connector(d, "rogue", [f"echo=tcp:127.0.0.1:{d.tcp_echo_port}"])
            await rogue.start()
            try:
                text = ("connector 'rogue' is not allowed to offer service 'echo': no --offer "
                        "rule matches")
                await wait_for(lambda: text in refusal(rogue), 10)
                assert ("connector", "rogue") not in inter.nodes
                assert inter.counters["refused_offer"] >= 1
                data = b"for the office only" * 500
                addr = d.forward_address(d.tcp_forward)
                assert await tcp_round_trip(addr, data) == data
                # The real connector goes away and comes back; the rogue keeps trying.
                first = d.connector
                await first.stop()
                await wait_for(lambda: ("connector", "connector1") not in inter.nodes, 10)
                d.connector = connector(d, "connector1", [
                    f"echo=tcp:127.0.0.1:{d.tcp_echo_port}",
                    f"echo-udp=udp:127.0.0.1:{d.udp_echo_port}"])
                await d.connector.start()
                await d.connector.wait_registered(10)
                for session in list(d.agent.sessions.values()):
                    with contextlib.suppress(Exception):
                        session.close("reconnect")
                await wait_for(lambda: not d.agent.sessions, 10)
                assert await tcp_round_trip(addr, data) == data
                status = inter.status()
                assert {s["connector"] for s in status["sessions"]["list"]} == {"connector1"}
                assert ("connector", "rogue") not in inter.nodes
                assert not rogue.sessions  # no agent's session ever reached it
            finally:
                await rogue.stop()
            await asyncio.sleep(0)
    run(main(), timeout=90)

