"""The shared lock: mutual exclusion between processes and the lockstat
counters, for every lock kind."""

import os
import signal
import time

import pytest

import procs
from procs import lock_waiter_queued, wait_for
from virtio_py import LOCKSTAT_COLUMNS, Region, SharedLock
from virtio_py._lowlevel import ffi, lib
from virtio_py.lock import HIST_BUCKETS, bucket_bounds, hist_percentile, lock_histograms

KINDS = ["spin", "spinyield", "mutex", "pvspin"]
PROCS = 4
# A ticket spinlock with four processes on two cores hands the lock to
# waiters that are often not running: keep its share small.
ITERS = {"spin": 1500, "spinyield": 5000, "mutex": 5000, "pvspin": 5000}
# The kinds whose waiters sleep, and are woken by the unlocker.
SLEEPING = {"mutex", "pvspin"}
PV_WAITERS = lib.VP_LOCK_PV_WAITERS


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


def check_histograms(raw):
    """The hold histogram counts every acquisition, the wait histogram every
    contention, each in the log2 bucket of its time: the buckets with a count
    lie between the min and the max lockstat kept."""
    for kind, n in (("hold", raw["acquisitions"]), ("wait", raw["contentions"])):
        hist = raw[f"{kind}_hist"]
        assert len(hist) == HIST_BUCKETS
        assert sum(hist) == n, (kind, sum(hist), n)
        used = [b for b, c in enumerate(hist) if c]
        if not n:
            continue
        lo, hi = raw[f"{kind}_min"], raw[f"{kind}_max"]
        first_lo, first_hi = bucket_bounds(used[0])
        last_lo, last_hi = bucket_bounds(used[-1])
        assert first_lo <= lo and (first_hi is None or lo < first_hi)
        assert last_lo <= hi and (last_hi is None or hi < last_hi)
        p50, p99, p999 = (hist_percentile(hist, q, hi) for q in (50, 99, 99.9))
        assert lo <= p50 <= p99 <= p999 <= hi


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
        check_histograms(raw)
        # Every sleep a wake-up ended was counted by the unlocker that woke it.
        assert raw["sleeps"] == raw["wakeups"]
        if kind not in SLEEPING:
            assert raw["sleeps"] == 0
        lock.reset()
        assert lock.stats() == dict.fromkeys(LOCKSTAT_COLUMNS, 0)
        raw = lock.raw_stats()
        assert raw["hold_hist"] == raw["wait_hist"] == [0] * HIST_BUCKETS
        assert raw["sleeps"] == raw["wakeups"] == 0
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


def take_in_turn(name, me, log_gpa, go_gpa=None):
    """Take the lock once; under it, append me to the log (a count, then the
    entries), and, given go_gpa, hold it until byte me there is set."""
    r = Region.attach(name)
    lock = SharedLock.of_queue(r, 0)
    with lock:
        n = int.from_bytes(r.read(log_gpa, 8), "little")
        r.write_data(log_gpa + 8 + 8 * n, me.to_bytes(8, "little"))
        r.write_data(log_gpa, (n + 1).to_bytes(8, "little"))
        while go_gpa is not None and r.read(go_gpa + me, 1) == b"\0":
            time.sleep(0.001)
    r.close()
    return me


def _state(pid):
    """The process's state letter (/proc/PID/stat): S asleep, T stopped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _asleep(pid):
    return _state(pid) == "S"


def _sleeps_ended(pid):
    """How many times the process has gone to sleep (its voluntary context
    switches); None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None


def _queue_sleepers(r, kids, name, log, n, go=None):
    """With the lock held, start n take_in_turn waiters one after the other,
    each once the one before sleeps in line; return them."""
    sh = r.queue_shared(0)
    ks = []
    for i in range(n):
        ks.append(kids.start(take_in_turn, name, i, log, go))
        t = sh.lock.owner + 1 + i  # the ticket it takes
        wait_for(lambda t=t: sh.lock.next == t + 1, f"waiter {i} to take a ticket")
        # It announced the sleep in its ticket's word, then slept.
        wait_for(
            lambda t=t, k=ks[-1]: (
                sh.lock.pv_halted[t % PV_WAITERS] == (t << 1 | 1) and _asleep(k.pid)
            ),
            f"waiter {i} to sleep",
        )
    return ks


def _log(r, log):
    n = int.from_bytes(r.read(log, 8), "little")
    return [int.from_bytes(r.read(log + 8 + 8 * i, 8), "little") for i in range(n)]


def _stop(ks):
    for k in ks:
        os.kill(k.pid, signal.SIGSTOP)
    for k in ks:
        wait_for(lambda k=k: _state(k.pid) == "T", f"waiter {k.pid} to stop")


def _cont(ks):
    for k in ks:
        os.kill(k.pid, signal.SIGCONT)


def test_pvspin_unlock_wakes_the_next_ticket_only(name):
    """Three waiters queue on a held pvspin lock one after the other, and each
    spins, then goes to sleep, announced in its ticket's word.  Each unlock
    kicks the head of the line and no one else: with the waiters in line
    stopped for the unlock (else a sleeper's own look at the line every 2 ms
    decides whether a kick finds it asleep), it takes back the head's
    announcement and leaves every other; and they take the lock in the
    order they queued, every sleep a wake-up ended counted by its waker."""
    with Region.create(name, queue_size=8, data_size=1 << 16, lock="pvspin") as r:
        lock = SharedLock.of_queue(r, 0)
        sh = r.queue_shared(0)
        log = r.queue_info(0)["data"]
        go = log + 64
        first = sh.lock.owner + 1  # waiter i's ticket is first + i

        def word(i):
            return sh.lock.pv_halted[(first + i) % PV_WAITERS]

        with procs.Children() as kids:
            lock.acquire()
            ks = []
            try:
                ks = _queue_sleepers(r, kids, name, log, 3, go)
            finally:
                if len(ks) < 3:
                    lock.release()
            for j in range(4):  # the unlock of main, then of waiter j - 1
                line = ks[j:]
                _stop(line)
                try:
                    assert [word(i) for i in range(j, 3)] == [
                        (first + i) << 1 | 1 for i in range(j, 3)
                    ], "a waiter in line lost its announcement before its turn"
                    if j == 0:
                        lock.release()
                    else:
                        r.write_data(go + j - 1, b"\1")
                        assert ks[j - 1].join(timeout=60, watch=ks) == j - 1
                    # The head's announcement taken back, the others' kept.
                    assert [word(i) for i in range(j, 3)] == [
                        (first + i) << 1 | (i != j) for i in range(j, 3)
                    ]
                finally:
                    _cont(line)
                if j < 3:
                    wait_for(lambda j=j: len(_log(r, log)) == j + 1, f"waiter {j} to take the lock")
                    assert _log(r, log) == list(range(j + 1))
        assert _log(r, log) == [0, 1, 2]
        raw = lock.raw_stats()
        assert raw["acquisitions"] == 4 and raw["contentions"] == 3
        assert raw["sleeps"] == raw["wakeups"] and raw["takeovers"] == 0
        check_histograms(raw)


def test_pvspin_a_kick_wakes_the_sleeping_head(name):
    """The unlock's kick is a wake-up that reaches a waiter asleep in another
    process (a shared futex, on the head's word), counted by the unlocker
    and by the waiter.  A sleeper also wakes every 2 ms on its own to look at
    the line, and a kick that finds it up wakes no one: so rounds repeat
    until one kick found its head asleep."""
    with Region.create(name, queue_size=8, data_size=1 << 16, lock="pvspin") as r:
        lock = SharedLock.of_queue(r, 0)
        log = r.queue_info(0)["data"]
        for _ in range(50):
            lock.reset()
            r.write_data(log, bytes(8))
            with procs.Children() as kids:
                lock.acquire()
                ks = []
                try:
                    ks = _queue_sleepers(r, kids, name, log, 1)
                finally:
                    lock.release()
                assert ks[0].join(timeout=60) == 0
            raw = lock.raw_stats()
            assert raw["sleeps"] == raw["wakeups"] <= 1
            if raw["wakeups"]:
                break
        assert raw["sleeps"] == raw["wakeups"] == 1


# A sleeper in line wakes every VP_LOCK_CHECK_NS (2 ms) to look at the line;
# this many looks span twice VP_LOCK_STALL_NS (10 ms; REGION.md §13).
LOOKS_PAST_THE_STALL = 2 * 10_000_000 // 2_000_000


def test_pvspin_a_live_head_that_does_not_run_keeps_its_place(name):
    """The head of a pvspin line that is kicked but gets no CPU (here: stopped)
    is alive, and the waiters behind it, looking at the line many times over
    longer than VP_LOCK_STALL_NS while the lock lies free, do not skip it: it
    takes the lock first once it runs, and the line keeps its order.  (A head
    that is gone is skipped: test_lock_takeover.py.)"""
    with Region.create(name, queue_size=8, data_size=1 << 16, lock="pvspin") as r:
        lock = SharedLock.of_queue(r, 0)
        sh = r.queue_shared(0)
        log = r.queue_info(0)["data"]
        with procs.Children() as kids:
            lock.acquire()
            ks = []
            try:
                ks = _queue_sleepers(r, kids, name, log, 3)
                head = sh.lock.owner
                _stop(ks[:1])
            finally:
                lock.release()
            try:
                seen = [_sleeps_ended(k.pid) for k in ks[1:]]

                def looked_or_moved():
                    if sh.lock.owner != head or _log(r, log):
                        return True
                    now = [_sleeps_ended(k.pid) for k in ks[1:]]
                    return all(
                        b is not None and b - a >= LOOKS_PAST_THE_STALL for a, b in zip(seen, now)
                    )

                wait_for(looked_or_moved, "the waiters behind the head to look at the line")
                assert sh.lock.owner == head and _log(r, log) == []
            finally:
                _cont(ks[:1])
            assert [k.join(timeout=60, watch=ks) for k in ks] == [0, 1, 2]
        assert _log(r, log) == [0, 1, 2]
        raw = lock.raw_stats()
        assert raw["acquisitions"] == 4 and raw["contentions"] == 3
        assert raw["sleeps"] == raw["wakeups"] and raw["takeovers"] == 0
        check_histograms(raw)


@pytest.mark.parametrize("kind", sorted(SLEEPING))
def test_a_run_reports_distributions_and_wakeups_that_add_up(device, kind):
    """A guest run on a daemon's queue lock: the RFC's ten columns as they
    were, beside them hold and wait histograms whose counts are the
    acquisitions and the contentions (also after merging queues), the lock's
    sleeps each ended by a counted wake-up, and wake-ups per request that
    are the workers' voluntary context switches over the requests."""
    from virtio_py.workload import JobSpec, run_job

    d = device(lock=kind, exit="async", iodepth=2)
    res = run_job(
        JobSpec(d.name, workers=4, rw="randrw", bs=4096, iodepth=2, size=1 << 20,
                strategy="release", timeout=30.0)
    )  # fmt: skip
    assert res["config"]["lock"] == kind
    assert list(res["lockstat"]) == list(LOCKSTAT_COLUMNS)
    ls, lh = res["lockstat"], res["lock_hist"]
    assert lh["hold"]["count"] == ls["acquisitions"] > res["ios"] > 0
    assert lh["wait"]["count"] == ls["contentions"]
    assert (lh["hold"]["over"], lh["wait"]["over"]) == ("acquisitions", "contentions")
    assert sum(b["count"] for b in lh["hold"]["buckets"]) == ls["acquisitions"]
    for dist, col in ((lh["hold"], "holdtime"), (lh["wait"], "waittime")):
        assert dist["p50"] <= dist["p99"] <= dist["p99.9"] <= ls[f"{col}-max"]
    assert lh["sleeps"] == lh["wakeups"]
    wk = res["wakeups"]
    vol = sum(w["ctx_switches_voluntary"] for w in res["workers"])
    assert wk["guest_ctxsw_voluntary"] == vol > 0
    assert wk["guest_per_request"] == round(vol / res["ios"], 3)
    assert wk["lock_sleeps"] == lh["sleeps"] and wk["lock_wakeups"] == lh["wakeups"]
    assert wk["lock_sleeps"] <= vol  # each lock sleep is a voluntary switch of a worker


def test_histograms_of_several_locks_add_up():
    """merge_lockstats adds histograms bucket by bucket, like the counts, and
    pooled runs keep counting every acquisition."""
    from virtio_py.lock import merge_lockstats, pool_histograms

    def raw(hold, wait):
        hist_h = [0] * HIST_BUCKETS
        hist_w = [0] * HIST_BUCKETS
        for v in hold:
            hist_h[v.bit_length() if v < 1 << (HIST_BUCKETS - 1) else HIST_BUCKETS - 1] += 1
        for v in wait:
            hist_w[v.bit_length()] += 1
        return {
            "con_bounces": 0, "contentions": len(wait), "wait_min": min(wait, default=0),
            "wait_max": max(wait, default=0), "wait_total": sum(wait), "acq_bounces": 0,
            "acquisitions": len(hold), "hold_min": min(hold), "hold_max": max(hold),
            "hold_total": sum(hold), "hold_hist": hist_h, "wait_hist": hist_w,
            "sleeps": 1, "wakeups": 1,
        }  # fmt: skip

    a = raw([100, 200, 3000], [50])
    b = raw([0, 1, 1 << 50], [7, 9000])
    m = merge_lockstats([a, b])
    assert m["acquisitions"] == sum(m["hold_hist"]) == 6
    assert m["contentions"] == sum(m["wait_hist"]) == 3
    assert m["hold_hist"][0] == 1 and m["hold_hist"][HIST_BUCKETS - 1] == 1
    assert m["sleeps"] == m["wakeups"] == 2
    h = lock_histograms(m)
    assert h["hold"]["count"] == 6 and h["wait"]["count"] == 3
    # Percentiles are bucket upper edges (us, two decimals), capped at the
    # max: the median of the six holds is the third, 100 ns, in [64, 128);
    # the top wait, 9000 ns, is in [8192, 16384), above its max.
    assert h["hold"]["p50"] == 0.13
    assert h["wait"]["p99.9"] == 9.0
    pooled = pool_histograms([lock_histograms(a), lock_histograms(b)])
    assert pooled["hold"]["count"] == 6 and pooled["wait"]["count"] == 3
    assert pooled["hold"]["p50"] == h["hold"]["p50"]
    assert pooled["sleeps"] == 2


def test_repeats_keep_histogram_counts_equal_to_the_combined_columns():
    """compare's medians over repeats: the combined run's histogram counts are
    its (median) acquisitions and contentions, no percentile exceeds its
    max, and the pooled buckets count every repeat's acquisitions."""
    from virtio_py.compare import combine
    from virtio_py.lock import LOCKSTAT_FIELDS, lockstat_from_raw

    def rep(holds, waits, iops):
        hist_h, hist_w = [0] * HIST_BUCKETS, [0] * HIST_BUCKETS
        for v in holds:
            hist_h[v.bit_length()] += 1
        for v in waits:
            hist_w[v.bit_length()] += 1
        raw = {
            "con_bounces": 0, "contentions": len(waits), "wait_min": min(waits),
            "wait_max": max(waits), "wait_total": sum(waits), "acq_bounces": 0,
            "acquisitions": len(holds), "hold_min": min(holds), "hold_max": max(holds),
            "hold_total": sum(holds), "hold_hist": hist_h, "wait_hist": hist_w,
            "sleeps": 2, "wakeups": 2,
        }  # fmt: skip
        base = dict.fromkeys(
            ("mbps", "wall_s", "bytes", "requests_added", "requests_completed", "kicks",
             "kicks_suppressed", "kicks_taken", "interrupts", "interrupts_suppressed",
             "kicks_per_request", "interrupts_per_request", "lock_acquisitions_per_request",
             "guest_cpu_s", "guest_cpu_pct", "guest_cpu_pct_of_machine",
             "guest_cpu_us_per_request", "host_cpu_s", "host_cpu_pct",
             "host_cpu_us_per_request", "errors", "dup_completions", "queue_full"),
            0,
        )  # fmt: skip
        base.update(
            iops=iops, ios=len(holds), lockstat=lockstat_from_raw(raw),
            lockstat_ns={f: raw[f] for f in LOCKSTAT_FIELDS}, latency_us={"p50": 1.0},
            time_ms={}, lock_hist=lock_histograms(raw),
        )  # fmt: skip
        return base

    reps = [
        rep([100] * 5 + [5_000_000], [300] * 2, 10.0),  # one preempted holder: 5 ms
        rep([120] * 7, [200] * 3 + [900], 20.0),
        rep([90] * 9, [250] * 4, 30.0),
    ]
    out = combine(reps)
    lh, ls = out["lock_hist"], out["lockstat"]
    assert lh["hold"]["count"] == ls["acquisitions"] == 7
    assert lh["wait"]["count"] == ls["contentions"] == 4
    for kind, col in (("hold", "holdtime"), ("wait", "waittime")):
        assert lh[kind]["max"] == ls[f"{col}-max"]
        assert lh[kind]["p50"] <= lh[kind]["p99"] <= lh[kind]["p99.9"] <= lh[kind]["max"]
    # The preempted holder is one count in a far bucket of the pool.
    assert lh["pooled"]["hold"]["count"] == 6 + 7 + 9
    assert lh["pooled"]["wait"]["count"] == 2 + 4 + 4
    assert lh["pooled"]["hold"]["buckets"][-1] == {
        "lo_ns": 1 << 22, "hi_ns": 1 << 23, "count": 1,
    }  # fmt: skip
    assert lh["hold"]["p99"] < 1.0  # microseconds: the 5 ms hold does not decide it
    assert [r["lock_hist"]["hold"]["count"] for r in out["repeats"]] == [6, 7, 9]
