"""virtio-blk over vhost-user, served by the C core.

The same device as the native transport: the same store, the same C serve
loops (``vp_server``), the same request path (``vp_blk_handle``) and the same
ring checks (``vp_devq_pop``).  Only the rings differ: they lie in the
front-end's guest memory, reached through the memory table of SET_MEM_TABLE,
and notifications are the eventfds the front-end passed.

Each vring the back-end starts becomes a device queue opened over a copy of
the memory table (``vp_devq_open_mem``) at the ring addresses the back-end
translated and checked, with notifiers on duplicates of the kick and call
eventfds (the back-end closes its own after ``stop_queue``).  Queues start
and stop one by one in the one C server; stopping a queue finishes what it
has in flight before its memory may be unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._lowlevel import check, ffi, lib, opened
from .._resource import Closeable
from ..device import BlockServer
from ..errors import ConfigError
from ..limits import QUEUES
from ..notifier import Notifier
from ..region import Region
from ..store import StripedStore
from .backend import VhostUserDevice, Vring
from .protocol import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VhostUserError,
    VirtioBlkConfig,
    bits,
)

SECTOR = 512

#: what the device offers (VHOST_USER_F_PROTOCOL_FEATURES is the back-end's to add)
BLK_FEATURES = bits(
    VIRTIO_F_VERSION_1,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_F_MQ,
)


def blk_config(
    capacity: int, *, seg_max: int, num_queues: int, blk_size: int = SECTOR
) -> VirtioBlkConfig:
    """The config space, with the limits the native region's header carries
    (vp_region_init): any length of discard and write-zeroes, one range per
    request, no unmap promised for write-zeroes."""
    return VirtioBlkConfig(
        capacity=capacity // SECTOR,
        seg_max=seg_max,
        blk_size=blk_size,
        num_queues=num_queues,
        max_discard_sectors=0xFFFFFFFF,
        max_discard_seg=1,
        discard_sector_alignment=blk_size // SECTOR,
        max_write_zeroes_sectors=0xFFFFFFFF,
        max_write_zeroes_seg=1,
        write_zeroes_may_unmap=0,
    )


class RingServer(BlockServer):
    """A BlockServer whose queues come and go one by one (vhost-user starts
    and stops vrings separately)."""

    def __init__(self, store: StripedStore, **kw: Any) -> None:
        super().__init__(store, (), **kw)

    def set_queue(self, index: int, queue: Any) -> None:
        """Serve the C device queue ``queue`` (a ``struct vp_devq *``) at
        ``index``, or nothing there (``ffi.NULL``).  Only while it is stopped."""
        check(lib.vp_server_set_queue(self.handle, index, queue), f"server queue {index}")

    def start_queue(self, index: int) -> None:
        check(lib.vp_server_start_queue(self.handle, index), f"start queue {index}")

    def stop_queue(self, index: int) -> None:
        """Stop popping, finish what is in flight, join the queue's threads."""
        check(lib.vp_server_stop_queue(self.handle, index), f"stop queue {index}")


@dataclass
class _Ring:
    index: int
    q: Any  # struct vp_devq *
    kick: Notifier | None
    call: Notifier | None

    def close(self) -> None:
        lib.vp_devq_close(self.q)
        for n in (self.kick, self.call):
            if n is not None:
                n.close()


def _mem_table(vring: Vring) -> Any:
    """A C copy of the vring's memory table: guest-physical and front-end
    addresses of each region, and where it is mapped here."""
    mem = opened(lib.vp_mem_new, what="memory table")
    mem = ffi.gc(mem, lib.vp_mem_free)
    for r in vring.mem.regions:
        check(
            lib.vp_mem_add_region(
                mem, r.guest_phys_addr, r.memory_size, r.userspace_addr, ffi.cast("void *", r.va)
            ),
            "memory table",
        )
    return mem


class VhostUserBlk(VhostUserDevice, Closeable):
    """A virtio-blk device on ``store`` for a vhost-user back-end.

    ``num_queues`` vrings at most, each served by ``io_threads`` C threads
    (notify mode) or a poll loop (``mode="poll"``).  ``seg_max`` is what the
    config space promises the driver: a vring smaller than ``seg_max + 2``
    could never hold the largest request without indirect descriptors, so it
    is refused.  With ``region`` (a native region this process created, with
    at least ``num_queues`` queues) vring ``i`` counts in the statistics block
    of the region's queue ``i``, found through the layout the region's
    creator keeps, never through the header a guest can write; so the
    region's readers (``virtio-hostd status``) see the vrings.  Without it,
    each vring keeps its own counters.
    """

    # Keeps an in-flight record per vring in the front-end's area
    # (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a restarted daemon resumes.
    supports_inflight = True

    def __init__(
        self,
        store: StripedStore,
        *,
        num_queues: int = 1,
        seg_max: int = 126,
        event_idx: bool = True,
        mode: str = "notify",
        io_threads: int = 16,
        serial: str = "",
        region: Region | None = None,
    ) -> None:
        QUEUES.check(num_queues)
        if not 1 <= seg_max <= lib.VP_MAX_QUEUE_SIZE - 2:
            raise ConfigError(f"seg_max must be from 1 to {lib.VP_MAX_QUEUE_SIZE - 2}")
        self.store = store
        self._num_queues = num_queues
        self.seg_max = seg_max
        self.max_queue_size = lib.VP_MAX_QUEUE_SIZE
        self.offered = BLK_FEATURES | (1 << VIRTIO_RING_F_EVENT_IDX if event_idx else 0)
        self.config = blk_config(store.size, seg_max=seg_max, num_queues=num_queues)
        self.acked = 0
        self.mode = mode
        self._stats: list[Any] = []
        if region is not None:
            if region.device_layout is None or len(region.device_layout) < num_queues:
                raise ConfigError(
                    f"region {region.name!r} has no statistics of its own for {num_queues} queues"
                )
            self._stats = [
                ffi.addressof(
                    ffi.cast("struct vp_queue_shared *", region.base + info["shared"]), "dev"
                )
                for info in region.device_layout[:num_queues]
            ]
        self._region = region  # the stats blocks live in its mapping
        self._rings: dict[int, _Ring] = {}
        self.server: RingServer | None = RingServer(
            store, mode=mode, io_threads=io_threads, serial=serial
        )

    # -- VhostUserDevice --------------------------------------------------------------
    @property
    def num_queues(self) -> int:
        return self._num_queues

    def features(self) -> int:
        return self.offered

    def get_config(self, offset: int, size: int) -> bytes:
        raw = self.config.pack()
        if offset + size > len(raw):
            raise VhostUserError(
                f"config read of {size} bytes at {offset} is past its {len(raw)} bytes"
            )
        return raw[offset : offset + size]

    def set_features(self, features: int) -> None:
        self.acked = features

    def start_queue(self, vring: Vring) -> None:
        srv = self._server()
        i = vring.index
        if i in self._rings:
            raise VhostUserError(f"vring {i} already runs")
        if vring.num < self.seg_max + 2:
            raise VhostUserError(
                f"vring {i} of {vring.num} entries cannot hold a request of seg_max "
                f"({self.seg_max}) segments: give the front-end a queue size of at least "
                f"{self.seg_max + 2}, or the daemon a smaller --queue-size"
            )
        if vring.kick_fd is None and self.mode != "poll":
            raise VhostUserError(f"vring {i} has no kick eventfd (polling needs --mode poll)")
        stats = self._stats[i] if self._stats else ffi.NULL
        q = opened(
            lib.vp_devq_open_mem,
            _mem_table(vring),
            i,
            vring.num,
            ffi.cast("void *", vring.desc),
            ffi.cast("void *", vring.avail),
            ffi.cast("void *", vring.used),
            stats,
            int(vring.event_idx),
            lib.VP_EXIT_ASYNC,
            what=f"vring {i}",
        )
        ring = _Ring(i, q, None, None)
        try:
            # The front-end names where the driver resumes (last_avail_idx);
            # the used index is the ring's own, as libvhost-user takes it.
            used_idx = ffi.cast("uint16_t *", vring.used)[1]
            check(lib.vp_devq_set_base(q, vring.base, used_idx), f"vring {i} base")
            if vring.inflight is not None:
                # The record the front-end kept decides where the ring is
                # and what runs again, not the used index in guest memory.
                addr, size = vring.inflight
                check(
                    lib.vp_devq_set_inflight(q, ffi.cast("void *", addr), size),
                    f"vring {i} in-flight record",
                )
            if vring.kick_fd is not None:
                ring.kick = Notifier.open_eventfd(vring.kick_fd)
            if vring.call_fd is not None:
                ring.call = Notifier.open_eventfd(vring.call_fd)
            lib.vp_devq_set_notify(
                q,
                ring.kick.handle if ring.kick else ffi.NULL,
                ring.call.handle if ring.call else ffi.NULL,
                ffi.NULL,
            )
            srv.set_queue(i, q)
            try:
                srv.start_queue(i)
            except BaseException:
                srv.set_queue(i, ffi.NULL)
                raise
        except BaseException:
            ring.close()
            raise
        self._rings[i] = ring

    def stop_queue(self, index: int) -> int:
        ring = self._rings.pop(index, None)
        if ring is None:
            return 0
        srv = self._server()
        srv.stop_queue(index)  # in flight: finished, pushed, interrupted
        last = ffi.new("uint16_t *")
        used = ffi.new("uint16_t *")
        lib.vp_devq_get_base(ring.q, last, used)
        srv.set_queue(index, ffi.NULL)
        ring.close()
        return int(last[0])

    def reset(self) -> None:
        """Stop every vring; a broken one is whole again for the next driver."""
        for index in list(self._rings):
            self.stop_queue(index)
        for st in self._stats:
            st.broken = 0
        self.acked = 0

    # -- inspection -------------------------------------------------------------------
    def broken(self, index: int) -> int:
        """0, or the code of the ring rule that broke running vring ``index``."""
        ring = self._rings.get(index)
        return lib.vp_devq_broken(ring.q) if ring is not None else 0

    @property
    def running(self) -> list[int]:
        return sorted(self._rings)

    def _server(self) -> RingServer:
        if self.server is None:
            raise ConfigError("device is closed")
        return self.server

    def close(self) -> None:
        """Stop every vring (finishing what is in flight) and free the server."""
        server = getattr(self, "server", None)
        if server is None:
            return
        self.reset()
        self.server = None
        server.close()


__all__ = ["VhostUserBlk", "RingServer", "blk_config", "BLK_FEATURES"]
