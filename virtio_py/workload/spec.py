"""What a job is: the spec every worker of a run follows, and where each
worker's area of the disk lies."""

from __future__ import annotations

import dataclasses

from .. import limits
from ..cpus import check_cpus
from ..errors import ConfigError
from ..limits import SECTOR

RW_MODES = limits.RW.codes
ENGINES = limits.ENGINE.names
LAT_SAMPLES = 1 << 20  # latencies kept per worker (a uniform sample beyond)


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
    runtime: float | None = None
    size: int | None = None
    offset: int = 0
    verify: bool = False
    verify_seed: int = 0x5EED
    rwmix_read: int = 50
    strategy: str = "hold"
    nd_remedy: str = "none"  # notification data: "lock" or "monotonic" (vp_vq_set_nd)
    engine: str = "c"
    seed: int = 1
    timeout: float = 30.0
    lat_samples: int = LAT_SAMPLES
    cpus: frozenset[int] | None = None  # where the workers run (None: anywhere)
    # A waiting worker polls up to this long before it sleeps, adaptively
    # (GuestSlot.halt_poll_us); 0: it sleeps at once.
    halt_poll_us: float = 0.0

    def check(self) -> JobSpec:
        """self, or ConfigError naming the first parameter outside virtio_py.limits."""
        limits.WORKERS.check(self.workers)
        limits.RW.check(self.rw)
        limits.BS.check(self.bs)
        limits.IODEPTH.check(self.iodepth)
        if self.runtime is not None:
            limits.RUNTIME.check(self.runtime)
        if self.size is not None and (self.size < self.bs or self.size % SECTOR):
            raise ConfigError(
                f"size must be a multiple of {SECTOR} and at least bs, not {self.size}"
            )
        limits.OFFSET.check(self.offset)
        limits.STRATEGY.check(self.strategy)
        limits.ND_REMEDY.check(self.nd_remedy)
        limits.ENGINE.check(self.engine)
        limits.RWMIX_READ.check(self.rwmix_read)
        limits.VERIFY_SEED.check(self.verify_seed)
        limits.HALT_POLL_US.check(self.halt_poll_us)
        if self.cpus is not None:
            self.cpus = check_cpus(self.cpus)
        return self


def plan_areas(spec: JobSpec, capacity: int) -> list[tuple[int, int]]:
    """(offset, length) of each worker's area in bytes."""
    if spec.offset >= capacity:
        raise ConfigError(f"offset {spec.offset} is beyond the disk ({capacity} bytes)")
    size = spec.size
    if size is None:
        size = (capacity - spec.offset) // spec.workers
    size -= size % spec.bs
    if size < spec.bs:
        raise ConfigError(
            f"the disk ({capacity} bytes) is too small for {spec.workers} workers of bs {spec.bs}"
        )
    end = spec.offset + size * spec.workers
    if end > capacity:
        raise ConfigError(
            f"{spec.workers} workers x size {size} from offset {spec.offset} "
            f"need {end} bytes; the disk has {capacity}"
        )
    return [(spec.offset + i * size, size) for i in range(spec.workers)]
