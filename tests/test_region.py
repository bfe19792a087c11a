"""The shared region's lifetime: create, attach, close, unlink, and what is
left in /dev/shm afterwards; the parameters and layouts it refuses."""

import errno
import math
import os
import stat

import numpy as np
import posix_ipc
import pytest

from mockring import MockRing
from virtio_py import (
    ConfigError,
    Region,
    RegionError,
    VirtioError,
    avail_ring,
    desc_table,
    used_ring,
    vring_layout,
    vring_size,
)
from virtio_py import region as region_mod
from virtio_py._lowlevel import ffi, lib


def present(name, queues=None):
    return [p for p in region_mod.ipc_paths(name, queues) if os.path.exists(p)]


def expected_paths(name, queues):
    shm = f"/dev/shm/{name}"
    sems = [
        f"/dev/shm/sem.{name}.q{q}.{role}"
        for q in range(queues)
        for role in ("kick", "call", "ack")
    ]
    return [shm] + sems


def test_ipc_paths_are_the_objects_created(name):
    r = Region.create(name, queues=3, queue_size=8, data_size=1 << 20)
    try:
        assert region_mod.ipc_paths(name, 3) == expected_paths(name, 3)
        assert sorted(present(name)) == sorted(expected_paths(name, 3))
        st = os.stat(f"/dev/shm/{name}")
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == r.size
    finally:
        r.close()
    assert present(name) == []
    assert not region_mod.exists(name)


def test_create_attach_share_memory(name):
    with Region.create(
        name,
        queues=2,
        queue_size=16,
        data_size=1 << 20,
        lock="mutex",
        exit="sync",
        mode="poll",
        event_idx=False,
        capacity=2048,
        blk_size=4096,
    ) as owner:
        assert owner.owner and not owner.closed
        with Region.attach(name) as guest:
            assert not guest.owner
            assert guest.size == owner.size
            assert guest.num_queues == 2
            assert guest.lock_kind == "mutex"
            assert guest.exit_mode == "sync"
            assert guest.serve_mode == "poll"
            assert guest.event_idx is False
            assert guest.header.blk.capacity == 2048
            assert guest.header.blk.blk_size == 4096
            assert guest.header.blk.num_queues == 2
            assert ffi.string(guest.header.name).decode() == name
            for q in range(2):
                assert guest.queue_info(q) == owner.queue_info(q)
            # Two mappings of one object: a store through one is seen
            # through the other.
            gpa = owner.queue_info(1)["data"] + 128
            owner.write_data(gpa, b"virtio!")
            assert guest.read(gpa, 7) == b"virtio!"
            guest.write_data(gpa, b"ring")
            assert owner.read(gpa, 7) == b"ringio!"
        # Closing an attacher unmaps only; the device's objects stay.
        assert guest.closed
        assert sorted(present(name)) == sorted(expected_paths(name, 2))
        with pytest.raises(RegionError):
            guest.base
        with Region.attach(name) as again:
            assert again.read(gpa, 4) == b"ring"
    assert present(name) == []


def test_event_idx_feature_follows_create(name):
    with Region.create(name, queue_size=8, data_size=1 << 16, event_idx=True) as r:
        assert r.event_idx
        assert r.features >> lib.VIRTIO_RING_F_EVENT_IDX & 1
    with Region.create(name, queue_size=8, data_size=1 << 16, event_idx=False) as r:
        assert not r.event_idx
        assert not r.features >> lib.VIRTIO_RING_F_EVENT_IDX & 1


@pytest.mark.parametrize("num", [1, 2, 256, 32768])
def test_rings_placed_as_vring_init(name, num):
    with Region.create(name, queues=2, queue_size=num, data_size=2 << 20) as r:
        hdr = r.header
        assert hdr.magic == lib.VP_MAGIC and hdr.version == lib.VP_LAYOUT_VERSION
        assert hdr.data_offset % 4096 == 0
        assert hdr.data_offset + hdr.data_size <= r.size
        prev_end = 0
        for q in range(2):
            qi = r.queue_info(q)
            assert qi["num"] == num
            assert qi["desc"] % 4096 == 0
            d, a, u = vring_layout(num)
            assert (qi["avail"] - qi["desc"], qi["used"] - qi["desc"]) == (a, u)
            assert qi["desc"] + vring_size(num) <= hdr.data_offset
            assert qi["desc"] >= prev_end
            prev_end = qi["desc"] + vring_size(num)
            assert hdr.data_offset <= qi["data"]
            assert qi["data"] + qi["data_size"] <= hdr.data_offset + hdr.data_size
            # A fresh ring: free list 0 -> 1 -> ... and every index zero.
            desc = desc_table(r, q)
            assert list(desc["next"][: num - 1]) == list(range(1, num))
            assert avail_ring(r, q)["idx"] == 0 and used_ring(r, q)["idx"] == 0
            st = r.queue_shared(q).drv
            assert st.num_free == num and st.free_head == 0


def test_second_create_fails_and_keeps_the_first(name):
    with Region.create(name, queue_size=8, data_size=1 << 16) as r:
        r.write_data(r.queue_info(0)["data"], b"first")
        with pytest.raises(RegionError):
            Region.create(name, queue_size=8, data_size=1 << 16)
        # The failed create must not have unlinked the first device's objects.
        assert sorted(present(name)) == sorted(expected_paths(name, 1))
        with Region.attach(name) as g:
            assert g.read(g.queue_info(0)["data"], 5) == b"first"
    assert present(name) == []


def test_create_cleans_up_after_a_stale_semaphore(name):
    stale = region_mod.sem_name(name, 0, "call")
    posix_ipc.Semaphore(stale, posix_ipc.O_CREX, initial_value=0).close()
    try:
        with pytest.raises(RegionError):
            Region.create(name, queue_size=8, data_size=1 << 16)
        # What create made is gone; the stale object is not ours to remove.
        assert present(name) == ["/dev/shm/sem." + stale[1:]]
    finally:
        posix_ipc.unlink_semaphore(stale)
    assert present(name) == []


@pytest.mark.parametrize(
    "bad",
    ["", "/x", "a/b", "x" * 49, ".hidden", "-dash", "sp ace", "uni\u00e9", 123, None, b"bytes"],
)
def test_bad_names(bad):
    with pytest.raises(ConfigError):
        Region.create(bad, queue_size=8, data_size=1 << 16)
    with pytest.raises(ConfigError):
        Region.attach(bad)
    with pytest.raises(ConfigError):
        region_mod.destroy(bad)


def test_longest_name_is_accepted(name):
    long_name = (name + "-" + "x" * 48)[:48]
    with Region.create(long_name, queue_size=1, data_size=1 << 16) as r:
        assert ffi.string(r.header.name).decode() == long_name
    assert present(long_name) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(queue_size=3),
        dict(queue_size=0),
        dict(queue_size=65536),
        dict(queues=0),
        dict(queues=17),
        dict(lock="ticket"),
        dict(exit="trap"),
        dict(mode="busy"),
        dict(exit_cost_us=-1),
        dict(exit_cost_us=math.nan),
        dict(data_size=0),
        dict(queues=4, data_size=4096),  # less than a page per queue
    ],
)
def test_bad_parameters_leave_nothing(name, kwargs):
    args = dict(queue_size=8, data_size=1 << 16)
    args.update(kwargs)
    with pytest.raises(ConfigError):
        Region.create(name, **args)
    assert present(name) == []


def test_region_size_that_wraps_is_refused():
    p = ffi.new("struct vp_region_params *")
    p.num_queues, p.queue_size, p.data_size = 1, 8, 2**64 - 4096
    size = ffi.new("uint64_t *")
    assert lib.vp_region_size(p, size) == -errno.EINVAL


def test_attach_missing(name):
    with pytest.raises(RegionError):
        Region.attach(name)


def test_attach_empty_object(name):
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=0)
    shm.close_fd()
    try:
        with pytest.raises(RegionError):
            Region.attach(name)
    finally:
        posix_ipc.unlink_shared_memory("/" + name)


def test_attach_checks_magic_and_layout(name):
    with Region.create(name, queues=2, queue_size=8, data_size=1 << 16) as r:
        magic = ffi.offsetof("struct vp_region_header", "magic")
        r.poke(magic, 0x1234, 8)
        with pytest.raises(RegionError) as e:
            Region.attach(name)
        assert e.value.code == lib.VP_EMAGIC
        r.poke(magic, lib.VP_MAGIC, 8)
        # A queue table row pointing past the end of the region.
        used = (
            ffi.offsetof("struct vp_region_header", "queue")
            + ffi.sizeof("struct vp_queue_info")
            + ffi.offsetof("struct vp_queue_info", "used")
        )
        r.poke(used, r.size - 8, 8)
        with pytest.raises(RegionError) as e:
            Region.attach(name)
        assert e.value.code == lib.VP_ELAYOUT
        r.poke(used, r.device_layout[1]["used"], 8)
        Region.attach(name).close()


QUEUE_FIELDS = ["desc", "avail", "used", "shared", "tokens", "data"]


def _queue_field(q, field):
    return (
        ffi.offsetof("struct vp_region_header", "queue")
        + q * ffi.sizeof("struct vp_queue_info")
        + ffi.offsetof("struct vp_queue_info", field)
    )


@pytest.mark.parametrize("field", QUEUE_FIELDS)
@pytest.mark.parametrize("value", ["past-end", "wraps", "top"])
def test_attach_rejects_queue_table_outside_region(name, field, value):
    """A driver must not place its rings by a queue table that points
    outside the region, including by offsets whose sum wraps past 2^64."""
    with Region.create(name, queues=2, queue_size=8, data_size=1 << 16) as r:
        gpa = _queue_field(1, field)
        bad = {"past-end": r.size, "wraps": 2**64 - 4096, "top": 2**64 - 8}[value]
        r.poke(gpa, bad, 8)
        with pytest.raises(RegionError) as e:
            Region.attach(name)
        assert e.value.code == lib.VP_ELAYOUT
        r.poke(gpa, r.device_layout[1][field], 8)
        Region.attach(name).close()


@pytest.mark.parametrize(
    "field,misalign", [("desc", 8), ("avail", 1), ("used", 2), ("shared", 8), ("tokens", 4)]
)
def test_attach_rejects_misaligned_queue_table(name, field, misalign):
    """Rings, the lock and the token table are accessed with aligned
    atomics; a header that misplaces them is refused."""
    with Region.create(name, queues=1, queue_size=8, data_size=1 << 16) as r:
        gpa = _queue_field(0, field)
        r.poke(gpa, r.device_layout[0][field] + misalign, 8)
        with pytest.raises(RegionError) as e:
            Region.attach(name)
        assert e.value.code == lib.VP_ELAYOUT


def test_close_is_idempotent_and_unlinks(name):
    r = Region.create(name, queue_size=8, data_size=1 << 16)
    r.close()
    r.close()
    assert r.closed
    assert present(name) == []
    with pytest.raises(RegionError):
        r.base
    with pytest.raises(RegionError):
        Region.attach(name)


def test_unlink_keeps_mapping(name):
    r = Region.create(name, queue_size=8, data_size=1 << 16)
    try:
        r.unlink()
        assert present(name) == []
        # Unlinked objects stay usable by whoever has them mapped.
        gpa = r.queue_info(0)["data"]
        r.write_data(gpa, b"still here")
        assert r.read(gpa, 10) == b"still here"
    finally:
        r.close()
    assert present(name) == []


def test_destroy_removes_leftovers(name):
    pid = os.fork()
    if pid == 0:
        try:
            r = Region.create(name, queues=2, queue_size=8, data_size=1 << 16)
            os._exit(0 if r.size else 2)  # dies without closing: objects stay
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    left = present(name)
    assert sorted(left) == sorted(expected_paths(name, 2))
    removed = region_mod.destroy(name)
    assert sorted(removed) == sorted(
        ["/" + name]
        + [region_mod.sem_name(name, q, role) for q in range(2) for role in ("kick", "call", "ack")]
    )
    assert present(name) == []
    assert region_mod.destroy(name) == []
    # The name is free again.
    Region.create(name, queue_size=8, data_size=1 << 16).close()


def test_views_are_read_only_and_live(name):
    with Region.create(name, queue_size=8, data_size=1 << 16) as r:
        desc, avail, used = desc_table(r), avail_ring(r), used_ring(r)
        assert desc.shape == (8,)
        for view, field in ((desc, "addr"), (avail, "idx"), (used, "idx")):
            with pytest.raises(ValueError):
                view[field] = 1
        with pytest.raises(ValueError):
            desc[0] = (1, 2, 3, 4)
        with pytest.raises(ValueError):
            avail["ring"][0] = 1
        with pytest.raises(ValueError):
            used["ring"]["id"][0] = 1
        with pytest.raises(ValueError):
            np.asarray(desc).flags.writeable = True
        # The views alias the ring: raw stores show through.
        m = MockRing.of_queue(r, 0)
        m.avail_entry(7, 5)
        m.publish(idx=0xBEEF)
        m.set_used_elem(3, 6, 4096)
        m.desc(2, 0x1122334455667788, 512, 3, 7)
        assert avail["idx"] == 0xBEEF
        assert avail["ring"][7] == 5
        assert tuple(used["ring"][3]) == (6, 4096)
        assert tuple(desc[2]) == (0x1122334455667788, 512, 3, 7)


def test_bounds_of_read_write_poke(name):
    with Region.create(name, queue_size=8, data_size=1 << 16) as r:
        lo = r.header.data_offset
        hi = lo + r.header.data_size
        r.write_data(hi - 4, b"last")
        assert r.read(hi - 4, 4) == b"last"
        for gpa, data in (
            (lo - 1, b"x"),
            (hi - 3, b"last"),
            (0, b"hdr"),
            (r.queue_info(0)["desc"], b"\0" * 16),
        ):
            with pytest.raises(ConfigError):
                r.write_data(gpa, data)
        with pytest.raises(ConfigError):
            r.read(r.size - 3, 4)
        with pytest.raises(ConfigError):
            r.read(-1, 1)
        r.poke(r.size - 8, 7, 8)
        for gpa, width in (
            (r.size, 1),
            (r.size - 4, 8),
            (1, 2),
            (2, 4),
            (4, 8),
            (0, 3),
            (2**64 - 8, 8),
        ):
            with pytest.raises(ConfigError):
                r.poke(gpa, 0, width)


def test_errors_share_one_root():
    for cls in (ConfigError, RegionError):
        assert issubclass(cls, VirtioError)
