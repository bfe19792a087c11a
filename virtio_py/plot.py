"""Plots of a compare result (matplotlib is an optional extra)."""

from .errors import ConfigError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'virtio_py[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PERCENTILE_SHADES = {"p50": 0.35, "p99": 0.65, "p99.9": 1.0}


def matplotlib_patch(alpha, hatch):
    """A grey legend patch standing for one percentile's shade."""
    from matplotlib.patches import Patch

    return Patch(facecolor="#888888", alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.5)


def _percentile_panel(ax, runs, kind, labels, col):
    """p50/p99/p99.9 and max of the hold or wait time, side by side per run,
    on a log scale (they span from ns to ms)."""
    keys = ("p50", "p99", "p99.9", "max")
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        vals = [max(r["lock_hist"][kind][k], 1e-3) for r in runs]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(runs))]
        alpha = PERCENTILE_SHADES.get(k, 1.0)
        ax.bar(xs, vals, width, color=col, alpha=alpha, edgecolor="black" if k == "max" else None,
               hatch="//" if k == "max" else None, linewidth=0.5, label=k)  # fmt: skip
    ax.set_yscale("log")
    over = "acquisitions" if kind == "hold" else "contentions"
    ax.set_title(f"{kind} time p50, p99, p99.9, max (us, log; of {over})", fontsize=10)
    if kind == "hold":
        handles = [
            matplotlib_patch(alpha=PERCENTILE_SHADES.get(k, 1.0), hatch="//" if k == "max" else "")
            for k in keys
        ]
        ax.legend(handles, keys, fontsize=7, loc="upper right", ncol=4)
    ax.set_xticks(list(range(len(runs))))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_compare(result, path):
    """Hold and wait times and throughput per strategy, one group per row;
    with lock histograms in the runs, their percentiles too."""
    plt = _pyplot()
    runs = result["runs"]
    labels = [(r["row"] + " " if r["row"] else "") + r["strategy"] for r in runs]
    colors = {"hold": "#c44e52", "release": "#4c72b0", "prepare": "#55a868"}
    col = [colors.get(r["strategy"], "#888888") for r in runs]
    panels = [
        ("holdtime-max (us)", [r["lockstat"]["holdtime-max"] for r in runs]),
        ("waittime-max (us)", [r["lockstat"]["waittime-max"] for r in runs]),
        ("holdtime-total (ms)", [r["lockstat"]["holdtime-total"] / 1000 for r in runs]),
        ("waittime-total (ms)", [r["lockstat"]["waittime-total"] / 1000 for r in runs]),
        ("IOPS", [r["iops"] for r in runs]),
        ("guest CPU (% of one CPU)", [r["guest_cpu_pct"] for r in runs]),
    ]
    dists = all(r.get("lock_hist") for r in runs)
    nrows = 4 if dists else 3
    fig, axes = plt.subplots(nrows, 2, figsize=(11, 3.2 * nrows), constrained_layout=True)
    x = range(len(runs))
    if dists:
        for ax, kind in zip(axes.flat[6:], ("hold", "wait")):
            _percentile_panel(ax, runs, kind, labels, col)
    for ax, (title, vals) in zip(axes.flat, panels):
        bars = ax.bar(x, vals, color=col)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        for b, v in zip(bars, vals):
            ax.annotate(
                f"{v:,.0f}" if v >= 100 else f"{v:.1f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    c = runs[0]["config"] if runs else {}
    fig.suptitle(
        f"virtio_py compare: {c.get('workers')} workers, {c.get('rw')} "
        f"bs={c.get('bs')}, exit {c.get('exit')}, lock {c.get('lock')}, "
        f"{result.get('runtime')} s per run",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
