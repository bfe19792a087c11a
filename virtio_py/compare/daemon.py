"""The experiment's device: ``virtio-hostd start --foreground`` run as a
child process by its command line (virtio_py never imports the daemon)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from ..children import kill, spawn, terminate
from ..cpus import format_cpus
from ..errors import VirtioError
from ..region import destroy

# cfg key -> virtio-hostd start option, given when the key is set.
_OPTIONS = (
    ("size", "--size"), ("stripes", "--stripes"), ("chunk", "--chunk"),
    ("queues", "--queues"), ("queue_size", "--queue-size"), ("mode", "--mode"),
    ("exit", "--exit"), ("exit_cost_us", "--exit-cost"), ("lock", "--lock"),
    ("io_threads", "--io-threads"), ("vhost_user", "--vhost-user"),
)  # fmt: skip


def hostd_command(name: str, store_dir: str, cfg: Mapping[str, Any]) -> list[str]:
    """The command line of a foreground daemon serving cfg's device: an
    option for each key of cfg that is set (missing or None: the daemon's
    default); vhost_user: serve that socket instead of the named region."""
    c = cfg
    args = [
        sys.executable, "-m", "host_daemon", "start", "--foreground",
        "--name", name, "--store", store_dir,
    ]  # fmt: skip
    for key, flag in _OPTIONS:
        if c.get(key) is not None:
            args += [flag, str(c[key])]
    if c.get("event_idx") is not None:
        args.append("--event-idx" if c["event_idx"] else "--no-event-idx")
    if c.get("cpus"):
        args += ["--cpus", format_cpus(c["cpus"])]
    if c.get("notification_data"):
        args += ["--notification-data", c["notification_data"]]
        if c.get("nd_reread_ms"):
            args += ["--nd-reread-ms", str(c["nd_reread_ms"])]
    return args


class DaemonProcess:
    """``python -m host_daemon start --foreground`` as our child (started
    by children.spawn: a terminal's Ctrl-C reaches us, and we stop it in
    order)."""

    def __init__(self, name: str, store_dir: str, cfg: Mapping[str, Any]) -> None:
        self.name = name
        self.store_dir = store_dir
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> DaemonProcess:
        """Start it and wait until it serves; VirtioError with its last words if it does not."""
        try:
            self.proc = spawn(
                hostd_command(self.name, self.store_dir, self.cfg),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                stop_timeout=20,
            )
            out = self._wait_ready(timeout)
        except BaseException:  # Ctrl-C too: it must not set up behind our back
            self.stop()
            raise
        if out is None:
            return self
        self.stop()
        msg = [line for line in out if "error" in line] or out or ["no output"]
        raise VirtioError(f"host daemon for {self.name} did not start: {msg[-1]}")

    def _wait_ready(self, timeout: float) -> list[str] | None:
        """None once the daemon says it is ready, else the lines it said."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        out: list[str] = []
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    out.append(text)
                    if "ready:" in text:
                        return None
            elif self.proc.poll() is not None:
                break
        return out

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        """SIGKILL, as a crash would: what it made stays, for a successor
        to take over (stop() unlinks it)."""
        kill(self.proc)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, wait, SIGKILL if it must; then unlink what it left."""
        p, self.proc = self.proc, None
        if p is not None:
            terminate(p, timeout)
            if p.stdout:
                p.stdout.close()
        # Whatever it could not unlink (it was killed), we do.
        destroy(self.name)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
