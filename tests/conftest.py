"""Shared fixtures: every hot-path test runs against both the compiled module and its twin."""

import os

import pytest

from mahole import _fast


def _impl_params(module):
    impls = _fast.implementations(module)
    if os.environ.get("MAHOLE_REQUIRE_EXTENSIONS") == "1" and "compiled" not in impls:
        raise RuntimeError(f"MAHOLE_REQUIRE_EXTENSIONS=1 but the compiled {module} module is missing")
    return [pytest.param(mod, id=name) for name, mod in impls.items()]


@pytest.fixture(params=_impl_params("hot"))
def hot(request):
    """The classify/parse/route module: compiled `_hot` and pure `_hot_py`."""
    return request.param


@pytest.fixture(params=_impl_params("batch"))
def batch(request):
    """The batch socket module: compiled `_batch` (Linux) and pure `_batch_py`."""
    return request.param


@pytest.fixture(params=_impl_params("relay"))
def relay(request):
    """The relay engine module: compiled `_relay` (Linux) and pure `_relay_py`."""
    return request.param


@pytest.fixture(params=_impl_params("sched"))
def sched(request):
    """The connectivity-check scheduler module: compiled `_sched` and pure `_sched_py`."""
    return request.param


@pytest.fixture(params=_impl_params("packets"))
def packets(request):
    """QUIC packets: compiled `_packets` and `_packets_py` (aioquic's builder and decryption)."""
    return request.param


def pytest_terminal_summary(terminalreporter):
    """Print the observed NAT matrix (tests/test_nat_matrix.py) in the test report."""
    module = __import__("sys").modules.get("test_nat_matrix")
    if module is not None and module.observed:
        terminalreporter.section("NAT matrix (path, time to direct, RTT)")
        terminalreporter.write_line(module.matrix_table(module.observed))
