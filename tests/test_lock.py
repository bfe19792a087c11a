"""The shared lock: mutual exclusion between processes and the lockstat
counters, for every lock kind."""

import os

import pytest

import procs
from procs import lock_waiter_queued, wait_for
from virtio_py import LOCKSTAT_COLUMNS, Region, SharedLock
from virtio_py._lowlevel import ffi

KINDS = ["spin", "spinyield", "mutex"]
PROCS = 4
# A ticket spinlock with four processes on two cores hands the lock to
# waiters that are often not running: keep its share small.
ITERS = {"spin": 1500, "spinyield": 5000, "mutex": 5000}


def hammer(name, iters, counter_gpa, go_gpa):
    """Take the lock iters times; under it, a read-modify-write of a plain
    counter in the data area (two separate copies, not an atomic)."""
    r = Region.attach(name)
    lock = SharedLock.of_queue(r, 0)
    while r.read(go_gpa, 1) == b"\0":
        pass
    for _ in range(iters):
        with lock:
            v = int.from_bytes(r.read(counter_gpa, 8), "little")
            r.write_data(counter_gpa, (v + 1).to_bytes(8, "little"))
    r.close()
    return iters


def check_invariants(st):
    assert list(st) == list(LOCKSTAT_COLUMNS)
    assert st["contentions"] <= st["acquisitions"]
    assert st["con-bounces"] <= st["contentions"]
    assert st["acq-bounces"] <= st["acquisitions"]
    for t in ("waittime", "holdtime"):
        lo, hi, total = st[f"{t}-min"], st[f"{t}-max"], st[f"{t}-total"]
        assert 0 <= lo <= hi <= total, (t, lo, hi, total)
    if st["contentions"] == 0:
        assert st["waittime-min"] == st["waittime-max"] == st["waittime-total"] == 0
    else:
        assert st["waittime-total"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_four_processes(name, kind):
    iters = ITERS[kind]
    with Region.create(name, queue_size=8, data_size=1 << 16, lock=kind) as r:
        lock = SharedLock.of_queue(r, 0)
        assert lock.kind == kind
        data = r.queue_info(0)["data"]
        counter, go = data, data + 64
        with procs.Children() as kids:
            ks = [kids.start(hammer, name, iters, counter, go) for _ in range(PROCS)]
            r.write_data(go, b"\1")
            assert [k.join(timeout=150, watch=ks) for k in ks] == [iters] * PROCS
        # Mutual exclusion: no increment was lost.
        assert int.from_bytes(r.read(counter, 8), "little") == PROCS * iters
        st = lock.stats()
        check_invariants(st)
        # Counted exactly: the counters are only written by the holder.
        assert st["acquisitions"] == PROCS * iters
        assert st["holdtime-total"] > 0 and st["holdtime-min"] <= st["holdtime-max"]
        raw = lock.raw_stats()
        assert raw["acquisitions"] == PROCS * iters
        assert raw["hold_min"] <= raw["hold_max"] <= raw["hold_total"]
        assert raw["wait_min"] <= raw["wait_max"] <= raw["wait_total"]
        # Microseconds with two decimals, from the nanoseconds kept.
        assert st["holdtime-total"] == round(raw["hold_total"] / 1000, 2)
        assert st["waittime-max"] == round(raw["wait_max"] / 1000, 2)
        lock.reset()
        assert lock.stats() == dict.fromkeys(LOCKSTAT_COLUMNS, 0)
        assert r.queue_shared(0).lock.last_cpu == -1
        # The lock still works after a reset, and counts from zero.
        with lock:
            pass
        st = lock.stats()
        assert st["acquisitions"] == 1 and st["contentions"] == 0
        assert st["holdtime-min"] == st["holdtime-max"] == st["holdtime-total"]


def _cpus():
    return sorted(os.sched_getaffinity(0))


def contender(name, cpu):
    os.sched_setaffinity(0, {cpu})
    r = Region.attach(name)
    lock = SharedLock.of_queue(r, 0)
    lock.acquire()
    lock.release()
    r.close()
    return os.sched_getaffinity(0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_contention_and_bounce(name, kind):
    """One acquisition that finds the lock taken, on another CPU: exactly
    one contention, one con-bounce and one acq-bounce."""
    cpus = _cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to see a bounce")
    assert ffi.offsetof("struct vp_lock", "last_cpu") == 20, "region.h changed"
    saved = os.sched_getaffinity(0)
    with Region.create(name, queue_size=8, data_size=1 << 16, lock=kind) as r:
        lock = SharedLock.of_queue(r, 0)
        try:
            os.sched_setaffinity(0, {cpus[0]})
            with procs.Children() as kids:
                lock.acquire()
                try:
                    assert not lock_waiter_queued(r)
                    kid = kids.start(contender, name, cpus[1])
                    wait_for(lambda: lock_waiter_queued(r), "the waiter to queue")
                finally:
                    lock.release()
                assert kid.join(timeout=60) == {cpus[1]}
        finally:
            os.sched_setaffinity(0, saved)
        st = lock.stats()
        check_invariants(st)
        assert st["acquisitions"] == 2
        assert st["contentions"] == 1
        assert st["con-bounces"] == 1 and st["acq-bounces"] == 1
        assert st["waittime-min"] == st["waittime-max"] == st["waittime-total"]
        raw = lock.raw_stats()
        assert raw["wait_min"] == raw["wait_max"] == raw["wait_total"] > 0
        assert r.queue_shared(0).lock.last_cpu == cpus[1]
        # Uncontended, on one CPU: no contention, no bounce.
        lock.reset()
        os.sched_setaffinity(0, {cpus[0]})
        try:
            for _ in range(100):
                with lock:
                    pass
        finally:
            os.sched_setaffinity(0, saved)
        st = lock.stats()
        assert st["acquisitions"] == 100
        assert st["contentions"] == st["con-bounces"] == st["acq-bounces"] == 0
