"""The device against a hostile driver: hand-made malformed rings, written
with raw stores (tests/mockring.py), must each give their own error, mark the
queue broken and touch nothing outside the region.

The region is mapped between PROT_NONE guard pages, so the device runs in a
forked child: a stray access would kill it with SIGSEGV instead of the test
session, and procs.Child reports that as a failure.
"""

import errno

import numpy as np
import pytest

import procs
from mockring import F_INDIRECT, F_NEXT, F_WRITE, MockRing
from virtio_py import DeviceQueue, Region, RingError, Virtqueue, used_ring
from virtio_py._lowlevel import ffi, lib

NUM = 8
BUF = 256
NEEDS_RESET = 64


def good(m, i, k=None, flags=0, next=0):
    """Descriptor i on a good buffer: the k-th (default i-th) 256 bytes of
    the data area."""
    m.desc(i, m.buf(i if k is None else k, BUF), BUF, flags, next)


def hostile_ring(region, builder):
    """Make queue 0's ring hostile with builder; a chain it does not publish
    itself is published from head 0."""
    m = MockRing.of_queue(region, 0)
    builder(m)
    if m.avail_idx == 0:
        m.publish(0)
    return m


@pytest.fixture
def region(name):
    # Two queues: the second must keep serving once the first broke.
    r = Region.create(name, queues=2, queue_size=NUM, data_size=2 * 64 * 1024, event_idx=False)
    try:
        yield r
    finally:
        r.close()


# ---- the rings -------------------------------------------------------------
# Each builder makes queue 0's ring hostile; its chain starts at descriptor 0
# unless it publishes heads itself.


def head_out_of_range(m):
    good(m, 0)
    m.publish(NUM)


def head_0xffff(m):
    m.publish(0xFFFF)


def next_out_of_range(m):
    good(m, 0, flags=F_NEXT, next=NUM)


def next_0xffff(m):
    good(m, 0, flags=F_NEXT, next=1)
    good(m, 1, flags=F_NEXT, next=0xFFFF)


def self_loop(m):
    good(m, 0, flags=F_NEXT, next=0)


def two_cycle(m):
    good(m, 0, flags=F_NEXT, next=1)
    good(m, 1, flags=F_NEXT, next=0)


def long_loop(m):
    # 0 -> 1 -> ... -> 7 -> 3: a chain that never ends, entered from the side.
    for i in range(NUM):
        good(m, i, flags=F_NEXT, next=i + 1 if i + 1 < NUM else 3)


def addr_overflow(m):
    # addr + len wraps around 2^64 to a small, "valid-looking" end.
    m.desc(0, 2**64 - 16, 32)


def addr_last_byte(m):
    m.desc(0, 2**64 - 1, 1)


def addr_header(m):
    m.desc(0, 0, 64)


def addr_ring(m):
    m.desc(0, m.desc_gpa, 16, F_WRITE)


def addr_before_data(m):
    m.desc(0, m.data[0] - 8, 16)


def addr_straddles_end(m):
    m.desc(0, m.data[1] - 8, 16, F_WRITE)


def addr_at_end(m):
    m.desc(0, m.data[1], 1, F_WRITE)


def addr_past_region(m):
    m.desc(0, m.mem.size + 4096, 16, F_WRITE)


def len_too_long(m):
    m.desc(0, m.data[0], 0xFFFFFFFF, F_WRITE)


def addr_in_second_desc(m):
    good(m, 0, flags=F_NEXT, next=1)
    m.desc(1, 2**64 - 16, 32, F_WRITE)


def zero_len_head(m):
    m.desc(0, m.data[0], 0)


def zero_len_second(m):
    good(m, 0, flags=F_NEXT, next=1)
    m.desc(1, m.data[0] + 512, 0, F_WRITE)


def readable_after_writable(m):
    good(m, 0, flags=F_WRITE | F_NEXT, next=1)
    good(m, 1)


def read_write_read(m):
    good(m, 0, flags=F_NEXT, next=1)
    good(m, 1, flags=F_WRITE | F_NEXT, next=2)
    good(m, 2)


def indirect_head(m):
    good(m, 0, flags=F_INDIRECT)


def indirect_second(m):
    good(m, 0, flags=F_NEXT, next=1)
    good(m, 1, flags=F_INDIRECT | F_WRITE)


def avail_too_far(m):
    good(m, 0)
    m.publish(0, idx=NUM + 1)


def avail_backwards(m):
    good(m, 0)
    m.publish(0, idx=0xFFFF)


def avail_half_way(m):
    good(m, 0)
    m.publish(0, idx=0x8000)


def head_twice(m):
    good(m, 0)
    m.publish(0, 0)


def head_twice_later(m):
    good(m, 0)
    good(m, 1, flags=F_NEXT, next=2)
    good(m, 2, flags=F_WRITE)
    m.publish(0, 1, 0)


RULES = [
    ("EHEAD", head_out_of_range, 0),
    ("EHEAD", head_0xffff, 0),
    ("ENEXT", next_out_of_range, 0),
    ("ENEXT", next_0xffff, 0),
    ("ELOOP", self_loop, 0),
    ("ELOOP", two_cycle, 0),
    ("ELOOP", long_loop, 0),
    ("EADDR", addr_overflow, 0),
    ("EADDR", addr_last_byte, 0),
    ("EADDR", addr_header, 0),
    ("EADDR", addr_ring, 0),
    ("EADDR", addr_before_data, 0),
    ("EADDR", addr_straddles_end, 0),
    ("EADDR", addr_at_end, 0),
    ("EADDR", addr_past_region, 0),
    ("EADDR", len_too_long, 0),
    ("EADDR", addr_in_second_desc, 0),
    ("EZEROLEN", zero_len_head, 0),
    ("EZEROLEN", zero_len_second, 0),
    ("EORDER", readable_after_writable, 0),
    ("EORDER", read_write_read, 0),
    ("EINDIRECT", indirect_head, 0),
    ("EINDIRECT", indirect_second, 0),
    ("EAVAIL", avail_too_far, 0),
    ("EAVAIL", avail_backwards, 0),
    ("EAVAIL", avail_half_way, 0),
    ("EINFLIGHT", head_twice, 1),
    ("EINFLIGHT", head_twice_later, 2),
]


def allowed_changes(region, q):
    """Byte ranges a failed pop may write: the device stats block of its
    queue and the header's status word."""
    shared = region.device_layout[q]["shared"]
    dev = shared + ffi.offsetof("struct vp_queue_shared", "dev")
    status = ffi.offsetof("struct vp_region_header", "status")
    return [(dev, dev + ffi.sizeof("struct vp_device_stats")), (status, status + 4)]


def changed_outside(before, after, allowed):
    a = np.frombuffer(before, dtype=np.uint8)
    b = np.frombuffer(after, dtype=np.uint8)
    diff = a != b
    for lo, hi in allowed:
        diff[lo:hi] = False
    return [int(x) for x in np.flatnonzero(diff)[:16]]


def second_queue_serves(region, n=3 * NUM):
    """Queue 1 of the same device still moves requests."""
    vq = Virtqueue(region, 1, notifiers=False)
    dq = DeviceQueue(region, 1, notifiers=False)
    lo = region.queue_info(1)["data"]
    done = []
    for i in range(n):
        vq.add([(lo, 16)], [(lo + 256, 64)], token=1000 + i)
        head, segs = dq.pop()
        assert segs == [(lo, 16, False), (lo + 256, 64, True)]
        dq.push(head, 64)
        done.append(vq.get_buf())
    assert dq.broken == 0
    return done == [(1000 + i, 64) for i in range(n)]


def device_pops(region, good_pops, max_segs=None):
    """The device side, run in a child: pop until the hostile chain."""
    dq = DeviceQueue(region, 0, notifiers=False, max_segs=max_segs)
    heads = []
    for _ in range(good_pops):
        heads.append(dq.pop()[0])
    status_before = region.header.status
    before = region.read(0, region.size)
    try:
        got = dq.pop()
        return {"error": None, "got": got}
    except RingError as e:
        err = (type(e).__name__, e.code)
    after = region.read(0, region.size)
    res = {
        "error": err,
        "heads": heads,
        "broken": dq.broken,
        "status_before": status_before,
        "status_after": region.header.status,
        "stats_broken": region.queue_shared(0).dev.broken,
        "outside": changed_outside(before, after, allowed_changes(region, 0)),
    }
    again = []
    for _ in range(2):
        try:
            dq.pop()
            again.append(None)
        except RingError as e:
            again.append((type(e).__name__, e.code))
    res["again"] = again
    # The device refuses to complete on a broken queue, but still lets go of
    # what it holds.
    if heads:
        try:
            dq.push(heads[0], 0)
            res["push"] = None
        except RingError as e:
            res["push"] = (type(e).__name__, e.code)
    res["inflight"] = dq.inflight
    res["second_queue"] = second_queue_serves(region)
    return res


@pytest.mark.parametrize(
    "rule,build,good_pops", RULES, ids=[f"{r[0]}-{r[1].__name__}" for r in RULES]
)
def test_hostile_ring_breaks_queue(region, rule, build, good_pops):
    hostile_ring(region, build)
    code = getattr(lib, "VP_" + rule)
    res = procs.run(device_pops, region, good_pops, timeout=60)
    assert res["error"] == ("RingError", code), res
    assert res["broken"] == code
    assert res["stats_broken"] == code
    assert not res["status_before"] & NEEDS_RESET
    assert res["status_after"] & NEEDS_RESET
    assert res["status_after"] & ~NEEDS_RESET == res["status_before"]
    assert res["outside"] == [], "the failed pop wrote outside its stats block"
    assert res["again"] == [("QueueBrokenError", lib.VP_EBROKEN)] * 2
    if good_pops:
        assert res["push"] == ("QueueBrokenError", lib.VP_EBROKEN)
        assert res["inflight"] == good_pops - 1
    assert res["second_queue"] is True
    # The device process left; what the parent sees agrees.
    assert region.queue_shared(0).dev.broken == code
    assert region.header.status & NEEDS_RESET
    assert used_ring(region, 0)["idx"] == 0


def test_too_many_segments(region):
    m = MockRing.of_queue(region, 0)
    for i in range(3):
        good(m, i, flags=(F_NEXT if i < 2 else 0) | (F_WRITE if i else 0), next=i + 1)
    m.publish(0)
    res = procs.run(device_pops, region, 0, max_segs=2)
    assert res["error"] == ("RingError", lib.VP_ESEGMAX)
    assert res["broken"] == lib.VP_ESEGMAX
    assert res["outside"] == []
    assert res["second_queue"] is True


# The same rings through the C echo device, which writes into the first
# writable buffer of every chain it accepts: a check that let a bad buffer
# through would have it store outside the region (into a guard page).
ECHO_RULES = [r for r in RULES if r[2] == 0]


def echo_device(region):
    dq = DeviceQueue(region, 0, notifiers=False)
    try:
        n = dq.echo_serve(1, poll=True)
        return ("served", n)
    except RingError as e:
        return (type(e).__name__, e.code, dq.broken)


@pytest.mark.parametrize(
    "rule,build,good_pops", ECHO_RULES, ids=[f"{r[0]}-{r[1].__name__}" for r in ECHO_RULES]
)
def test_hostile_ring_echo_device(region, rule, build, good_pops):
    hostile_ring(region, build)
    before = region.read(0, region.size)
    code = getattr(lib, "VP_" + rule)
    assert procs.run(echo_device, region, timeout=30) == ("RingError", code, code)
    after = region.read(0, region.size)
    # The polling echo device also turns kicks off (used->flags) first.
    used = region.device_layout[0]["used"]
    allowed = allowed_changes(region, 0) + [(used, used + 2)]
    assert changed_outside(before, after, allowed) == []


def test_edges_of_the_data_area_are_accepted(region):
    """The checks are not off by one: buffers that touch the first and the
    last byte of the data area, and a chain of exactly the queue size."""
    m = MockRing.of_queue(region, 0)
    lo, hi = m.data
    m.desc(0, lo, 1, F_NEXT, next=1)
    m.desc(1, hi - 1, 1, F_WRITE)
    for i in range(2, NUM):  # one chain using all descriptors
        m.desc(
            i,
            lo + 16 * i,
            16,
            (F_NEXT if i < NUM - 1 else 0) | (F_WRITE if i >= 5 else 0),
            next=i + 1,
        )
    m.desc(NUM - 1, hi - 16, 16, F_WRITE)
    m.publish(0, 2)

    def device(region):
        dq = DeviceQueue(region, 0, notifiers=False)
        a = dq.pop()
        b = dq.pop()
        c = dq.pop()
        return a, b, c, dq.broken, dq.inflight

    a, b, c, broken, inflight = procs.run(device, region)
    assert a == (0, [(lo, 1, False), (hi - 1, 1, True)])
    assert b[0] == 2 and len(b[1]) == NUM - 2
    assert [s[2] for s in b[1]] == [False] * 3 + [True] * 3
    assert b[1][-1] == (hi - 16, 16, True)
    assert c is None
    assert broken == 0 and inflight == 2


def test_push_of_a_head_not_in_flight(region):
    def device(region):
        dq = DeviceQueue(region, 0, notifiers=False)
        out = []
        for head in (0, NUM, 0xFFFF):
            try:
                dq.push(head, 0)
                out.append(None)
            except RingError as e:
                out.append(e.code)
        return out, dq.broken

    out, broken = procs.run(device, region)
    assert out == [lib.VP_ENOTINFLIGHT] * 3
    assert broken == 0  # a device bug, not the guest's: the queue lives
    assert used_ring(region, 0)["idx"] == 0


@pytest.mark.parametrize("where", ["end", "top", "wraps", "misaligned", "the avail ring"])
def test_device_counts_where_it_laid_the_stats_block_out(region, where):
    """The device takes its rings and the place of its counters from its own
    layout: whatever a guest writes into the queue table's `shared`, the
    queue opens and its counters land in the block the device laid out."""
    gpa = ffi.offsetof("struct vp_region_header", "queue") + ffi.offsetof(
        "struct vp_queue_info", "shared"
    )
    bad = {
        "end": region.size - 8,
        "top": 2**64 - 64,
        "wraps": 2**64 - 8,
        "misaligned": region.device_layout[0]["shared"] + 8,
        "the avail ring": region.device_layout[0]["avail"],
    }[where]
    region.poke(gpa, bad, 8)

    def device(region):
        dq = DeviceQueue(region, 0, notifiers=False)
        dq.mark_broken(lib.VP_EHEAD)
        return dq.broken

    assert procs.run(device, region) == lib.VP_EHEAD
    broken = (
        region.device_layout[0]["shared"]
        + ffi.offsetof("struct vp_queue_shared", "dev")
        + ffi.offsetof("struct vp_device_stats", "broken")
    )
    assert int.from_bytes(region.read(broken, 4), "little") == lib.VP_EHEAD
    avail = region.device_layout[0]["avail"]
    assert region.read(avail, 64) == bytes(64)  # no counter landed on the ring


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_device_refuses_ring_addresses_that_wrap(name, part):
    """A ring part whose end wraps past 2^64 is not "inside the region"."""
    with Region.create(name, queue_size=8) as r:
        qi = r.queue_info(0)
        addr = {k: qi[k] for k in ("desc", "avail", "used")}
        addr[part] = 2**64 - 8
        err = ffi.new("int *")
        q = lib.vp_devq_open(
            r.base,
            r.size,
            qi["data"],
            qi["data"] + qi["data_size"],
            0,
            8,
            addr["desc"],
            addr["avail"],
            addr["used"],
            0,
            0,
            err,
        )
        if q != ffi.NULL:
            lib.vp_devq_close(q)
        assert q == ffi.NULL and err[0] == -errno.EINVAL


# ---- the driver against a hostile device -----------------------------------


def driver_get_buf(region, prepare):
    vq = Virtqueue(region, 0, notifiers=False)
    prepare(vq)
    state = vq.state()
    try:
        got = vq.get_buf()
        res = ("ok", got)
    except RingError as e:
        res = (type(e).__name__, e.code)
    after = vq.state()
    return res, state, after


# Each prepare adds what it needs, then stores used entries as a hostile
# device would.


def _never_added(vq):
    m = MockRing.of_queue(vq.region, 0)
    m.set_used_elem(0, 0, 16)
    m.set_used_idx(1)


def _out_of_range(id_):
    def prepare(vq):
        lo = vq.region.queue_info(0)["data"]
        vq.add([(lo, 16)], [], token=7)
        m = MockRing.of_queue(vq.region, 0)
        m.set_used_elem(0, id_, 0)
        m.set_used_idx(1)

    return prepare


def _not_a_head(vq):
    lo = vq.region.queue_info(0)["data"]
    vq.add([(lo, 16)], [(lo + 256, 16)], token=7)  # descriptors 0 -> 1
    m = MockRing.of_queue(vq.region, 0)
    m.set_used_elem(0, 1, 16)
    m.set_used_idx(1)


def _used_twice(vq):
    lo = vq.region.queue_info(0)["data"]
    vq.add([(lo, 16)], [(lo + 256, 16)], token=7)
    m = MockRing.of_queue(vq.region, 0)
    m.set_used_elem(0, 0, 16)
    m.set_used_elem(1, 0, 16)
    m.set_used_idx(1)
    assert vq.get_buf() == (7, 16)
    m.set_used_idx(2)


@pytest.mark.parametrize(
    "prepare",
    [_never_added, _out_of_range(NUM), _out_of_range(0xFFFFFFFF), _not_a_head, _used_twice],
    ids=["never-added", "id-num", "id-max", "not-a-head", "used-twice"],
)
def test_driver_rejects_bogus_used_id(region, prepare):
    res, before, after = procs.run(driver_get_buf, region, prepare)
    assert res == ("RingError", lib.VP_EUSEDID)
    # Nothing was taken off the ring: the driver's state is as it was.
    assert after == before
