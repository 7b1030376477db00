"""A dual-stack intermediate (`--listen [::]:PORT`) reports IPv4 clients as IPv4 —
in what it tells nodes, its logs and /status — and its logs and /status name sessions by a
short hash, never by the id that keys their relay frames."""

import json
import logging
import socket

import pytest
from aio_helpers import run, wait_for
from edge_helpers import Attacker, Echoer, LoneIntermediate, Nodes, exchange

from mahole.demo import issue_certificates
from mahole.signaling import session_tag
from mahole.wire import stun


def _dual_stack_available():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _dual_stack_available(), reason="no dual-stack sockets")


def test_ipv4_clients_of_a_dual_stack_listener_are_ipv4_and_sessions_are_tagged(
        tmp_path, caplog):
    issue_certificates(tmp_path)

    async def main():
        async with LoneIntermediate(tmp_path, host="::") as inter:
            assert inter.local_address[0] == "::"
            port = inter.local_address[1]
            with caplog.at_level(logging.DEBUG, logger="mahole"):
                async with Nodes(tmp_path, ("127.0.0.1", port)) as nodes:
                    echo = await Echoer(nodes.forward_address(nodes.forward)).start()
                    try:
                        await wait_for(lambda: echo.echoes >= 20 or echo.failures, 10)
                    finally:
                        await echo.stop()
                    assert not echo.failures, echo.failures
                    agent_port = nodes.agent.endpoint.local_address[1]
                    # What the node is told (QAD) is its IPv4 address.
                    assert tuple(nodes.agent.control.observed_addr) == ("127.0.0.1", agent_port)
                    status = inter.status()
                    (session,) = inter.signaling.registry.sessions()
                    session_id = session.session_id.hex()
                    # STUN says the same.
                    client = await Attacker.open()
                    (reply,) = await exchange(client, stun.encode(stun.binding_request()),
                                              ("127.0.0.1", port), 1, 0.3)
                    client.close()
                    assert stun.decode(reply).attributes["XOR-MAPPED-ADDRESS"] \
                        == client.address
            text = json.dumps(status)
            assert "::ffff:" not in text
            assert status["listen"] == f"[::]:{port}"
            listed = {n["name"]: n["addr"] for n in status["nodes"]["list"]}
            assert listed["alice"] == f"127.0.0.1:{agent_port}"
            (listed_session,) = status["sessions"]["list"]
            assert listed_session["session"] == session_tag(session.session_id)
            assert listed_session["relay"]["member_a"] == ["127.0.0.1", agent_port]
            assert listed_session["relay"]["packets_a_to_b"] > 0
            assert session_id not in text
            logged = "\n".join(r.getMessage() for r in caplog.records
                               if r.name.startswith(("mahole.roles.intermediate",
                                                     "mahole.signaling")))
            assert "::ffff:" not in logged
            assert f"127.0.0.1:{agent_port}" in logged
            assert session_tag(session.session_id) in logged
            assert session_id not in logged
    run(main(), timeout=60)
