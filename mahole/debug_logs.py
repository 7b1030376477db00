"""--keylog and --qlog-dir: what a role hands aioquic to make its QUIC connections debuggable.

One `DebugLogs` per role, opened when the role is built and closed when it stops; its
`quic_kwargs()` go to every `connection.configuration(...)` of the role (control connections
and end-to-end connections alike). See docs/debugging.md.
"""

import logging
import os

from aioquic.quic.logger import QuicFileLogger

log = logging.getLogger(__name__)



def _startup_error(message):
    from .roles.node import StartupError  # roles.node imports this module
    return StartupError(message)


def open_keylog(path):
    """`path` opened for appending TLS secrets (SSLKEYLOGFILE format), readable by us only.

    The secrets decrypt every connection they belong to, so the file is created 0600 and an
    existing one is made 0600 too. Line-buffered: aioquic flushes after each secret anyway."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                     0o600)
    except OSError as exc:
        raise _startup_error(f"cannot open keylog file {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        pass  # not ours to change (a shared file we may only append to): leave it
    return os.fdopen(fd, "a", buffering=1, encoding="ascii")


def open_qlog(path):
    """aioquic's QuicFileLogger writing `DIR/ODCID.qlog` per connection; the directory must
    exist (created if its parent does)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise _startup_error(f"cannot use qlog directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _startup_error(f"cannot use qlog directory {path}: not writable")
    return QlogWriter(path)


class QlogWriter(QuicFileLogger):
    """QuicFileLogger whose traces can all be written at once (`flush`), when the role stops
    with connections still open; a connection that ends afterwards writes nothing more."""

    def end_trace(self, trace):
        if trace not in self._traces:
            return
        try:
            super().end_trace(trace)
        except OSError as exc:  # a debugging aid never stops a connection
            self._traces.remove(trace)
            log.warning("cannot write qlog in %s: %s", self.path, exc.strerror or exc)

    def flush(self):
        for trace in list(self._traces):
            self.end_trace(trace)


class DebugLogs:
    """The keylog file and qlog logger of one role (each None when not configured)."""

    def __init__(self, keylog=None, qlog_dir=None):
        self.qlog = None
        self.keylog = open_keylog(keylog) if keylog else None
        try:
            self.qlog = open_qlog(qlog_dir) if qlog_dir else None
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, cfg):
        return cls(getattr(cfg, "keylog", None), getattr(cfg, "qlog_dir", None))

    def quic_kwargs(self):
        """Keyword arguments for `connection.configuration`."""
        return {"keylog": self.keylog, "qlog": self.qlog}

    def close(self):
        """Close the keylog; write the qlog of every connection still open (aioquic writes a
        connection's trace only when it ends, so a stopping role would lose them)."""
        if self.qlog is not None:
            self.qlog.flush()
        if self.keylog is not None:
            self.keylog.close()
            self.keylog = None
