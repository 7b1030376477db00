"""Free loopback ports for processes a test starts with a fixed --listen or --status port."""

import random
import socket

# Below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default):
# no socket bound to port 0 is ever given one of these, so a port found free here stays free
# until the process the test starts binds it (a port from bind(0) could be handed to another
# socket in between).
_LOW, _HIGH = 20000, 32767
_rng = random.Random()


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = _rng.randint(_LOW, _HIGH)
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free {kind.name} port on {host} between {_LOW} and {_HIGH}")
