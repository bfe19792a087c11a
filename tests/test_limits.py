"""Every configuration limit is refused the same way by every entry point
that takes the parameter: the Python API raises ConfigError with the limit's
one-line message, and both command lines print that message on one line of
stderr and exit non-zero, before anything is created.

Ring limits and device minimums differ on purpose: a ring of one descriptor
is a valid layout, a virtio-blk queue needs two.
"""

import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from host_daemon import HostDaemon
from virtio_py import ConfigError, Region, limits, vring_size
from virtio_py.compare import compare
from virtio_py.store import StripedStore, assemble
from virtio_py.workload import JobSpec

EMU = [sys.executable, "-m", "virtio_py"]
HOSTD = [sys.executable, "-m", "host_daemon"]


@dataclass
class Where:
    """What one check runs in: the device name, a store directory that must
    not come to exist, and scratch space."""

    name: str
    store: str
    tmp: str


# ---- the Python entry points: each gets (where, value) and must raise


def region(param):
    return lambda w, v: Region.create(w.name, **{param: v})


def daemon(param):
    def call(w, v):
        kw = {"stripes": 2, "chunk": 4096, param: v}
        size = kw.pop("size", 8 << 20)
        HostDaemon(w.name, w.store, size, **kw)

    return call


def store(param):
    def call(w, v):
        kw = {"size": 1 << 20, "stripes": 2, "chunk": 4096, param: v}
        StripedStore(w.store, **kw)

    return call


def assembled(param):
    def call(w, v):
        kw = {"stripes": 2, "chunk": 4096, "size": 1 << 20, param: v}
        assemble(w.store, f"{w.tmp}/out.img", **kw)

    return call


def job(param):
    return lambda w, v: JobSpec(w.name, **{param: v}).check()


def compared(param=None, row=None, arg=None):
    """compare() with a bad base value, row token or keyword argument."""

    def call(w, v):
        kw = {"rows": ("shm",), "runtime": 0.2, "repeat": 1}
        base = {"size": 64 << 20, "area": 1 << 20}
        if param:
            base[param] = v
        if row:
            kw["rows"] = (f"shm+{row}={v}",)
        if arg:
            kw[arg] = [v] if arg == "strategies" else v
        compare(base=base, name_prefix=w.name, workdir=w.tmp, verbose=False, **kw)

    return call


# ---- the command lines: each gets (where, value as text) and returns argv


def hostd_start(opt):
    return lambda w, t: HOSTD + ["start", "--name", w.name, "--store", w.store, opt, t]


def hostd_assemble(opt):
    def argv(w, t):
        geometry = {"--stripes": "2", "--chunk": "4K", "--size": "1M"}
        geometry[opt] = t
        return (
            HOSTD
            + ["assemble", "--store", w.store, "--out", f"{w.tmp}/out.img"]
            + [x for kv in geometry.items() for x in kv]
        )

    return argv


def emu_run(opt):
    return lambda w, t: EMU + ["run", "--name", w.name, "--quiet", opt, t]


def emu_compare(opt=None, row=None):
    def argv(w, t):
        args = [
            "compare",
            "--name-prefix",
            w.name,
            "--workdir",
            w.tmp,
            "--runtime",
            "0.2",
            "--repeat",
            "1",
            "--size",
            "64M",
            "--area",
            "1M",
            "--no-rfc-row",
            "--quiet",
        ]
        args += ["--row", f"shm+{row}={t}"] if row else ["--shm", opt, t]
        return EMU + args

    return argv


@dataclass
class Case:
    limit: Any
    value: Any
    api: list[Callable] = field(default_factory=list)
    cli: list[Callable] = field(default_factory=list)

    @property
    def id(self):
        return f"{self.limit.name}={self.value!r}"[:40]


L = limits
CASES = [
    Case(
        L.QUEUES,
        17,
        [region("queues"), daemon("queues"), compared(row="queues")],
        [hostd_start("--queues"), emu_compare(row="queues")],
    ),
    Case(
        L.QUEUES,
        0,
        [region("queues"), daemon("queues"), compared(param="queues")],
        [hostd_start("--queues"), emu_compare(row="queues")],
    ),
    Case(L.RING_SIZE, 3, [region("queue_size"), lambda w, v: vring_size(v)]),
    Case(L.RING_SIZE, 65536, [region("queue_size"), lambda w, v: vring_size(v)]),
    Case(L.BLK_QUEUE_SIZE, 1, [daemon("queue_size")], [hostd_start("--queue-size")]),
    Case(L.BLK_QUEUE_SIZE, 65536, [daemon("queue_size")], [hostd_start("--queue-size")]),
    Case(
        L.EXIT_COST_US,
        math.nan,
        [region("exit_cost_us"), daemon("exit_cost_us"), compared(param="exit_cost_us")],
        [hostd_start("--exit-cost"), emu_compare("--exit-cost")],
    ),
    Case(
        L.EXIT_COST_US,
        -1.0,
        [region("exit_cost_us"), daemon("exit_cost_us"), compared(row="exit-cost")],
        [hostd_start("--exit-cost"), emu_compare(row="exit-cost")],
    ),
    Case(
        L.LOCK,
        "ticket",
        [region("lock"), daemon("lock"), compared(param="lock")],
        [hostd_start("--lock"), emu_compare("--lock")],
    ),
    Case(L.EXIT, "maybe", [region("exit"), daemon("exit")], [hostd_start("--exit")]),
    Case(L.MODE, "fast", [region("mode"), daemon("mode")], [hostd_start("--mode")]),
    Case(
        L.STRATEGY,
        "fifo",
        [job("strategy"), compared(arg="strategies")],
        [emu_run("--strategy"), emu_compare("--strategies")],
    ),
    Case(
        L.STRIPES,
        65,
        [daemon("stripes"), store("stripes"), assembled("stripes"), compared(param="stripes")],
        [hostd_start("--stripes"), hostd_assemble("--stripes"), emu_compare("--stripes")],
    ),
    Case(
        L.CHUNK,
        1000,
        [daemon("chunk"), store("chunk"), assembled("chunk"), compared(param="chunk")],
        [hostd_start("--chunk"), hostd_assemble("--chunk"), emu_compare("--chunk")],
    ),
    Case(
        L.CAPACITY,
        1000,
        [daemon("size"), store("size"), assembled("size"), compared("size")],
        [hostd_start("--size"), hostd_assemble("--size"), emu_compare("--size")],
    ),
    Case(L.IO_THREADS, -1, [daemon("io_threads")], [hostd_start("--io-threads")]),
    Case(L.BUFFERS, 4096, [daemon("buffers")], [hostd_start("--buffers")]),
    Case(L.SERIAL, "s" * 21, [daemon("serial")], [hostd_start("--serial")]),
    Case(
        L.WORKERS,
        33,
        [job("workers"), compared(param="workers")],
        [emu_run("--workers"), emu_compare("--workers")],
    ),
    Case(
        L.IODEPTH,
        0,
        [job("iodepth"), compared(param="iodepth")],
        [emu_run("--iodepth"), emu_compare("--iodepth")],
    ),
    Case(L.BS, 1000, [job("bs"), compared(param="bs")], [emu_run("--bs"), emu_compare("--bs")]),
    Case(L.RWMIX_READ, 101, [job("rwmix_read")], [emu_run("--rwmixread")]),
    Case(
        L.RUNTIME,
        math.inf,
        [job("runtime"), compared(arg="runtime")],
        [emu_run("--runtime"), emu_compare("--runtime")],
    ),
    Case(L.VERIFY_SEED, -1, [job("verify_seed")], [emu_run("--verify-seed")]),
    Case(
        L.HALT_POLL_US,
        10_000.5,
        [job("halt_poll_us"), compared(row="halt-poll")],
        [emu_run("--halt-poll-us"), emu_compare(row="halt-poll")],
    ),
    Case(L.OFFSET, 1000, [job("offset")], [emu_run("--offset")]),
    Case(L.REPEAT, 0, [compared(arg="repeat")], [emu_compare("--repeat")]),
    Case(
        L.RW, "sideways", [job("rw"), compared(param="rw")], [emu_run("--rw"), emu_compare("--rw")]
    ),
    Case(
        L.ENGINE,
        "rust",
        [job("engine"), compared(param="engine")],
        [emu_run("--engine"), emu_compare("--engine")],
    ),
]


def shm_of(name):
    return sorted(e for e in os.listdir("/dev/shm") if name in e)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_limit_is_refused_with_one_line_by_every_entry_point(case, name, tmp_path):
    where = Where(name=name, store=str(tmp_path / "store"), tmp=str(tmp_path))
    message = case.limit.message(case.value)
    assert case.api, "every limit has a Python entry point"
    for call in case.api:
        with pytest.raises(ConfigError) as e:
            call(where, case.value)
        assert str(e.value) == message
    for argv in case.cli:
        cmd = argv(where, str(case.value))
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        prog = "virtio-hostd" if cmd[2] == "host_daemon" else "virtio-emu"
        assert p.returncode != 0, p.stdout
        assert p.stdout == ""
        lines = p.stderr.splitlines()
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith(prog) and "error" in lines[0]
        assert message in lines[0], lines[0]
    assert shm_of(name) == []
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "out.img").exists()


def test_a_ring_of_one_is_a_region_but_not_a_blk_device(name, tmp_path):
    """The ring layer lays out a queue of one descriptor; the virtio-blk
    device refuses it (a request needs a header and a status)."""
    assert vring_size(1) > 0
    with Region.create(name, queue_size=1) as r:
        assert r.queue_info(0)["num"] == 1
    with pytest.raises(ConfigError, match="queue size must be a power of two from 2"):
        HostDaemon(name, str(tmp_path / "store"), 8 << 20, queue_size=1)
    assert shm_of(name) == []


@pytest.mark.parametrize(
    "workers,iodepth,queues,start,size",
    [
        (4, 1, 1, 128, 128),  # 12 descriptors fit
        (4, 16, 1, 128, 256),  # 192 need 256
        (4, 16, 4, 128, 128),  # 48 per queue
        (3, 16, 2, 2, 128),  # 2 workers on the busier queue: 96
        (64, 64, 1, 128, 16384),  # 12,288
        (200, 64, 1, 128, limits.BLK_QUEUE_SIZE.hi),  # more than any ring holds: the largest
    ],
)
def test_a_ring_is_sized_for_every_request_in_flight(workers, iodepth, queues, start, size):
    assert limits.queue_size_for(workers, iodepth, queues, start=start) == size
