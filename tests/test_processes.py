"""The roles as a user runs them: `python -m mahole ROLE …` processes on loopback."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from mahole.demo import issue_certificates, tcp_round_trip
from labroles import ECHO_SERVER, wait
from mahole.status import fetch
from ports import free_port  # noqa: F401 - other tests import it from here




class Processes:
    """Starts role processes in their own process groups and always ends them."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, *args, name, env=None):
        log = open(self.tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "mahole", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
        proc.log_path = self.tmp_path / f"{name}.log"
        self.procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def close(self):
        for proc in self.procs:
            self.stop(proc)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def status(port):
    async def get():
        code, _headers, body = await fetch("127.0.0.1", port, "/status")
        return json.loads(body) if code == 200 else None
    try:
        return asyncio.run(get())
    except (OSError, ValueError):
        return None


def test_three_processes_carry_a_tcp_forward_and_serve_status(tmp_path, processes):
    issue_certificates(tmp_path)
    creds = lambda n: ["--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / f"{n}.crt"),
                       "--key", str(tmp_path / f"{n}.key")]
    echo_port = free_port()
    echo_proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)],
                                 start_new_session=True)
    processes.procs.append(echo_proc)

    relay_port = free_port(socket.SOCK_DGRAM)
    s_inter, s_conn, s_agent, forward_port = (free_port() for _ in range(4))
    processes.start("intermediate", "--listen", f"127.0.0.1:{relay_port}", "--allow", "alice=*",
                    "--status", f"127.0.0.1:{s_inter}", *creds("intermediate"),
                    name="intermediate")
    processes.start("connector", "--intermediate", f"127.0.0.1:{relay_port}",
                    "--bind", "127.0.0.1:0", "--service", f"echo=tcp:127.0.0.1:{echo_port}",
                    "--status", f"127.0.0.1:{s_conn}", *creds("connector1"), name="connector")
    processes.start("agent", "--intermediate", f"127.0.0.1:{relay_port}",
                    "--bind", "127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{forward_port}=echo",
                    "--status", f"127.0.0.1:{s_agent}", *creds("alice"), name="agent")
    for port in (s_conn, s_agent):
        wait(lambda: (status(port) or {}).get("intermediate", {}).get("connected"), 20,
                   "registration")

    data = os.urandom(2 << 20)
    assert asyncio.run(tcp_round_trip(("127.0.0.1", forward_port), data)) == data

    agent = status(s_agent)
    assert agent["intermediate"]["connected"] is True
    assert agent["intermediate"]["observed_addr"].startswith("127.0.0.1:")
    [session] = agent["sessions"]
    # Both nodes on 127.0.0.1 (distinct ports): hole punching finds the direct path.
    assert session["service"] == "echo" and session["path"] == "direct"
    assert len(session["session"]) == 8 and session["rtt_ms"] > 0
    assert session["bytes_sent"] > len(data) and session["bytes_received"] > len(data)
    inter = status(s_inter)
    assert inter["nodes"]["agents"] == 1 and inter["nodes"]["connectors"] == 1
    assert inter["sessions"]["open"] == 1 and inter["punching"]["direct"] == 1

    async def metrics():
        return await fetch("127.0.0.1", s_inter, "/metrics")
    code, headers, body = asyncio.run(metrics())
    assert code == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "mahole_intermediate_relay_relayed_packets_total" in body.decode()




def test_agent_says_the_intermediate_is_unreachable_and_connects_when_it_appears(
        tmp_path, processes):
    issue_certificates(tmp_path)
    creds = lambda n: ["--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / f"{n}.crt"),
                       "--key", str(tmp_path / f"{n}.key")]
    relay_port = free_port(socket.SOCK_DGRAM)
    s_agent = free_port()
    agent = processes.start("agent", "--intermediate", f"127.0.0.1:{relay_port}",
                            "--bind", "127.0.0.1:0", "--forward", f"tcp:127.0.0.1:{free_port()}=echo",
                            "--status", f"127.0.0.1:{s_agent}", *creds("alice"), name="agent")
    wait(lambda: "unreachable" in agent.log_path.read_text(), 30, "the retry message")
    assert "retrying in" in agent.log_path.read_text()
    assert status(s_agent)["intermediate"]["connected"] is False
    processes.start("intermediate", "--listen", f"127.0.0.1:{relay_port}",
                    *creds("intermediate"), name="intermediate")
    wait(lambda: (status(s_agent) or {}).get("intermediate", {}).get("connected"), 30,
               "the agent to register once the intermediate is up")


def test_demo_command_passes():
    run = subprocess.run([sys.executable, "-m", "mahole", "demo", "--json", "--bytes",
                          str(1 << 20)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["ok"] and result["tcp"]["bytes_checked"] == 1 << 20
    assert result["udp"]["datagrams_checked"] == result["udp"]["datagrams_sent"]
    # Both nodes on loopback: the session starts on the relay and moves to direct.
    assert result["tcp"]["path"] == "direct" and result["tcp"]["switch_ms"] > 0
