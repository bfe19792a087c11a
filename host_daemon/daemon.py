"""The device process: sets up the region, notifiers and store, serves the
queues from C threads, and tears everything down on stop or signal.

Its identity is its pidfile (virtio_py.pidfile), locked before anything is made
and let go after everything is removed; the region's daemon_pid is written
for guests only, and nothing here reads it back."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

from virtio_py import limits
from virtio_py.cpus import check_cpus, pin
from virtio_py.device import ENGINES, BlockServer, InflightRecord
from virtio_py.errors import ConfigError, RegionError
from virtio_py.pidfile import PidFile, open_record, read_record, remove_records, write_record
from virtio_py.region import (
    FEATURE_BITS,
    Region,
    check_name,
    destroy,
    exists,
    feature_bits,
    foreign_objects,
)
from virtio_py.store import StripedStore
from virtio_py.virtqueue import DeviceQueue

from .vhost import VhostUserTransport

DEFAULT_FEATURES = ("VERSION_1", "SEG_MAX", "BLK_SIZE", "FLUSH", "DISCARD", "WRITE_ZEROES")


def default_serial(name: str) -> str:
    """vpy-NAME, cut to the 20 bytes of a virtio-blk serial."""
    return f"vpy-{name}".encode()[: limits.SERIAL_BYTES].decode(errors="ignore")


def clear_stale(name: str, previous_pid: int) -> str | None:
    """Remove what a dead daemon of this name left; a one-line report, or
    None if nothing was there.  Only while holding the name's pidfile (no
    other daemon can be serving it), and only this user's objects: another
    user's are refused (RegionError), never replaced."""
    foreign = foreign_objects(name)
    if foreign:
        raise RegionError(
            f"{foreign[0]} belongs to another user: not replacing it (device {name!r})"
        )
    had_region = exists(name)
    removed = destroy(name)
    if not removed:
        return None
    if not had_region:
        return f"removed {len(removed)} leftover objects of {name!r}"  # semaphores alone
    who = f"pid {previous_pid}" if previous_pid else "pid unknown"
    return f"replaced leftovers of a daemon that died ({who}): {len(removed)} objects of {name!r}"


# What the layout record keeps: every option that places something in the
# region or the store.  A successor takes a device over only with the same.
LAYOUT_KEYS = (
    "store",
    "size",
    "stripes",
    "chunk",
    "queues",
    "queue_size",
    "mode",
    "exit",
    "lock",
    "event_idx",
    "exit_cost_us",
    "buffers",
    "vhost_user",
    "notification_data",
)
RECORD_VERSION = 1


def _record_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: cfg[k] for k in LAYOUT_KEYS}
    out["store"] = os.path.realpath(cfg["store"])
    if out["vhost_user"]:
        out["vhost_user"] = os.path.realpath(out["vhost_user"])
    return out


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
        lock: str = limits.LOCK_DEFAULT,
        event_idx: bool = True,
        direct: bool = True,
        io_threads: int | None = None,
        exit_cost_us: float = 0,
        buffers: int = 64 << 20,
        serial: str | None = None,
        vhost_user: str | None = None,
        notification_data: str | None = None,
        nd_reread_ms: int = limits.ND_REREAD_MS_DEFAULT,
        io_engine: str | None = None,
        cpus: Iterable[int] | None = None,
    ) -> None:
        check_name(name)
        limits.check_notification_data(notification_data, mode, vhost_user)
        limits.ND_REREAD_MS.check(nd_reread_ms)
        if io_engine is not None and io_engine not in ENGINES:
            raise ConfigError(f"I/O engine {io_engine!r}: not one of {', '.join(ENGINES)}")
        self.io_engine = io_engine
        # Where the threads run: the process's, not the device's (a
        # successor may run elsewhere and still take the device over).
        self.cpus = None if cpus is None else check_cpus(cpus)
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
            vhost_user=vhost_user,
            notification_data=notification_data,
            nd_reread_ms=nd_reread_ms,
        )
        self.region: Region | None = None
        self.store: StripedStore | None = None
        self.queues: list[DeviceQueue] = []
        self.server: BlockServer | None = None
        self.vhost: VhostUserTransport | None = None
        self.io_threads: int | None = None
        self.identity: PidFile | None = None
        self.inflight: InflightRecord | None = None
        self.adopted = False  # took over a device whose daemon died
        self.resubmitted = 0  # requests of the dead daemon run again
        self._keep_on_error = False
        self._replacing = ""
        self._stop_requested = False
        self.notices: list[str] = []

    def setup(self) -> None:
        """Create everything and start serving.  On error, nothing is left."""
        c = self.cfg
        pin(self.cpus)  # before any thread starts: they inherit it
        try:
            # The name first: while we hold it, no other daemon serves it,
            # and what is left under it is a dead one's.
            self.identity = PidFile.acquire(self.name)
            record = self._adoptable()
            # A failed take-over leaves the device as the dead daemon left it.
            self._keep_on_error = record is not None
            if record is None:
                msg = clear_stale(self.name, self.identity.previous_pid)
                if msg:
                    self.notices.append(msg + self._replacing)
                remove_records(self.identity)
            self.store = StripedStore(c["store"], c["size"], c["stripes"], c["chunk"], c["direct"])
            if self.store.notice:
                self.notices.append(self.store.notice)
            features = feature_bits(DEFAULT_FEATURES, c["queues"])
            if c["notification_data"]:
                features |= 1 << FEATURE_BITS["NOTIFICATION_DATA"]
            params = dict(
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
            if record is not None:
                self.region = Region.adopt(self.name, **params)
                self.adopted = True
            else:
                self.region = Region.create(self.name, **params)
            if not c["vhost_user"]:
                fd = open_record(
                    self.identity,
                    "inflight",
                    None if self.adopted else InflightRecord.size_for(c["queues"], c["queue_size"]),
                )
                if fd is None:
                    raise RegionError(f"the in-flight record of {self.name!r} is gone")
                self.inflight = InflightRecord(fd, c["queues"], c["queue_size"])
            if not self.adopted:
                # Last: a successor takes over only a device fully made.
                rec = {"version": RECORD_VERSION, "cfg": _record_cfg(c), "features": features}
                write_record(self.identity, "layout", json.dumps(rec).encode())
            # For guests (a sync exit gives up when it is gone); the daemon
            # itself never reads it back.
            self.region.set_daemon_pid(os.getpid())
            io_threads = c["io_threads"]
            if io_threads is None:
                # Disk I/O blocks, buffered or not: keep a request in flight
                # per outstanding guest request.  Only a memory store (tmpfs)
                # has nothing to wait for and is served inline.
                io_threads = 0 if self.store.memory else 16
            self.io_threads = io_threads
            if c["vhost_user"]:
                # The queues are a vhost-user front-end's; the region holds
                # the device's config and their counters.
                self.vhost = VhostUserTransport(
                    c["vhost_user"],
                    self.store,
                    self.region,
                    queues=c["queues"],
                    seg_max=max(1, c["queue_size"] - 2),
                    event_idx=c["event_idx"],
                    mode=c["mode"],
                    io_threads=io_threads,
                    serial=self.serial,
                )
                self.vhost.start()
                if self.adopted:
                    self._took_over("its front-end reconnects")
                return
            self.queues = [DeviceQueue(self.region, q) for q in range(c["queues"])]
            assert self.inflight is not None
            for q in self.queues:
                self.resubmitted += self.inflight.attach(q)
                if c["notification_data"]:
                    q.set_notification_data(c["notification_data"], c["nd_reread_ms"])
            self.server = BlockServer(
                self.store,
                self.queues,
                mode=c["mode"],
                io_threads=io_threads,
                serial=self.serial,
                engine=self.io_engine,
            )
            self.server.start()
            if self.adopted:
                for q in self.queues:
                    q.interrupt()  # what the dead daemon published untold
                self._took_over(f"{self.resubmitted} requests in flight run again")
        except BaseException:
            if self._keep_on_error and self.region is not None:
                self.region._unlinked = True  # not ours to remove yet
            self.shutdown(keep_records=self._keep_on_error)
            raise

    def _took_over(self, what: str) -> None:
        assert self.identity is not None
        prev = self.identity.previous_pid
        self.notices.append(
            f"took over {self.name!r} from a daemon that died (pid {prev or 'unknown'}): {what}"
        )

    def _adoptable(self) -> dict[str, Any] | None:
        """The layout record of a device whose daemon died, if this daemon
        can take it over (same options, its region still there); None to
        start afresh, replacing what is left."""
        assert self.identity is not None
        raw = read_record(self.identity, "layout")
        if raw is None or not exists(self.name) or foreign_objects(self.name):
            return None
        try:
            rec = json.loads(raw)
            if rec.get("version") != RECORD_VERSION:
                return None
            old = rec["cfg"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        new = _record_cfg(self.cfg)
        diff = [k for k in LAYOUT_KEYS if old.get(k) != new[k]]
        if diff:
            # Another device was asked for: the old one is replaced.
            self._replacing = f" (it had other options: {', '.join(diff)})"
            return None
        return rec

    def request_stop(self, *_: object) -> None:
        """Make wait() return.  A plain store, safe in a signal handler: an
        Event.set() there would block for ever if the signal came while
        wait() held the Event's lock."""
        self._stop_requested = True

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT/SIGHUP or request_stop()."""
        while not self._stop_requested:
            time.sleep(0.1)

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.request_stop)

    def shutdown(self, keep_records: bool = False) -> None:
        """Finish what is in flight, then unlink everything."""
        if self.vhost is not None:
            self.vhost.close()  # ends the connection, removes the socket
            self.vhost = None
        if self.server is not None:
            self.server.close()  # stops, drains in-flight, joins
            self.server = None
        for q in self.queues:
            q.close()
        self.queues = []
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.region is not None:
            self.region.close()
            self.region = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.identity is not None:
            if not keep_records:
                remove_records(self.identity)
            self.identity.release()  # last: everything of ours is gone
            self.identity = None

    def __enter__(self) -> HostDaemon:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
