"""`mahole status` and `mahole ping` against real in-process roles, through the local control
socket every role opens (mahole.local_control)."""

import asyncio
import json
import os
import re
import socket
import stat

import pytest

from aio_helpers import run, wait_for
from mahole import local_control, status_cli
from mahole.demo import LocalDeployment, tcp_round_trip


@pytest.fixture(autouse=True)
def control_dir(tmp_path, monkeypatch):
    """Each test's nodes put their sockets in a directory of its own."""
    directory = tmp_path / "control"
    monkeypatch.setenv("MAHOLE_CONTROL_DIR", str(directory))
    return directory


async def cli(*argv):
    """status_cli.main(argv) as the command line runs it (its own event loop, in a thread)."""
    return await asyncio.to_thread(status_cli.main, list(argv))


async def direct(deployment):
    await tcp_round_trip(deployment.forward_address(deployment.tcp_forward), b"x" * 1000)
    await wait_for(lambda: all(s.route == "direct" for s in deployment.agent.sessions.values())
                   and deployment.agent.sessions, 10)


async def ask(path, message):
    return [reply async for reply in local_control.request(path, message, timeout=5)]


def test_every_role_opens_a_private_socket_removed_on_stop(control_dir, capfd):
    async def main():
        async with LocalDeployment() as d:
            names = sorted(p.name for p in control_dir.iterdir() if p.name.endswith(".sock"))
            assert names == ["agent-alice.sock", "connector-connector1.sock",
                             "intermediate-intermediate.sock"]
            for name in names:
                assert stat.S_IMODE(os.stat(control_dir / name).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(control_dir).st_mode) == 0o700
            assert d.agent.status()["control_socket"] == str(control_dir / "agent-alice.sock")
            tcp = d.forward_address(d.tcp_forward)
            udp = d.forward_address(d.udp_forward)
        assert not list(control_dir.iterdir())  # sockets and their locks gone
        return tcp, udp

    tcp, udp = run(main())
    err = capfd.readouterr().err
    assert f"tcp 127.0.0.1:{tcp[1]} \u2192 echo\n" in err
    assert f"udp 127.0.0.1:{udp[1]} \u2192 echo-udp\n" in err


def test_status_shows_the_intermediate_and_a_direct_session(capsys):
    async def main():
        async with LocalDeployment() as d:
            await direct(d)
            session = next(iter(d.agent.sessions.values()))
            capsys.readouterr()
            assert await cli("status", "alice") == 0
            out = capsys.readouterr().out
            observed = d.agent.status()["intermediate"]["observed_addr"]
            assert out.startswith(f"agent alice (pid {os.getpid()})\n")
            host, port = d.intermediate.local_address[:2]
            assert (f"intermediate {host}:{port}: connected, observed address {observed}, RTT "
                    in out)
            row = next(line for line in out.splitlines() if line.startswith("echo "))
            direct_addr = session.stats()["direct_addr"]
            assert re.match(rf"echo\s+{session.tag}\s+connector1\s+direct {direct_addr}\s+"
                            # RTT, each route's RTT, the MTU (found, searched, or unknown)
                            rf"\d+\.\d ms\s+\d+\.\d ms\s+\d+\.\d ms\s+(16383|\d{4,5}…|-)\s+"
                            rf"[\d.]+ KiB\s+[\d.]+ KiB\s+\d\d:\d\d:\d\d \(\d+s\)$",
                            row), row

            assert await cli("status", "--json", "connector1") == 0
            status = json.loads(capsys.readouterr().out)
            assert status["role"] == "connector" and status["name"] == "connector1"
            assert [(s["service"], s["path"]) for s in status["sessions"]] == [("echo", "direct")]

            assert await cli("status", "intermediate") == 0
            out = capsys.readouterr().out
            assert "1 agents, 1 connectors, 1 sessions" in out
            assert re.search(rf"echo\s+{session.tag}\s+alice\s+connector1\s+direct", out), out

    run(main())


def test_status_with_several_nodes_or_none_says_what_to_do(control_dir, capsys):
    async def main():
        assert await cli("status") == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (f"mahole status: error: no mahole node is running here (no live "
                                f"control socket in {control_dir}; --socket PATH names another)\n")
        async with LocalDeployment() as d:
            capsys.readouterr()  # the agent's forwards
            assert await cli("status") == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "3 nodes run here: agent-alice, " \
                "connector-connector1, intermediate-intermediate; choose one with NAME or " \
                "--socket PATH" in err
            assert await cli("status", "--socket", d.agent.control_server.path) == 0
            assert capsys.readouterr().out.startswith("agent alice ")
        assert await cli("status", "--socket", str(control_dir / "agent-alice.sock")) == 1
        assert "no node listens on" in capsys.readouterr().err

    run(main())


def test_ping_goes_direct_and_says_where(capsys):
    async def main():
        async with LocalDeployment() as d:
            await direct(d)
            capsys.readouterr()
            assert await cli("ping", "echo", "-c", "3", "-i", "0.05") == 0
            session = next(iter(d.agent.sessions.values()))
            lines = capsys.readouterr().out.splitlines()
            direct_addr = session.stats()["direct_addr"]
            assert len(lines) == 4
            for line in lines[:3]:
                assert re.fullmatch(rf"pong from echo \({session.tag}\) via direct "
                                    rf"{direct_addr} in \d+\.\d\d ms", line), line
            assert lines[3] == f"echo: direct via {direct_addr}"
            assert len(d.agent.sessions) == 1  # the session was reused

    run(main())


def test_ping_opens_a_session_on_the_relay(capsys):
    async def main():
        async with LocalDeployment(agent_kwargs={"relay_only": True}) as d:
            assert not d.agent.sessions
            capsys.readouterr()
            assert await cli("ping", "echo", "-c", "2", "-i", "0") == 0
            lines = capsys.readouterr().out.splitlines()
            host, port = d.intermediate.local_address[:2]
            assert all(re.fullmatch(rf"pong from echo \(\w+\) via relay {host}:{port} "
                                    rf"in \d+\.\d\d ms", line) for line in lines[:2]), lines
            assert lines[2:] == [f"echo: via relay {host}:{port}"]
            assert [s.route for s in d.agent.sessions.values()] == ["relay"]

    run(main())


def test_ping_errors_are_one_line(capsys):
    async def main():
        async with LocalDeployment(allow=("alice=echo",)) as d:
            capsys.readouterr()
            assert await cli("ping", "echo-udp", "-c", "1") == 1
            captured = capsys.readouterr()
            assert captured.out == ""
            assert captured.err.startswith("mahole ping: error: no session to echo-udp: ")
            assert captured.err.count("\n") == 1
            # ping needs an agent: the connector's socket does not know it
            assert await cli("ping", "echo", "--socket", d.connector.control_server.path) == 1
            assert "a connector knows no command 'ping'" in capsys.readouterr().err

    run(main())


def test_a_second_copy_does_not_take_the_first_ones_socket(control_dir):
    async def main():
        async with LocalDeployment() as d:
            first = d.agent.control_server.path
            second = local_control.ControlServer("agent", "alice", lambda: {"copy": 2})
            await second.start()
            try:
                assert second.path == str(control_dir / f"agent-alice.{os.getpid()}.sock")
                (reply,) = await ask(first, {"cmd": "status"})
                assert reply["status"]["control_socket"] == first
                (reply,) = await ask(second.path, {"cmd": "status"})
                assert reply == {"ok": True, "status": {"copy": 2}}
                assert sorted(local_control.list_sockets()) == sorted(
                    [first, second.path, d.connector.control_server.path,
                     d.intermediate.control_server.path])
            finally:
                await second.close()
            (reply,) = await ask(first, {"cmd": "status"})  # the first one still answers
            assert reply["status"]["name"] == "alice"

    run(main())


def test_a_leftover_socket_of_a_killed_node_is_replaced(control_dir):
    control_dir.mkdir(mode=0o700)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(control_dir / "agent-alice.sock"))
    leftover.close()  # the file stays, as after kill -9

    async def main():
        assert local_control.list_sockets() == []  # a dead socket is not a node
        async with LocalDeployment() as d:
            assert d.agent.control_server.path == str(control_dir / "agent-alice.sock")
            (reply,) = await ask(d.agent.control_server.path, {"cmd": "status"})
            assert reply["status"]["role"] == "agent"

    run(main())


def test_a_hostile_local_client_gets_an_error_and_the_node_serves_on(monkeypatch):
    monkeypatch.setattr(local_control, "READ_TIMEOUT", 0.2)

    async def raw(path, data, close=False):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(data)
        if close:
            writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return json.loads(reply)

    async def main():
        async with LocalDeployment() as d:
            path = d.agent.control_server.path
            huge = await raw(path, b'{"cmd": "status", "x": "' + b"a" * 100_000)
            assert huge == {"ok": False, "error": "request longer than 4096 bytes"}
            slow = await raw(path, b'{"cmd": "sta')  # never ends its line
            assert slow == {"ok": False, "error": "no request within 0.2 s"}
            garbage = await raw(path, b"\xff\xfe\n")
            assert garbage["ok"] is False and garbage["error"].startswith("request is not JSON")
            assert (await raw(path, b"[1]\n"))["error"] == \
                'request must be a JSON object with a "cmd" string'
            bad = await raw(path, b'{"cmd": "ping", "service": "echo", "count": 10000}\n')
            assert bad == {"ok": False, "error": "count must be a whole number from 1 to 1000"}
            (reply,) = await ask(path, {"cmd": "status"})
            assert reply["ok"] and reply["status"]["name"] == "alice"
            assert d.agent.control_server.counters["bad_requests"] == 4

    run(main())


def test_control_socket_config_off_or_elsewhere(tmp_path):
    from types import SimpleNamespace

    async def main():
        assert await local_control.open_for("agent", "a", dict, cfg=SimpleNamespace(
            control_socket="")) is None
        path = str(tmp_path / "elsewhere.sock")
        server = await local_control.open_for("agent", "a", lambda: {"here": 1},
                                              cfg=SimpleNamespace(control_socket=path))
        try:
            assert server.path == path
            assert await ask(path, {"cmd": "status"}) == [{"ok": True, "status": {"here": 1}}]
        finally:
            await server.close()
        assert not os.path.exists(path)

    run(main())


def test_parse_request_raises_value_error_only():
    assert local_control.parse_request(b'{"cmd": "status"}\n') == {"cmd": "status"}
    for bad in (b"", b"null", b'{"cmd": 1}', b"\x80", b"{" * 5000, b'"status"'):
        with pytest.raises(ValueError):
            local_control.parse_request(bad)


def test_status_and_ping_processes_next_to_role_processes(tmp_path, control_dir, monkeypatch):
    """As a user runs it: role processes, then `status` and `ping` as processes; after
    kill -9 of the agent, its leftover socket is not taken for a node."""
    import signal
    import subprocess
    import sys

    from labroles import ECHO_SERVER, wait
    from mahole.demo import issue_certificates
    from test_processes import Processes, free_port

    issue_certificates(tmp_path)
    creds = lambda n: ["--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / f"{n}.crt"),
                       "--key", str(tmp_path / f"{n}.key")]
    procs = Processes(tmp_path)
    try:
        echo_port = free_port()
        procs.procs.append(subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)],
                                            start_new_session=True))
        relay_port = free_port(socket.SOCK_DGRAM)
        node = ["--intermediate", f"127.0.0.1:{relay_port}", "--bind", "127.0.0.1:0"]
        procs.start("intermediate", "--listen", f"127.0.0.1:{relay_port}", "--allow",
                    "alice=*", *creds("intermediate"), name="intermediate")
        procs.start("connector", *node, "--service", f"echo=tcp:127.0.0.1:{echo_port}",
                    *creds("connector1"), name="connector")
        forward_port = free_port()
        agent = procs.start("agent", *node, "--forward", f"tcp:127.0.0.1:{forward_port}=echo",
                            *creds("alice"), name="agent")

        def mahole(*argv):
            return subprocess.run([sys.executable, "-m", "mahole.status_cli", *argv],
                                  capture_output=True, text=True, timeout=60)

        wait(lambda: "connected, observed" in mahole("status", "alice").stdout, 20,
             "the agent registered")
        wait(lambda: "connected, observed" in mahole("status", "connector1").stdout, 20,
             "the connector registered")
        ping = mahole("ping", "echo", "-c", "3", "-i", "0.2")
        assert ping.returncode == 0, ping.stderr
        lines = ping.stdout.splitlines()
        assert len(lines) == 4 and all(line.startswith("pong from echo (") for line in lines[:3])
        assert re.fullmatch(r"echo: (direct via 127\.0\.0\.1:\d+|via relay 127\.0\.0\.1:\d+)",
                            lines[3]), lines
        out = mahole("status", "alice").stdout
        assert re.search(r"^echo\s+\w{8}\s+connector1\s+(direct|relay)", out, re.M), out
        assert f"forward tcp:127.0.0.1:{forward_port} \u2192 echo" in out
        assert f"tcp 127.0.0.1:{forward_port} \u2192 echo" in agent.log_path.read_text()

        procs.stop(agent, signal.SIGKILL)
        assert (control_dir / "agent-alice.sock").exists()  # a leftover, as after any crash
        gone = mahole("status", "alice")
        assert gone.returncode == 1 and gone.stdout == ""
        assert gone.stderr.startswith("mahole status: error: no mahole node named alice is "
                                      "running here")
        assert "Traceback" not in gone.stderr
        several = mahole("status")
        assert several.returncode == 1
        assert "2 nodes run here: connector-connector1, intermediate-intermediate" in \
            several.stderr
    finally:
        procs.close()


def test_the_commands_plug_into_python_m_mahole(monkeypatch, capsys):
    """cli.COMMANDS takes status_cli.add_parser: `mahole status`/`mahole ping` parse and run."""
    from mahole import cli

    if status_cli.add_parser not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, status_cli.add_parser])

    async def main():
        async with LocalDeployment():
            capsys.readouterr()
            code = await asyncio.to_thread(cli.main, ["status", "--json", "alice"])
            assert code == 0
            assert json.loads(capsys.readouterr().out)["name"] == "alice"
            code = await asyncio.to_thread(cli.main, ["ping", "echo", "-c", "1"])
            assert code == 0
            assert capsys.readouterr().out.startswith("pong from echo (")

    run(main())
    with pytest.raises(SystemExit):
        cli.main(["ping", "echo", "-c", "0"])
    assert "must be from 1 to 1000: '0'" in capsys.readouterr().err


def test_status_looks_in_every_standard_place(tmp_path, monkeypatch):
    monkeypatch.delenv("MAHOLE_CONTROL_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    dirs = local_control.search_dirs()
    assert dirs[0] == str(tmp_path / "mahole") and "/run/mahole" in dirs
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/mahole")  # systemd RuntimeDirectory=mahole
    assert local_control.control_dir() == "/run/mahole"
    assert local_control.search_dirs()[:2] == ["/run/mahole", str(tmp_path / "mahole")]


def test_an_unusable_default_directory_costs_only_the_socket(control_dir, caplog):
    control_dir.mkdir(mode=0o700)
    os.chmod(control_dir, 0o777)  # anyone could plant a socket here: not used

    async def main():
        async with LocalDeployment() as d:
            assert d.agent.control_server is None and d.agent.status()["control_socket"] is None
            data = os.urandom(10000)
            assert await tcp_round_trip(d.forward_address(d.tcp_forward), data) == data

    with caplog.at_level("WARNING", logger="mahole.roles.node"):
        run(main())
    assert (f"no control socket (mahole status and ping will not find this agent): "
            f"{control_dir} is writable by others (chmod 0700 it)") in caplog.text
    assert not list(control_dir.iterdir())


@pytest.mark.parametrize("keepalive, text", [
    ({"direct_s": 1.0, "measuring": False, "binding_lifetime": None},
     "keepalive of idle direct routes 1 s"),
    ({"direct_s": 1.0, "measuring": True, "binding_lifetime": None},
     "keepalive of idle direct routes 1 s (measuring the binding lifetime)"),
    ({"direct_s": 2.333, "measuring": True,
      "binding_lifetime": {"at_least_s": 7.0, "below_s": None, "supported": True}},
     "keepalive of idle direct routes 2.333 s (binding lifetime 7 s or more, measuring)"),
    ({"direct_s": 2.333, "measuring": False,
      "binding_lifetime": {"at_least_s": 7.0, "below_s": 12.0, "supported": True}},
     "keepalive of idle direct routes 2.333 s (binding lifetime 7 s to 12 s)")])
def test_status_says_the_keepalive_in_use_and_the_lifetime_it_comes_from(keepalive, text):
    from mahole.status_cli import format_status
    out = format_status({"role": "agent", "name": "alice", "pid": 1, "keepalive": keepalive,
                         "intermediate": {"addr": "203.0.113.7:4478", "connected": False}})
    assert f"\n{text}\n" in out + "\n", out


def test_status_says_why_the_last_session_failed():
    from mahole.status_cli import format_status
    failed = {"service": "web", "code": "TIMEOUT", "age_s": 12.0,
              "error": "no session to service 'web': connector 'office' at intermediate "
                       "'relay2' did not confirm the session within 3.0 s (3 tries through "
                       "the fleet's store)"}
    out = format_status({"role": "agent", "name": "alice", "pid": 1,
                         "intermediate": {"addr": "203.0.113.7:4478", "connected": True},
                         "last_session_error": failed}, now=1000.0)
    [line] = [line for line in out.splitlines() if line.startswith("last failed session")]
    assert line.startswith("last failed session to web, ") and "(12s)" in line
    assert line.endswith("did not confirm the session within 3.0 s (3 tries through the "
                         "fleet's store) [TIMEOUT]")
