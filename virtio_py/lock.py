"""The guest's shared lock (vblk->lock) with lockstat counters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

    def raw_stats(self) -> dict[str, int]:
        """Counters as the C core keeps them (times in nanoseconds)."""
        out = ffi.new("struct vp_lockstat *")
        lib.vp_lock_read(self._l, out)
        return {f: getattr(out, f) for f in _FIELDS}

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


def merge_lockstats(raws: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """One lockstat row for a lock class from several locks' raw counters
    (ns), as lockstat does for &vblk->vqs[i].lock."""
    raws = list(raws)
    out = {}
    for f in (
        "con_bounces",
        "contentions",
        "wait_total",
        "acq_bounces",
        "acquisitions",
        "hold_total",
    ):
        out[f] = sum(r[f] for r in raws)
    for f, cnt in (("wait_min", "contentions"), ("hold_min", "acquisitions")):
        vals = [r[f] for r in raws if r[cnt]]
        out[f] = min(vals) if vals else 0
    out["wait_max"] = max((r["wait_max"] for r in raws), default=0)
    out["hold_max"] = max((r["hold_max"] for r in raws), default=0)
    return out
