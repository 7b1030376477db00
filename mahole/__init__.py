"""mahole: connect devices to private applications directly, peer to peer, through NATs."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# The library API (mahole.api), loaded on first use so that the command line starts fast.
_API = frozenset((
    "Agent", "Connector", "Intermediate", "Session", "SessionStats", "PathChange", "Path",
    "Error", "Unauthorized", "Refused", "ServiceUnavailable", "ConnectionLost",
    "DatagramTooLarge", "Credential"))
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mahole' has no attribute {name!r}")
