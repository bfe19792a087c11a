"""The parent of a run: fork the workers, start them together, watch them,
stop them (also on Ctrl-C) and gather what they report.

All workers on a queue share that queue and its lock on both paths, as
virtio_blk's do_virtblk_request and virtblk_done share vblk->lock; with a
multi-queue device worker i uses queue i % queues (blk-mq style).  The
parent synchronises the start with a barrier and resets the lock
statistics between "ready" and "go".
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._lowlevel import lib
from ..children import stop_signals_blocked
from ..errors import ConfigError, DeviceGoneError, VirtioError
from ..limits import SECTOR
from ..lock import SharedLock, merge_lockstats
from ..proc import proc_cpu_seconds
from ..region import Region
from .crash import CrashSpec, crash_from_env
from .report import proc_ctx_switches, summarise
from .spec import JobSpec, plan_areas
from .worker import worker_main

if TYPE_CHECKING:
    from ..vhost_front import VhostUserDisk

# progress(label, elapsed seconds, runtime or None, requests completed)
Progress = Callable[[str, float, "float | None", int], None]


class JobError(VirtioError):
    """A worker failed; the message says which and why."""


def queue_counters(region: Region, q: int) -> dict[str, int]:
    """The driver's and the device's counters of queue q."""
    sh = region.queue_shared(q)
    d, v, nd = sh.drv, sh.dev, sh.nd
    return {
        # VIRTIO_F_NOTIFICATION_DATA: the device's doorbell counters
        "nd_doorbells": nd.doorbells,
        "nd_reordered": nd.reordered,
        "nd_misdirected": nd.misdirected,
        "nd_waiting": nd.waiting,
        "nd_stalls": nd.stalls,
        "nd_stall_ns": nd.stall_ns,
        "nd_rereads": nd.rereads,
        "nd_held_back": sh.bell.held_back,
        "added": d.added,
        "completed": d.completed,
        "kicks": d.kicks,
        "kicks_suppressed": d.kicks_suppressed,
        "kicks_taken": v.kicks_taken,
        "interrupts": v.interrupts,
        "interrupts_suppressed": v.interrupts_suppressed,
        "bytes_read": v.bytes_read,
        "bytes_written": v.bytes_written,
    }


def run_job(
    spec: JobSpec,
    progress: Progress | None = None,
    label: str | None = None,
    device: VhostUserDisk | None = None,
) -> dict[str, Any]:
    """Run a job on a device whose daemon is running; returns the result dict
    (see report.summarise).

    device: a vhost-user device this process opened (its region's name is
    spec.name); the workers kick and take interrupts through its eventfds,
    and a back-end that goes away fails the run with DeviceGoneError.

    progress(label, elapsed, runtime, ios): called about 4 times a second
    while the workers run (for the terminal).  Ctrl-C stops the workers
    cleanly and re-raises KeyboardInterrupt.
    """
    spec.check()
    if device is not None:
        if device.name != spec.name:
            raise ConfigError(f"job for {spec.name!r} on vhost-user device {device.name!r}")
        device.raise_if_gone()
        return _run(spec, device.region, progress, label or spec.strategy, device)
    region = Region.attach(spec.name)
    try:
        return _run(spec, region, progress, label or spec.strategy)
    finally:
        region.close()


def _cpu_seconds(pid: int) -> float:
    """A device process's CPU so far; 0 when it is unknown or gone."""
    try:
        return proc_cpu_seconds(pid) if pid > 0 else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


def _run(
    spec: JobSpec,
    region: Region,
    progress: Progress | None,
    label: str,
    device: VhostUserDisk | None = None,
) -> dict[str, Any]:
    capacity = region.header.blk.capacity * SECTOR
    areas = plan_areas(spec, capacity)
    nq = region.num_queues
    queues = [i % nq for i in range(spec.workers)]
    used_q = sorted(set(queues))
    notify_fds = None
    if device is not None:
        notify_fds = device.queue_fds()
        daemon_pid = device.backend_pid
    else:
        daemon_pid = region.daemon_pid
        if daemon_pid <= 0:
            raise ConfigError(f"device {spec.name!r} has no daemon serving it")
    crash = crash_from_env(spec.workers)
    ctx = multiprocessing.get_context("fork")
    # The victim's death time (CLOCK_MONOTONIC ns), shared with every worker.
    died = ctx.RawValue(ctypes.c_uint64, 0)
    barrier = ctx.Barrier(spec.workers + 1)
    done_barrier = ctx.Barrier(spec.workers)
    stop = ctx.RawValue(ctypes.c_int32, 0)
    procs: list[Any] = []
    conns: list[Any] = []
    results: list[dict[str, Any] | None] = [None] * spec.workers
    try:
        for i in range(spec.workers):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=worker_main,
                name=f"virtio-emu-worker-{i}",
                args=(i, spec, queues[i], areas[i][0], areas[i][1], barrier, done_barrier,
                      stop, w, notify_fds, crash, ctypes.addressof(died)),
            )  # fmt: skip
            # A Ctrl-C during the fork is raised once it is over, not dropped
            # in an at-fork hook; the worker unblocks once it ignores SIGINT.
            with stop_signals_blocked():
                p.start()
                w.close()
                procs.append(p)
                conns.append(r)
        try:
            _parent_wait(barrier)  # every worker attached and ready
        except Exception:
            _collect(conns, procs, results, 10)
            raise JobError(_failure(results) or "workers did not get ready") from None
        locks = [SharedLock.of_queue(region, q) for q in used_q]
        for lk in locks:
            lk.reset()
        for q in used_q:
            # The run's own longest stall: the device only ever raises it,
            # and nothing is in flight between runs.
            region.queue_shared(q).nd.stall_max_ns = 0
        c0 = {q: queue_counters(region, q) for q in used_q}
        d0 = _cpu_seconds(daemon_pid)
        x0 = proc_ctx_switches(daemon_pid) if daemon_pid > 0 else None
        t0 = time.monotonic()
        t0_ns = lib.vp_now_ns()
        _parent_wait(barrier)  # go
        cut = _wait_for_workers(spec, region, used_q, c0, conns, procs, results, t0, stop,
                                progress, label, device, done_barrier)  # fmt: skip
        t1 = time.monotonic()
        d1 = _cpu_seconds(daemon_pid)
        x1 = proc_ctx_switches(daemon_pid) if daemon_pid > 0 else None
        c1 = {q: queue_counters(region, q) for q in used_q}
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
    if device is not None and (cut or (failure and not device.check())):
        raise DeviceGoneError(f"{device.gone}; {failure}" if failure else str(device.gone))
    if failure:
        raise JobError(failure)
    done = [r for r in results if r is not None and "killed" not in r]
    killed = [r for r in results if r is not None and "killed" in r]
    if not done:
        raise JobError(f"every worker was killed ({killed[0]['killed']})")
    switches = {k: x1[k] - x0[k] for k in x1} if x0 and x1 else None
    res = summarise(spec, region, done, raw, c0, c1, d1 - d0, t1 - t0, used_q, daemon_ctx=switches)
    res["killed"] = [_death(k, crash, died.value, t0_ns) for k in killed]
    res["crash"] = _crash_figures(crash, died.value, done) if crash is not None else None
    if device is not None:
        _vhost_user_figures(res, device)
    return res


def _lost(i: int, proc: Any, done_barrier: Any) -> dict[str, Any]:
    """The result of worker i, which ended without reporting.  Killed by a
    signal, it is a death the others carry on through (the queue lock
    survives its holder), and nobody waits for it at the end; any other
    end is the run's failure."""
    code = proc.exitcode
    if code is not None and code < 0:
        if done_barrier is not None:
            done_barrier.abort()
        return {"worker": i, "pid": proc.pid, "killed": _signame(-code), "seen_ns": lib.vp_now_ns()}
    return {"error": f"worker {i} (pid {proc.pid}) died (exit code {code}) without reporting"}


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _death(k: dict[str, Any], crash: CrashSpec | None, died_ns: int, t0_ns: int) -> dict[str, Any]:
    """A killed worker as the result reports it: whether the crash run
    armed its death, and when it died (seconds into the run: the victim's
    own clock when armed, else when the parent saw it)."""
    armed = crash is not None and k["worker"] == crash.worker and died_ns > 0
    at = (died_ns if armed else k["seen_ns"]) - t0_ns
    return {
        "worker": k["worker"],
        "pid": k["pid"],
        "signal": k["killed"],
        "armed": armed,
        "at_s": round(at / 1e9, 4),
    }


def _crash_figures(crash: CrashSpec, died_ns: int, done: list[dict[str, Any]]) -> dict[str, Any]:
    """What a crash run shows: where the victim died, and when the others
    resumed: the first queue lock acquisition by any of them after the
    death (None if none came)."""
    after = [r["resumed_ns"] for r in done if r.get("resumed_ns", 0) >= died_ns > 0]
    return {
        "point": crash.point,
        "n": crash.n,
        "worker": crash.worker,
        "died": died_ns > 0,
        "resume_ms": round((min(after) - died_ns) / 1e6, 3) if after else None,
        "resumed_workers": len(after),
    }


def _vhost_user_figures(res: dict[str, Any], device: VhostUserDisk) -> None:
    """What a vhost-user back-end does not count in the region: interrupts
    are the ones the guests' interrupt threads took (several calls the
    back-end sends between two reads of the eventfd are one interrupt, as
    for an MSI-X vector)."""
    irqs = sum(w["irqs"] for w in res["workers"])
    res["interrupts"] = irqs
    res["interrupts_per_request"] = round(irqs / max(res["ios"], 1), 4)
    res["config"].update(
        {
            "transport": "vhost-user",
            "served_by": f"vhost-user {device.path}",
            "backend": device.path,
            "backend_pid": device.backend_pid,
        }
    )


def _parent_wait(barrier: Any, timeout: float = 60) -> None:
    """The parent's barrier.wait.  A Ctrl-C inside the multiprocessing
    barrier's own locking can come out as an AssertionError ("lock is not
    owned") whose context is the KeyboardInterrupt: it is still a Ctrl-C."""
    try:
        barrier.wait(timeout=timeout)
    except AssertionError as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def _failure(results: list[dict[str, Any] | None]) -> str | None:
    """One line for the workers that reported an error, or None."""
    errs = [r["error"].splitlines()[0] for r in results if r and "error" in r]
    if len(errs) > 1:
        return f"{len(errs)} workers failed; first: {errs[0]}"
    return errs[0] if errs else None


def _collect(conns: list[Any], procs: list[Any], results: list[Any], timeout: float) -> None:
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


def _wait_for_workers(
    spec: JobSpec,
    region: Region,
    used_q: list[int],
    c0: dict[int, dict[str, int]],
    conns: list[Any],
    procs: list[Any],
    results: list[Any],
    t0: float,
    stop: Any,
    progress: Progress | None,
    label: str,
    device: VhostUserDisk | None = None,
    done_barrier: Any = None,
) -> bool:
    """Collect every worker's result; True when the device went away while
    they ran (they were stopped: what they finished is not the job)."""
    last = 0.0
    interrupted = False
    cut = False
    hard_deadline = None
    while any(r is None for r in results):
        try:
            for i, c in enumerate(conns):
                if results[i] is None:
                    if c.poll(0):
                        try:
                            results[i] = c.recv()
                        except EOFError:
                            procs[i].join(1)
                            results[i] = _lost(i, procs[i], done_barrier)
                    elif not procs[i].is_alive() and not c.poll(0):
                        results[i] = _lost(i, procs[i], done_barrier)
            if device is not None and not device.check():
                # The workers' waits fail now (daemon_pid is 0); stop the
                # rest (whose requests may all complete before they see it).
                stop.value = 1
                cut = True
            now = time.monotonic()
            if hard_deadline and now > hard_deadline:
                raise JobError("workers did not stop")
            if progress and now - last >= 0.25:
                last = now
                done = sum(
                    queue_counters(region, q)["completed"] - c0[q]["completed"] for q in used_q
                )
                progress(label, now - t0, spec.runtime, done)
            time.sleep(0.02)
        except KeyboardInterrupt:
            # Ask the workers to stop, let them drain, then re-raise.
            stop.value = 1
            interrupted = True
            hard_deadline = time.monotonic() + spec.timeout
    if interrupted:
        raise KeyboardInterrupt
    return cut
