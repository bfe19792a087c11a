"""A scriptable virtio-blk guest driver.

``BlockDevice`` is one guest process's view of a disk served by the host
daemon: it claims a slot on a queue, submits requests through the queue's
lock and kick path like any guest worker, and takes its share of the
interrupts on a C thread that reaps the used ring (virtblk_done).
"""

from __future__ import annotations

import struct
import time
import weakref
from typing import Any

from ._lowlevel import check, ffi, lib, opened
from ._resource import Closeable
from .errors import BlockIOError, ConfigError
from .limits import HALT_POLL_US, IODEPTH, STRATEGY
from .region import Region
from .virtqueue import Virtqueue

SECTOR = 512
STATUS_NAMES = {
    lib.VIRTIO_BLK_S_OK: "OK",
    lib.VIRTIO_BLK_S_IOERR: "IOERR",
    lib.VIRTIO_BLK_S_UNSUPP: "UNSUPP",
}
T_IN, T_OUT, T_FLUSH = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH
T_GET_ID, T_DISCARD = lib.VIRTIO_BLK_T_GET_ID, lib.VIRTIO_BLK_T_DISCARD
T_WRITE_ZEROES = lib.VIRTIO_BLK_T_WRITE_ZEROES
WRITE_ZEROES_FLAG_UNMAP = 1
DEFAULT_TIMEOUT = 30.0


class GuestSlot:
    """A process's slot on a shared queue: request buffers, completion
    records and the interrupt thread.  Workers and BlockDevice share it."""

    def __init__(
        self, vq: Virtqueue, depth: int = 1, strategy: str = "prepare", irq: bool = True
    ) -> None:
        IODEPTH.check(depth)
        self.strategy = STRATEGY.code(strategy)  # the C code, as the C calls take it
        if vq.call_notifier is None:
            raise ConfigError("a guest slot needs a virtqueue with notifiers")
        self.vq = vq
        region = vq.region
        self._g = opened(
            lib.vp_guest_open,
            region.base,
            region.size,
            vq.handle,
            vq.index,
            vq.call_notifier.handle,
            what=f"queue {vq.index} slot",
        )
        # Also at interpreter exit: the interrupt thread must not be cut
        # down holding the queue lock, which would hang every other guest.
        self._finalizer = weakref.finalize(self, lib.vp_guest_close, self._g)
        self.depth = depth
        try:
            check(lib.vp_guest_set_depth(self._g, depth), f"iodepth {depth}")
            if irq:
                check(lib.vp_guest_start_irq(self._g), "interrupt thread")
        except Exception:
            self.close()
            raise
        self.max_data = lib.vp_guest_max_data(self._g)
        self._daemon_pid = ffi.addressof(region.header[0], "daemon_pid")
        self._restartable: bool | None = None  # asked at the first wait
        self._status = ffi.new("uint8_t *")
        self._len = ffi.new("uint32_t *")

    @property
    def slot(self) -> int:
        return lib.vp_guest_slot(self._g)

    def data(self, tag: int, length: int) -> Any:
        """A writable cffi buffer over tag's data area."""
        return ffi.buffer(lib.vp_guest_data_ptr(self._g, tag), length)

    def submit(self, tag: int, rtype: int, sector: int, nbytes: int) -> None:
        check(lib.vp_guest_blk_submit(self._g, tag, rtype, sector, nbytes, self.strategy), "submit")

    def _wait(self, fn: Any, arg: int, timeout: float) -> int:
        """fn's wait, carried on while a device process that died may still
        be replaced (the restart wait, vp_device_gone): its successor
        completes what is in the ring."""
        end = time.monotonic() + timeout
        # Only a device virtio-hostd made (it left its layout record) has a
        # daemon that can come back; a vhost-user front-end's transport
        # says itself when its device is gone.  Asked while the device
        # serves: once it is gone, a successor may be rewriting the record.
        if self._restartable is None:
            from .pidfile import has_record

            r = self.vq.region
            self._restartable = not r.owner and has_record(r.name, "layout")
        restartable = self._restartable
        while True:
            left = max(0.0, end - time.monotonic())
            r = fn(self._g, arg, int(left * 1e9), self._status, self._len)
            if (
                r != -lib.VP_EDEVGONE
                or left == 0
                or not restartable
                or lib.vp_device_gone(self._daemon_pid)
            ):
                return check(r, "waiting for the device")

    def wait(self, tag: int, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
        """Wait for tag; returns (status, used length)."""
        self._wait(lib.vp_guest_wait, tag, timeout)
        return self._status[0], self._len[0]

    def wait_any(self, mask: int, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int, int]:
        """Wait for any tag in the bit mask; returns (tag, status, used length)."""
        tag = self._wait(lib.vp_guest_wait_any, mask, timeout)
        return tag, self._status[0], self._len[0]

    def irq_acct(self) -> dict[str, int]:
        return acct_dict(lib.vp_guest_irq_acct(self._g))

    @property
    def direct_irq(self) -> bool:
        """Whether a thread waiting for a completion takes the interrupt
        itself (the default where the call notifier allows it) rather than
        being woken by the interrupt thread that took it."""
        return bool(lib.vp_guest_direct_irq(self._g))

    @direct_irq.setter
    def direct_irq(self, on: bool) -> None:
        check(lib.vp_guest_set_direct_irq(self._g, int(on)), "direct interrupts")

    @property
    def halt_poll_us(self) -> float:
        """How long at most a waiting thread polls for its completion
        before it sleeps, as cpuidle-haltpoll polls before a vCPU halts; the
        budget adapts below it to how long waits last.  0 (the default):
        sleep at once."""
        return lib.vp_guest_halt_poll(self._g) / 1e3

    @halt_poll_us.setter
    def halt_poll_us(self, us: float) -> None:
        HALT_POLL_US.check(us)
        lib.vp_guest_set_halt_poll(self._g, round(us * 1e3))

    @property
    def halt_poll_budget_us(self) -> float:
        """How long the next wait polls, as the waits so far adapted it
        (from halt_poll_us)."""
        return lib.vp_guest_halt_poll_budget(self._g) / 1e3

    def close(self) -> None:
        if self._g is not None:
            self._finalizer()
            self._g = None


def acct_dict(a: Any) -> dict[str, int]:
    return {
        f: getattr(a, f)
        for f in (
            "lock_wait_ns",
            "lock_hold_ns",
            "lock_acquisitions",
            "kick_ns",
            "kicks",
            "io_wait_ns",
            "irqs",
            "reaped",
            "polled",
            "poll_ns",
        )
    }


class BlockDevice(Closeable):
    """A virtio-blk disk, attached by device name.  Offsets and lengths are
    bytes, multiples of 512.  Failed requests raise BlockIOError carrying
    the virtio status."""

    def __init__(
        self,
        region: Region,
        queue: int = 0,
        strategy: str = "prepare",
        timeout: float = DEFAULT_TIMEOUT,
        own_region: bool = False,
        vq: Virtqueue | None = None,
    ) -> None:
        self._closed = False
        self.region = region
        self._own_region = own_region
        self.timeout = timeout
        self.transport: Any = None  # a VhostUserDisk this device closes with it
        self.vq = vq if vq is not None else Virtqueue(region, queue)
        try:
            self.slot = GuestSlot(self.vq, depth=1, strategy=strategy)
        except Exception:
            self.vq.close()
            raise
        self.capacity = region.header.blk.capacity * SECTOR

    @classmethod
    def attach(
        cls, name: str, queue: int = 0, strategy: str = "prepare", timeout: float = DEFAULT_TIMEOUT
    ) -> BlockDevice:
        region = Region.attach(name)
        try:
            return cls(region, queue, strategy, timeout, own_region=True)
        except Exception:
            region.close()
            raise

    @classmethod
    def attach_vhost_user(
        cls,
        path: str,
        queue: int = 0,
        strategy: str = "prepare",
        timeout: float = DEFAULT_TIMEOUT,
        **opts: Any,
    ) -> BlockDevice:
        """A disk served by the vhost-user-blk back-end listening at path
        (qemu-storage-daemon, virtio-hostd --vhost-user).  This process is
        the front-end: it owns the queues (opts: queues, queue_size, lock,
        event_idx, exit_cost_us, buffers, name; see VhostUserDisk.open) and
        watches the connection, so a back-end that goes away fails the
        request waiting on it with DeviceGoneError."""
        from .vhost_front import VhostUserDisk

        disk = VhostUserDisk.open(path, **opts)
        try:
            disk.watch()
            dev = cls(disk.region, queue, strategy, timeout, vq=disk.virtqueue(queue))
        except BaseException:
            disk.close()
            raise
        dev.transport = disk
        return dev

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in (getattr(self, "slot", None), getattr(self, "vq", None)):
            if part is not None:
                part.close()
        if self._own_region:
            self.region.close()
        if self.transport is not None:
            self.transport.close()

    # ---- requests ----
    def _request(self, rtype: int, sector: int, nbytes: int, what: str) -> int:
        s = self.slot
        s.submit(0, rtype, sector, nbytes)
        status, used = s.wait(0, self.timeout)
        if status != lib.VIRTIO_BLK_S_OK:
            name = STATUS_NAMES.get(status, str(status))
            raise BlockIOError(f"{what}: device returned {name}", status)
        return used

    @staticmethod
    def _check_range(offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset % SECTOR or length % SECTOR:
            raise ConfigError(
                f"offset {offset} and length {length} must be non-negative multiples of {SECTOR}"
            )

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = bytearray(length)
        step = self.slot.max_data
        done = 0
        while done < length:
            n = min(step, length - done)
            self._request(
                T_IN, (offset + done) // SECTOR, n, f"read of {n} bytes at {offset + done}"
            )
            out[done : done + n] = self.slot.data(0, n)
            done += n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        step = self.slot.max_data
        done = 0
        while done < len(data):
            n = min(step, len(data) - done)
            self.slot.data(0, n)[:] = data[done : done + n]
            self._request(
                T_OUT, (offset + done) // SECTOR, n, f"write of {n} bytes at {offset + done}"
            )
            done += n

    def flush(self) -> None:
        self._request(T_FLUSH, 0, 0, "flush")

    def get_id(self) -> bytes:
        """The device's serial: up to 20 bytes (NUL padding removed)."""
        used = self._request(T_GET_ID, 0, lib.VIRTIO_BLK_ID_BYTES, "get_id")
        n = max(0, min(used - 1, lib.VIRTIO_BLK_ID_BYTES))
        # NUL-terminated when shorter than 20 bytes; a device may count the
        # whole buffer as written (qemu-storage-daemon does).
        return bytes(self.slot.data(0, n)).split(b"\0", 1)[0]

    def _range_request(self, rtype: int, offset: int, length: int, flags: int, what: str) -> None:
        self._check_range(offset, length)
        sector, left = offset // SECTOR, length // SECTOR
        while left:
            n = min(left, 0xFFFFFFFF)
            self.slot.data(0, 16)[:] = struct.pack("<QII", sector, n, flags)
            self._request(rtype, 0, 16, what)
            sector += n
            left -= n

    def discard(self, offset: int, length: int) -> None:
        self._range_request(T_DISCARD, offset, length, 0, f"discard of {length} at {offset}")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._range_request(
            T_WRITE_ZEROES,
            offset,
            length,
            WRITE_ZEROES_FLAG_UNMAP if unmap else 0,
            f"write_zeroes of {length} at {offset}",
        )

    def raw_request(
        self, rtype: int, sector: int = 0, payload: bytes = b"", nbytes: int | None = None
    ) -> tuple[int, int, bytes]:
        """Send any request type; returns (status, used length, data)."""
        n = len(payload) if nbytes is None else nbytes
        if payload:
            self.slot.data(0, len(payload))[:] = payload
        self.slot.submit(0, rtype, sector, n)
        status, used = self.slot.wait(0, self.timeout)
        return status, used, bytes(self.slot.data(0, n))
