"""The NAT lab: network namespaces, nftables NAT presets and UDP probes for tests.

    import netlab
    from netlab import lab  # the pytest fixture: require() + a Lab torn down after the test

    def test_something(lab):
        a = lab.public_host()
        refl = lab.reflector(a)                    # STUN-like reflector on a:3478
        h = lab.host("port-restricted")            # host behind a NAT router (h.router)
        sock = h.udp_socket()                      # a socket inside h's namespace
        assert netlab.mapped_address(sock, refl.addr)[0] == h.router.wan_ip

Links with the character of real ones (delay, jitter, random or bursty loss, a rate):
`lab.host("symmetric", link="lte", uplink="long")`, `lab.public_host(link="wifi")`; presets
and settings in netlab/wire.py, which runs each such link through a namespace of its own.

Presets and their nft rules: netlab/nat.py. Tests that need the lab call `netlab.require()`
(the `lab` fixture does): it skips when namespaces cannot be made here (not root, no `ip netns`,
no `nft`/`conntrack`), and fails instead when MAHOLE_REQUIRE_NETLAB=1 (as in CI).
"""

import functools
import os
import shutil
import sys

import pytest

from . import _ns
from ._ns import NetlabError, sweep
from .lab import Host, Lab, Reflector, Router, Site, STUN_PORT
from .nat import NAT_PRESETS, PRESETS
from .probe import late_answer, mapped_address, nothing_pending, recv, request, token, wait_until

__all__ = [
    "Host", "Lab", "NAT_PRESETS", "NetlabError", "PRESETS", "Reflector", "Router", "STUN_PORT",
    "Site", "lab", "late_answer", "mapped_address", "nothing_pending", "problem", "recv",
    "request", "require", "sweep", "token", "wait_until",
]

REQUIRE_ENV = "MAHOLE_REQUIRE_NETLAB"


@functools.cache
def problem():
    """Why the lab cannot run here (a sentence), or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {package})"
    ns = f"mhl{os.getpid()}x0-check"
    try:
        _ns.run(["ip", "netns", "add", ns])
    except (NetlabError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ns.nft(ns, "add table ip probe\n")
        _ns.write_sysctls(ns, {"net.ipv4.ip_forward": 1})
    except (NetlabError, OSError) as exc:
        return f"cannot set up nftables/sysctls in a network namespace: {exc}"
    finally:
        _ns.delete_namespace(ns)
    return None


def require():
    """Skip the calling test when the lab cannot run; with MAHOLE_REQUIRE_NETLAB=1, fail it."""
    reason = problem()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def lab():
    """A fresh Lab for one test (skips/fails through require()); always torn down."""
    require()
    with Lab() as lab_:
        yield lab_
