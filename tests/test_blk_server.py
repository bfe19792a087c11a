"""The C block server (the daemon's serve loops and I/O threads), run in this
process on a store of its own so that every step is in the test's hands:
used lengths past 4 GiB, the queues it accepts, and serving again after a
stop."""

import errno
import os
import struct

import pytest

from mockring import MockRing
from procs import wait_for
from virtio_py import DeviceQueue, Region
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_IN, BlockDevice
from virtio_py.notifier import Notifier

OK = lib.VIRTIO_BLK_S_OK
SERIAL = b"in-process"


def opened_c(fn, *args):
    """Call a C constructor taking int *err last: (pointer, err)."""
    err = ffi.new("int *")
    return fn(*args, err), err[0]


class Store:
    """A one-file store and a C server over it, in this process."""

    def __init__(self, path, capacity, chunk=1 << 20):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.st, err = opened_c(
            lib.vp_store_open, ffi.new("int[]", [self.fd]), 1, chunk, capacity, 0
        )
        assert err == 0
        self.srv = ffi.NULL

    def server(self, mode, io_threads):
        self.srv, err = opened_c(lib.vp_server_new, self.st, mode, io_threads, SERIAL)
        assert err == 0
        return self.srv

    def close(self):
        if self.srv != ffi.NULL:
            lib.vp_server_free(self.srv)
        lib.vp_store_close(self.st)
        os.close(self.fd)


def test_read_past_4gib_reports_a_saturated_used_length(name, tmp_path):
    """Segments may overlap, so one read can move more than 4 GiB; used.len
    (32 bits) must say UINT32_MAX, not the total modulo 2^32."""
    mib = 1 << 20
    with Region.create(
        name, queue_size=128, data_size=64 * mib, capacity=(16 << 30) // 512, event_idx=False
    ) as region:
        region.set_daemon_pid(os.getpid())
        dq = DeviceQueue(region, 0)
        store = Store(str(tmp_path / "stripe"), 16 << 30, chunk=64 * mib)
        kick = Notifier.open_sem(region.sem_name(0, "kick"))
        try:
            srv = store.server(lib.VP_MODE_NOTIFY, 0)
            assert lib.vp_server_add_queue(srv, dq.handle) == 0
            assert lib.vp_server_start(srv) == 0
            m = MockRing.of_queue(region, 0, kick=kick)
            lo, hi = m.data
            m.mem.write(lo, struct.pack("<IIQ", T_IN, 0, 0))
            seg = hi - lo - 8192  # all 65 overlap: 4.06 GiB
            assert 65 * seg > 2**32
            m.chain([(lo, 16, False)] + [(lo + 4096, seg, True)] * 65 + [(hi - 4096, 1, True)])
            m.publish(0)
            wait_for(lambda: m.used_idx() == 1, "the used entry", 60)
            assert m.mem.read(hi - 4096, 1)[0] == OK
            assert m.used_elem(0)[1] == 2**32 - 1
        finally:
            store.close()
            kick.close()
            dq.close()


def test_notify_server_refuses_a_queue_without_a_kick(name, tmp_path):
    """Notify mode sleeps on the kick (and posts it to wake its workers at
    stop): a queue without one is refused, not served until a NULL
    notifier crashes it."""
    with Region.create(name, queue_size=8) as region:
        dq = DeviceQueue(region, 0, notifiers=False)
        store = Store(str(tmp_path / "stripe"), 1 << 20)
        try:
            srv = store.server(lib.VP_MODE_NOTIFY, 2)
            assert lib.vp_server_add_queue(srv, dq.handle) == -errno.EINVAL
            lib.vp_server_free(srv)
            # Poll mode never sleeps on it: still fine.
            srv = store.server(lib.VP_MODE_POLL, 2)
            assert lib.vp_server_add_queue(srv, dq.handle) == 0
        finally:
            store.close()
            dq.close()


@pytest.mark.parametrize("mode,io_threads", [("notify", 0), ("notify", 2), ("poll", 2)])
def test_server_serves_again_after_stop_and_start(name, tmp_path, mode, io_threads):
    with Region.create(name, queue_size=8, capacity=2048, mode=mode) as region:
        region.set_daemon_pid(os.getpid())
        dq = DeviceQueue(region, 0)
        store = Store(str(tmp_path / "stripe"), 2048 * 512)
        disk = None
        try:
            srv = store.server(
                lib.VP_MODE_POLL if mode == "poll" else lib.VP_MODE_NOTIFY, io_threads
            )
            assert lib.vp_server_add_queue(srv, dq.handle) == 0
            assert lib.vp_server_start(srv) == 0
            disk = BlockDevice.attach(name, timeout=5)
            assert disk.get_id().startswith(SERIAL)
            lib.vp_server_stop(srv)
            assert lib.vp_server_start(srv) == 0
            assert disk.get_id().startswith(SERIAL)  # served again
        finally:
            if disk is not None:
                disk.close()
            store.close()
            dq.close()
