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


def plot_compare(result, path):
    """Hold and wait times and throughput per strategy, one group per row."""
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
    fig, axes = plt.subplots(3, 2, figsize=(11, 9.5), constrained_layout=True)
    x = range(len(runs))
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
