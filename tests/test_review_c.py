"""Regression tests for defects found reviewing the C core (csrc/).

Each test fails on the code before its fix.  Devices run in this process
on a store of their own, so every step is in the test's hands.
"""
import errno
import os
import struct
import threading
import time
import types

import pytest

from virtio_py import DeviceQueue, Region, Virtqueue, used_ring
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_IN, BlockDevice, GuestSlot
from virtio_py.errors import VirtioError
from virtio_py.notifier import Notifier
from virtio_py.workload import _python_loop

F_NEXT, F_WRITE = 1, 2
OK = lib.VIRTIO_BLK_S_OK


def opened_c(fn, *args):
    """Call a C constructor taking int *err last: (pointer, err)."""
    err = ffi.new("int *")
    return fn(*args, err), err[0]


class Store:
    """A one-file store and a C server over it, in this process."""

    def __init__(self, path, capacity, chunk=1 << 20):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.st, err = opened_c(lib.vp_store_open, ffi.new("int[]", [self.fd]), 1, chunk,
                                capacity, 0)
        assert err == 0
        self.srv = ffi.NULL

    def server(self, mode, io_threads):
        self.srv, err = opened_c(lib.vp_server_new, self.st, mode, io_threads, b"review")
        assert err == 0
        return self.srv

    def close(self):
        if self.srv != ffi.NULL:
            lib.vp_server_free(self.srv)
        lib.vp_store_close(self.st)
        os.close(self.fd)


def serve_by_hand(region, dq, n, timeout=5):
    """Complete n chains as a block device would, with status OK."""
    deadline = time.monotonic() + timeout
    done = 0
    while done < n and time.monotonic() < deadline:
        c = dq.pop()
        if c is None:
            time.sleep(0.005)
            continue
        head, segs = c
        st_gpa, st_len, _ = segs[-1]
        region.write_data(st_gpa + st_len - 1, bytes([OK]))
        dq.push(head, sum(ln for _, ln, w in segs if w))
        dq.interrupt()
        done += 1
    return done


# ---- vring.c -----------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [False, True])
def test_asking_for_an_interrupt_does_not_consume_it(name, event_idx):
    """vp_devq_need_interrupt only asks: the interrupt that follows is sent."""
    with Region.create(name, queue_size=8, event_idx=event_idx) as region:
        dq = DeviceQueue(region, 0)
        vq = Virtqueue(Region.attach(name), 0)
        try:
            data = region.queue_info(0)["data"]
            vq.submit([(data, 16)], [(data + 4096, 64)], token=1)
            head, _ = dq.pop()
            dq.push(head, 64)
            assert dq.need_interrupt()
            assert dq.interrupt()               # before: asking had eaten it
            assert vq.wait_interrupt(1.0)
            assert not dq.need_interrupt()      # told once, nothing new since
        finally:
            vq.close()
            vq.region.close()
            dq.close()


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_devq_open_rejects_ring_addresses_that_wrap(name, part):
    """A ring part whose end wraps past 2^64 is not 'inside the region'."""
    with Region.create(name, queue_size=8) as region:
        qi = region.queue_info(0)
        addr = {k: qi[k] for k in ("desc", "avail", "used")}
        addr[part] = 2 ** 64 - 8
        q, err = opened_c(lib.vp_devq_open, region.base, region.size, qi["data"],
                          qi["data"] + qi["data_size"], 0, 8, addr["desc"], addr["avail"],
                          addr["used"], 0, 0)
        if q != ffi.NULL:
            lib.vp_devq_close(q)
        assert q == ffi.NULL and err == -errno.EINVAL


# ---- region.c ----------------------------------------------------------------

def test_region_size_that_wraps_is_refused():
    p = ffi.new("struct vp_region_params *")
    p.num_queues, p.queue_size, p.data_size = 1, 8, 2 ** 64 - 4096
    size = ffi.new("uint64_t *")
    assert lib.vp_region_size(p, size) == -errno.EINVAL


# ---- blkdev.c ----------------------------------------------------------------

def test_read_past_4gib_reports_a_saturated_used_length(name, tmp_path):
    """Segments may overlap, so one read can move more than 4 GiB; used.len
    (32 bits) must say UINT32_MAX, not the total modulo 2^32."""
    mib = 1 << 20
    with Region.create(name, queue_size=128, data_size=64 * mib, capacity=(16 << 30) // 512,
                       event_idx=False) as region:
        region.set_daemon_pid(os.getpid())
        dq = DeviceQueue(region, 0)
        store = Store(str(tmp_path / "stripe"), 16 << 30, chunk=64 * mib)
        kick = Notifier.open_sem(region.sem_name(0, "kick"))
        try:
            srv = store.server(lib.VP_MODE_NOTIFY, 0)
            assert lib.vp_server_add_queue(srv, dq.handle) == 0
            assert lib.vp_server_start(srv) == 0
            qi = region.queue_info(0)
            lo, hi = qi["data"], qi["data"] + qi["data_size"]
            region.write_data(lo, struct.pack("<IIQ", T_IN, 0, 0))
            seg = hi - lo - 8192                   # all 65 overlap: 4.06 GiB
            segs = [(lo, 16, 0)] + [(lo + 4096, seg, F_WRITE)] * 65 + [(hi - 4096, 1, F_WRITE)]
            assert 65 * seg > 2 ** 32
            for i, (addr, ln, fl) in enumerate(segs):
                d = qi["desc"] + 16 * i
                last = i == len(segs) - 1
                region.poke(d, addr, 8)
                region.poke(d + 8, ln, 4)
                region.poke(d + 12, fl | (0 if last else F_NEXT), 2)
                region.poke(d + 14, 0 if last else i + 1, 2)
            region.poke(qi["avail"] + 4, 0, 2)
            region.poke(qi["avail"] + 2, 1, 2)
            kick.post()
            deadline = time.monotonic() + 60
            while used_ring(region, 0)["idx"] != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert used_ring(region, 0)["idx"] == 1
            assert region.read(hi - 4096, 1)[0] == OK
            assert int(used_ring(region, 0)["ring"][0]["len"]) == 2 ** 32 - 1
        finally:
            store.close()
            kick.close()
            dq.close()


def test_notify_server_refuses_a_queue_without_a_kick(name, tmp_path):
    """Notify mode sleeps on the kick (and posts it to wake workers at stop):
    without one it spun and crashed on a NULL notifier."""
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
            srv = store.server(lib.VP_MODE_POLL if mode == "poll" else lib.VP_MODE_NOTIFY,
                               io_threads)
            assert lib.vp_server_add_queue(srv, dq.handle) == 0
            assert lib.vp_server_start(srv) == 0
            disk = BlockDevice.attach(name, timeout=5)
            assert disk.get_id().startswith(b"review")
            lib.vp_server_stop(srv)
            assert lib.vp_server_start(srv) == 0
            assert disk.get_id().startswith(b"review")   # before: never served
        finally:
            if disk is not None:
                disk.close()
            store.close()
            dq.close()


# ---- workload.c --------------------------------------------------------------

def _one_read_job(slot, timeout_s, engine="c"):
    p = ffi.new("struct vp_run_params *")
    p.rw, p.bs, p.iodepth = lib.VP_RW_READ, 512, 1
    p.area_off, p.area_len, p.max_ios = 0, 512, 1
    p.timeout_ns = int(timeout_s * 1e9)
    res = ffi.new("struct vp_run_result *")
    out = {}

    def run():
        if engine == "c":
            out["rc"] = lib.vp_guest_run(slot._g, slot.strategy, p, res, ffi.NULL, 0)
        else:
            out["rc"] = _python_loop(slot, p, res, [], 0, types.SimpleNamespace(value=0))
    t = threading.Thread(target=run)
    t.start()
    return t, res, out


@pytest.fixture
def full_ring(name):
    """A 4-descriptor ring that one request (3 descriptors) fills, taken by
    slot a; slot b has nothing in flight.  Yields (region, dq, a, b)."""
    region = Region.create(name, queue_size=4, capacity=2048, event_idx=False)
    region.set_daemon_pid(os.getpid())
    dq = DeviceQueue(region, 0)
    vq = Virtqueue(Region.attach(name), 0)
    a = GuestSlot(vq, depth=1)
    b = GuestSlot(vq, depth=1)
    try:
        a.submit(0, T_IN, 0, 512)
        assert vq.num_free < 3
        yield region, dq, a, b
    finally:
        b.close()
        a.close()
        vq.close()
        vq.region.close()
        dq.close()
        region.close()


@pytest.mark.parametrize("engine", ["c", "python"])
def test_job_waits_for_room_when_the_ring_is_full_of_others_requests(full_ring, engine):
    """ENOSPC with none of its own requests in flight ended the job at once,
    with nothing done and rc 0."""
    region, dq, a, b = full_ring
    t, res, out = _one_read_job(b, timeout_s=10, engine=engine)
    try:
        time.sleep(0.3)
        assert serve_by_hand(region, dq, 2) == 2    # a's request, then b's
    finally:
        t.join(20)
    assert out["rc"] == 0
    assert res.queue_full >= 1
    assert res.issued == res.ios == res.reads == 1 and res.errors == 0
    assert a.wait(0, timeout=5)[0] == OK


@pytest.mark.parametrize("engine", ["c", "python"])
def test_job_gives_up_on_a_ring_that_stays_full_after_its_timeout(full_ring, engine):
    region, dq, a, b = full_ring
    t0 = time.monotonic()
    t, res, out = _one_read_job(b, timeout_s=0.3, engine=engine)
    t.join(20)
    assert not t.is_alive()
    assert out["rc"] == -errno.ETIMEDOUT and res.issued == 0
    assert time.monotonic() - t0 >= 0.3
    serve_by_hand(region, dq, 1)


# ---- guest.c -----------------------------------------------------------------

def test_slot_reset_waits_for_a_delivery_under_the_lock(name):
    """A reaper checks a token's gen and marks the tag done under the queue
    lock.  A new owner that reset the slot outside the lock could have the
    old owner's completion land on its own fresh request."""
    with Region.create(name, queue_size=8, capacity=2048, lock="mutex",
                       event_idx=False) as region:
        region.set_daemon_pid(os.getpid())
        dq = DeviceQueue(region, 0)
        vq = Virtqueue(Region.attach(name), 0)
        old = GuestSlot(vq, depth=1, irq=False)
        s = old.slot
        old.close()
        # comp[] follows 'delivered' (uint64_t) in struct vp_guest_slot.
        comp0 = (region.queue_info(0)["shared"] + ffi.offsetof("struct vp_queue_shared", "slot")
                 + s * ffi.sizeof("struct vp_guest_slot")
                 + ffi.offsetof("struct vp_guest_slot", "delivered") + 8)
        got = {}

        def new_owner():
            g = GuestSlot(vq, depth=1, irq=False)
            got["slot"] = g
            g.submit(0, T_IN, 0, 512)

        vq.lock.acquire()                       # a reaper, delivering for `old`
        t = threading.Thread(target=new_owner)
        try:
            t.start()
            time.sleep(0.3)                     # new owner: opening or submitting
            region.poke(comp0, 1, 4)            # the stale comp[0].done = 1
        finally:
            vq.lock.release()
            t.join(10)
        g = got["slot"]
        try:
            assert g.slot == s
            with pytest.raises(VirtioError):    # before: "done" at once, status 0xff
                g.wait(0, timeout=0.3)
            assert serve_by_hand(region, dq, 1) == 1
            assert g.wait(0, timeout=5)[0] == OK
        finally:
            g.close()
            vq.close()
            vq.region.close()
            dq.close()


# ---- notify.c ----------------------------------------------------------------

def test_eventfd_notifier_shared_by_threads_hands_out_each_count_once():
    """A device's I/O threads all wait on one kick.  With an eventfd, the
    first reader kept the rest of the count aside in the notifier, where
    the other waiters, asleep in poll(), never saw it (a lost wake-up); a
    reader woken with them could also block in read() past its timeout."""
    fd = os.eventfd(0)                      # blocking, as the tests' eventfds
    n = Notifier.open_eventfd(fd)
    try:
        for _ in range(10):
            got = []
            threads = [threading.Thread(
                target=lambda: got.append(lib.vp_notifier_wait(n.handle, 300_000_000)))
                for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            os.eventfd_write(fd, 2)
            for t in threads:
                t.join(2)
            stuck = sum(t.is_alive() for t in threads)
            for _ in range(stuck):
                os.eventfd_write(fd, 1)     # let a stuck reader go
            for t in threads:
                t.join(2)
            assert stuck == 0
            assert sorted(got) == [0, 1, 1]
            assert n.drain() == 0
    finally:
        n.close()
        os.close(fd)
