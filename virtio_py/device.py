"""The device side of virtio-blk: a server whose C threads serve a device's
queues from a striped store (virtio_blk's requests, executed as the daemon
does).  The device process (virtio-hostd) is built on it; so can a test or
program that wants the device in its own process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._lowlevel import check, lib, opened
from ._resource import Closeable
from .errors import ConfigError
from .limits import IO_THREADS, MODE, SERIAL
from .store import StripedStore
from .virtqueue import DeviceQueue


class BlockServer(Closeable):
    """The serve loops of a virtio-blk device: one per queue in notify or
    poll mode, with io_threads I/O threads per queue (0: served inline by
    the queue's loop, for a memory store)."""

    def __init__(
        self,
        store: StripedStore,
        queues: Iterable[DeviceQueue],
        *,
        mode: str = "notify",
        io_threads: int = 16,
        serial: str = "",
    ) -> None:
        IO_THREADS.check(io_threads)
        SERIAL.check(serial)
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

    def stop(self) -> None:
        """Stop the threads, after the requests in flight finished."""
        lib.vp_server_stop(self.handle)

    def close(self) -> None:
        """Stop (finishing what is in flight) and free the server."""
        if getattr(self, "_srv", None) is not None:
            lib.vp_server_free(self._srv)
            self._srv = None


__all__ = ["BlockServer"]
