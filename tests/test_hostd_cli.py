"""virtio-hostd as a user drives it: start, status, stop, signals (Ctrl-C on
start, SIGHUP, SIGTERM), a daemon killed with SIGKILL or unable to report
ready, a second start, and bad input in one line."""

import errno
import os
import re
import select
import shutil
import signal
import subprocess

import posix_ipc
import pytest

import procs
from hostd_util import LOCKSTAT, daemon_pid, hostd, one_line_error, shm_objects, status
from procs import wait_for
from virtio_py import DeviceGoneError, QueueBrokenError
from virtio_py.blk import BlockDevice
from virtio_py.proc import pid_alive
from virtio_py.region import destroy

ROLES = ("kick", "call", "ack")


def _expected_objects(name, queues):
    return sorted([name] + [f"sem.{name}.q{q}.{r}" for q in range(queues) for r in ROLES])


def test_start_status_stop(name, tmp_path, daemons):
    p = daemons.start(
        name,
        tmp_path / "s",
        "--queues",
        2,
        "--mode",
        "poll",
        "--exit",
        "sync",
        "--lock",
        "mutex",
        "--no-event-idx",
    )
    m = re.fullmatch(r"virtio-hostd: ready: serving (\S+) \(pid (\d+)\)\n", p.stdout)
    assert m and m.group(1) == name, p.stdout
    assert p.stderr == ""
    pid = int(m.group(2))
    assert daemon_pid(name) == pid and pid_alive(pid)
    assert shm_objects(name) == _expected_objects(name, 2)
    # the stripe files, sparse
    store = tmp_path / "s"
    files = sorted(os.listdir(store))
    assert files == sorted([f"stripe-{i:02d}.img" for i in range(12)] + ["store.json"])
    st0 = os.stat(store / "stripe-00.img")
    assert st0.st_size == 11 * (64 << 10)  # 128 chunks over 12 stripes
    assert st0.st_blocks == 0

    with BlockDevice.attach(name, queue=1) as dev:
        dev.write(0, b"s" * 8192)
        dev.read(0, 8192)
        dev.flush()

    st = status(name)
    assert st["running"] and st["daemon_pid"] == pid and not st["needs_reset"]
    c = st["config"]
    assert (c["mode"], c["exit"], c["lock"], c["event_idx"], c["num_queues"]) == (
        "poll",
        "sync",
        "mutex",
        False,
        2,
    )
    assert c["capacity_bytes"] == 8 << 20
    q0, q1 = st["queues"]
    assert not q0["broken"] and not q1["broken"]
    assert q1["requests"]["out"] == 1 and q1["requests"]["in"] == 1
    assert q1["requests"]["flush"] == 1
    assert q1["avail_idx"] == q1["used_idx"] == q1["last_avail_idx"] == 3
    assert q1["lock"]["acquisitions"] > 0
    assert set(q1["lock"]) >= set(LOCKSTAT)

    # The console script and the text form.
    exe = shutil.which("virtio-hostd")
    assert exe, "virtio-hostd is not installed"
    t = subprocess.run([exe, "status", "--name", name], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stderr
    assert f"device {name}: daemon pid {pid} (running)" in t.stdout
    assert "queue 0:" in t.stdout and "queue 1:" in t.stdout and "BROKEN" not in t.stdout
    assert "mode poll, exit sync" in t.stdout and "lock mutex" in t.stdout
    assert "requests in=1 out=1 flush=1" in t.stdout
    assert "contentions=" in t.stdout and "holdtime-total=" in t.stdout

    s = hostd("stop", "--name", name)
    assert s.returncode == 0 and s.stdout == f"virtio-hostd: stopped {name} (pid {pid})\n"
    assert shm_objects(name) == []
    assert not pid_alive(pid)


def test_second_start_fails_in_one_line(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s")
    pid = daemon_pid(name)
    p = daemons.start(name, tmp_path / "other", check=False)
    assert p.returncode != 0
    assert p.stdout == ""
    assert len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("virtio-hostd: error: ") and "already" in p.stderr
    assert str(pid) in p.stderr
    # the first one is untouched
    assert daemon_pid(name) == pid and status(name)["running"]
    assert not (tmp_path / "other").exists()
    with BlockDevice.attach(name) as dev:
        dev.write(0, bytes(512))


def _writer_until_gone(name, ready_fd):
    """Write numbered blocks until the device goes; returns what completed."""
    done = []
    err = None
    with BlockDevice.attach(name, timeout=20) as dev:
        i = 0
        try:
            while True:
                off = (i % 256) * 4096
                data = i.to_bytes(4, "little") * 1024
                dev.write(off, data)
                done.append((off, i))
                i += 1
                if i == 20:
                    os.write(ready_fd, b"r")  # requests are flowing
        except (DeviceGoneError, QueueBrokenError) as e:
            err = type(e).__name__
    return done, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_in_flight_and_cleans_up(sig, name, tmp_path, daemons):
    store = tmp_path / "s"
    proc, lines = daemons.foreground(name, store, "--stripes", 4, "--chunk", "8K", size="1M")
    assert lines[-1] == f"virtio-hostd: ready: serving {name} (pid {proc.pid})"
    r, w = os.pipe()
    guest = procs.Child(_writer_until_gone, name, w)
    try:
        assert os.read(r, 1) == b"r"
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        done, err = guest.join(60)
    finally:
        guest.kill()
        os.close(r)
        os.close(w)
    assert err == "DeviceGoneError"
    assert shm_objects(name) == []
    # Every write the guest saw complete is on the store.
    out = tmp_path / "img"
    hostd("assemble", "--store", store, "--out", out, check=True)
    img = out.read_bytes()
    last = {}
    for off, i in done:
        last[off] = i
    for off, i in last.items():
        assert img[off : off + 4096] == i.to_bytes(4, "little") * 1024, f"block at {off}"


def _reader_until_gone(name, ready_fd):
    """Read until the device goes; returns the error that ended the reads."""
    with BlockDevice.attach(name, timeout=20) as dev:
        dev.read(0, 4096)
        os.write(ready_fd, b"r")  # requests are flowing
        try:
            while True:
                dev.read(0, 4096)
        except (DeviceGoneError, QueueBrokenError) as e:
            return type(e).__name__


def test_sigkill_leftovers_are_detected_and_replaced(name, tmp_path, daemons):
    store = tmp_path / "s"
    daemons.start(name, store, "--queues", 2)
    pid = daemon_pid(name)
    with BlockDevice.attach(name) as dev:
        dev.write(8192, b"K" * 4096)
    r, w = os.pipe()
    guest = procs.Child(_reader_until_gone, name, w)
    try:
        assert os.read(r, 1) == b"r"
        os.kill(pid, signal.SIGKILL)
        # A guest waiting on the dead device is told so (not left to hang,
        # which would end in a timeout error).
        err = guest.join(60)
    finally:
        guest.kill()
        os.close(r)
        os.close(w)
    assert err == "DeviceGoneError"
    wait_for(lambda: not pid_alive(pid), "the daemon to die")
    assert shm_objects(name) == _expected_objects(name, 2)
    st = status(name)
    assert not st["running"] and st["daemon_pid"] == pid
    t = hostd("status", "--name", name, check=True)
    assert "NOT running" in t.stdout

    p = daemons.start(name, store)
    notes = [ln for ln in p.stdout.splitlines() if "notice" in ln]
    assert len(notes) == 1, p.stdout
    assert "died" in notes[0] and f"pid {pid}" in notes[0]
    new = daemon_pid(name)
    assert new != pid and pid_alive(new)
    assert shm_objects(name) == _expected_objects(name, 1)
    with BlockDevice.attach(name) as dev:
        assert dev.read(8192, 4096) == b"K" * 4096

    # stop on the leftovers of a dead daemon cleans them up too.
    os.kill(new, signal.SIGKILL)
    wait_for(lambda: not pid_alive(new), "the daemon to die")
    s = hostd("stop", "--name", name)
    assert s.returncode == 0 and len(s.stdout.splitlines()) == 1
    assert "not running" in s.stdout
    assert shm_objects(name) == []


def test_daemon_that_cannot_report_ready_unlinks_everything(name, tmp_path):
    """The detached daemon reports "ready" through a pipe; if the parent is
    gone (Ctrl-C on start), the write fails and the daemon must not die
    leaving its region and semaphores behind."""

    def body():
        from host_daemon.cli import _serve
        from host_daemon.daemon import HostDaemon

        def report(line):
            if line.startswith("ready:"):
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        try:
            _serve(HostDaemon(name, str(tmp_path / "s"), 8 << 20), report)
        except BrokenPipeError:
            pass
        return shm_objects(name)

    try:
        assert procs.run(body) == []
    finally:
        destroy(name)


def test_interrupted_start_stops_the_daemon_it_forked(name, tmp_path):
    """Ctrl-C while `virtio-hostd start` waits for readiness: the forked
    daemon is stopped (and reaped) before start returns."""

    def body():
        from host_daemon import cli
        from host_daemon.daemon import HostDaemon

        setup, request_stop = HostDaemon.setup, HostDaemon.request_stop
        # A pipe, not a threading.Event: stop() runs in a signal handler, and
        # Event.set() there deadlocks against a main thread inside Event.wait().
        asked_r, asked_w = os.pipe()

        def stop(self, *args):
            os.write(asked_w, b"x")
            request_stop(self, *args)

        def setup_while_interrupted(self):
            # In the forked daemon: Ctrl-C reaches start while the daemon
            # sets up, and setup goes on once start asked the daemon to stop.
            os.kill(os.getppid(), signal.SIGINT)
            select.select([asked_r], [], [], 30)
            setup(self)

        HostDaemon.request_stop = stop
        HostDaemon.setup = setup_while_interrupted
        signal.signal(signal.SIGINT, signal.default_int_handler)
        rc = cli.main(["start", "--name", name, "--store", str(tmp_path / "s"), "--size", "8M"])
        try:
            left = os.waitpid(-1, os.WNOHANG)  # (0, 0): a child still runs
        except ChildProcessError:
            left = None
        return rc, left

    try:
        rc, left = procs.run(body)
        assert rc == 130
        assert left is None, "the daemon outlived the interrupted start"
        assert shm_objects(name) == []  # it unlinked all before it exited
    finally:
        destroy(name)


def test_foreground_daemon_cleans_up_on_sighup(name, tmp_path, daemons):
    """A terminal that closes sends SIGHUP to a --foreground daemon."""
    proc, _ = daemons.foreground(name, tmp_path / "s")
    assert shm_objects(name)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(30) == 0
    assert shm_objects(name) == []


def test_leftover_semaphores_without_region(name, tmp_path, daemons):
    for role in ROLES:
        posix_ipc.Semaphore(f"/{name}.q3.{role}", posix_ipc.O_CREX, initial_value=0).close()
    p = daemons.start(name, tmp_path / "s")
    assert "removed 3 leftover objects" in p.stdout
    assert shm_objects(name) == _expected_objects(name, 1)


def test_a_directory_where_the_region_goes_is_named_in_one_line(name, tmp_path):
    path = f"/dev/shm/{name}"
    os.mkdir(path)
    try:
        p = hostd("start", "--name", name, "--store", str(tmp_path / "s"))
        one_line_error(p, "virtio-hostd", f"cannot remove {path}: Is a directory")
        assert not (tmp_path / "s").exists()
    finally:
        os.rmdir(path)


BAD = [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["start"], "required"),
    (["start", "--name", "NAME"], "--store"),
    (["start", "--name", "NAME", "--store", "DIR", "--size", "12Q"], "size"),
    (["start", "--name", "NAME", "--store", "DIR", "--size", "1000"], "--size"),
    (["start", "--name", "NAME", "--store", "DIR", "--size", "0"], "--size"),
    (["start", "--name", "NAME", "--store", "DIR", "--stripes", "0"], "--stripes"),
    (["start", "--name", "NAME", "--store", "DIR", "--stripes", "65"], "--stripes"),
    (["start", "--name", "NAME", "--store", "DIR", "--stripes", "x"], "--stripes"),
    (["start", "--name", "NAME", "--store", "DIR", "--chunk", "1000"], "--chunk"),
    (["start", "--name", "NAME", "--store", "DIR", "--queues", "0"], "--queues"),
    (["start", "--name", "NAME", "--store", "DIR", "--queues", "17"], "--queues"),
    (["start", "--name", "NAME", "--store", "DIR", "--queue-size", "100"], "--queue-size"),
    (["start", "--name", "NAME", "--store", "DIR", "--queue-size", "65536"], "--queue-size"),
    (["start", "--name", "NAME", "--store", "DIR", "--mode", "fast"], "--mode"),
    (["start", "--name", "NAME", "--store", "DIR", "--exit", "maybe"], "--exit"),
    (["start", "--name", "NAME", "--store", "DIR", "--lock", "ticket"], "--lock"),
    (["start", "--name", "NAME", "--store", "DIR", "--io-threads", "-1"], "--io-threads"),
    (["start", "--name", "NAME", "--store", "DIR", "--serial", "s" * 21], "--serial"),
    (["start", "--name", "NAME", "--store", "DIR", "--buffers", "4K"], "--buffers"),
    (["start", "--name", "bad/name", "--store", "DIR"], "name"),
    (["start", "--name", "", "--store", "DIR"], "name"),
    (["start", "--name", "NAME", "--store", "FILE"], "store"),
    (["status", "--name", "NAME"], "no device"),
    (["stop", "--name", "NAME"], "no device"),
    (["status"], "--name"),
    (["assemble", "--store", "DIR", "--out", "OUT"], "store.json"),
    (
        [
            "assemble",
            "--store",
            "FILE",
            "--out",
            "OUT",
            "--stripes",
            "2",
            "--chunk",
            "4K",
            "--size",
            "1M",
        ],
        "Not a directory",
    ),
]


@pytest.mark.parametrize("argv,word", BAD, ids=[" ".join(a)[:60] or "nothing" for a, _ in BAD])
def test_bad_input_one_line_error(argv, word, name, tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a directory")
    subst = {
        "NAME": name,
        "DIR": str(tmp_path / "d"),
        "FILE": str(f),
        "OUT": str(tmp_path / "out.img"),
    }
    p = hostd(*[subst.get(a, a) for a in argv])
    assert p.returncode != 0
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("virtio-hostd") and "error" in lines[0]
    assert word in lines[0]
    assert "Traceback" not in p.stderr
    assert shm_objects(name) == []
    assert not (tmp_path / "out.img").exists()


def test_stop_with_a_bad_timeout_does_not_stop_the_daemon(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s")
    for t in ("-1", "0", "inf"):
        p = hostd("stop", "--name", name, "--timeout", t)
        one_line_error(p, "virtio-hostd", "--timeout")
    assert status(name)["running"]


@pytest.mark.parametrize(
    "opts,word",
    [
        (["--stripes", "-3"], "--stripes"),
        (["--stripes", "0"], "--stripes"),
        (["--chunk", "0"], "chunk"),
        (["--chunk", "100"], "chunk"),
        (["--size", "0"], "size"),
        (["--size", "1000"], "size"),
    ],
)
def test_assemble_bad_geometry_is_one_line(opts, word, tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    (store / "store.json").write_text('{"stripes": 2, "chunk": 4096, "size": 65536}')
    for i in range(2):
        (store / f"stripe-{i:02d}.img").write_bytes(bytes(32768))
    p = hostd("assemble", "--store", store, "--out", tmp_path / "out.img", *opts)
    one_line_error(p, "virtio-hostd", word)
    assert not (tmp_path / "out.img").exists()
