"""A guest that truncates the region's shared-memory object.

Touching a page past the new end raises SIGBUS; reading or writing it from
the kernel (pread, pwrite, O_DIRECT) fails with EFAULT.  The daemon
survives both: the lost pages become private zero pages, every queue that
had memory there breaks with EFAULT (NEEDS_RESET), the others keep serving,
and `stop` cleans up."""

import errno
import os
import struct

import posix_ipc

from hostd_util import hostd, shm_objects
from mockring import MockRing
from procs import wait_for
from virtio_py import Region
from virtio_py.blk import T_IN, BlockDevice
from virtio_py.notifier import Notifier
from virtio_py.pidfile import probe
from virtio_py.proc import pid_alive

PAGE = 4096


def _start(daemons, name, tmp_path):
    daemons.start(
        name,
        tmp_path / "s",
        "--queues",
        2,
        "--queue-size",
        16,
        "--stripes",
        4,
        "--buffers",
        "1M",
        size="4M",
    )
    return probe(name).pid


def test_truncated_tail_breaks_its_queue_and_leaves_the_daemon_and_queue_0_serving(
    name, tmp_path, daemons
):
    pid = _start(daemons, name, tmp_path)
    region = Region.attach(name)
    kick = Notifier.open_sem(region.sem_name(1, "kick"))
    try:
        with BlockDevice.attach(name, queue=0, timeout=20) as disk:
            disk.write(0, b"\x33" * 8192)
            # Queue 1's request: header and status in the first pages of its
            # data share, the buffer for the data further on.
            m = MockRing.of_queue(region, 1, kick=kick)
            hdr, sts, buf = m.buf(0, PAGE), m.buf(1, PAGE), m.buf(4, PAGE)
            m.mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
            m.mem.write(sts, b"\xee")
            m.chain([(hdr, 16, False), (buf, 4096, True), (sts, 1, True)])
            # The guest cuts the object short in the middle of queue 1's share,
            # the last thing in the region: the data buffer is gone.
            os.truncate(f"/dev/shm/{name}", buf)
            m.publish(0)
            dev1 = region.queue_shared(1).dev
            wait_for(lambda: dev1.broken, "queue 1 to break")
            assert dev1.broken == errno.EFAULT
            assert region.needs_reset
            assert pid_alive(pid) and probe(name).alive
            # Queue 0, whose share lies first, serves on.
            disk.write(8192, b"\x44" * 8192)
            assert disk.read(0, 16384) == b"\x33" * 8192 + b"\x44" * 8192
            assert region.queue_shared(0).dev.broken == 0
    finally:
        kick.close()
        region.close()
    s = hostd("stop", "--name", name)
    assert s.returncode == 0 and s.stdout == f"virtio-hostd: stopped {name} (pid {pid})\n"
    assert not pid_alive(pid)
    assert shm_objects(name) == []


def test_truncated_to_nothing_the_daemon_lives_and_stop_cleans_up(name, tmp_path, daemons):
    pid = _start(daemons, name, tmp_path)
    os.truncate(f"/dev/shm/{name}", 0)
    # A kick makes the daemon read its rings, all of them gone now.
    for q in range(2):
        with Notifier.open_sem(f"/{name}.q{q}.kick") as k:
            k.post()
        wait_for(lambda q=q: _taken(name, q), f"queue {q}'s kick to be taken")
    assert pid_alive(pid) and probe(name).alive
    s = hostd("stop", "--name", name)
    assert s.returncode == 0 and s.stdout == f"virtio-hostd: stopped {name} (pid {pid})\n"
    assert not pid_alive(pid)
    assert shm_objects(name) == []


def _taken(name, q):
    """The daemon took queue q's kick: the semaphore's count is 0 again."""
    s = posix_ipc.Semaphore(f"/{name}.q{q}.kick")
    try:
        return s.value == 0
    finally:
        s.close()
