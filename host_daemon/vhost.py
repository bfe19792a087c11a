"""The daemon's vhost-user transport: a listening socket whose front-ends
(QEMU's vhost-user-blk) drive the device's queues.

The device is the daemon's own: the same store and the same C request path
as the native transport, with each queue's counters in the device's region,
so ``virtio-hostd status`` shows them.  Messages are handled on one thread of
their own; the data plane is the C server's threads.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from virtio_py.region import Region
from virtio_py.store import StripedStore
from virtio_py.vhost_user import VhostUserServer
from virtio_py.vhost_user.blk import VhostUserBlk


class VhostUserTransport:
    """Serve ``store`` as virtio-blk on the Unix socket ``path`` until closed.

    ``region``'s per-queue statistics blocks (from the layout the daemon
    made, never from the header a guest can write) receive the counters of
    the vrings of the same index.  ``close`` ends the connection (finishing
    what is in flight), stops listening and removes the socket.
    """

    def __init__(
        self,
        path: str,
        store: StripedStore,
        region: Region | None,
        *,
        queues: int,
        seg_max: int,
        event_idx: bool = True,
        mode: str = "notify",
        io_threads: int = 16,
        serial: str = "",
    ) -> None:
        self.path = path
        self.device: VhostUserBlk | None = None
        self.server: VhostUserServer | None = None
        self._thread: threading.Thread | None = None
        self.device = VhostUserBlk(
            store,
            num_queues=queues,
            seg_max=seg_max,
            event_idx=event_idx,
            mode=mode,
            io_threads=io_threads,
            serial=serial,
            region=region,
        )
        try:
            self.server = VhostUserServer(path, self.device)
        except BaseException:
            self.device.close()
            raise

    def start(self) -> None:
        """Accept front-ends on a thread of its own."""
        assert self.server is not None
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="vhost-user", daemon=True
        )
        self._thread.start()

    @property
    def failures(self) -> list[str]:
        """What front-ends were refused, oldest first (the last 100)."""
        return list(self.server.failures) if self.server is not None else []

    def stats(self) -> dict[str, Any]:
        s = self.server
        return {
            "socket": self.path,
            "connected": s is not None and s.backend is not None,
            "connections": s.connections if s else 0,
            "refused": s.refused if s else 0,
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self.server.close()  # the socket file goes
            self.server = None
        if self.device is not None:
            self.device.close()
            self.device = None


def listening_socket(pid: int) -> str | None:
    """The path of a Unix socket process pid listens on (its vhost-user
    socket), or None.  Needs access to /proc/PID/fd (same user or root)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                # Num RefCount Protocol Flags Type St Inode [Path]
                fields = line.split()
                if (
                    len(fields) == 8
                    and fields[6] in inodes
                    and fields[5] == "01"
                    and int(fields[3], 16) & _SO_ACCEPTCON
                ):
                    return fields[7]
    except (OSError, ValueError, StopIteration):
        return None
    return None


_SO_ACCEPTCON = 1 << 16  # __SO_ACCEPTCON: a listening socket
