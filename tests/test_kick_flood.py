"""A guest that writes into its notifiers instead of posting them.

The kick semaphore is a file in /dev/shm any guest of the device can map.
One 8-byte store there sets its count to 2^32 - 2 kicks; a store into the
flags word beside the count changes how futex calls are made on it.  The
daemon takes any count in one step (saturating at the queue size), acks no
more than it took, never aborts on a futex call that fails, and `stop`
still returns at once: 1 s is the bound here, a deadline the daemon must
keep, not a speed figure.
"""

import mmap
import os
import time

import posix_ipc
import pytest

from host_daemon import cli
from hostd_util import shm_objects
from procs import wait_for
from virtio_py import DeviceQueue, Region
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import BlockDevice
from virtio_py.notifier import Notifier
from virtio_py.pidfile import probe
from virtio_py.proc import pid_alive

COUNT_MASK = 0xFFFFFFFF
INT_MAX = 2**31 - 1
STOP_BOUND = 1.0  # seconds: the deadline for stop under any flood


class SemFile:
    """A named semaphore's file, mapped as a guest maps it."""

    def __init__(self, posix_name):
        path = "/dev/shm/sem." + posix_name[1:]
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, 32)
        finally:
            os.close(fd)
        self.base = ffi.from_buffer(self.map)

    def word(self, off=0):
        return ffi.cast("uint64_t *", self.base + off)[0]

    @property
    def count(self):
        return self.word() & COUNT_MASK

    def store(self, off, value, width=8):
        """One aligned store, as a guest CPU makes it."""
        assert lib.vp_guest_poke(self.base, 32, off, value, width) == 0

    def flood(self):
        """The count becomes 2^32 - 2, in one 8-byte store."""
        d = self.word()
        self.store(0, (d & ~COUNT_MASK) | 0xFFFFFFFE)

    def close(self):
        del self.base
        self.map.close()


def stop_within_bound(name):
    """`virtio-hostd stop` (in this process: no interpreter start-up in the
    figure); how long it took."""
    t0 = time.monotonic()
    rc = cli.main(["stop", "--name", name])
    took = time.monotonic() - t0
    assert rc == 0
    assert took < STOP_BOUND, (
        f"virtio-hostd stop took {took:.2f} s under a kick flood; it must return "
        f"within {STOP_BOUND:g} s"
    )


# ---- the notifier itself ----------------------------------------------------


def test_a_flooded_semaphore_is_drained_in_one_take(name):
    posix_ipc.Semaphore(f"/{name}.q0.kick", posix_ipc.O_CREX, mode=0o600).close()
    try:
        with Notifier.open_sem(f"/{name}.q0.kick") as n:
            f = SemFile(f"/{name}.q0.kick")
            try:
                f.flood()
                assert n.drain() == INT_MAX  # saturates: the count is not an int
                assert f.count == 0  # all of it went in that one take
                assert n.drain() == 0
                n.post()
                assert n.wait(0) is True  # and it still counts
            finally:
                f.close()
    finally:
        posix_ipc.unlink_semaphore(f"/{name}.q0.kick")


def test_a_flooded_eventfd_is_drained_in_one_take():
    fd = os.eventfd(0, os.EFD_NONBLOCK)  # as a vhost-user front-end passes them
    try:
        with Notifier.open_eventfd(fd) as n:
            os.eventfd_write(fd, 2**64 - 2)
            assert n.drain() == INT_MAX
            assert n.drain() == 0  # no remainder was written back
            os.eventfd_write(fd, 3)
            assert n.wait(0) is True and n.drain() == 2
    finally:
        os.close(fd)


def test_device_queue_takes_a_flood_as_at_most_the_queue_size(name):
    """A flood counts as a full queue's worth of kicks, and a sync exit's
    acks never exceed that: no loop over what the guest wrote."""
    with Region.create(name, queue_size=16, exit="sync") as region:
        dq = DeviceQueue(region, 0)
        f = SemFile(region.sem_name(0, "kick"))
        ack = SemFile(region.sem_name(0, "ack"))
        try:
            f.flood()
            assert dq.wait_kick(0) == 16
            assert f.count == 0 and dq.wait_kick(0) == 0
            dq.ack_kicks(2**31 - 1)
            assert ack.count == 16
        finally:
            f.close()
            ack.close()
            dq.close()


# ---- the daemon under a flood ------------------------------------------------


def _serve_through(name):
    with BlockDevice.attach(name, timeout=20) as dev:
        dev.write(4096, b"\x5a" * 4096)
        assert dev.read(4096, 4096) == b"\x5a" * 4096


@pytest.mark.parametrize(
    "opts",
    [
        ("--exit", "async"),
        ("--exit", "sync"),
        ("--exit", "sync", "--io-threads", "0"),
        ("--mode", "poll", "--exit", "sync"),
    ],
    ids=["async", "sync", "sync-inline", "poll-sync"],
)
def test_kick_flood_leaves_the_daemon_serving_and_stop_within_a_second(
    opts, name, tmp_path, daemons
):
    daemons.start(name, tmp_path / "s", "--queue-size", 128, *opts)
    pid = probe(name).pid
    _serve_through(name)
    kick = SemFile(f"/{name}.q0.kick")
    ack = SemFile(f"/{name}.q0.ack")
    try:
        for _ in range(3):  # three stores, as the report did
            kick.flood()
            wait_for(lambda: kick.count < 2**31, "the daemon to take the flood")
            _serve_through(name)
        # The acks a sync exit gets follow the kicks taken, capped at the
        # queue size per take: never one per unit of the forged count.
        assert ack.count <= 3 * 128
        kick.flood()  # and one left pending for stop
        assert pid_alive(pid)
        stop_within_bound(name)
    finally:
        kick.close()
        ack.close()
    assert not pid_alive(pid)
    assert shm_objects(name) == []


@pytest.mark.parametrize("flags", [0, 0x12340, 0xFFFFFFFF], ids=["cleared", "garbage", "all-ones"])
def test_scribbled_semaphore_flags_neither_kill_nor_deafen_the_daemon(
    flags, name, tmp_path, daemons
):
    """The word after the count selects private or shared futexes for
    glibc: cleared, wake-ups stop crossing processes; garbage, the futex
    call fails and glibc aborts the caller.  The daemon drives its
    semaphores with shared futex calls of its own and keeps serving."""
    daemons.start(name, tmp_path / "s", "--exit", "sync")
    pid = probe(name).pid
    sems = [SemFile(f"/{name}.q0.{role}") for role in ("kick", "call", "ack")]
    try:
        for s in sems:
            s.store(8, flags, 4)
        for _ in range(3):
            _serve_through(name)
        assert pid_alive(pid)
        stop_within_bound(name)
    finally:
        for s in sems:
            s.close()
    assert not pid_alive(pid)
    assert shm_objects(name) == []
