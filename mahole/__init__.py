"""mahole: connect devices to private applications directly, peer to peer, through NATs."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
