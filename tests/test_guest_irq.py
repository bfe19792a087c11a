"""Who takes an interrupt: a guest thread waiting for its completion sleeps
on the call notifier and on its slot at once and takes the interrupt
itself; the interrupt thread takes it only while no thread of its process
waits, and then wakes the owner as before.  Either way every completion is
delivered once, to its owner.  Waiting for room on a full ring takes the
queue lock only once room is there.

The device is served by hand in this process (serve_by_hand), so the test
decides when a completion comes: after the waiter has gone to sleep."""

import os
import platform
import struct
import threading

import pytest

from procs import wait_for
from test_guest_slots import serve_by_hand
from virtio_py import DeviceQueue, Region, Virtqueue
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_IN, GuestSlot, acct_dict
from virtio_py.errors import VirtioError
from virtio_py.workload import JobSpec, run_job
from virtio_py.workload import worker as worker_mod

OK = lib.VIRTIO_BLK_S_OK
# futex and futex_waitv: the numbers /proc/TID/syscall shows a sleeper in.
SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 202)
SYS_FUTEX_WAITV = 449


@pytest.fixture
def queue(name):
    """Queue 0 of a fresh region served by hand: (region, dq, vq)."""
    region = Region.create(name, queue_size=8, capacity=2048, event_idx=True)
    region.set_daemon_pid(os.getpid())
    dq = DeviceQueue(region, 0)
    vq = Virtqueue(Region.attach(name), 0)
    try:
        yield region, dq, vq
    finally:
        vq.close()
        vq.region.close()
        dq.close()
        region.close()


def sleepers_on_call(region):
    """Threads asleep on queue 0's call semaphore (glibc's layout: the
    sleepers in the high half of its first 64-bit word)."""
    path = "/dev/shm/sem." + region.sem_name(0, "call")[1:]
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0] >> 32


def in_syscall(tid):
    """The number of the system call thread tid sleeps in, or None."""
    with open(f"/proc/self/task/{tid}/syscall") as f:
        first = f.read().split()[0]
    return None if first in ("running", "-1") else int(first)


class Waiter:
    """slot.wait(0) on a thread of its own, with its own accounting."""

    def __init__(self, slot):
        self.slot, self.out = slot, {}
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        acct = ffi.new("struct vp_acct *")
        self.tid = threading.get_native_id()
        lib.vp_acct_set(acct)
        self.ready.set()
        try:
            self.out["status"] = self.slot.wait(0, timeout=20)[0]
        except VirtioError as e:
            self.out["error"] = e
        finally:
            lib.vp_acct_set(ffi.NULL)
            self.out["acct"] = acct_dict(acct)

    def asleep_in(self, *calls):
        return in_syscall(self.tid) in calls

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert "error" not in self.out, self.out
        return self.out


def direct_or_skip(slot):
    if not slot.direct_irq:
        pytest.skip("no futex_waitv, or a semaphore not on glibc's layout")


def test_a_waiter_takes_the_interrupt_itself_once_the_irq_thread_stepped_aside(queue):
    region, dq, vq = queue
    slot = GuestSlot(vq, depth=1)
    try:
        direct_or_skip(slot)
        slot.submit(0, T_IN, 0, 512)
        w = Waiter(slot)
        # The interrupt thread leaves the call to the waiter: it alone sleeps there.
        wait_for(
            lambda: w.asleep_in(SYS_FUTEX_WAITV) and sleepers_on_call(region) == 1,
            "the waiter alone asleep on the call",
        )
        assert serve_by_hand(region, dq, 1) == 1
        out = w.join()
        assert out["status"] == OK
        assert out["acct"]["irqs"] == 1 and out["acct"]["reaped"] == 1
        irq = slot.irq_acct()
        assert irq["irqs"] == 0 and irq["reaped"] == 0
    finally:
        slot.close()


def test_without_direct_interrupts_the_irq_thread_wakes_the_sleeping_owner(queue):
    region, dq, vq = queue
    slot = GuestSlot(vq, depth=1)
    try:
        slot.direct_irq = False
        assert not slot.direct_irq
        slot.submit(0, T_IN, 0, 512)
        w = Waiter(slot)
        wait_for(lambda: w.asleep_in(SYS_FUTEX), "the owner asleep on its slot")
        assert serve_by_hand(region, dq, 1) == 1
        out = w.join()
        assert out["status"] == OK
        assert out["acct"]["irqs"] == 0 and out["acct"]["reaped"] == 0
        wait_for(lambda: slot.irq_acct()["reaped"] == 1, "the irq thread's reap to be counted")
        assert slot.irq_acct()["irqs"] == 1
    finally:
        slot.close()


def test_a_waiter_without_an_interrupt_thread_is_woken_by_the_interrupt(queue):
    """No interrupt thread in the process: the waiter itself takes the post,
    instead of finding its completion only when it reaps after a quiet
    period."""
    region, dq, vq = queue
    slot = GuestSlot(vq, depth=1, irq=False)
    try:
        direct_or_skip(slot)
        slot.submit(0, T_IN, 0, 512)
        w = Waiter(slot)
        wait_for(lambda: w.asleep_in(SYS_FUTEX_WAITV), "the waiter asleep")
        assert serve_by_hand(region, dq, 1) == 1
        out = w.join()
        assert out["status"] == OK and out["acct"]["irqs"] == 1
    finally:
        slot.close()


def test_an_interrupt_for_another_slot_is_delivered_to_its_owner(queue):
    """The waiter that takes the interrupt reaps for everybody: b's
    completion reaches b (asleep on its slot), a keeps waiting for its own."""
    region, dq, vq = queue
    a = GuestSlot(vq, depth=1, irq=False)
    b = GuestSlot(vq, depth=1, irq=False)
    try:
        direct_or_skip(a)
        b.direct_irq = False  # b sleeps on its slot only: a must deliver
        b.submit(0, T_IN, 0, 512)
        a.submit(0, T_IN, 8, 512)
        wa, wb = Waiter(a), Waiter(b)
        wait_for(
            lambda: wa.asleep_in(SYS_FUTEX_WAITV) and wb.asleep_in(SYS_FUTEX),
            "both waiters asleep",
        )
        assert serve_by_hand(region, dq, 1) == 1  # b's request only
        out_b = wb.join()
        assert out_b["status"] == OK and out_b["acct"]["reaped"] == 0
        assert wa.thread.is_alive()
        assert serve_by_hand(region, dq, 1) == 1
        out_a = wa.join()
        assert out_a["status"] == OK and out_a["acct"]["reaped"] == 2
    finally:
        b.close()
        a.close()


def test_a_job_waiting_for_room_takes_the_lock_only_once_room_is_made(queue):
    region, dq, vq = queue
    slots = [GuestSlot(vq, depth=1) for _ in range(3)]
    other, job, third = slots
    t = None
    try:
        # Fill the 8-descriptor ring: 3 and 3, leaving 2.
        other.submit(0, T_IN, 0, 512)
        job.submit(0, T_IN, 8, 512)
        assert vq.num_free < 3
        lock = vq.lock
        before = lock.raw_stats()["acquisitions"]
        p = ffi.new("struct vp_run_params *")
        p.rw, p.bs, p.iodepth = lib.VP_RW_READ, 512, 1
        p.area_off, p.area_len, p.max_ios = 0, 512, 1
        p.timeout_ns = int(20e9)
        res = ffi.new("struct vp_run_result *")
        out = {}

        def run():
            out["rc"] = lib.vp_guest_run(third._g, third.strategy, p, res, ffi.NULL, 0)

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: res.queue_full >= 1, "the job to meet the full ring")
        # It waits for room with no lock taken: one try to add, no more.
        for _ in range(50):
            os.sched_yield()
        assert lock.raw_stats()["acquisitions"] == before + 1
        assert serve_by_hand(region, dq, 3) == 3  # other's, job's, then the third's
        t.join(30)
        assert out["rc"] == 0 and res.ios == 1 and res.errors == 0
    finally:
        if t is not None:
            serve_by_hand(region, dq, 3, timeout=0.5)
            t.join(30)
        for s in slots:
            s.close()


@pytest.mark.parametrize("direct", [True, False])
def test_workers_complete_exactly_once_whoever_takes_the_interrupts(device, monkeypatch, direct):
    """4 worker processes, iodepth 4, on the daemon: every completion reaches
    its owner once, whether waiters take interrupts or the irq threads do."""

    class Slot(GuestSlot):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if not direct:
                self.direct_irq = False

    monkeypatch.setattr(worker_mod, "GuestSlot", Slot)
    d = device()
    per_worker = 256
    res = run_job(
        JobSpec(d.name, workers=4, rw="randread", bs=4096, iodepth=4, size=per_worker * 4096)
    )
    ws = res["workers"]
    assert res["ios"] == res["requests_completed"] == 4 * per_worker
    assert res["dup_completions"] == 0 and res["errors"] == 0
    for w in ws:
        assert w["ios"] == w["issued"] == w["delivered"] == per_worker
    assert sum(w["reaped"] for w in ws) == 4 * per_worker
    if not direct:  # only the interrupt threads took interrupts
        assert sum(w["acct_main"]["irqs"] for w in ws) == 0
