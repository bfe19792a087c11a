"""The host daemon against fio on the same stripe files, and what a request
costs: CPU and wake-ups.

- disk: 4 KiB random reads, O_DIRECT, 4 guest worker processes with one
  request outstanding each, through the daemon on a 12-stripe store (64 KiB
  chunks) on disk whose read area was written first (reads of holes never
  reach the disk) -- against fio run directly on the same stripe files with
  the same concurrency (4 jobs, psync, direct=1, the same byte ranges).
  Aim: the daemon reaches >= 0.95 of fio's IOPS.
- shm: the same on a store in /dev/shm (memory speed).  Aim (notify):
  >= 200,000 IOPS and <= 8 us of CPU per request, host and guest together.
- shm, iodepth 16: the same 4 workers with 16 requests each in flight (64
  requests of 3 descriptors: more than the 128-entry ring holds, so workers
  also wait for room).
- placed: the same rows again with the daemon's threads on a CPU of their
  own and the workers on the others (virtio-hostd start --cpus, virtio-emu
  run --cpus: the last CPU for the daemon), as a host runs a VM beside its
  I/O thread; in the same run as the unplaced rows, so their ratio is like
  against like.
- halt poll: a row of each iodepth-1 notify kind again with the workers
  halt polling (virtio-emu run --halt-poll-us 50: a waiting worker polls
  for its completion before it sleeps, its budget adapting to how long
  waits last): in the same run as the sleeping rows beside it.
- one worker, placed: on disk against one fio job, and on /dev/shm, where
  a request costs only the model's round trip (kick, daemon, interrupt):
  the report sets the disk's gap to fio per request beside that round trip.

Disk and shm at iodepth 1 in both serving modes, served the default way
(disk: the io_uring engine; shm: stripe files mapped); bench_engines.py
puts the old way beside it, interleaved.  The guests use the kick
strategy Linux merged (prepare under the lock, notify outside it), event
index on, async exit, and a sleeping lock (mutex): 4 workers with an
interrupt thread each and the daemon oversubscribe the 2 cores, where a
pure spinlock burns the core its holder needs.

Every row reports CPU per request (the daemon's utime + stime of
/proc/PID/stat; the workers' getrusage, interrupt threads included) and
voluntary context switches per request, the guest's and the daemon's: each
is a sleep that a wake-up ended, a count that, unlike time, a loaded machine
barely moves.  The same file runs against an older tree
(PYTHONPATH=/path/to/old/tree): extra_info["tree"] says which one ran, and
BENCH_TAG=NAME saves the table as .benchmarks/hostd-NAME.json.

fio and daemon rounds alternate (fio is the untimed setup of each daemon
round), so a machine whose load drifts affects both alike; extra_info has
both sides' IOPS per round and their ratio.  Nothing is asserted: a loaded
machine must not fail the suite.  A table is printed at the end and kept
in .benchmarks/hostd.json.
"""

import contextlib
import glob
import json
import os
import shutil
import statistics
import subprocess
import tempfile

import pytest

import virtio_py
from benchutil import print_report, save_results, unique_name
from virtio_py.compare import DaemonProcess
from virtio_py.cpus import split_for_device
from virtio_py.store import prewrite, stripe_path
from virtio_py.workload import JobSpec, run_job

ROUNDS = 5
WORKERS = 4
BS = 4096
AREA = 48 << 20  # each worker's (and fio job's) share: 192 MiB in all
IOS = AREA // BS  # per worker and round: one pass over its area
# A pass at memory speed lasts a third of a second, too short to average
# out other work on the machine: those rounds go round the area for 2 s.
ROUND_S = {"shm": 2.0}
# The halt-poll rows' cap (virtio-emu run --halt-poll-us): between QEMU's
# iothread poll-max-ns (32 us) and cpuidle-haltpoll's guest_halt_poll_ns
# (200 us).
HALT_POLL_US = 50
CFG = {
    "size": 1 << 30,
    "stripes": 12,
    "chunk": 64 << 10,
    "queues": 1,
    "queue_size": 128,
    "exit": "async",
    "exit_cost_us": 0.0,
    "lock": "mutex",
    "event_idx": True,
    "io_threads": None,
}
RESULTS = {}
TAG = os.environ.get("BENCH_TAG", "")
# The tree under test: this one, or an older one put first on PYTHONPATH.
TREE = os.path.dirname(os.path.dirname(os.path.abspath(virtio_py.__file__)))


def voluntary_switches(pid):
    """Voluntary context switches of every thread of pid so far: sleeps
    that a wake-up ended (threads that exited are not counted)."""
    n = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        n += int(line.split()[1])
        except OSError:
            pass  # the thread exited meanwhile
    return n


def randread_round(daemon, iodepth, cpus=None, runtime=None, workers=WORKERS, halt_poll_us=0):
    """One round of 4 KiB random reads by workers workers (prepare, on cpus
    if given) on a running daemon: one pass over each worker's area, or
    round it for runtime seconds; the run's result, with the daemon's and
    the guests' voluntary context switches per request."""
    v0 = voluntary_switches(daemon.proc.pid)
    res = run_job(
        JobSpec(
            daemon.name,
            workers=workers,
            rw="randread",
            bs=BS,
            iodepth=iodepth,
            size=AREA,
            strategy="prepare",
            cpus=cpus,
            runtime=runtime,
            halt_poll_us=halt_poll_us,
        )
    )
    v1 = voluntary_switches(daemon.proc.pid)
    if res["errors"]:
        pytest.fail(f"{res['errors']} requests failed")
    n = max(res["ios"], 1)
    res["host_vcs_per_request"] = round((v1 - v0) / n, 3)
    res["guest_vcs_per_request"] = round(
        sum(w["ctx_switches_voluntary"] for w in res["workers"]) / n, 3
    )
    return res


def ensure_fio():
    """fio, installed from Debian if missing (as `make bench` does)."""
    if not shutil.which("fio"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "fio"], check=False)
    exe = shutil.which("fio")
    if not exe:
        pytest.fail("fio is not installed and `apt-get install -y fio` did not install it")
    return exe


def stripe_files(store):
    return [stripe_path(store, i) for i in range(CFG["stripes"])]


@contextlib.contextmanager
def environment(env):
    """os.environ with env set, restored after (a daemon started inside
    inherits it: $VIRTIO_PY_IO_ENGINE, $VIRTIO_PY_STORE_MAP)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def direct_works(directory):
    """tmpfs takes O_DIRECT since Linux 6.6; fio must not ask for it before."""
    try:
        fd = os.open(stripe_path(directory, 0), os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def fio_randread(fio, store, ios_per_job, direct=True, jobs=WORKERS):
    """fio on the stripe files: jobs jobs (as many as workers), psync, one
    I/O outstanding each, over the bytes 4 workers read (the first AREA*4/12
    of every stripe)."""
    per_file = WORKERS * AREA // CFG["stripes"]
    args = [
        fio,
        "--name=hostd-ref",
        "--filename=" + ":".join(stripe_files(store)),
        f"--filesize={per_file}",
        "--rw=randread",
        f"--bs={BS}",
        f"--direct={int(direct)}",
        "--ioengine=psync",
        "--iodepth=1",
        f"--numjobs={jobs}",
        f"--number_ios={ios_per_job}",
        "--file_service_type=random",
        "--norandommap",
        "--randrepeat=0",
        "--group_reporting",
        "--output-format=json",
    ]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.fail(f"fio failed: {p.stderr.strip() or p.stdout[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{") :])["jobs"][0]
    return {
        "iops": job["read"]["iops"],
        "usr_cpu_pct": job["usr_cpu"],
        "sys_cpu_pct": job["sys_cpu"],
    }


def placement(placed):
    """(daemon's CPUs, workers' CPUs): split_for_device()'s when placed,
    else (None, None): anywhere."""
    if not placed:
        return None, None
    split = split_for_device()
    if split is None:
        pytest.skip("one CPU: no CPU of its own for the daemon")
    return split


@pytest.fixture(scope="module")
def bed(request):
    """Factory: bed(kind, mode, placed) -> (daemon, store dir, fio); one
    store per kind (its read area written once), served by one daemon at a
    time (a store takes one daemon): a daemon of another mode or placement
    is stopped first."""
    fio = ensure_fio()
    with contextlib.ExitStack() as stack:
        stores, daemons = {}, {}

        def get(kind, mode, placed=False):
            if kind not in stores:
                parent = "/dev/shm" if kind == "shm" else None
                d = stack.enter_context(
                    tempfile.TemporaryDirectory(
                        prefix=f"vpb{os.getpid()}-hostd-{kind}-", dir=parent
                    )
                )
                prewrite(d, CFG["stripes"], CFG["chunk"], WORKERS * AREA)
                stores[kind] = d
            cur = daemons.get(kind)
            if cur is None or cur[0] != (mode, placed):
                if cur is not None:
                    cur[1].stop()
                dp = DaemonProcess(
                    unique_name(f"hostd-{kind}-{mode}"),
                    stores[kind],
                    dict(CFG, mode=mode, cpus=placement(placed)[0]),
                )
                stack.enter_context(dp)
                daemons[kind] = ((mode, placed), dp)
            return daemons[kind][1], stores[kind], fio

        yield get
    print_report(request, _report())


def _bench(benchmark, bed, kind, mode, iodepth=1, placed=False, workers=WORKERS, halt_poll_us=0):
    guest_cpus = placement(placed)[1]
    daemon, store, fio = bed(kind, mode, placed)
    runs, refs = [], []
    direct = direct_works(store)

    def fio_round():
        refs.append(fio_randread(fio, store, IOS, direct, jobs=workers))

    def daemon_round():
        runs.append(
            randread_round(daemon, iodepth, guest_cpus, ROUND_S.get(kind), workers, halt_poll_us)
        )

    benchmark.group = (
        f"hostd-{kind}"
        + (f"-iodepth{iodepth}" if iodepth > 1 else "")
        + (f"-workers{workers}" if workers != WORKERS else "")
        + ("-haltpoll" if halt_poll_us else "")
    )
    # fio's reference is psync at iodepth 1: no match for a deeper queue.
    setup = fio_round if iodepth == 1 else None
    benchmark.pedantic(daemon_round, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    iops = [r["iops"] for r in runs]
    fio_iops = [round(f["iops"], 1) for f in refs]
    fio_med = statistics.median(fio_iops) if refs else None
    cpu = [r["host_cpu_us_per_request"] for r in runs]
    both = [r["host_cpu_us_per_request"] + r["guest_cpu_us_per_request"] for r in runs]
    med = {
        "tree": TREE,
        "kind": kind,
        "mode": mode,
        "iodepth": iodepth,
        "placed": placed,
        "workers": workers,
        "halt_poll_us": halt_poll_us,
        "halt_polled_per_request": statistics.median(
            r["wakeups"]["halt_polled_per_request"] for r in runs
        ),
        "iops": statistics.median(iops),
        "fio_iops": fio_med,
        "ratio": round(statistics.median(iops) / fio_med, 3) if refs else None,
        "ratio_rounds": [round(a / b, 3) for a, b in zip(iops, fio_iops)],
        # A closed loop's time per request and worker (fio's too): their
        # difference is what the device path adds to every request.
        "period_us": round(workers * iodepth * 1e6 / statistics.median(iops), 2),
        "fio_period_us": round(workers * 1e6 / fio_med, 2) if refs else None,
        "host_cpu_us_per_request": statistics.median(cpu),
        "guest_cpu_us_per_request": statistics.median(r["guest_cpu_us_per_request"] for r in runs),
        "cpu_us_per_request": round(statistics.median(both), 2),
        "cpu_us_rounds": [round(c, 2) for c in both],
        "host_vcs_per_request": statistics.median(r["host_vcs_per_request"] for r in runs),
        "guest_vcs_per_request": statistics.median(r["guest_vcs_per_request"] for r in runs),
        "queue_full_per_request": statistics.median(
            r["queue_full"] / max(r["ios"], 1) for r in runs
        ),
        "latency_us": sorted(runs, key=lambda r: r["iops"])[len(runs) // 2]["latency_us"],
        "kicks_per_request": statistics.median(r["kicks_per_request"] for r in runs),
        "interrupts_per_request": statistics.median(r["interrupts_per_request"] for r in runs),
        "iops_rounds": iops,
        "fio_iops_rounds": fio_iops,
        "host_cpu_us_rounds": cpu,
        "fio_cpu_pct": refs[-1]["usr_cpu_pct"] + refs[-1]["sys_cpu_pct"] if refs else None,
        "fio_direct": direct,
        "config": dict(
            CFG,
            mode=mode,
            store=kind,
            workers=workers,
            bs=BS,
            iodepth=iodepth,
            area=AREA,
            strategy="prepare",
            rw="randread",
            halt_poll_us=halt_poll_us,
        ),
    }
    benchmark.extra_info.update({k: v for k, v in med.items() if k != "config"})
    RESULTS[(kind, mode, iodepth, placed, workers, halt_poll_us)] = med
    return med


@pytest.mark.parametrize("mode", ["notify", "poll"])
def test_disk_randread_4k_vs_fio(benchmark, bed, mode):
    _bench(benchmark, bed, "disk", mode)


def test_disk_randread_4k_vs_fio_placed(benchmark, bed):
    _bench(benchmark, bed, "disk", "notify", placed=True)


def test_disk_randread_4k_vs_fio_placed_halt_poll(benchmark, bed):
    _bench(benchmark, bed, "disk", "notify", placed=True, halt_poll_us=HALT_POLL_US)


@pytest.mark.parametrize("mode", ["notify", "poll"])
def test_shm_randread_4k(benchmark, bed, mode):
    _bench(benchmark, bed, "shm", mode)


def test_shm_randread_4k_halt_poll(benchmark, bed):
    _bench(benchmark, bed, "shm", "notify", halt_poll_us=HALT_POLL_US)


def test_shm_randread_4k_placed(benchmark, bed):
    _bench(benchmark, bed, "shm", "notify", placed=True)


def test_shm_randread_4k_placed_halt_poll(benchmark, bed):
    _bench(benchmark, bed, "shm", "notify", placed=True, halt_poll_us=HALT_POLL_US)


def test_disk_randread_4k_vs_fio_one_worker_placed(benchmark, bed):
    """One worker against one fio job: what the device path adds to a
    request, with nothing else on the worker's CPU."""
    _bench(benchmark, bed, "disk", "notify", placed=True, workers=1)


def test_shm_round_trip_one_worker_placed(benchmark, bed):
    """The model's own cost of a request (kick, daemon, interrupt) with a
    store that costs nothing: 1 worker, memory store, placed."""
    _bench(benchmark, bed, "shm", "notify", placed=True, workers=1)


def test_shm_randread_4k_iodepth16(benchmark, bed):
    _bench(benchmark, bed, "shm", "notify", iodepth=16)


def test_shm_randread_4k_iodepth16_placed(benchmark, bed):
    _bench(benchmark, bed, "shm", "notify", iodepth=16, placed=True)


def _floor_lines():
    """The disk's gap to fio per request beside the model's round trip at
    memory speed (both placed, 1 worker), and what 0.95 x fio leaves."""
    trip = RESULTS.get(("shm", "notify", 1, True, 1, 0))
    if trip is None:
        return []
    lines = [
        f"  a request's round trip through the model (1 worker, /dev/shm, placed): "
        f"{trip['period_us']:.1f} us"
    ]
    for workers in (1, WORKERS):
        disk = RESULTS.get(("disk", "notify", 1, True, workers, 0))
        if disk is None or disk["fio_period_us"] is None:
            continue
        gap = disk["period_us"] - disk["fio_period_us"]
        lines.append(
            f"  disk, {workers} worker(s), placed: {disk['period_us']:.1f} us per request "
            f"against fio's {disk['fio_period_us']:.1f}: {gap:.1f} us more "
            f"({gap / trip['period_us']:.2f} of the round trip); 0.95 x fio allows "
            f"{disk['fio_period_us'] / 0.95 - disk['fio_period_us']:.1f} us"
        )
    return lines


def _report():
    if not RESULTS:
        return None
    lines = [
        "",
        f"host daemon vs fio ({TREE}): 4 KiB random reads (wk: workers), "
        "12 stripes x 64 KiB (median of rounds)",
        f"  {'store':<5} {'mode':<7} {'placed':<6} {'poll':>4} {'wk':>2} {'depth':>5} "
        f"{'daemon IOPS':>11} "
        f"{'fio IOPS':>9} "
        f"{'ratio':>6} {'host us/req':>11} {'guest us/req':>12} {'vcs/req host':>12} "
        f"{'guest':>6} {'p50 us':>7} {'p99 us':>7}",
    ]
    for (kind, mode, depth, placed, workers, hp), r in RESULTS.items():
        lat = r["latency_us"]
        fio = ratio = "-"
        if r["ratio"] is not None:
            fio, ratio = f"{r['fio_iops']:.0f}", f"{r['ratio']:.2f}"
        lines.append(
            f"  {kind:<5} {mode:<7} {'yes' if placed else 'no':<6} {hp or '-':>4} {workers:>2} "
            f"{depth:>5} "
            f"{r['iops']:>11.0f} {fio:>9} "
            f"{ratio:>6} {r['host_cpu_us_per_request']:>11.1f} "
            f"{r['guest_cpu_us_per_request']:>12.1f} {r['host_vcs_per_request']:>12.2f} "
            f"{r['guest_vcs_per_request']:>6.2f} {lat['p50']:>7.1f} {lat['p99']:>7.1f}"
        )
    lines += _floor_lines()
    text = "\n".join(lines)
    save_results(
        f"hostd-{TAG}.json" if TAG else "hostd.json", {"tree": TREE, "runs": list(RESULTS.values())}
    )
    return text
