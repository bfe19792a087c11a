"""Regression tests of the Python review: cleanup on interrupts and on
failures to report, one-line errors for bad input, statistics of repeats."""
import errno
import math
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import procs
from hostd_util import daemons, hostd, pid_running, shm_objects  # noqa: F401
from virtio_py.compare import BASE, DaemonProcess, combine
from virtio_py.errors import ConfigError
from virtio_py.region import Region, destroy
from virtio_py.workload import JobError, JobSpec, run_job

EMU = [sys.executable, "-m", "virtio_py"]


def emu(*args, timeout=120):
    return subprocess.run(EMU + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(p, prog, word):
    assert p.returncode not in (0, None), p.stdout + p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(prog) and "error" in lines[0] and word in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def processes_with(text):
    """pids of live processes whose command line contains text."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read() and pid_running(int(pid)):
                        found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.fixture
def device(name, tmp_path):
    """A device name whose daemon (a child process) serves a 64M store."""
    dev = f"{name}r{uuid.uuid4().hex[:6]}"
    d = DaemonProcess(dev, str(tmp_path / "store"), dict(BASE, size=64 << 20, stripes=4))
    d.start()
    try:
        yield dev
    finally:
        d.stop()


# ---------------------------------------------------------------- host daemon
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
        setup = HostDaemon.setup

        def slow_setup(self):
            time.sleep(0.5)
            setup(self)
        HostDaemon.setup = slow_setup

        def interrupt(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        rc = cli.main(["start", "--name", name, "--store", str(tmp_path / "s"), "--size", "8M"])
        try:
            left = os.waitpid(-1, os.WNOHANG)     # (0, 0): a child still runs
        except ChildProcessError:
            left = None
        return rc, left
    try:
        rc, left = procs.run(body)
        assert rc == 130
        assert left is None, "the daemon outlived the interrupted start"
        deadline = time.monotonic() + 10
        while shm_objects(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shm_objects(name) == []
    finally:
        destroy(name)


def test_foreground_daemon_cleans_up_on_sighup(name, tmp_path, daemons):
    """A terminal that closes sends SIGHUP to a --foreground daemon."""
    proc, _ = daemons.foreground(name, tmp_path / "s")
    assert shm_objects(name)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(30) == 0
    assert shm_objects(name) == []


def test_stop_with_a_bad_timeout_does_not_stop_the_daemon(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s")
    for t in ("-1", "0", "inf"):
        p = hostd("stop", "--name", name, "--timeout", t)
        one_line_error(p, "virtio-hostd", "--timeout")
    st = hostd("status", "--name", name, "--json", check=True)
    assert '"running": true' in st.stdout


@pytest.mark.parametrize("opts,word", [
    (["--stripes", "-3"], "--stripes"), (["--stripes", "0"], "--stripes"),
    (["--chunk", "0"], "chunk"), (["--chunk", "100"], "chunk"), (["--size", "0"], "size"),
    (["--size", "1000"], "size")])
def test_assemble_bad_geometry_is_one_line(opts, word, tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    (store / "store.json").write_text('{"stripes": 2, "chunk": 4096, "size": 65536}')
    for i in range(2):
        (store / f"stripe-{i:02d}.img").write_bytes(bytes(32768))
    p = hostd("assemble", "--store", store, "--out", tmp_path / "out.img", *opts)
    one_line_error(p, "virtio-hostd", word)
    assert not (tmp_path / "out.img").exists()


def test_assemble_keeps_holes(tmp_path):
    """The image of a mostly empty disk is sparse (a 100T store must not
    fill the disk), and reads the same."""
    from host_daemon.store import assemble
    store = tmp_path / "s"
    store.mkdir()
    chunk, size = 64 << 10, 64 << 20
    with open(store / "stripe-00.img", "wb") as f:
        f.truncate(size // 2)
        f.seek(chunk)
        f.write(b"hello")
    (store / "stripe-01.img").write_bytes(b"")          # all holes, and short
    out = tmp_path / "out.img"
    assert assemble(str(store), str(out), 2, chunk, size) == size
    data = out.read_bytes()
    assert len(data) == size
    assert data[2 * chunk:2 * chunk + 5] == b"hello"    # chunk 2 is stripe 0's second
    assert data.count(0) == size - 5
    assert os.stat(out).st_blocks * 512 <= 4 * chunk


# ---------------------------------------------------------------- virtio-emu
@pytest.mark.parametrize("opts,word", [
    (["--runtime", "inf"], "--runtime"),
    (["--verify-seed", "-5"], "seed"),
    (["--offset", "1G"], "beyond"),
])
def test_run_bad_input_is_one_line(device, opts, word):
    one_line_error(emu("run", "--name", device, "--quiet", *opts), "virtio-emu", word)


def test_run_json_path_checked_before_the_run(name, tmp_path):
    p = emu("run", "--name", name, "--json", tmp_path / "no" / "dir" / "r.json")
    one_line_error(p, "virtio-emu", "--json")


def test_sigterm_stops_run_cleanly(device):
    """SIGTERM to `virtio-emu run` stops its workers like Ctrl-C: none is
    killed holding the queue lock, and the device serves the next guests."""
    p = subprocess.Popen(EMU + ["run", "--name", device, "--runtime", "20", "--iodepth", "8",
                                "--strategy", "hold", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(processes_with(device)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)       # the daemon, run and its 4 workers
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    q = emu("run", "--name", device, "--runtime", "0.5", "--quiet", timeout=60)
    assert q.returncode == 0, q.stderr


@pytest.mark.parametrize("opts,word", [
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
])
def test_compare_bad_input_fails_before_starting_anything(opts, word, name):
    prefix = f"{name}r{uuid.uuid4().hex[:6]}"
    p = emu("compare", "--name-prefix", prefix, "--runtime", "0.2", "--repeat", "1",
            "--size", "64M", "--area", "1M", "--shm", "--no-rfc-row", *opts, timeout=60)
    one_line_error(p, "virtio-emu", word)
    assert "host daemon" not in p.stderr
    assert not [e for e in os.listdir("/dev/shm") if prefix in e]


def test_daemon_process_interrupted_while_starting_is_stopped(name, tmp_path):
    """Ctrl-C while compare waits for its daemon: the daemon is stopped at
    once (it must not go on writing into a store being removed)."""
    dev = f"{name}r{uuid.uuid4().hex[:6]}"

    def body():
        def interrupt(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
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


# ---------------------------------------------------------------- workload
def test_worker_failure_before_ready_is_one_line(device, monkeypatch):
    from virtio_py import workload

    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(workload, "GuestSlot", broken)     # the forked workers see it
    with pytest.raises(JobError) as e:
        run_job(JobSpec(device, workers=2, size=1 << 20))
    assert "RuntimeError: boom" in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_inside_the_barrier_is_an_interrupt(device, monkeypatch):
    """A KeyboardInterrupt inside multiprocessing's Barrier.wait can come
    out as an AssertionError (lock not owned); run_job still reports an
    interrupt, not "workers did not get ready"."""
    parent = os.getpid()
    real = multiprocessing.synchronize.Barrier.wait

    def wait(self, timeout=None):
        if os.getpid() == parent:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AssertionError("attempt to notify on an un-acquired lock")
        return real(self, timeout)
    monkeypatch.setattr(multiprocessing.synchronize.Barrier, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        run_job(JobSpec(device, workers=2, size=1 << 20))


def test_jobspec_checks_runtime_and_verify_seed():
    for bad in (dict(runtime=math.inf), dict(runtime=math.nan), dict(verify_seed=-1),
                dict(verify_seed=1 << 64)):
        with pytest.raises(ConfigError):
            JobSpec("x", **bad).check()


def test_region_rejects_nan_exit_cost(name):
    with pytest.raises(ConfigError, match="exit cost"):
        Region.create(name, exit_cost_us=math.nan)
    assert shm_objects(name) == []


# ---------------------------------------------------------------- statistics
def test_repeats_combine_into_one_consistent_run():
    """Counts and rates of the combined run come from the same statistic:
    kicks / ios is kicks per request, and requests match ios."""
    def rep(ios, kicks, errors=0):
        ls = dict.fromkeys(("acquisitions",), 2 * ios)
        return {"iops": ios / 2.0, "mbps": 1.0, "wall_s": 2.0, "ios": ios, "bytes": ios * 4096,
                "requests_added": ios, "requests_completed": ios, "kicks": kicks,
                "kicks_suppressed": 0, "kicks_taken": kicks, "interrupts": kicks,
                "interrupts_suppressed": 0, "kicks_per_request": kicks / ios,
                "interrupts_per_request": kicks / ios, "lock_acquisitions_per_request": 2.0,
                "guest_cpu_s": 1.0, "guest_cpu_pct": 50.0, "guest_cpu_pct_of_machine": 25.0,
                "guest_cpu_us_per_request": 1.0, "host_cpu_s": 1.0, "host_cpu_pct": 50.0,
                "host_cpu_us_per_request": 1.0, "lockstat": ls, "lockstat_ns": {},
                "latency_us": {"p50": 1.0}, "time_ms": {}, "errors": errors,
                "dup_completions": 0, "queue_full": 0}
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
