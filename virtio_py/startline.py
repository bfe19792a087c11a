"""A start line for forked processes: a 32-bit word in anonymous shared
memory that each party bumps on arrival and that all wait on (yielding, in
C), so that every process starts a measured round at the same moment."""

from __future__ import annotations

import mmap

from ._lowlevel import ffi, lib


class StartLine:
    """Make it before forking; every process that inherits it can arrive and wait."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        self._word = ffi.cast("uint32_t *", ffi.from_buffer(self._map))
        self._word[0] = 0

    @property
    def value(self) -> int:
        """How many arrivals so far (wrapping at 2^32)."""
        return int(self._word[0])

    def arrive(self) -> int:
        """Count this party in; the new value."""
        return int(lib.vp_bench_arrive(self._word))

    def wait(self, target: int) -> None:
        """Sleep until the line reaches target."""
        lib.vp_bench_wait(self._word, target)
