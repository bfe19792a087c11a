"""The in-flight record (csrc/restart.h): a device queue opened over the
record its predecessor left hands out again what was popped and not
completed, in pop order, and publishes once more a completion caught
half-published, so every chain completes exactly once."""

import pytest

from virtio_py import DeviceQueue, Region, Virtqueue
from virtio_py._lowlevel import ffi, lib


def _record(num):
    size = lib.vp_inflight_queue_size(num)
    return ffi.new("char[]", size), size


def _take_over(r, rec, size):
    dq = DeviceQueue(r, 0, notifiers=False)
    n = lib.vp_devq_set_inflight(dq.handle, rec, size)
    return dq, n


def test_popped_chains_are_handed_out_again_in_pop_order_and_complete_once(name):
    with Region.create(name, queue_size=8, data_size=1 << 20) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        lo = r.queue_info(0)["data"]
        rec, size = _record(8)
        dq, n = _take_over(r, rec, size)
        assert n == 0
        for t in (1, 2, 3):
            vq.submit([(lo + 64 * t, 16)], [(lo + 4096 + 64 * t, 8)], token=t)
        heads = [dq.pop()[0] for _ in range(3)]
        dq.push(heads[1], 8)  # the second completes; the others are in flight
        dq.close()  # the device dies
        dq, n = _take_over(r, rec, size)
        assert n == 2
        again = [dq.pop()[0] for _ in range(2)]
        assert again == [heads[0], heads[2]]
        vq.submit([(lo, 16)], [(lo + 4096, 8)], token=4)
        assert dq.pop()[0] not in again  # then the new one, never one in flight
        for h in again:
            dq.push(h, 8)
        got = sorted(vq.get_buf()[0] for _ in range(3))
        assert got == [1, 2, 3] and vq.get_buf() is None
        dq.close()
        vq.close()


@pytest.mark.parametrize("published", [False, True])
def test_a_completion_caught_half_published_is_delivered_exactly_once(name, published):
    with Region.create(name, queue_size=8, data_size=1 << 20) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        lo = r.queue_info(0)["data"]
        rec, size = _record(8)
        dq, _ = _take_over(r, rec, size)
        vq.submit([(lo, 16)], [(lo + 4096, 8)], token=7)
        head = dq.pop()[0]
        q = ffi.cast("struct vp_inflight_queue *", rec)
        # The record as a push leaves it between its two writes: marked
        # being published at used index 0, the used ring written or not.
        if published:
            dq.push(head, 5)
            q.used_idx = 0
        d = q.desc[head]
        d.len_lo, d.len_hi, d.next, d.inflight = 5, 0, 0, 2
        q.last_batch_head = head
        dq.close()
        dq, n = _take_over(r, rec, size)
        assert n == 0
        assert vq.get_buf() == (7, 5)
        assert vq.get_buf() is None
        assert dq.pop() is None
        dq.close()
        vq.close()


def test_an_inconsistent_record_breaks_the_queue(name):
    with Region.create(name, queue_size=8, data_size=1 << 20) as r:
        rec, size = _record(8)
        dq, _ = _take_over(r, rec, size)
        dq.close()
        q = ffi.cast("struct vp_inflight_queue *", rec)
        q.desc[3].inflight = 9
        dq, n = _take_over(r, rec, size)
        assert n == -lib.VP_ELAYOUT
        assert lib.vp_devq_broken(dq.handle)
        dq.close()
