"""Our daemon against QEMU's device, over the same protocol and the same raw file.

One front-end (this process and its 4 worker processes: random 4 KiB reads,
strategy prepare, event index) drives, in turn, `virtio-hostd start
--vhost-user` and qemu-storage-daemon, all serving one raw file (a
one-stripe store of our daemon is exactly that), written once over the area
the workers read.  qemu-storage-daemon runs twice: as it starts (the export
in its main loop, aio=threads) and tuned (an I/O thread of its own,
aio=io_uring).  Rounds alternate between the back-ends within one test, so a
busy spell of the machine lands on all of them.  Two workloads: 4 workers x
iodepth 1 and 4 x iodepth 16; two places for the file: tmpfs (/dev/shm) and
disk.  Every back-end opens it with O_DIRECT where the filesystem takes it.

Reported (extra_info, the table printed at the end, .benchmarks/vhost_user.json):
IOPS, guest and back-end CPU per request (the back-end's from /proc/PID/stat
of the process at the socket's other end), and our daemon's ratio to each
qemu-storage-daemon.  The aim is an IOPS ratio of at least 1.0; it is not
asserted (a loaded machine must not fail the suite).
"""

import contextlib
import os
import statistics
import tempfile

import pytest

from benchutil import print_report, save_results, unique_name
from virtio_py.compare import DaemonProcess
from virtio_py.limits import queue_size_for
from virtio_py.qsd import QsdProcess, qsd_path
from virtio_py.store import prewrite, stripe_path
from virtio_py.vhost_front import VhostUserDisk
from virtio_py.workload import JobSpec, run_job

SIZE = 1 << 30
AREA = 32 << 20  # per worker, written once
WORKERS = 4
PAIRS = 3  # rounds per back-end, alternating
RUNTIME = 2.0  # seconds a round
# qsd: qemu-storage-daemon as it starts (export in the main loop, aio=threads);
# qsd-iothread: tuned (an I/O thread of its own, aio=io_uring).
BACKENDS = ("hostd", "qsd", "qsd-iothread")
QSD_OPTS = {"qsd": {}, "qsd-iothread": {"iothread": True, "aio": "io_uring"}}
RESULTS = {}  # (place, iodepth) -> {backend: [runs]}


class Hostd(DaemonProcess):
    """`virtio-hostd start --foreground --vhost-user SOCK --stripes 1` on store."""

    def __init__(self, store, sock):
        super().__init__(
            unique_name("vhu"), store, {"size": SIZE, "stripes": 1, "vhost_user": sock}
        )
        self.sock = sock
        self.start()

    def close(self):
        self.stop()


@pytest.fixture(scope="module")
def places(request):
    """Factory: places(place) -> {backend: VhostUserDisk}, both back-ends
    serving one raw file in tmpfs or on disk; everything stopped at the end."""
    if qsd_path() is None:
        pytest.skip("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    with contextlib.ExitStack() as stack:
        made = {}

        def get(place):
            if place not in made:
                parent = "/dev/shm" if place == "tmpfs" else "/var/tmp"
                store = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="vpb-vhu-", dir=parent)
                )
                prewrite(store, 1, 64 << 10, WORKERS * AREA)
                image = stripe_path(store, 0)
                os.truncate(image, SIZE)
                socks = stack.enter_context(tempfile.TemporaryDirectory(prefix="vpb-sock-"))
                hostd = Hostd(store, os.path.join(socks, "hostd.sock"))
                stack.callback(hostd.close)
                socks_of = {"hostd": hostd.sock}
                for kind, opts in QSD_OPTS.items():
                    qsd = QsdProcess(image, os.path.join(socks, f"{kind}.sock"), **opts)
                    socks_of[kind] = stack.enter_context(qsd).sock
                disks = {}
                for kind, sock in socks_of.items():
                    disks[kind] = stack.enter_context(
                        VhostUserDisk.open(
                            sock,
                            name=unique_name(f"fe-{kind}"),
                            queue_size=queue_size_for(WORKERS, 16),
                            event_idx=True,
                        )
                    )
                made[place] = disks
            return made[place]

        yield get
    print_report(request, _report())


@pytest.mark.parametrize("iodepth", [1, 16])
@pytest.mark.parametrize("place", ["tmpfs", "disk"])
def test_hostd_against_qsd(benchmark, places, place, iodepth):
    disks = places(place)
    runs = {b: [] for b in BACKENDS}

    def alternate():
        for _ in range(PAIRS):
            for b in BACKENDS:
                spec = JobSpec(disks[b].name, workers=WORKERS, rw="randread", bs=4096,
                               iodepth=iodepth, size=AREA, runtime=RUNTIME,
                               strategy="prepare")  # fmt: skip
                res = run_job(spec, device=disks[b])
                assert res["errors"] == 0 and res["ios"] > 0
                runs[b].append(res)

    benchmark.group = f"vhost-user-{place}-iodepth{iodepth}"
    benchmark.pedantic(alternate, rounds=1, iterations=1, warmup_rounds=0)
    RESULTS[(place, iodepth)] = runs
    benchmark.extra_info.update(_summary(runs))


def _med(runs, key):
    return statistics.median(r[key] for r in runs)


def _summary(runs):
    out = {}
    for b, rs in runs.items():
        out[b] = {
            "iops": _med(rs, "iops"),
            "iops_rounds": [r["iops"] for r in rs],
            "guest_cpu_us_per_request": _med(rs, "guest_cpu_us_per_request"),
            "backend_cpu_us_per_request": _med(rs, "host_cpu_us_per_request"),
            "latency_p50_us": _med([r["latency_us"] for r in rs], "p50"),
            "kicks_per_request": _med(rs, "kicks_per_request"),
            "interrupts_per_request": _med(rs, "interrupts_per_request"),
        }
    h = out["hostd"]
    for q in BACKENDS[1:]:
        out[q]["hostd_iops_ratio"] = round(h["iops"] / out[q]["iops"], 3)
        cpu = out[q]["backend_cpu_us_per_request"]
        out[q]["hostd_backend_cpu_ratio"] = (
            round(h["backend_cpu_us_per_request"] / cpu, 3) if cpu else None
        )
    return out


def _report():
    if not RESULTS:
        return None
    lines = [
        "",
        "vhost-user back-ends on one raw file (4 workers, randread 4K, prepare, event index;"
        " medians of alternating rounds; ours/x: virtio-hostd against that back-end):",
        f"  {'place':<6} {'iodepth':>7} {'back-end':<13} {'IOPS':>9} {'guest us/req':>13} "
        f"{'back-end us/req':>16} {'p50 us':>8} {'irqs/req':>8} {'ours/x IOPS':>12} "
        f"{'ours/x CPU':>11}",
    ]
    for (place, iodepth), runs in RESULTS.items():
        s = _summary(runs)
        for b in BACKENDS:
            r = s[b]
            ratio = cpu = ""
            if b != "hostd":
                ratio = f"{r['hostd_iops_ratio']:.2f}x"
                if r["hostd_backend_cpu_ratio"] is not None:
                    cpu = f"{r['hostd_backend_cpu_ratio']:.2f}x"
            lines.append(
                f"  {place:<6} {iodepth:>7} {b:<13} {r['iops']:>9.0f} "
                f"{r['guest_cpu_us_per_request']:>13.1f} {r['backend_cpu_us_per_request']:>16.1f} "
                f"{r['latency_p50_us']:>8.1f} {r['interrupts_per_request']:>8.3f} {ratio:>12} "
                f"{cpu:>11}"
            )
    text = "\n".join(lines)
    save_results(
        "vhost_user.json", {f"{p}-iodepth{d}": _summary(runs) for (p, d), runs in RESULTS.items()}
    )
    return text
