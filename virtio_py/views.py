"""Read-only numpy views of a queue's rings, for inspection and statistics.

They alias the live shared memory: values change as the other side works,
and a view must not be used after its region is closed.
"""
import numpy as np

from ._lowlevel import ffi

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])


def avail_dtype(num):
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", "<u2", (num,)),
                     ("used_event", "<u2")])


def used_dtype(num):
    return np.dtype({"names": ["flags", "idx", "ring", "avail_event"],
                     "formats": ["<u2", "<u2", (USED_ELEM_DTYPE, (num,)), "<u2"],
                     "offsets": [0, 2, 4, 4 + 8 * num]})


def _view(region, gpa, dtype, count=None):
    nbytes = dtype.itemsize * (count or 1)
    # A read-only buffer, not just a cleared flag: numpy lets anyone set
    # WRITEABLE again on an array whose buffer is writable.
    buf = memoryview(ffi.buffer(region.base + gpa, nbytes)).toreadonly()
    arr = np.frombuffer(buf, dtype=dtype, count=count or 1)
    return arr if count else arr[0]


def desc_table(region, index=0):
    q = region.queue_info(index)
    return _view(region, q["desc"], DESC_DTYPE, q["num"])


def avail_ring(region, index=0):
    q = region.queue_info(index)
    return _view(region, q["avail"], avail_dtype(q["num"]))


def used_ring(region, index=0):
    q = region.queue_info(index)
    return _view(region, q["used"], used_dtype(q["num"]))
