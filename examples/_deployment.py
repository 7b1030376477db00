"""Shared by the examples: a throw-away deployment on loopback (a CA, certificates, an
intermediate in this process), so that each example runs as it is:

    python examples/http_request.py

A real app passes the intermediate's address and its own certificate files instead."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import mahole
from mahole import identity


def credentials(directory: Path, name: str) -> dict[str, str]:
    return {"cert": str(directory / f"{name}.crt"), "key": str(directory / f"{name}.key"),
            "ca": str(directory / "ca.crt")}


@contextlib.asynccontextmanager
async def local_intermediate() -> AsyncIterator[tuple[mahole.Intermediate, Path]]:
    """An intermediate on loopback and the directory holding everyone's certificates."""
    with tempfile.TemporaryDirectory(prefix="mahole-example-") as name:
        directory = Path(name)
        identity.init_ca(directory)
        identity.issue(directory, "intermediate", "intermediate", hosts=["127.0.0.1"])
        identity.issue(directory, "connector", "office")
        identity.issue(directory, "agent", "alice")
        async with mahole.Intermediate(allow=("*=*",),
                                       **credentials(directory, "intermediate")) as inter:
            yield inter, directory
