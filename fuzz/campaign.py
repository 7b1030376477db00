"""Run fuzz targets one after another, each in its own atheris process, and summarise.

    python fuzz/campaign.py [TARGET|all] [SECONDS]      (scripts/fuzz is the usual way in)

Each target gets SECONDS (default 600) of libFuzzer's ``-max_total_time`` over its seeds
(fuzz/corpus/<target>/, read only) and a working corpus that persists between runs
(build/fuzz/<target>/, git-ignored). A finding is written to fuzz/crashes/<target>/: keep it
there as the reproducer (``python fuzz/run.py TARGET FILE`` replays it). One summary line per
target; the exit status is 1 if any target found something or did not finish, else 0. A
target that hangs is killed 60 s after its budget.

`run_target` is also what tests/test_fuzz.py calls for its short runs.
"""

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
RUNNER = FUZZ / "run.py"
TARGETS = ("hot", "router", "stun", "control", "relay", "relay_engine")
DICTS = {"control": FUZZ / "dicts" / "control.dict", "stun": FUZZ / "dicts" / "stun.dict"}
# Longest input libFuzzer makes, per target: a QUIC datagram fits in 1500 bytes; batches and
# control streams need room for several; the engine target sends every record as a datagram.
MAX_LEN = {"hot": 2048, "router": 8192, "stun": 2048, "control": 8192, "relay": 2048,
           "relay_engine": 4096}
DEFAULT_SECONDS = 600
KILL_MARGIN = 60  # seconds past -max_total_time before a silent target is killed
PER_INPUT_TIMEOUT = 10  # seconds; libFuzzer reports a slower input as a finding


@dataclasses.dataclass
class Result:
    target: str
    returncode: int
    seconds: float
    executions: int = 0
    exec_per_sec: int = 0
    coverage: str = ""
    reproducer: str = ""
    problem: str = ""
    output: str = ""

    @property
    def ok(self):
        return self.returncode == 0 and not self.problem

    def summary(self):
        status = "ok" if self.ok else "FINDING"
        line = (f"{self.target:<13} {status:<8} {self.executions:>11,} execs "
                f"{self.exec_per_sec:>7,}/s  {self.coverage:<28} {self.seconds:6.0f} s")
        if not self.ok:
            line += f"\n    {self.problem or f'exit {self.returncode}'}"
            if self.reproducer:
                line += f"\n    reproducer: {self.reproducer}"
        return line


def _stat(output, name):
    match = re.search(rf"stat::{name}:\s*(\d+)", output)
    return int(match.group(1)) if match else 0


def _problem(output):
    """The line that says what went wrong: the exception, or libFuzzer's own error."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "Uncaught Python exception" in line:
            tail = [l for l in lines[i + 1:] if l.strip() and not l.startswith(("==", "MS:"))]
            # The last traceback line before libFuzzer's report is "Type: message".
            for candidate in tail:
                if re.match(r"^[A-Za-z_.]*(Error|Exception|Finding|Exit)\b", candidate):
                    return candidate.strip()
            return tail[0].strip() if tail else line
        if "ERROR: libFuzzer:" in line:
            return line.split("ERROR: ", 1)[1].strip()
    return ""


def run_target(target, *, seconds=DEFAULT_SECONDS, runs=None, work_dir=None,
               artifact_dir=None, python=sys.executable, env=None, extra=()):
    """Fuzz `target` for `seconds` (and at most `runs` inputs) in a subprocess; a Result."""
    work_dir = pathlib.Path(work_dir or ROOT / "build" / "fuzz" / target)
    artifact_dir = pathlib.Path(artifact_dir or FUZZ / "crashes" / target)
    work_dir.mkdir(parents=True, exist_ok=True)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    args = [python, str(RUNNER), target, str(work_dir), str(FUZZ / "corpus" / target),
            f"-max_total_time={int(seconds)}", f"-timeout={PER_INPUT_TIMEOUT}",
            f"-max_len={MAX_LEN[target]}", "-rss_limit_mb=2048", "-print_final_stats=1",
            f"-artifact_prefix={artifact_dir}{os.sep}"]
    if runs is not None:
        args.append(f"-runs={int(runs)}")
    if target in DICTS:
        args.append(f"-dict={DICTS[target]}")
    args.extend(extra)
    started = time.monotonic()
    # Its own process group, so that a hang is ended with everything it started.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, cwd=work_dir, text=True, errors="replace",
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=seconds + KILL_MARGIN)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        hung = True
    result = Result(target, process.returncode, time.monotonic() - started, output=output)
    result.executions = _stat(output, "number_of_executed_units")
    result.exec_per_sec = _stat(output, "average_exec_per_sec")
    done = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", output)
    if done:
        result.coverage = "cov {} ft {} corpus {}".format(*done[-1])
    written = re.findall(r"Test unit written to (\S+)", output)
    if written:
        path = pathlib.Path(written[-1])
        result.reproducer = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    if hung:
        result.problem = f"killed: no exit {KILL_MARGIN} s after its {seconds} s budget"
    elif process.returncode != 0:
        result.problem = _problem(output) or f"exit {process.returncode}"
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    which = argv[0] if argv else "all"
    try:
        seconds = int(argv[1]) if len(argv) > 1 else DEFAULT_SECONDS
    except ValueError:
        print(f"fuzz: SECONDS must be a whole number, not {argv[1]!r}", file=sys.stderr)
        return 2
    if len(argv) > 2 or seconds < 1:
        print("usage: scripts/fuzz [TARGET|all] [SECONDS]", file=sys.stderr)
        return 2
    if which != "all" and which not in TARGETS:
        print(f"fuzz: unknown target {which!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    try:
        import atheris  # noqa: F401
    except ImportError:
        print(f"fuzz: atheris is not installed for {sys.executable} (pip install atheris)",
              file=sys.stderr)
        return 2
    chosen = TARGETS if which == "all" else (which,)
    print(f"fuzzing {', '.join(chosen)} for {seconds} s each", flush=True)
    failed = 0
    for target in chosen:
        result = run_target(target, seconds=seconds)
        print(result.summary(), flush=True)
        failed += not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
