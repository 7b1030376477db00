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
