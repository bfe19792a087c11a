"""What `virtio-hostd status` reports, read from a live region."""

from virtio_py.lock import SharedLock
from virtio_py.region import FEATURE_BITS, Region
from virtio_py.views import avail_ring, used_ring
from virtio_py.virtqueue import broken_reason

from .daemon import is_daemon_of

REQ_NAMES = ("in", "out", "flush", "get_id", "discard", "write_zeroes", "unsupp", "ioerr")


def device_status(name):
    """A dict of the device's configuration, queues, counters and lock statistics."""
    r = Region.attach(name)
    try:
        h = r.header
        pid = h.daemon_pid
        features = [f for f, b in FEATURE_BITS.items() if h.device_features >> b & 1]
        out = {
            "name": name,
            "daemon_pid": pid,
            "running": is_daemon_of(pid, name),
            "status": h.status,
            "needs_reset": r.needs_reset,
            "config": {
                "capacity_sectors": h.blk.capacity,
                "capacity_bytes": h.blk.capacity * 512,
                "blk_size": h.blk.blk_size,
                "seg_max": h.blk.seg_max,
                "num_queues": h.num_queues,
                "features": features,
                "exit": r.exit_mode,
                "exit_cost_us": h.exit_cost_ns / 1000,
                "mode": r.serve_mode,
                "lock": r.lock_kind,
                "event_idx": r.event_idx,
                "region_bytes": r.size,
            },
            "queues": [],
        }
        for q in range(h.num_queues):
            sh = r.queue_shared(q)
            dev, drv = sh.dev, sh.drv
            broken = dev.broken
            out["queues"].append(
                {
                    "index": q,
                    "size": h.queue[q].num,
                    "avail_idx": int(avail_ring(r, q)["idx"]),
                    "used_idx": int(used_ring(r, q)["idx"]),
                    "last_avail_idx": dev.last_avail_idx,
                    "inflight": dev.inflight,
                    "broken": bool(broken),
                    "broken_reason": broken_reason(broken),
                    "kicks_taken": dev.kicks_taken,
                    "interrupts": dev.interrupts,
                    "interrupts_suppressed": dev.interrupts_suppressed,
                    "guest_kicks": drv.kicks,
                    "guest_kicks_suppressed": drv.kicks_suppressed,
                    "requests": {n: dev.req[i] for i, n in enumerate(REQ_NAMES)},
                    "bytes_read": dev.bytes_read,
                    "bytes_written": dev.bytes_written,
                    "lock": SharedLock.of_queue(r, q).stats(),
                }
            )
        return out
    finally:
        r.close()


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
    for q in st["queues"]:
        state = f"BROKEN ({q['broken_reason']})" if q["broken"] else "ok"
        lines.append(
            f"  queue {q['index']}: size {q['size']} avail {q['avail_idx']} "
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
        lk = q["lock"]
        lines.append("    lock " + " ".join(f"{k}={v}" for k, v in lk.items()))
    return "\n".join(lines)
