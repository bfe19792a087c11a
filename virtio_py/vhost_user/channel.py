"""A vhost-user connection: whole messages over a Unix stream socket, fds by SCM_RIGHTS.

recv() returns a complete, well-framed message or raises; on any error every fd
received so far is closed, so a caller never sees half a message or loses an fd.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Any

from .._resource import Closeable
from .protocol import (
    VHOST_USER_HDR,
    VHOST_USER_HDR_SIZE,
    VHOST_USER_MAX_FDS,
    VHOST_USER_MAX_PAYLOAD,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    Message,
    ProtocolError,
)

_INT = array.array("i").itemsize


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class Channel(Closeable):
    """One end of a vhost-user connection.

    ``body_timeout`` bounds how long the rest of a message may take once its
    first byte arrived: a peer that stalls mid-message is a framing error, not
    a reason to hang.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        body_timeout: float = 5.0,
        max_payload: int = VHOST_USER_MAX_PAYLOAD,
        max_fds: int = VHOST_USER_MAX_FDS,
    ) -> None:
        self._sock: socket.socket | None = sock
        self.body_timeout = body_timeout
        self.max_payload = max_payload
        self.max_fds = max_fds

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0, **kw: Any) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, **kw)

    @classmethod
    def pair(cls, **kw: Any) -> tuple[Channel, Channel]:
        """Two connected channels (front-end, back-end), for tests."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        return cls(a, **kw), cls(b, **kw)

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise ProtocolError("channel is closed")
        return self._sock

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending ----------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        """Send one message; its fds stay the caller's (the peer gets duplicates)."""
        if len(msg.fds) > self.max_fds:
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} fds (at most {self.max_fds})")
        data = msg.header() + msg.payload
        anc = []
        if msg.fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
        sock = self.sock
        sock.settimeout(self.body_timeout)
        sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(data[sent:])

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Bytes as they are, for tests that break the framing on purpose."""
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.settimeout(self.body_timeout)
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    # -- receiving --------------------------------------------------------------------
    def _recv_some(self, n: int, fds: list[int]) -> bytes:
        data, anc, flags, _ = self.sock.recvmsg(
            n, socket.CMSG_SPACE(self.max_fds * _INT), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % _INT])
                fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {self.max_fds} fds with one message")
        if len(fds) > self.max_fds:
            raise ProtocolError(f"more than {self.max_fds} fds with one message")
        return data

    def _recv_exact(self, n: int, fds: list[int], what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self._recv_some(n - len(buf), fds)
            except socket.timeout:
                raise ProtocolError(
                    f"{what}: {len(buf)} of {n} bytes within {self.body_timeout} s"
                ) from None
            if not chunk:
                raise ProtocolError(f"{what}: connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message; None when the peer closed between messages.

        ``timeout`` bounds the wait for the first byte (socket.timeout when it
        passes, nothing consumed).  Framing errors raise ProtocolError.
        """
        fds: list[int] = []
        sock = self.sock
        try:
            sock.settimeout(timeout)
            head = self._recv_some(VHOST_USER_HDR_SIZE, fds)
            if not head:
                if fds:
                    raise ProtocolError("fds without a message")
                return None
            sock.settimeout(self.body_timeout)
            if len(head) < VHOST_USER_HDR_SIZE:
                head += self._recv_exact(VHOST_USER_HDR_SIZE - len(head), fds, "short header")
            request, flags, size = VHOST_USER_HDR.unpack(head)
            if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
                raise ProtocolError(
                    f"request {request}: version {flags & VHOST_USER_VERSION_MASK}"
                    f" in flags {flags:#x}, expected {VHOST_USER_VERSION}"
                )
            if size > self.max_payload:
                raise ProtocolError(
                    f"request {request}: payload of {size} bytes (at most {self.max_payload})"
                )
            payload = self._recv_exact(size, fds, f"request {request} payload") if size else b""
            return Message(request, flags, payload, fds)
        except BaseException:
            _close_all(fds)
            raise

    # -- ending -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Wake a recv() blocked in another thread; the channel then reads EOF."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
