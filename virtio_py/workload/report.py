"""What a run reports: the one result dict of a job, its text, its JSON file,
and the one-line description of a configuration that every report opens with."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._lowlevel import lib
from ..cpus import format_cpus
from ..limits import SECTOR
from ..lock import (
    LOCKSTAT_COLUMNS,
    LOCKSTAT_FIELDS,
    PERCENTILES,
    lock_histograms,
    lockstat_from_raw,
)
from ..region import Region
from ..units import format_size
from ..virtqueue import nd_behaviour
from .spec import JobSpec

NCPU = os.cpu_count() or 1
VERIFY_KINDS = {
    lib.VP_VERIFY_UNWRITTEN: "never written (all zeros)",
    lib.VP_VERIFY_CORRUPT: "corrupt (bad stamp or checksum)",
    lib.VP_VERIFY_MISPLACED: "misplaced (stamp of another sector)",
    lib.VP_VERIFY_STALE: "stale (stamp of another seed)",
}


def describe(cfg: Mapping[str, Any]) -> str:
    """One line for a configuration: the job, the device, and the store when
    cfg names one (a run's "config", or a compare row's)."""
    line = (
        f"{cfg['workers']} workers, {cfg['rw']} bs={format_size(cfg['bs'])} "
        f"iodepth={cfg['iodepth']}, {cfg['queues']} queue(s), exit {cfg['exit']}"
    )
    if cfg.get("exit_cost_us"):
        line += f" +{cfg['exit_cost_us']:g}us"
    # A vhost-user back-end serves its own way: no mode of ours, and its
    # store is one raw file.
    served = cfg.get("served_by")
    line += f", {served or cfg['mode']}"
    line += f", event_idx {'on' if cfg['event_idx'] else 'off'}, lock {cfg['lock']}"
    if cfg.get("daemon_cpus"):
        line += f", daemon on CPUs {cfg['daemon_cpus']}"
    if cfg.get("guest_cpus"):
        line += f", workers on CPUs {cfg['guest_cpus']}"
    if cfg.get("halt_poll_us"):
        line += f", halt polling up to {cfg['halt_poll_us']:g} us"
    if cfg.get("store") is not None:
        line += f", store {cfg['store']}"
        if served:
            line += " (raw file)"
        elif cfg["store"] == "disk" and "stripes" in cfg:
            line += f" ({cfg['stripes']}x{format_size(cfg['chunk'])} stripes)"
    return line


def percentiles(lat_ns: Any) -> dict[str, float]:
    """p50/p90/p99/p99.9 in microseconds of a latency sample (ns)."""
    if len(lat_ns) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0}
    p = np.percentile(np.asarray(lat_ns, dtype=np.float64) / 1000.0, [50, 90, 99, 99.9])
    return {
        "p50": round(float(p[0]), 2),
        "p90": round(float(p[1]), 2),
        "p99": round(float(p[2]), 2),
        "p99.9": round(float(p[3]), 2),
    }


def proc_ctx_switches(pid: int) -> dict[str, int] | None:
    """Voluntary and involuntary context switches of every thread of a
    process so far (/proc/PID/task/*/status), or None if it cannot be read.
    A voluntary switch is a sleep: each is one wake-up to come."""
    tot = {"voluntary": 0, "involuntary": 0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        tot["voluntary"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        tot["involuntary"] += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return tot


def wakeups(
    results: Sequence[Mapping[str, Any]],
    ios: int,
    lock_hist: Mapping[str, Any],
    daemon_ctx: Mapping[str, int] | None,
) -> dict[str, Any]:
    """Wake-ups of a run, in total and per request.  Every voluntary context
    switch is a sleep that a wake-up ended: the guest's are the workers' (main
    and interrupt thread, getrusage), the host's the daemon's threads'; the
    lock's sleeps are among the guest's."""
    per = max(ios, 1)
    g_vol = sum(r["ctx_vol"] for r in results)
    g_inv = sum(r["ctx_invol"] for r in results)
    # waits that halt polling ended before a sleep (GuestSlot.halt_poll_us)
    polled = sum(r["acct_main"]["polled"] for r in results)
    out: dict[str, Any] = {
        "guest_ctxsw_voluntary": g_vol,
        "guest_ctxsw_involuntary": g_inv,
        "guest_per_request": round(g_vol / per, 3),
        "host_ctxsw_voluntary": None,
        "host_ctxsw_involuntary": None,
        "host_per_request": None,
        "lock_sleeps": lock_hist.get("sleeps", 0),
        "lock_wakeups": lock_hist.get("wakeups", 0),
        "lock_sleeps_per_request": round(lock_hist.get("sleeps", 0) / per, 3),
        "halt_polled": polled,
        "halt_polled_per_request": round(polled / per, 3),
    }
    if daemon_ctx is not None:
        out["host_ctxsw_voluntary"] = daemon_ctx["voluntary"]
        out["host_ctxsw_involuntary"] = daemon_ctx["involuntary"]
        out["host_per_request"] = round(daemon_ctx["voluntary"] / per, 3)
    return out


def _worker_row(r: Mapping[str, Any]) -> dict[str, Any]:
    m, q = r["acct_main"], r["acct_irq"]
    w_wall = max((r["t_end_ns"] - r["t_start_ns"]) / 1e9, 1e-9)
    cpu = r["cpu_user"] + r["cpu_sys"]
    return {
        "worker": r["worker"], "pid": r["pid"], "queue": r["queue"], "slot": r["slot"],
        "cpus": r.get("cpus"),
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
        "kicks": m["kicks"], "irqs": m["irqs"] + q["irqs"], "reaped": m["reaped"] + q["reaped"],
        "halt_polled": m["polled"], "halt_poll_ms": round(m["poll_ns"] / 1e6, 3),
        "acct_main": m, "acct_irq": q,
        "verified": r["verified"], "verify_failures": r["verify_failures"],
        "verify_unwritten": r["verify_unwritten"],
    }  # fmt: skip


def nd_summary(
    spec: JobSpec, region: Region, delta: Mapping[str, int], used_q: Sequence[int]
) -> dict[str, Any] | None:
    """The notification-data figures of a run (None when not negotiated):
    reordered doorbells per million notifications, requests left waiting
    past a notification, their stall time, the device's behaviour."""
    if not region.notification_data:
        return None
    sh = [region.queue_shared(q) for q in used_q]
    kicks = max(delta["kicks"], 1)
    return {
        "device": nd_behaviour(int(sh[0].nd.behaviour)),
        "reread_ms": int(sh[0].nd.reread_ms),
        "remedy": spec.nd_remedy,
        "notifications": delta["kicks"],
        "doorbells": delta["nd_doorbells"],
        "reordered": delta["nd_reordered"],
        "reordered_per_million": round(delta["nd_reordered"] * 1e6 / kicks, 1),
        "misdirected": delta["nd_misdirected"],
        "waiting": delta["nd_waiting"],
        "stalls": delta["nd_stalls"],
        "stall_total_ms": round(delta["nd_stall_ns"] / 1e6, 3),
        "stall_max_ms": round(max(int(s.nd.stall_max_ns) for s in sh) / 1e6, 3),
        "rereads": delta["nd_rereads"],
        "held_back": delta["nd_held_back"],
    }


def summarise(
    spec: JobSpec,
    region: Region,
    results: Sequence[Mapping[str, Any]],
    raw: Mapping[str, int],
    c0: Mapping[int, Mapping[str, int]],
    c1: Mapping[int, Mapping[str, int]],
    daemon_cpu: float,
    wall_parent: float,
    used_q: Sequence[int],
    daemon_ctx: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Everything a run measures, as one JSON-ready dict.  raw: the merged
    lock counters (``merge_lockstats``), histograms included; daemon_ctx:
    the daemon's context switches over the run ({"voluntary", "involuntary"},
    see ``proc_ctx_switches``), if they were sampled."""
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
    workers = [_worker_row(r) for r in results]
    cpu_total = sum(r["cpu_user"] + r["cpu_sys"] for r in results)
    vfail = [r for r in results if r["verify_failures"]]
    verify = None
    if spec.verify:
        verify = {
            "verified": sum(r["verified"] for r in results),
            "failures": sum(r["verify_failures"] for r in results),
            "unwritten": sum(r["verify_unwritten"] for r in results),
            "first": None,
        }
        if vfail:
            r = vfail[0]
            verify["first"] = {
                "worker": r["worker"],
                "sector": r["first_bad_sector"],
                "offset": r["first_bad_sector"] * SECTOR,
                "kind": VERIFY_KINDS.get(r["first_bad_kind"], "?"),
            }
    h = region.header
    lockstat = lockstat_from_raw(raw)
    lock_hist = lock_histograms(raw)
    return {
        "strategy": spec.strategy,
        "config": {
            "device": spec.name, "workers": spec.workers, "rw": spec.rw, "bs": spec.bs,
            "iodepth": spec.iodepth, "runtime": spec.runtime, "size": spec.size,
            "verify": spec.verify, "engine": spec.engine,
            "queues": region.num_queues, "queues_used": len(used_q),
            "exit": region.exit_mode, "exit_cost_us": h.exit_cost_ns / 1000.0,
            "mode": region.serve_mode, "lock": region.lock_kind, "event_idx": region.event_idx,
            "cpus": NCPU,
            "guest_cpus": None if spec.cpus is None else format_cpus(spec.cpus),
            "halt_poll_us": spec.halt_poll_us,
        },
        "lockstat": lockstat,
        "lockstat_ns": {f: raw[f] for f in LOCKSTAT_FIELDS},
        "lock_hist": lock_hist,
        "lock_takeovers": raw.get("takeovers", 0),
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
        "wakeups": wakeups(results, ios, lock_hist, daemon_ctx),
        "guest_cpu_s": round(cpu_total, 4),
        "guest_cpu_pct": round(100.0 * cpu_total / wall, 1),
        "guest_cpu_pct_of_machine": round(100.0 * cpu_total / wall / NCPU, 1),
        "guest_cpu_us_per_request": round(cpu_total / per_req * 1e6, 2),
        "host_cpu_s": round(daemon_cpu, 4),
        "host_cpu_pct": round(100.0 * daemon_cpu / wall_parent, 1),
        "host_cpu_us_per_request": round(daemon_cpu / per_req * 1e6, 2),
        "time_ms": {
            k: round(sum(w[k] for w in workers), 3)
            for k in ("lock_wait_ms", "lock_hold_ms", "kick_ms", "io_wait_ms")
        },
        "errors": sum(r["errors"] for r in results),
        "dup_completions": sum(r["dup_completions"] for r in results),
        "queue_full": sum(r["queue_full"] for r in results),
        "notification_data": nd_summary(spec, region, delta, used_q),
        "verify": verify,
        "workers": workers,
    }  # fmt: skip


def format_result(res: Mapping[str, Any]) -> str:
    """A human-readable report of one run."""
    c = res["config"]
    lines = [
        f"{c['device']}: {describe(c)}; strategy {res['strategy']}, engine {c['engine']}",
        f"  {res['ios']} requests in {res['wall_s']:.3f} s: {res['iops']:.0f} IOPS, "
        f"{res['mbps']:.2f} MB/s",
    ]
    lt = res["latency_us"]
    lines.append(
        f"  latency us: p50 {lt['p50']:.1f}  p99 {lt['p99']:.1f}  "
        f"max {lt['max']:.1f}  mean {lt['mean']:.1f}"
    )
    lines.append(
        f"  kicks {res['kicks']} ({res['kicks_per_request']:.3f}/req, "
        f"{res['kicks_suppressed']} suppressed); interrupts {res['interrupts']} "
        f"({res['interrupts_per_request']:.3f}/req, {res['interrupts_suppressed']} "
        f"suppressed)"
    )
    lines.append(
        f"  guest CPU {res['guest_cpu_s']:.3f} s = {res['guest_cpu_pct']:.1f}% of one "
        f"CPU ({res['guest_cpu_pct_of_machine']:.1f}% of {c['cpus']}), "
        f"{res['guest_cpu_us_per_request']:.1f} us/req; host daemon CPU "
        f"{res['host_cpu_s']:.3f} s = {res['host_cpu_pct']:.1f}%"
    )
    wk = res.get("wakeups")
    if wk:
        host = "?" if wk["host_per_request"] is None else f"{wk['host_per_request']:.2f}"
        lines.append(
            f"  wake-ups per request (voluntary context switches): guest "
            f"{wk['guest_per_request']:.2f}, host daemon {host}; lock sleeps "
            f"{wk['lock_sleeps_per_request']:.3f} ({wk['lock_sleeps']} sleeps, "
            f"{wk['lock_wakeups']} wake-ups)"
            + (
                f"; waits ended by halt polling {wk['halt_polled_per_request']:.2f}"
                if res["config"].get("halt_poll_us")
                else ""
            )
        )
    ls = res["lockstat"]
    lines.append("  lockstat " + " ".join(f"{k}={ls[k]}" for k in LOCKSTAT_COLUMNS))
    lh = res.get("lock_hist")
    if lh:
        for kind, col in (("hold", "holdtime"), ("wait", "waittime")):
            d = lh[kind]
            lines.append(
                f"  lock {kind} us: "
                + "  ".join(f"{p} {d[p]:.2f}" for p in PERCENTILES)
                + f"  max {ls[col + '-max']:.2f}  ({d['count']} {d['over']})"
            )
    lines.append(
        "  worker    pid    ios  user_s   sys_s  cpu%  lockwait_ms lockhold_ms "
        "  kick_ms  iowait_ms  irqs  reaped"
    )
    for w in res["workers"]:
        lines.append(
            f"  {w['worker']:>6} {w['pid']:>6} {w['ios']:>6} {w['cpu_user_s']:7.3f} "
            f"{w['cpu_sys_s']:7.3f} {w['cpu_pct']:5.1f} {w['lock_wait_ms']:12.3f} "
            f"{w['lock_hold_ms']:11.3f} {w['kick_ms']:9.3f} {w['io_wait_ms']:10.3f} "
            f"{w['irqs']:5d} {w['reaped']:7d}"
        )
    lines.extend(format_deaths(res))
    if res["errors"]:
        lines.append(f"  I/O errors: {res['errors']}")
    nd = res.get("notification_data")
    if nd:
        lines.append(
            f"  notification data: device {nd['device']} (re-read after {nd['reread_ms']} ms), "
            f"remedy {nd['remedy']}: {nd['reordered']} reordered doorbells "
            f"({nd['reordered_per_million']:.0f} per million notifications), "
            f"{nd['waiting']} requests left waiting past a notification, stall "
            f"{nd['stall_total_ms']:.1f} ms (max {nd['stall_max_ms']:.1f}), {nd['rereads']} re-reads"
        )
    v = res["verify"]
    if v is not None:
        if v["failures"]:
            f = v["first"]
            lines.append(
                f"  VERIFY FAILED: {v['failures']} blocks; first at sector {f['sector']} "
                f"(byte {f['offset']}, worker {f['worker']}): {f['kind']}"
            )
        else:
            lines.append(
                f"  verify: {v['verified']} blocks good"
                + (f", {v['unwritten']} not yet written" if v["unwritten"] else "")
            )
    return "\n".join(lines)


def format_deaths(res: Mapping[str, Any]) -> list[str]:
    """The lines of the workers a signal killed (their results are not in
    the figures above), and of a crash run's resume."""
    lines = []
    n = res["config"]["workers"]
    for k in res.get("killed") or []:
        why = " (armed crash point)" if k["armed"] else ""
        lines.append(
            f"  worker {k['worker']} (pid {k['pid']}) killed by {k['signal']}{why} "
            f"at {k['at_s']:.3f} s; {n - len(res['killed'])} of {n} workers finished, "
            f"figures are theirs"
        )
    cr = res.get("crash")
    if cr:
        if not cr["died"]:
            lines.append(
                f"  crash point {cr['point']}:{cr['n']} not reached by worker {cr['worker']}"
            )
        else:
            took = res.get("lock_takeovers", 0)
            resume = (
                "no lock acquisition after it"
                if cr["resume_ms"] is None
                else (f"the others resumed after {cr['resume_ms']:.3f} ms")
            )
            lines.append(
                f"  crash point {cr['point']}:{cr['n']} killed worker {cr['worker']}: "
                f"{resume}; lock takeovers {took}"
            )
    return lines


def write_json(result: Any, path: str) -> None:
    """Write a result as JSON; the file appears whole or not at all."""

    def default(o: Any) -> Any:
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=default, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
