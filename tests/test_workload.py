"""Guest workload processes on a live host daemon: separate processes, one
shared queue and lock, every request completed exactly once, --verify;
`virtio-emu run` as a user drives it: bad input in one line, failures and
interrupts of its workers."""

import math
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys

import pytest

from hostd_util import EMU, LOCKSTAT, emu, one_line_error, processes_with
from procs import used_idx_moves, wait_for
from virtio_py.errors import ConfigError
from virtio_py.store import locate, stripe_path
from virtio_py.workload import JobError, JobSpec, plan_areas, run_job

MB = 1 << 20


def check_exactly_once(res, per_worker):
    ws = res["workers"]
    total = per_worker * len(ws)
    assert res["ios"] == total
    assert res["requests_added"] == total
    assert res["requests_completed"] == total
    assert res["dup_completions"] == 0 and res["errors"] == 0
    for w in ws:
        assert w["ios"] == w["issued"] == per_worker
        assert w["delivered"] == per_worker, w  # delivered to its owner exactly once
    # Every used buffer was reaped once, by some worker's completion path.
    assert sum(w["reaped"] for w in ws) == total


@pytest.mark.parametrize("strategy", ["hold", "release", "prepare"])
def test_workers_are_processes_and_complete_exactly_once(device, strategy):
    d = device(exit="sync")
    res = run_job(
        JobSpec(d.name, workers=4, rw="read", bs=4096, iodepth=2, size=MB, strategy=strategy)
    )
    pids = [w["pid"] for w in res["workers"]]
    assert len(set(pids)) == 4 and os.getpid() not in pids and d.pid not in pids
    assert len({w["slot"] for w in res["workers"]}) == 4
    check_exactly_once(res, MB // 4096)
    # Completions were reaped by other workers than their owners: the
    # interrupt goes to whichever process takes it, as on a real guest.
    assert any(w["reaped"] != w["ios"] for w in res["workers"])
    assert res["strategy"] == strategy and res["kicks"] >= 1


def test_completion_path_takes_the_lock(device):
    d = device()
    res = run_job(
        JobSpec(d.name, workers=3, rw="randread", bs=4096, iodepth=4, size=MB, strategy="hold")
    )
    ios = res["ios"]
    acq = res["lockstat"]["acquisitions"]
    main_acq = sum(w["acct_main"]["lock_acquisitions"] for w in res["workers"])
    irq_acq = sum(w["acct_irq"]["lock_acquisitions"] for w in res["workers"])
    # hold: one acquisition per submission; the rest are completions
    # (virtblk_done reaping the used ring under the same lock), in whichever
    # thread took the interrupt: the waiting worker or the interrupt thread.
    assert main_acq - ios + irq_acq > 0
    assert acq >= main_acq + irq_acq
    assert acq > ios
    assert res["lockstat"]["holdtime-total"] > 0


def test_lock_stats_cover_only_the_run(device):
    d = device()
    run_job(JobSpec(d.name, workers=2, size=MB, strategy="release"))
    res = run_job(JobSpec(d.name, workers=2, size=256 << 10, strategy="release"))
    # Reset before the start: the first run's acquisitions are not counted.
    assert res["lockstat"]["acquisitions"] <= 4 * res["ios"]


@pytest.mark.parametrize("engine", ["c", "python"])
def test_write_then_verify(device, engine):
    d = device()
    spec = dict(workers=2, bs=8192, iodepth=4, size=512 << 10, verify=True, engine=engine)
    w = run_job(JobSpec(d.name, rw="write", **spec))
    assert w["verify"]["failures"] == 0 and w["ios"] == 2 * 64
    r = run_job(JobSpec(d.name, rw="read", **spec))
    assert r["verify"] == {"verified": 128, "failures": 0, "unwritten": 0, "first": None}
    check_exactly_once(r, 64)


def test_verify_catches_a_block_corrupted_behind_the_guests_back(device):
    d = device()
    c = d.cfg
    spec = dict(workers=2, bs=4096, size=256 << 10, verify=True)
    run_job(JobSpec(d.name, rw="write", **spec))
    # Flip bytes in the middle of worker 1's 10th block, in the stripe file.
    target = (256 << 10) + 10 * 4096 + 1000
    stripe, off = locate(target, c["stripes"], c["chunk"])
    fd = os.open(stripe_path(d.store_dir, stripe), os.O_RDWR)
    try:
        old = os.pread(fd, 8, off)
        os.pwrite(fd, bytes(b ^ 0xFF for b in old), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    res = run_job(JobSpec(d.name, rw="read", **spec))
    v = res["verify"]
    assert v["failures"] == 1
    assert v["first"]["worker"] == 1
    assert v["first"]["offset"] == target - target % 512
    assert "corrupt" in v["first"]["kind"]
    # The command line reports it and fails.
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "virtio_py",
            "run",
            "--name",
            d.name,
            "--workers",
            "2",
            "--size",
            "256k",
            "--verify",
            "--rw",
            "read",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 3, p.stderr
    assert "verify failed: 1 blocks" in p.stderr and f"byte {target - target % 512}" in p.stderr


def test_verify_reports_never_written_blocks(device):
    d = device()
    res = run_job(JobSpec(d.name, workers=1, rw="read", size=64 << 10, verify=True))
    assert res["verify"]["failures"] == 16
    assert "never written" in res["verify"]["first"]["kind"]


def test_randrw_verify_and_time_based(device):
    d = device()
    res = run_job(
        JobSpec(
            d.name,
            workers=2,
            rw="randrw",
            bs=4096,
            iodepth=8,
            size=128 << 10,
            runtime=0.5,
            verify=True,
            strategy="prepare",
        )
    )
    assert res["ios"] > 0 and res["errors"] == 0
    assert res["verify"]["failures"] == 0
    assert res["requests_added"] == res["requests_completed"] == res["ios"]
    ws = res["workers"]
    assert all(w["reads"] + w["writes"] == w["ios"] for w in ws)


def test_multi_queue_worker_per_queue(device):
    d = device(queues=2)
    res = run_job(
        JobSpec(d.name, workers=4, rw="read", size=256 << 10, iodepth=2, strategy="prepare")
    )
    assert sorted(w["queue"] for w in res["workers"]) == [0, 0, 1, 1]
    assert res["config"]["queues_used"] == 2
    check_exactly_once(res, 64)


def test_measurements_are_all_there(device, tmp_path):
    d = device()
    out = tmp_path / "run.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "virtio_py",
            "run",
            "--name",
            d.name,
            "--workers",
            "2",
            "--size",
            "128k",
            "--iodepth",
            "2",
            "--strategy",
            "release",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "IOPS" in p.stdout and "lockstat" in p.stdout
    import json

    res = json.loads(out.read_text())
    for k in LOCKSTAT:
        assert k in res["lockstat"]
    for k in (
        "iops",
        "mbps",
        "kicks",
        "interrupts",
        "kicks_per_request",
        "interrupts_per_request",
        "guest_cpu_pct",
        "host_cpu_pct",
        "host_cpu_s",
    ):
        assert k in res
    assert set(res["latency_us"]) >= {"p50", "p99", "max"}
    for w in res["workers"]:
        for k in (
            "cpu_user_s",
            "cpu_sys_s",
            "cpu_pct",
            "lock_wait_ms",
            "lock_hold_ms",
            "kick_ms",
            "io_wait_ms",
        ):
            assert k in w


def test_bad_input_is_one_line(name):
    p = subprocess.run(
        [sys.executable, "-m", "virtio_py", "run", "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.startswith("virtio-emu: error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_area_planning():
    assert plan_areas(JobSpec("x", workers=2, bs=4096), 1 << 20) == [
        (0, 512 << 10),
        (512 << 10, 512 << 10),
    ]
    with pytest.raises(ConfigError, match="need"):
        plan_areas(JobSpec("x", workers=4, size=1 << 20), 1 << 20)


def test_worker_failure_is_reported(device):
    d = device()
    # 64 KiB of buffers per slot cannot hold iodepth 64 of 1 MiB requests.
    with pytest.raises(JobError, match="larger than a request buffer"):
        run_job(JobSpec(d.name, workers=2, bs=1 << 20, iodepth=64, size=32 * MB))


def test_worker_failure_before_ready_is_one_line(device, monkeypatch):
    from virtio_py.workload import worker

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(worker, "GuestSlot", broken)  # the forked workers see it
    with pytest.raises(JobError) as e:
        run_job(JobSpec(device().name, workers=2, size=1 << 20))
    assert "RuntimeError: boom" in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_inside_the_barrier_is_an_interrupt(device, monkeypatch):
    """A KeyboardInterrupt inside multiprocessing's Barrier.wait can come
    out as an AssertionError (lock not owned); run_job still reports an
    interrupt, not "workers did not get ready"."""
    name = device().name
    parent = os.getpid()
    real = multiprocessing.synchronize.Barrier.wait

    def wait(self, timeout=None):
        if os.getpid() == parent:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise AssertionError("attempt to notify on an un-acquired lock") from None
        return real(self, timeout)

    monkeypatch.setattr(multiprocessing.synchronize.Barrier, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        run_job(JobSpec(name, workers=2, size=1 << 20))


def test_jobspec_checks_runtime_and_verify_seed():
    for bad in (
        dict(runtime=math.inf),
        dict(runtime=math.nan),
        dict(verify_seed=-1),
        dict(verify_seed=1 << 64),
    ):
        with pytest.raises(ConfigError):
            JobSpec("x", **bad).check()


@pytest.mark.parametrize(
    "opts,word",
    [
        (["--runtime", "inf"], "--runtime"),
        (["--verify-seed", "-5"], "seed"),
        (["--offset", "1G"], "beyond"),
    ],
)
def test_run_bad_option_is_one_line(device, opts, word):
    one_line_error(emu("run", "--name", device().name, "--quiet", *opts), "virtio-emu", word)


def test_run_json_path_checked_before_the_run(name, tmp_path):
    p = emu("run", "--name", name, "--json", tmp_path / "no" / "dir" / "r.json")
    one_line_error(p, "virtio-emu", "--json")


def test_sigterm_stops_run_cleanly(device):
    """SIGTERM to `virtio-emu run` stops its workers like Ctrl-C: none is
    killed holding the queue lock, and the device serves the next guests."""
    name = device().name
    p = subprocess.Popen(
        EMU
        + [
            "run",
            "--name",
            name,
            "--runtime",
            "20",
            "--iodepth",
            "8",
            "--strategy",
            "hold",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The daemon, run and its 4 workers; then requests in flight.
        wait_for(lambda: len(processes_with(name)) >= 6, "the workers to start", 60)
        wait_for(used_idx_moves(lambda: name), "the workers' requests to complete")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    q = emu("run", "--name", name, "--runtime", "0.5", "--quiet", timeout=60)
    assert q.returncode == 0, q.stderr
