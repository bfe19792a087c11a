"""Crash runs: one worker of a run killed by SIGKILL at a chosen step of
the driver's critical sections (csrc/crashpoint.h), so that the others'
survival can be shown step by step.

``VIRTIO_PY_CRASH_AT=<point>:<n>[:<worker>]`` in the environment of
``virtio-emu run`` arms worker ``worker`` (default 0): it kills itself the
n-th time it passes ``point``, any of ``crash_points()``.  The other
workers watch for the death and note their first lock acquisition after
it: the run reports the resume time, from the death to the first of those.
"""

from __future__ import annotations

import dataclasses
import os

from .._lowlevel import ffi, lib
from ..errors import ConfigError

CRASH_ENV = "VIRTIO_PY_CRASH_AT"


def crash_points() -> list[str]:
    """The crash points' names, in the order a request passes them."""
    return [ffi.string(lib.vp_crash_point_name(p)).decode() for p in range(1, lib.VP_CRASH_NPOINTS)]


@dataclasses.dataclass(frozen=True)
class CrashSpec:
    point: str
    n: int
    worker: int

    @property
    def code(self) -> int:
        return crash_points().index(self.point) + 1

    def __str__(self) -> str:
        return f"{self.point}:{self.n}:{self.worker}"


def parse_crash(value: str, workers: int) -> CrashSpec:
    """A ``<point>:<n>[:<worker>]`` value; ConfigError naming what is wrong."""
    parts = value.split(":")
    points = crash_points()
    if len(parts) not in (2, 3) or parts[0] not in points:
        raise ConfigError(
            f"{CRASH_ENV}={value!r}: want <point>:<n>[:<worker>], point one of {', '.join(points)}"
        )
    try:
        n = int(parts[1])
        worker = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ConfigError(f"{CRASH_ENV}={value!r}: n and worker are integers") from None
    if n < 1 or n >= 1 << 32:
        raise ConfigError(f"{CRASH_ENV}={value!r}: n counts passes from 1")
    if not 0 <= worker < workers:
        raise ConfigError(f"{CRASH_ENV}={value!r}: no worker {worker} in a run of {workers}")
    return CrashSpec(parts[0], n, worker)


def crash_from_env(workers: int) -> CrashSpec | None:
    """The crash the environment arms for a run of ``workers``, or None."""
    value = os.environ.get(CRASH_ENV)
    return parse_crash(value, workers) if value else None


def arm_worker(crash: CrashSpec, idx: int, died_addr: int) -> None:
    """In worker idx, before it drives the queue: arm it if it is the
    victim, else watch the victim's death word (shared memory at died_addr)."""
    died = ffi.cast("uint64_t *", died_addr)
    if idx == crash.worker:
        if lib.vp_crash_arm(crash.code, crash.n, died) < 0:
            raise ConfigError(f"{CRASH_ENV}: cannot arm {crash}")
    else:
        lib.vp_crash_watch(died)


def resumed_ns() -> int:
    """This process's first queue lock acquisition after the death (ns), 0 if none."""
    return int(lib.vp_crash_resumed_ns())
