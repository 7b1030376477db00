"""The local control socket every role opens, and its client (``mahole status``/``ping``).

Where: a Unix stream socket in :func:`control_dir` — ``$MAHOLE_CONTROL_DIR`` if set, else
systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/mahole``, else ``/run/mahole`` (when it can be used), else
``<tmp>/mahole-<uid>`` — named by role and name: ``agent-alice.sock``. A directory mahole
creates is mode 0700 and every socket is mode 0600 (set before it listens), so only the same
user (and root) can talk to a node. A role configured with ``control_socket`` uses that path
instead (``""``/``False`` opens none). The socket is removed when the role stops.

A second copy of one identity on one machine: the socket name is owned by whoever holds an
``flock`` on ``<name>.lock`` beside it, for as long as the process lives (the kernel drops the
lock when it dies, so a crash leaves nothing that blocks a restart). A copy that finds the lock
held does *not* take over the name and does not refuse to start either — whether two copies
may run is the intermediate's decision (it refuses a duplicate registration) — it listens on
``agent-alice.<pid>.sock`` instead and says so in the log. ``mahole status`` lists both.

Protocol: the client sends one JSON object on one line (at most :data:`MAX_REQUEST` bytes,
within :data:`READ_TIMEOUT` seconds) and reads JSON lines back:

``mahole status`` looks in every standard place (:func:`search_dirs`); a systemd unit with
``RuntimeDirectory=mahole`` puts the socket in ``/run/mahole`` (``$RUNTIME_DIRECTORY``).

* ``{"cmd": "status"}`` → ``{"ok": true, "status": {...the role's status()...}}``
* ``{"cmd": "ping", "service": "web", "count": N, "interval": S}`` (agents) → one line per
  probe ``{"probe": i, "rtt_ms": x or null, "path": "direct"|"relay", "addr": "HOST:PORT"}``,
  then ``{"ok": true, "done": true, "path": ..., "direct_addr": ..., "relay_addr": ...}``
* anything else, or a failure → ``{"ok": false, "error": "a sentence for a person"}``

Every request gets exactly one final line with ``"ok"``; ``ping`` sends its probe lines
before it. A request line that is too long, late or not JSON is answered with an error and
the connection closed; at most :data:`MAX_CLIENTS` clients are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import socket
import stat
import tempfile
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional

__all__ = ["ControlServer", "ControlError", "control_dir", "search_dirs", "socket_name", "list_sockets",
           "parse_request", "request", "open_for", "MAX_REQUEST", "READ_TIMEOUT"]

log = logging.getLogger(__name__)

MAX_REQUEST = 4096  # bytes of one request line, newline included
MAX_REPLY = 16 << 20  # bytes of one reply line the client accepts (a big intermediate status)
READ_TIMEOUT = 5.0  # seconds a client has to send its request line
MAX_CLIENTS = 16  # served at once; more are answered with an error and closed
SUFFIX = ".sock"

Handler = Callable[[Mapping[str, Any], Callable[[Mapping[str, Any]], Awaitable[None]]],
                   Awaitable[Mapping[str, Any]]]


class ControlError(Exception):
    """The control socket could not be used; the message is for a person."""


# --------------------------------------------------------------------------------------------
# Where

def control_dir() -> str:
    """The directory of the control sockets (see the module docstring); not created here."""
    env = os.environ.get("MAHOLE_CONTROL_DIR")
    if env:
        return env
    systemd = os.environ.get("RUNTIME_DIRECTORY")  # a unit's RuntimeDirectory=mahole
    if systemd:
        return systemd.split(":")[0]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "mahole")
    run = "/run/mahole"
    if os.path.isdir(run) and os.access(run, os.W_OK | os.X_OK) or \
            not os.path.exists(run) and os.access("/run", os.W_OK | os.X_OK):
        return run
    return os.path.join(tempfile.gettempdir(), f"mahole-{os.getuid()}")


def search_dirs() -> list[str]:
    """Where ``mahole status`` looks: :func:`control_dir` first, then the other standard
    places (a node started by systemd or by root while this shell has $XDG_RUNTIME_DIR);
    only ``$MAHOLE_CONTROL_DIR`` when that is set."""
    first = control_dir()
    if os.environ.get("MAHOLE_CONTROL_DIR"):
        return [first]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    # The example systemd units give each node its own RuntimeDirectory=mahole-ROLE[-NAME].
    units = sorted(glob.glob("/run/mahole-*/"))
    dirs = [first, os.path.join(runtime, "mahole") if runtime else None, "/run/mahole",
            *(unit.rstrip("/") for unit in units),
            os.path.join(tempfile.gettempdir(), f"mahole-{os.getuid()}")]
    return list(dict.fromkeys(d for d in dirs if d))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def socket_name(role: str, name: str) -> str:
    """``agent-alice.sock``; characters a file name should not hold become ``_``."""
    return f"{role}-{_UNSAFE.sub('_', name)[:80]}{SUFFIX}"


def _ensure_dir(path: str) -> None:
    """Create the directory 0700, or check that an existing one is ours and not a symlink
    (a world-writable temp dir may hold a trap another user set)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise ControlError(f"cannot create {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ControlError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise ControlError(f"{path} belongs to another user")
    if info.st_mode & 0o022:
        raise ControlError(f"{path} is writable by others (chmod 0700 it)")


def list_sockets(directory: Optional[str] = None) -> list[str]:
    """The control sockets in directory (default :func:`control_dir`) with a live node
    behind them, sorted; stale ones (a node that was killed) are skipped."""
    directory = directory or control_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(SUFFIX) and _alive(path):
            found.append(path)
    return found


def _alive(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except BlockingIOError:
        return True  # its backlog is full: busy, not dead
    except OSError:
        return False
    finally:
        sock.close()
    return True


# --------------------------------------------------------------------------------------------
# Server

def parse_request(line: bytes) -> dict:
    """One request line → its object with a string ``cmd``; ValueError otherwise."""
    if len(line) > MAX_REQUEST:
        raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"request is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("cmd"), str):
        raise ValueError('request must be a JSON object with a "cmd" string')
    return message


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


class ControlServer:
    """A role's control socket: ``status`` answers ``snapshot()``; ``commands`` adds more.

    ``path``: the socket to listen on (None: :func:`control_dir` and :func:`socket_name`).
    """

    def __init__(self, role: str, name: str, snapshot: Callable[[], Mapping[str, Any]],
                 commands: Optional[Mapping[str, Handler]] = None, path: Optional[str] = None):
        self.role = role
        self.name = name
        self.snapshot = snapshot
        self.commands = dict(commands or {})
        self.wanted = path
        self.path: Optional[str] = None
        self.server: Optional[asyncio.AbstractServer] = None
        self.clients: set = set()
        self.counters = {"requests": 0, "bad_requests": 0, "busy": 0}
        self._lock_fd: Optional[int] = None
        self._lock_path: Optional[str] = None

    async def start(self) -> str:
        """Listen; the path used. ControlError if no socket could be opened."""
        if self.wanted:
            directory = os.path.dirname(os.path.abspath(self.wanted))
            base = os.path.basename(self.wanted)
        else:
            directory = control_dir()
            base = socket_name(self.role, self.name)
            _ensure_dir(directory)
        stem = base[:-len(SUFFIX)] if base.endswith(SUFFIX) else base
        pid = os.getpid()
        names = [base] + [f"{stem}.{pid}{SUFFIX}" if n == 0 else f"{stem}.{pid}-{n}{SUFFIX}"
                          for n in range(16)]
        for candidate in names:
            path = os.path.join(directory, candidate)
            if self._lock(path):
                break
            if candidate == base:
                log.warning("another %s %s on this machine holds %s; this one listens on "
                            "the next free name", self.role, self.name, path)
        else:
            raise ControlError(f"no free control socket name in {directory}")
        try:
            sock = self._bind(path)
            self.server = await asyncio.start_unix_server(self._client, sock=sock,
                                                          limit=MAX_REQUEST)
        except BaseException:
            self._unlock()
            raise
        self.path = path
        log.info("control socket %s", path)
        return path

    def _lock(self, path: str) -> bool:
        """Own the name: an flock on path.lock, on the file that is still there."""
        lock_path = path + ".lock"
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
            except OSError as exc:
                raise ControlError(f"cannot create {lock_path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd, self._lock_path = fd, lock_path
                return True
            os.close(fd)  # its owner removed it as we locked it: lock the new one

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = self._lock_path = None

    @staticmethod
    def _bind(path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlError(f"{path} exists and is not a socket")
            os.unlink(path)  # we hold its lock: a leftover of a node that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)  # before listen(): nobody connects with wider rights
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        return sock

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self.clients):
                task.cancel()
            await asyncio.gather(*self.clients, return_exceptions=True)
            self.server = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None
        self._unlock()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.clients.add(task)
        try:
            if len(self.clients) > MAX_CLIENTS:
                self.counters["busy"] += 1
                await self._send(writer, {"ok": False, "error": "too many control clients"})
                return
            await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _serve(self, reader, writer) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            request = parse_request(line)
        except asyncio.TimeoutError:
            self.counters["bad_requests"] += 1
            await self._send(writer, {"ok": False, "error": f"no request within {READ_TIMEOUT:g} s"})
            return
        except ValueError as exc:  # too long (StreamReader's limit) or not a request
            self.counters["bad_requests"] += 1
            text = str(exc)
            if "limit" in text or "chunk" in text:
                text = f"request longer than {MAX_REQUEST} bytes"
            await self._send(writer, {"ok": False, "error": text})
            return
        self.counters["requests"] += 1
        cmd = request["cmd"]
        try:
            if cmd == "status":
                reply = {"ok": True, "status": self.snapshot()}
            elif cmd in self.commands:
                reply = await self.commands[cmd](request, lambda obj: self._send(writer, obj))
            else:
                known = ", ".join(sorted({"status", *self.commands}))
                reply = {"ok": False, "error": f"a {self.role} knows no command {cmd!r} "
                                               f"(it knows {known})"}
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug must not take the role down: say it and go on
            log.exception("control command %r failed", cmd)
            reply = {"ok": False, "error": f"{cmd} failed: {exc}"}
        await self._send(writer, reply)

    @staticmethod
    async def _send(writer, obj) -> None:
        writer.write(_line(obj))
        await writer.drain()


async def open_for(role, name, snapshot, commands=None, cfg=None):
    """The role's control server, started (None when cfg.control_socket is "" or False).

    ``cfg.control_socket``, when the config has it: None = the default path, a path = that
    path. StartupError-worthy problems raise ControlError.
    """
    wanted = getattr(cfg, "control_socket", None)
    if wanted is False or wanted == "":
        return None
    server = ControlServer(role, name, snapshot, commands, path=wanted)
    await server.start()
    return server


# --------------------------------------------------------------------------------------------
# Client

async def request(path: str, message: Mapping[str, Any], *,
                  timeout: float = 10.0) -> AsyncIterator[dict]:
    """Send one request; yield each reply line as an object, the final (``"ok"``) one last.

    ``timeout`` bounds the wait for each line. ControlError for a socket that cannot be
    reached or an answer that is not the protocol.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(path, limit=MAX_REPLY), timeout)
    except FileNotFoundError:
        raise ControlError(f"no node listens on {path}") from None
    except ConnectionRefusedError:
        raise ControlError(f"no node listens on {path} (a leftover of one that stopped)") from None
    except PermissionError:
        raise ControlError(f"not allowed to open {path} (run as the node's user)") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise ControlError(f"cannot reach {path}: {getattr(exc, 'strerror', None) or exc or 'timeout'}") from None
    try:
        writer.write(_line(message))
        await writer.drain()
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except asyncio.TimeoutError:
                raise ControlError(f"no answer from {path} within {timeout:g} s") from None
            except ValueError:
                raise ControlError(f"an answer from {path} over {MAX_REPLY} bytes") from None
            except OSError as exc:
                raise ControlError(f"lost {path}: {exc.strerror or exc}") from None
            if not line:
                raise ControlError(f"{path} closed the connection without an answer")
            try:
                reply = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ControlError(f"{path} answered something that is not JSON") from None
            if not isinstance(reply, dict):
                raise ControlError(f"{path} answered something that is not an object")
            yield reply
            if "ok" in reply:
                return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
