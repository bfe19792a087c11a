"""vhost-user protocol: our front-end against our back-end state machine (with a
device model written here), every bad message a peer can send, fds and
mappings across connections, and our front-end against qemu-storage-daemon."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

from virtio_py import DeviceGoneError
from virtio_py.vhost_user import (
    AddressError,
    Channel,
    FrontendMemory,
    MemoryTable,
    VhostUserDevice,
    VhostUserError,
    VhostUserFrontend,
    VhostUserServer,
    Vring,
)
from virtio_py.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_HDR,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    ConfigSpace,
    InflightDesc,
    MemoryRegionDesc,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VirtioBlkConfig,
    VringAddr,
    VringFile,
    VringState,
    bits,
    pack_memory_table,
    pack_u64,
    unpack_u64,
)

MiB = 1 << 20
CAPACITY = 2048  # sectors
CONFIG = VirtioBlkConfig(
    capacity=CAPACITY,
    seg_max=126,
    blk_size=512,
    num_queues=2,
    max_discard_sectors=64,
    max_discard_seg=1,
)


def is_eventfd(fd: int | None) -> bool:
    return fd is not None and os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"


class FakeBlk(VhostUserDevice):
    """A device model that records what the back-end asks of it.  A started
    vring's first descriptor bytes are read through the address it was given,
    so a wrong translation shows."""

    def __init__(self, queues: int = 1) -> None:
        self.queues = queues
        self.acked: int | None = None
        self.running: dict[int, Vring] = {}
        self.starts: list[Vring] = []
        self.desc_seen: list[bytes] = []
        self.stops: list[int] = []
        self.resets = 0
        self.advance = 0  # requests "served" between start and stop
        self.fail_start = False

    @property
    def num_queues(self) -> int:
        return self.queues

    def features(self) -> int:
        f = bits(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_BLK_F_FLUSH)
        return f | (1 << VIRTIO_BLK_F_MQ if self.queues > 1 else 0)

    def get_config(self, offset: int, size: int) -> bytes:
        raw = CONFIG.pack()
        if offset + size > len(raw):
            raise ValueError(f"config read past {len(raw)} bytes")
        return raw[offset : offset + size]

    def set_features(self, features: int) -> None:
        if not features >> VIRTIO_F_VERSION_1 & 1:
            raise ValueError("VERSION_1 is required")
        self.acked = features

    def start_queue(self, vring: Vring) -> None:
        if self.fail_start:
            raise RuntimeError("device cannot start")
        assert vring.index not in self.running
        self.desc_seen.append(ctypes.string_at(vring.desc, 16))
        self.running[vring.index] = vring
        self.starts.append(vring)

    def stop_queue(self, index: int) -> int:
        vring = self.running.pop(index)
        self.stops.append(index)
        return (vring.base + self.advance) & 0xFFFF

    def reset(self) -> None:
        assert not self.running
        self.resets += 1
        self.acked = None

    def interrupt(self, index: int) -> None:
        fd = self.running[index].call_fd
        assert fd is not None
        os.eventfd_write(fd, 1)


class Served:
    """A back-end serving a FakeBlk on a socket, in a thread."""

    def __init__(self, device: FakeBlk, body_timeout: float = 5.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="vu", dir="/tmp")
        self.path = os.path.join(self.dir, "sock")
        self.device = device
        self.server = VhostUserServer(self.path, device, body_timeout=body_timeout)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.seen = 0

    def frontend(self) -> VhostUserFrontend:
        return VhostUserFrontend.connect(self.path)

    def raw(self) -> Channel:
        return Channel.connect(self.path)

    def gone(self) -> None:
        """Wait until the back-end has finished with the last connection."""
        self.seen += 1
        assert self.server.wait_connections(self.seen), "back-end kept the connection"

    def still_serves(self) -> None:
        """Another front-end gets through the whole negotiation."""
        with self.frontend() as fe:
            fe.negotiate()
            assert VirtioBlkConfig.unpack(fe.get_config()).capacity == CAPACITY
        self.gone()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()
        assert not os.path.exists(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def served():
    s = Served(FakeBlk())
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def served2():
    s = Served(FakeBlk(queues=2))
    try:
        yield s
    finally:
        s.stop()


def ring_uaddrs(mem: FrontendMemory, gpa: int, num: int):
    """desc, avail, used of a split ring at gpa, as front-end addresses."""
    desc, avail = gpa, gpa + 16 * num
    used = (avail + 6 + 2 * num + 3) & ~3
    return (
        mem.gpa_to_uaddr(desc, 16 * num),
        mem.gpa_to_uaddr(avail, 6 + 2 * num),
        mem.gpa_to_uaddr(used, 6 + 8 * num),
    )


def two_regions() -> FrontendMemory:
    """Two adjacent regions in one memfd: the second at mmap_offset 1 MiB."""
    return FrontendMemory([(0, MiB), (MiB, MiB)])


def ready(s: Served, mem: FrontendMemory) -> VhostUserFrontend:
    fe = s.frontend()
    fe.negotiate()
    fe.set_mem_table(mem)
    return fe


def ask(
    ch: Channel,
    request: int,
    payload: bytes = b"",
    fds=(),
    flags: int = VHOST_USER_VERSION,
    answer: bool = True,
) -> Message | None:
    """Send a raw request; the reply (None when the back-end hung up)."""
    ch.send(Message(request, flags, payload, list(fds)))
    if not answer:
        return None
    reply = ch.recv(5)
    if reply is not None:
        assert reply.flags == VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
        assert reply.request == request
        assert not reply.fds
    return reply


def negotiated(s: Served) -> Channel:
    """A raw connection through negotiation, with REPLY_ACK."""
    ch = s.raw()
    feats = unpack_u64(ask(ch, Request.GET_FEATURES).payload)
    ask(
        ch,
        Request.SET_PROTOCOL_FEATURES,
        pack_u64(bits(ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ)),
        answer=False,
    )
    ack = ask(
        ch,
        Request.SET_FEATURES,
        pack_u64(feats),
        flags=VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK,
    )
    assert unpack_u64(ack.payload) == 0
    return ch


NEED = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK


def acked(reply: Message | None) -> int:
    assert reply is not None, "the back-end hung up instead of answering"
    return unpack_u64(reply.payload)


def hung_up(ch: Channel) -> bool:
    try:
        return ch.recv(5) is None
    except ConnectionResetError:
        return True


# -- the whole sequence ---------------------------------------------------------------
def test_negotiation_acks_offered_features_with_the_vhost_user_bit(served):
    with served.frontend() as fe:
        features = fe.negotiate()
        assert fe.device_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1
        assert features == bits(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_BLK_F_FLUSH)
        assert served.device.acked == features  # the device never sees bit 30
        assert fe.protocol_features == bits(
            ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG
        )
        assert fe.max_queues == 1
        assert fe.blk_config() == VirtioBlkConfig.unpack(CONFIG.pack(60))
    served.gone()
    assert served.device.resets == 1


def test_full_sequence_runs_the_vring_at_its_translated_addresses(served):
    dev = served.device
    with two_regions() as mem, ready(served, mem) as fe:
        desc, avail, used = ring_uaddrs(mem, MiB + 4096, 64)  # in the second region
        os.pwrite(mem.fds[1], b"first descriptor", MiB + 4096)  # the file, at its offset
        vr = fe.setup_vring(0, 64, desc, avail, used, base=5)
        v = dev.running[0]
        assert (v.num, v.base, v.event_idx) == (64, 5, True)
        assert dev.desc_seen == [b"first descriptor"]
        assert v.desc == v.mem.gpa_to_va(MiB + 4096, 16)  # mmap_offset applied
        assert all(is_eventfd(fd) for fd in (v.kick_fd, v.call_fd, v.err_fd))
        os.eventfd_write(vr.kick_fd, 1)  # kick reaches the device
        assert os.eventfd_read(v.kick_fd) == 1
        dev.interrupt(0)  # and its call the driver
        assert os.eventfd_read(vr.call_fd) == 1
        dev.advance = 3
        assert fe.stop_vring(0) == 8  # GET_VRING_BASE stops it
        assert dev.stops == [0] and not dev.running
    served.gone()


def test_vring_without_kick_fd_is_handed_over_for_polling(served):
    with two_regions() as mem, ready(served, mem) as fe:
        desc, avail, used = ring_uaddrs(mem, 0, 16)
        fe.request(Request.SET_VRING_NUM, VringState(0, 16).pack())
        fe.request(Request.SET_VRING_ADDR, VringAddr(0, 0, desc, used, avail).pack())
        fe.request(Request.SET_VRING_KICK, VringFile(0, True).pack())
        fe.request(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
        assert served.device.running[0].kick_fd is None
    served.gone()


def test_rings_start_disabled_until_set_vring_enable(served):
    with two_regions() as mem, ready(served, mem) as fe:
        fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16), enable=False)
        assert not served.device.running
        fe.enable_vring(0, True)
        assert 0 in served.device.running
        fe.enable_vring(0, False)  # disabling stops it, keeping its index
        assert not served.device.running
    served.gone()


def test_without_protocol_features_a_kicked_ring_runs_at_once(served):
    with two_regions() as mem, served.raw() as ch:
        desc, avail, used = ring_uaddrs(mem, 0, 16)
        ask(ch, Request.SET_FEATURES, pack_u64(1 << VIRTIO_F_VERSION_1), answer=False)
        ask(ch, Request.SET_MEM_TABLE, pack_memory_table(mem.descs()), mem.fds, answer=False)
        ask(ch, Request.SET_VRING_NUM, VringState(0, 16).pack(), answer=False)
        ask(ch, Request.SET_VRING_ADDR, VringAddr(0, 0, desc, used, avail).pack(), answer=False)
        kick = os.eventfd(0)
        try:
            ask(ch, Request.SET_VRING_KICK, VringFile(0, False).pack(), [kick], answer=False)
            # GET_FEATURES has a reply: every message before it has been carried out
            ask(ch, Request.GET_FEATURES)
        finally:
            os.close(kick)
        assert 0 in served.device.running
    served.gone()


def test_multiqueue_runs_each_vring(served2):
    dev = served2.device
    with two_regions() as mem, ready(served2, mem) as fe:
        assert fe.max_queues == 2
        assert fe.features >> VIRTIO_BLK_F_MQ & 1
        assert VirtioBlkConfig.unpack(fe.get_config()).num_queues == 2
        fe.setup_vring(0, 32, *ring_uaddrs(mem, 0, 32))
        fe.setup_vring(1, 32, *ring_uaddrs(mem, MiB, 32))
        assert sorted(dev.running) == [0, 1]
        assert dev.running[1].desc == dev.running[1].mem.gpa_to_va(MiB, 16)
        with pytest.raises(VhostUserError):
            fe.request(Request.SET_VRING_NUM, VringState(2, 32).pack())
        assert fe.stop_vring(1) == 0
        assert sorted(dev.running) == [0]
    served2.gone()


# -- config space ---------------------------------------------------------------------
@pytest.mark.parametrize("offset,size", [(0, 1), (0, 8), (0, 60), (0, 72), (8, 8), (36, 2)])
def test_get_config_replies_exactly_the_requested_size(served, offset, size):
    with served.frontend() as fe:
        fe.negotiate()
        assert fe.get_config(size, offset) == CONFIG.pack()[offset : offset + size]
    served.gone()


def test_get_config_the_device_refuses_gets_an_empty_reply(served):
    with negotiated(served) as ch:
        reply = ask(ch, Request.GET_CONFIG, ConfigSpace(0, 73, 0, bytes(73)).pack())
        assert reply.payload == b""  # failure, and the connection goes on
        reply = ask(ch, Request.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)).pack())
        assert ConfigSpace.unpack(reply.payload).data == CONFIG.pack()[:8]
        # a size field that does not match the payload, and one past the protocol's limit
        assert ask(ch, Request.GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(8)).payload == b""
        assert ask(ch, Request.GET_CONFIG, ConfigSpace(0, 257, 0, bytes(257)).pack()).payload == b""
    served.gone()
    served.still_serves()


def test_set_config_is_refused_cleanly(served):
    with negotiated(served) as ch:
        assert (
            acked(ask(ch, Request.SET_CONFIG, ConfigSpace(32, 1, 0, b"\1").pack(), flags=NEED)) != 0
        )
        ask(ch, Request.SET_CONFIG, ConfigSpace(32, 1, 0, b"\1").pack(), answer=False)
        assert ask(ch, Request.GET_QUEUE_NUM).payload == pack_u64(1)  # still talking
    served.gone()


# -- REPLY_ACK ------------------------------------------------------------------------
def test_reply_ack_answers_only_when_asked(served):
    with negotiated(served) as ch:
        assert acked(ask(ch, Request.SET_OWNER, flags=NEED)) == 0
        assert acked(ask(ch, Request.SET_VRING_NUM, VringState(0, 3).pack(), flags=NEED)) != 0
        ask(ch, Request.SET_OWNER, answer=False)  # no need_reply: no answer ...
        reply = ask(ch, Request.GET_PROTOCOL_FEATURES)  # ... so this reply comes next
        assert unpack_u64(reply.payload) & 1 << ProtocolFeature.REPLY_ACK
        # a request with a reply of its own gets just that reply
        reply = ask(ch, Request.GET_QUEUE_NUM, flags=NEED)
        assert unpack_u64(reply.payload) == 1
        assert ask(ch, Request.GET_MAX_MEM_SLOTS).payload == pack_u64(8)
    served.gone()


def test_refused_request_surfaces_as_an_error_at_the_front_end(served):
    with served.frontend() as fe:
        fe.negotiate()
        with pytest.raises(VhostUserError, match="SET_VRING_NUM"):
            fe.request(Request.SET_VRING_NUM, VringState(0, 100).pack())
        fe.request(Request.SET_VRING_NUM, VringState(0, 128).pack())
    served.gone()


# -- memory table ---------------------------------------------------------------------
def test_translation_refuses_a_buffer_crossing_a_region_end():
    with two_regions() as mem:
        assert [r.mmap_offset for r in mem.regions] == [0, MiB]
        t = mem.table
        assert t.gpa_to_va(MiB - 8, 8) == mem.regions[0].va + MiB - 8
        with pytest.raises(AddressError):
            t.gpa_to_va(MiB - 8, 16)  # into the adjacent region
        with pytest.raises(AddressError):
            t.gpa_to_va(2 * MiB - 8, 16)  # past the end of memory
        with pytest.raises(AddressError):
            t.gpa_to_va(4 * MiB, 1)
        with pytest.raises(AddressError):
            t.gpa_to_va(0, 0)
        u = mem.regions[1].userspace_addr
        assert t.uaddr_to_va(u, MiB) == mem.regions[1].va
        with pytest.raises(AddressError):
            t.uaddr_to_va(u + 1, MiB)
        with pytest.raises(AddressError):
            t.uaddr_to_va(MiB, 16)  # a gpa is not a front-end address


def test_mapped_table_sees_the_front_ends_bytes_at_each_mmap_offset():
    with FrontendMemory([(0, MiB), (4 * MiB, MiB)]) as mem:
        os.pwrite(mem.fds[0], b"end0", MiB - 4)  # written to the file itself
        os.pwrite(mem.fds[1], b"start1", MiB)  # region 1 begins 1 MiB into it
        with MemoryTable.map(mem.descs(), mem.fds) as t:  # as a back-end maps it
            assert t.read(MiB - 4, 4) == b"end0"
            assert t.read(4 * MiB, 6) == b"start1"
            assert ctypes.string_at(t.gpa_to_va(4 * MiB, 6), 6) == b"start1"
            assert t.regions[1].va != mem.regions[1].va  # a mapping of its own
        assert mem.read(4 * MiB, 6) == b"start1"  # and the front-end's own view


def test_mmap_offset_need_not_be_page_aligned():
    with FrontendMemory([(0, 4 * 4096)]) as mem:
        os.pwrite(mem.fds[0], b"mid-page", 4096 + 512)
        region = MemoryRegionDesc(0x10000, 4096, 0x5000_0000, 4096 + 512)
        with MemoryTable.map([region], mem.fds) as t:
            assert t.read(0x10000, 8) == b"mid-page"
            assert t.uaddr_to_va(0x5000_0000, 4096) == t.gpa_to_va(0x10000, 1)


def test_regions_of_separate_files_map_too():
    with FrontendMemory([(0, MiB), (16 * MiB, MiB)], shared_fd=False) as mem:
        assert len(set(mem.fds)) == 2
        assert [r.mmap_offset for r in mem.regions] == [0, 0]
        os.pwrite(mem.fds[1], b"x", 0)
        with MemoryTable.map(mem.descs(), mem.fds) as t:
            assert t.read(16 * MiB, 1) == b"x"


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda d: [
                d[0],
                MemoryRegionDesc(MiB // 2, MiB, d[1].userspace_addr, d[1].mmap_offset),
            ],
            "overlap in guest_phys_addr",
        ),
        (
            lambda d: [
                d[0],
                MemoryRegionDesc(
                    d[1].guest_phys_addr, MiB, d[0].userspace_addr + 4096, d[1].mmap_offset
                ),
            ],
            "overlap in userspace_addr",
        ),
        (
            lambda d: [d[0], MemoryRegionDesc(MiB, MiB, d[1].userspace_addr, MiB + 4096)],
            "past the end of its file",
        ),
        (lambda d: [d[0], MemoryRegionDesc(MiB, 0, d[1].userspace_addr, MiB)], "empty"),
        (
            lambda d: [d[0], MemoryRegionDesc((1 << 64) - 4096, MiB, d[1].userspace_addr, MiB)],
            "wraps",
        ),
    ],
)
def test_memory_table_refuses_bad_layouts(change, match):
    with two_regions() as mem:
        with pytest.raises(AddressError, match=match):
            MemoryTable.map(change(mem.descs()), mem.fds)


def test_memory_table_refuses_regions_without_fds_and_non_memory_fds():
    with two_regions() as mem:
        with pytest.raises(ProtocolError, match="2 regions came with 1 fds"):
            MemoryTable.map(mem.descs(), mem.fds[:1])
        r, w = os.pipe()
        try:
            with pytest.raises(AddressError, match="not a memory file"):
                MemoryTable.map(mem.descs(), [mem.fds[0], r])
        finally:
            os.close(r)
            os.close(w)


def test_set_mem_table_again_while_running_swaps_under_a_stopped_vring(served):
    dev = served.device
    with (
        two_regions() as mem,
        ready(served, mem) as fe,
        FrontendMemory([(8 * MiB, MiB)], uaddr_base=0x7D00_0000_0000) as extra,
    ):
        os.pwrite(mem.fds[1], b"ring in region 1", MiB)
        fe.setup_vring(0, 16, *ring_uaddrs(mem, MiB, 16), base=9)
        first = dev.running[0]
        dev.advance = 4
        # the guest's memory map grew: same regions, one more of another file
        fe.request(
            Request.SET_MEM_TABLE,
            pack_memory_table(mem.descs() + extra.descs()),
            mem.fds + extra.fds,
        )
        second = dev.running[0]
        assert dev.stops == [0] and len(dev.starts) == 2
        assert second.base == 13  # resumed where it stopped
        assert second.mem is not first.mem and first.mem.closed
        assert dev.desc_seen[-1] == b"ring in region 1"
        assert second.mem.read(8 * MiB, 4) == bytes(4)
    served.gone()


def test_set_mem_table_without_the_ring_fails_that_vring_only(served):
    dev = served.device
    with (
        two_regions() as mem,
        ready(served, mem) as fe,
        FrontendMemory([(8 * MiB, MiB)], uaddr_base=0x7D00_0000_0000) as other,
    ):
        vr = fe.setup_vring(0, 16, *ring_uaddrs(mem, MiB, 16))
        fe.set_mem_table(other)  # the table itself is fine
        assert not dev.running
        assert os.eventfd_read(vr.err_fd) == 1  # the vring's failure is signalled
        assert fe.get_config(8) == CONFIG.pack()[:8]  # the connection goes on
    served.gone()


def test_bad_mem_table_keeps_the_old_one_in_force(served):
    dev = served.device
    with two_regions() as mem, ready(served, mem) as fe:
        fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16))
        d = mem.descs()
        bad = [d[0], MemoryRegionDesc(MiB // 2, MiB, d[1].userspace_addr, d[1].mmap_offset)]
        with pytest.raises(VhostUserError, match="SET_MEM_TABLE"):
            fe.request(Request.SET_MEM_TABLE, pack_memory_table(bad), mem.fds)
        assert list(dev.running) == [0] and len(dev.starts) == 1
        assert not dev.running[0].mem.closed
    served.gone()


def test_set_vring_call_while_running_moves_interrupts_to_the_new_fd(served):
    dev = served.device
    with two_regions() as mem, ready(served, mem) as fe:
        vr = fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16))
        old = os.dup(vr.call_fd)
        try:
            new = fe.set_vring_call(0)
            assert os.eventfd_read(new) == 1  # in case one was lost in the swap
            dev.interrupt(0)
            assert os.eventfd_read(new) == 1
            with pytest.raises(BlockingIOError):
                os.eventfd_read(old)  # nothing went to the old one
            assert len(dev.starts) == 2  # restarted on the new fd
        finally:
            os.close(old)
    served.gone()


def test_reset_owner_stops_vrings_and_drops_the_table(served):
    dev = served.device
    with two_regions() as mem, ready(served, mem) as fe:
        fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16))
        table = dev.running[0].mem
        fe.request(Request.RESET_OWNER)
        assert not dev.running and dev.resets == 1 and table.closed
        fe.negotiate()  # and it can start over
        fe.set_mem_table(mem)
        fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16))
        assert 0 in dev.running
    served.gone()


def test_device_that_cannot_start_fails_the_vring_not_the_daemon(served):
    served.device.fail_start = True
    with two_regions() as mem, ready(served, mem) as fe:
        with pytest.raises(VhostUserError, match="SET_VRING_ENABLE"):
            fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16))
    served.gone()
    served.device.fail_start = False
    served.still_serves()


# -- bad messages ---------------------------------------------------------------------
def test_short_header_drops_the_connection(served):
    with served.raw() as ch:
        ch.send_raw(b"\x01\x00\x00\x00\x01")
        ch.sock.shutdown(socket.SHUT_WR)
        assert hung_up(ch)
    served.gone()
    assert "short header" in served.server.failures[-1]
    served.still_serves()


def test_stalled_message_is_dropped_after_the_body_timeout():
    s = Served(FakeBlk(), body_timeout=0.2)
    try:
        with s.raw() as ch:
            ch.send_raw(VHOST_USER_HDR.pack(Request.SET_FEATURES, VHOST_USER_VERSION, 8) + b"\0")
            assert hung_up(ch)
        s.gone()
        s.still_serves()
    finally:
        s.stop()


def test_unknown_request_is_refused(served):
    with negotiated(served) as ch:
        assert acked(ask(ch, 99, flags=NEED)) != 0
        assert acked(ask(ch, Request.SEND_RARP, bytes(8), flags=NEED)) != 0
        # unimplemented requests with a reply of their own get an empty one
        reply = ask(ch, Request.GET_INFLIGHT_FD, InflightDesc(0, 0, 1, 128).pack())
        assert reply.payload == b""
        assert ask(ch, Request.GET_STATUS).payload == b""
        ask(ch, 99, answer=False)  # cannot be answered: hang up
        assert hung_up(ch)
    served.gone()
    served.still_serves()


@pytest.mark.parametrize(
    "request_,payload",
    [
        (Request.SET_VRING_NUM, bytes(4)),
        (Request.SET_VRING_ADDR, bytes(32)),
        (Request.SET_FEATURES, bytes(12)),
        (Request.SET_OWNER, bytes(8)),
        (Request.SET_MEM_TABLE, pack_memory_table([])[:4]),
        (Request.SET_VRING_KICK, bytes(4)),
        (Request.SET_VRING_ENABLE, bytes(16)),
    ],
)
def test_wrong_payload_size_is_refused(served, request_, payload):
    with negotiated(served) as ch:
        assert acked(ask(ch, request_, payload, flags=NEED)) != 0
        ask(ch, request_, payload, answer=False)  # unanswerable: hang up
        assert hung_up(ch)
    served.gone()
    served.still_serves()


@pytest.mark.parametrize(
    "request_", [Request.GET_FEATURES, Request.GET_VRING_BASE, Request.GET_QUEUE_NUM]
)
def test_wrong_payload_size_on_a_replying_request_gets_an_empty_reply(served, request_):
    with negotiated(served) as ch:
        assert ask(ch, request_, bytes(3)).payload == b""
        assert ask(ch, Request.GET_QUEUE_NUM).payload == pack_u64(1)
    served.gone()


def test_missing_and_extra_fds_are_refused_and_closed(served):
    fds_before = set(os.listdir("/proc/self/fd"))
    efd = os.eventfd(0)
    try:
        with two_regions() as mem, negotiated(served) as ch:
            assert (
                acked(ask(ch, Request.SET_VRING_KICK, VringFile(0, False).pack(), flags=NEED)) != 0
            )  # missing
            assert (
                acked(ask(ch, Request.SET_VRING_CALL, VringFile(0, True).pack(), [efd], flags=NEED))
                != 0
            )  # NOFD, yet one came
            assert (
                acked(
                    ask(
                        ch,
                        Request.SET_VRING_ERR,
                        VringFile(0, False).pack(),
                        [efd, efd],
                        flags=NEED,
                    )
                )
                != 0
            )  # two
            assert acked(ask(ch, Request.SET_OWNER, b"", [efd], flags=NEED)) != 0
            assert (
                acked(
                    ask(
                        ch,
                        Request.SET_MEM_TABLE,
                        pack_memory_table(mem.descs()),
                        mem.fds[:1],
                        flags=NEED,
                    )
                )
                != 0
            )  # a region without
            assert (
                acked(
                    ask(
                        ch,
                        Request.SET_MEM_TABLE,
                        pack_memory_table(mem.descs()[:1]),
                        mem.fds,
                        flags=NEED,
                    )
                )
                != 0
            )  # an fd too many
            r, w = os.pipe()
            try:
                assert (
                    acked(
                        ask(ch, Request.SET_VRING_KICK, VringFile(0, False).pack(), [r], flags=NEED)
                    )
                    != 0
                )  # not an eventfd
            finally:
                os.close(r)
                os.close(w)
            ask(ch, Request.SET_VRING_KICK, VringFile(0, False).pack(), answer=False)
            assert hung_up(ch)
        served.gone()
    finally:
        os.close(efd)
    assert set(os.listdir("/proc/self/fd")) == fds_before
    served.still_serves()


def test_more_fds_than_a_message_may_carry_drop_the_connection(served):
    fds_before = set(os.listdir("/proc/self/fd"))
    efds = [os.eventfd(0) for _ in range(9)]
    try:
        with served.raw() as ch:
            ch.send_raw(VHOST_USER_HDR.pack(Request.SET_OWNER, NEED, 0), tuple(efds))
            assert hung_up(ch)
        served.gone()
    finally:
        for fd in efds:
            os.close(fd)
    assert set(os.listdir("/proc/self/fd")) == fds_before
    served.still_serves()


@pytest.mark.parametrize("flags", [0, 2, 3, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK])
def test_bad_version_or_reply_flag_drops_the_connection(served, flags):
    with served.raw() as ch:
        ch.send_raw(VHOST_USER_HDR.pack(Request.GET_FEATURES, flags, 0))
        assert hung_up(ch)
    served.gone()
    served.still_serves()


def test_oversized_payload_drops_the_connection(served):
    with served.raw() as ch:
        ch.send_raw(VHOST_USER_HDR.pack(Request.SET_MEM_TABLE, NEED, 1 << 20))
        assert hung_up(ch)
    served.gone()
    served.still_serves()


@pytest.mark.parametrize("where", ["gpa_not_uaddr", "past_end", "misaligned", "crossing"])
def test_set_vring_addr_outside_memory_is_refused(served, where):
    with two_regions() as mem, ready(served, mem) as fe:
        desc, avail, used = ring_uaddrs(mem, 0, 16)
        fe.request(Request.SET_VRING_NUM, VringState(0, 16).pack())
        bad = {
            "gpa_not_uaddr": VringAddr(0, 0, 0, 512, 256),
            "past_end": VringAddr(0, 0, desc, used + 2 * MiB, avail),
            "misaligned": VringAddr(0, 0, desc + 8, used, avail),
            "crossing": VringAddr(0, 0, mem.gpa_to_uaddr(MiB - 128, 1), used, avail),
        }[where]
        with pytest.raises(VhostUserError, match="SET_VRING_ADDR"):
            fe.request(Request.SET_VRING_ADDR, bad.pack())
        # the vring cannot start on the refused addresses
        kick = os.eventfd(0)
        try:
            with pytest.raises(VhostUserError, match="SET_VRING_KICK|SET_VRING_ENABLE"):
                fe.request(Request.SET_VRING_KICK, VringFile(0, False).pack(), [kick])
                fe.request(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
        finally:
            os.close(kick)
        assert not served.device.running
    served.gone()
    assert any("SET_VRING_ADDR" in f for f in served.server.failures)
    served.still_serves()


def test_ring_addresses_checked_again_at_start_against_the_ring_size(served):
    """Addresses sent before the ring size fit one entry; at start the whole ring
    must fit."""
    with two_regions() as mem, ready(served, mem) as fe:
        end = mem.gpa_to_uaddr(2 * MiB - 16, 16)
        fe.request(Request.SET_VRING_ADDR, VringAddr(0, 0, end, end - 4096, end - 8192).pack())
        fe.request(Request.SET_VRING_NUM, VringState(0, 256).pack())
        kick = os.eventfd(0)
        try:
            fe.request(Request.SET_VRING_KICK, VringFile(0, False).pack(), [kick])
        finally:
            os.close(kick)
        with pytest.raises(VhostUserError, match="SET_VRING_ENABLE"):
            fe.request(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
        assert not served.device.running
    served.gone()
    assert "not inside one region" in served.server.failures[-1]


def test_unaddressed_vring_index_is_refused(served):
    with negotiated(served) as ch:
        for req, payload in (
            (Request.SET_VRING_NUM, VringState(7, 16).pack()),
            (Request.SET_VRING_ENABLE, VringState(300, 1).pack()),
        ):
            assert acked(ask(ch, req, payload, flags=NEED)) != 0
        assert ask(ch, Request.GET_VRING_BASE, VringState(7, 0).pack()).payload == b""
    served.gone()


def test_features_not_offered_are_refused(served):
    with negotiated(served) as ch:
        assert acked(ask(ch, Request.SET_FEATURES, pack_u64(1 << 63), flags=NEED)) != 0
        assert acked(ask(ch, Request.SET_FEATURES, pack_u64(0), flags=NEED)) != 0  # no VERSION_1
        assert (
            acked(
                ask(
                    ch,
                    Request.SET_PROTOCOL_FEATURES,
                    pack_u64(1 << ProtocolFeature.PAGEFAULT),
                    flags=NEED,
                )
            )
            != 0
        )
    served.gone()


# -- connections ----------------------------------------------------------------------
def test_a_second_front_end_is_turned_away_while_one_is_served(served):
    with served.frontend() as fe:
        fe.negotiate()
        with served.raw() as other:
            assert hung_up(other)
        assert served.server.refused == 1
        assert fe.get_config(8) == CONFIG.pack()[:8]
    served.gone()


def test_front_end_sees_the_back_end_go(served):
    with served.frontend() as fe:
        fe.negotiate()
        served.server.shutdown()
        with pytest.raises(DeviceGoneError):
            for _ in range(100):
                fe.get_config(8)
                time.sleep(0.01)


def test_listening_on_a_live_path_is_refused(served):
    with pytest.raises(VhostUserError, match="another back-end"):
        VhostUserServer(served.path, FakeBlk())
    assert os.path.exists(served.path)


def test_stale_socket_file_is_replaced():
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")
    path = os.path.join(d, "sock")
    try:
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(path)
        dead.close()  # a socket file nobody listens on
        with VhostUserServer(path, FakeBlk()):
            assert os.path.exists(path)
        assert not os.path.exists(path)
    finally:
        shutil.rmtree(d)


def _maps_of(path_part: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(path_part in line for line in f)


def test_no_fd_or_mapping_left_after_100_connections(served):
    dev = served.device
    with two_regions() as mem:
        fds_before = set(os.listdir("/proc/self/fd"))
        maps_before = _maps_of("virtio_py-guest-ram")
        for i in range(100):
            fe = served.frontend()
            fe.negotiate()
            fe.set_mem_table(mem)
            vr = fe.setup_vring(0, 16, *ring_uaddrs(mem, 0, 16))
            if i % 3 == 0:
                fe.set_vring_call(0)
            if i % 2 == 0:
                fe.stop_vring(0)
            elif i % 5 == 0:
                fe.channel.send_raw(b"\x05")  # leaves mid-message
            fe.close()  # the rest just disconnect
            served.gone()
            assert not dev.running and vr.call_fd == -1
        assert dev.resets == 100
        assert set(os.listdir("/proc/self/fd")) == fds_before
        assert _maps_of("virtio_py-guest-ram") == maps_before


# -- qemu-storage-daemon --------------------------------------------------------------
QSD = shutil.which("qemu-storage-daemon")


@pytest.fixture
def qsd():
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    d = tempfile.mkdtemp(prefix="vuq", dir="/tmp")
    img, sock = os.path.join(d, "img"), os.path.join(d, "sock")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    p = subprocess.Popen(
        [
            QSD,
            "--blockdev",
            f"driver=file,node-name=f,filename={img}",
            "--export",
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not listen"
            time.sleep(0.02)
        yield sock
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()
        shutil.rmtree(d)


def test_front_end_negotiates_with_qemu_storage_daemon(qsd):
    with VhostUserFrontend.connect(qsd) as fe:
        features = fe.negotiate()
        assert features >> VIRTIO_F_VERSION_1 & 1
        assert fe.protocol_features == bits(
            ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG
        )
        cfg = fe.blk_config()
        assert cfg.capacity == 32 * MiB // 512
        assert cfg.blk_size == 512 and cfg.seg_max > 0
        assert fe.max_queues >= cfg.num_queues >= 1
        with two_regions() as mem:
            fe.set_mem_table(mem)
            fe.setup_vring(0, 64, *ring_uaddrs(mem, MiB, 64))
            assert fe.stop_vring(0) == 0  # nothing was on the ring
