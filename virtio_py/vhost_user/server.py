"""A listening vhost-user socket: one back-end connection at a time, on one device."""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading
from typing import Any

from .._resource import Closeable
from .backend import VhostUserBackend, VhostUserDevice
from .channel import Channel
from .protocol import VhostUserError


class VhostUserServer(Closeable):
    """A listening vhost-user socket serving one front-end at a time.

    A second front-end that connects while one is served is disconnected at
    once (as qemu-storage-daemon does).  ``serve_forever`` returns after
    ``shutdown()`` (callable from another thread or a signal handler);
    ``close()`` removes the socket file.
    """

    def __init__(
        self,
        path: str,
        device: VhostUserDevice,
        *,
        body_timeout: float = 5.0,
        **backend_options: Any,
    ) -> None:
        self.path = path
        self.device = device
        self.body_timeout = body_timeout
        self.backend_options = backend_options
        self.backend: VhostUserBackend | None = None
        self.connections = 0  # front-ends served and gone
        self.refused = 0  # front-ends turned away while busy
        self.failures: list[str] = []  # what the back-ends refused or dropped, oldest first
        self._cond = threading.Condition()
        self._stopping = False
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel: selectors.BaseSelector | None = None
        try:
            self._remove_stale()
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._sock.bind(path)
            self._sock.listen(4)
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._sock, selectors.EVENT_READ, "listen")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        except BaseException:
            self.close()
            raise

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise VhostUserError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: a leftover
            return
        finally:
            probe.close()
        raise VhostUserError(f"{self.path}: another back-end listens there")

    def serve_forever(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.data == "listen":
                        self._accept(sel)
                    elif key.data == "conn":
                        if self.backend is not None and not self.backend.handle():
                            self._ended(sel)
                    else:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
        finally:
            if self.backend is not None:
                self.backend.close()
                self._ended(sel)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        if self.backend is not None:
            with self._cond:
                self.refused += 1
                self._cond.notify_all()
            conn.close()
            return
        channel = Channel(conn, body_timeout=self.body_timeout)
        self.backend = VhostUserBackend(self.device, channel, **self.backend_options)
        sel.register(conn, selectors.EVENT_READ, "conn")

    def _ended(self, sel: selectors.BaseSelector) -> None:
        for key in list(sel.get_map().values()):
            if key.data == "conn":
                sel.unregister(key.fileobj)
        with self._cond:
            if self.backend is not None:
                self.failures.extend(self.backend.failures)
                del self.failures[:-100]
            self.backend = None
            self.connections += 1
            self._cond.notify_all()

    def wait_connections(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` front-ends have come and gone (for tests and tools)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.connections >= count, timeout)

    def shutdown(self) -> None:
        self._stopping = True
        backend = self.backend
        if backend is not None and backend.channel is not None:
            backend.channel.shutdown()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening and remove the socket file (after serve_forever returned)."""
        self._stopping = True
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
