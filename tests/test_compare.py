"""virtio-emu compare end to end on a small configuration, its JSON, that
Ctrl-C leaves nothing behind, bad input refused before anything starts, and
how repeats combine."""

import json
import math
import os
import signal
import subprocess
import sys
import uuid

import pytest

import procs
from hostd_util import LOCKSTAT, emu, one_line_error, processes_with, shm_objects
from procs import wait_for
from virtio_py.compare import BASE, DaemonProcess, combine, format_tables, parse_row, pct_change
from virtio_py.cpus import format_cpus, split_for_device
from virtio_py.errors import ConfigError
from virtio_py.region import destroy

RUN_KEYS = (
    "strategy",
    "config",
    "lockstat",
    "iops",
    "mbps",
    "guest_cpu_pct",
    "host_cpu_pct",
    "kicks_per_request",
)
SMALL = ["--runtime", "1", "--repeat", "1", "--size", "64M", "--area", "2M"]


@pytest.fixture
def prefix(name):
    """Device name prefix: the test's name plus a random part, since /dev/shm
    is shared with sessions in other pid namespaces (same pids, same names)."""
    return f"{name}r{uuid.uuid4().hex[:6]}"


def compare_cmd(prefix, *args):
    return [sys.executable, "-m", "virtio_py", "compare", "--name-prefix", prefix, *SMALL, *args]


ours = procs.prefixed


def compare_rows(prefix, tmp_path, *args):
    """`compare --no-rfc-row ARGS --quiet --json`, which must succeed: the
    finished process and the runs of its JSON."""
    out = tmp_path / "cmp.json"
    p = subprocess.run(
        compare_cmd(prefix, "--no-rfc-row", *args, "--quiet", "--json", str(out)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr
    return p, json.loads(out.read_text())["runs"]


def test_compare_end_to_end(prefix, tmp_path):
    out = tmp_path / "cmp.json"
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--json", str(out), "--workdir", str(work))
    cmd[cmd.index("--repeat") + 1] = "2"  # medians of two interleaved runs
    cmd[cmd.index("--runtime") + 1] = "0.7"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "name con-bounces contentions waittime-min waittime-max waittime-total" in " ".join(
        text.split()
    )
    assert "name acq-bounces acquisitions holdtime-min holdtime-max holdtime-total" in " ".join(
        text.split()
    )
    assert "%)" in text
    res = json.loads(out.read_text())
    runs = res["runs"]
    assert [r["strategy"] for r in runs] == ["hold", "release", "prepare"]
    for r in runs:
        for k in RUN_KEYS:
            assert k in r, k
        for k in LOCKSTAT:
            assert isinstance(r["lockstat"][k], (int, float)), k
        assert r["repeat"] == 2 and len(r["repeats"]) == 2
        assert r["ios"] > 0 and r["errors"] == 0
        assert r["requests_added"] == r["requests_completed"] == r["ios"]
        c = r["config"]
        assert (c["workers"], c["rw"], c["bs"], c["iodepth"], c["queues"], c["exit"]) == (
            4,
            "read",
            4096,
            1,
            1,
            "sync",
        )
        assert (c["stripes"], c["chunk"]) == (12, 64 << 10)
        assert set(r["pct_vs_hold"]) >= set(LOCKSTAT)
        # The completion path takes the lock too: more acquisitions than requests.
        for rep in r["repeats"]:
            assert rep["lockstat"]["acquisitions"] > rep["ios"] > 0
    assert runs[0]["kicks_per_request"] > 0
    assert list(work.iterdir()) == []  # the temporary store is gone
    assert ours(prefix) == ([], [])


def test_compare_extra_rows(prefix, tmp_path):
    p, runs = compare_rows(
        prefix,
        tmp_path,
        "--row",
        "shm+event-idx+iodepth=4",
        "--mq",
        "--strategies",
        "hold,prepare",
        "--workers",
        "2",
    )
    assert [(r["row"], r["strategy"]) for r in runs] == [
        ("shm+event-idx+iodepth=4", "hold"),
        ("shm+event-idx+iodepth=4", "prepare"),
        ("mq", "hold"),
        ("mq", "prepare"),
    ]
    shm, mq = runs[0]["config"], runs[2]["config"]
    assert shm["store"] == "shm" and shm["event_idx"] and shm["iodepth"] == 4
    assert mq["queues"] == 2 and mq["queues_used"] == 2
    assert sorted(w["queue"] for w in runs[2]["workers"]) == [0, 1]
    assert p.stderr == ""  # --quiet
    assert ours(prefix) == ([], [])


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigint_leaves_nothing_behind(prefix, tmp_path, group):
    """SIGINT to compare alone, and to its whole process group (a terminal's
    Ctrl-C), while the workers' requests complete."""
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--workdir", str(work), "--shm")
    cmd[cmd.index("--runtime") + 1] = "30"
    procs.interrupt_compare(cmd, prefix, group)
    assert list(work.iterdir()) == []


# A Ctrl-C that comes while compare forks (the nth time): the first row's
# daemon is fork 1, its workers forks 2 to 5.
AT_FORK = """
import os, signal, sys
from virtio_py.cli import main
forks = 0
def count():
    global forks
    forks += 1
def hook():
    if forks == {n}:
        {kill}
os.register_at_fork(before=count, {when}=hook)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "n,who",
    [(1, "process"), (1, "process-group"), (2, "process"), (2, "process-group"), (5, "process")],
    ids=[
        "daemon-process",
        "daemon-process-group",
        "worker-process",
        "worker-process-group",
        "last-worker-process",
    ],
)
def test_sigint_while_compare_forks_stops_it(prefix, tmp_path, n, who):
    """os.fork runs Python at-fork hooks; a SIGINT raised in one is dropped
    by Python, so compare must not take it there: SIGINT to compare in its
    parent's hooks, or to the whole process group in the child's (before
    the child handles signals its own way), stops it like any Ctrl-C."""
    if who == "process":
        kill, when = "os.kill(os.getpid(), signal.SIGINT)", "after_in_parent"
    else:
        kill, when = "os.killpg(0, signal.SIGINT)", "after_in_child"
    code = AT_FORK.format(n=n, when=when, kill=kill)
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--workdir", str(work), "--shm")
    cmd[cmd.index("--runtime") + 1] = "30"
    cmd[1:3] = ["-c", code]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True)
    procs.assert_interrupted(p.returncode, p.stderr, lambda: ours(prefix) == ([], []))
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    "opts,word",
    [
        (["--row", "queues=0"], "queues"),
        (["--row", "lock=ticket"], "lock"),
        (["--row", "exit-cost=-5"], "exit cost"),
        (["--exit-cost", "nan"], "exit cost"),
        (["--size", "0"], "size"),
        (["--chunk", "100"], "chunk"),
        (["--runtime", "inf"], "--runtime"),
        (["--strategies", ","], "--strategies"),
        (["--workdir", "/nonexistent/dir"], "--workdir"),
        (["--json", "/nonexistent/dir/c.json"], "--json"),
        (["--plot", "/nonexistent/dir/c.png"], "--plot"),
    ],
)
def test_compare_bad_input_fails_before_starting_anything(opts, word, prefix):
    p = emu(
        "compare",
        "--name-prefix",
        prefix,
        "--runtime",
        "0.2",
        "--repeat",
        "1",
        "--size",
        "64M",
        "--area",
        "1M",
        "--shm",
        "--no-rfc-row",
        *opts,
        timeout=60,
    )
    one_line_error(p, "virtio-emu", word)
    assert "host daemon" not in p.stderr
    assert ours(prefix)[0] == []


def test_a_placed_row_runs_the_daemon_and_the_workers_on_cpus_of_their_own(prefix, tmp_path):
    split = split_for_device()
    if split is None:
        pytest.skip("one CPU: nothing to place on")
    device, guests = (format_cpus(c) for c in split)
    p, (run,) = compare_rows(prefix, tmp_path, "--row", "shm+placed", "--strategies", "hold")
    c = run["config"]
    assert c["placed"] and c["daemon_cpus"] == device and c["guest_cpus"] == guests
    assert {w["cpus"] for w in run["workers"]} == {guests}
    assert f"daemon on CPUs {device}, workers on CPUs {guests}" in p.stdout
    assert ours(prefix) == ([], [])


def test_a_halt_poll_row_runs_workers_that_halt_poll(prefix, tmp_path):
    p, runs = compare_rows(
        prefix, tmp_path, "--row", "shm+halt-poll=10000", "--strategies", "hold,prepare"
    )
    assert [r["strategy"] for r in runs] == ["hold", "prepare"]
    for r in runs:
        assert r["config"]["halt_poll_us"] == 10000
        assert r["wakeups"]["halt_polled"] > 0
    assert "halt polling up to 10000 us" in p.stdout
    assert ours(prefix) == ([], [])


def test_a_placed_row_is_refused_on_a_vhost_user_device(prefix):
    p = emu("compare", "--name-prefix", prefix, "--device", "vhost-user:/nonexistent.sock",
            "--no-rfc-row", "--row", "placed", timeout=60)  # fmt: skip
    one_line_error(p, "virtio-emu", "placed")


def test_daemon_process_interrupted_while_starting_is_stopped(prefix, tmp_path):
    """Ctrl-C while compare waits for its daemon: the daemon is stopped at
    once (it must not go on writing into a store being removed)."""
    dev = prefix

    def body():
        def interrupted(self, timeout):
            # Ctrl-C, once the daemon runs and before it said it is ready.
            wait_for(lambda: processes_with(dev), "the daemon process")
            raise KeyboardInterrupt

        DaemonProcess._wait_ready = interrupted
        d = DaemonProcess(dev, str(tmp_path / "store"), dict(BASE, size=64 << 20))
        try:
            d.start()
            return "started"
        except KeyboardInterrupt:
            return processes_with(dev)

    try:
        assert procs.run(body) == []
        assert shm_objects(dev) == []
    finally:
        for pid in processes_with(dev):
            os.kill(pid, signal.SIGKILL)
        destroy(dev)


def test_repeats_combine_into_one_consistent_run():
    """Counts and rates of the combined run come from the same statistic:
    kicks / ios is kicks per request, and requests match ios."""

    def rep(ios, kicks, errors=0):
        ls = dict.fromkeys(("acquisitions",), 2 * ios)
        return {
            "iops": ios / 2.0,
            "mbps": 1.0,
            "wall_s": 2.0,
            "ios": ios,
            "bytes": ios * 4096,
            "requests_added": ios,
            "requests_completed": ios,
            "kicks": kicks,
            "kicks_suppressed": 0,
            "kicks_taken": kicks,
            "interrupts": kicks,
            "interrupts_suppressed": 0,
            "kicks_per_request": kicks / ios,
            "interrupts_per_request": kicks / ios,
            "lock_acquisitions_per_request": 2.0,
            "guest_cpu_s": 1.0,
            "guest_cpu_pct": 50.0,
            "guest_cpu_pct_of_machine": 25.0,
            "guest_cpu_us_per_request": 1.0,
            "host_cpu_s": 1.0,
            "host_cpu_pct": 50.0,
            "host_cpu_us_per_request": 1.0,
            "lockstat": ls,
            "lockstat_ns": {},
            "latency_us": {"p50": 1.0},
            "time_ms": {},
            "errors": errors,
            "dup_completions": 0,
            "queue_full": 0,
        }

    out = combine([rep(1000, 500), rep(2000, 1000, errors=1), rep(3000, 1500)])
    assert out["ios"] == out["requests_added"] == out["requests_completed"] == 2000
    assert out["bytes"] == 2000 * 4096
    assert out["kicks"] / out["ios"] == out["kicks_per_request"] == 0.5
    assert out["errors"] == 1
    assert out["repeat"] == 3 and len(out["repeats"]) == 3
    # The median keeps a run's precision: 0.9996 kicks per request is not 1.0.
    out = combine([rep(10000, k) for k in (9996, 9994, 9998)])
    assert out["kicks_per_request"] == 0.9996


def test_write_json_leaves_no_temporary_file(tmp_path):
    from virtio_py.compare import write_json

    out = tmp_path / "r.json"
    with pytest.raises(ValueError):
        write_json({"iops": math.nan}, str(out))
    assert list(tmp_path.iterdir()) == []


def test_rows_and_changes():
    assert parse_row("shm+event-idx+iodepth=16")[1] == {
        "store": "shm",
        "event_idx": True,
        "iodepth": 16,
    }
    assert parse_row("halt-poll=50+shm")[1] == {"halt_poll_us": 50.0, "store": "shm"}
    with pytest.raises(ConfigError, match="unknown row token"):
        parse_row("shm+bogus")
    assert pct_change(7, 100) == -93.0
    assert pct_change(0, 0) is None


def test_tables_have_the_rfc_columns():
    def run(strategy, hold_max, iops):
        ls = dict.fromkeys(LOCKSTAT, 1)
        ls["holdtime-max"] = hold_max
        return {
            "strategy": strategy,
            "row": "",
            "lockstat": ls,
            "iops": iops,
            "mbps": 1.0,
            "wall_s": 1.0,
            "latency_us": {"p50": 1, "p99": 2, "max": 3},
            "kicks_per_request": 1.0,
            "interrupts_per_request": 1.0,
            "lock_acquisitions_per_request": 2.0,
            "guest_cpu_pct": 50.0,
            "host_cpu_pct": 10.0,
            "guest_cpu_us_per_request": 5.0,
            "time_ms": dict.fromkeys(
                ("lock_wait_ms", "lock_hold_ms", "kick_ms", "io_wait_ms"), 1.0
            ),
            "workers": [],
            "pct_vs_hold": {},
            "config": {
                "workers": 4,
                "rw": "read",
                "bs": 4096,
                "iodepth": 1,
                "queues": 1,
                "exit": "sync",
                "exit_cost_us": 0,
                "mode": "notify",
                "event_idx": False,
                "lock": "spinyield",
                "store": "disk",
            },
        }

    text = format_tables({"runs": [run("hold", 3271.81, 100), run("release", 219.76, 100)]})
    assert "219.76 (-93%)" in text


def test_plot_without_matplotlib_is_one_line(monkeypatch):
    from virtio_py import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="needs matplotlib"):
        plot._pyplot()


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from virtio_py.plot import plot_compare

    ls = dict.fromkeys(LOCKSTAT, 1.0)
    runs = [
        {
            "strategy": s,
            "row": "",
            "lockstat": ls,
            "iops": 10.0,
            "guest_cpu_pct": 5.0,
            "config": {"workers": 4, "rw": "read", "bs": 4096, "exit": "sync", "lock": "spinyield"},
        }
        for s in ("hold", "release", "prepare")
    ]
    out = tmp_path / "p.png"
    plot_compare({"runs": runs, "runtime": 1}, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
