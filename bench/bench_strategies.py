"""The three kick strategies on the RFC's workload and on a memory store.

- rfc: 4 worker processes, sequential 4 KiB reads at iodepth 1 (dd bs=4k
  iflag=direct), one queue, sync exit, no event index, a 12-stripe store
  with 64 KiB chunks on disk whose read area was written first (reads of
  holes never reach the disk).
- mem: the same 4 workers at iodepth 16 on a store in /dev/shm, each
  strategy with and without VIRTIO_RING_F_EVENT_IDX.
- mem ratio: prepare against hold with the same notification setting (like
  against like), in MEM_PAIRS interleaved pairs per setting, so the claim
  comes with its spread (min, median, max of the pairs' ratios) and with
  the kicks per request of each side, which is where the spread comes from
  (docs/COMPARE.md, "Like against like").
- locks: the RFC's tables of `virtio-emu compare` with the queue lock
  `pvspin` beside `mutex` (docs/COMPARE.md, "The lock kind").

Each round moves a fixed number of requests, so pytest-benchmark's times
compare directly (lower is better); extra_info has IOPS, the lockstat
columns, the hold and wait percentiles, kicks per request and guest/host CPU
of the median round.  The claims (not asserted: a loaded machine must not
fail the suite; see extra_info["claims"] and the table printed at the end):
  rfc:  release cuts holdtime-max by >= 80% and lowers waittime-total
        against hold; prepare does at least as well as release.
  mem:  prepare against hold, IOPS ratio, per notification setting.
"""

import contextlib
import json
import statistics

import pytest

from benchutil import print_report, save_results, unique_name
from virtio_py.compare import (
    BASE,
    DaemonProcess,
    Stores,
    annotate,
    compare,
    format_tables,
)
from virtio_py.workload import JobSpec, run_job

ROUNDS = 3
MEM_PAIRS = 5  # interleaved hold/prepare pairs behind each ratio claim
RFC = dict(BASE, event_idx=False, area=8 << 20, size=1 << 30)
RFC_IOS_PER_WORKER = 2000  # about 0.2-2 s a round, by strategy
MEM = dict(BASE, store="shm", iodepth=16, queue_size=256, area=32 << 20, size=1 << 30)
MEM_IOS_PER_WORKER = 50000  # about 0.5-3 s a round
LOCK_ROWS = ("lock=mutex", "lock=pvspin")  # the RFC setup with each queue lock
LOCK_RUNTIME, LOCK_REPEAT = 2.0, 3
RESULTS = {}  # (group, label) -> median run
RATIOS = {}  # notification setting -> the pairs behind the mem ratio
LOCK_TABLES = []  # format_tables text of the lock comparison


@pytest.fixture(scope="module")
def testbed(request):
    """Factory: testbed(cfg) -> the daemon serving cfg on a temporary store.
    One daemon at a time (a store serves one daemon): asking for another
    configuration stops the current one; the last is stopped at the end."""
    with contextlib.ExitStack() as stack:
        stores = Stores(stack, "vpb")
        cur: dict = {}

        def get(cfg):
            key = json.dumps(cfg, sort_keys=True)
            if cur.get("key") != key:
                if cur:
                    cur.pop("daemon").stop()
                    cur.clear()
                d = DaemonProcess(unique_name("strat"), stores.get(cfg), cfg)
                d.start()
                cur.update(key=key, daemon=d)
            return cur["daemon"]

        try:
            yield get
        finally:
            if cur:
                cur["daemon"].stop()
    print_report(request, _report())


def _job(d, cfg, strategy, per_worker):
    spec = JobSpec(
        d.name,
        workers=cfg["workers"],
        rw=cfg["rw"],
        bs=cfg["bs"],
        iodepth=cfg["iodepth"],
        size=per_worker * cfg["bs"],
        strategy=strategy,
    )
    return run_job(spec)


def _bench(benchmark, testbed, group, label, cfg, strategy, per_worker):
    d = testbed(cfg)
    runs = []

    def one_round():
        runs.append(annotate(_job(d, cfg, strategy, per_worker), label, cfg, d))

    benchmark.group = group
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    med = sorted(runs, key=lambda r: r["iops"])[len(runs) // 2]
    ls = med["lockstat"]
    benchmark.extra_info.update(
        {
            "iops": med["iops"],
            "iops_rounds": [r["iops"] for r in runs],
            "mbps": med["mbps"],
            "kicks_per_request": med["kicks_per_request"],
            "interrupts_per_request": med["interrupts_per_request"],
            "guest_cpu_pct": med["guest_cpu_pct"],
            "host_cpu_pct": med["host_cpu_pct"],
            "latency_us": med["latency_us"],
            "holdtime_max_us_rounds": [r["lockstat"]["holdtime-max"] for r in runs],
            "waittime_total_us_rounds": [r["lockstat"]["waittime-total"] for r in runs],
            **{k.replace("-", "_"): v for k, v in ls.items()},
            **_percentiles(med),
            "wakeups": med.get("wakeups"),
        }
    )
    med["rounds"] = {
        "iops": [r["iops"] for r in runs],
        "holdtime-max": [r["lockstat"]["holdtime-max"] for r in runs],
        "waittime-total": [r["lockstat"]["waittime-total"] for r in runs],
    }
    RESULTS[(group, label)] = med
    return med


@pytest.mark.parametrize("strategy", ["hold", "release", "prepare"])
def test_rfc_workload(benchmark, testbed, strategy):
    _bench(benchmark, testbed, "strategies-rfc", strategy, RFC, strategy, RFC_IOS_PER_WORKER)
    if strategy == "prepare":
        benchmark.extra_info["claims"] = _rfc_claims()


def _percentiles(run):
    """Hold and wait p50/p99/p99.9 (us) of a run's lock histograms."""
    lh = run.get("lock_hist") or {}
    return {
        f"{kind}time_{p}_us": lh[kind][p]
        for kind in ("hold", "wait")
        if kind in lh
        for p in ("p50", "p99", "p99.9")
    }


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.parametrize("strategy", ["hold", "release", "prepare"])
def test_memory_store_iodepth16(benchmark, testbed, strategy, event_idx):
    cfg = dict(MEM, event_idx=event_idx)
    label = f"{strategy}{'+event-idx' if event_idx else ''}"
    _bench(benchmark, testbed, "strategies-mem-iodepth16", label, cfg, strategy, MEM_IOS_PER_WORKER)


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
def test_memory_store_iodepth16_ratio(benchmark, testbed, event_idx):
    """prepare against hold, both with the same notification setting, in
    interleaved pairs: each round runs hold, then prepare, on one daemon."""
    cfg = dict(MEM, event_idx=event_idx)
    d = testbed(cfg)
    pairs = []

    def one_pair():
        h = _job(d, cfg, "hold", MEM_IOS_PER_WORKER)
        p = _job(d, cfg, "prepare", MEM_IOS_PER_WORKER)
        pairs.append((h, p))

    benchmark.group = "strategies-mem-iodepth16-ratio"
    benchmark.pedantic(one_pair, rounds=MEM_PAIRS, iterations=1, warmup_rounds=0)
    setting = "event-idx" if event_idx else "flags"
    RATIOS[setting] = pairs
    benchmark.extra_info.update(_ratio_summary(pairs))
    benchmark.extra_info["claims"] = _mem_claims()


def _ratio_summary(pairs):
    ratios = sorted(p["iops"] / h["iops"] for h, p in pairs)
    return {
        "pairs": len(pairs),
        "ratio_min": round(ratios[0], 2),
        "ratio_median": round(statistics.median(ratios), 2),
        "ratio_max": round(ratios[-1], 2),
        "hold_iops": [h["iops"] for h, _ in pairs],
        "prepare_iops": [p["iops"] for _, p in pairs],
        "hold_kicks_per_request": [h["kicks_per_request"] for h, _ in pairs],
        "prepare_kicks_per_request": [p["kicks_per_request"] for _, p in pairs],
        "hold_guest_ctxsw_per_request": [h["wakeups"]["guest_per_request"] for h, _ in pairs],
    }


def test_rfc_tables_pvspin_beside_mutex(benchmark):
    """`virtio-emu compare` on the RFC setup, once with each queue lock: the
    RFC's two tables, the hold/wait percentiles and the wake-ups, printed
    at the end and kept in .benchmarks/strategies.json."""
    out = {}

    def run():
        out["result"] = compare(
            rows=LOCK_ROWS,
            runtime=LOCK_RUNTIME,
            repeat=LOCK_REPEAT,
            name_prefix="vpb",
            verbose=False,
        )

    benchmark.group = "strategies-locks"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    res = out["result"]
    LOCK_TABLES.append(format_tables(res))
    for r in res["runs"]:
        lock = r["config"]["lock"]
        RESULTS[("strategies-locks", f"{lock} {r['strategy']}")] = r
        benchmark.extra_info[f"{lock}_{r['strategy']}"] = {
            "iops": r["iops"],
            "latency_max_us": r["latency_us"]["max"],
            **{k.replace("-", "_"): v for k, v in r["lockstat"].items()},
            **_percentiles(r),
        }


def _median_of(label, group, key):
    r = RESULTS.get((group, label))
    return statistics.median(r["rounds"][key]) if r else None


def _rfc_claims():
    g = "strategies-rfc"
    hm = {s: _median_of(s, g, "holdtime-max") for s in ("hold", "release", "prepare")}
    wt = {s: _median_of(s, g, "waittime-total") for s in ("hold", "release", "prepare")}
    if None in hm.values():
        return None
    cut = {s: round(100 * (1 - hm[s] / hm["hold"]), 1) for s in ("release", "prepare")}
    wcut = {s: round(100 * (1 - wt[s] / wt["hold"]), 1) for s in ("release", "prepare")}
    return {
        "holdtime_max_cut_pct": cut,
        "waittime_total_cut_pct": wcut,
        "release_cuts_holdtime_max_80pct": cut["release"] >= 80,
        "release_lowers_waittime_total": wcut["release"] > 0,
        "prepare_at_least_as_good_as_release": cut["prepare"] >= cut["release"] - 5
        and wcut["prepare"] >= wcut["release"] - 5,
    }


def _mem_claims():
    """prepare / hold IOPS per notification setting, never across settings."""
    if not RATIOS:
        return None
    out = {
        f"prepare_vs_hold_{setting}": {
            k: v for k, v in _ratio_summary(pairs).items() if k.startswith("ratio") or k == "pairs"
        }
        for setting, pairs in RATIOS.items()
    }
    out["reference_3_16"] = 2.4
    return out


def _report():
    """The comparison, printed after the benchmarks and kept as JSON."""
    if not (RESULTS or RATIOS or LOCK_TABLES):
        return None
    lines = ["", "kick strategies (median round; % against hold of the group):"]
    for group in ("strategies-rfc", "strategies-mem-iodepth16", "strategies-locks"):
        rows = [(lbl, r) for (g, lbl), r in RESULTS.items() if g == group]
        if not rows:
            continue
        hold = dict(rows).get("hold") if group != "strategies-locks" else None
        lines.append(f"  {group}")
        lines.append(
            f"    {'name':<20} {'IOPS':>9} {'holdtime-max':>13} {'waittime-total':>15} "
            f"{'acquisitions':>12} {'kicks/req':>9} {'guest%':>7} {'host%':>6}"
        )
        for lbl, r in rows:
            ls = r["lockstat"]
            pct = ""
            if hold and r is not hold:
                pct = (
                    f"  iops {100 * (r['iops'] / hold['iops'] - 1):+.0f}%  "
                    f"holdmax {100 * (ls['holdtime-max'] / max(hold['lockstat']['holdtime-max'], 1e-9) - 1):+.0f}%  "
                    f"waittot {100 * (ls['waittime-total'] / max(hold['lockstat']['waittime-total'], 1e-9) - 1):+.0f}%"
                )
            lines.append(
                f"    {lbl:<20} {r['iops']:>9.0f} {ls['holdtime-max']:>13.2f} "
                f"{ls['waittime-total']:>15.2f} {ls['acquisitions']:>12} "
                f"{r['kicks_per_request']:>9.3f} {r['guest_cpu_pct']:>7.1f} "
                f"{r['host_cpu_pct']:>6.1f}{pct}"
            )
    for setting, pairs in RATIOS.items():
        r = _ratio_summary(pairs)
        lines.append(
            f"  prepare / hold, both {setting}, {r['pairs']} interleaved pairs: ratio "
            f"{r['ratio_min']}-{r['ratio_max']} (median {r['ratio_median']}); hold IOPS "
            f"{min(r['hold_iops']):.0f}-{max(r['hold_iops']):.0f}, kicks/req "
            f"{min(r['hold_kicks_per_request']):.3f}-{max(r['hold_kicks_per_request']):.3f}; "
            f"prepare IOPS {min(r['prepare_iops']):.0f}-{max(r['prepare_iops']):.0f}"
        )
    for text in LOCK_TABLES:
        lines += ["", "the RFC setup with each queue lock (virtio-emu compare):", text]
    claims = {"rfc": _rfc_claims(), "mem": _mem_claims()}
    lines.append(f"  claims: {json.dumps(claims)}")
    text = "\n".join(lines)
    save_results(
        "strategies.json",
        {
            "runs": list(RESULTS.values()),
            "ratio_pairs": {k: _ratio_summary(v) for k, v in RATIOS.items()},
            "claims": claims,
        },
    )
    return text
