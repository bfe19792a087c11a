"""vhost-user wire format: request numbers, flags, feature bits, payload codecs.

Everything here is little-endian and laid out as QEMU's docs/interop/vhost-user.rst
and <linux/vhost_types.h> lay it out.  Pure Python: no mapping, no socket.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import VirtioError

# -- header ---------------------------------------------------------------------------
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 1 << 2
VHOST_USER_NEED_REPLY_MASK = 1 << 3
VHOST_USER_HDR = struct.Struct("<III")  # request, flags, size
VHOST_USER_HDR_SIZE = VHOST_USER_HDR.size

# Largest payload this implementation reads; anything bigger is a framing error.
# (The largest message we know, SET_MEM_TABLE with 8 regions, is 264 bytes.)
VHOST_USER_MAX_PAYLOAD = 4096
# fds one message may carry (SET_MEM_TABLE: one per region).
VHOST_USER_MAX_FDS = 8
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256

# -- feature bits -------------------------------------------------------------------
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# -- vring message fields -------------------------------------------------------------
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8
VHOST_VRING_F_LOG = 0


class Request(enum.IntEnum):
    """Front-end to back-end requests (VHOST_USER_<name>)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


# Requests whose answer is a message of their own, whatever need_reply says: a
# back-end that cannot carry one out still answers (with an empty payload).
REPLYING_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.CREATE_CRYPTO_SESSION,
        Request.POSTCOPY_ADVISE,
        Request.GET_SHARED_OBJECT,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
    }
)


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_<name> bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def bits(*numbers: int) -> int:
    """The feature word with the given bit numbers set."""
    word = 0
    for n in numbers:
        word |= 1 << n
    return word


def request_name(request: int) -> str:
    try:
        return f"VHOST_USER_{Request(request).name}"
    except ValueError:
        return f"request {request}"


class VhostUserError(VirtioError):
    """The vhost-user peer refused a request, or the connection failed."""


class ProtocolError(VhostUserError):
    """A message that breaks the wire format (framing, sizes, fds, flags)."""


# -- message --------------------------------------------------------------------------
@dataclass
class Message:
    """One message.  ``fds`` are owned by whoever holds the message: close them
    (``close_fds``) or take them (set the list empty) before dropping it."""

    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def header(self) -> bytes:
        return VHOST_USER_HDR.pack(self.request, self.flags, len(self.payload))

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            try:
                os.close(fd)
            except OSError:
                pass


def expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise ProtocolError(f"{msg.name}: payload of {len(msg.payload)} bytes, expected {size}")


# -- payload codecs -------------------------------------------------------------------
U64 = struct.Struct("<Q")


def pack_u64(value: int) -> bytes:
    return U64.pack(value)


def unpack_u64(payload: bytes) -> int:
    if len(payload) != U64.size:
        raise ProtocolError(f"u64 payload of {len(payload)} bytes")
    return U64.unpack(payload)[0]


@dataclass(frozen=True)
class VringState:
    """struct vhost_vring_state: SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE."""

    index: int
    num: int
    FMT = struct.Struct("<II")

    def pack(self) -> bytes:
        return self.FMT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, payload: bytes) -> VringState:
        if len(payload) != cls.FMT.size:
            raise ProtocolError(f"vring state payload of {len(payload)} bytes")
        return cls(*cls.FMT.unpack(payload))


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: index in bits 0-7, bit 8 = no fd."""

    index: int
    nofd: bool

    def pack(self) -> bytes:
        return pack_u64(
            (self.index & VHOST_USER_VRING_IDX_MASK)
            | (VHOST_USER_VRING_NOFD_MASK if self.nofd else 0)
        )

    @classmethod
    def unpack(cls, payload: bytes) -> VringFile:
        v = unpack_u64(payload)
        if v & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
            raise ProtocolError(f"vring file payload {v:#x} has reserved bits set")
        return cls(v & VHOST_USER_VRING_IDX_MASK, bool(v & VHOST_USER_VRING_NOFD_MASK))


@dataclass(frozen=True)
class VringAddr:
    """struct vhost_vring_addr: ring addresses in the front-end's address space."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0
    FMT = struct.Struct("<IIQQQQ")

    def pack(self) -> bytes:
        return self.FMT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def unpack(cls, payload: bytes) -> VringAddr:
        if len(payload) != cls.FMT.size:
            raise ProtocolError(f"vring addr payload of {len(payload)} bytes")
        return cls(*cls.FMT.unpack(payload))


@dataclass(frozen=True)
class MemoryRegionDesc:
    """VhostUserMemoryRegion: one fd-backed region of guest memory."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    FMT = struct.Struct("<QQQQ")

    def pack(self) -> bytes:
        return self.FMT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    @classmethod
    def unpack_from(cls, payload: bytes, offset: int) -> MemoryRegionDesc:
        return cls(*cls.FMT.unpack_from(payload, offset))


MEMORY_HDR = struct.Struct("<II")  # nregions, padding


def pack_memory_table(regions: Sequence[MemoryRegionDesc]) -> bytes:
    return MEMORY_HDR.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def unpack_memory_table(payload: bytes) -> list[MemoryRegionDesc]:
    """The regions of a SET_MEM_TABLE payload, whose size must match nregions."""
    if len(payload) < MEMORY_HDR.size:
        raise ProtocolError(f"memory table payload of {len(payload)} bytes")
    nregions, _ = MEMORY_HDR.unpack_from(payload, 0)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(
            f"memory table with {nregions} regions (at most {VHOST_MEMORY_BASELINE_NREGIONS})"
        )
    want = MEMORY_HDR.size + nregions * MemoryRegionDesc.FMT.size
    if len(payload) != want:
        raise ProtocolError(
            f"memory table of {nregions} regions in {len(payload)} bytes, expected {want}"
        )
    return [
        MemoryRegionDesc.unpack_from(payload, MEMORY_HDR.size + i * MemoryRegionDesc.FMT.size)
        for i in range(nregions)
    ]


CONFIG_HDR = struct.Struct("<III")  # offset, size, flags
VHOST_USER_CONFIG_HDR_SIZE = CONFIG_HDR.size
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


@dataclass(frozen=True)
class ConfigSpace:
    """VhostUserConfig: GET_CONFIG / SET_CONFIG.  ``data`` has ``size`` bytes."""

    offset: int
    size: int
    flags: int
    data: bytes

    def pack(self) -> bytes:
        return CONFIG_HDR.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> ConfigSpace:
        if len(payload) < CONFIG_HDR.size:
            raise ProtocolError(f"config payload of {len(payload)} bytes")
        offset, size, flags = CONFIG_HDR.unpack_from(payload, 0)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"config size {size} (at most {VHOST_USER_MAX_CONFIG_SIZE})")
        if len(payload) != CONFIG_HDR.size + size:
            raise ProtocolError(f"config of {size} bytes in a payload of {len(payload)}")
        return cls(offset, size, flags, bytes(payload[CONFIG_HDR.size :]))


@dataclass(frozen=True)
class InflightDesc:
    """VhostUserInflight: GET_INFLIGHT_FD / SET_INFLIGHT_FD (24 bytes, padded)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    FMT = struct.Struct("<QQHH4x")

    def pack(self) -> bytes:
        return self.FMT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, payload: bytes) -> InflightDesc:
        if len(payload) != cls.FMT.size:
            raise ProtocolError(f"inflight payload of {len(payload)} bytes")
        return cls(*cls.FMT.unpack(payload))


# -- virtio-blk config space ----------------------------------------------------------
BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")
VIRTIO_BLK_CONFIG_SIZE = BLK_CONFIG.size  # 72: through the secure-erase fields
VIRTIO_BLK_CONFIG_SIZE_V1 = 60  # through write_zeroes_may_unmap


@dataclass(frozen=True)
class VirtioBlkConfig:
    """struct virtio_blk_config (<linux/virtio_blk.h>), fields past the end of a
    shorter config space read as zero."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    wce: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> VirtioBlkConfig:
        padded = bytes(data[: BLK_CONFIG.size]).ljust(BLK_CONFIG.size, b"\0")
        (
            capacity,
            size_max,
            seg_max,
            cylinders,
            heads,
            sectors,
            blk_size,
            pbe,
            ao,
            min_io,
            opt_io,
            wce,
            _unused,
            num_queues,
            mds,
            mdseg,
            dsa,
            mwzs,
            mwzseg,
            wzmu,
            mses,
            mseseg,
            mseal,
        ) = BLK_CONFIG.unpack(padded)
        return cls(
            capacity,
            size_max,
            seg_max,
            cylinders,
            heads,
            sectors,
            blk_size,
            pbe,
            ao,
            min_io,
            opt_io,
            wce,
            num_queues,
            mds,
            mdseg,
            dsa,
            mwzs,
            mwzseg,
            wzmu,
            mses,
            mseseg,
            mseal,
        )

    def pack(self, size: int | None = None) -> bytes:
        raw = BLK_CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            self.cylinders,
            self.heads,
            self.sectors,
            self.blk_size,
            self.physical_block_exp,
            self.alignment_offset,
            self.min_io_size,
            self.opt_io_size,
            self.wce,
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
            self.max_secure_erase_sectors,
            self.max_secure_erase_seg,
            self.secure_erase_sector_alignment,
        )
        return raw if size is None else raw[:size]
