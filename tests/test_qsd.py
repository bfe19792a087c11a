"""The RFC experiment on QEMU's own virtio-blk device: `virtio-emu compare
--device qsd` starts a qemu-storage-daemon on a raw file for the run and
drives it over vhost-user with the same workers, lock and strategies;
`--device vhost-user:PATH` drives any back-end already listening.  Every
table is there, each says which device served it and that it exited async,
and nothing is left behind, also after Ctrl-C."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

import procs
from hostd_util import emu, one_line_error
from virtio_py.qsd import QsdProcess, qsd_path

pytestmark = pytest.mark.skipif(
    qsd_path() is None, reason="qemu-storage-daemon is not installed (Debian: qemu-system-common)"
)
SMALL = ["--runtime", "0.5", "--repeat", "1", "--size", "64M", "--area", "1M"]


@pytest.fixture
def prefix(name):
    return f"{name}r{uuid.uuid4().hex[:6]}"


def compare_cmd(prefix, *args):
    return [sys.executable, "-m", "virtio_py", "compare", "--name-prefix", prefix, *SMALL, *args]


def ours(prefix):
    """/dev/shm entries and live processes (qemu-storage-daemon's command
    line names its socket, whose directory carries the prefix)."""
    return procs.prefixed(prefix)


def test_compare_on_qsd_prints_every_table_and_says_which_device_served(prefix, tmp_path):
    out = tmp_path / "cmp.json"
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--device", "qsd", "--json", str(out), "--workdir", str(work))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    assert "name con-bounces contentions waittime-min waittime-max waittime-total" in text
    assert "name acq-bounces acquisitions holdtime-min holdtime-max holdtime-total" in text
    assert "Where the guest's time went" in text
    title = next(line for line in p.stdout.splitlines() if line.startswith("== RFC setup"))
    assert "qemu-storage-daemon" in title and "exit async" in title
    assert "every row exits async" in p.stderr  # and it says why the base row differs
    res = json.loads(out.read_text())
    assert res["device"] == "qsd"
    runs = res["runs"]
    assert [r["strategy"] for r in runs] == ["hold", "release", "prepare"]
    for r in runs:
        c = r["config"]
        assert c["exit"] == "async" and c["transport"] == "vhost-user"
        assert c["served_by"].startswith("qemu-storage-daemon")
        assert c["daemon_pid"] == c["backend_pid"] > 0
        assert r["ios"] > 0 and r["errors"] == 0
        assert r["requests_added"] == r["requests_completed"] == r["ios"]
        assert r["lockstat"]["acquisitions"] > r["ios"]
        assert r["host_cpu_s"] > 0  # qemu-storage-daemon's own CPU
    assert "pct_vs_hold" in runs[1]
    assert list(work.iterdir()) == []  # the raw file is gone
    assert ours(prefix) == ([], [])


def test_compare_on_a_running_back_end(prefix, tmp_path):
    d = tempfile.mkdtemp(prefix="vhu", dir="/tmp")
    image = os.path.join(d, "disk.raw")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    try:
        with QsdProcess(image, os.path.join(d, "s.sock")) as qsd:
            p = subprocess.run(
                compare_cmd(prefix, "--device", f"vhost-user:{qsd.sock}", "--strategies",
                            "hold,prepare", "--event-idx", "--no-rfc-row"),
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr
            title = next(line for line in p.stdout.splitlines() if line.startswith("== "))
            assert f"vhost-user {qsd.sock}" in title and "event_idx on" in title
            assert "store" not in title  # the back-end's store is its own
            assert qsd.proc.poll() is None  # ours to stop, not compare's
    finally:
        shutil.rmtree(d)
    assert ours(prefix) == ([], [])


@pytest.mark.parametrize(
    "opts,word",
    [
        (["--device", "qsd", "--row", "sync"], "asynchronous"),
        (["--device", "qsd", "--poll"], "poll"),
        (["--device", "vhost-user:/x.sock", "--shm"], "store"),
        (["--device", "qemu"], "device"),
        (["--device", "vhost-user:"], "device"),
    ],
)
def test_compare_on_vhost_user_refuses_what_it_cannot_run_before_starting(prefix, opts, word):
    p = emu("compare", "--name-prefix", prefix, *SMALL, *opts)
    one_line_error(p, "virtio-emu", word)
    assert ours(prefix) == ([], [])


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigint_during_compare_on_qsd_leaves_nothing_behind(prefix, tmp_path, group):
    """SIGINT to compare alone, and to its whole process group (a terminal's
    Ctrl-C), while qemu-storage-daemon completes the workers' requests."""
    work = tmp_path / "work"
    work.mkdir()
    cmd = compare_cmd(prefix, "--device", "qsd", "--workdir", str(work))
    cmd[cmd.index("--runtime") + 1] = "30"
    procs.interrupt_compare(cmd, prefix, group)
    assert list(work.iterdir()) == []
