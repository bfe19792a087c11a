"""What `virtio-hostd status` reports: who serves the device (its pidfile),
and what its region holds.

The region is guest-writable: the header is copied once and only the copy
is checked and used, each queue's block and ring indices are copied once
from where the checked copy puts them, and every value read is shown as
read, never trusted (an unknown code is named as such, nothing raises)."""

from typing import Any

from virtio_py.limits import EXIT, LOCK, MODE
from virtio_py.lock import SharedLock
from virtio_py.pidfile import DaemonState, probe
from virtio_py.region import FEATURE_BITS, STATUS_NEEDS_RESET, Region
from virtio_py.virtqueue import broken_reason, nd_behaviour, nd_stats

from .vhost import listening_socket

REQ_NAMES = ("in", "out", "flush", "get_id", "discard", "write_zeroes", "unsupp", "ioerr")


def device_status(name: str, state: DaemonState | None = None) -> dict[str, Any]:
    """A dict of the device's configuration, queues, counters and lock
    statistics; state: the daemon as its pidfile tells (probed if None)."""
    if state is None:
        state = probe(name)
    pid = state.pid if state else 0
    running = bool(state and state.alive)
    r = Region.attach(name)
    try:
        h = r.header_copy()
        features = [f for f, b in FEATURE_BITS.items() if h.device_features >> b & 1]
        event_idx = bool(h.driver_features >> FEATURE_BITS["EVENT_IDX"] & 1)
        out: dict[str, Any] = {
            "name": name,
            "daemon_pid": pid,
            "running": running,
            "status": h.status,
            "needs_reset": bool(h.status & STATUS_NEEDS_RESET),
            "config": {
                "capacity_sectors": h.blk.capacity,
                "capacity_bytes": h.blk.capacity * 512,
                "blk_size": h.blk.blk_size,
                "seg_max": h.blk.seg_max,
                "num_queues": h.num_queues,
                "features": features,
                "exit": EXIT.name_of(h.exit_mode),
                "exit_cost_us": h.exit_cost_ns / 1000,
                "mode": MODE.name_of(h.serve_mode),
                "lock": LOCK.name_of(h.lock_kind),
                "event_idx": event_idx,
                "region_bytes": r.size,
            },
            "queues": [],
        }
        # vhost-user: the queues are a front-end's vrings; the region keeps
        # their counters, and its own rings stay unused.
        vhost = listening_socket(pid) if running and pid > 0 else None
        out["vhost_user"] = vhost
        for q in range(h.num_queues):
            qc = r.queue_copy(h, q)
            dev, drv = qc["shared"].dev, qc["shared"].drv
            out["queues"].append(
                {
                    "index": q,
                    "size": h.queue[q].num,
                    "avail_idx": None if vhost else qc["avail_idx"],
                    "used_idx": dev.used_idx if vhost else qc["used_idx"],
                    "last_avail_idx": dev.last_avail_idx,
                    "inflight": dev.inflight,
                    "broken": bool(dev.broken),
                    "broken_reason": broken_reason(dev.broken),
                    "kicks_taken": dev.kicks_taken,
                    "interrupts": dev.interrupts,
                    "interrupts_suppressed": dev.interrupts_suppressed,
                    "guest_kicks": drv.kicks,
                    "guest_kicks_suppressed": drv.kicks_suppressed,
                    "requests": {n: dev.req[i] for i, n in enumerate(REQ_NAMES)},
                    "bytes_read": dev.bytes_read,
                    "bytes_written": dev.bytes_written,
                    "lock": SharedLock(r, qc["lock"]).stats(),
                }
            )
            if h.driver_features >> FEATURE_BITS["NOTIFICATION_DATA"] & 1:
                out["queues"][-1]["notification_data"] = nd_stats(qc["shared"])
        return out
    finally:
        r.close()


def _avail(q):
    return "" if q["avail_idx"] is None else f"avail {q['avail_idx']} "


def format_status(st):
    c = st["config"]
    lines = [
        f"device {st['name']}: daemon pid {st['daemon_pid']} "
        f"({'running' if st['running'] else 'NOT running'})"
        + ("  NEEDS_RESET" if st["needs_reset"] else ""),
        f"  capacity {c['capacity_bytes']} bytes ({c['capacity_sectors']} sectors), "
        f"blk_size {c['blk_size']}, seg_max {c['seg_max']}, queues {c['num_queues']}",
        f"  mode {c['mode']}, exit {c['exit']} (+{c['exit_cost_us']:g} us), lock {c['lock']}, "
        f"event_idx {'on' if c['event_idx'] else 'off'}",
        f"  features {' '.join(c['features'])}",
    ]
    if st.get("vhost_user"):
        lines.append(f"  transport vhost-user, socket {st['vhost_user']}")
    for q in st["queues"]:
        state = f"BROKEN ({q['broken_reason']})" if q["broken"] else "ok"
        lines.append(
            f"  queue {q['index']}: size {q['size']} {_avail(q)}"
            f"used {q['used_idx']} last_avail {q['last_avail_idx']} "
            f"inflight {q['inflight']} {state}"
        )
        req = " ".join(f"{k}={v}" for k, v in q["requests"].items())
        lines.append(f"    requests {req}")
        lines.append(
            f"    kicks {q['guest_kicks']} (suppressed {q['guest_kicks_suppressed']}), "
            f"taken {q['kicks_taken']}; interrupts {q['interrupts']} "
            f"(suppressed {q['interrupts_suppressed']})"
        )
        nd = q.get("notification_data")
        if nd:
            dev = nd_behaviour(nd["behaviour"])
            lines.append(
                f"    notification data: device {dev} (re-read after {nd['reread_ms']} ms), "
                f"doorbells {nd['doorbells']}, reordered {nd['reordered']}, "
                f"misdirected {nd['misdirected']}, waiting {nd['waiting']} in {nd['stalls']} "
                f"stalls ({nd['stall_ns'] / 1e6:.1f} ms, max {nd['stall_max_ns'] / 1e6:.1f}), "
                f"re-reads {nd['rereads']}"
            )
        lk = q["lock"]
        lines.append("    lock " + " ".join(f"{k}={v}" for k, v in lk.items()))
    return "\n".join(lines)
