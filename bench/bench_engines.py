"""The old way against the new, interleaved round by round in one run, so a
machine whose load drifts (other work on 2 cores) affects both alike:

- disk: the daemon's I/O engine, a thread per outstanding request
  ("threads") against io_uring, one thread per queue ("uring"), with fio
  on the same stripe files in the same rounds at iodepth 1;
- /dev/shm: the memory store through read and write calls ("rw") against
  its stripe files mapped ("map").

4 workers x 4 KiB random reads as in bench_hostd.py (same configuration:
prepare, event index, async exit, mutex), at iodepth 1 and 16.  Each
comparison keeps both daemons up (one store each) and runs ROUNDS pairs,
the order flipping every pair; the ratio is taken per pair and reported
as its median and range.  Nothing is asserted.  A table is printed at the
end and kept in .benchmarks/engines.json.
"""

import contextlib
import os
import statistics
import tempfile

import pytest

from bench_hostd import (
    AREA,
    CFG,
    IOS,
    WORKERS,
    direct_works,
    ensure_fio,
    environment,
    fio_randread,
    randread_round,
)
from benchutil import print_report, save_results, unique_name
from virtio_py.compare import DaemonProcess
from virtio_py.store import prewrite

ROUNDS = 5
COMPARISONS = {
    # kind: (old, new, environment variable, {variant: value})
    "disk": ("threads", "uring", "VIRTIO_PY_IO_ENGINE"),
    "shm": ("rw", "map", "VIRTIO_PY_STORE_MAP"),
}
VALUE = {"threads": "threads", "uring": "uring", "rw": "0", "map": "1"}
RESULTS = {}


@pytest.fixture(scope="module")
def beds(request):
    """kind -> {variant: (daemon, store)}: both variants' daemons up, each
    on its own store whose read area was written once."""
    ensure_fio()
    with contextlib.ExitStack() as stack:
        made = {}

        def get(kind):
            if kind in made:
                return made[kind]
            old, new, var = COMPARISONS[kind]
            out = {}
            for variant in (old, new):
                d = stack.enter_context(
                    tempfile.TemporaryDirectory(
                        prefix=f"vpb{os.getpid()}-eng-{variant}-",
                        dir="/dev/shm" if kind == "shm" else None,
                    )
                )
                prewrite(d, CFG["stripes"], CFG["chunk"], WORKERS * AREA)
                dp = DaemonProcess(unique_name(f"eng-{variant}"), d, dict(CFG, mode="notify"))
                with environment({var: VALUE[variant]}):
                    stack.enter_context(dp)
                out[variant] = (dp, d)
            made[kind] = out
            return out

        yield get
    print_report(request, _report())


def _round(daemon, iodepth):
    res = randread_round(daemon, iodepth)
    return {
        "iops": res["iops"],
        "cpu_us": res["host_cpu_us_per_request"] + res["guest_cpu_us_per_request"],
        "host_cpu_us": res["host_cpu_us_per_request"],
        "host_vcs": res["host_vcs_per_request"],
        "p99_us": res["latency_us"]["p99"],
    }


def _load():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


@pytest.mark.parametrize("iodepth", [1, 16])
@pytest.mark.parametrize("kind", ["disk", "shm"])
def test_old_and_new_way_interleaved(benchmark, beds, kind, iodepth):
    old, new, _ = COMPARISONS[kind]
    bed = beds(kind)
    fio = ensure_fio()
    rounds = {old: [], new: []}
    fio_iops, loads = [], []
    turn = iter(range(10**6))

    def one_pair():
        loads.append(_load())
        order = (old, new) if next(turn) % 2 == 0 else (new, old)
        for variant in order:
            dp, store = bed[variant]
            if kind == "disk" and iodepth == 1:
                # fio on this variant's files, just before it: the same disk, the same moment.
                fio_iops.append(
                    (variant, fio_randread(fio, store, IOS, direct_works(store))["iops"])
                )
            rounds[variant].append(_round(dp, iodepth))

    benchmark.group = f"engines-{kind}-iodepth{iodepth}"
    benchmark.pedantic(one_pair, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    ratio = [b["iops"] / a["iops"] for a, b in zip(rounds[old], rounds[new])]
    cpu_ratio = [b["cpu_us"] / a["cpu_us"] for a, b in zip(rounds[old], rounds[new])]
    r = {
        "kind": kind,
        "iodepth": iodepth,
        "old": old,
        "new": new,
        "load": loads,
        "iops_ratio_pairs": [round(x, 3) for x in ratio],
        "cpu_ratio_pairs": [round(x, 3) for x in cpu_ratio],
    }
    for variant in (old, new):
        rs = rounds[variant]
        r[variant] = {
            "iops": [round(x["iops"]) for x in rs],
            "cpu_us_per_request": [round(x["cpu_us"], 2) for x in rs],
            "host_cpu_us_per_request": [round(x["host_cpu_us"], 2) for x in rs],
            "host_vcs_per_request": [round(x["host_vcs"], 3) for x in rs],
            "p99_us": [x["p99_us"] for x in rs],
        }
        fv = [f for v, f in fio_iops if v == variant]
        if fv:
            r[variant]["fio_ratio_pairs"] = [round(x["iops"] / f, 3) for x, f in zip(rs, fv)]
    benchmark.extra_info.update(r)
    RESULTS[(kind, iodepth)] = r


def _med_range(xs, fmt="{:.2f}"):
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def _report():
    if not RESULTS:
        return None
    lines = [
        "",
        f"old way against new, interleaved, {ROUNDS} pairs each (median [min-max]); "
        "4 workers x 4 KiB random reads:",
    ]
    for (kind, depth), r in RESULTS.items():
        old, new = r["old"], r["new"]
        lines.append(
            f"  {kind} iodepth {depth}: {new}/{old} IOPS {_med_range(r['iops_ratio_pairs'])}x, "
            f"CPU/req {_med_range(r['cpu_ratio_pairs'])}x; load {_med_range(r['load'], '{:.1f}')}"
        )
        for v in (old, new):
            x = r[v]
            fio = f", vs fio {_med_range(x['fio_ratio_pairs'])}" if "fio_ratio_pairs" in x else ""
            lines.append(
                f"    {v:<8} IOPS {_med_range(x['iops'], '{:.0f}')}, "
                f"CPU {_med_range(x['cpu_us_per_request'], '{:.1f}')} us/req "
                f"(host {statistics.median(x['host_cpu_us_per_request']):.1f}), "
                f"host wake-ups {statistics.median(x['host_vcs_per_request']):.2f}/req, "
                f"p99 {statistics.median(x['p99_us']):.0f} us{fio}"
            )
    save_results("engines.json", list(RESULTS.values()))
    return "\n".join(lines)
