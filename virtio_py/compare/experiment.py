"""The experiment's run loop: for each row its own device on a temporary
store, every strategy run repeat times, interleaved, and the repeats
combined.  The device is our daemon, a qemu-storage-daemon serving the
store's one stripe as a raw file, or a running vhost-user back-end; for the
last two this process is the vhost-user front-end.  Everything it starts
is stopped and unlinked at the end, on error, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from .. import limits
from ..console import Progress, sigterm_as_interrupt
from ..cpus import format_cpus
from ..errors import ConfigError
from ..qsd import QsdProcess, qsd_path
from ..region import check_name
from ..store import prewrite, stripe_path
from ..units import format_size
from ..workload import JobSpec, describe, run_job
from .config import (
    BASE,
    ND_DEVICES,
    STRATEGY_ORDER,
    VHOST_USER_BASE,
    check_vhost_user_row,
    parse_device,
    parse_row,
    resolve,
    variants,
)
from .daemon import DaemonProcess
from .results import add_changes, combine


class Stores:
    """Temporary store directories, one per kind (disk under workdir, shm in
    /dev/shm), shared by the rows of a run and removed by the exit stack.
    Disk stores get their read area written once."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        prefix: str,
        workdir: str | None = None,
        note: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.stack = stack
        self.prefix = prefix
        self.workdir = workdir
        self.note = note
        self.dirs: dict[str, dict[str, Any]] = {}

    def get(self, cfg: Mapping[str, Any]) -> str:
        """The store directory for cfg's kind, created (and prewritten) once."""
        kind = cfg["store"]
        if kind not in ("disk", "shm"):
            raise ConfigError(f"store must be one of disk, shm, not {kind!r}")
        if kind not in self.dirs:
            parent = "/dev/shm" if kind == "shm" else self.workdir
            td = self.stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f"{self.prefix}{os.getpid()}-store-", dir=parent)
            )
            self.dirs[kind] = {"dir": td, "written": 0, "layout": None}
        store = self.dirs[kind]
        layout = (cfg["stripes"], cfg["chunk"], cfg["size"])
        if store["layout"] not in (None, layout):
            raise ConfigError("every row must use the same store layout")
        store["layout"] = layout
        need = cfg["workers"] * cfg["area"]
        if kind == "disk" and cfg["prewrite"] and store["written"] < need:
            self.note(
                f"virtio-emu compare: writing {format_size(need)} of the store once "
                f"(reads of holes would never reach the disk)"
            )
            prewrite(store["dir"], cfg["stripes"], cfg["chunk"], need)
            store["written"] = need
        return str(store["dir"])


def annotate(
    res: dict[str, Any], label: str, cfg: Mapping[str, Any], daemon: Any
) -> dict[str, Any]:
    """Add the row label and the setup's configuration to a run's result.
    daemon: what served it (anything with a pid; None: a running back-end)."""
    res["row"] = label
    if cfg.get("store") is not None:
        keys = ("store", "stripes", "chunk", "prewrite", "area")
        res["config"].update({k: cfg[k] for k in keys})
        res["config"]["disk_size"] = cfg["size"]
    else:
        res["config"]["area"] = cfg["area"]
    if daemon is not None:
        res["config"]["daemon_pid"] = daemon.pid
    if cfg.get("served_by"):
        res["config"]["served_by"] = cfg["served_by"]
    res["config"]["placed"] = bool(cfg.get("placed"))
    if cfg.get("cpus"):
        res["config"]["daemon_cpus"] = format_cpus(cfg["cpus"])
    return res


def qsd_version() -> str:
    """'qemu-storage-daemon 7.2.22', or the bare name."""
    import subprocess

    binary = qsd_path()
    if binary is None:
        raise ConfigError("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        words = out.stdout.split()
        return f"qemu-storage-daemon {words[2]}" if len(words) > 2 else "qemu-storage-daemon"
    except (OSError, subprocess.SubprocessError):
        return "qemu-storage-daemon"


def raw_image(store_dir: str, size: int) -> str:
    """The store's one stripe as a raw image of size bytes (sparse beyond
    what was written): a one-stripe store is a plain raw file."""
    path = stripe_path(store_dir, 0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def open_device(
    stack: contextlib.ExitStack,
    kind: str,
    path: str | None,
    name: str,
    cfg: Mapping[str, Any],
    store: str | None,
    sock_dir: str | None,
) -> tuple[Any, Any]:
    """Start a row's device on stack: (what serves it, the vhost-user device
    or None).  native: our daemon on the store directory; qsd:
    qemu-storage-daemon on store, a raw image, then our front-end on it;
    vhost-user: our front-end on path."""
    if kind == "native":
        assert store is not None
        return stack.enter_context(DaemonProcess(name, store, cfg)), None
    from ..vhost_front import VhostUserDisk

    server = None
    if kind == "qsd":
        assert store is not None and sock_dir is not None
        path = os.path.join(sock_dir, f"{name}.sock")
        server = stack.enter_context(QsdProcess(store, path, num_queues=cfg["queues"]))
    assert path is not None
    disk = stack.enter_context(
        VhostUserDisk.open(
            path,
            name=name,
            queues=cfg["queues"],
            queue_size=cfg["queue_size"],
            lock=cfg["lock"],
            event_idx=cfg["event_idx"],
            exit_cost_us=cfg["exit_cost_us"],
        )
    )
    return server, disk


def compare(
    rows: Iterable[str] = ("",),
    runtime: float = 3.0,
    strategies: Sequence[str] = STRATEGY_ORDER,
    base: Mapping[str, Any] | None = None,
    name_prefix: str = "vpc",
    workdir: str | None = None,
    progress_stream: IO[str] | None = None,
    verbose: bool = True,
    repeat: int = 3,
    device: str = "native",
    notification_data: bool = False,
) -> dict[str, Any]:
    """Run every row (a configuration) repeat times per strategy, the
    strategies interleaved; returns {"runs": [...]} with one entry per row
    and strategy whose figures are medians over the repeats (every repeat
    is kept under "repeats").  Every parameter is checked before anything
    starts.

    device: "native" (our daemon), "qsd" (qemu-storage-daemon on a raw file
    of the store's size) or "vhost-user:PATH" (a back-end listening at
    PATH).  On a vhost-user device every row exits async (the base row
    too): its kick is an eventfd write; exit_cost_us models the trap.

    notification_data: every row runs once per device behaviour (trust,
    reread) with VIRTIO_F_NOTIFICATION_DATA, and the trusting device's
    rows also with each driver remedy (native device only)."""
    limits.REPEAT.check(repeat)
    limits.RUNTIME.check(runtime)
    kind, path = parse_device(device)
    vhost = kind != "native"
    base = dict(BASE, **(VHOST_USER_BASE if vhost else {}), **(base or {}))
    if kind == "qsd":
        base["stripes"] = 1  # one raw file: a one-stripe store is exactly that
    parsed = [parse_row(r) for r in rows]
    if notification_data:
        if vhost:
            raise ConfigError(
                "--notification-data: the doorbell is the native transport's (device native)"
            )
        parsed = [
            (f"{label}+nd={nd}" if label else f"nd={nd}", dict(over, notification_data=nd))
            for label, over in parsed
            for nd in ND_DEVICES
        ]
    if vhost:
        check_vhost_user_row("", {k: base[k] for k in ("exit", "mode")}, kind)
        for label, over in parsed:
            check_vhost_user_row(label, over, kind)
    plans = [(label, resolve(base, over)) for label, over in parsed]
    served_by = None
    if kind == "qsd":
        served_by = qsd_version() + " (vhost-user)"
    elif kind == "vhost-user":
        served_by = f"vhost-user {path}"
    for _, cfg in plans:
        if served_by:
            cfg["served_by"] = served_by
        if kind == "vhost-user":
            cfg["store"] = None
    for s in strategies:
        limits.STRATEGY.check(s)
    for _, cfg in plans:
        JobSpec("x", workers=cfg["workers"], rw=cfg["rw"], bs=cfg["bs"], iodepth=cfg["iodepth"],
                runtime=runtime, size=cfg["area"], engine=cfg["engine"]).check()  # fmt: skip
        if cfg["workers"] * cfg["area"] > cfg["size"]:
            raise ConfigError(
                f"{cfg['workers']} workers x area {cfg['area']} exceed the disk size {cfg['size']}"
            )
    prog = Progress(progress_stream or sys.stderr)
    note = prog.note if verbose else (lambda text: None)
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack, sigterm_as_interrupt():
        stack.callback(prog.clear)
        stores = Stores(stack, name_prefix, workdir, note)
        sock_dir = None
        if kind == "qsd":
            # Short: a socket path has at most 107 bytes.
            sock_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f"{name_prefix}{os.getpid()}-sock-")
            )
        if vhost:
            note(
                f"virtio-emu compare: device {served_by}: every row exits async (a vhost-user "
                f"kick is an eventfd write, not the native default's sync exit), "
                f"+{base['exit_cost_us']:g} us per kick (--exit-cost) for the trap"
            )
        for n, (label, cfg) in enumerate(plans):
            name = check_name(f"{name_prefix}{os.getpid()}-{n}")
            store = None
            if cfg["store"] is not None:
                store = stores.get(cfg)
                if kind == "qsd":
                    store = raw_image(store, cfg["size"])
            note(f"virtio-emu compare: {label or 'RFC setup'}: {describe(cfg)}")
            with contextlib.ExitStack() as row:
                daemon, disk = open_device(row, kind, path, name, cfg, store, sock_dir)
                runs_of_row = variants(strategies, cfg["notification_data"])
                reps: dict[str, list[dict[str, Any]]] = {v: [] for v, _, _ in runs_of_row}
                for rep in range(repeat):
                    for variant, strategy, remedy in runs_of_row:
                        spec = JobSpec(name, workers=cfg["workers"], rw=cfg["rw"], bs=cfg["bs"],
                                       iodepth=cfg["iodepth"], runtime=runtime, size=cfg["area"],
                                       strategy=strategy, engine=cfg["engine"],
                                       nd_remedy=remedy, cpus=cfg["worker_cpus"],
                                       halt_poll_us=cfg["halt_poll_us"])  # fmt: skip
                        tag = f" [{rep + 1}/{repeat}]" if repeat > 1 else ""
                        res = run_job(
                            spec,
                            progress=prog,
                            label=f"{label or 'rfc'} {variant}{tag}",
                            device=disk,
                        )
                        annotate(res, label, cfg, daemon)
                        if variant != strategy:
                            # A remedy's run: its own row of the tables.
                            res["kick_strategy"] = strategy
                            res["strategy"] = variant
                        reps[variant].append(res)
                        prog.clear()
                        note(
                            f"  {variant:<8}{tag} {res['iops']:>10,.0f} IOPS  holdtime-max "
                            f"{res['lockstat']['holdtime-max']:>10.2f} us  waittime-total "
                            f"{res['lockstat']['waittime-total']:>12.2f} us"
                        )
                runs += [combine(reps[v]) for v, _, _ in runs_of_row]
    add_changes(runs)
    return {
        "runs": runs,
        "runtime": runtime,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "base": dict(base),
        "device": device,
    }
