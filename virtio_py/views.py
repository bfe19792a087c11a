"""Read-only numpy views of a queue's rings, for inspection and statistics.

They alias the live shared memory: values change as the other side works,
and a view must not be used after its region is closed.  numpy is imported
on the first view, not with the package.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ._lowlevel import ffi

if TYPE_CHECKING:
    import numpy as np

    from .region import Region


def _np() -> Any:
    import numpy

    return numpy


@functools.cache
def desc_dtype() -> np.dtype:
    return _np().dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


@functools.cache
def used_elem_dtype() -> np.dtype:
    return _np().dtype([("id", "<u4"), ("len", "<u4")])


@functools.cache
def avail_dtype(num: int) -> np.dtype:
    return _np().dtype(
        [("flags", "<u2"), ("idx", "<u2"), ("ring", "<u2", (num,)), ("used_event", "<u2")]
    )


@functools.cache
def used_dtype(num: int) -> np.dtype:
    return _np().dtype(
        {
            "names": ["flags", "idx", "ring", "avail_event"],
            "formats": ["<u2", "<u2", (used_elem_dtype(), (num,)), "<u2"],
            "offsets": [0, 2, 4, 4 + 8 * num],
        }
    )


def _view(region: Region, gpa: int, dtype: np.dtype, count: int | None = None) -> Any:
    nbytes = dtype.itemsize * (count or 1)
    # A read-only buffer, not just a cleared flag: numpy lets anyone set
    # WRITEABLE again on an array whose buffer is writable.
    buf = memoryview(ffi.buffer(region.base + gpa, nbytes)).toreadonly()
    arr = _np().frombuffer(buf, dtype=dtype, count=count or 1)
    return arr if count else arr[0]


def desc_table(region: Region, index: int = 0) -> Any:
    """The descriptor table of queue index: an array of (addr, len, flags, next)."""
    q = region.queue_info(index)
    return _view(region, q["desc"], desc_dtype(), q["num"])


def avail_ring(region: Region, index: int = 0) -> Any:
    """The avail ring of queue index: flags, idx, ring[num], used_event."""
    q = region.queue_info(index)
    return _view(region, q["avail"], avail_dtype(q["num"]))


def used_ring(region: Region, index: int = 0) -> Any:
    """The used ring of queue index: flags, idx, ring[num] of (id, len), avail_event."""
    q = region.queue_info(index)
    return _view(region, q["used"], used_dtype(q["num"]))
