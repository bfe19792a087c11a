"""The guest's shared lock (vblk->lock) with lockstat counters."""
from ._lowlevel import ffi, lib
from .region import LOCK_KINDS, kind_name

LOCKSTAT_COLUMNS = (
    "con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total",
    "acq-bounces", "acquisitions", "holdtime-min", "holdtime-max", "holdtime-total",
)
_FIELDS = ("con_bounces", "contentions", "wait_min", "wait_max", "wait_total",
           "acq_bounces", "acquisitions", "hold_min", "hold_max", "hold_total")
_TIMES = {"waittime-min", "waittime-max", "waittime-total",
          "holdtime-min", "holdtime-max", "holdtime-total"}


class SharedLock:
    """A lock living in the region; usable from any attached process."""

    def __init__(self, region, lock_ptr):
        self._region = region  # keeps the mapping alive
        self._l = lock_ptr

    @classmethod
    def of_queue(cls, region, index):
        return cls(region, ffi.addressof(region.queue_shared(index).lock))

    @property
    def kind(self):
        return kind_name(LOCK_KINDS, self._l.kind, "lock kind")

    def acquire(self):
        lib.vp_lock_acquire(self._l)

    def release(self):
        lib.vp_lock_release(self._l)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def raw_stats(self):
        """Counters as the C core keeps them (times in nanoseconds)."""
        out = ffi.new("struct vp_lockstat *")
        lib.vp_lock_read(self._l, out)
        return {f: getattr(out, f) for f in _FIELDS}

    def stats(self):
        """The lockstat columns by their lockstat names; times in microseconds, two decimals."""
        raw = self.raw_stats()
        return lockstat_from_raw(raw)

    def reset(self):
        lib.vp_lock_reset(self._l)


def lockstat_from_raw(raw):
    res = {}
    for col, f in zip(LOCKSTAT_COLUMNS, _FIELDS):
        v = raw[f]
        res[col] = round(v / 1000.0, 2) if col in _TIMES else int(v)
    return res
