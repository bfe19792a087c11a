"""The device process: sets up the region, notifiers and store, serves the
queues from C threads, and tears everything down on stop or signal."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from virtio_py import limits
from virtio_py.device import BlockServer
from virtio_py.errors import RegionError
from virtio_py.proc import pid_alive
from virtio_py.region import Region, check_name, destroy, exists, feature_bits
from virtio_py.store import StripedStore
from virtio_py.virtqueue import DeviceQueue

DEFAULT_FEATURES = ("VERSION_1", "SEG_MAX", "BLK_SIZE", "FLUSH", "DISCARD", "WRITE_ZEROES")


def default_serial(name: str) -> str:
    """vpy-NAME, cut to the 20 bytes of a virtio-blk serial."""
    return f"vpy-{name}".encode()[: limits.SERIAL_BYTES].decode(errors="ignore")


def is_daemon_of(pid: int, name: str) -> bool:
    """True if pid is alive and maps this device's region (guards against pid
    reuse and a guest scribbling a pid into the header).  Mapping, not the
    command line, so a daemon run in-process by any program counts."""
    if not pid_alive(pid):
        return False
    shm = f"/dev/shm/{name}"
    try:
        ino = os.stat(shm).st_ino
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].rstrip("\n") == shm and int(fields[4]) == ino:
                    return True
    except FileNotFoundError:
        return False
    except PermissionError:
        # Another user's process: fall back to its command line.
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            return False
        text = b" ".join(args)
        return (b"hostd" in text or b"host_daemon" in text) and name.encode() in args
    except (OSError, ValueError):
        return False
    return False


def stale_or_live(name: str) -> tuple[int, bool] | None:
    """None if no device of that name exists; else (pid, alive)."""
    if not exists(name):
        return None
    try:
        r = Region.attach(name)
    except RegionError:
        return (0, False)
    try:
        pid = r.daemon_pid
    finally:
        r.close()
    return (pid, is_daemon_of(pid, name))


def clear_stale(name: str) -> str | None:
    """Remove leftovers of a dead daemon; a one-line report, or None if clean.

    Raises RegionError if a live daemon serves the name."""
    state = stale_or_live(name)
    if state is None:
        removed = destroy(name)  # semaphores without a region
        return f"removed {len(removed)} leftover objects of {name!r}" if removed else None
    pid, alive = state
    if alive:
        raise RegionError(f"a daemon already serves {name!r} (pid {pid})")
    removed = destroy(name)
    who = f"pid {pid}" if pid else "never started"
    return f"replaced leftovers of a daemon that died ({who}): {len(removed)} objects of {name!r}"


class HostDaemon:
    """A virtio-blk device served from this process: ``setup`` creates the
    region, notifiers and store and starts the C serve loops; ``shutdown``
    finishes what is in flight and unlinks everything.  Every parameter is
    checked here, before anything is created."""

    def __init__(
        self,
        name: str,
        store: str,
        size: int,
        *,
        stripes: int = 12,
        chunk: int = 64 << 10,
        queues: int = 1,
        queue_size: int = 128,
        mode: str = "notify",
        exit: str = "async",
        lock: str = "spin",
        event_idx: bool = True,
        direct: bool = True,
        io_threads: int | None = None,
        exit_cost_us: float = 0,
        buffers: int = 64 << 20,
        serial: str | None = None,
    ) -> None:
        check_name(name)
        limits.BLK_QUEUE_SIZE.check(queue_size)  # before the ring's own, wider limit
        limits.check_geometry(stripes, chunk, size)
        limits.check_region(
            queues=queues,
            queue_size=queue_size,
            lock=lock,
            exit=exit,
            exit_cost_us=exit_cost_us,
            mode=mode,
        )
        limits.BUFFERS.check(buffers)
        if io_threads is not None:
            limits.IO_THREADS.check(io_threads)
        self.serial = limits.SERIAL.check(serial) if serial else default_serial(name)
        self.name = name
        self.cfg: dict[str, Any] = dict(
            store=store,
            size=size,
            stripes=stripes,
            chunk=chunk,
            queues=queues,
            queue_size=queue_size,
            mode=mode,
            exit=exit,
            lock=lock,
            event_idx=event_idx,
            direct=direct,
            io_threads=io_threads,
            exit_cost_us=exit_cost_us,
            buffers=buffers,
        )
        self.region: Region | None = None
        self.store: StripedStore | None = None
        self.queues: list[DeviceQueue] = []
        self.server: BlockServer | None = None
        self.io_threads: int | None = None
        self._stop = threading.Event()
        self.notices: list[str] = []

    def setup(self) -> None:
        """Create everything and start serving.  On error, nothing is left."""
        c = self.cfg
        try:
            msg = clear_stale(self.name)
            if msg:
                self.notices.append(msg)
            self.store = StripedStore(c["store"], c["size"], c["stripes"], c["chunk"], c["direct"])
            if self.store.notice:
                self.notices.append(self.store.notice)
            features = feature_bits(DEFAULT_FEATURES, c["queues"])
            self.region = Region.create(
                self.name,
                queues=c["queues"],
                queue_size=c["queue_size"],
                data_size=c["buffers"] * c["queues"],
                capacity=c["size"] // 512,
                blk_size=512,
                lock=c["lock"],
                exit=c["exit"],
                exit_cost_us=c["exit_cost_us"],
                mode=c["mode"],
                event_idx=c["event_idx"],
                features=features,
            )
            # At once: a region without a live pid is a dead daemon's to a
            # second start, which would remove it.
            self.region.set_daemon_pid(os.getpid())
            self.queues = [DeviceQueue(self.region, q) for q in range(c["queues"])]
            io_threads = c["io_threads"]
            if io_threads is None:
                # Disk I/O blocks, buffered or not: keep a request in flight
                # per outstanding guest request.  Only a memory store (tmpfs)
                # has nothing to wait for and is served inline.
                io_threads = 0 if self.store.memory else 16
            self.io_threads = io_threads
            self.server = BlockServer(
                self.store, self.queues, mode=c["mode"], io_threads=io_threads, serial=self.serial
            )
            self.server.start()
        except BaseException:
            self.shutdown()
            raise

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT/SIGHUP or request_stop()."""
        while not self._stop.wait(0.2):
            pass

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.request_stop)

    def shutdown(self) -> None:
        """Finish what is in flight, then unlink everything."""
        if self.server is not None:
            self.server.close()  # stops, drains in-flight, joins
            self.server = None
        for q in self.queues:
            q.close()
        self.queues = []
        if self.region is not None:
            self.region.close()
            self.region = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> HostDaemon:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
