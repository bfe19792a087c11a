"""Every configuration limit, in one place, taken from the C core's constants.

Each parameter a caller can set (through the Python API or either command
line) is checked here, so every entry point refuses a value with the same
one-line message: ``queue size must be a power of two from 2 to 32768, not 1``.

Ring limits and device minimums are kept apart: a ring of one descriptor is
a valid split-ring layout (``RING_SIZE``), but a virtio-blk request needs at
least two descriptors, a readable header and a writable status
(``BLK_QUEUE_SIZE``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ._lowlevel import lib
from .errors import ConfigError

T = TypeVar("T")

SECTOR = 512
SERIAL_BYTES: int = lib.VIRTIO_BLK_ID_BYTES
MAX_EXIT_COST_US = 1_000_000
MAX_IO_THREADS: int = lib.VP_MAX_IO_THREADS


@dataclass(frozen=True)
class Limit:
    """A numeric range: lo to hi (None: no upper bound), optionally a power of
    two or a multiple of a step.  ``measure`` turns a value into the number
    checked (a serial's length in bytes, say)."""

    name: str
    lo: float
    hi: float | None = None
    multiple: int = 1
    power_of_two: bool = False
    integer: bool = True
    positive: bool = False  # lo itself excluded (a duration)
    unit: str = ""
    measure: Callable[[Any], float] | None = None

    def rule(self) -> str:
        """What a good value is, as the message's middle says it."""
        if self.power_of_two:
            return f"a power of two from {self.lo} to {self.hi}"
        if self.multiple > 1 and self.hi is None:
            if self.lo == self.multiple:
                return f"a positive multiple of {self.multiple}"
            if self.lo == 0:
                return f"a non-negative multiple of {self.multiple}"
            return f"a multiple of {self.multiple}, at least {self.lo}"
        if self.positive and self.hi is None:
            return "positive and finite"
        if self.hi is None:
            return f"at least {self.lo}{self.unit}"
        if self.measure is not None and self.lo == 0:
            return f"at most {self.hi}{self.unit}"
        return f"{self.lo} to {self.hi}{self.unit}"

    def message(self, value: Any) -> str:
        shown = f"{self.measure(value)}{self.unit}" if self.measure else repr(value)
        return f"{self.name} must be {self.rule()}, not {shown}"

    def ok(self, value: Any) -> bool:
        v: Any = self.measure(value) if self.measure else value
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return False
        if self.integer and not isinstance(v, numbers.Integral):
            return False
        return self._in_range(v)

    def _in_range(self, v: Any) -> bool:
        if not math.isfinite(v):  # also NaN
            return False
        if v < self.lo or (self.positive and v == self.lo):
            return False
        if self.hi is not None and v > self.hi:
            return False
        if self.power_of_two and int(v) & (int(v) - 1):
            return False
        return not (self.multiple > 1 and int(v) % self.multiple)

    def check(self, value: T) -> T:
        """value, or ConfigError with the one-line message."""
        if not self.ok(value):
            raise ConfigError(self.message(value))
        return value


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of names; ``codes`` maps each to its C constant."""

    name: str
    codes: Mapping[str, int]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.codes)

    def message(self, value: Any) -> str:
        return f"{self.name} must be one of {', '.join(self.codes)}, not {value!r}"

    def check(self, value: str) -> str:
        if value not in self.codes:
            raise ConfigError(self.message(value))
        return value

    def code(self, value: str) -> int:
        """The C constant of a name (ConfigError for another name)."""
        return self.codes[self.check(value)]

    def name_of(self, code: int) -> str:
        """The name of a C constant read back from the region."""
        for k, v in self.codes.items():
            if v == code:
                return k
        return f"unknown {self.name} {code}"


# ---- the region and its queues
QUEUES: Limit = Limit("queues", 1, lib.VP_MAX_QUEUES)
RING_SIZE: Limit = Limit("queue size", 1, lib.VP_MAX_QUEUE_SIZE, power_of_two=True)
BLK_QUEUE_SIZE: Limit = Limit("queue size", 2, lib.VP_MAX_QUEUE_SIZE, power_of_two=True)


def queue_size_for(workers: int, iodepth: int, queues: int = 1, start: int = 128) -> int:
    """The smallest power-of-two ring from start (doubled, up to the
    largest) with room for every request in flight, 3 descriptors each and
    no indirect ones, as blk-mq sizes its tag set to the virtqueue."""
    need = -(-workers // queues) * iodepth * 3
    size = start
    while size < need and size < lib.VP_MAX_QUEUE_SIZE:
        size *= 2
    return size


EXIT_COST_US: Limit = Limit("exit cost", 0, MAX_EXIT_COST_US, integer=False, unit=" us")
LOCK: Choice = Choice(
    "lock kind",
    {
        "spin": lib.VP_LOCK_SPIN,
        "spinyield": lib.VP_LOCK_SPINYIELD,
        "mutex": lib.VP_LOCK_MUTEX,
        "pvspin": lib.VP_LOCK_PVSPIN,
    },
)
# The lock of a new device (daemon, compare, front-end), unless asked for
# another: the ticket lock that sleeps once it has spun, as a paravirtual
# guest's spinlock does (docs/COMPARE.md, "The lock kind").
LOCK_DEFAULT = "pvspin"
EXIT: Choice = Choice("exit", {"async": lib.VP_EXIT_ASYNC, "sync": lib.VP_EXIT_SYNC})
MODE: Choice = Choice("mode", {"notify": lib.VP_MODE_NOTIFY, "poll": lib.VP_MODE_POLL})
STRATEGY: Choice = Choice(
    "kick strategy",
    {"hold": lib.VP_KICK_HOLD, "release": lib.VP_KICK_RELEASE, "prepare": lib.VP_KICK_PREPARE},
)

# ---- the virtio-blk device and its striped store
STRIPES: Limit = Limit("stripes", 1, lib.VP_STORE_MAX_STRIPES)
CHUNK: Limit = Limit("chunk", SECTOR, multiple=SECTOR)
CAPACITY: Limit = Limit("size", SECTOR, multiple=SECTOR)
IO_THREADS: Limit = Limit("io threads", 0, MAX_IO_THREADS)
BUFFERS: Limit = Limit("buffers", 1 << 20, unit=" bytes per queue")
SERIAL: Limit = Limit(
    "serial",
    0,
    SERIAL_BYTES,
    unit=" bytes",
    measure=lambda s: len(s.encode()) if isinstance(s, str) else -1,
)

# ---- guest workloads
WORKERS: Limit = Limit("workers", 1, lib.VP_MAX_SLOTS)
IODEPTH: Limit = Limit("iodepth", 1, lib.VP_MAX_TAGS)
BS: Limit = Limit("bs", SECTOR, multiple=SECTOR)
OFFSET: Limit = Limit("offset", 0, multiple=SECTOR)
RWMIX_READ: Limit = Limit("rwmix_read", 0, 100)
RUNTIME: Limit = Limit("runtime", 0, integer=False, positive=True)
# A waiting worker's halt polling: the cap of its adaptive budget.
HALT_POLL_US: Limit = Limit("halt poll", 0, 10_000, integer=False, unit=" us")
VERIFY_SEED: Limit = Limit("verify seed", 0, (1 << 64) - 1)
REPEAT: Limit = Limit("repeat", 1, 100)
RW: Choice = Choice(
    "rw",
    {
        "read": lib.VP_RW_READ,
        "write": lib.VP_RW_WRITE,
        "randread": lib.VP_RW_RANDREAD,
        "randwrite": lib.VP_RW_RANDWRITE,
        "randrw": lib.VP_RW_RANDRW,
    },
)
ENGINE: Choice = Choice("engine", {"c": 0, "python": 1})


def check_region(
    *,
    queues: int = 1,
    queue_size: int = 128,
    lock: str = LOCK_DEFAULT,
    exit: str = "async",
    exit_cost_us: float = 0,
    mode: str = "notify",
) -> None:
    """ConfigError unless a region (the ring layer) takes these parameters."""
    QUEUES.check(queues)
    RING_SIZE.check(queue_size)
    EXIT_COST_US.check(exit_cost_us)
    LOCK.check(lock)
    EXIT.check(exit)
    MODE.check(mode)


# ---- VIRTIO_F_NOTIFICATION_DATA
ND_DEVICE: Choice = Choice(
    "notification data", {"trust": lib.VP_ND_TRUST, "reread": lib.VP_ND_REREAD}
)
ND_REMEDY: Choice = Choice(
    "remedy", {"none": 0, "lock": lib.VP_ND_LOCKED, "monotonic": lib.VP_ND_MONOTONIC}
)
ND_REREAD_MS: Limit = Limit("reread time", 1, 3_600_000, unit=" ms")
ND_REREAD_MS_DEFAULT = 200
POLL_REFUSES_ND = (
    "notification data needs --mode notify: a polling device never waits on a doorbell"
)


def check_notification_data(nd: str | None, mode: str, vhost_user: str | None = None) -> None:
    """ConfigError unless a device can serve notification data this way."""
    if nd is None:
        return
    ND_DEVICE.check(nd)
    if mode == "poll":
        raise ConfigError(POLL_REFUSES_ND)
    if vhost_user:
        raise ConfigError("notification data is the native transport's: not with --vhost-user")


def check_geometry(stripes: int, chunk: int, size: int) -> None:
    """ConfigError unless a striped store can have this geometry."""
    STRIPES.check(stripes)
    CHUNK.check(chunk)
    CAPACITY.check(size)


__all__ = [
    "Limit",
    "Choice",
    "SECTOR",
    "SERIAL_BYTES",
    "QUEUES",
    "RING_SIZE",
    "BLK_QUEUE_SIZE",
    "queue_size_for",
    "EXIT_COST_US",
    "LOCK",
    "LOCK_DEFAULT",
    "EXIT",
    "MODE",
    "STRATEGY",
    "STRIPES",
    "CHUNK",
    "CAPACITY",
    "IO_THREADS",
    "BUFFERS",
    "SERIAL",
    "WORKERS",
    "IODEPTH",
    "BS",
    "OFFSET",
    "RWMIX_READ",
    "RUNTIME",
    "HALT_POLL_US",
    "VERIFY_SEED",
    "REPEAT",
    "RW",
    "ENGINE",
    "ND_DEVICE",
    "ND_REMEDY",
    "ND_REREAD_MS",
    "ND_REREAD_MS_DEFAULT",
    "check_notification_data",
    "check_region",
    "check_geometry",
]
