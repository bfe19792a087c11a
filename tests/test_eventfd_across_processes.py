"""One eventfd waited on by several processes, as a vhost-user call or kick
fd shared by a front-end's processes: every count posted wakes exactly one
wait, over all of them, and no waiter is left asleep in read() on a count
another process took between its poll() and its read()."""

import mmap
import os
import struct
import time

import procs
from procs import wait_for
from virtio_py._lowlevel import lib
from virtio_py.notifier import Notifier

WAITERS = 4
POSTS = 3000


def _waiter(fd, board, i):
    """Wait until told to stop; publish the wake-ups taken in slot i."""
    n = Notifier.open_eventfd(fd)
    taken = 0
    try:
        while True:
            r = lib.vp_notifier_wait(n.handle, 20_000_000)  # 20 ms
            assert r >= 0, r
            taken += r
            struct.pack_into("<Q", board, 8 * (i + 1), taken)
            if r == 0 and struct.unpack_from("<Q", board, 0)[0]:
                return taken
    finally:
        n.close()


def test_every_count_posted_wakes_exactly_one_waiter_over_all_processes():
    fd = os.eventfd(0)  # blocking: read() would sleep
    board = mmap.mmap(-1, 8 * (WAITERS + 1))  # [stop, taken by each waiter]
    with procs.Children() as kids:
        waiters = [kids.start(_waiter, fd, board, i) for i in range(WAITERS)]
        for k in range(POSTS):
            os.eventfd_write(fd, 1)
            if k % 7 == 0:
                time.sleep(0)  # let some land one at a time
        os.eventfd_write(fd, 5)  # and some together
        posted = POSTS + 5

        def taken():
            return sum(struct.unpack_from("<Q", board, 8 * (i + 1))[0] for i in range(WAITERS))

        wait_for(lambda: taken() >= posted, f"{posted} wake-ups")
        struct.pack_into("<Q", board, 0, 1)
        totals = [w.join(60, watch=waiters) for w in waiters]
    os.close(fd)
    assert sum(totals) == posted, totals
