"""The daemon's vhost-user transport without a VM: a front-end written in the
tests (virtio_py's VhostUserFrontend, messages in QEMU's order) drives
`virtio-hostd start --vhost-user` through the whole sequence and real
virtio-blk requests, sends it bad messages and hostile rings, and comes and
goes a hundred times.  The daemon answers each bad message with an error,
keeps serving the next front-end, and leaves nothing behind."""

import os
import signal
import socket
import struct
import time

import pytest

from hostd_util import daemon_pid, hostd, status
from mockring import F_WRITE, MockRing
from procs import wait_for
from test_hostile import NUM, RULES, addr_before_data, addr_header, addr_ring
from vhost_util import (
    IOERR,
    OK,
    PAGE,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    UNSUPP,
    GuestRam,
    MiB,
    VhostGuest,
)
from virtio_py import DeviceGoneError, Region
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_DISCARD, T_WRITE_ZEROES, BlockDevice
from virtio_py.proc import pid_alive
from virtio_py.store import assemble
from virtio_py.vhost_user import VhostUserError, VhostUserFrontend
from virtio_py.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_HDR,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    MemoryRegionDesc,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    pack_memory_table,
    pack_u64,
    unpack_u64,
)

QSIZE = 16  # the daemon's --queue-size: seg_max 14, vrings of 16 and up
SIZE = 8 * MiB
CHUNK = 4096
NEED = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK


def start(daemons, name, tmp_path, *opts, queues=1, qsize=QSIZE, size="8M"):
    """A detached daemon on a 4-stripe store in tmp_path serving vhost-user;
    (socket path, daemon pid, store directory)."""
    sock, store = str(tmp_path / "vhost.sock"), str(tmp_path / "store")
    daemons.start(
        name,
        store,
        "--vhost-user",
        sock,
        "--queues",
        queues,
        "--queue-size",
        qsize,
        "--stripes",
        4,
        "--chunk",
        CHUNK,
        "--io-threads",
        2,
        *opts,
        size=size,
    )
    return sock, daemon_pid(name), store


def connections_done(pid, sock, timeout=10):
    """Wait until the daemon holds no connection: another front-end gets
    through negotiation (one is served at a time; a busy daemon hangs up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with VhostUserFrontend.connect(sock, timeout=2) as fe:
                fe.negotiate()
                return
        except (DeviceGoneError, ConnectionError, VhostUserError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def proc_counts(pid):
    """(open fds, memfd mappings, threads) of the daemon."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum("memfd:" in line for line in f)
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return fds, maps, threads


def settled(pid, counts):
    """Wait until the daemon is back to counts (it closes a connection's fds
    and mappings once it has read the hang-up)."""
    wait_for(
        lambda: proc_counts(pid) == counts,
        f"the daemon's fds, mappings and threads to be back to {counts}",
        10,
    )


# -- negotiation and config -----------------------------------------------------------
def test_front_end_is_offered_a_virtio_blk_device_with_its_config(name, tmp_path, daemons):
    sock, _, _ = start(daemons, name, tmp_path, queues=2)
    with VhostUserFrontend.connect(sock) as fe:
        acked = fe.negotiate()
        offered = fe.device_features
        for bit in (
            VHOST_USER_F_PROTOCOL_FEATURES,
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_MQ,
        ):
            assert offered >> bit & 1, bit
        assert not offered >> VIRTIO_RING_F_INDIRECT_DESC & 1
        assert acked >> VIRTIO_RING_F_EVENT_IDX & 1
        for bit in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG):
            assert fe.has_protocol_feature(bit), bit
        assert fe.max_queues == 2
        cfg = fe.blk_config()
        assert (cfg.capacity, cfg.seg_max, cfg.blk_size, cfg.num_queues) == (
            SIZE // 512,
            QSIZE - 2,
            512,
            2,
        )
        assert (cfg.max_discard_seg, cfg.max_write_zeroes_seg) == (1, 1)
        assert cfg.max_discard_sectors > 0 and cfg.max_write_zeroes_sectors > 0
        # QEMU 7.2 asks for 57 bytes; any size up to the config is answered exactly
        assert len(fe.get_config(57)) == 57
        assert fe.get_config(8, 8) == struct.pack("<II", 0, QSIZE - 2)
        with pytest.raises(VhostUserError, match="GET_CONFIG"):
            fe.get_config(16, 72)  # past the end: refused, not padded


def test_without_event_idx_the_device_is_offered_without_it(name, tmp_path, daemons):
    sock, _, _ = start(daemons, name, tmp_path, "--no-event-idx")
    with VhostGuest.connect(sock) as g:
        assert not g.fe.device_features >> VIRTIO_RING_F_EVENT_IDX & 1
        d = g.vring(0, num=QSIZE)
        d.write(0, b"n" * 4096)
        assert d.read(0, 4096) == b"n" * 4096


# -- requests -------------------------------------------------------------------------
def test_requests_on_two_vrings_land_where_raid0_puts_them(name, tmp_path, daemons):
    sock, _, store = start(daemons, name, tmp_path, queues=2)
    pattern = bytes(range(256)) * 48  # 12 KiB: crosses two chunks
    with VhostGuest.connect(sock) as g:
        q0, q1 = g.vring(0), g.vring(1, num=QSIZE)
        q0.write(2 * CHUNK + 1024, pattern)
        assert q1.read(2 * CHUNK + 1024, len(pattern)) == pattern
        # a request in flight per descriptor chain: eight 4 KiB reads at once
        got = q0.submit([(T_IN, 8 * k, [(q0.buf(k), 4096, True)]) for k in range(8)])
        assert got == [(OK, 4097)] * 8
        image = g.ram.read(q0.buf(0), 8 * 4096)
        assert image[2 * CHUNK + 1024 : 2 * CHUNK + 1024 + len(pattern)] == pattern
        # every request type: flush, serial, discard and write zeroes, unknown
        assert q1.request(T_FLUSH, 0) == (OK, 1)
        assert q1.request(T_GET_ID, 0, [(q1.buf(0), 20, True)]) == (OK, 21)
        assert g.ram.read(q1.buf(0), 20).rstrip(b"\0") == f"vpy-{name}".encode()[:20]
        rng = q1.buf(1)
        g.ram.write(rng, struct.pack("<QII", (2 * CHUNK + 1024) // 512, 2, 0))
        assert q1.request(T_WRITE_ZEROES, 0, [(rng, 16, False)]) == (OK, 1)
        assert q1.request(T_DISCARD, 0, [(rng, 16, False)]) == (OK, 1)
        assert q1.request(0x4242, 0) == (UNSUPP, 1)
        assert q0.read(2 * CHUNK + 1024, 1024) == bytes(1024)
        q0.write(2 * CHUNK + 1024, pattern[:1024])

        st = status(name)
        assert st["vhost_user"] == sock and st["running"]
        assert [q["broken"] for q in st["queues"]] == [False, False]
        assert st["queues"][0]["requests"]["in"] == 8 + 1
        assert st["queues"][0]["requests"]["out"] == 2
        assert st["queues"][1]["requests"] == dict(
            st["queues"][1]["requests"],
            **{"in": 1, "flush": 1, "get_id": 1, "write_zeroes": 1, "discard": 1, "unsupp": 1},
        )
        assert st["queues"][0]["bytes_written"] == len(pattern) + 1024
        assert st["queues"][0]["last_avail_idx"] == 1 + 8 + 1 + 1
        assert st["queues"][0]["inflight"] == 0
        text = hostd("status", "--name", name, check=True).stdout
        assert f"transport vhost-user, socket {sock}" in text
    hostd("stop", "--name", name, check=True)
    assert not os.path.exists(sock)
    out = tmp_path / "disk.raw"
    assemble(store, str(out))
    with open(out, "rb") as f:
        f.seek(2 * CHUNK + 1024)
        assert f.read(len(pattern)) == pattern


def test_vrings_resume_where_they_stopped_and_survive_table_and_call_changes(
    name, tmp_path, daemons
):
    sock, _, _ = start(daemons, name, tmp_path)
    with VhostGuest.connect(sock) as g:
        d = g.vring(0, num=QSIZE)
        d.write(0, b"a" * 4096)
        # QEMU sends SET_MEM_TABLE again when the guest's memory map changes,
        # and SET_VRING_CALL again when it masks a vector: the ring keeps going
        g.fe.set_mem_table(g.ram.mem)
        assert d.read(0, 4096) == b"a" * 4096
        old_call = d.vr.call_fd
        d.vr.call_fd = g.fe.set_vring_call(0)
        assert d.vr.call_fd != old_call
        assert d.read(0, 4096) == b"a" * 4096
        # GET_VRING_BASE stops the ring where the driver is...
        assert g.fe.stop_vring(0) == 3
        # ...and a ring set up again from there goes on
        d2 = g.vring(0, num=QSIZE, base=3)
        assert d2.ring.avail_idx == 3
        d2.write(4096, b"b" * 4096)
        assert d2.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        assert status(name)["queues"][0]["last_avail_idx"] == 5


def test_a_buffer_crossing_from_one_region_into_the_next_is_refused(name, tmp_path, daemons):
    """Adjacent regions: a buffer over the boundary is refused (EADDR), never
    read or written across it."""
    sock, pid, _ = start(daemons, name, tmp_path)
    with VhostGuest.connect(sock, layout=((0, MiB), (MiB, MiB))) as g:
        d = g.vring(0, num=QSIZE)
        d.ring.chain([(d.hdr_gpa, 16, False), (MiB - 2048, 4096, True), (d.hdr_gpa + 16, 1, True)])
        g.ram.write(d.hdr_gpa, struct.pack("<IIQ", T_IN, 0, 0))
        d.ring.publish(0)
        wait_for(lambda: status(name)["queues"][0]["broken"], "vring 0 to break")
        assert status(name)["queues"][0]["broken_reason"].startswith("EADDR")
    assert pid_alive(pid)
    with VhostGuest.connect(sock) as g:  # a reset makes the device whole
        d = g.vring(0, num=QSIZE)
        assert d.read(0, 512) == bytes(512)
        assert not status(name)["queues"][0]["broken"]


# -- bad messages ---------------------------------------------------------------------
def ask(ch, request, payload=b"", fds=(), flags=NEED, answer=True):
    """Send a raw request; the reply payload (None when the daemon hung up)."""
    ch.send(Message(request, flags, payload, list(fds)))
    if not answer:
        return None
    try:
        reply = ch.recv(5)
    except ConnectionResetError:
        return None
    return None if reply is None else reply.payload


def refused(payload):
    """A REPLY_ACK failure (non-zero u64) or a reply's empty payload."""
    assert payload is not None, "the daemon hung up instead of answering"
    return payload == b"" or unpack_u64(payload) != 0


def test_bad_messages_are_refused_and_the_daemon_keeps_serving(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path)
    # A native device on the same machine, to show it is not disturbed.
    native = f"{name}n"
    daemons.start(native, str(tmp_path / "native"), "--stripes", 2, "--chunk", "4K", size="1M")
    with BlockDevice.attach(native) as dev:
        dev.write(0, b"N" * 4096)
        before = proc_counts(pid)
        with VhostGuest.connect(sock, layout=((0, MiB), (MiB, MiB))) as g:
            ch, mem = g.fe.channel, g.ram.mem
            efd = os.eventfd(0)
            try:
                cases = {
                    "unknown request": ask(ch, 99),
                    "not implemented": ask(ch, Request.SET_LOG_BASE, bytes(16)),
                    "short payload": ask(ch, Request.SET_VRING_NUM, bytes(4)),
                    "long payload": ask(ch, Request.SET_FEATURES, bytes(12)),
                    "short payload, replying request": ask(ch, Request.GET_VRING_BASE, bytes(3)),
                    "kick without its fd": ask(
                        ch, Request.SET_VRING_KICK, VringFile(0, False).pack()
                    ),
                    "call with an fd too many": ask(
                        ch, Request.SET_VRING_CALL, VringFile(0, False).pack(), [efd, efd]
                    ),
                    "an fd where none belongs": ask(
                        ch, Request.SET_VRING_NUM, VringState(0, QSIZE).pack(), [efd]
                    ),
                    "a region without its fd": ask(
                        ch, Request.SET_MEM_TABLE, pack_memory_table(mem.descs()), mem.fds[:1]
                    ),
                    "overlapping regions": ask(
                        ch,
                        Request.SET_MEM_TABLE,
                        pack_memory_table(
                            [
                                MemoryRegionDesc(0, 2 * MiB, 1 << 40, 0),
                                MemoryRegionDesc(MiB, MiB, 2 << 40, 0),
                            ]
                        ),
                        mem.fds,
                    ),
                    "no vring 7": ask(ch, Request.SET_VRING_NUM, VringState(7, QSIZE).pack()),
                    "vring size not a power of two": ask(
                        ch, Request.SET_VRING_NUM, VringState(0, 24).pack()
                    ),
                    "ring outside memory": ask(
                        ch,
                        Request.SET_VRING_ADDR,
                        VringAddr(
                            0,
                            0,
                            mem.gpa_to_uaddr(0, 1),
                            mem.gpa_to_uaddr(0, 1) + 8 * MiB,
                            mem.gpa_to_uaddr(4096, 1),
                        ).pack(),
                    ),
                    "ring at a guest-physical address": ask(
                        ch, Request.SET_VRING_ADDR, VringAddr(0, 0, 0, 8192, 4096).pack()
                    ),
                    "features not offered": ask(ch, Request.SET_FEATURES, pack_u64(1 << 63)),
                    "config past its end": ask(
                        ch, Request.GET_CONFIG, struct.pack("<III", 60, 16, 0) + bytes(16)
                    ),
                }
            finally:
                os.close(efd)
            bad = [what for what, reply in cases.items() if not refused(reply)]
            assert not bad, f"accepted: {bad}"
            # the connection still works after all that
            d = g.vring(0, num=QSIZE)
            d.write(0, b"v" * 512)
            assert d.read(0, 512) == b"v" * 512
            # a short header cannot be answered: the daemon hangs up
            ch.sock.sendall(VHOST_USER_HDR.pack(Request.GET_FEATURES, VHOST_USER_VERSION, 0)[:5])
            ch.sock.shutdown(socket.SHUT_WR)
            assert ch.recv(5) is None
        # the daemon kept none of the fds it was sent with refused requests
        settled(pid, before)
        # the next front-end is served, and so is the native device
        with VhostGuest.connect(sock) as g:
            assert g.vring(0, num=QSIZE).read(0, 512) == b"v" * 512
        assert dev.read(0, 4096) == b"N" * 4096
    assert pid_alive(pid)
    assert not any(q["broken"] for q in status(name)["queues"])


# -- hostile rings --------------------------------------------------------------------
# The rings of tests/test_hostile.py, written into a vhost-user guest's RAM.
# Every rule holds with its own error code and breaks its vring alone, with
# "outside guest memory" now the memory table's business: the hole between
# regions, past the last one, or wrapping.  One rule is native-only: the
# per-queue data share.  A native queue's buffers must lie in its share of
# the region's data area (not the header, not the rings, not before it); a
# vhost-user front-end hands over all of guest RAM, and any of it is a
# valid buffer.
NATIVE_ONLY = {addr_header, addr_ring, addr_before_data}
SPARE = 15 * PAGE  # in vring 0's span of low memory, unused
HOLE = 3 * MiB  # between LAYOUT's regions (0-2 MiB, 4-6 MiB)
RAM_END = 6 * MiB
HOSTILE_DATA = RAM_END - 64 * 1024  # the hostile vring's data: up to the end of RAM


def in_the_hole(m):
    m.desc(0, HOLE, 512, F_WRITE)


def header_only(m):
    m.mem.write(m.buf(0, 16), struct.pack("<IIQ", T_IN, 0, 0))
    m.desc(0, m.buf(0, 16), 16)


# Rules the first pop breaks on, through the daemon; the in-flight ones need
# the device to hold a head, which a live server does only for as long as a
# request takes: they run at the queue level below.
DAEMON_RULES = [
    (rule, build) for rule, build, good_pops in RULES if not good_pops and build not in NATIVE_ONLY
] + [("EADDR", in_the_hole), ("EFRAME", header_only)]


def test_hostile_rings_break_only_their_own_vring(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path, queues=2, qsize=NUM)
    region = Region.attach(name)
    try:
        broken = lambda q: region.queue_shared(q).dev.broken  # noqa: E731
        for n, (rule, build) in enumerate(DAEMON_RULES):
            with VhostGuest.connect(sock) as g:
                good = g.vring(1, num=NUM)
                d = g.vring(0, num=NUM, data_gpa=HOSTILE_DATA, data_size=64 * 1024)
                build(d.ring)
                if d.ring.avail_idx == 0:
                    d.ring.publish(0)
                what = f"{rule} {build.__name__}"
                wait_for(lambda: broken(0), f"vring 0 to break: {what}", 10)
                assert broken(0) == getattr(lib, "VP_" + rule), what
                good.write(0, bytes([n]) * 512)
                assert good.read(0, 512) == bytes([n]) * 512, what
                assert not broken(1), what
        assert pid_alive(pid)
    finally:
        region.close()


def test_bad_requests_in_good_chains_get_a_status_and_any_ram_is_a_buffer(name, tmp_path, daemons):
    sock, _, _ = start(daemons, name, tmp_path, queues=2)
    with VhostGuest.connect(sock) as g:
        d, other = g.vring(0, num=QSIZE), g.vring(1, num=QSIZE)
        d.write(0, b"A" * 8192)
        cases = [
            ("IN into a readable buffer", T_IN, 0, [(d.buf(2), 512, False)], IOERR, 1),
            ("OUT from a writable buffer", T_OUT, 0, [(d.buf(2), 512, True)], IOERR, 1),
            ("IN of 100 bytes", T_IN, 0, [(d.buf(2), 100, True)], IOERR, 1),
            ("IN past the end", T_IN, SIZE // 512, [(d.buf(2), 512, True)], IOERR, 1),
            ("GET_ID into a readable buffer", T_GET_ID, 0, [(d.buf(2), 20, False)], IOERR, 1),
            ("DISCARD of 8 bytes", T_DISCARD, 0, [(d.buf(2), 8, False)], IOERR, 1),
            ("unknown type", 0x1234, 0, [], UNSUPP, 1),
            ("split read", T_IN, 8, [(d.buf(2), 512, True), (d.buf(4), 3584, True)], OK, 1 + 4096),
            ("a buffer O_DIRECT refuses", T_IN, 0, [(d.buf(6) + 1, 512, True)], OK, 1 + 512),
            # the native-only rule: another vring's data pages and a page
            # of the first region no vring uses are RAM like any other
            ("into another vring's pages", T_IN, 0, [(other.buf(0), 4096, True)], OK, 1 + 4096),
            ("into a spare page", T_IN, 0, [(SPARE, 512, True)], OK, 1 + 512),
        ]
        for what, rtype, sector, segs, want, used in cases:
            assert d.request(rtype, sector, segs) == (want, used), what
        assert g.ram.read(d.buf(4), 3584) == b"A" * 3584
        assert g.ram.read(d.buf(6) + 1, 512) == b"A" * 512
        assert g.ram.read(other.buf(0), 4096) == b"A" * 4096
        assert g.ram.read(SPARE, 512) == b"A" * 512
        q = status(name)["queues"][0]
        assert not q["broken"] and q["inflight"] == 0, q
        assert q["requests"]["ioerr"] == 6 and q["requests"]["unsupp"] == 1


def _pops(ram, build, good_pops):
    """Queue-level: a device queue over ram's memory table (as the daemon
    opens a vring), ring at GPA 0 and data at HOSTILE_DATA; build the ring,
    pop good_pops chains, then once more.  (pop result, broken code, result
    of popping again, and the first segment's host address next to where
    the table maps its GPA, if the pop took a chain)."""
    mem = ffi.gc(lib.vp_mem_new(ffi.new("int *")), lib.vp_mem_free)
    for r in ram.mem.regions:
        lib.vp_mem_add_region(
            mem, r.guest_phys_addr, r.memory_size, r.userspace_addr, ffi.cast("void *", r.va)
        )
    desc, avail, used = 0, 16 * NUM, 4096
    host = ram.mem.gpa_to_va
    err = ffi.new("int *")
    q = lib.vp_devq_open_mem(
        mem,
        0,
        NUM,
        ffi.cast("void *", host(desc, 16 * NUM)),
        ffi.cast("void *", host(avail, 6 + 2 * NUM)),
        ffi.cast("void *", host(used, 6 + 8 * NUM)),
        ffi.NULL,
        0,
        lib.VP_EXIT_ASYNC,
        err,
    )
    assert q != ffi.NULL, err[0]
    try:
        m = MockRing(ram, NUM, desc, avail, used, data=(HOSTILE_DATA, RAM_END))
        build(m)
        if m.avail_idx == 0:
            m.publish(0)
        chain = ffi.new("struct vp_chain *")
        segs = ffi.new("struct vp_seg[]", NUM)
        for _ in range(good_pops):
            assert lib.vp_devq_pop(q, chain, segs, NUM) == 1
        r = lib.vp_devq_pop(q, chain, segs, NUM)
        first = None
        if r == 1:
            first = (
                int(ffi.cast("uintptr_t", segs[0].host)),
                ram.mem.gpa_to_va(segs[0].addr, segs[0].len),
            )
        return r, lib.vp_devq_broken(q), lib.vp_devq_pop(q, chain, segs, NUM), first
    finally:
        lib.vp_devq_close(q)


@pytest.mark.parametrize(
    "rule,build,good_pops", RULES, ids=[f"{r[0]}-{r[1].__name__}" for r in RULES]
)
def test_every_ring_rule_holds_over_a_memory_table(rule, build, good_pops):
    ram = GuestRam()
    assert ram.size == RAM_END
    try:
        r, broken, again, first = _pops(ram, build, good_pops)
    finally:
        ram.close()
    if build in NATIVE_ONLY:  # any guest RAM is a buffer
        assert (r, broken) == (1, 0)
        assert first[0] == first[1]
        return
    code = getattr(lib, "VP_" + rule)
    assert (r, broken, again) == (-code, code, -lib.VP_EBROKEN)


# -- connections come and go ----------------------------------------------------------
def test_front_end_gone_with_requests_in_flight(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path, queues=2)
    for _ in range(3):
        g = VhostGuest.connect(sock)
        d = g.vring(0, num=QSIZE)
        reqs = [(T_OUT, 8 * k, [(d.buf(k), 4096, False)]) for k in range(5)]
        for k, (rtype, sector, segs) in enumerate(reqs):  # publish, then vanish
            g.ram.write(d.hdr_gpa + 32 * k, struct.pack("<IIQ", rtype, 0, sector))
            d.ring.chain(
                [(d.hdr_gpa + 32 * k, 16, False)] + segs + [(d.hdr_gpa + 32 * k + 16, 1, True)],
                3 * k,
            )
        d.ring.publish(*range(0, 15, 3))
        g.close()
    connections_done(pid, sock)
    with VhostGuest.connect(sock) as g:
        d = g.vring(1, num=QSIZE)
        d.write(0, b"z" * 4096)
        assert d.read(0, 4096) == b"z" * 4096
    assert status(name)["queues"][0]["inflight"] == 0


def test_nothing_left_behind_after_100_connections(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path)
    before = proc_counts(pid)  # no connection yet
    for i in range(100):
        if i % 4 == 3:  # connect and hang up at once
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            continue
        with VhostGuest.connect(sock) as g:
            d = g.vring(0, num=QSIZE)
            assert d.request(T_FLUSH, 0) == (OK, 1)
            if i % 2:
                g.fe.stop_vring(0)
    settled(pid, before)  # fds, memfd mappings, threads
    hostd("stop", "--name", name, check=True)
    assert not os.path.exists(sock)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_stop_with_a_front_end_connected_ends_cleanly(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path)
    with VhostGuest.connect(sock) as g:
        d = g.vring(0, num=QSIZE)
        d.write(0, b"s" * 4096)
        p = hostd("stop", "--name", name)
        assert p.returncode == 0, p.stderr
        assert not pid_alive(pid)
        assert not os.path.exists(sock)
        with pytest.raises((DeviceGoneError, OSError)):
            g.fe.get_config()


def test_sigterm_removes_the_socket(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), "the daemon to exit")
    assert not os.path.exists(sock)
    assert not os.path.exists(f"/dev/shm/{name}")


def test_a_killed_daemons_socket_is_replaced_and_a_live_one_refused(name, tmp_path, daemons):
    sock, pid, _ = start(daemons, name, tmp_path)
    other = daemons.start(f"{name}b", str(tmp_path / "b"), "--vhost-user", sock, check=False)
    assert other.returncode != 0
    lines = other.stderr.splitlines()
    assert len(lines) == 1 and "another back-end listens" in lines[0], other.stderr
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), "the daemon to die")
    assert os.path.exists(sock)  # a crash leaves it
    sock, pid, _ = start(daemons, name, tmp_path)
    with VhostGuest.connect(sock) as g:
        assert g.vring(0, num=QSIZE).request(T_FLUSH, 0) == (OK, 1)
