"""The experiment's run loop: for each row its own daemon on a temporary
store, every strategy run repeat times, interleaved, and the repeats
combined.  Everything it starts is stopped and unlinked at the end, on
error, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

from .. import limits
from ..console import Progress, sigterm_as_interrupt
from ..errors import ConfigError
from ..region import check_name
from ..store import prewrite
from ..units import format_size
from ..workload import JobSpec, describe, run_job
from .config import BASE, STRATEGY_ORDER, parse_row, resolve
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
    res: dict[str, Any], label: str, cfg: Mapping[str, Any], daemon: DaemonProcess
) -> dict[str, Any]:
    """Add the row label and the setup's configuration to a run's result."""
    res["row"] = label
    res["config"].update({k: cfg[k] for k in ("store", "stripes", "chunk", "prewrite", "area")})
    res["config"]["disk_size"] = cfg["size"]
    res["config"]["daemon_pid"] = daemon.pid
    return res


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
) -> dict[str, Any]:
    """Run every row (a configuration) repeat times per strategy, the
    strategies interleaved; returns {"runs": [...]} with one entry per row
    and strategy whose figures are medians over the repeats (every repeat
    is kept under "repeats").  Every parameter is checked before anything
    starts."""
    limits.REPEAT.check(repeat)
    limits.RUNTIME.check(runtime)
    base = dict(BASE, **(base or {}))
    plans = [(label, resolve(base, over)) for label, over in (parse_row(r) for r in rows)]
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
        for n, (label, cfg) in enumerate(plans):
            name = check_name(f"{name_prefix}{os.getpid()}-{n}")
            store_dir = stores.get(cfg)
            note(f"virtio-emu compare: {label or 'RFC setup'}: {describe(cfg)}")
            with DaemonProcess(name, store_dir, cfg) as daemon:
                reps: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
                for rep in range(repeat):
                    for strategy in strategies:
                        spec = JobSpec(name, workers=cfg["workers"], rw=cfg["rw"], bs=cfg["bs"],
                                       iodepth=cfg["iodepth"], runtime=runtime, size=cfg["area"],
                                       strategy=strategy, engine=cfg["engine"])  # fmt: skip
                        tag = f" [{rep + 1}/{repeat}]" if repeat > 1 else ""
                        res = run_job(
                            spec, progress=prog, label=f"{label or 'rfc'} {strategy}{tag}"
                        )
                        annotate(res, label, cfg, daemon)
                        reps[strategy].append(res)
                        prog.clear()
                        note(
                            f"  {strategy:<8}{tag} {res['iops']:>10,.0f} IOPS  holdtime-max "
                            f"{res['lockstat']['holdtime-max']:>10.2f} us  waittime-total "
                            f"{res['lockstat']['waittime-total']:>12.2f} us"
                        )
                runs += [combine(reps[s]) for s in strategies]
    add_changes(runs)
    return {
        "runs": runs,
        "runtime": runtime,
        "repeat": repeat,
        "cpus": os.cpu_count(),
        "base": dict(base),
    }
