"""virtio-emu compare end to end on a small configuration, its JSON, and
that Ctrl-C leaves nothing behind."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from virtio_py.compare import format_tables, parse_row, pct_change
from virtio_py.errors import ConfigError

LOCKSTAT = ("con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total",
            "acq-bounces", "acquisitions", "holdtime-min", "holdtime-max", "holdtime-total")
RUN_KEYS = ("strategy", "config", "lockstat", "iops", "mbps", "guest_cpu_pct", "host_cpu_pct",
            "kicks_per_request")
SMALL = ["--runtime", "1", "--repeat", "1", "--size", "64M", "--area", "2M"]


@pytest.fixture
def prefix(name):
    """Device name prefix: the test's name plus a random part, since /dev/shm
    is shared with sessions in other pid namespaces (same pids, same names)."""
    return f"{name}r{uuid.uuid4().hex[:6]}"


def compare_cmd(prefix, *args):
    return [sys.executable, "-m", "virtio_py", "compare", "--name-prefix", prefix, *SMALL,
            *args]


def ours(prefix):
    """/dev/shm entries and live processes that carry the prefix."""
    shm = [e for e in os.listdir("/dev/shm") if prefix in e]
    procs = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if prefix.encode() in f.read():
                    procs.append(int(pid))
        except OSError:
            pass
    return shm, procs


def test_compare_end_to_end(prefix, tmp_path):
    out = tmp_path / "cmp.json"
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--json", str(out), "--workdir", str(work))
    cmd[cmd.index("--repeat") + 1] = "2"       # medians of two interleaved runs
    cmd[cmd.index("--runtime") + 1] = "0.7"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "name con-bounces contentions waittime-min waittime-max waittime-total" in \
        " ".join(text.split())
    assert "name acq-bounces acquisitions holdtime-min holdtime-max holdtime-total" in \
        " ".join(text.split())
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
        assert (c["workers"], c["rw"], c["bs"], c["iodepth"], c["queues"], c["exit"]) == \
            (4, "read", 4096, 1, 1, "sync")
        assert (c["stripes"], c["chunk"]) == (12, 64 << 10)
        assert set(r["pct_vs_hold"]) >= set(LOCKSTAT)
        # The completion path takes the lock too: more acquisitions than requests.
        for rep in r["repeats"]:
            assert rep["lockstat"]["acquisitions"] > rep["ios"] > 0
    assert runs[0]["kicks_per_request"] > 0
    assert list(work.iterdir()) == []          # the temporary store is gone
    assert ours(prefix) == ([], [])


def test_compare_extra_rows(prefix, tmp_path):
    out = tmp_path / "cmp.json"
    p = subprocess.run(compare_cmd(prefix, "--no-rfc-row", "--row", "shm+event-idx+iodepth=4",
                                   "--mq", "--strategies", "hold,prepare", "--workers", "2",
                                   "--quiet", "--json", str(out)),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(r["row"], r["strategy"]) for r in runs] == [
        ("shm+event-idx+iodepth=4", "hold"), ("shm+event-idx+iodepth=4", "prepare"),
        ("mq", "hold"), ("mq", "prepare")]
    shm, mq = runs[0]["config"], runs[2]["config"]
    assert shm["store"] == "shm" and shm["event_idx"] and shm["iodepth"] == 4
    assert mq["queues"] == 2 and mq["queues_used"] == 2
    assert sorted(w["queue"] for w in runs[2]["workers"]) == [0, 1]
    assert p.stderr == ""                      # --quiet
    assert ours(prefix) == ([], [])


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigint_leaves_nothing_behind(prefix, tmp_path, group):
    """SIGINT to compare alone, and to its whole process group (a terminal's
    Ctrl-C), while the workers run."""
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--workdir", str(work), "--shm")
    cmd[cmd.index("--runtime") + 1] = "30"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        # Wait until a daemon serves and the workers are attached.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            shm, procs = ours(prefix)
            if any(e.startswith(prefix) and "store" not in e for e in shm) and len(procs) >= 6:
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("compare did not get its workers running")
        time.sleep(0.5)
        if group:
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while ours(prefix) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.1)                         # the kernel reaps the last exits
    assert ours(prefix) == ([], [])
    assert list(work.iterdir()) == []


def test_rows_and_changes():
    assert parse_row("shm+event-idx+iodepth=16")[1] == {"store": "shm", "event_idx": True,
                                                        "iodepth": 16}
    with pytest.raises(ConfigError, match="unknown row token"):
        parse_row("shm+bogus")
    assert pct_change(7, 100) == -93.0
    assert pct_change(0, 0) is None


def test_tables_have_the_rfc_columns():
    def run(strategy, hold_max, iops):
        ls = dict.fromkeys(LOCKSTAT, 1)
        ls["holdtime-max"] = hold_max
        return {"strategy": strategy, "row": "", "lockstat": ls, "iops": iops, "mbps": 1.0,
                "wall_s": 1.0, "latency_us": {"p50": 1, "p99": 2, "max": 3},
                "kicks_per_request": 1.0, "interrupts_per_request": 1.0,
                "lock_acquisitions_per_request": 2.0, "guest_cpu_pct": 50.0,
                "host_cpu_pct": 10.0, "guest_cpu_us_per_request": 5.0,
                "time_ms": dict.fromkeys(("lock_wait_ms", "lock_hold_ms", "kick_ms",
                                          "io_wait_ms"), 1.0),
                "workers": [], "pct_vs_hold": {},
                "config": {"workers": 4, "rw": "read", "bs": 4096, "iodepth": 1, "queues": 1,
                           "exit": "sync", "exit_cost_us": 0, "mode": "notify",
                           "event_idx": False, "lock": "spinyield", "store": "disk"}}
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
    runs = [{"strategy": s, "row": "", "lockstat": ls, "iops": 10.0, "guest_cpu_pct": 5.0,
             "config": {"workers": 4, "rw": "read", "bs": 4096, "exit": "sync",
                        "lock": "spinyield"}} for s in ("hold", "release", "prepare")]
    out = tmp_path / "p.png"
    plot_compare({"runs": runs, "runtime": 1}, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
