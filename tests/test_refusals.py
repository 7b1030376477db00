"""Who is refused, and the one line a person sees about it."""

import asyncio
import datetime
import logging
import os
import socket
import subprocess
import sys

import pytest
from aio_helpers import run, wait_for

from mahole import identity
from mahole.config import AgentConfig, Forward
from mahole.demo import LocalDeployment, issue_certificates
from mahole.roles import node as node_module
from mahole.roles.agent import Agent, SessionError
from mahole.roles.node import StartupError




@pytest.fixture
def certs(tmp_path):
    issue_certificates(tmp_path)
    rogue = tmp_path / "rogue"
    identity.init_ca(rogue)
    identity.issue(rogue, "agent", "mallory")
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    identity.issue(tmp_path, "agent", "old", days=1, not_before=long_ago)
    return tmp_path


def _agent_config(d, cert_dir, name, **kw):
    return AgentConfig(ca=os.path.join(d.dir, "ca.crt"), cert=str(cert_dir / f"{name}.crt"),
                       key=str(cert_dir / f"{name}.key"),
                       intermediate=d.intermediate.local_address[:2], bind=("127.0.0.1", 0),
                       connect_timeout=2, **kw)


@pytest.mark.parametrize("who, message", [
    ("rogue", "is not trusted by this deployment's CA"),
    ("old", "certificate expired on"),
    ("connector1", "is a certificate for a connector, but this is an agent"),
])
def test_a_node_with_a_bad_certificate_will_not_start(certs, who, message):
    async def main():
        async with LocalDeployment(str(certs)) as d:
            cert_dir = certs / "rogue" if who == "rogue" else certs
            name = "mallory" if who == "rogue" else who
            with pytest.raises(StartupError, match=message):
                Agent(_agent_config(d, cert_dir, name))
    run(main(), timeout=60)


@pytest.mark.parametrize("who, message", [
    ("rogue", "certificate of agent 'mallory' is not trusted"),
    ("old", "certificate expired on"),
    ("connector1", "registration claims agent"),
])
def test_the_intermediate_refuses_bad_certificates_itself(certs, monkeypatch, who, message):
    """Even a node that skips its own checks is refused by the intermediate, for good."""
    real = node_module.load_credentials

    def unchecked(cfg, role):
        return identity.load_identity(cfg.cert, cfg.key), identity.load_ca(cfg.ca)

    async def main():
        async with LocalDeployment(str(certs)) as d:
            monkeypatch.setattr(node_module, "load_credentials", unchecked)
            cert_dir = certs / "rogue" if who == "rogue" else certs
            name = "mallory" if who == "rogue" else who
            bad = Agent(_agent_config(d, cert_dir, name))
            if who == "connector1":
                bad.identity = type(bad.identity)(**{**bad.identity.__dict__, "role": "agent"})
            monkeypatch.setattr(node_module, "load_credentials", real)
            await bad.start()
            try:
                await wait_for(lambda: bad.control.last_error and message in bad.control.last_error)
                assert not bad.control.connected
                await wait_for(bad.failed.done)
                assert "the intermediate refused this node's certificate" in bad.failed.result()
                assert bad.control.attempts == 1
                refused = d.intermediate.counters
                assert refused["refused_unauthenticated"] + refused["refused_registration"] >= 1
                assert ("agent", name) not in d.intermediate.nodes
            finally:
                await bad.stop()
    run(main(), timeout=60)


@pytest.mark.parametrize("allow, service, message", [
    (("bob=*",), "echo", "agent 'alice' is not allowed to reach service 'echo'"),
    (("*=*",), "nope", "no connector offers service 'nope'"),
])
def test_denied_or_unknown_service(certs, caplog, allow, service, message):
    async def main():
        forward = Forward.parse(f"tcp:127.0.0.1:0={service}")
        async with LocalDeployment(str(certs), allow=allow, extra_forwards=(forward,)) as d:
            with pytest.raises(SessionError, match=message):
                await d.agent.session_for(service)
            # Through the forward: the local connection is closed, the reason is logged.
            with caplog.at_level(logging.WARNING, logger="mahole"):
                reader, writer = await asyncio.open_connection(*d.forward_address(forward))
                assert await reader.read() == b""
                writer.close()
            assert message in caplog.text
            assert not d.connector.sessions  # nothing reached the connector
            assert d.intermediate.status()["sessions"]["open"] == 0
    run(main(), timeout=60)


def _cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mahole", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_missing_certificate_is_one_clear_line(tmp_path):
    issue_certificates(tmp_path)
    run_ = _cli("agent", "--intermediate", "127.0.0.1:9", "--ca", str(tmp_path / "ca.crt"),
                "--cert", str(tmp_path / "nobody.crt"), "--key", str(tmp_path / "nobody.key"),
                "--forward", "tcp:127.0.0.1:0=web")
    assert run_.returncode == 2
    assert run_.stderr.strip().splitlines()[-1] == (
        f"mahole agent: error: certificate file not found: {tmp_path / 'nobody.crt'}")
    assert "Traceback" not in run_.stderr


def test_cli_port_in_use_is_one_clear_line(tmp_path):
    issue_certificates(tmp_path)
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        run_ = _cli("intermediate", "--listen", f"127.0.0.1:{port}",
                    "--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / "intermediate.crt"),
                    "--key", str(tmp_path / "intermediate.key"))
    finally:
        busy.close()
    assert run_.returncode == 2
    assert f"mahole intermediate: error: cannot bind UDP 127.0.0.1:{port}: " in run_.stderr
    assert "Traceback" not in run_.stderr


def test_cli_bad_flag_values(tmp_path):
    run_ = _cli("agent", "--intermediate", "nowhere:", "--cert", "x", "--key", "y",
                "--forward", "tcp:127.0.0.1:0=web")
    assert run_.returncode == 2 and "expected HOST:PORT, got 'nowhere:'" in run_.stderr
    run_ = _cli("connector", "--intermediate", "127.0.0.1:1", "--cert", "x", "--key", "y",
                "--service", "web=http://x")
    assert run_.returncode == 2 and "expected tcp:HOST:PORT or udp:HOST:PORT, got 'http://x'" in run_.stderr


def _node_config(certs, intermediate, **kw):
    return AgentConfig(ca=str(certs / "ca.crt"), cert=str(certs / "alice.crt"),
                       key=str(certs / "alice.key"), intermediate=intermediate,
                       bind=("127.0.0.1", 0), connect_timeout=1, reconnect_min=0.05,
                       reconnect_max=0.1, **kw)


@pytest.mark.parametrize("change, message", [
    ({"intermediate_name": "relay1"},
     "the intermediate's certificate names intermediate, 127.0.0.1, not relay1: "
     "pass --intermediate-name intermediate"),
    ({"ca": "rogue/ca.crt", "cert": "rogue/mallory.crt", "key": "rogue/mallory.key"},
     "the intermediate's certificate is not trusted by --ca"),
])
def test_permanent_errors_stop_the_node_without_retrying(certs, change, message):
    """A wrong name or another deployment's CA is not retried: the node stops with one
    sentence that says what to do."""
    async def main():
        async with LocalDeployment(str(certs)) as d:
            cfg = _node_config(certs, d.intermediate.local_address[:2])
            for key, value in change.items():
                setattr(cfg, key, str(certs / value) if key in ("ca", "cert", "key") else value)
            node = Agent(cfg)
            await node.start()
            try:
                with pytest.raises(node_module.PermanentError) as refused:
                    await node.wait_registered(5)
                assert message in str(refused.value)
                assert node.control.attempts == 1
                assert "closed by the intermediate" not in str(refused.value)
            finally:
                await node.stop()
    run(main(), timeout=60)


def test_no_answer_is_transient_and_said_so(certs):
    """Nobody at the address: retried with backoff, and the reason is ours, not a close by
    the intermediate."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # holds the port; never answers

        async def main():
            node = Agent(_node_config(certs, silent.getsockname()))
            await node.start()
            try:
                await wait_for(lambda: node.control.attempts >= 2, timeout=10)
                assert not node.failed.done()
                assert node.control.last_error == "no answer within 1 s"
            finally:
                await node.stop()
        run(main(), timeout=60)


@pytest.mark.parametrize("code, frame_type, permanent", [
    (0x100, None, False),  # ERROR_SHUTDOWN: the intermediate stopping or replacing us
    (0x101, None, True),  # ERROR_UNAUTHENTICATED: our certificate was refused
    (0x104, None, True),  # ERROR_CONFLICT: another live copy holds this identity
    (0x105, None, True),  # ERROR_DENIED: the policy refuses what we register
    (0x103, None, False),  # ERROR_RATE_LIMITED: later may work
    (0x102, None, False),  # ERROR_PROTOCOL_ERROR
    (0x100 + 42, 0x06, True),  # transport CRYPTO_ERROR (bad_certificate) from its TLS
    (0x0A, 0x06, False),  # a transport PROTOCOL_VIOLATION: retry
])
def test_only_refusals_of_our_identity_are_permanent(certs, code, frame_type, permanent):
    """Application and transport close codes share numbers (0x100 is both ERROR_SHUTDOWN
    and the first CRYPTO_ERROR): the frame type tells them apart."""
    from aioquic.quic.events import ConnectionTerminated

    class Quic:
        local_close = None

    async def main():
        node = Agent(_node_config(certs, ("127.0.0.1", 9)))
        client = node_module.ControlClient(node)
        client._terminated(Quic(), ConnectionTerminated(error_code=code, frame_type=frame_type,
                                                        reason_phrase="why"))
        assert (client.permanent_error is not None) == permanent
        assert "why" in client._attempt_error
    run(main())
