"""A virtio-blk device reached over vhost-user: the guest's side of any
vhost-user-blk back-end (qemu-storage-daemon, virtio-hostd --vhost-user).

The front-end process lays out the native region exactly as a daemon would
(docs/REGION.md) in POSIX shared memory and hands it to the back-end as the
whole of guest memory: one SET_MEM_TABLE region at guest-physical address 0,
so GPAs stay region offsets and descriptors need no translation.  The rings'
userspace addresses are where this process mapped the region.  Guest
worker processes attach the region by name as on the native device; they
share the queue, its lock, the slots and the completion path as today, and
kick and take interrupts through the eventfds this process created (a
forked worker inherits them).

The back-end is the device: nothing in the region counts kicks taken or
interrupts sent, and header.daemon_pid holds the back-end's pid (from the
socket's peer credentials) for the guests' liveness check.  When the
connection drops, ``check()`` (or the ``watch()`` thread) sets daemon_pid to
0, and every guest waiting for a completion fails with DeviceGoneError.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
import threading

from ._lowlevel import ffi, lib
from ._resource import Closeable
from .errors import ConfigError, DeviceGoneError, VirtioError
from .limits import BLK_QUEUE_SIZE, BUFFERS, EXIT_COST_US, LOCK, LOCK_DEFAULT, QUEUES
from .notifier import Notifier
from .proc import pid_alive
from .region import Region, check_name
from .vhost_user.frontend import DEFAULT_FEATURES, VhostUserFrontend
from .vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_BLK_CONFIG_SIZE,
    VIRTIO_BLK_CONFIG_SIZE_V1,
    VIRTIO_BLK_F_MQ,
    VIRTIO_RING_F_EVENT_IDX,
    MemoryRegionDesc,
    Request,
    VhostUserError,
    VirtioBlkConfig,
    bits,
    pack_memory_table,
)
from .virtqueue import Virtqueue

#: taken when the back-end offers them; EVENT_IDX and MQ as asked
WANTED_FEATURES = DEFAULT_FEATURES & ~bits(VIRTIO_RING_F_EVENT_IDX, VIRTIO_BLK_F_MQ)
SYNC_EXIT_REFUSED = (
    "a vhost-user kick is an eventfd write, asynchronous by nature: "
    "use --exit async (and --exit-cost US to model the trap)"
)
_names = itertools.count()


def default_name() -> str:
    """A region name of its own for each device this process opens."""
    return f"vhu{os.getpid()}-{next(_names)}"


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a Unix socket (0 when it cannot be told:
    another pid namespace)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    return max(struct.unpack("3i", raw)[0], 0)


class EventfdVirtqueue(Virtqueue):
    """A driver's virtqueue whose kick and call are eventfds (the notifiers
    keep duplicates; the fds stay the caller's)."""

    def __init__(self, region: Region, index: int, kick_fd: int, call_fd: int) -> None:
        super().__init__(region, index, notifiers=False)
        try:
            self.kick_notifier = Notifier.open_eventfd(kick_fd)
            self.call_notifier = Notifier.open_eventfd(call_fd)
        except BaseException:
            self.close()
            raise
        lib.vp_vq_set_notify(
            self.handle,
            self.kick_notifier.handle,
            ffi.NULL,  # no ack: the exit is always async
            region.header.exit_mode,
            region.header.exit_cost_ns,
        )


class VhostUserDisk(Closeable):
    """One vhost-user-blk back-end, connected and running its queues in a
    region this process owns.  ``open`` does the whole start-up; ``close``
    stops the vrings, drops the connection, and unlinks the region.

    Attributes: ``path``, ``region`` (owner), ``features`` (virtio features
    acked), ``offered`` (offered), ``config`` (VirtioBlkConfig),
    ``backend_pid`` (0 if unknown), ``capacity`` (bytes).
    """

    def __init__(self) -> None:
        self.path = ""
        self._reg: Region | None = None
        self.frontend: VhostUserFrontend | None = None
        self.features = 0
        self.offered = 0
        self.config = VirtioBlkConfig()
        self.backend_pid = 0
        self._gone: str | None = None
        self._watch: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._owner_pid = os.getpid()

    @classmethod
    def open(
        cls,
        path: str,
        *,
        name: str | None = None,
        queues: int = 1,
        queue_size: int = 128,
        lock: str = LOCK_DEFAULT,
        event_idx: bool = True,
        exit: str = "async",
        exit_cost_us: float = 0.0,
        buffers: int = 64 << 20,
        timeout: float = 5.0,
    ) -> VhostUserDisk:
        """Connect to the back-end at path, negotiate, lay out the queues and
        start them.  ConfigError for a parameter outside virtio_py.limits or
        one the back-end cannot meet; DeviceGoneError if nobody listens."""
        if exit != "async":
            raise ConfigError(SYNC_EXIT_REFUSED)
        QUEUES.check(queues)
        BLK_QUEUE_SIZE.check(queue_size)
        LOCK.check(lock)
        EXIT_COST_US.check(exit_cost_us)
        BUFFERS.check(buffers)
        name = check_name(name or default_name())
        self = cls()
        self.path = path
        try:
            self._start(name, queues, queue_size, lock, event_idx, exit_cost_us, buffers, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _start(
        self,
        name: str,
        queues: int,
        queue_size: int,
        lock: str,
        event_idx: bool,
        exit_cost_us: float,
        buffers: int,
        timeout: float,
    ) -> None:
        fe = self.frontend = VhostUserFrontend.connect(self.path, timeout=timeout)
        self.backend_pid = peer_pid(fe.channel.sock) if fe.channel else 0
        if self.backend_pid and not pid_alive(self.backend_pid):
            self.backend_pid = 0  # the listener's creator, gone since (daemonised)
        want = WANTED_FEATURES
        if event_idx:
            want |= 1 << VIRTIO_RING_F_EVENT_IDX
        if queues > 1:
            want |= 1 << VIRTIO_BLK_F_MQ
        try:
            self.features = fe.negotiate(features=want)
        except VhostUserError as e:
            raise ConfigError(f"vhost-user back-end at {self.path}: {e}") from None
        self.offered = fe.device_features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        if event_idx and not self.features >> VIRTIO_RING_F_EVENT_IDX & 1:
            raise ConfigError(
                f"vhost-user back-end at {self.path} does not offer VIRTIO_RING_F_EVENT_IDX: "
                "use --no-event-idx"
            )
        raw = self._read_config()
        self.config = VirtioBlkConfig.unpack(raw)
        most = self.max_queues
        if queues > most:
            raise ConfigError(
                f"vhost-user back-end at {self.path} serves {most} queue(s), not {queues}"
            )
        region = self._reg = Region.create(
            name,
            queues=queues,
            queue_size=queue_size,
            data_size=buffers * queues,
            capacity=self.config.capacity,
            blk_size=self.config.blk_size or 512,
            seg_max=self.config.seg_max or None,
            lock=lock,
            exit="async",
            exit_cost_us=exit_cost_us,
            event_idx=bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1),
            features=self.features,
        )
        h = region.header
        h.device_features = self.offered
        # The config space as the back-end gave it (the guest reads it there).
        ffi.memmove(ffi.addressof(h.blk), raw, min(len(raw), ffi.sizeof(h.blk)))
        region.set_daemon_pid(self.backend_pid or os.getpid())
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CLOEXEC)
        try:
            base = int(ffi.cast("uintptr_t", region.base))
            desc = MemoryRegionDesc(0, region.size, base, 0)
            self._request(Request.SET_MEM_TABLE, pack_memory_table([desc]), [fd])
        finally:
            os.close(fd)
        for q, info in enumerate(region.device_layout or []):
            try:
                fe.setup_vring(
                    q, info["num"], base + info["desc"], base + info["avail"], base + info["used"]
                )
            except VhostUserError as e:
                raise ConfigError(f"vhost-user back-end at {self.path}: vring {q}: {e}") from None

    def _read_config(self) -> bytes:
        assert self.frontend is not None
        # The secure-erase fields first; a back-end of an older config
        # space answers only the VERSION_1 size.
        for size in (VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_CONFIG_SIZE_V1):
            try:
                return self.frontend.get_config(size)
            except VhostUserError:
                continue
        raise ConfigError(f"vhost-user back-end at {self.path} gives no config space")

    def _request(self, request: int, payload: bytes, fds: list[int]) -> None:
        assert self.frontend is not None
        try:
            self.frontend.request(request, payload, fds)
        except VhostUserError as e:
            raise ConfigError(f"vhost-user back-end at {self.path}: {e}") from None

    # ---- what the guests need
    @property
    def region(self) -> Region:
        """The queues' region (this process is its owner)."""
        if self._reg is None or self._reg.closed:
            raise ConfigError(f"vhost-user device {self.path} is closed")
        return self._reg

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def max_queues(self) -> int:
        """Queues the back-end serves: its queue count, and its config's
        num_queues when VIRTIO_BLK_F_MQ is negotiated (one otherwise)."""
        if not self.offered >> VIRTIO_BLK_F_MQ & 1:
            return 1
        fe_max = self.frontend.max_queues if self.frontend else 1
        return max(1, min(fe_max, self.config.num_queues or fe_max))

    @property
    def capacity(self) -> int:
        return int(self.config.capacity) * 512

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def queue_fds(self) -> dict[int, tuple[int, int]]:
        """{queue: (kick_fd, call_fd)}: what a guest process needs beside the region."""
        if self.frontend is None:
            raise ConfigError(f"vhost-user device {self.path} is closed")
        return {q: (v.kick_fd, v.call_fd) for q, v in self.frontend.vrings.items()}

    def virtqueue(self, index: int, region: Region | None = None) -> EventfdVirtqueue:
        """A driver's virtqueue on queue index, in this process or a forked
        child (region: the child's own attachment; default this one's)."""
        fds = self.queue_fds()
        if index not in fds:
            raise ConfigError(f"queue {index} out of range (device has {len(fds)})")
        return EventfdVirtqueue(region or self.region, index, *fds[index])

    # ---- liveness
    @property
    def gone(self) -> str | None:
        """Why the back-end is gone, or None while it serves."""
        return self._gone

    def check(self) -> bool:
        """True while the back-end is connected (and alive).  On its hang-up
        the region's daemon_pid becomes 0, so every guest waiting on it
        fails with DeviceGoneError at its next quiet period (20 ms)."""
        if self._gone is not None:
            return False
        why = self._hangup()
        if why is not None:
            self._mark_gone(why)
            return False
        return True

    def _hangup(self) -> str | None:
        ch = self.frontend.channel if self.frontend else None
        if ch is None:
            return "the connection is closed"
        if self.backend_pid and not pid_alive(self.backend_pid):
            return f"the back-end (pid {self.backend_pid}) died"
        sock = ch.sock
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
        ev = p.poll(0)
        if not ev:
            return None
        if ev[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            return "the back-end closed the connection"
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            return f"the connection failed: {os.strerror(e.errno or errno.EIO)}"
        return None if data else "the back-end closed the connection"

    def _mark_gone(self, why: str) -> None:
        self._gone = f"vhost-user back-end at {self.path}: {why}"
        if self._reg is not None and not self._reg.closed:
            self._reg.set_daemon_pid(0)

    def watch(self, interval: float = 0.05) -> None:
        """Check the connection on a thread of its own until close()."""
        if self._watch is not None:
            return
        self._watch_stop.clear()

        def loop() -> None:
            while not self._watch_stop.wait(interval):
                if not self.check():
                    break

        self._watch = threading.Thread(target=loop, name="vhost-user-watch", daemon=True)
        self._watch.start()

    def raise_if_gone(self) -> None:
        if not self.check():
            raise DeviceGoneError(self._gone or "vhost-user back-end gone")

    # ---- lifetime
    def close(self) -> None:
        """Stop every vring (so the back-end leaves guest memory alone), drop
        the connection and unlink the region.  Only the opening process
        does it: a forked worker's copy is left alone."""
        if os.getpid() != self._owner_pid:
            return
        t, self._watch = self._watch, None
        if t is not None:
            self._watch_stop.set()
            t.join()
        fe, self.frontend = self.frontend, None
        if fe is not None:
            if fe.channel is not None and self._gone is None:
                for q in list(fe.vrings):
                    try:
                        fe.stop_vring(q)
                    except (VirtioError, OSError):
                        break  # gone or refusing: closing is all that is left
            fe.close()
        region, self._reg = self._reg, None
        if region is not None:
            region.close()


__all__ = [
    "EventfdVirtqueue",
    "SYNC_EXIT_REFUSED",
    "VhostUserDisk",
    "default_name",
    "peer_pid",
]
