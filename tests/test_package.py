"""The package as a user gets it: version, help, which hot path is active."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mahole
from mahole import _fast
from mahole.cli import main


def test_version_is_importable():
    assert mahole.__version__.count(".") == 2


def test_help_lists_the_roles(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for role in ("intermediate", "connector", "agent", "demo", "certs"):
        assert role in out


def test_python_dash_m_mahole_help():
    run = subprocess.run([sys.executable, "-m", "mahole", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "intermediate" in run.stdout


def test_selected_implementation_matches_environment():
    if os.environ.get("MAHOLE_NO_EXTENSIONS", "") not in ("", "0"):
        assert not _fast.COMPILED and not _fast.BATCH_COMPILED
        assert _fast.Router.__module__ == "mahole._fast._hot_py"
    elif os.environ.get("MAHOLE_REQUIRE_EXTENSIONS") == "1":
        assert _fast.COMPILED and _fast.SCHED_COMPILED and _fast.PACKETS_COMPILED
        assert _fast.BATCH_COMPILED == sys.platform.startswith("linux")


def test_suite_runs_against_the_installed_wheel():
    if os.environ.get("MAHOLE_EXPECT_INSTALLED") != "1":
        pytest.skip("run from the source tree (scripts/test installs the wheel first)")
    source_tree = Path(__file__).resolve().parent.parent
    package = Path(mahole.__file__).resolve().parent
    assert package != source_tree / "mahole"
    assert package.parent.name == "site-packages"
