"""The slowest request of a mixed random load on disk, with the default
lock: `virtio-emu run --workers 4 --rw randrw --iodepth 4 --strategy
release` against a daemon with its defaults (a fresh, sparse 1 GiB store
on disk), under each I/O engine of the daemon in the same run (io_uring,
one thread per queue, against a thread per outstanding request).  Aim: no
request over 100 ms.

Rounds of the two engines alternate (one daemon each, both up), so a
machine whose load drifts affects both alike.  extra_info has every
round's max, p99 and IOPS; nothing is asserted.  A table is printed at the
end.
"""

import contextlib
import os
import statistics
import tempfile

import pytest

from bench_hostd import CFG as HOSTD_CFG
from bench_hostd import environment
from benchutil import print_report, unique_name
from virtio_py import limits
from virtio_py.compare import DaemonProcess
from virtio_py.workload import JobSpec, run_job

ROUNDS = 5
RUNTIME = 5.0
ENGINES = ("threads", "uring")
# bench_hostd's disk daemon, on the default lock.
CFG = dict(HOSTD_CFG, mode="notify", lock=limits.LOCK_DEFAULT)
RESULTS = {}


@pytest.fixture(scope="module")
def daemons(request):
    """engine -> a running daemon on its own fresh disk store."""
    with contextlib.ExitStack() as stack:
        out = {}
        for engine in ENGINES:
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"vpb{os.getpid()}-rw-"))
            dp = DaemonProcess(unique_name(f"randrw-{engine}"), d, CFG)
            with environment({"VIRTIO_PY_IO_ENGINE": engine}):
                stack.enter_context(dp)
            out[engine] = dp
        yield out
    print_report(request, _report())


def test_randrw_iodepth4_max_latency(benchmark, daemons):
    runs = {e: [] for e in ENGINES}
    turn = iter(range(10**6))

    def one_round():
        # Engines alternate within each timed round.
        for engine in ENGINES if next(turn) % 2 == 0 else ENGINES[::-1]:
            res = run_job(
                JobSpec(
                    daemons[engine].name,
                    workers=4,
                    rw="randrw",
                    iodepth=4,
                    runtime=RUNTIME,
                    strategy="release",
                )
            )
            if res["errors"]:
                pytest.fail(f"{res['errors']} requests failed")
            runs[engine].append(res)

    benchmark.group = "randrw-max-latency"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    for engine, rs in runs.items():
        RESULTS[engine] = {
            "max_us": [r["latency_us"]["max"] for r in rs],
            "p99_us": [r["latency_us"]["p99"] for r in rs],
            "iops": [round(r["iops"]) for r in rs],
            "cpu_us_per_request": [
                round(r["host_cpu_us_per_request"] + r["guest_cpu_us_per_request"], 2) for r in rs
            ],
        }
        benchmark.extra_info[engine] = RESULTS[engine]


def _report():
    if not RESULTS:
        return None
    lines = [
        "",
        f"randrw, 4 workers x iodepth 4, strategy release, lock {CFG['lock']}, disk, "
        f"{ROUNDS} x {RUNTIME:.0f} s per engine:",
        f"  {'engine':<8} {'max ms (rounds)':<40} {'p99 ms (median)':>15} {'IOPS (median)':>13}",
    ]
    for engine, r in RESULTS.items():
        mx = " ".join(f"{v / 1000:.1f}" for v in r["max_us"])
        lines.append(
            f"  {engine:<8} {mx:<40} {statistics.median(r['p99_us']) / 1000:>15.2f} "
            f"{statistics.median(r['iops']):>13.0f}"
        )
    return "\n".join(lines)
