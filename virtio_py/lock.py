"""The guest's shared lock (vblk->lock) with lockstat counters, and beside
them log2 histograms of hold and wait time and the lock's sleep/wake-up
counts.

The histograms count what lockstat's totals sum: the hold histogram every
acquisition, the wait histogram every contention (an acquisition that found
the lock taken), so a single preempted holder shows as one count in a far
bucket instead of deciding the maximum alone.  Bucket 0 is 0 ns, bucket
b >= 1 is [2^(b-1), 2^b) ns (bcc's funclatency), the last also holds
everything longer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._lowlevel import ffi, lib
from .limits import LOCK

if TYPE_CHECKING:
    from .region import Region

LOCKSTAT_COLUMNS = (
    "con-bounces",
    "contentions",
    "waittime-min",
    "waittime-max",
    "waittime-total",
    "acq-bounces",
    "acquisitions",
    "holdtime-min",
    "holdtime-max",
    "holdtime-total",
)
_FIELDS = (
    "con_bounces",
    "contentions",
    "wait_min",
    "wait_max",
    "wait_total",
    "acq_bounces",
    "acquisitions",
    "hold_min",
    "hold_max",
    "hold_total",
)
LOCKSTAT_FIELDS = _FIELDS  # the C names of the ten columns, in order
HIST_BUCKETS: int = lib.VP_LOCK_HIST_BUCKETS
PERCENTILES = ("p50", "p99", "p99.9")
_TIMES = {
    "waittime-min",
    "waittime-max",
    "waittime-total",
    "holdtime-min",
    "holdtime-max",
    "holdtime-total",
}


class SharedLock:
    """A lock living in the region; usable from any attached process."""

    def __init__(self, region: Region, lock_ptr: Any) -> None:
        self._region = region  # keeps the mapping alive
        self._l = lock_ptr

    @classmethod
    def of_queue(cls, region: Region, index: int) -> SharedLock:
        return cls(region, ffi.addressof(region.queue_shared(index).lock))

    @property
    def kind(self) -> str:
        return LOCK.name_of(self._l.kind)

    def acquire(self) -> None:
        lib.vp_lock_acquire(self._l)

    def release(self) -> None:
        lib.vp_lock_release(self._l)

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def raw_stats(self) -> dict[str, Any]:
        """Counters as the C core keeps them (times in nanoseconds): the ten
        lockstat fields, then "hold_hist" and "wait_hist" (counts per log2
        bucket), "sleeps" (sleeps a wake-up ended), "wakeups" (sleepers
        woken by unlockers; mutex and pvspin only sleep) and "takeovers"
        (dead holders whose lock a waiter released)."""
        out = ffi.new("struct vp_lockstat *")
        lib.vp_lock_read(self._l, out)
        res: dict[str, Any] = {f: getattr(out, f) for f in _FIELDS}
        hist = ffi.new("struct vp_lockhist *")
        sleeps = ffi.new("uint64_t *")
        wakeups = ffi.new("uint64_t *")
        lib.vp_lock_read_hist(self._l, hist, sleeps, wakeups)
        res["hold_hist"] = list(hist.hold)
        res["wait_hist"] = list(hist.wait)
        res["sleeps"] = sleeps[0]
        res["wakeups"] = wakeups[0]
        res["takeovers"] = lib.vp_lock_takeovers(self._l)
        return res

    def takeovers(self) -> int:
        """Holders found dead (SIGKILL inside the critical section) whose
        lock a waiter released in their place."""
        return int(lib.vp_lock_takeovers(self._l))

    def holder(self) -> tuple[int, int] | None:
        """The owner record: (pid, start time in clock ticks) of the last
        holder, or None before any."""
        pid = ffi.new("int32_t *")
        start = ffi.new("uint64_t *")
        if not lib.vp_lock_holder(self._l, pid, start):
            return None
        return int(pid[0]), int(start[0])

    def histograms(self) -> dict[str, Any]:
        """Hold and wait time distributions, see ``lock_histograms``."""
        return lock_histograms(self.raw_stats())

    def stats(self) -> dict[str, float]:
        """The lockstat columns by their lockstat names; times in microseconds, two decimals."""
        return lockstat_from_raw(self.raw_stats())

    def reset(self) -> None:
        lib.vp_lock_reset(self._l)

    def hammer(self, n: int) -> int:
        """Take and drop the lock n times in a C loop (benchmarks); returns n."""
        return int(lib.vp_lock_hammer(self._l, n))


def lockstat_from_raw(raw: Mapping[str, int]) -> dict[str, float]:
    res: dict[str, float] = {}
    for col, f in zip(LOCKSTAT_COLUMNS, _FIELDS):
        v = raw[f]
        res[col] = round(v / 1000.0, 2) if col in _TIMES else int(v)
    return res


def merge_lockstats(raws: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One lockstat row for a lock class from several locks' raw counters
    (ns), as lockstat does for &vblk->vqs[i].lock; histograms and the
    sleep/wake-up counts add up bucket by bucket."""
    raws = list(raws)
    out: dict[str, Any] = {}
    for f in (
        "con_bounces",
        "contentions",
        "wait_total",
        "acq_bounces",
        "acquisitions",
        "hold_total",
    ):
        out[f] = sum(r[f] for r in raws)
    for f in ("sleeps", "wakeups", "takeovers"):
        if raws and all(f in r for r in raws):
            out[f] = sum(r[f] for r in raws)
    for f in ("hold_hist", "wait_hist"):
        if raws and all(f in r for r in raws):
            out[f] = [sum(b) for b in zip(*(r[f] for r in raws))]
    for f, cnt in (("wait_min", "contentions"), ("hold_min", "acquisitions")):
        vals = [r[f] for r in raws if r[cnt]]
        out[f] = min(vals) if vals else 0
    out["wait_max"] = max((r["wait_max"] for r in raws), default=0)
    out["hold_max"] = max((r["hold_max"] for r in raws), default=0)
    return out


def bucket_bounds(b: int) -> tuple[int, int | None]:
    """[lo, hi) of log2 bucket b in ns; hi None for the last (open) one."""
    lo = 0 if b == 0 else 1 << (b - 1)
    return lo, (None if b == HIST_BUCKETS - 1 else 1 << b)


def hist_percentile(hist: Sequence[int], q: float, vmax: float | None = None) -> float:
    """The q-th percentile (0-100) of a log2 histogram, in ns: the upper edge
    of the bucket that holds it, so an upper bound within a factor of two,
    and never above vmax (the lockstat max) when given.  0 when empty."""
    n = sum(hist)
    if n == 0:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * n))
    seen = 0
    for b, c in enumerate(hist):
        seen += c
        if seen >= rank:
            lo, hi = bucket_bounds(b)
            if hi is None:
                return float(vmax if vmax is not None else lo)
            return float(min(hi - 1, vmax)) if vmax is not None else float(hi - 1)
    return float(vmax or 0.0)


def _dist(hist: Sequence[int], over: str, vmax_ns: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "over": over,
        "count": int(sum(hist)),
        "max": round(vmax_ns / 1000.0, 2),
        "buckets": [
            {"lo_ns": bucket_bounds(b)[0], "hi_ns": bucket_bounds(b)[1], "count": int(c)}
            for b, c in enumerate(hist)
            if c
        ],
    }
    for p in PERCENTILES:
        d[p] = round(hist_percentile(hist, float(p[1:]), vmax_ns) / 1000.0, 2)
    return d


def lock_histograms(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The distributions of a raw lockstat (``SharedLock.raw_stats`` or
    ``merge_lockstats``): "hold" over every acquisition and "wait" over
    every contention, each with its count, the lockstat max (us), the
    buckets that have a count ({"lo_ns", "hi_ns", "count"}; hi_ns None for
    the open last one) and p50/p99/p99.9 in us (bucket upper edges, capped
    at the max); then the lock's sleeps and wake-ups.  Empty when the raw
    counters carry no histograms."""
    if "hold_hist" not in raw or "wait_hist" not in raw:
        return {}
    out: dict[str, Any] = {
        "hold": _dist(raw["hold_hist"], "acquisitions", raw["hold_max"]),
        "wait": _dist(raw["wait_hist"], "contentions", raw["wait_max"]),
    }
    if "sleeps" in raw:
        out["sleeps"] = int(raw["sleeps"])
        out["wakeups"] = int(raw.get("wakeups", 0))
    return out


def hist_counts(dist: Mapping[str, Any]) -> list[int]:
    """The bucket counts (index = bucket) of one distribution of
    ``lock_histograms``."""
    counts = [0] * HIST_BUCKETS
    for bk in dist["buckets"]:
        counts[int(bk["lo_ns"]).bit_length()] += bk["count"]
    return counts


def pool_histograms(dists: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several runs' ``lock_histograms`` as one: counts added bucket by
    bucket (so they equal the runs' acquisitions and contentions summed),
    percentiles of the pooled counts, the largest max."""
    dists = [d for d in dists if d]
    if not dists:
        return {}
    out: dict[str, Any] = {}
    for kind in ("hold", "wait"):
        counts = [sum(b) for b in zip(*(hist_counts(d[kind]) for d in dists))]
        vmax = max(round(d[kind]["max"] * 1000) for d in dists)
        out[kind] = _dist(counts, dists[0][kind]["over"], vmax)
        out[kind]["max"] = max(d[kind]["max"] for d in dists)
    if all("sleeps" in d for d in dists):
        out["sleeps"] = sum(d["sleeps"] for d in dists)
        out["wakeups"] = sum(d["wakeups"] for d in dists)
    out["runs"] = len(dists)
    return out


def format_hist(hist: Sequence[int], width: int = 40) -> list[str]:
    """funclatency's picture of a log2 histogram of ns, in us, one line a
    bucket from the first to the last with a count."""
    used = [b for b, c in enumerate(hist) if c]
    if not used:
        return ["     (empty)"]
    top = max(hist)
    lines = [f"{'us':>21} : {'count':<10} distribution"]
    for b in range(used[0], used[-1] + 1):
        lo, hi = bucket_bounds(b)
        hi_txt = f"{(hi - 1) / 1000:.3f}" if hi is not None else "inf"
        stars = "*" * round(width * hist[b] / top) if top else ""
        lines.append(f"{lo / 1000:>9.3f} -> {hi_txt:<8} : {hist[b]:<10} |{stars:<{width}}|")
    return lines
