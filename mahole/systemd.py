"""Readiness notification for systemd services (`Type=notify`), without libsystemd.

The service manager names a datagram socket in ``$NOTIFY_SOCKET``; the service sends it
newline-separated ``KEY=VALUE`` assignments in one datagram (sd_notify(3), "Notify socket
protocol" in systemd.exec(5) / https://systemd.io/NOTIFY/). A name starting with "/" is a
filesystem path, one starting with "@" an abstract socket (the "@" stands for a leading NUL byte).
Outside systemd the variable is unset and every function here does nothing.

    systemd.ready("registered with intermediate.example.net:4478")   # READY=1 + STATUS=...
    systemd.status("2 sessions, 1 direct")                          # STATUS=...
    systemd.stopping()                                              # STOPPING=1

Notifying never raises: a role keeps serving if the manager cannot be reached, and the
failure is logged once as a warning (systemd then times the start out and says so itself).
"""

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def socket_address(name):
    """The address to send to for a $NOTIFY_SOCKET value; None if empty or of a kind not
    supported here (systemd 254+ also accepts "vsock:CID:PORT", for virtual machines)."""
    if not name:
        return None
    if name.startswith("@"):
        return "\0" + name[1:]  # abstract namespace: Linux only
    if name.startswith("/"):
        return name
    return None


def _field(key, value):
    # One assignment per line: a newline inside a value would start a forged assignment.
    value = " ".join(str(value).splitlines())
    return f"{key}={value}"


def notify(*assignments, environ=None):
    """Send assignments such as "READY=1" to the service manager in one datagram.

    Returns True if they were sent, False when not running under a manager that asked for
    notifications (no $NOTIFY_SOCKET) or when sending failed (logged)."""
    env = os.environ if environ is None else environ
    name = env.get(ENV, "")
    address = socket_address(name)
    if address is None:
        if name:
            log.warning("systemd: cannot notify the unsupported NOTIFY_SOCKET %r", name)
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("systemd: cannot notify %s: %s", name, exc)
        return False
    return True


def ready(status=None, environ=None):
    """The service is up: the intermediate listens, or the node is registered."""
    fields = ["READY=1"] if status is None else ["READY=1", _field("STATUS", status)]
    return notify(*fields, environ=environ)


def status(text, environ=None):
    """A one-line status shown by `systemctl status`."""
    return notify(_field("STATUS", text), environ=environ)


def stopping(status=None, environ=None):
    """The service is shutting down (sent before the role stops)."""
    fields = ["STOPPING=1"] if status is None else ["STOPPING=1", _field("STATUS", status)]
    return notify(*fields, environ=environ)
