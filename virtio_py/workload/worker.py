"""A worker process: attach to the device, get ready, run the job's loop,
report, leave.

Each worker attaches to the device's region by name, opens a virtqueue and
a guest slot (with its own interrupt thread, see ``GuestSlot``) and keeps
``iodepth`` requests in flight until the runtime is over or its area was
read/written once.  The parent (runner.py) forks it and synchronises the
start with a barrier.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import threading
import traceback
from typing import Any

import numpy as np

from .._lowlevel import check, ffi, lib
from ..blk import GuestSlot, acct_dict
from ..children import unblock_stop_signals
from ..cpus import allowed, format_cpus, pin
from ..errors import ConfigError, VirtioError
from ..proc import set_pdeathsig
from ..region import Region
from ..virtqueue import Virtqueue
from .crash import CrashSpec, arm_worker, resumed_ns
from .engine import run_engine
from .spec import RW_MODES, JobSpec

RESULT_FIELDS = (
    "issued", "ios", "reads", "writes", "bytes_read", "bytes_written", "errors", "short_reads",
    "dup_completions", "queue_full", "verified", "verify_failures", "verify_unwritten",
    "first_bad_sector", "first_bad_kind", "first_error_status", "lat_recorded", "lat_max_ns",
    "lat_total_ns", "t_start_ns", "t_end_ns", "rc",
)  # fmt: skip


def run_params(spec: JobSpec, idx: int, area_off: int, area_len: int, stop: Any) -> Any:
    """The C loop's parameters for worker idx (struct vp_run_params)."""
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
    return params


def worker_main(
    idx: int,
    spec: JobSpec,
    queue: int,
    area_off: int,
    area_len: int,
    barrier: Any,
    done_barrier: Any,
    stop: Any,
    conn: Any,
    notify_fds: dict[int, tuple[int, int]] | None = None,
    crash: CrashSpec | None = None,
    died_addr: int = 0,
) -> None:
    """Body of worker process idx; it reports one dict through conn and exits.

    notify_fds: {queue: (kick_fd, call_fd)} of a vhost-user device, inherited
    from the parent (default: the region's named semaphores).  crash: a crash
    run (crash.py): the victim is armed, the others watch the word at
    died_addr (shared with the parent)."""
    # The parent stops us via `stop`; it forked us with both blocked.
    unblock_stop_signals(sigint=signal.SIG_IGN)
    set_pdeathsig()
    region = slot = None
    vq: Virtqueue | None = None
    out: dict[str, Any] = {"worker": idx, "pid": os.getpid(), "queue": queue}
    try:
        pin(spec.cpus)  # before the interrupt thread starts: it inherits it
        out["cpus"] = format_cpus(allowed())
        region = Region.attach(spec.name)
        if notify_fds is not None:
            from ..vhost_front import EventfdVirtqueue

            vq = EventfdVirtqueue(region, queue, *notify_fds[queue])
        else:
            vq = Virtqueue(region, queue)
        if spec.nd_remedy != "none":
            vq.set_nd_remedy(spec.nd_remedy)
        slot = GuestSlot(vq, depth=spec.iodepth, strategy=spec.strategy)
        slot.halt_poll_us = spec.halt_poll_us
        if spec.bs > slot.max_data:
            raise ConfigError(
                f"bs {spec.bs} is larger than a request buffer "
                f"({slot.max_data} bytes at iodepth {spec.iodepth})"
            )
        out["slot"] = slot.slot
        params = run_params(spec, idx, area_off, area_len, stop)
        res = ffi.new("struct vp_run_result *")
        cap = spec.lat_samples
        if not spec.runtime:
            cap = min(cap, params.max_ios)
        lat = np.zeros(max(cap, 1), dtype=np.uint32)
        acct = ffi.new("struct vp_acct *")
        delivered0 = region.queue_shared(queue).slot[slot.slot].delivered
        if crash is not None:
            arm_worker(crash, idx, died_addr)

        barrier.wait()  # ready
        # Before "go": once any worker runs, our interrupt thread may reap.
        irq0 = slot.irq_acct()
        barrier.wait()  # go: the parent has reset the statistics
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        rt0 = resource.getrusage(resource.RUSAGE_THREAD)
        if spec.runtime:
            params.deadline_ns = lib.vp_now_ns() + int(spec.runtime * 1e9)
        lib.vp_acct_set(acct)
        try:
            rc = run_engine(spec.engine, slot, params, res, lat, cap, stop)
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
        out.update({f: getattr(res, f) for f in RESULT_FIELDS})
        out["delivered"] = region.queue_shared(queue).slot[slot.slot].delivered - delivered0
        out["acct_main"] = acct_dict(acct)
        out["acct_irq"] = {k: irq1[k] - irq0[k] for k in irq1}
        out["cpu_user"] = ru1.ru_utime - ru0.ru_utime
        out["cpu_sys"] = ru1.ru_stime - ru0.ru_stime
        out["cpu_main"] = (rt1.ru_utime - rt0.ru_utime) + (rt1.ru_stime - rt0.ru_stime)
        out["ctx_vol"] = ru1.ru_nvcsw - ru0.ru_nvcsw
        out["ctx_invol"] = ru1.ru_nivcsw - ru0.ru_nivcsw
        out["lat"] = lat[: res.lat_recorded].copy()
        out["resumed_ns"] = resumed_ns() if crash is not None else 0
        if rc < 0:
            out["error"] = f"worker {idx}: {_errtext(rc)}"
    except BaseException as e:  # report, never unwind into the parent's code
        for b in (barrier, done_barrier):
            try:
                b.abort()
            except Exception:
                pass
        out["error"] = (
            f"worker {idx}: {e}"
            if isinstance(e, VirtioError)
            else f"worker {idx}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        )
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


def _errtext(rc: int) -> str:
    try:
        check(rc, "")
    except VirtioError as e:
        return str(e).lstrip(": ")
    return str(rc)
