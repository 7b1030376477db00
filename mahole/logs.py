"""Logging for every command: the level from ``-v``/``-q``, text or JSON lines, systemd-aware.

    -v / -q        each steps the level from WARNING: -v info, -vv debug; -q error, -qq critical
    --log-format   ``text`` (default): ``TIME LOGGER LEVEL MESSAGE``;
                   ``json``: one JSON object a line with ``time`` (UTC, ISO 8601), ``level``,
                   ``logger``, ``message`` and, when there is one, ``exception`` (the traceback)

Under systemd (stderr is the journal: ``JOURNAL_STREAM`` names it) text lines carry no time of
our own, since the journal stamps every line, and start with the syslog priority (``<4>`` for a
warning), which journald reads as the line's level (sd-daemon(3)).

aioquic logs to the ``quic`` logger in its own words (``[8f3a…] Error: 298, reason: …``);
`QuicLogFilter`, installed by `setup`, rewrites each of those records into one mahole line
on the ``mahole.quic`` logger at the level it deserves: a peer that broke the QUIC protocol
or failed the TLS handshake is INFO (anyone on the Internet can do it, so it is no warning of
ours), a packet that did not decrypt is DEBUG. The rewritten lines are rate-limited per kind
(`LogLimit`), so a flood of junk packets cannot fill the disk.

`LogLimit` is sans-IO: every call takes ``now``. The intermediate's signaling core uses it to
rate-limit its refusal lines on its own fake-able clock.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys

__all__ = ["FORMATS", "JsonFormatter", "LogLimit", "QuicLogFilter", "add_flags",
           "install_quic_filter", "level_for", "setup", "to_journal"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(name)s %(levelname)s %(message)s"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}  # syslog(3) priorities


def level_for(verbose: int = 0, quiet: int = 0, base: int = logging.WARNING) -> int:
    """WARNING stepped down by each -v and up by each -q, within DEBUG..CRITICAL."""
    return min(max(base + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)


def to_journal(stream, environ=None) -> bool:
    """True if `stream` is the systemd journal: ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of the
    stream systemd connected (a child whose stderr was redirected elsewhere inherits the
    variable, so the stream itself is compared when it has a file descriptor)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, AttributeError, OSError):
        return True  # set, but nothing to compare with: trust it
    return (st.st_dev, st.st_ino) == (device, inode)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Text without a time of our own, prefixed with the syslog priority for journald."""

    def __init__(self):
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = _PRIORITY.get(record.levelno, 7 if record.levelno < logging.INFO else 4)
        # Every line of a multi-line record (a traceback) keeps the record's priority.
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def setup(verbose: int = 0, quiet: int = 0, fmt: str = "text", stream=None,
          environ=None) -> logging.Handler:
    """Install mahole's one handler on the root logger (replacing an earlier one, so calling
    ``main()`` twice in one process does not double every line) and return it."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    stream = sys.stderr if stream is None else stream
    level = level_for(verbose, quiet)
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif to_journal(stream, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler._mahole = True
    handler._mahole_format = fmt
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mahole", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aioquic's own logger is noisy below WARNING; open it only with -vv. What passes is
    # rewritten into mahole's lines (QuicLogFilter).
    logging.getLogger("quic").setLevel(logging.NOTSET if level <= logging.DEBUG
                                       else max(level, logging.WARNING))
    install_quic_filter()
    return handler


def say(text: str, level: int = logging.INFO, logger: str = "mahole") -> None:
    """A line for the person running the command (``mahole agent running``, an error): plain
    on stderr, or, with JSON logs, one JSON object like every other line, whatever the level."""
    handler = next((h for h in logging.getLogger().handlers
                    if getattr(h, "_mahole_format", None) == "json"), None)
    if handler is None:
        print(text, file=sys.stderr, flush=True)
        return
    record = logging.getLogger(logger).makeRecord(logger, level, "(mahole)", 0, text, (), None)
    handler.handle(record)


def add_flags(parser, *, top_level: bool = False) -> None:
    """``-v``, ``-q`` and ``--log-format`` on `parser`. On the top-level parser they land in
    ``verbose``/``quiet``/``log_format``; on a command's parser in ``cmd_verbose``/
    ``cmd_quiet``/``cmd_log_format``, so that flags before and after the command add up
    instead of one overwriting the other. Each is absent from the namespace unless given."""
    import argparse

    prefix = "" if top_level else "cmd_"
    parser.add_argument("-v", "--verbose", dest=f"{prefix}verbose", action="count",
                        default=argparse.SUPPRESS, help="more log output (-v info, -vv debug)")
    parser.add_argument("-q", "--quiet", dest=f"{prefix}quiet", action="count",
                        default=argparse.SUPPRESS, help="less log output (-q errors only)")
    parser.add_argument("--log-format", dest=f"{prefix}log_format", choices=FORMATS,
                        default=argparse.SUPPRESS,
                        help="text (default) or json: one JSON object a line")


# --- rate-limited lines ------------------------------------------------------------------------

class LogLimit:
    """At most ``burst`` log lines of each kind per ``window`` seconds; sans-IO (every call
    takes ``now``, nothing reads a clock).

    A kind's window opens with its first line and lasts ``window`` seconds. Lines over the
    burst are not logged but counted; the count comes back once, for one summary line
    (``… and 1,234 more``): from `take`, when the next line of the kind opens a new window,
    or from `due`, which a caller with a timer calls at `next_due`. Kinds are meant to be a
    small fixed set; past ``max_kinds`` live windows, new kinds share one more, `OTHER`.
    """

    OTHER = "(other)"

    def __init__(self, burst: int = 10, window: float = 10.0, max_kinds: int = 256):
        if burst < 1 or not window > 0:
            raise ValueError("a log limit needs burst >= 1 and window > 0")
        self.burst = burst
        self.window = window
        self.max_kinds = max_kinds
        self.suppressed_total = 0  # lines not logged, ever
        self._windows = {}  # kind -> [opened, logged, suppressed]

    def take(self, kind, now: float) -> tuple[bool, int]:
        """``(log it, missed)``: whether to log this line of ``kind``, and how many lines of
        the kind's previous window were not logged and not yet reported (0 if none): report
        those first, in one summary line."""
        windows = self._windows
        entry = windows.get(kind)
        missed = 0
        if entry is not None and now >= entry[0] + self.window:
            missed = entry[2]
            entry = None
        if entry is None:
            if kind != self.OTHER and len(windows) - (self.OTHER in windows) >= self.max_kinds:
                self._forget_idle(now)
                if len(windows) - (self.OTHER in windows) >= self.max_kinds:
                    return self.take(self.OTHER, now)
            entry = windows[kind] = [now, 0, 0]
        if entry[1] < self.burst:
            entry[1] += 1
            return True, missed
        entry[2] += 1
        self.suppressed_total += 1
        return False, missed

    def window_end(self, kind) -> float | None:
        """When the current window of ``kind`` ends (None if it has none)."""
        entry = self._windows.get(kind)
        return None if entry is None else entry[0] + self.window

    def next_due(self) -> float | None:
        """The earliest end of a window that has lines to report, or None."""
        ends = [opened + self.window for opened, _logged, suppressed in self._windows.values()
                if suppressed]
        return min(ends) if ends else None

    def due(self, now: float) -> list[tuple[object, int]]:
        """``(kind, missed)`` of every window over by ``now`` with lines not logged; those
        windows are closed (the next line of the kind opens a new one)."""
        out = []
        for kind, (opened, _logged, suppressed) in list(self._windows.items()):
            if now >= opened + self.window:
                del self._windows[kind]
                if suppressed:
                    out.append((kind, suppressed))
        return out

    def _forget_idle(self, now):
        for kind, (opened, _logged, suppressed) in list(self._windows.items()):
            if now >= opened + self.window and not suppressed:
                del self._windows[kind]


# --- aioquic's own lines -----------------------------------------------------------------------

QUIC_LOGGER = "quic"  # aioquic.quic.connection's logger
QUIC_LINES = "mahole.quic"  # the logger whose name the rewritten lines carry
QUIC_BURST = 5  # lines of one kind per QUIC_WINDOW
QUIC_WINDOW = 10.0  # s
_CRYPTO_ERROR = 0x100  # QUIC error codes 0x100-0x1ff carry a TLS alert (RFC 9001 §4.8)
_CID = re.compile(r"\[(?P<cid>[0-9a-fA-F]*)\] ?(?P<text>.*)\Z", re.S)
# str(aioquic.quic.connection.QuicConnectionError)
_CONNECTION_ERROR = re.compile(
    r"Error: (?P<code>\d+), reason: (?P<reason>.*?)(?:, frame_type: (?P<frame>\d+))?\Z", re.S)
# The texts of aioquic's CryptoError when a packet does not decrypt (an AEAD tag mismatch
# has no text at all) and of KeyUnavailableError.
_UNDECRYPTABLE = frozenset(("", "Decryption key is not available",
                            "Packet is too short to sample"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(text, limit=200):
    """Text from a peer's packet, safe for one log line."""
    text = _CONTROL.sub("?", str(text))
    return text if len(text) <= limit else text[:limit] + "…"


def _code_name(code):
    """The name of a QUIC transport error code or, for 0x100-0x1ff, of its TLS alert."""
    try:
        if _CRYPTO_ERROR <= code <= _CRYPTO_ERROR + 0xFF:
            from aioquic.tls import AlertDescription
            return AlertDescription(code - _CRYPTO_ERROR).name.replace("_", " ")
        from aioquic.quic.packet import QuicErrorCode
        return QuicErrorCode(code).name
    except (ImportError, ValueError):
        return None


def describe_quic_record(record: logging.LogRecord) -> tuple[int, str, str]:
    """``(level, kind, message)``: what mahole says for one record of aioquic's ``quic``
    logger. ``kind`` groups the lines that are rate-limited together."""
    try:
        text = record.getMessage()
    except Exception:  # a record whose arguments do not fit its format: show it raw
        text = f"{record.msg!r} % {record.args!r}"
    match = _CID.match(text)
    cid, body = (match["cid"], match["text"]) if match else ("", text)
    where = f"QUIC connection {cid}" if cid else "QUIC"
    error = _CONNECTION_ERROR.match(body)
    if error:  # a QuicConnectionError: the peer's packets broke the protocol or TLS
        code = int(error["code"])
        name = _code_name(code)
        detail = f"error 0x{code:x}" + (f" {name}" if name else "")
        if error["frame"] is not None:
            detail += f", frame type 0x{int(error['frame']):x}"
        reason = _clean(error["reason"]) or "no reason given"
        if _CRYPTO_ERROR <= code <= _CRYPTO_ERROR + 0xFF:
            return (logging.INFO, "tls",
                    f"the TLS handshake with the peer of {where} failed: {reason} ({detail})")
        return (logging.INFO, "protocol",
                f"the peer of {where} broke the QUIC protocol: {reason} ({detail})")
    if record.levelno <= logging.DEBUG and body in _UNDECRYPTABLE:
        why = body.lower() if body else "authentication failed"
        return (logging.DEBUG, "undecryptable",
                f"{where}: dropped a packet that could not be decrypted ({why})")
    if body.startswith("Version negotiation packet contains"):  # spoofable, and ignored
        return (logging.DEBUG, "version",
                f"{where}: ignored a version negotiation packet listing our own version")
    if body == "Could not find a common protocol version":
        return (logging.INFO, "version",
                f"{where}: the peer speaks no QUIC version we do; giving up")
    # Anything else keeps its level and words, said as ours and limited per message format.
    template = _CID.match(str(record.msg))
    kind = (record.levelno, template["text"] if template else str(record.msg))
    return record.levelno, kind, f"{where}: {_clean(body, 500)}"


class QuicLogFilter(logging.Filter):
    """A filter for aioquic's ``quic`` logger: every record becomes one mahole line
    (`describe_quic_record`) on ``mahole.quic``, or is dropped when that logger is not
    enabled for the new level or its kind is over the rate limit (`LogLimit`, on the
    records' own times). A line that opens a new window after lines were dropped is preceded
    by one summary line: ``… and 1,234 more lines like it were not logged``."""

    def __init__(self, limit: LogLimit | None = None):
        super().__init__()
        self.limit = limit if limit is not None else LogLimit(QUIC_BURST, QUIC_WINDOW)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != QUIC_LOGGER:  # already one of ours
            return True
        level, kind, message = describe_quic_record(record)
        lines = logging.getLogger(QUIC_LINES)
        if not lines.isEnabledFor(level):
            return False
        logged, missed = self.limit.take(kind, record.created)
        if missed:
            lines.log(level, "… and %s more lines like the next were not logged in %g s",
                      f"{missed:,}", self.limit.window)
        if not logged:
            return False
        record.name = QUIC_LINES
        record.msg, record.args = message, None
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info = record.exc_text = None
        return True


def install_quic_filter(logger: logging.Logger | None = None) -> QuicLogFilter:
    """Put a `QuicLogFilter` on aioquic's ``quic`` logger (replacing one installed before)
    and return it."""
    logger = logging.getLogger(QUIC_LOGGER) if logger is None else logger
    for old in [f for f in logger.filters if isinstance(f, QuicLogFilter)]:
        logger.removeFilter(old)
    new = QuicLogFilter()
    logger.addFilter(new)
    return new
