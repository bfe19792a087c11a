"""A guest that rewrites the queue table while the device starts.

The device's copy of its layout is made from its parameters, never read
back from the header: a guest that aims queue 0's `shared` at queue 1's
avail ring before the device opens its queues cannot make the device write
queue 0's counters over queue 1's ring, and queue 1 serves untouched."""

from virtio_py import DeviceQueue, Region, Virtqueue
from virtio_py._lowlevel import ffi, lib

NUM = 8
SHARED_GPA = ffi.offsetof("struct vp_region_header", "queue") + ffi.offsetof(
    "struct vp_queue_info", "shared"
)


def test_layout_copy_comes_from_the_parameters(name):
    with Region.create(name, queues=3, queue_size=NUM) as r:
        for q in range(3):
            assert r.device_layout[q] == r.queue_info(q)
            assert r.device_layout[q]["shared"] == lib.vp_region_shared_gpa(q, NUM)


def test_queue_table_rewritten_before_the_device_opens_leaves_queue_1_intact(name):
    with Region.create(name, queues=2, queue_size=NUM, event_idx=False) as r:
        q1 = r.device_layout[1]
        # The guest, between the region's creation and the device's open;
        # it puts the table back once the device has opened its queues.
        r.poke(SHARED_GPA, q1["avail"], 8)
        dev0, dev1 = DeviceQueue(r, 0, notifiers=False), DeviceQueue(r, 1, notifiers=False)
        r.poke(SHARED_GPA, r.device_layout[0]["shared"], 8)
        guest = Region.attach(name)
        try:
            drv0 = Virtqueue(guest, 0, notifiers=False)
            drv1 = Virtqueue(guest, 1, notifiers=False)
            for rnd in range(3 * NUM):
                for drv, dev, q in ((drv0, dev0, 0), (drv1, dev1, 1)):
                    data = r.device_layout[q]["data"]
                    drv.submit([(data, 16)], [(data + 4096, 512)], token=rnd + 1)
                    head, segs = dev.pop()
                    dev.push(head, 512)
                    dev.interrupt()
                    assert drv.get_buf() == (rnd + 1, 512)
            assert dev0.broken == 0 and dev1.broken == 0
            # Queue 0's counters are in the block the device laid out.
            st0 = r.queue_shared(0).dev
            assert st0.chains == 3 * NUM and st0.last_avail_idx == 3 * NUM
            drv0.close()
            drv1.close()
        finally:
            guest.close()
            dev0.close()
            dev1.close()
