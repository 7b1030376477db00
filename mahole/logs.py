"""Logging for every command: the level from ``-v``/``-q``, text or JSON lines, systemd-aware.

    -v / -q        each steps the level from WARNING: -v info, -vv debug; -q error, -qq critical
    --log-format   ``text`` (default): ``TIME LOGGER LEVEL MESSAGE``;
                   ``json``: one JSON object a line with ``time`` (UTC, ISO 8601), ``level``,
                   ``logger``, ``message`` and, when there is one, ``exception`` (the traceback)

Under systemd (stderr is the journal: ``JOURNAL_STREAM`` names it) text lines carry no time of
our own, since the journal stamps every line, and start with the syslog priority (``<4>`` for a
warning), which journald reads as the line's level (sd-daemon(3)).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

__all__ = ["FORMATS", "JsonFormatter", "add_flags", "level_for", "setup", "to_journal"]

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
    # aioquic's own logger is noisy below WARNING; open it only with -vv.
    logging.getLogger("quic").setLevel(logging.NOTSET if level <= logging.DEBUG
                                       else max(level, logging.WARNING))
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
