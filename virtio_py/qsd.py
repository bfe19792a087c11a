"""qemu-storage-daemon exporting a raw file as a vhost-user-blk back-end: QEMU's
own virtio-blk device, for the front-end (vhost_front.py) to drive.

``QsdProcess`` starts it as our child (children.spawn: in its own session,
so that a terminal's Ctrl-C reaches us and we stop it in order, and with
PR_SET_PDEATHSIG so that it does not outlive us) and waits until the export
listens.  ``stop`` ends it and removes the socket and its pid file, also
after it was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time

from .children import kill, spawn, terminate
from .errors import ConfigError, VirtioError

QSD = "qemu-storage-daemon"
#: what GET_ID answers on every qemu-storage-daemon export (a fixed string)
QSD_SERIAL = b"vhost_user_blk"


def qsd_path() -> str | None:
    """The qemu-storage-daemon binary, or None (Debian: qemu-system-common)."""
    return shutil.which(QSD)


def direct_supported(path: str) -> bool:
    """Whether path's filesystem takes O_DIRECT (tmpfs does from Linux 6.6)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class QsdProcess:
    """``qemu-storage-daemon --export type=vhost-user-blk`` on image, listening at sock.

    direct: cache.direct=on (O_DIRECT), as the native daemon opens its
    store; None takes it where the filesystem supports it.  aio: the file
    driver's I/O back end (threads, native, io_uring; default QEMU's,
    threads); iothread: serve the export on an I/O thread of its own
    instead of the main loop.
    """

    def __init__(
        self,
        image: str,
        sock: str,
        *,
        num_queues: int = 1,
        direct: bool | None = None,
        writable: bool = True,
        aio: str | None = None,
        iothread: bool = False,
    ) -> None:
        self.image, self.sock = str(image), str(sock)
        if "," in self.image + self.sock:
            raise ConfigError(f"qemu-storage-daemon cannot take paths with commas: {self.image}")
        self.num_queues = num_queues
        self.direct = direct_supported(self.image) if direct is None else direct
        self.writable = writable
        if aio not in (None, "threads", "native", "io_uring"):
            raise ConfigError(f"aio must be one of threads, native, io_uring, not {aio!r}")
        self.aio = aio
        self.iothread = iothread
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    def command(self) -> list[str]:
        binary = qsd_path()
        if binary is None:
            raise ConfigError(
                f"{QSD} is not installed (Debian: apt-get install qemu-system-common)"
            )
        assert self._dir is not None
        export = (
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={self.sock},"
            f"writable={'on' if self.writable else 'off'},num-queues={self.num_queues}"
        )
        blockdev = (
            f"driver=file,node-name=f0,filename={self.image},"
            f"cache.direct={'on' if self.direct else 'off'}"
        )
        if self.aio:
            blockdev += f",aio={self.aio}"
        cmd = [binary]
        if self.iothread:
            cmd += ["--object", "iothread,id=io0"]
            export += ",iothread=io0"
        return cmd + ["--blockdev", blockdev, "--export", export,
                      "--pidfile", os.path.join(self._dir, "qsd.pid")]  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30) -> QsdProcess:
        """Start it and wait until the export listens (it writes its pid file
        after creating the exports); VirtioError with its last words if not."""
        self._dir = tempfile.mkdtemp(prefix="virtio_py-qsd-")
        try:
            if os.path.exists(self.sock):
                os.unlink(self.sock)  # a killed daemon's
            log = open(os.path.join(self._dir, "qsd.log"), "wb")
            with log:
                self.proc = spawn(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + timeout
            pidfile = os.path.join(self._dir, "qsd.pid")
            while not (os.path.exists(pidfile) and os.path.exists(self.sock)):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    words = self.log().strip().splitlines() or ["no output"]
                    raise VirtioError(f"{QSD} did not start: {words[-1]}")
                time.sleep(0.02)
        except BaseException:  # Ctrl-C too: it must not run behind our back
            self.stop()
            raise
        return self

    def log(self) -> str:
        if not self._dir:
            return ""
        try:
            with open(os.path.join(self._dir, "qsd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (the socket file stays)."""
        kill(self.proc)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, wait, SIGKILL if it must; then remove its socket and files."""
        p, self.proc = self.proc, None
        if p is not None:
            terminate(p, timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        d, self._dir = self._dir, None
        if d:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> QsdProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["QSD", "QSD_SERIAL", "QsdProcess", "direct_supported", "qsd_path"]
