"""Guest workload processes: dd- and fio-like jobs on a running device.

``run_job(JobSpec(...))`` forks ``workers`` separate OS processes.  Each one
attaches to the device's region by name, opens a virtqueue and a guest slot
(with its own interrupt thread, see ``GuestSlot``) and keeps ``iodepth``
requests in flight until the runtime is over or its area was read/written
once.  All workers on a queue share that queue and its lock on both paths,
as virtio_blk's do_virtblk_request and virtblk_done share vblk->lock; with
a multi-queue device worker i uses queue i % queues (blk-mq style).

The inner loop is C (``vp_guest_run`` in csrc/workload.c): Python costs
several microseconds per request, as much as the whole device round trip on
a memory store, so it would measure the interpreter, not the kick path.
``engine="python"`` keeps a Python loop over the same C calls to show that.

The parent synchronises the start with a barrier, resets the lock
statistics between "ready" and "go", and gathers everything a run measures
into one dict (see ``run_job``).
"""
import ctypes
import dataclasses
import errno
import math
import multiprocessing
import os
import resource
import signal
import threading
import time
import traceback

import numpy as np

from ._lowlevel import check, ffi, lib
from .blk import GuestSlot, acct_dict
from .errors import ConfigError, VirtioError
from .lock import LOCKSTAT_COLUMNS, SharedLock, lockstat_from_raw
from .region import Region
from .virtqueue import STRATEGIES, Virtqueue

RW_MODES = {"read": lib.VP_RW_READ, "write": lib.VP_RW_WRITE,
            "randread": lib.VP_RW_RANDREAD, "randwrite": lib.VP_RW_RANDWRITE,
            "randrw": lib.VP_RW_RANDRW}
VERIFY_KINDS = {lib.VP_VERIFY_UNWRITTEN: "never written (all zeros)",
                lib.VP_VERIFY_CORRUPT: "corrupt (bad stamp or checksum)",
                lib.VP_VERIFY_MISPLACED: "misplaced (stamp of another sector)",
                lib.VP_VERIFY_STALE: "stale (stamp of another seed)"}
ENGINES = ("c", "python")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
SECTOR = 512
LAT_SAMPLES = 1 << 20       # latencies kept per worker (a uniform sample beyond)
_RESULT_FIELDS = ("issued", "ios", "reads", "writes", "bytes_read", "bytes_written", "errors",
                  "short_reads", "dup_completions", "queue_full", "verified", "verify_failures",
                  "verify_unwritten", "first_bad_sector", "first_bad_kind",
                  "first_error_status", "lat_recorded", "lat_max_ns", "lat_total_ns",
                  "t_start_ns", "t_end_ns", "rc")


@dataclasses.dataclass
class JobSpec:
    """One job: what every worker does.

    size: bytes of each worker's area (fio's size); worker i works on
    [offset + i*size, offset + (i+1)*size).  Without runtime each worker goes
    through its area once; with runtime it goes round it until the time is up
    (fio's time_based).  Neither: one pass over capacity/workers each.
    """
    name: str
    workers: int = 4
    rw: str = "read"
    bs: int = 4096
    iodepth: int = 1
    runtime: float = None
    size: int = None
    offset: int = 0
    verify: bool = False
    verify_seed: int = 0x5eed
    rwmix_read: int = 50
    strategy: str = "hold"
    engine: str = "c"
    seed: int = 1
    timeout: float = 30.0
    lat_samples: int = LAT_SAMPLES

    def check(self):
        if not 1 <= self.workers <= lib.VP_MAX_SLOTS:
            raise ConfigError(f"workers must be 1 to {lib.VP_MAX_SLOTS}, not {self.workers}")
        if self.rw not in RW_MODES:
            raise ConfigError(f"rw must be one of {', '.join(RW_MODES)}, not {self.rw!r}")
        if self.bs <= 0 or self.bs % SECTOR:
            raise ConfigError(f"bs must be a positive multiple of {SECTOR}, not {self.bs}")
        if not 1 <= self.iodepth <= lib.VP_MAX_TAGS:
            raise ConfigError(f"iodepth must be 1 to {lib.VP_MAX_TAGS}, not {self.iodepth}")
        if self.runtime is not None and not (self.runtime > 0 and math.isfinite(self.runtime)):
            raise ConfigError(f"runtime must be positive and finite, not {self.runtime}")
        if self.size is not None and (self.size < self.bs or self.size % SECTOR):
            raise ConfigError(f"size must be a multiple of {SECTOR} and at least bs, "
                              f"not {self.size}")
        if self.offset < 0 or self.offset % SECTOR:
            raise ConfigError(f"offset must be a non-negative multiple of {SECTOR}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, "
                              f"not {self.strategy!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not 0 <= self.rwmix_read <= 100:
            raise ConfigError(f"rwmix_read must be 0 to 100, not {self.rwmix_read}")
        if not 0 <= self.verify_seed < 1 << 64:
            raise ConfigError(f"verify seed must be 0 to 2**64-1, not {self.verify_seed}")
        return self


# ---------------------------------------------------------------- helpers
def proc_cpu_seconds(pid):
    """utime + stime of a whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _queue_counters(region, q):
    sh = region.queue_shared(q)
    d, v = sh.drv, sh.dev
    return {"added": d.added, "completed": d.completed, "kicks": d.kicks,
            "kicks_suppressed": d.kicks_suppressed, "kicks_taken": v.kicks_taken,
            "interrupts": v.interrupts, "interrupts_suppressed": v.interrupts_suppressed,
            "bytes_read": v.bytes_read, "bytes_written": v.bytes_written}


def merge_lockstats(raws):
    """One lockstat row for a lock class from several locks' raw counters
    (ns), as lockstat does for &vblk->vqs[i].lock."""
    out = {}
    for f in ("con_bounces", "contentions", "wait_total", "acq_bounces", "acquisitions",
              "hold_total"):
        out[f] = sum(r[f] for r in raws)
    for f, cnt in (("wait_min", "contentions"), ("hold_min", "acquisitions")):
        vals = [r[f] for r in raws if r[cnt]]
        out[f] = min(vals) if vals else 0
    out["wait_max"] = max((r["wait_max"] for r in raws), default=0)
    out["hold_max"] = max((r["hold_max"] for r in raws), default=0)
    return out


def set_pdeathsig(sig=signal.SIGKILL):
    """Get sig when the parent dies (a worker left spinning on the lock helps
    nobody; a daemon is asked to clean up)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def percentiles(lat_ns):
    """p50/p90/p99/p99.9 in microseconds of a latency sample (ns)."""
    if len(lat_ns) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0}
    p = np.percentile(np.asarray(lat_ns, dtype=np.float64) / 1000.0, [50, 90, 99, 99.9])
    return {"p50": round(float(p[0]), 2), "p90": round(float(p[1]), 2),
            "p99": round(float(p[2]), 2), "p99.9": round(float(p[3]), 2)}


# ---------------------------------------------------------------- worker
def _python_loop(slot, params, res, lat, cap, stop):
    """The same job as vp_guest_run, with the loop in Python (engine=python)."""
    g = slot._g
    submit, wait_any, now = lib.vp_guest_blk_submit, lib.vp_guest_wait_any, lib.vp_now_ns
    status, ln = ffi.new("uint8_t *"), ffi.new("uint32_t *")
    bad = ffi.new("uint64_t *")
    bs, depth, rw, verify = params.bs, params.iodepth, params.rw, params.verify
    nblocks = params.area_len // bs
    base = params.area_off // SECTOR
    spb = bs // SECTOR
    rand = rw in (lib.VP_RW_RANDREAD, lib.VP_RW_RANDWRITE, lib.VP_RW_RANDRW)
    rng = np.random.default_rng(params.seed)
    rblocks = rng.integers(0, nblocks, size=65536)
    rwrite = rng.integers(0, 100, size=65536) >= params.rwmix_read
    always_write = rw in (lib.VP_RW_WRITE, lib.VP_RW_RANDWRITE)
    mixed = rw == lib.VP_RW_RANDRW
    t_sub = [0] * depth
    sec = [-1] * depth
    wr = [False] * depth
    free = list(range(depth - 1, -1, -1))
    busy = 0
    pos = issued = ios = 0
    max_ios, deadline, timeout = params.max_ios, params.deadline_ns, params.timeout_ns
    lat_max = lat_total = 0
    ctr = dict.fromkeys(("reads", "writes", "errors", "short_reads", "dup", "verified",
                         "vfail", "vunw", "qfull"), 0)
    first_bad = (0, 0)
    first_err = 0
    stopping = False
    full_since = 0
    t_start = now()
    while True:
        while not stopping and free:
            if (max_ios and issued >= max_ios) or stop.value or (deadline and now() >= deadline):
                stopping = True
                break
            tag = free.pop()
            k = issued & 65535
            if rand:
                blk = int(rblocks[k])
                s = base + blk * spb
                while s in sec:          # never two requests on one block at once
                    blk = (blk + 1) % nblocks
                    s = base + blk * spb
            else:
                s = base + (pos % nblocks) * spb
                pos += 1
            w = always_write or (mixed and bool(rwrite[k]))
            if w and verify:
                lib.vp_verify_fill(lib.vp_guest_data_ptr(g, tag), s, bs, params.verify_seed)
            sec[tag], wr[tag] = s, w
            t_sub[tag] = now()
            r = submit(g, tag, lib.VIRTIO_BLK_T_OUT if w else lib.VIRTIO_BLK_T_IN, s, bs,
                       slot.strategy)
            if r == -errno.ENOSPC:       # ring full: retry once something completed
                free.append(tag)
                sec[tag] = -1
                ctr["qfull"] += 1
                if not rand:
                    pos -= 1
                if not busy:
                    # Nothing of ours to wait for: retry after the others'
                    # completions, as long as we would wait for our own.
                    if not full_since:
                        full_since = now()
                    elif timeout >= 0 and now() - full_since >= timeout:
                        res.rc = -errno.ETIMEDOUT
                        stopping = True
                    os.sched_yield()
                break
            full_since = 0
            if r:
                res.rc = r
                free.append(tag)
                stopping = True
                break
            busy |= 1 << tag
            issued += 1
        if not busy:
            if stopping:
                break
            continue      # the ring was full: try again
        tag = wait_any(g, busy, timeout, status, ln)
        t = now()
        if tag < 0:
            res.rc = tag
            break
        if not busy >> tag & 1:
            ctr["dup"] += 1
            continue
        busy &= ~(1 << tag)
        free.append(tag)
        d = t - t_sub[tag]
        lat_max = max(lat_max, d)
        lat_total += d
        if ios < cap:
            lat[ios] = min(d, 0xFFFFFFFF)
        ios += 1
        s = sec[tag]
        sec[tag] = -1
        if status[0] != lib.VIRTIO_BLK_S_OK:
            ctr["errors"] += 1
            first_err = first_err or status[0]
            continue
        if wr[tag]:
            ctr["writes"] += 1
            continue
        ctr["reads"] += 1
        if ln[0] != bs + 1:
            ctr["short_reads"] += 1
        if verify:
            kind = lib.vp_verify_check(lib.vp_guest_data_ptr(g, tag), s, bs,
                                       params.verify_seed, bad)
            if kind == lib.VP_VERIFY_UNWRITTEN and mixed:
                ctr["vunw"] += 1
            elif kind:
                ctr["vfail"] += 1
                if ctr["vfail"] == 1:
                    first_bad = (bad[0], kind)
            else:
                ctr["verified"] += 1
    res.t_start_ns, res.t_end_ns = t_start, now()
    res.issued, res.ios = issued, ios
    res.reads, res.writes = ctr["reads"], ctr["writes"]
    res.bytes_read, res.bytes_written = ctr["reads"] * bs, ctr["writes"] * bs
    res.errors, res.short_reads, res.dup_completions = ctr["errors"], ctr["short_reads"], ctr["dup"]
    res.queue_full = ctr["qfull"]
    res.verified, res.verify_failures, res.verify_unwritten = (ctr["verified"], ctr["vfail"],
                                                               ctr["vunw"])
    res.first_bad_sector, res.first_bad_kind = first_bad
    res.first_error_status = first_err
    res.lat_recorded = min(ios, cap)
    res.lat_max_ns, res.lat_total_ns = lat_max, lat_total
    return res.rc


def _worker(idx, spec, queue, area_off, area_len, barrier, done_barrier, stop, conn):
    """Body of worker process idx: attach, get ready, run, report, leave."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us via `stop`
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_pdeathsig()
    region = vq = slot = None
    out = {"worker": idx, "pid": os.getpid(), "queue": queue}
    try:
        region = Region.attach(spec.name)
        vq = Virtqueue(region, queue)
        slot = GuestSlot(vq, depth=spec.iodepth, strategy=spec.strategy)
        if spec.bs > slot.max_data:
            raise ConfigError(f"bs {spec.bs} is larger than a request buffer "
                              f"({slot.max_data} bytes at iodepth {spec.iodepth})")
        out["slot"] = slot.slot
        params = ffi.new("struct vp_run_params *")
        params.rw = RW_MODES[spec.rw]
        params.bs = spec.bs
        params.iodepth = spec.iodepth
        params.verify = int(spec.verify)
        params.rwmix_read = spec.rwmix_read
        params.area_off = area_off
        params.area_len = area_len
        params.max_ios = 0 if spec.runtime else area_len // spec.bs
        params.seed = (spec.seed * 0x9E3779B97F4A7C15 + idx + 1) & (2**64 - 1) or 1
        params.verify_seed = spec.verify_seed
        params.timeout_ns = int(spec.timeout * 1e9)
        params.stop = ffi.cast("volatile int32_t *", ctypes.addressof(stop))
        res = ffi.new("struct vp_run_result *")
        cap = spec.lat_samples
        if not spec.runtime:
            cap = min(cap, params.max_ios)
        lat = np.zeros(max(cap, 1), dtype=np.uint32)
        lat_p = ffi.cast("uint32_t *", lat.ctypes.data)
        acct = ffi.new("struct vp_acct *")
        delivered0 = slot.vq.region.queue_shared(queue).slot[slot.slot].delivered

        barrier.wait()          # ready
        # Before "go": once any worker runs, our interrupt thread may reap.
        irq0 = slot.irq_acct()
        barrier.wait()          # go: the parent has reset the statistics
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        rt0 = resource.getrusage(resource.RUSAGE_THREAD)
        if spec.runtime:
            params.deadline_ns = lib.vp_now_ns() + int(spec.runtime * 1e9)
        lib.vp_acct_set(acct)
        try:
            if spec.engine == "c":
                rc = lib.vp_guest_run(slot._g, slot.strategy, params, res, lat_p, cap)
            else:
                rc = _python_loop(slot, params, res, lat, cap, stop)
        finally:
            lib.vp_acct_set(ffi.NULL)
        rt1 = resource.getrusage(resource.RUSAGE_THREAD)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        # Our interrupt thread may still reap for others: count its work
        # once every worker has seen all its completions.
        try:
            done_barrier.wait(timeout=spec.timeout + 30)
        except threading.BrokenBarrierError:
            pass
        irq1 = slot.irq_acct()
        out.update({f: getattr(res, f) for f in _RESULT_FIELDS})
        out["delivered"] = (slot.vq.region.queue_shared(queue).slot[slot.slot].delivered
                            - delivered0)
        out["acct_main"] = acct_dict(acct)
        out["acct_irq"] = {k: irq1[k] - irq0[k] for k in irq1}
        out["cpu_user"] = ru1.ru_utime - ru0.ru_utime
        out["cpu_sys"] = ru1.ru_stime - ru0.ru_stime
        out["cpu_main"] = (rt1.ru_utime - rt0.ru_utime) + (rt1.ru_stime - rt0.ru_stime)
        out["ctx_vol"] = ru1.ru_nvcsw - ru0.ru_nvcsw
        out["ctx_invol"] = ru1.ru_nivcsw - ru0.ru_nivcsw
        out["lat"] = lat[:res.lat_recorded].copy()
        if rc < 0:
            out["error"] = f"worker {idx}: {_errtext(rc)}"
    except BaseException as e:   # report, never unwind into the parent's code
        for b in (barrier, done_barrier):
            try:
                b.abort()
            except Exception:
                pass
        out["error"] = (f"worker {idx}: {e}" if isinstance(e, VirtioError)
                        else f"worker {idx}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    try:
        conn.send(out)
        conn.close()
    except Exception:
        pass
    # Slots close (irq thread joined) after the report, off the clock.
    for o in (slot, vq, region):
        try:
            if o is not None:
                o.close()
        except Exception:
            pass
    os._exit(0)


def _errtext(rc):
    try:
        check(rc, "")
    except VirtioError as e:
        return str(e).lstrip(": ")
    return str(rc)


# ---------------------------------------------------------------- parent
class JobError(VirtioError):
    """A worker failed; the message says which and why."""


def plan_areas(spec, capacity):
    """(offset, length) of each worker's area in bytes."""
    if spec.offset >= capacity:
        raise ConfigError(f"offset {spec.offset} is beyond the disk ({capacity} bytes)")
    size = spec.size
    if size is None:
        size = (capacity - spec.offset) // spec.workers
    size -= size % spec.bs
    if size < spec.bs:
        raise ConfigError(f"the disk ({capacity} bytes) is too small for {spec.workers} "
                          f"workers of bs {spec.bs}")
    end = spec.offset + size * spec.workers
    if end > capacity:
        raise ConfigError(f"{spec.workers} workers x size {size} from offset {spec.offset} "
                          f"need {end} bytes; the disk has {capacity}")
    return [(spec.offset + i * size, size) for i in range(spec.workers)]


def run_job(spec, progress=None, label=None):
    """Run a job on a device whose daemon is running; returns the result dict.

    progress(label, elapsed, runtime, ios): called about 4 times a second
    while the workers run (for the terminal).  Ctrl-C stops the workers
    cleanly and re-raises KeyboardInterrupt.
    """
    spec.check()
    region = Region.attach(spec.name)
    try:
        return _run(spec, region, progress, label or spec.strategy)
    finally:
        region.close()


def _run(spec, region, progress, label):
    h = region.header
    capacity = h.blk.capacity * SECTOR
    areas = plan_areas(spec, capacity)
    nq = region.num_queues
    queues = [i % nq for i in range(spec.workers)]
    used_q = sorted(set(queues))
    daemon_pid = region.daemon_pid
    if daemon_pid <= 0:
        raise ConfigError(f"device {spec.name!r} has no daemon serving it")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(spec.workers + 1)
    done_barrier = ctx.Barrier(spec.workers)
    stop = ctx.RawValue(ctypes.c_int32, 0)
    procs, conns = [], []
    results = [None] * spec.workers
    try:
        for i in range(spec.workers):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, name=f"virtio-emu-worker-{i}",
                            args=(i, spec, queues[i], areas[i][0], areas[i][1], barrier,
                                  done_barrier, stop, w))
            p.start()
            w.close()
            procs.append(p)
            conns.append(r)
        try:
            _parent_wait(barrier)             # every worker attached and ready
        except Exception:
            _collect(conns, procs, results, 10)
            raise JobError(_failure(results) or "workers did not get ready") from None
        locks = [SharedLock.of_queue(region, q) for q in used_q]
        for lk in locks:
            lk.reset()
        c0 = {q: _queue_counters(region, q) for q in used_q}
        d0 = proc_cpu_seconds(daemon_pid)
        t0 = time.monotonic()
        _parent_wait(barrier)                 # go
        _wait_for_workers(spec, region, used_q, c0, conns, procs, results, t0, stop,
                          progress, label)
        t1 = time.monotonic()
        d1 = proc_cpu_seconds(daemon_pid)
        c1 = {q: _queue_counters(region, q) for q in used_q}
        raw = merge_lockstats([lk.raw_stats() for lk in locks])
    except BaseException:
        stop.value = 1
        try:
            barrier.abort()
        except Exception:
            pass
        _collect(conns, procs, results, 5)
        raise
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
    failure = _failure(results)
    if failure:
        raise JobError(failure)
    return summarise(spec, region, results, raw, c0, c1, d1 - d0, t1 - t0, used_q)


def _parent_wait(barrier, timeout=60):
    """The parent's barrier.wait.  A Ctrl-C inside the multiprocessing
    barrier's own locking can come out as an AssertionError ("lock is not
    owned") whose context is the KeyboardInterrupt: it is still a Ctrl-C."""
    try:
        barrier.wait(timeout=timeout)
    except AssertionError as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def _failure(results):
    """One line for the workers that reported an error, or None."""
    errs = [r["error"].splitlines()[0] for r in results if r and "error" in r]
    if len(errs) > 1:
        return f"{len(errs)} workers failed; first: {errs[0]}"
    return errs[0] if errs else None


def _collect(conns, procs, results, timeout):
    deadline = time.monotonic() + timeout
    for i, c in enumerate(conns):
        while results[i] is None and time.monotonic() < deadline:
            try:
                if c.poll(0.1):
                    results[i] = c.recv()
                elif not procs[i].is_alive() and not c.poll(0):
                    break
            except (EOFError, OSError):
                break


def _wait_for_workers(spec, region, used_q, c0, conns, procs, results, t0, stop, progress,
                      label):
    last = 0.0
    interrupted = False
    hard_deadline = None
    while any(r is None for r in results):
        try:
            for i, c in enumerate(conns):
                if results[i] is None:
                    if c.poll(0):
                        try:
                            results[i] = c.recv()
                        except EOFError:
                            results[i] = {"error": f"worker {i} died without reporting"}
                    elif not procs[i].is_alive() and not c.poll(0):
                        code = procs[i].exitcode
                        results[i] = {"error": f"worker {i} (pid {procs[i].pid}) died "
                                               f"(exit code {code}) without reporting"}
            now = time.monotonic()
            if hard_deadline and now > hard_deadline:
                raise JobError("workers did not stop")
            if progress and now - last >= 0.25:
                last = now
                done = sum(_queue_counters(region, q)["completed"] - c0[q]["completed"]
                           for q in used_q)
                progress(label, now - t0, spec.runtime, done)
            time.sleep(0.02)
        except KeyboardInterrupt:
            # Ask the workers to stop, let them drain, then re-raise.
            stop.value = 1
            interrupted = True
            hard_deadline = time.monotonic() + spec.timeout
    if interrupted:
        raise KeyboardInterrupt


def summarise(spec, region, results, raw, c0, c1, daemon_cpu, wall_parent, used_q):
    """Everything a run measures, as one JSON-ready dict."""
    delta = {k: sum(c1[q][k] - c0[q][k] for q in used_q) for k in c0[used_q[0]]}
    t_start = min(r["t_start_ns"] for r in results)
    t_end = max(r["t_end_ns"] for r in results)
    wall = max((t_end - t_start) / 1e9, 1e-9)
    ios = sum(r["ios"] for r in results)
    nbytes = sum(r["bytes_read"] + r["bytes_written"] for r in results)
    lat = np.concatenate([r["lat"] for r in results]) if results else np.zeros(0)
    lat_pct = percentiles(lat)
    lat_pct["max"] = round(max(r["lat_max_ns"] for r in results) / 1000.0, 2)
    # Of every request, not of the sample.
    lat_pct["mean"] = round(sum(r["lat_total_ns"] for r in results) / max(ios, 1) / 1000.0, 2)
    per_req = max(ios, 1)
    workers = []
    cpu_total = 0.0
    for r in results:
        m, q = r["acct_main"], r["acct_irq"]
        w_wall = max((r["t_end_ns"] - r["t_start_ns"]) / 1e9, 1e-9)
        cpu = r["cpu_user"] + r["cpu_sys"]
        cpu_total += cpu
        workers.append({
            "worker": r["worker"], "pid": r["pid"], "queue": r["queue"], "slot": r["slot"],
            "ios": r["ios"], "issued": r["issued"], "reads": r["reads"], "writes": r["writes"],
            "errors": r["errors"], "dup_completions": r["dup_completions"],
            "queue_full": r["queue_full"],
            "delivered": r["delivered"], "iops": round(r["ios"] / w_wall, 1),
            "wall_s": round(w_wall, 4),
            "cpu_user_s": round(r["cpu_user"], 4), "cpu_sys_s": round(r["cpu_sys"], 4),
            "cpu_pct": round(100.0 * cpu / w_wall, 1),
            "cpu_main_s": round(r["cpu_main"], 4),
            "cpu_irq_s": round(max(cpu - r["cpu_main"], 0.0), 4),
            "ctx_switches_voluntary": r["ctx_vol"], "ctx_switches_involuntary": r["ctx_invol"],
            # where the time went, ms (main thread + interrupt thread)
            "lock_wait_ms": round((m["lock_wait_ns"] + q["lock_wait_ns"]) / 1e6, 3),
            "lock_hold_ms": round((m["lock_hold_ns"] + q["lock_hold_ns"]) / 1e6, 3),
            "kick_ms": round(m["kick_ns"] / 1e6, 3),
            "io_wait_ms": round(m["io_wait_ns"] / 1e6, 3),
            "lock_acquisitions": m["lock_acquisitions"] + q["lock_acquisitions"],
            "kicks": m["kicks"], "irqs": q["irqs"], "reaped": m["reaped"] + q["reaped"],
            "acct_main": m, "acct_irq": q,
            "verified": r["verified"], "verify_failures": r["verify_failures"],
            "verify_unwritten": r["verify_unwritten"],
        })
    vfail = [r for r in results if r["verify_failures"]]
    verify = None
    if spec.verify:
        verify = {"verified": sum(r["verified"] for r in results),
                  "failures": sum(r["verify_failures"] for r in results),
                  "unwritten": sum(r["verify_unwritten"] for r in results), "first": None}
        if vfail:
            r = vfail[0]
            verify["first"] = {"worker": r["worker"], "sector": r["first_bad_sector"],
                               "offset": r["first_bad_sector"] * SECTOR,
                               "kind": VERIFY_KINDS.get(r["first_bad_kind"], "?")}
    h = region.header
    lockstat = lockstat_from_raw(raw)
    out = {
        "strategy": spec.strategy,
        "config": {
            "device": spec.name, "workers": spec.workers, "rw": spec.rw, "bs": spec.bs,
            "iodepth": spec.iodepth, "runtime": spec.runtime, "size": spec.size,
            "verify": spec.verify, "engine": spec.engine,
            "queues": region.num_queues, "queues_used": len(used_q),
            "exit": region.exit_mode, "exit_cost_us": h.exit_cost_ns / 1000.0,
            "mode": region.serve_mode, "lock": region.lock_kind, "event_idx": region.event_idx,
            "cpus": NCPU,
        },
        "lockstat": lockstat,
        "lockstat_ns": raw,
        "ios": ios,
        "bytes": nbytes,
        "wall_s": round(wall, 4),
        "iops": round(ios / wall, 1),
        "mbps": round(nbytes / wall / 1e6, 2),
        "latency_us": lat_pct,
        "kicks": delta["kicks"],
        "kicks_suppressed": delta["kicks_suppressed"],
        "kicks_taken": delta["kicks_taken"],
        "interrupts": delta["interrupts"],
        "interrupts_suppressed": delta["interrupts_suppressed"],
        "kicks_per_request": round(delta["kicks"] / per_req, 4),
        "interrupts_per_request": round(delta["interrupts"] / per_req, 4),
        "requests_added": delta["added"],
        "requests_completed": delta["completed"],
        "lock_acquisitions_per_request": round(lockstat["acquisitions"] / per_req, 3),
        "guest_cpu_s": round(cpu_total, 4),
        "guest_cpu_pct": round(100.0 * cpu_total / wall, 1),
        "guest_cpu_pct_of_machine": round(100.0 * cpu_total / wall / NCPU, 1),
        "guest_cpu_us_per_request": round(cpu_total / per_req * 1e6, 2),
        "host_cpu_s": round(daemon_cpu, 4),
        "host_cpu_pct": round(100.0 * daemon_cpu / wall_parent, 1),
        "host_cpu_us_per_request": round(daemon_cpu / per_req * 1e6, 2),
        "time_ms": {k: round(sum(w[k] for w in workers), 3)
                    for k in ("lock_wait_ms", "lock_hold_ms", "kick_ms", "io_wait_ms")},
        "errors": sum(r["errors"] for r in results),
        "dup_completions": sum(r["dup_completions"] for r in results),
        "queue_full": sum(r["queue_full"] for r in results),
        "verify": verify,
        "workers": workers,
    }
    return out


# ---------------------------------------------------------------- text
def format_result(res):
    """A human-readable report of one run."""
    c = res["config"]
    lines = [
        f"{c['device']}: {c['workers']} workers, rw={c['rw']} bs={c['bs']} "
        f"iodepth={c['iodepth']} strategy={res['strategy']} engine={c['engine']}; "
        f"device: {c['queues']} queue(s), exit {c['exit']}"
        f"{' +%gus' % c['exit_cost_us'] if c['exit_cost_us'] else ''}, {c['mode']}, "
        f"lock {c['lock']}, event_idx {'on' if c['event_idx'] else 'off'}",
        f"  {res['ios']} requests in {res['wall_s']:.3f} s: {res['iops']:.0f} IOPS, "
        f"{res['mbps']:.2f} MB/s",
    ]
    lt = res["latency_us"]
    lines.append(f"  latency us: p50 {lt['p50']:.1f}  p99 {lt['p99']:.1f}  "
                 f"max {lt['max']:.1f}  mean {lt['mean']:.1f}")
    lines.append(f"  kicks {res['kicks']} ({res['kicks_per_request']:.3f}/req, "
                 f"{res['kicks_suppressed']} suppressed); interrupts {res['interrupts']} "
                 f"({res['interrupts_per_request']:.3f}/req, {res['interrupts_suppressed']} "
                 f"suppressed)")
    lines.append(f"  guest CPU {res['guest_cpu_s']:.3f} s = {res['guest_cpu_pct']:.1f}% of one "
                 f"CPU ({res['guest_cpu_pct_of_machine']:.1f}% of {c['cpus']}), "
                 f"{res['guest_cpu_us_per_request']:.1f} us/req; host daemon CPU "
                 f"{res['host_cpu_s']:.3f} s = {res['host_cpu_pct']:.1f}%")
    ls = res["lockstat"]
    lines.append("  lockstat " + " ".join(f"{k}={ls[k]}" for k in LOCKSTAT_COLUMNS))
    lines.append("  worker    pid    ios  user_s   sys_s  cpu%  lockwait_ms lockhold_ms "
                 "  kick_ms  iowait_ms  irqs  reaped")
    for w in res["workers"]:
        lines.append(f"  {w['worker']:>6} {w['pid']:>6} {w['ios']:>6} {w['cpu_user_s']:7.3f} "
                     f"{w['cpu_sys_s']:7.3f} {w['cpu_pct']:5.1f} {w['lock_wait_ms']:12.3f} "
                     f"{w['lock_hold_ms']:11.3f} {w['kick_ms']:9.3f} {w['io_wait_ms']:10.3f} "
                     f"{w['irqs']:5d} {w['reaped']:7d}")
    if res["errors"]:
        lines.append(f"  I/O errors: {res['errors']}")
    v = res["verify"]
    if v is not None:
        if v["failures"]:
            f = v["first"]
            lines.append(f"  VERIFY FAILED: {v['failures']} blocks; first at sector {f['sector']} "
                         f"(byte {f['offset']}, worker {f['worker']}): {f['kind']}")
        else:
            lines.append(f"  verify: {v['verified']} blocks good"
                         + (f", {v['unwritten']} not yet written" if v["unwritten"] else ""))
    return "\n".join(lines)
