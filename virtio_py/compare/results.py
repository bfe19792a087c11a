"""Figures of the experiment: repeats combined into one run (medians), and
each run's % change against the hold run of its row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..lock import LOCKSTAT_COLUMNS, PERCENTILES, pool_histograms

MEDIAN_KEYS = (
    "iops",
    "mbps",
    "wall_s",
    "ios",
    "bytes",
    "requests_added",
    "requests_completed",
    "kicks",
    "kicks_suppressed",
    "kicks_taken",
    "interrupts",
    "interrupts_suppressed",
    "kicks_per_request",
    "interrupts_per_request",
    "lock_acquisitions_per_request",
    "guest_cpu_s",
    "guest_cpu_pct",
    "guest_cpu_pct_of_machine",
    "guest_cpu_us_per_request",
    "host_cpu_s",
    "host_cpu_pct",
    "host_cpu_us_per_request",
)


def _median(vals: Sequence[Any]) -> Any:
    v = sorted(vals)
    n = len(v)
    m = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    # A run has figures to 4 places (kicks per request): keep them.
    return round(m, 4) if isinstance(m, float) else m


def combine(reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run from repeats: every figure is the median over the repeats (so
    one preempted lock holder does not make the row), but errors, duplicate
    completions and full-queue retries are summed; the per-worker detail
    is the median-IOPS repeat's.  The repeats' own figures stay in "repeats"."""
    if len(reps) == 1:
        out = dict(reps[0])
        out["repeat"] = 1
        return out
    mid = sorted(reps, key=lambda r: r["iops"])[len(reps) // 2]
    out = dict(mid)
    for k in MEDIAN_KEYS:
        out[k] = _median([r[k] for r in reps])
    out["lockstat"] = {k: _median([r["lockstat"][k] for r in reps]) for k in mid["lockstat"]}
    out["lockstat_ns"] = {
        k: _median([r["lockstat_ns"][k] for r in reps]) for k in mid["lockstat_ns"]
    }
    out["latency_us"] = {k: _median([r["latency_us"][k] for r in reps]) for k in mid["latency_us"]}
    out["time_ms"] = {k: _median([r["time_ms"][k] for r in reps]) for k in mid["time_ms"]}
    if all(r.get("lock_hist") for r in reps):
        out["lock_hist"] = _combine_hists([r["lock_hist"] for r in reps])
    if all(r.get("wakeups") for r in reps):
        out["wakeups"] = {
            k: None if any(r["wakeups"][k] is None for r in reps)
            else _median([r["wakeups"][k] for r in reps])
            for k in mid["wakeups"]
        }  # fmt: skip
    for k in ("errors", "dup_completions", "queue_full"):
        out[k] = sum(r[k] for r in reps)
    if all(r.get("notification_data") for r in reps):
        out["notification_data"] = combine_nd([r["notification_data"] for r in reps])
    out["repeat"] = len(reps)
    out["repeats"] = [_repeat_summary(r) for r in reps]
    return out


ND_SPREAD_KEYS = ("reordered_per_million", "waiting", "stall_total_ms", "stall_max_ms")


def combine_nd(nds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeats' notification-data figures: counts and stall times are
    medians, the longest stall is the longest of any repeat, and "spread"
    keeps each repeat's (min, max) of the main figures."""
    out = dict(nds[0])
    for k, v in nds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _median([d[k] for d in nds])
    out["stall_max_ms"] = max(d["stall_max_ms"] for d in nds)
    out["spread"] = {k: (min(d[k] for d in nds), max(d[k] for d in nds)) for k in ND_SPREAD_KEYS}
    return out


def _combine_hists(hists: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeats' lock distributions as one: like every other figure, the
    count, max and percentiles are medians over the repeats (so a count is
    the combined lockstat's acquisitions or contentions, and no percentile
    exceeds the combined max); "pooled" has the buckets of all repeats
    added up, with the percentiles of that pool."""
    out: dict[str, Any] = {}
    for kind in ("hold", "wait"):
        ds = [h[kind] for h in hists]
        out[kind] = {"over": ds[0]["over"]}
        for k in ("count", "max", *PERCENTILES):
            out[kind][k] = _median([d[k] for d in ds])
    for k in ("sleeps", "wakeups"):
        if all(k in h for h in hists):
            out[k] = _median([h[k] for h in hists])
    out["pooled"] = pool_histograms(hists)
    return out


def _repeat_summary(r: dict[str, Any]) -> dict[str, Any]:
    """What the JSON keeps of each repeat: enough to see the spread."""
    out = {
        k: r[k]
        for k in (
            "ios",
            "iops",
            "mbps",
            "lockstat",
            "latency_us",
            "guest_cpu_pct",
            "host_cpu_pct",
            "kicks_per_request",
            "time_ms",
            "wall_s",
        )
    }
    if r.get("lock_hist"):
        out["lock_hist"] = {
            kind: {p: r["lock_hist"][kind][p] for p in (*PERCENTILES, "count", "max")}
            for kind in ("hold", "wait")
        }
    if r.get("wakeups"):
        out["wakeups"] = r["wakeups"]
    return out


def pct_change(new: float, old: float) -> float | None:
    if old == 0:
        return None if new == 0 else float("inf")
    return 100.0 * (new - old) / old


def add_changes(runs: Sequence[dict[str, Any]]) -> None:
    """Each run gets pct_vs_hold: % change of every lockstat column and of
    throughput and CPU against the hold run of its row."""
    holds = {r["row"]: r for r in runs if r["strategy"] == "hold"}
    for r in runs:
        h = holds.get(r["row"])
        if h is None:
            continue
        ch = {k: pct_change(r["lockstat"][k], h["lockstat"][k]) for k in LOCKSTAT_COLUMNS}
        for k in (
            "iops",
            "mbps",
            "guest_cpu_pct",
            "host_cpu_pct",
            "kicks_per_request",
            "guest_cpu_us_per_request",
        ):
            ch[k] = pct_change(r[k], h[k])
        r["pct_vs_hold"] = {
            k: (None if v is None or v == float("inf") else round(v, 1)) for k, v in ch.items()
        }
