"""One eventfd waited on by several processes, as a vhost-user call or kick
fd shared by a front-end's processes: every count posted wakes exactly one
wait, over all of them, and no waiter is left asleep in read() on a count
another process took between its poll() and its read()."""

import mmap
import os
import struct

import procs
from procs import wait_for
from virtio_py._lowlevel import lib
from virtio_py.notifier import Notifier

WAITERS = 6
ROUNDS = 500
BURST = 5  # then counts that come together


def _slot(board, i):
    return struct.unpack_from("<QQ", board, 16 * (i + 1))


def _waiter(fd, board, i):
    """Wait in slices until told to stop; publish (wake-ups taken, waits
    returned) in slot i: the second moves on every 5 ms while it is not
    stuck in a system call."""
    n = Notifier.open_eventfd(fd)
    taken = turns = 0
    try:
        while True:
            r = lib.vp_notifier_wait(n.handle, 5_000_000)
            assert r >= 0, r
            taken += r
            turns += 1
            struct.pack_into("<QQ", board, 16 * (i + 1), taken, turns)
            if r == 0 and struct.unpack_from("<Q", board, 0)[0]:
                return taken
    finally:
        n.close()


def test_every_count_posted_wakes_exactly_one_waiter_over_all_processes():
    fd = os.eventfd(0)  # blocking: a read() after another took the count sleeps
    board = mmap.mmap(-1, 16 * (WAITERS + 1))  # [stop], then (taken, turns) each

    def taken():
        return sum(_slot(board, i)[0] for i in range(WAITERS))

    def all_turned(before):
        return all(_slot(board, i)[1] > before[i] for i in range(WAITERS))

    with procs.Children() as kids:
        waiters = [kids.start(_waiter, fd, board, i) for i in range(WAITERS)]
        posted = 0
        for rnd in range(ROUNDS):
            n = BURST if rnd % 10 == 9 else 1
            os.eventfd_write(fd, n)
            posted += n
            wait_for(lambda p=posted: taken() >= p, f"{posted} wake-ups")
            # Every waiter comes back to its loop: none sleeps in read().
            turns = [_slot(board, i)[1] for i in range(WAITERS)]
            wait_for(lambda t=turns: all_turned(t), "every waiter to wait again", 10)
        struct.pack_into("<Q", board, 0, 1)
        totals = [w.join(60, watch=waiters) for w in waiters]
    os.close(fd)
    assert sum(totals) == posted, totals
