"""The device side of virtio-blk: a server whose C threads serve a device's
queues from a striped store (virtio_blk's requests, executed as the daemon
does).  The device process (virtio-hostd) is built on it; so can a test or
program that wants the device in its own process.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from typing import Any

from ._lowlevel import check, ffi, lib, opened
from ._resource import Closeable
from .errors import ConfigError, RegionError
from .limits import IO_THREADS, MODE, SERIAL
from .store import StripedStore
from .virtqueue import DeviceQueue

ENGINES = {
    "auto": lib.VP_ENGINE_AUTO,
    "threads": lib.VP_ENGINE_THREADS,
    "uring": lib.VP_ENGINE_URING,
}
ENGINE_NAMES = {v: k for k, v in ENGINES.items()} | {lib.VP_ENGINE_INLINE: "inline"}
ENGINE_ENV = "VIRTIO_PY_IO_ENGINE"


def default_engine() -> str:
    """$VIRTIO_PY_IO_ENGINE (auto, threads or uring), else auto."""
    return os.environ.get(ENGINE_ENV, "") or "auto"


class BlockServer(Closeable):
    """The serve loops of a virtio-blk device: one per queue in notify or
    poll mode, with io_threads I/O threads per queue (0: served inline by
    the queue's loop, for a memory store).

    engine, for notify mode with I/O threads on a store of files: "uring"
    (one thread per queue with an io_uring: batched submissions and
    completions), "threads" (io_threads threads, one request each), or
    "auto" (io_uring where the kernel and the kick notifier allow it);
    None: default_engine()."""

    def __init__(
        self,
        store: StripedStore,
        queues: Iterable[DeviceQueue],
        *,
        mode: str = "notify",
        io_threads: int = 16,
        serial: str = "",
        engine: str | None = None,
    ) -> None:
        IO_THREADS.check(io_threads)
        SERIAL.check(serial)
        engine = default_engine() if engine is None else engine
        if engine not in ENGINES:
            raise ConfigError(f"I/O engine {engine!r}: not one of {', '.join(ENGINES)}")
        self._store = store  # the C server reads and writes through it
        self._queues = list(queues)
        self._srv: Any = opened(
            lib.vp_server_new,
            store.handle,
            MODE.code(mode),
            io_threads,
            serial.encode(),
            what="server",
        )
        try:
            check(lib.vp_server_set_engine(self._srv, ENGINES[engine]), "server engine")
            for q in self._queues:
                check(lib.vp_server_add_queue(self._srv, q.handle), "server")
        except BaseException:
            self.close()
            raise

    @property
    def handle(self) -> Any:
        if self._srv is None:
            raise ConfigError("server is closed")
        return self._srv

    def start(self) -> None:
        """Start the serve loops and I/O threads."""
        check(lib.vp_server_start(self.handle), "server start")

    def engines(self) -> list[str]:
        """The engine serving each running queue: uring, threads or inline."""
        out = []
        for i in range(len(self._queues)):
            code = lib.vp_server_queue_engine(self.handle, i)
            out.append(ENGINE_NAMES.get(code, "stopped"))
        return out

    def stop(self) -> None:
        """Stop the threads, after the requests in flight finished."""
        lib.vp_server_stop(self.handle)

    def close(self) -> None:
        """Stop (finishing what is in flight) and free the server."""
        if getattr(self, "_srv", None) is not None:
            lib.vp_server_free(self._srv)
            self._srv = None


class InflightRecord(Closeable):
    """The in-flight record of a device's queues (csrc/restart.h), in a file
    the device keeps outside guest memory: one record per queue, each of
    ``queue_bytes``.  A zeroed file starts the records afresh; one left by
    a device process that died is taken over by ``attach``."""

    @staticmethod
    def size_for(queues: int, queue_size: int) -> int:
        return queues * int(lib.vp_inflight_queue_size(queue_size))

    def __init__(self, fd: int, queues: int, queue_size: int) -> None:
        """Maps fd (taken: closed here) of exactly size_for bytes."""
        self.queue_bytes = int(lib.vp_inflight_queue_size(queue_size))
        self.size = queues * self.queue_bytes
        self.queues = queues
        try:
            if os.fstat(fd).st_size != self.size:
                raise RegionError(f"in-flight record is not {self.size} bytes")
            self._mm: mmap.mmap | None = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._buf: Any = ffi.from_buffer(self._mm)

    def attach(self, q: DeviceQueue) -> int:
        """Keep q's record here, taking over what a predecessor left: how
        many of its requests q hands out again.  Before q is served."""
        if self._mm is None or not 0 <= q.index < self.queues:
            raise ConfigError(f"no in-flight record for queue {q.index}")
        area = ffi.cast("char *", self._buf) + q.index * self.queue_bytes
        return int(
            check(
                lib.vp_devq_set_inflight(q.handle, area, self.queue_bytes),
                f"in-flight record of queue {q.index}",
            )
        )

    def close(self) -> None:
        """Unmap (the queues attached must be closed first)."""
        mm = getattr(self, "_mm", None)
        if mm is not None:
            ffi.release(self._buf)
            mm.close()
            self._mm = None


__all__ = ["ENGINES", "BlockServer", "InflightRecord", "default_engine"]
