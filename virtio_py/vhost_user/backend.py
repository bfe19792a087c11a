"""The back-end side: one connection's state machine.

Device-agnostic: the device model is a ``VhostUserDevice``; this module owns
the protocol, the memory table and every fd the front-end sent.

Ring states, as QEMU's vhost-user.rst has them: a vring is *started* by
SET_VRING_KICK and *stopped* by GET_VRING_BASE; it is *enabled* by
SET_VRING_ENABLE 1 (every vring starts disabled; SET_FEATURES without
VHOST_USER_F_PROTOCOL_FEATURES enables them all).  The device runs a vring
while it is started and enabled.  Anything that changes a running vring's
memory or fds (SET_MEM_TABLE, SET_VRING_KICK/CALL/ERR again) stops it, swaps,
and starts it again from the index it stopped at.

Errors: a request that cannot be carried out is answered with an error: a
reply with an empty payload to a request that has a reply of its own, a
REPLY_ACK failure when need_reply is set.  With neither, an error confined to
one vring signals that vring's err eventfd and the connection goes on; a
refused SET_CONFIG (a guest can cause one) is only logged; any other error,
and any framing error, drops the connection.  Nothing escapes ``handle()``:
the daemon keeps serving.
"""

from __future__ import annotations

import abc
import errno
import logging
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

from .._lowlevel import ffi
from .._resource import Closeable
from .channel import Channel
from .memory import MemoryTable
from .protocol import (
    REPLYING_REQUESTS,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_VRING_F_LOG,
    VIRTIO_RING_F_EVENT_IDX,
    ConfigSpace,
    InflightDesc,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VhostUserError,
    VringAddr,
    VringFile,
    VringState,
    bits,
    expect_size,
    pack_u64,
    unpack_memory_table,
    unpack_u64,
)

log = logging.getLogger("virtio_py.vhost_user")

DEFAULT_PROTOCOL_FEATURES = bits(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG
)
VIRTQUEUE_MAX_SIZE = 32768
DESC_SIZE = 16


def avail_size(num: int) -> int:
    return 2 + 2 + 2 * num + 2  # flags, idx, ring[num], used_event


def used_size(num: int) -> int:
    return 2 + 2 + 8 * num + 2  # flags, idx, ring[num], avail_event


@dataclass(frozen=True)
class Vring:
    """Everything a device needs to run one vring.

    Addresses are this process's (already translated through ``mem`` and
    checked to lie wholly in it).  The fds belong to the back-end and stay open
    until ``stop_queue`` returns; a device that needs them longer dups them.
    ``kick_fd`` None means the front-end asked for polling (VHOST_USER_VRING_NOFD_MASK).
    """

    index: int
    num: int
    mem: MemoryTable
    desc: int
    avail: int
    used: int
    base: int
    kick_fd: int | None
    call_fd: int | None
    err_fd: int | None
    event_idx: bool
    features: int
    # This vring's in-flight record (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD):
    # (address here, bytes), in the area the front-end keeps for us.
    inflight: tuple[int, int] | None = None


class VhostUserDevice(abc.ABC):
    """The device model behind a back-end (virtio-blk for this project)."""

    #: largest queue size SET_VRING_NUM may ask for
    max_queue_size: int = VIRTQUEUE_MAX_SIZE

    @property
    @abc.abstractmethod
    def num_queues(self) -> int:
        """How many vrings the device has (GET_QUEUE_NUM)."""

    @abc.abstractmethod
    def features(self) -> int:
        """The virtio feature bits the device offers."""

    @abc.abstractmethod
    def get_config(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes of config space from ``offset``; raise to refuse."""

    @abc.abstractmethod
    def set_features(self, features: int) -> None:
        """The virtio features the front-end acked (no vhost-user bits); raise to refuse."""

    @abc.abstractmethod
    def start_queue(self, vring: Vring) -> None:
        """Serve ``vring`` from ``vring.base`` on; raise to refuse (the vring fails)."""

    @abc.abstractmethod
    def stop_queue(self, index: int) -> int:
        """Stop serving vring ``index``: finish (or fail) what is in flight, touch the
        ring, the memory and the fds no more, and return last_avail_idx.  Must not
        fail: the back-end unmaps and closes what the vring used right after."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Back to the state before negotiation (the connection ended or was reset)."""


class _InflightArea:
    """The in-flight area: made here on GET_INFLIGHT_FD (a memfd the
    front-end keeps across our restarts), or handed back by SET_INFLIGHT_FD.
    One record of queue_size heads per queue, queue_bytes apart."""

    def __init__(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int) -> None:
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.queue_bytes = inflight_queue_size(queue_size)
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
        self._buf: Any = ffi.from_buffer(self.map)
        self.addr = int(ffi.cast("uintptr_t", self._buf))

    def queue(self, index: int, num: int) -> tuple[int, int] | None:
        if index >= self.num_queues or num != self.queue_size:
            return None
        return self.addr + index * self.queue_bytes, self.queue_bytes

    def close(self) -> None:
        self.addr = 0
        ffi.release(self._buf)
        self.map.close()
        os.close(self.fd)


def inflight_queue_size(num: int) -> int:
    """libvhost-user's vu_inflight_queue_size: 16 bytes a head, 64-aligned."""
    return (16 * num + 2 + 63) & ~63


class _Refused(Exception):
    """The request cannot be carried out.  ``vring`` if the failure is that vring's
    alone; ``drop`` False if, unanswered, it need not end the connection."""

    def __init__(self, reason: str, vring: int | None = None, drop: bool = True) -> None:
        super().__init__(reason)
        self.vring = vring
        self.drop = drop


class _Drop(Exception):
    """End the connection."""


@dataclass
class _VringSlot:
    num: int | None = None
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    running: bool = False

    def close_fds(self, which: tuple[str, ...] = ("kick_fd", "call_fd", "err_fd")) -> None:
        for name in which:
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class VhostUserBackend(Closeable):
    """One front-end connection to ``device`` over ``channel``.

    Call ``handle()`` whenever the channel is readable (or ``run()`` to loop);
    it returns False once the connection is over, after which everything the
    connection held (fds, mappings, running vrings) is released.
    """

    def __init__(
        self,
        device: VhostUserDevice,
        channel: Channel,
        *,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
    ) -> None:
        self.device = device
        self.channel: Channel | None = channel
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self.features = 0  # acked, including the vhost-user bit
        self.owner = False
        self.mem: MemoryTable | None = None
        self.failures: list[str] = []  # every error answered, oldest first
        self._vrings = [_VringSlot() for _ in range(device.num_queues)]
        self._handlers: dict[int, Callable[[Message], Any]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.RESET_DEVICE: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
        self.inflight: _InflightArea | None = None
        if getattr(device, "supports_inflight", False):
            self.offered_protocol_features |= bits(ProtocolFeature.INFLIGHT_SHMFD)

    # -- the loop ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.channel is None

    def handle(self, timeout: float | None = None) -> bool:
        """Read and carry out one message.  False when the connection is over."""
        if self.channel is None:
            return False
        try:
            msg = self.channel.recv(timeout)
        except socket.timeout:
            return True
        except (ProtocolError, OSError) as e:
            self._note(f"connection dropped: {e}")
            self.close()
            return False
        if msg is None:
            self.close()
            return False
        try:
            self._dispatch(msg)
            return True
        except _Drop as e:
            self._note(f"connection dropped: {e}")
        except OSError as e:
            self._note(f"connection lost: {e}")
        except Exception as e:  # a device bug must not take the daemon down
            log.exception("vhost-user: %s failed", msg.name)
            self._note(f"connection dropped: {msg.name}: {type(e).__name__}: {e}")
        finally:
            msg.close_fds()
        self.close()
        return False

    def run(self) -> None:
        """Serve until the front-end goes away."""
        while self.handle():
            pass

    def _note(self, what: str) -> None:
        self.failures.append(what)
        del self.failures[:-100]
        log.warning("vhost-user: %s", what)

    def _reply(self, msg: Message, payload: bytes, fds: list[int] | None = None) -> None:
        assert self.channel is not None
        self.channel.send(
            Message(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload, fds or [])
        )

    def _dispatch(self, msg: Message) -> None:
        log.debug(
            "vhost-user: %s flags %#x, %d bytes, %d fds",
            msg.name,
            msg.flags,
            len(msg.payload),
            len(msg.fds),
        )
        if msg.is_reply:
            raise _Drop(f"{msg.name} with the reply flag set")
        handler = self._handlers.get(msg.request)
        try:
            if handler is None:
                raise _Refused("not implemented")
            result = handler(msg)
        except _Refused as e:
            self._refuse(msg, str(e), e.vring, e.drop)
            return
        except ProtocolError as e:
            self._refuse(msg, str(e), None, True)
            return
        if msg.request in REPLYING_REQUESTS:
            if isinstance(result, tuple):  # (payload, fds)
                self._reply(msg, result[0], result[1])
            else:
                self._reply(msg, result or b"")
        elif msg.need_reply:
            self._reply(msg, pack_u64(0))

    def _refuse(self, msg: Message, reason: str, vring: int | None, drop: bool) -> None:
        self._note(f"{msg.name}: {reason}")
        if msg.request in REPLYING_REQUESTS:
            self._reply(msg, b"")
        elif msg.need_reply:
            self._reply(msg, pack_u64(errno.EINVAL))
        elif vring is not None:
            self._signal_err(vring)
        elif drop:
            raise _Drop(f"{msg.name}: {reason} (and no way to answer)")

    def _signal_err(self, index: int) -> None:
        fd = self._vrings[index].err_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    # -- helpers ----------------------------------------------------------------------
    def _slot(self, index: int) -> _VringSlot:
        if not 0 <= index < len(self._vrings):
            raise _Refused(f"no vring {index} (the device has {len(self._vrings)})")
        return self._vrings[index]

    @staticmethod
    def _no_fds(msg: Message) -> None:
        if msg.fds:
            raise ProtocolError(f"{len(msg.fds)} unexpected fds")

    def _state(self, msg: Message) -> VringState:
        self._no_fds(msg)
        return VringState.unpack(msg.payload)

    def _u64(self, msg: Message) -> int:
        self._no_fds(msg)
        return unpack_u64(msg.payload)

    def _empty(self, msg: Message) -> None:
        self._no_fds(msg)
        expect_size(msg, 0)

    def _device_call(
        self, what: str, fn: Callable[..., Any], *args: Any, vring: int | None = None
    ) -> Any:
        try:
            return fn(*args)
        except (_Refused, _Drop):
            raise
        except Exception as e:
            raise _Refused(f"device refused {what}: {e}", vring) from None

    # -- vring lifecycle --------------------------------------------------------------
    def _start(self, index: int) -> None:
        s = self._vrings[index]
        if self.mem is None:
            raise _Refused("no memory table", index)
        if s.num is None or s.addr is None:
            raise _Refused("vring size or addresses not set", index)
        try:
            vring = Vring(
                index=index,
                num=s.num,
                mem=self.mem,
                desc=self.mem.uaddr_to_va(s.addr.desc_user_addr, DESC_SIZE * s.num),
                avail=self.mem.uaddr_to_va(s.addr.avail_user_addr, avail_size(s.num)),
                used=self.mem.uaddr_to_va(s.addr.used_user_addr, used_size(s.num)),
                base=s.base,
                kick_fd=s.kick_fd,
                call_fd=s.call_fd,
                err_fd=s.err_fd,
                event_idx=bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1),
                features=self.features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES),
                inflight=self.inflight.queue(index, s.num) if self.inflight else None,
            )
        except VhostUserError as e:
            raise _Refused(f"vring {index}: {e}", index) from None
        self._device_call(f"to start vring {index}", self.device.start_queue, vring, vring=index)
        s.running = True

    def _stop(self, index: int) -> None:
        s = self._vrings[index]
        if not s.running:
            return
        s.running = False
        try:
            s.base = int(self.device.stop_queue(index)) & 0xFFFF
        except Exception as e:
            self._note(f"vring {index}: device failed to stop: {e}")

    def _sync(self, index: int) -> None:
        """Run the vring if it is started and enabled, else stop it."""
        s = self._vrings[index]
        if s.started and s.enabled and not s.running:
            self._start(index)
        elif not (s.started and s.enabled) and s.running:
            self._stop(index)

    def _not_running(self, index: int, what: str) -> _VringSlot:
        s = self._slot(index)
        if s.running:
            raise _Refused(f"{what} while vring {index} runs", index)
        return s

    def _reset_vrings(self) -> None:
        for i, s in enumerate(self._vrings):
            self._stop(i)
            s.close_fds()
            self._vrings[i] = _VringSlot()

    # -- requests ---------------------------------------------------------------------
    def _offered_features(self) -> int:
        return self.device.features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES

    def _get_features(self, msg: Message) -> bytes:
        self._empty(msg)
        return pack_u64(self._offered_features())

    def _set_features(self, msg: Message) -> None:
        features = self._u64(msg)
        extra = features & ~self._offered_features()
        if extra:
            raise _Refused(f"features {extra:#x} were not offered")
        if features != self.features and any(s.running for s in self._vrings):
            raise _Refused("features changed while vrings run")
        self._device_call(
            "the features",
            self.device.set_features,
            features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES),
        )
        self.features = features
        if not features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for i, s in enumerate(self._vrings):
                s.enabled = True
                try:
                    self._sync(i)
                except _Refused as e:
                    self._note(str(e))
                    self._signal_err(i)

    def _set_owner(self, msg: Message) -> None:
        self._empty(msg)
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        self._empty(msg)
        self._reset_vrings()
        self._device_call("reset", self.device.reset)
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.features = 0
        self.owner = False

    def _get_protocol_features(self, msg: Message) -> bytes:
        self._empty(msg)
        return pack_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = self._u64(msg)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise _Refused(f"protocol features {extra:#x} were not offered")
        self.protocol_features = features

    def _inflight_negotiated(self, msg: Message) -> None:
        if not self.protocol_features >> ProtocolFeature.INFLIGHT_SHMFD & 1:
            raise _Refused(f"{msg.name} without INFLIGHT_SHMFD")

    def _inflight_shape_ok(self, d: InflightDesc) -> bool:
        return 0 < d.num_queues <= len(self._vrings) and 0 < d.queue_size <= VIRTQUEUE_MAX_SIZE

    def _replace_inflight(self, area: _InflightArea) -> None:
        if any(s.running for s in self._vrings):
            area.close()
            raise _Refused("in-flight area changed while vrings run")
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area

    def _get_inflight_fd(self, msg: Message) -> tuple[bytes, list[int]]:
        """A new, zeroed area for num_queues x queue_size (a record of
        version 0: each vring starts it afresh)."""
        self._no_fds(msg)
        self._inflight_negotiated(msg)
        want = InflightDesc.unpack(msg.payload)
        if not self._inflight_shape_ok(want):
            raise _Refused(f"in-flight area for {want.num_queues} x {want.queue_size}")
        size = want.num_queues * inflight_queue_size(want.queue_size)
        fd = os.memfd_create("vhost-user-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            area = _InflightArea(fd, size, 0, want.num_queues, want.queue_size)
        except BaseException:
            os.close(fd)
            raise
        self._replace_inflight(area)
        return InflightDesc(size, 0, want.num_queues, want.queue_size).pack(), [fd]

    def _set_inflight_fd(self, msg: Message) -> None:
        """The area the front-end kept, from us or a predecessor: each vring
        takes over its record when it starts."""
        self._inflight_negotiated(msg)
        got = InflightDesc.unpack(msg.payload)
        if len(msg.fds) != 1:
            raise _Refused(f"SET_INFLIGHT_FD with {len(msg.fds)} fds")
        need = got.num_queues * inflight_queue_size(max(got.queue_size, 1))
        if (
            not self._inflight_shape_ok(got)
            or got.mmap_size < need
            or got.mmap_offset % mmap.PAGESIZE
        ):
            raise _Refused(
                f"in-flight area of {got.mmap_size} bytes for {got.num_queues} x {got.queue_size}"
            )
        fd = msg.take_fds()[0]
        try:
            if os.fstat(fd).st_size < got.mmap_offset + need:
                raise _Refused("in-flight area larger than its file")
            area = _InflightArea(fd, need, got.mmap_offset, got.num_queues, got.queue_size)
        except BaseException:
            os.close(fd)
            raise
        self._replace_inflight(area)

    def _get_queue_num(self, msg: Message) -> bytes:
        self._empty(msg)
        return pack_u64(len(self._vrings))

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        self._empty(msg)
        return pack_u64(VHOST_MEMORY_BASELINE_NREGIONS)

    def _set_mem_table(self, msg: Message) -> None:
        descs = unpack_memory_table(msg.payload)
        try:
            new = MemoryTable.map(descs, msg.fds)  # checks one fd per region
        except ProtocolError:
            raise
        except VhostUserError as e:
            raise _Refused(str(e)) from None
        msg.close_fds()  # the mappings hold the files
        # quiesce, swap, resume: a running vring never sees an unmapped table
        for i in range(len(self._vrings)):
            self._stop(i)
        old, self.mem = self.mem, new
        if old is not None:
            old.close()
        for i in range(len(self._vrings)):
            try:
                self._sync(i)
            except _Refused as e:
                self._note(f"after SET_MEM_TABLE: {e}")
                self._signal_err(i)

    def _set_vring_num(self, msg: Message) -> None:
        st = self._state(msg)
        s = self._not_running(st.index, "SET_VRING_NUM")
        s.num = None
        if not 1 <= st.num <= self.device.max_queue_size or st.num & (st.num - 1):
            raise _Refused(
                f"vring {st.index}: size {st.num} is not a power of two "
                f"up to {self.device.max_queue_size}",
                st.index,
            )
        s.num = st.num

    def _set_vring_addr(self, msg: Message) -> None:
        self._no_fds(msg)
        a = VringAddr.unpack(msg.payload)
        s = self._not_running(a.index, "SET_VRING_ADDR")
        s.addr = None
        if a.flags & (1 << VHOST_VRING_F_LOG):
            raise _Refused(f"vring {a.index}: dirty logging is not supported", a.index)
        if a.flags & ~(1 << VHOST_VRING_F_LOG):
            raise _Refused(f"vring {a.index}: unknown flags {a.flags:#x}", a.index)
        for what, addr, align in (
            ("desc", a.desc_user_addr, 16),
            ("avail", a.avail_user_addr, 2),
            ("used", a.used_user_addr, 4),
        ):
            if addr % align:
                raise _Refused(
                    f"vring {a.index}: {what} address {addr:#x} is not {align}-byte aligned",
                    a.index,
                )
        if self.mem is not None:
            num = s.num or 1
            try:
                self.mem.uaddr_to_va(a.desc_user_addr, DESC_SIZE * num)
                self.mem.uaddr_to_va(a.avail_user_addr, avail_size(num))
                self.mem.uaddr_to_va(a.used_user_addr, used_size(num))
            except VhostUserError as e:
                raise _Refused(f"vring {a.index}: {e}", a.index) from None
        s.addr = a

    def _set_vring_base(self, msg: Message) -> None:
        st = self._state(msg)
        s = self._not_running(st.index, "SET_VRING_BASE")
        if st.num > 0xFFFF:
            raise _Refused(f"vring {st.index}: base {st.num} is not a 16-bit index", st.index)
        s.base = st.num

    def _get_vring_base(self, msg: Message) -> bytes:
        st = self._state(msg)
        s = self._slot(st.index)
        self._stop(st.index)
        s.started = False
        s.close_fds(("kick_fd", "call_fd"))
        return VringState(st.index, s.base).pack()

    def _vring_file(self, msg: Message) -> tuple[int, _VringSlot, int | None]:
        f = VringFile.unpack(msg.payload)
        s = self._slot(f.index)
        want = 0 if f.nofd else 1
        if len(msg.fds) != want:
            raise ProtocolError(f"vring {f.index}: {len(msg.fds)} fds, expected {want}")
        fd = None
        if not f.nofd:
            if not _is_eventfd(msg.fds[0]):
                raise _Refused(f"vring {f.index}: the fd is not an eventfd", f.index)
            fd = msg.take_fds()[0]
        return f.index, s, fd

    def _replace_fd(
        self, index: int, s: _VringSlot, name: str, fd: int | None, start: bool = False
    ) -> bool:
        """Swap one of the vring's fds, restarting it if it runs.  True if it ran."""
        was_running = s.running
        self._stop(index)
        s.close_fds((name,))
        setattr(s, name, fd)
        if start:
            s.started = True
        self._sync(index)
        return was_running

    def _set_vring_kick(self, msg: Message) -> None:
        index, s, fd = self._vring_file(msg)
        self._replace_fd(index, s, "kick_fd", fd, start=True)

    def _set_vring_call(self, msg: Message) -> None:
        index, s, fd = self._vring_file(msg)
        if self._replace_fd(index, s, "call_fd", fd) and fd is not None:
            # an interrupt raised during the swap may have gone to the old fd
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def _set_vring_err(self, msg: Message) -> None:
        index, s, fd = self._vring_file(msg)
        self._replace_fd(index, s, "err_fd", fd)

    def _set_vring_enable(self, msg: Message) -> None:
        st = self._state(msg)
        s = self._slot(st.index)
        if st.num not in (0, 1):
            raise _Refused(f"vring {st.index}: enable {st.num}", st.index)
        s.enabled = bool(st.num)
        self._sync(st.index)

    def _get_config(self, msg: Message) -> bytes:
        self._no_fds(msg)
        cfg = ConfigSpace.unpack(msg.payload)
        data = self._device_call("the config read", self.device.get_config, cfg.offset, cfg.size)
        if len(data) != cfg.size:
            raise _Refused(f"device gave {len(data)} config bytes for {cfg.size}")
        return ConfigSpace(cfg.offset, cfg.size, cfg.flags, bytes(data)).pack()

    def _set_config(self, msg: Message) -> None:
        self._no_fds(msg)
        ConfigSpace.unpack(msg.payload)
        raise _Refused("the config space is read-only", drop=False)

    # -- ending -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop every vring, reset the device, close every fd, unmap the table."""
        if self.channel is None:
            return
        channel, self.channel = self.channel, None
        try:
            self._reset_vrings()
            try:
                self.device.reset()
            except Exception as e:
                self._note(f"device reset failed: {e}")
        finally:
            if self.mem is not None:
                self.mem.close()
                self.mem = None
            if self.inflight is not None:
                self.inflight.close()
                self.inflight = None
            channel.close()
