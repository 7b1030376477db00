"""Run one fuzz target under atheris (libFuzzer): ``python fuzz/run.py TARGET [libFuzzer args]``.

The libFuzzer arguments are the usual ones: corpus directories, ``-max_total_time=S``,
``-runs=N``, ``-artifact_prefix=DIR/``, ``-dict=FILE``; give a crash file instead of
directories to replay it. libFuzzer ends the process itself (exit 0 when the time or run
budget is spent, non-zero on a finding), so run this in a subprocess: `fuzz/campaign.py`
and tests/test_fuzz.py do.

The mahole modules (and this directory's targets) are instrumented for coverage; the compiled
Cython modules are not, so coverage is steered by their pure-Python twins, and the differential
check in each target holds the compiled module to the same answers.
"""

import sys


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    try:
        import atheris
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    if len(argv) < 2:
        print("usage: python fuzz/run.py TARGET [libFuzzer args]", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["mahole", "targets"]):
        import targets
        # Both twins, so that the pure ones are instrumented (implementations() imports them).
        for module in ("hot", "relay"):
            targets.twins(module)
    name = argv.pop(1)
    if name not in targets.TARGETS:
        print(f"fuzz: unknown target {name!r}; targets: {', '.join(targets.TARGETS)}",
              file=sys.stderr)
        return 2
    one_input = targets.TARGETS[name]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    sys.exit(main())
