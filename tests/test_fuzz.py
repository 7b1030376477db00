"""A short coverage-guided fuzz run of every network decoder (fuzz/targets.py), in CI.

Each target runs under atheris for a few seconds in its own process (libFuzzer ends the process
it runs in), from its seeds in fuzz/corpus/<target>/ into a scratch corpus. The run must end
with exit 0 (no crash, no exception but ValueError, compiled and pure twins agreeing) after
fuzzing well past its seeds. `scripts/fuzz` is the long run.

Without atheris these tests skip, unless MAHOLE_REQUIRE_FUZZ=1 (CI sets it) makes that a
failure.
"""

import importlib.util
import os
import pathlib
import sys

import pytest

from mahole import _fast

FUZZ = pathlib.Path(__file__).resolve().parents[1] / "fuzz"
SECONDS = 4  # per target: 6 targets stay well under a minute
MIN_EXECUTIONS = 200  # inputs a target must run, seeds included (at most 41 seeds)


def _campaign():
    spec = importlib.util.spec_from_file_location("fuzz_campaign", FUZZ / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


campaign = _campaign()


@pytest.fixture(scope="module")
def atheris_available():
    if importlib.util.find_spec("atheris") is None:
        message = f"atheris is not installed for {sys.executable} (pip install atheris)"
        if os.environ.get("MAHOLE_REQUIRE_FUZZ") == "1":
            pytest.fail(f"MAHOLE_REQUIRE_FUZZ=1 but {message}")
        pytest.skip(message)


def test_every_target_has_seeds():
    for target in campaign.TARGETS:
        seeds = list((FUZZ / "corpus" / target).iterdir())
        assert seeds, f"fuzz/corpus/{target}/ is empty"


def test_the_differential_targets_see_both_twins():
    if os.environ.get("MAHOLE_REQUIRE_EXTENSIONS") != "1":
        pytest.skip("compiled twins are optional outside CI (MAHOLE_REQUIRE_EXTENSIONS=1)")
    for module in ("hot", "relay"):
        assert "compiled" in _fast.implementations(module), f"no compiled {module} module"


@pytest.mark.parametrize("target", campaign.TARGETS)
def test_fuzz_target_finds_nothing(target, atheris_available, tmp_path):
    result = campaign.run_target(target, seconds=SECONDS, work_dir=tmp_path / "corpus",
                                 artifact_dir=tmp_path / "crashes")
    report = result.summary() + "\n" + "\n".join(result.output.splitlines()[-40:])
    if result.reproducer:
        data = pathlib.Path(result.reproducer)
        data = data if data.is_absolute() else campaign.ROOT / data
        report += f"\nreproducer bytes: {data.read_bytes().hex()}"
    assert result.ok, report
    assert result.executions > MIN_EXECUTIONS, report
