"""Schedule + pop of keyed timers: the connectivity-check Scheduler against plain heapq.

100,000 schedule calls spread over 1,000 keys (so most calls replace a pending deadline, as
check retransmissions do), deadlines `now + U(0, 200 ms)`, with `pop_due(now)` every 100
schedules while a fake clock advances 10 ms; a final pop drains the rest. Compared, in one
run (interleaved): the compiled Scheduler, its pure-Python twin, and a baseline of a plain
`heapq` of (deadline, sequence, key) tuples with a dict key -> sequence to skip superseded
entries (the least a hand-written timer queue with replacement needs). All three fire the
same keys in the same order; that is checked before timing.

    python benchmarks/bench_sched.py [--quick] [--allow-twin]

Writes benchmarks/results/sched.json (sched-quick.json for --quick).
"""

import argparse
import heapq
import math
import os
import random
import sys
import time

try:
    import mahole  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import _report
from mahole import _fast

NAME = "sched"
KEYS = 1_000
PER_STEP = 100  # schedule calls between two pop_due
STEP = 0.010  # fake clock advance per step, seconds
SPAN = 0.200  # deadlines fall in [now, now + SPAN)


def make_plan(rng, timers):
    """[(ops, now)]: each step's (key, deadline) schedule calls, then the pop time."""
    keys = [("pair", i) for i in range(KEYS)]
    plan = []
    now = 0.0
    for start in range(0, timers, PER_STEP):
        ops = [(rng.choice(keys), now + rng.random() * SPAN)
               for _ in range(min(PER_STEP, timers - start))]
        now += STEP
        plan.append((ops, now))
    return plan


def run_scheduler(impl, plan, record=None):
    s = impl.Scheduler()
    schedule = s.schedule
    pop_due = s.pop_due
    fired = 0
    start = time.perf_counter()
    for ops, now in plan:
        for key, when in ops:
            schedule(key, when)
        due = pop_due(now)
        fired += len(due)
        if record is not None:
            record.extend(due)
    due = pop_due(math.inf)
    fired += len(due)
    elapsed = time.perf_counter() - start
    if record is not None:
        record.extend(due)
    return elapsed, fired


def run_heapq(plan, record=None):
    heap = []
    current = {}
    seq = 0
    fired = 0
    push = heapq.heappush
    pop = heapq.heappop
    start = time.perf_counter()
    for ops, now in plan + [([], math.inf)]:
        for key, when in ops:
            seq += 1
            current[key] = seq
            push(heap, (when, seq, key))
        while heap and heap[0][0] <= now:
            _, entry_seq, key = pop(heap)
            if current.get(key) == entry_seq:
                del current[key]
                fired += 1
                if record is not None:
                    record.append(key)
    return time.perf_counter() - start, fired


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (10,000 timers)")
    parser.add_argument("--allow-twin", action="store_true",
                        help="run even if the compiled module is missing")
    args = parser.parse_args(argv)
    impls = _fast.implementations("sched")
    if "compiled" not in impls and not args.allow_twin:
        print("bench_sched: the compiled scheduler is not built (build it, or pass "
              "--allow-twin to measure the pure-Python twin)", file=sys.stderr)
        return 2

    timers = 10_000 if args.quick else 100_000
    repeats = 3 if args.quick else 7
    plan = make_plan(random.Random(1), timers)

    runners = {name: (lambda impl=impl, record=None: run_scheduler(impl, plan, record))
               for name, impl in impls.items()}
    runners["heapq"] = lambda record=None: run_heapq(plan, record)

    # Same keys fired in the same order by everyone, before anything is timed.
    fired_keys = {}
    for name, run in runners.items():
        record = []
        run(record=record)
        fired_keys[name] = record
    reference = fired_keys["heapq"]
    for name, record in fired_keys.items():
        if record != reference:
            print(f"bench_sched: {name} fired different keys than the heapq baseline",
                  file=sys.stderr)
            return 1

    ns_per_timer = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():  # interleaved, so drift hits all alike
            elapsed, fired = run()
            assert fired == len(reference), (name, fired)
            ns_per_timer[name].append(elapsed / timers * 1e9)

    medians = {name: _report.median(v) for name, v in ns_per_timer.items()}
    baseline = medians["heapq"]
    rows = []
    for name in runners:
        lo, hi = _report.spread(ns_per_timer[name])
        rows.append([name, medians[name], lo, hi, 1e9 / medians[name], baseline / medians[name]])
    print(f"schedule+pop, {timers} timers over {KEYS} keys x {repeats} runs, "
          f"{len(reference)} fired, {timers - len(reference)} replaced before firing")
    print(_report.table(["implementation", "ns/timer (median)", "min", "max", "timers/s",
                         "x heapq"], rows))
    ratios = {f"{name}_vs_heapq": baseline / medians[name] for name in impls}
    if "compiled" in medians:
        ratios["compiled_vs_python"] = medians["python"] / medians["compiled"]
        print(f"compiled is {ratios['compiled_vs_heapq']:.2f}x the heapq baseline, "
              f"{ratios['compiled_vs_python']:.2f}x the twin")
    path = _report.write(NAME + ("-quick" if args.quick else ""), {
        "quick": args.quick, "timers": timers, "keys": KEYS, "repeats": repeats,
        "fired": len(reference), "per_step": PER_STEP, "step_s": STEP, "span_s": SPAN,
        "ns_per_timer": ns_per_timer, "median_ns_per_timer": medians, "ratios": ratios,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
