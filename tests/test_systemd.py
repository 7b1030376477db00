"""Readiness notification (`Type=notify`): what a service manager listening on $NOTIFY_SOCKET
receives, with a real AF_UNIX datagram socket standing in for systemd; and the example units."""

import configparser
import logging
import os
import pathlib
import socket
import sys

import pytest

from mahole import systemd

CONTRIB = pathlib.Path(__file__).resolve().parent.parent / "contrib" / "systemd"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="abstract AF_UNIX sockets are Linux-only")


@pytest.fixture
def manager(tmp_path):
    """A datagram socket like the one systemd creates; yields (NOTIFY_SOCKET value, socket)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    try:
        yield str(path), sock
    finally:
        sock.close()


def received(sock):
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status_is_one_datagram(manager):
    name, sock = manager
    assert systemd.ready("listening on [::]:4478", environ={"NOTIFY_SOCKET": name}) is True
    assert received(sock) == ["READY=1", "STATUS=listening on [::]:4478"]


def test_reads_notify_socket_from_the_environment(manager, monkeypatch):
    name, sock = manager
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert systemd.ready() is True
    assert received(sock) == ["READY=1"]


def test_status_and_stopping(manager):
    name, sock = manager
    env = {"NOTIFY_SOCKET": name}
    assert systemd.status("2 sessions, 1 direct", environ=env)
    assert received(sock) == ["STATUS=2 sessions, 1 direct"]
    assert systemd.stopping(environ=env)
    assert received(sock) == ["STOPPING=1"]
    assert systemd.stopping("shutting down", environ=env)
    assert received(sock) == ["STOPPING=1", "STATUS=shutting down"]


def test_a_newline_in_a_status_cannot_forge_an_assignment(manager):
    name, sock = manager
    systemd.status("peer said\nREADY=1\nMAINPID=1", environ={"NOTIFY_SOCKET": name})
    assert received(sock) == ["STATUS=peer said READY=1 MAINPID=1"]


@linux_only
def test_abstract_socket_named_with_at_sign():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2)
    abstract = f"mahole-test-notify-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + abstract)
    try:
        assert systemd.ready("registered", environ={"NOTIFY_SOCKET": "@" + abstract})
        assert received(sock) == ["READY=1", "STATUS=registered"]
    finally:
        sock.close()


def test_no_op_outside_systemd(manager):
    name, sock = manager
    assert systemd.ready("x", environ={}) is False
    assert systemd.stopping(environ={"NOTIFY_SOCKET": ""}) is False
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)  # nothing was sent anywhere


def test_unreachable_manager_is_a_warning_not_an_error(tmp_path, caplog):
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    with caplog.at_level(logging.WARNING, logger="mahole.systemd"):
        assert systemd.ready("x", environ=env) is False
    assert "cannot notify" in caplog.text and "nobody-listens" in caplog.text


def test_unsupported_address_kind_is_refused_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mahole.systemd"):
        assert systemd.ready(environ={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
        assert systemd.ready(environ={"NOTIFY_SOCKET": "relative/path"}) is False
    assert "unsupported NOTIFY_SOCKET 'vsock:2:1234'" in caplog.text


def test_socket_address():
    assert systemd.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.socket_address("@abc") == "\0abc"
    assert systemd.socket_address("") is None
    assert systemd.socket_address(None) is None


UNITS = {"mahole-intermediate.service": "intermediate",
         "mahole-connector@.service": "connector",
         "mahole-agent@.service": "agent"}


def _unit(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in unit files
    parser.read(CONTRIB / name)
    return parser


@pytest.mark.parametrize("name,role", UNITS.items())
def test_example_units(name, role):
    unit = _unit(name)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert f"-m mahole {role}" in service["ExecStart"]
    assert service["EnvironmentFile"].startswith("/etc/mahole/")
    assert "--key %d/cert.key" in service["ExecStart"]  # handed over by LoadCredential=
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error is permanent
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service.get("DynamicUser") == "yes" or service.get("User") == "mahole"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_roles_tell_systemd_when_they_serve_and_when_they_stop(tmp_path, manager):
    """`python -m mahole intermediate` sends READY=1 once it listens, an agent once it is
    registered, each STOPPING=1 on SIGTERM."""
    import signal

    from mahole.demo import issue_certificates

    from test_processes import Processes, free_port

    name, sock = manager
    issue_certificates(tmp_path)
    port = free_port(socket.SOCK_DGRAM)

    def creds(who):
        return ["--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / f"{who}.crt"),
                "--key", str(tmp_path / f"{who}.key"), "--control-socket", ""]

    env = {**os.environ, "NOTIFY_SOCKET": name}
    procs = Processes(tmp_path)
    sock.settimeout(20)
    try:
        inter = procs.start("intermediate", "--listen", f"127.0.0.1:{port}", "--allow", "*=*",
                            *creds("intermediate"), name="intermediate", env=env)
        lines = received(sock)
        assert "READY=1" in lines and any(l.startswith("STATUS=intermediate") for l in lines)
        agent = procs.start("agent", "--intermediate", f"127.0.0.1:{port}",
                            "--forward", "tcp:127.0.0.1:0=web", *creds("alice"),
                            name="agent", env=env)
        lines = received(sock)
        assert "READY=1" in lines and any("registered with" in l for l in lines), lines
        for proc in (agent, inter):
            os.killpg(proc.pid, signal.SIGTERM)
            assert "STOPPING=1" in received(sock)
            assert proc.wait(10) == 0
    finally:
        procs.close()
