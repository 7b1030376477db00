"""The connectivity-check Scheduler (timers + Ta pacing), against both the compiled module
and its twin (tests/conftest.py `sched`)."""

import gc
import math
import random
import sys

import pytest

from mahole import _fast


# Timers -------------------------------------------------------------------------------
def test_pop_due_returns_keys_earliest_first(sched):
    s = sched.Scheduler()
    s.schedule("c", 3.0)
    s.schedule("a", 1.0)
    s.schedule("b", 2.0)
    assert len(s) == 3
    assert s.pop_due(10.0) == ["a", "b", "c"]
    assert len(s) == 0
    assert s.pop_due(10.0) == []


def test_schedule_replaces_the_deadline(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    s.schedule("a", 5.0)
    assert len(s) == 1
    assert s.deadline("a") == 5.0
    assert s.next_deadline() == 5.0
    assert s.pop_due(4.999) == []  # the old deadline no longer fires
    assert s.pop_due(5.0) == ["a"]
    assert s.pop_due(100.0) == []  # and fires only once


def test_replacing_with_an_earlier_deadline(sched):
    s = sched.Scheduler()
    s.schedule("a", 9.0)
    s.schedule("b", 5.0)
    s.schedule("a", 1.0)
    assert s.next_deadline() == 1.0
    assert s.pop_due(5.0) == ["a", "b"]
    assert s.next_deadline() is None


def test_cancel(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    s.schedule("b", 2.0)
    s.cancel("a")
    s.cancel("a")  # already gone: no-op
    s.cancel("never scheduled")
    assert len(s) == 1
    assert s.deadline("a") is None
    assert s.pop_due(10.0) == ["b"]


def test_ties_pop_in_scheduling_order(sched):
    s = sched.Scheduler()
    keys = [f"k{i}" for i in range(50)]
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    for key in shuffled:
        s.schedule(key, 7.0)
    assert s.pop_due(7.0) == shuffled


def test_a_replaced_key_ties_as_scheduled_at_its_replacement(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    s.schedule("b", 1.0)
    s.schedule("c", 1.0)
    s.schedule("a", 1.0)  # same deadline again: now after b and c
    assert s.pop_due(1.0) == ["b", "c", "a"]


def test_pop_due_boundary_is_inclusive(sched):
    s = sched.Scheduler()
    s.schedule("on time", 2.5)
    s.schedule("later", math.nextafter(2.5, math.inf))
    assert s.pop_due(math.nextafter(2.5, -math.inf)) == []
    assert s.pop_due(2.5) == ["on time"]
    assert s.pop_due(2.5) == []
    assert s.next_deadline() == math.nextafter(2.5, math.inf)


def test_pop_due_on_an_empty_scheduler(sched):
    s = sched.Scheduler()
    assert s.pop_due(1e18) == []
    assert s.next_deadline() is None
    assert len(s) == 0
    assert not s


def test_next_deadline_follows_pops_cancels_and_replacements(sched):
    s = sched.Scheduler()
    assert s.next_deadline() is None
    for i, key in enumerate("abcde"):
        s.schedule(key, float(i + 1))
    assert s.next_deadline() == 1.0
    s.cancel("a")
    assert s.next_deadline() == 2.0
    s.schedule("b", 10.0)
    assert s.next_deadline() == 3.0
    assert s.pop_due(3.0) == ["c"]
    assert s.next_deadline() == 4.0
    s.cancel("d")
    s.cancel("e")
    assert s.next_deadline() == 10.0
    assert s.pop_due(10.0) == ["b"]
    assert s.next_deadline() is None


def test_a_popped_key_can_be_scheduled_again(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    assert s.pop_due(1.0) == ["a"]
    assert s.deadline("a") is None
    s.schedule("a", 2.0)
    assert s.deadline("a") == 2.0
    assert s.pop_due(2.0) == ["a"]


def test_deadlines_are_floats(sched):
    s = sched.Scheduler()
    s.schedule("a", 3)
    s.schedule("b", True)
    assert s.deadline("a") == 3.0 and type(s.deadline("a")) is float
    assert type(s.next_deadline()) is float
    assert s.pop_due(3) == ["b", "a"]
    s.schedule("inf", math.inf)
    s.schedule("-inf", -math.inf)
    assert s.pop_due(0.0) == ["-inf"]
    assert s.pop_due(math.inf) == ["inf"]


class Check:
    """A key with identity hashing, like a candidate-pair object."""

    def __init__(self, name):
        self.name = name


def test_keys_can_be_any_hashable(sched):
    s = sched.Scheduler()
    pair = Check("pair")
    keys = [("session", 1, ("10.0.0.1", 4000)), pair, frozenset({1, 2}), None, 42, b"id",
            Check("other")]
    for i, key in enumerate(keys):
        s.schedule(key, float(len(keys) - i))
    assert s.deadline(pair) == float(len(keys) - 1)
    assert s.deadline(Check("pair")) is None  # identity, not the name
    assert s.deadline(("session", 1, ("10.0.0.1", 4000))) == float(len(keys))
    popped = s.pop_due(100.0)
    assert popped == keys[::-1]
    assert popped[-2] is pair


def test_equal_keys_are_one_key(sched):
    s = sched.Scheduler()
    s.schedule(1, 5.0)
    s.schedule(1.0, 6.0)
    s.schedule(True, 7.0)
    assert len(s) == 1
    assert s.deadline(1) == 7.0
    popped = s.pop_due(7.0)
    assert popped == [1] and type(popped[0]) is int  # the first key object is kept


def test_unhashable_key_is_refused_and_changes_nothing(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    with pytest.raises(TypeError):
        s.schedule(["not", "hashable"], 1.0)
    with pytest.raises(TypeError):
        s.cancel({})
    assert len(s) == 1
    assert s.pop_due(2.0) == ["a"]


class BadHash:
    def __hash__(self):
        raise RuntimeError("no hash today")


def test_a_key_whose_hash_raises_changes_nothing(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    with pytest.raises(RuntimeError, match="no hash today"):
        s.schedule(BadHash(), 0.5)
    assert len(s) == 1
    assert s.next_deadline() == 1.0
    assert s.pop_due(2.0) == ["a"]


@pytest.mark.parametrize("bad, error", [
    (float("nan"), ValueError), ("1.0", TypeError), (b"1", TypeError), (None, TypeError),
])
def test_bad_times_are_refused(sched, bad, error):
    s = sched.Scheduler()
    with pytest.raises(error):
        s.schedule("a", bad)
    with pytest.raises(error):
        s.pop_due(bad)
    with pytest.raises(error):
        s.pacing_slot(bad)
    with pytest.raises(error):
        s.take_pacing_slot(bad)
    assert len(s) == 0
    assert s.pacing_deferred() == 0


def test_keys_are_released_when_popped_or_cancelled(sched):
    s = sched.Scheduler()
    popped, cancelled = Check("p"), Check("c")
    s.schedule(popped, 1.0)
    s.schedule(cancelled, 2.0)
    s.schedule(cancelled, 3.0)
    ref_counts = (sys.getrefcount(popped), sys.getrefcount(cancelled))
    assert s.pop_due(1.0) == [popped]
    s.cancel(cancelled)
    gc.collect()
    assert sys.getrefcount(popped) < ref_counts[0]
    assert sys.getrefcount(cancelled) < ref_counts[1]


def test_heavy_replacement_keeps_order(sched):
    """Every key rescheduled many times (most heap entries stale, so compaction runs)."""
    rng = random.Random(11)
    s = sched.Scheduler()
    final = {}
    for _ in range(50):
        for k in range(1000):
            when = rng.uniform(0.0, 100.0)
            s.schedule(k, when)
            final[k] = when
    assert len(s) == 1000
    for k in range(0, 1000, 3):
        s.cancel(k)
        del final[k]
    assert s.next_deadline() == min(final.values())
    expected = sorted(final, key=lambda k: final[k])
    assert s.pop_due(50.0) == [k for k in expected if final[k] <= 50.0]
    assert s.pop_due(100.0) == [k for k in expected if final[k] > 50.0]
    assert len(s) == 0 and s.next_deadline() is None


def test_timers_survive_the_compaction_of_stale_entries(sched):
    """A few keys rescheduled thousands of times beside many that are never touched."""
    s = sched.Scheduler()
    for k in range(1000):
        s.schedule(("quiet", k), 1000.0 + k)
    for i in range(5000):
        s.schedule(("busy", i % 10), i / 10)
        if i % 7 == 0:
            s.cancel(("busy", (i + 3) % 10))
    pending = {("busy", k): s.deadline(("busy", k)) for k in range(10)
               if s.deadline(("busy", k)) is not None}
    assert len(s) == 1000 + len(pending)
    assert s.next_deadline() == min(pending.values())
    assert s.pop_due(999.0) == sorted(pending, key=pending.get)
    assert s.pop_due(3000.0) == [("quiet", k) for k in range(1000)]
    assert len(s) == 0


# Random operation sequences -------------------------------------------------------------
class Reference:
    """The obvious model: a dict of key -> (deadline, sequence), sorted on every pop."""

    def __init__(self):
        self.timers = {}
        self.seq = 0

    def schedule(self, key, when):
        self.seq += 1
        self.timers[key] = (float(when), self.seq)

    def cancel(self, key):
        self.timers.pop(key, None)

    def deadline(self, key):
        entry = self.timers.get(key)
        return None if entry is None else entry[0]

    def next_deadline(self):
        return min((w for w, _ in self.timers.values()), default=None)

    def pop_due(self, now):
        due = sorted((entry, key) for key, entry in self.timers.items() if entry[0] <= now)
        for _, key in due:
            del self.timers[key]
        return [key for _, key in due]

    def __len__(self):
        return len(self.timers)


def random_ops(seed, count, keys=300):
    """(method, args) tuples: mostly schedules around a creeping clock, with cancels,
    queries, pops and coarse deadlines (so ties happen)."""
    rng = random.Random(seed)
    now = 0.0
    ops = []
    for _ in range(count):
        r = rng.random()
        key = ("pair", rng.randrange(keys)) if rng.random() < 0.5 else rng.randrange(keys)
        if r < 0.45:
            when = now + (rng.randrange(40) / 8 if rng.random() < 0.5 else rng.uniform(0, 5))
            ops.append(("schedule", (key, when)))
        elif r < 0.60:
            ops.append(("cancel", (key,)))
        elif r < 0.70:
            ops.append(("deadline", (key,)))
        elif r < 0.80:
            ops.append(("next_deadline", ()))
        elif r < 0.85:
            ops.append(("__len__", ()))
        else:
            now += rng.uniform(0, 0.5)
            ops.append(("pop_due", (now,)))
    ops.append(("pop_due", (math.inf,)))
    ops.append(("__len__", ()))
    return ops


def run(target, ops):
    return [getattr(target, name)(*args) for name, args in ops]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_the_reference_model(sched, seed):
    ops = random_ops(seed, 10_000)
    got = run(sched.Scheduler(), ops)
    want = run(Reference(), ops)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, (i, ops[i])
    assert sum(len(r) for r, (name, _) in zip(got, ops) if name == "pop_due") > 1000


def test_compiled_and_twin_give_identical_outputs():
    impls = _fast.implementations("sched")
    if len(impls) < 2:
        pytest.skip("the compiled scheduler is not built")
    ops = random_ops(99, 20_000, keys=2_000)
    outputs = {name: run(mod.Scheduler(), ops) for name, mod in impls.items()}
    assert outputs["compiled"] == outputs["python"]


def test_compiled_is_the_default_when_built():
    impls = _fast.implementations("sched")
    if "compiled" in impls and not _fast.NO_EXTENSIONS:
        assert _fast.SCHED_COMPILED
        assert _fast.Scheduler is impls["compiled"].Scheduler
    else:
        assert _fast.Scheduler is impls["python"].Scheduler


# Ta pacing (RFC 8445 §14.2) ---------------------------------------------------------------
def test_pacing_defaults_to_20_ms(sched):
    assert sched.Scheduler().pacing_interval == 0.020
    assert sched.Scheduler(0.005).pacing_interval == 0.005
    assert sched.Scheduler(pacing_interval=0).pacing_interval == 0.0


def test_pacing_interval_is_read_only(sched):
    s = sched.Scheduler()
    with pytest.raises(AttributeError):
        s.pacing_interval = 0.001
    assert s.pacing_interval == 0.020


@pytest.mark.parametrize("bad", [-0.001, float("nan"), float("inf")])
def test_pacing_interval_must_be_finite_and_not_negative(sched, bad):
    with pytest.raises(ValueError):
        sched.Scheduler(bad)


def test_first_check_goes_out_at_once(sched):
    s = sched.Scheduler()
    assert s.pacing_slot(1000.0) == 1000.0
    assert s.take_pacing_slot(1000.0) is True
    assert s.pacing_deferred() == 0


def test_pacing_slots_are_20_ms_apart(sched):
    """A fake clock ticking every millisecond; a check wants out on every tick."""
    s = sched.Scheduler()
    sent = []
    for tick in range(1000):
        now = 10.0 + tick / 1000
        if s.take_pacing_slot(now):
            sent.append(now)
    assert len(sent) == 50
    assert sent[0] == 10.0
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert all(gap == pytest.approx(0.020, abs=1e-9) for gap in gaps)
    assert s.pacing_deferred() == 1000 - 50


def test_take_pacing_slot_refuses_inside_the_interval(sched):
    s = sched.Scheduler(0.25)  # binary-exact, so slot times compare exactly
    assert s.take_pacing_slot(1.0)
    assert s.pacing_slot(1.0) == 1.25
    assert s.pacing_slot(1.125) == 1.25
    assert not s.take_pacing_slot(1.0)
    assert not s.take_pacing_slot(1.125)
    assert not s.take_pacing_slot(math.nextafter(1.25, 0.0))
    assert s.pacing_deferred() == 3
    assert s.take_pacing_slot(1.25)  # exactly at the slot
    assert s.pacing_slot(1.25) == 1.5
    assert s.pacing_slot(2.0) == 2.0  # a slot in the past is now
    assert s.take_pacing_slot(2.0)  # late: the next slot counts from now, not from 1.5
    assert s.pacing_slot(2.0) == 2.25
    assert s.pacing_deferred() == 3


def test_pacing_is_shared_by_every_session(sched):
    s = sched.Scheduler()
    assert s.take_pacing_slot(5.0)  # session A's check
    assert not s.take_pacing_slot(5.0)  # session B must wait for the same slot
    slot = s.pacing_slot(5.0)
    assert slot == pytest.approx(5.020)
    assert s.take_pacing_slot(slot)  # B at its slot
    assert not s.take_pacing_slot(slot)  # A again: refused
    assert s.pacing_deferred() == 2


def test_pacing_does_not_touch_the_timers(sched):
    s = sched.Scheduler()
    s.schedule("a", 1.0)
    s.take_pacing_slot(0.0)
    s.take_pacing_slot(0.0)
    assert len(s) == 1 and s.next_deadline() == 1.0
    assert s.pop_due(1.0) == ["a"]
    assert s.pacing_deferred() == 1


def test_zero_interval_never_defers(sched):
    s = sched.Scheduler(0.0)
    assert all(s.take_pacing_slot(3.0) for _ in range(10))
    assert s.pacing_deferred() == 0
