"""The experiment as text: the RFC's two lockstat tables per row with the %
change against hold, then throughput, kicks and CPU."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..workload.report import describe
from .results import pct_change

WAIT_COLS = ("con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total")
HOLD_COLS = ("acq-bounces", "acquisitions", "holdtime-min", "holdtime-max", "holdtime-total")
DIST_COLS = ("hold p50", "hold p99", "hold p99.9", "wait p50", "wait p99", "wait p99.9")


def _fmt_num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _fmt_pct(p: float | None) -> str:
    if p is None:
        return ""
    if p == float("inf"):
        return " (new)"
    return f" ({p:+.0f}%)"


def _lockstat(r: Mapping[str, Any], c: str) -> Any:
    return r["lockstat"][c]


def _dist(r: Mapping[str, Any], c: str) -> Any:
    """'hold p99' -> the run's hold-time p99 (us); None without histograms."""
    kind, p = c.split()
    d = (r.get("lock_hist") or {}).get(kind)
    return None if d is None else float(d[p])


def _table(
    rows: Sequence[tuple[Mapping[str, Any], Any]],
    cols: Sequence[str],
    names: Sequence[str],
    get: Callable[[Mapping[str, Any], str], Any] = _lockstat,
) -> list[str]:
    widths = [max(len(names[0]), *(len(n) for n in names[1:]))]
    hold = next((r for r, _ in rows if r["strategy"] == "hold"), None)
    cells = []
    for r, _ in rows:
        line = []
        for c in cols:
            v = get(r, c)
            if v is None:
                line.append("-")
                continue
            pct = None
            if hold is not None and r is not hold and get(hold, c) is not None:
                pct = pct_change(v, get(hold, c))
            line.append(_fmt_num(v) + _fmt_pct(pct))
        cells.append(line)
    for j, c in enumerate(cols):
        widths.append(max(len(c), *(len(line[j]) for line in cells)))
    out = [" ".join([names[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cols, widths[1:])])]
    for name, line in zip(names[1:], cells):
        out.append(
            " ".join([name.ljust(widths[0])] + [v.rjust(w) for v, w in zip(line, widths[1:])])
        )
    return out


def _nd_base(row: str) -> tuple[str, str]:
    """'shm+nd=trust' -> ('shm', 'trust')."""
    parts = row.split("+")
    nd = next((p[3:] for p in parts if p.startswith("nd=")), "")
    return "+".join(p for p in parts if not p.startswith("nd=")), nd


def _spread(nd: Mapping[str, Any], k: str, fmt: str) -> str:
    lo_hi = (nd.get("spread") or {}).get(k)
    v = format(nd[k], fmt)
    if not lo_hi or lo_hi[0] == lo_hi[1]:
        return v
    return f"{v} [{format(lo_hi[0], fmt)}-{format(lo_hi[1], fmt)}]"


def format_nd_table(result: Mapping[str, Any]) -> str:
    """compare --notification-data: per row, device and run, the reordered
    doorbells per million notifications, the requests left waiting past a
    notification and their stall time, and IOPS against hold, against the
    same strategy without the remedy (remedies) and against the trusting
    device (reread).  Medians over the repeats, [min-max] beside them."""
    runs = [r for r in result["runs"] if r.get("notification_data")]
    if not runs:
        return ""
    by = {(*_nd_base(r["row"]), r["strategy"]): r for r in runs}
    out = [
        "Notification data (VIRTIO_F_NOTIFICATION_DATA; medians, [min-max] over the repeats; "
        "stalls end at the next covering notification or at the trusting device's re-read "
        f"after {runs[0]['notification_data']['reread_ms']} ms):",
        "",
    ]
    cols = ["row", "device", "run", "notifs", "reordered/M", "waiting", "stall total ms",
            "stall max ms", "rereads", "IOPS", "vs hold", "remedy cost"]  # fmt: skip
    cells = []
    for r in runs:
        base, dev = _nd_base(r["row"])
        nd = r["notification_data"]
        variant = r["strategy"]
        plain = variant.split("+")[0]
        hold = by.get((base, dev, "hold"))
        ref = None
        if variant != plain:
            ref = by.get((base, dev, plain))
        elif dev == "reread":
            ref = by.get((base, "trust", plain))
        vs_hold = "" if hold is None or hold is r else _fmt_pct(pct_change(r["iops"], hold["iops"]))
        cost = "" if ref is None else _fmt_pct(pct_change(r["iops"], ref["iops"]))
        cells.append([
            base or "rfc", dev, variant, str(nd["notifications"]),
            _spread(nd, "reordered_per_million", ".0f"), _spread(nd, "waiting", ".0f"),
            _spread(nd, "stall_total_ms", ".1f"), f"{nd['stall_max_ms']:.1f}",
            f"{nd['rereads']:.0f}", f"{r['iops']:.0f}", vs_hold.strip(" ()"), cost.strip(" ()"),
        ])  # fmt: skip
    widths = [max(len(c), *(len(line[j]) for line in cells)) for j, c in enumerate(cols)]
    out.append(" ".join(c.ljust(w) if j < 3 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(cols, widths))))  # fmt: skip
    for line in cells:
        out.append(" ".join(v.ljust(w) if j < 3 else v.rjust(w)
                            for j, (v, w) in enumerate(zip(line, widths))))  # fmt: skip
    out.append("")
    out.append(
        "remedy cost: IOPS against the same strategy without the remedy (+lock: notify under "
        "the lock; +monotonic: a doorbell that never goes backwards, emulation only), and for "
        "the reread device against the trusting one."
    )
    return "\n".join(out) + "\n"


def format_tables(result: Mapping[str, Any]) -> str:
    """The RFC's two tables per row group, then throughput, kicks and CPU."""
    runs = result["runs"]
    groups: list[tuple[str, list[Mapping[str, Any]]]] = []
    for r in runs:
        if not groups or groups[-1][0] != r["row"]:
            groups.append((r["row"], []))
        groups[-1][1].append(r)
    out = []
    for label, rs in groups:
        title = f"== {label or 'RFC setup'}: {describe(rs[0]['config'])}; "
        title += f"{rs[0]['wall_s']:.1f} s per run"
        if rs[0].get("repeat", 1) > 1:
            title += f", medians of {rs[0]['repeat']} runs"
        out.append(title)
        rows = [(r, None) for r in rs]
        names = ["name"] + [r["strategy"] for r in rs]
        out.append("")
        out.append("Lockstat data for the queue lock (times in us; % change against hold):")
        out.append("")
        out += _table(rows, WAIT_COLS, names)
        out.append("")
        out += _table(rows, HOLD_COLS, names)
        out.append("")
        if all(r.get("lock_hist") for r in rs):
            out.append(
                "Hold and wait time percentiles (us; upper edges of log2 buckets, at most the "
                "max; hold over acquisitions, wait over contentions):"
            )
            out.append("")
            out += _table(rows, DIST_COLS, names, _dist)
            out.append("")
        hdr = (
            f"{'name':<8} {'IOPS':>9} {'vs hold':>7} {'MB/s':>7} {'p50us':>7} {'p99us':>8} "
            f"{'maxus':>9} "
            f"{'kicks/req':>9} {'irqs/req':>8} {'acq/req':>7} {'guest%':>7} {'host%':>6} "
            f"{'guest us/req':>12}"
        )
        out.append(hdr)
        for r in rs:
            lt = r["latency_us"]
            p = r.get("pct_vs_hold", {})
            iops_pct = _fmt_pct(p.get("iops")) if r["strategy"] != "hold" else ""
            out.append(
                f"{r['strategy']:<8} {r['iops']:>9.0f} {iops_pct.strip():>7} "
                f"{r['mbps']:>7.1f} {lt['p50']:>7.1f} "
                f"{lt['p99']:>8.1f} {lt['max']:>9.1f} {r['kicks_per_request']:>9.3f} "
                f"{r['interrupts_per_request']:>8.3f} "
                f"{r['lock_acquisitions_per_request']:>7.2f} {r['guest_cpu_pct']:>7.1f} "
                f"{r['host_cpu_pct']:>6.1f} {r['guest_cpu_us_per_request']:>12.1f}"
            )
        out.append("")
        if all(r.get("wakeups") for r in rs):
            out.append(
                "Wake-ups per request (voluntary context switches; guest: workers and their "
                "interrupt threads, host: the daemon's threads):"
            )
            out.append(
                f"{'name':<8} {'guest':>8} {'host':>8} {'kicks':>8} {'irqs':>8} {'lock sleeps':>12}"
            )
            for r in rs:
                w = r["wakeups"]
                host = "?" if w["host_per_request"] is None else f"{w['host_per_request']:.2f}"
                out.append(
                    f"{r['strategy']:<8} {w['guest_per_request']:>8.2f} {host:>8} "
                    f"{r['kicks_per_request']:>8.3f} {r['interrupts_per_request']:>8.3f} "
                    f"{w['lock_sleeps_per_request']:>12.3f}"
                )
            out.append("")
        out.append("Where the guest's time went (all workers, ms; CPU user/sys in s):")
        out.append(
            f"{'name':<8} {'lock wait':>10} {'lock hold':>10} {'in kick':>10} "
            f"{'io wait':>10} {'cpu user':>9} {'cpu sys':>8} {'ctxsw vol':>10} "
            f"{'ctxsw inv':>10}"
        )
        for r in rs:
            t = r["time_ms"]
            ws = r["workers"]
            out.append(
                f"{r['strategy']:<8} {t['lock_wait_ms']:>10.1f} {t['lock_hold_ms']:>10.1f} "
                f"{t['kick_ms']:>10.1f} {t['io_wait_ms']:>10.1f} "
                f"{sum(w['cpu_user_s'] for w in ws):>9.3f} "
                f"{sum(w['cpu_sys_s'] for w in ws):>8.3f} "
                f"{sum(w['ctx_switches_voluntary'] for w in ws):>10} "
                f"{sum(w['ctx_switches_involuntary'] for w in ws):>10}"
            )
        out.append("")
    nd = format_nd_table(result)
    if nd:
        out.append(nd)
    return "\n".join(out)
