"""The RFC benchmark: one run per kick strategy, lockstat tables and more.

``compare(...)`` sets up its own host daemon (a child process) on a striped
store in a temporary directory, runs the RFC's workload (4 workers, dd
bs=4k iflag=direct: sequential 4 KiB reads at iodepth 1, one queue, sync
exit) once per strategy and returns every run's result; ``format_tables``
prints the RFC's two lockstat tables with the % change against hold, then
throughput, kicks and CPU.  Extra rows change one thing of the setup
(event index, async exit, poll mode, a memory store, multi-queue, ...).

Everything it starts is stopped and unlinked at the end, on error, on
Ctrl-C and on SIGTERM.
"""
import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from .errors import ConfigError, VirtioError
from .lock import LOCKSTAT_COLUMNS
from .region import check_config, check_name, destroy
from .units import format_size, parse_size
from .workload import JobSpec, run_job, set_pdeathsig

STRATEGY_ORDER = ("hold", "release", "prepare")
WAIT_COLS = ("con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total")
HOLD_COLS = ("acq-bounces", "acquisitions", "holdtime-min", "holdtime-max", "holdtime-total")

# The RFC's setup, as close as this machine allows (see docs/COMPARE.md).
BASE = {
    "workers": 4, "rw": "read", "bs": 4096, "iodepth": 1, "queues": 1,
    "exit": "sync", "exit_cost_us": 0.0, "mode": "notify", "event_idx": False,
    "lock": "mutex", "store": "disk", "stripes": 12, "chunk": 64 << 10,
    "size": 1 << 30, "area": 32 << 20, "prewrite": True, "queue_size": 128,
    "io_threads": None, "engine": "c",
}

# Row tokens: each changes one thing of BASE.
ROW_TOKENS = {
    "event-idx": {"event_idx": True}, "no-event-idx": {"event_idx": False},
    "async": {"exit": "async"}, "sync": {"exit": "sync"},
    "poll": {"mode": "poll"}, "notify": {"mode": "notify"},
    "shm": {"store": "shm"}, "disk": {"store": "disk"},
    "mq": {"queues": None},                 # one queue per worker
}
ROW_KEYS = {"iodepth": int, "queues": int, "workers": int, "lock": str, "exit-cost": float,
            "bs": parse_size, "rw": str}


def parse_row(text):
    """'shm+event-idx+iodepth=16' -> (label, overrides)."""
    over = {}
    for tok in filter(None, text.split("+")):
        key, eq, val = tok.partition("=")
        if not eq and tok in ROW_TOKENS:
            over.update(ROW_TOKENS[tok])
        elif eq and key in ROW_KEYS:
            try:
                v = ROW_KEYS[key](val)
            except ValueError:
                raise ConfigError(f"bad value in row {text!r}: {tok!r}") from None
            over[{"exit-cost": "exit_cost_us"}.get(key, key)] = v
        else:
            raise ConfigError(
                f"unknown row token {tok!r} in {text!r}: use {', '.join(ROW_TOKENS)} or "
                f"{', '.join(k + '=N' for k in ROW_KEYS)}, joined by '+'")
    return text, over


def resolve(base, over):
    cfg = dict(base)
    cfg.update(over)
    if cfg["queues"] is None:
        cfg["queues"] = cfg["workers"]
    # What the daemon would refuse, refused before anything starts.
    from host_daemon.store import check_geometry   # the daemon package owns the store
    check_config(queues=cfg["queues"], lock=cfg["lock"], exit=cfg["exit"],
                 exit_cost_us=cfg["exit_cost_us"], mode=cfg["mode"])
    check_geometry(cfg["stripes"], cfg["chunk"], cfg["size"])
    # Room for every request in flight (3 descriptors each, no indirect
    # descriptors), as blk-mq sizes its tag set to the virtqueue.
    per_q = -(-cfg["workers"] // cfg["queues"]) * cfg["iodepth"] * 3
    while cfg["queue_size"] < per_q and cfg["queue_size"] < 32768:
        cfg["queue_size"] *= 2
    return cfg


def describe(cfg):
    """One line for a configuration."""
    return (f"{cfg['workers']} workers, {cfg['rw']} bs={format_size(cfg['bs'])} "
            f"iodepth={cfg['iodepth']}, {cfg['queues']} queue(s), exit {cfg['exit']}"
            + (f" +{cfg['exit_cost_us']:g}us" if cfg["exit_cost_us"] else "")
            + f", {cfg['mode']}, event_idx {'on' if cfg['event_idx'] else 'off'}, "
            f"lock {cfg['lock']}, store {cfg['store']}"
            + (f" ({cfg['stripes']}x{format_size(cfg['chunk'])} stripes)"
               if cfg["store"] == "disk" else ""))


# ------------------------------------------------------------------ daemon
class DaemonProcess:
    """``python -m host_daemon start --foreground`` as our child, in its own
    session (a terminal's Ctrl-C reaches us, and we stop it in order)."""

    def __init__(self, name, store_dir, cfg):
        self.name = name
        self.store_dir = store_dir
        self.cfg = cfg
        self.proc = None

    def start(self, timeout=60):
        c = self.cfg
        args = [sys.executable, "-m", "host_daemon", "start", "--foreground",
                "--name", self.name, "--store", self.store_dir, "--size", str(c["size"]),
                "--stripes", str(c["stripes"]), "--chunk", str(c["chunk"]),
                "--queues", str(c["queues"]), "--queue-size", str(c["queue_size"]),
                "--mode", c["mode"], "--exit", c["exit"], "--exit-cost", str(c["exit_cost_us"]),
                "--lock", c["lock"], "--event-idx" if c["event_idx"] else "--no-event-idx"]
        if c["io_threads"] is not None:
            args += ["--io-threads", str(c["io_threads"])]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=functools.partial(set_pdeathsig, signal.SIGTERM))
        try:
            out = self._wait_ready(timeout)
        except BaseException:       # Ctrl-C too: it must not set up behind our back
            self.stop()
            raise
        if out is None:
            return self
        self.stop()
        msg = [line for line in out if "error" in line] or out or ["no output"]
        raise VirtioError(f"host daemon for {self.name} did not start: {msg[-1]}")

    def _wait_ready(self, timeout):
        """None once the daemon says it is ready, else the lines it said."""
        deadline = time.monotonic() + timeout
        out = []
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    out.append(text)
                    if "ready:" in text:
                        return None
            elif self.proc.poll() is not None:
                break
        return out

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self, timeout=20):
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stdout:
                p.stdout.close()
        # Whatever it could not unlink (it was killed), we do.
        destroy(self.name)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def prewrite(store_dir, stripes, chunk, nbytes, stripe_path):
    """Write the first nbytes of the logical disk (every stripe's share) with
    non-zero data and flush it, so O_DIRECT reads go to the disk instead of
    returning zeros for holes in memory speed."""
    per = -(-nbytes // (chunk * stripes)) * chunk
    block = (b"virtio_py prewrite " * 64)[:1 << 10] * (1 << 10)
    os.makedirs(store_dir, exist_ok=True)
    for i in range(stripes):
        fd = os.open(stripe_path(store_dir, i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            off = 0
            while off < per:
                n = min(len(block), per - off)
                os.pwrite(fd, block[:n], off)
                off += n
            os.fsync(fd)
            os.posix_fadvise(fd, 0, per, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return per * stripes


# ------------------------------------------------------------------ runs
class Stores:
    """Temporary store directories, one per kind (disk under workdir, shm in
    /dev/shm), shared by the rows of a run and removed by the exit stack.
    Disk stores get their read area written once."""

    def __init__(self, stack, prefix, workdir=None, note=lambda text: None):
        self.stack = stack
        self.prefix = prefix
        self.workdir = workdir
        self.note = note
        self.dirs = {}

    def get(self, cfg):
        from host_daemon.store import stripe_path   # the daemon package owns the layout
        kind = cfg["store"]
        if kind not in ("disk", "shm"):
            raise ConfigError(f"store must be disk or shm, not {kind!r}")
        if kind not in self.dirs:
            parent = "/dev/shm" if kind == "shm" else self.workdir
            td = self.stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f"{self.prefix}{os.getpid()}-store-", dir=parent))
            self.dirs[kind] = {"dir": td, "written": 0, "layout": None}
        store = self.dirs[kind]
        layout = (cfg["stripes"], cfg["chunk"], cfg["size"])
        if store["layout"] not in (None, layout):
            raise ConfigError("every row must use the same store layout")
        store["layout"] = layout
        need = cfg["workers"] * cfg["area"]
        if kind == "disk" and cfg["prewrite"] and store["written"] < need:
            self.note(f"virtio-emu compare: writing {format_size(need)} of the store once "
                      f"(reads of holes would never reach the disk)")
            prewrite(store["dir"], cfg["stripes"], cfg["chunk"], need, stripe_path)
            store["written"] = need
        return store["dir"]


def annotate(res, label, cfg, daemon):
    """Add the row label and the setup's configuration to a run's result."""
    res["row"] = label
    res["config"].update({k: cfg[k] for k in ("store", "stripes", "chunk", "prewrite", "area")})
    res["config"]["disk_size"] = cfg["size"]
    res["config"]["daemon_pid"] = daemon.pid
    return res


class _Progress:
    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.dirty = False

    def __call__(self, label, elapsed, runtime, ios):
        if not self.tty or elapsed < 1.0:
            return
        total = f"/{runtime:.0f}" if runtime else ""
        self.stream.write(f"\r  {label:<32} {elapsed:5.1f}{total} s  {ios:>10,} requests "
                          f"{ios / max(elapsed, 1e-9):>9,.0f}/s ")
        self.stream.flush()
        self.dirty = True

    def note(self, text):
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self):
        if self.dirty:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
            self.dirty = False


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so every finally runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:          # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def compare(rows=("",), runtime=3.0, strategies=STRATEGY_ORDER, base=None, name_prefix="vpc",
            workdir=None, progress_stream=None, verbose=True, repeat=3):
    """Run every row (a configuration) repeat times per strategy, the
    strategies interleaved; returns {"runs": [...]} with one entry per row
    and strategy whose figures are medians over the repeats (every repeat
    is kept under "repeats")."""
    if repeat < 1:
        raise ConfigError(f"repeat must be at least 1, not {repeat}")
    base = dict(BASE, **(base or {}))
    plans = [(label, resolve(base, over)) for label, over in (parse_row(r) for r in rows)]
    for s in strategies:
        if s not in STRATEGY_ORDER:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGY_ORDER)}, not {s!r}")
    for _, cfg in plans:
        JobSpec("x", workers=cfg["workers"], rw=cfg["rw"], bs=cfg["bs"], iodepth=cfg["iodepth"],
                runtime=runtime, size=cfg["area"]).check()
        if cfg["workers"] * cfg["area"] > cfg["size"]:
            raise ConfigError(f"{cfg['workers']} workers x area {cfg['area']} exceed the disk "
                              f"size {cfg['size']}")
    stream = progress_stream or sys.stderr
    prog = _Progress(stream)
    note = prog.note if verbose else (lambda text: None)
    runs = []
    n = 0
    with contextlib.ExitStack() as stack, _sigterm_as_interrupt():
        stack.callback(prog.clear)
        stores = Stores(stack, name_prefix, workdir, note)
        for label, cfg in plans:
            name = check_name(f"{name_prefix}{os.getpid()}-{n}")
            n += 1
            store_dir = stores.get(cfg)
            note(f"virtio-emu compare: {label or 'RFC setup'}: {describe(cfg)}")
            with DaemonProcess(name, store_dir, cfg) as daemon:
                reps = {s: [] for s in strategies}
                for rep in range(repeat):
                    for strategy in strategies:
                        spec = JobSpec(name, workers=cfg["workers"], rw=cfg["rw"],
                                       bs=cfg["bs"], iodepth=cfg["iodepth"], runtime=runtime,
                                       size=cfg["area"], strategy=strategy,
                                       engine=cfg["engine"])
                        tag = f" [{rep + 1}/{repeat}]" if repeat > 1 else ""
                        res = run_job(spec, progress=prog,
                                      label=f"{label or 'rfc'} {strategy}{tag}")
                        annotate(res, label, cfg, daemon)
                        reps[strategy].append(res)
                        prog.clear()
                        note(f"  {strategy:<8}{tag} {res['iops']:>10,.0f} IOPS  holdtime-max "
                             f"{res['lockstat']['holdtime-max']:>10.2f} us  waittime-total "
                             f"{res['lockstat']['waittime-total']:>12.2f} us")
                runs += [combine(reps[s]) for s in strategies]
    add_changes(runs)
    return {"runs": runs, "runtime": runtime, "repeat": repeat, "cpus": os.cpu_count(),
            "base": {k: v for k, v in base.items()}}


MEDIAN_KEYS = ("iops", "mbps", "wall_s", "ios", "bytes", "requests_added",
               "requests_completed", "kicks", "kicks_suppressed",
               "kicks_taken", "interrupts", "interrupts_suppressed", "kicks_per_request",
               "interrupts_per_request", "lock_acquisitions_per_request", "guest_cpu_s",
               "guest_cpu_pct", "guest_cpu_pct_of_machine", "guest_cpu_us_per_request",
               "host_cpu_s", "host_cpu_pct", "host_cpu_us_per_request")


def _median(vals):
    v = sorted(vals)
    n = len(v)
    m = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    # A run has figures to 4 places (kicks per request): keep them.
    return round(m, 4) if isinstance(m, float) else m


def combine(reps):
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
    out["lockstat_ns"] = {k: _median([r["lockstat_ns"][k] for r in reps])
                          for k in mid["lockstat_ns"]}
    out["latency_us"] = {k: _median([r["latency_us"][k] for r in reps])
                         for k in mid["latency_us"]}
    out["time_ms"] = {k: _median([r["time_ms"][k] for r in reps]) for k in mid["time_ms"]}
    for k in ("errors", "dup_completions", "queue_full"):
        out[k] = sum(r[k] for r in reps)
    out["repeat"] = len(reps)
    out["repeats"] = [{k: r[k] for k in ("ios", "iops", "mbps", "lockstat", "latency_us",
                                        "guest_cpu_pct", "host_cpu_pct", "kicks_per_request",
                                        "time_ms", "wall_s")} for r in reps]
    return out


# ------------------------------------------------------------------ tables
def pct_change(new, old):
    if old == 0:
        return None if new == 0 else float("inf")
    return 100.0 * (new - old) / old


def add_changes(runs):
    """Each run gets pct_vs_hold: % change of every lockstat column and of
    throughput and CPU against the hold run of its row."""
    holds = {r["row"]: r for r in runs if r["strategy"] == "hold"}
    for r in runs:
        h = holds.get(r["row"])
        if h is None:
            continue
        ch = {k: pct_change(r["lockstat"][k], h["lockstat"][k]) for k in LOCKSTAT_COLUMNS}
        for k in ("iops", "mbps", "guest_cpu_pct", "host_cpu_pct", "kicks_per_request",
                  "guest_cpu_us_per_request"):
            ch[k] = pct_change(r[k], h[k])
        r["pct_vs_hold"] = {k: (None if v is None or v == float("inf") else round(v, 1))
                            for k, v in ch.items()}


def _fmt_num(v):
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _fmt_pct(p):
    if p is None:
        return ""
    if p == float("inf"):
        return " (new)"
    return f" ({p:+.0f}%)"


def _table(rows, cols, names):
    widths = [max(len(names[0]), *(len(n) for n in names[1:]))]
    hold = next((r for r, _ in rows if r["strategy"] == "hold"), None)
    cells = []
    for r, _ in rows:
        line = []
        for c in cols:
            pct = None
            if hold is not None and r is not hold:
                pct = pct_change(r["lockstat"][c], hold["lockstat"][c])
            line.append(_fmt_num(r["lockstat"][c]) + _fmt_pct(pct))
        cells.append(line)
    for j, c in enumerate(cols):
        widths.append(max(len(c), *(len(line[j]) for line in cells)))
    out = [" ".join([names[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cols, widths[1:])])]
    for (r, _), name, line in zip(rows, names[1:], cells):
        out.append(" ".join([name.ljust(widths[0])] +
                            [v.rjust(w) for v, w in zip(line, widths[1:])]))
    return out


def format_tables(result):
    """The RFC's two tables per row group, then throughput, kicks and CPU."""
    runs = result["runs"]
    groups = []
    for r in runs:
        if not groups or groups[-1][0] != r["row"]:
            groups.append((r["row"], []))
        groups[-1][1].append(r)
    out = []
    for label, rs in groups:
        c = rs[0]["config"]
        title = f"== {label or 'RFC setup'}: {c['workers']} workers, {c['rw']} bs={c['bs']} " \
                f"iodepth={c['iodepth']}, {c['queues']} queue(s), exit {c['exit']}" \
                + (f" +{c['exit_cost_us']:g}us" if c["exit_cost_us"] else "") + \
                f", {c['mode']}, event_idx {'on' if c['event_idx'] else 'off'}, lock " \
                f"{c['lock']}, store {c['store']}; {rs[0]['wall_s']:.1f} s per run" \
                + (f", medians of {rs[0]['repeat']} runs" if rs[0].get("repeat", 1) > 1 else "")
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
        hdr = (f"{'name':<8} {'IOPS':>9} {'vs hold':>7} {'MB/s':>7} {'p50us':>7} {'p99us':>8} "
               f"{'maxus':>9} "
               f"{'kicks/req':>9} {'irqs/req':>8} {'acq/req':>7} {'guest%':>7} {'host%':>6} "
               f"{'guest us/req':>12}")
        out.append(hdr)
        for r in rs:
            lt = r["latency_us"]
            p = r.get("pct_vs_hold", {})
            iops_pct = _fmt_pct(p.get("iops")) if r["strategy"] != "hold" else ""
            out.append(f"{r['strategy']:<8} {r['iops']:>9.0f} {iops_pct.strip():>7} "
                       f"{r['mbps']:>7.1f} {lt['p50']:>7.1f} "
                       f"{lt['p99']:>8.1f} {lt['max']:>9.1f} {r['kicks_per_request']:>9.3f} "
                       f"{r['interrupts_per_request']:>8.3f} "
                       f"{r['lock_acquisitions_per_request']:>7.2f} {r['guest_cpu_pct']:>7.1f} "
                       f"{r['host_cpu_pct']:>6.1f} {r['guest_cpu_us_per_request']:>12.1f}")
        out.append("")
        out.append("Where the guest's time went (all workers, ms; CPU user/sys in s):")
        out.append(f"{'name':<8} {'lock wait':>10} {'lock hold':>10} {'in kick':>10} "
                   f"{'io wait':>10} {'cpu user':>9} {'cpu sys':>8} {'ctxsw vol':>10} "
                   f"{'ctxsw inv':>10}")
        for r in rs:
            t = r["time_ms"]
            ws = r["workers"]
            out.append(f"{r['strategy']:<8} {t['lock_wait_ms']:>10.1f} {t['lock_hold_ms']:>10.1f} "
                       f"{t['kick_ms']:>10.1f} {t['io_wait_ms']:>10.1f} "
                       f"{sum(w['cpu_user_s'] for w in ws):>9.3f} "
                       f"{sum(w['cpu_sys_s'] for w in ws):>8.3f} "
                       f"{sum(w['ctx_switches_voluntary'] for w in ws):>10} "
                       f"{sum(w['ctx_switches_involuntary'] for w in ws):>10}")
        out.append("")
    return "\n".join(out)


def write_json(result, path):
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=default, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
