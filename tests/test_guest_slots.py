"""Guest slots sharing one queue (each worker process's request buffers and
completion records): a job that meets a ring full of other slots' requests
waits for room, or gives up after its timeout, in both engines; a slot's new
owner never takes a completion delivered for its last owner.  The device is
served by hand, in this process, so every step is in the test's hands."""

import errno
import os
import threading
import time
import types

import pytest

from procs import lock_waiter_queued, wait_for
from virtio_py import DeviceQueue, Region, Virtqueue
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_IN, GuestSlot
from virtio_py.errors import VirtioError
from virtio_py.workload import python_loop

OK = lib.VIRTIO_BLK_S_OK


def serve_by_hand(region, dq, n, timeout=5):
    """Complete up to n chains as a block device would, with status OK;
    returns how many."""
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


def _one_read_job(slot, timeout_s, engine="c"):
    """A job of one 512-byte read on slot, run on a thread: (thread, result, out)."""
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
            out["rc"] = python_loop(slot, p, res, [], 0, types.SimpleNamespace(value=0))

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
    """A job with none of its own requests in flight that finds the ring full
    retries once others complete; it must not end at once with nothing done
    and rc 0."""
    region, dq, a, b = full_ring
    t, res, out = _one_read_job(b, timeout_s=10, engine=engine)
    try:
        wait_for(lambda: res.queue_full >= 1, "the job to meet the full ring")
        assert serve_by_hand(region, dq, 2) == 2  # a's request, then b's
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
    assert time.monotonic() - t0 >= 0.3  # not before its timeout
    serve_by_hand(region, dq, 1)


def test_slot_reset_waits_for_a_delivery_under_the_lock(name):
    """A reaper checks a token's gen and marks the tag done under the queue
    lock.  A new owner that reset the slot outside the lock could have the
    old owner's completion land on its own fresh request."""
    with Region.create(name, queue_size=8, capacity=2048, lock="mutex", event_idx=False) as region:
        region.set_daemon_pid(os.getpid())
        dq = DeviceQueue(region, 0)
        vq = Virtqueue(Region.attach(name), 0)
        old = GuestSlot(vq, depth=1, irq=False)
        s = old.slot
        old.close()
        # comp[] follows 'delivered' (uint64_t) in struct vp_guest_slot.
        comp0 = (
            region.queue_info(0)["shared"]
            + ffi.offsetof("struct vp_queue_shared", "slot")
            + s * ffi.sizeof("struct vp_guest_slot")
            + ffi.offsetof("struct vp_guest_slot", "delivered")
            + 8
        )
        got = {}

        def new_owner():
            g = GuestSlot(vq, depth=1, irq=False)
            got["slot"] = g
            g.submit(0, T_IN, 0, 512)

        vq.lock.acquire()  # a reaper, delivering for `old`
        t = threading.Thread(target=new_owner)
        try:
            t.start()
            # The new owner has claimed the slot and waits for the lock,
            # to reset the slot or to submit.
            wait_for(lambda: lock_waiter_queued(region), "the new owner to wait for the lock")
            region.poke(comp0, 1, 4)  # the stale comp[0].done = 1
        finally:
            vq.lock.release()
            t.join(10)
        g = got["slot"]
        try:
            assert g.slot == s
            with pytest.raises(VirtioError):  # not "done" at once, status 0xff
                g.wait(0, timeout=0.3)
            assert serve_by_hand(region, dq, 1) == 1
            assert g.wait(0, timeout=5)[0] == OK
        finally:
            g.close()
            vq.close()
            vq.region.close()
            dq.close()
