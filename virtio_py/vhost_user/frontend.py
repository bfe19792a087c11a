"""The front-end side: connect to a vhost-user back-end, negotiate, hand it memory
and vrings.  Messages go in the order QEMU's hw/virtio/vhost-user.c sends them.

Once VHOST_USER_PROTOCOL_F_REPLY_ACK is negotiated every request without a
reply of its own is sent with need_reply, so a refusal surfaces as
VhostUserError at the call that caused it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._resource import Closeable
from ..errors import DeviceGoneError
from .channel import Channel
from .memory import FrontendMemory
from .protocol import (
    REPLYING_REQUESTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VIRTIO_BLK_CONFIG_SIZE_V1,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    ConfigSpace,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VhostUserError,
    VirtioBlkConfig,
    VringAddr,
    VringFile,
    VringState,
    bits,
    pack_memory_table,
    pack_u64,
    unpack_u64,
)

#: virtio-blk features taken when the back-end offers them (VERSION_1 is required)
DEFAULT_FEATURES = bits(
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_RO,
)
DEFAULT_PROTOCOL_FEATURES = bits(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG
)


def _eventfd() -> int:
    # as QEMU's event notifiers: the back-end shares the file, O_NONBLOCK included
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@dataclass
class FrontendVring:
    """One vring handed to the back-end, with the eventfds this side keeps:
    write ``kick_fd`` to notify the device, read ``call_fd`` for its interrupts."""

    index: int
    num: int
    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = field(default=False)

    def close(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)


class VhostUserFrontend(Closeable):
    """A vhost-user front-end (the role QEMU plays) on one connection."""

    def __init__(self, channel: Channel, *, reply_timeout: float = 5.0) -> None:
        self.channel: Channel | None = channel
        self.reply_timeout = reply_timeout
        self.device_features = 0  # what GET_FEATURES offered
        self.features = 0  # virtio features acked (no vhost-user bit)
        self.protocol_features = 0  # protocol features acked
        self.max_queues = 1
        self.vrings: dict[int, FrontendVring] = {}

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0) -> VhostUserFrontend:
        try:
            channel = Channel.connect(path, timeout=timeout, body_timeout=timeout)
        except OSError as e:
            raise DeviceGoneError(f"vhost-user back-end at {path}: {e.strerror or e}") from None
        return cls(channel, reply_timeout=timeout)

    # -- messages ---------------------------------------------------------------------
    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def _send(self, msg: Message) -> None:
        if self.channel is None:
            raise DeviceGoneError("vhost-user connection is closed")
        try:
            self.channel.send(msg)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise DeviceGoneError(f"vhost-user back-end went away: {e}") from None

    def _recv_reply(self, request: int) -> bytes:
        assert self.channel is not None
        try:
            reply = self.channel.recv(self.reply_timeout)
        except socket.timeout:
            raise VhostUserError(
                f"no reply to {Message(request).name} within {self.reply_timeout} s"
            ) from None
        except ConnectionResetError as e:
            raise DeviceGoneError(f"vhost-user back-end went away: {e}") from None
        if reply is None:
            raise DeviceGoneError(
                f"vhost-user back-end closed the connection (after {Message(request).name})"
            )
        reply.close_fds()  # no reply we use carries fds
        if reply.flags != VHOST_USER_VERSION | VHOST_USER_REPLY_MASK:
            raise ProtocolError(f"reply flags {reply.flags:#x}")
        if reply.request != request:
            raise ProtocolError(f"reply to {reply.name}, expected {Message(request).name}")
        return reply.payload

    def request(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> bytes | None:
        """Send one request.  Returns the reply payload of a request that has one;
        otherwise waits for the REPLY_ACK (when negotiated) and raises on failure."""
        if need_reply is None:
            need_reply = self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
        replying = request in REPLYING_REQUESTS
        flags = VHOST_USER_VERSION
        if need_reply and not replying:
            flags |= VHOST_USER_NEED_REPLY_MASK
        self._send(Message(request, flags, payload, list(fds)))
        if replying:
            return self._recv_reply(request)
        if flags & VHOST_USER_NEED_REPLY_MASK:
            ack = self._recv_reply(request)
            status = unpack_u64(ack)
            if status:
                raise VhostUserError(f"back-end refused {Message(request).name} ({status})")
        return None

    def _get_u64(self, request: int) -> int:
        payload = self.request(request)
        assert payload is not None
        if len(payload) != 8:
            raise VhostUserError(
                f"back-end failed {Message(request).name} ({len(payload)}-byte reply)"
            )
        return unpack_u64(payload)

    # -- negotiation ------------------------------------------------------------------
    def negotiate(
        self, features: int = DEFAULT_FEATURES, protocol_features: int = DEFAULT_PROTOCOL_FEATURES
    ) -> int:
        """Features, protocol features, queue count and ownership; the acked
        virtio features.  The back-end must offer VHOST_USER_F_PROTOCOL_FEATURES
        (no config space without it) and VIRTIO_F_VERSION_1."""
        self.device_features = self._get_u64(Request.GET_FEATURES)
        if not self.device_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise VhostUserError("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        if not self.device_features >> VIRTIO_F_VERSION_1 & 1:
            raise VhostUserError("back-end does not offer VIRTIO_F_VERSION_1")
        offered = self._get_u64(Request.GET_PROTOCOL_FEATURES)
        acked = offered & protocol_features
        if not acked >> ProtocolFeature.CONFIG & 1:
            raise VhostUserError("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        self.request(Request.SET_PROTOCOL_FEATURES, pack_u64(acked), need_reply=False)
        self.protocol_features = acked
        if self.has_protocol_feature(ProtocolFeature.MQ):
            self.max_queues = self._get_u64(Request.GET_QUEUE_NUM)
        self.request(Request.SET_OWNER)
        self.features = self.device_features & (features | 1 << VIRTIO_F_VERSION_1)
        self.features &= ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.request(
            Request.SET_FEATURES, pack_u64(self.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
        )
        return self.features

    def get_config(self, size: int = VIRTIO_BLK_CONFIG_SIZE_V1, offset: int = 0) -> bytes:
        payload = self.request(Request.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)).pack())
        assert payload is not None
        if not payload:
            raise VhostUserError(f"back-end refused GET_CONFIG of {size} bytes at {offset}")
        cfg = ConfigSpace.unpack(payload)
        if cfg.size != size:
            raise ProtocolError(f"GET_CONFIG: {cfg.size} bytes for {size}")
        return cfg.data

    def blk_config(self, size: int = VIRTIO_BLK_CONFIG_SIZE_V1) -> VirtioBlkConfig:
        return VirtioBlkConfig.unpack(self.get_config(size))

    # -- memory and vrings ------------------------------------------------------------
    def set_mem_table(self, mem: FrontendMemory) -> None:
        self.request(Request.SET_MEM_TABLE, pack_memory_table(mem.descs()), mem.fds)

    def setup_vring(
        self,
        index: int,
        num: int,
        desc_user_addr: int,
        avail_user_addr: int,
        used_user_addr: int,
        base: int = 0,
        *,
        enable: bool = True,
    ) -> FrontendVring:
        """SET_VRING_NUM, BASE, ADDR, KICK, CALL, ERR (with new eventfds), then
        SET_VRING_ENABLE 1.  Addresses are userspace addresses (gpa_to_uaddr)."""
        self._drop_vring(index)
        vr = FrontendVring(index, num, desc_user_addr, avail_user_addr, used_user_addr)
        self.vrings[index] = vr
        self.request(Request.SET_VRING_NUM, VringState(index, num).pack())
        self.request(Request.SET_VRING_BASE, VringState(index, base).pack())
        self.request(
            Request.SET_VRING_ADDR,
            VringAddr(index, 0, desc_user_addr, used_user_addr, avail_user_addr).pack(),
        )
        for name, request in (
            ("kick_fd", Request.SET_VRING_KICK),
            ("call_fd", Request.SET_VRING_CALL),
            ("err_fd", Request.SET_VRING_ERR),
        ):
            setattr(vr, name, _eventfd())
            self.request(request, VringFile(index, False).pack(), [getattr(vr, name)])
        if enable:
            self.enable_vring(index, True)
        return vr

    def enable_vring(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, VringState(index, int(enable)).pack())
        self.vrings[index].enabled = enable

    def set_vring_call(self, index: int) -> int:
        """A new call eventfd for a vring (as QEMU sends when it masks a vector);
        the old one is closed.  Returns the new fd."""
        vr = self.vrings[index]
        fd = _eventfd()
        try:
            self.request(Request.SET_VRING_CALL, VringFile(index, False).pack(), [fd])
        except BaseException:
            os.close(fd)
            raise
        if vr.call_fd >= 0:
            os.close(vr.call_fd)
        vr.call_fd = fd
        return fd

    def stop_vring(self, index: int) -> int:
        """SET_VRING_ENABLE 0 and GET_VRING_BASE: the index to resume from."""
        if self.vrings[index].enabled:
            self.enable_vring(index, False)
        payload = self.request(Request.GET_VRING_BASE, VringState(index, 0).pack())
        assert payload is not None
        if len(payload) != VringState.FMT.size:
            raise VhostUserError(f"back-end failed GET_VRING_BASE of vring {index}")
        st = VringState.unpack(payload)
        if st.index != index:
            raise ProtocolError(f"GET_VRING_BASE: vring {st.index}, expected {index}")
        self._drop_vring(index)
        return st.num

    def _drop_vring(self, index: int) -> None:
        vr = self.vrings.pop(index, None)
        if vr is not None:
            vr.close()

    def close(self) -> None:
        for index in list(self.vrings):
            self._drop_vring(index)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
