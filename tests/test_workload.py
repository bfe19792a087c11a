"""Guest workload processes on a live host daemon: separate processes, one
shared queue and lock, every request completed exactly once, --verify."""
import os
import subprocess
import sys
import uuid

import pytest

from host_daemon.store import locate, stripe_path
from virtio_py.compare import BASE, DaemonProcess
from virtio_py.workload import JobError, JobSpec, plan_areas, run_job

MB = 1 << 20


def daemon_cfg(**over):
    cfg = dict(BASE, size=64 * MB, stripes=4, chunk=64 << 10)
    cfg.update(over)
    return cfg


@pytest.fixture
def device(name, tmp_path):
    """Factory: device(**cfg) -> a running daemon (child process) on a striped
    store in tmp_path; stopped and unlinked after the test."""
    started = []

    def make(**over):
        cfg = daemon_cfg(**over)
        # A random part: /dev/shm is shared with sessions in other pid
        # namespaces, whose test names can be the same as ours.
        d = DaemonProcess(f"{name}r{uuid.uuid4().hex[:6]}-{len(started)}",
                          str(tmp_path / f"store{len(started)}"), cfg)
        d.start()
        started.append(d)
        d.cfg = cfg
        return d

    yield make
    for d in started:
        d.stop()


def check_exactly_once(res, per_worker):
    ws = res["workers"]
    total = per_worker * len(ws)
    assert res["ios"] == total
    assert res["requests_added"] == total
    assert res["requests_completed"] == total
    assert res["dup_completions"] == 0 and res["errors"] == 0
    for w in ws:
        assert w["ios"] == w["issued"] == per_worker
        assert w["delivered"] == per_worker, w        # delivered to its owner exactly once
    # Every used buffer was reaped once, by some worker's completion path.
    assert sum(w["reaped"] for w in ws) == total


@pytest.mark.parametrize("strategy", ["hold", "release", "prepare"])
def test_workers_are_processes_and_complete_exactly_once(device, strategy):
    d = device(exit="sync")
    res = run_job(JobSpec(d.name, workers=4, rw="read", bs=4096, iodepth=2, size=MB,
                          strategy=strategy))
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
    res = run_job(JobSpec(d.name, workers=3, rw="randread", bs=4096, iodepth=4, size=MB,
                          strategy="hold"))
    ios = res["ios"]
    acq = res["lockstat"]["acquisitions"]
    main_acq = sum(w["acct_main"]["lock_acquisitions"] for w in res["workers"])
    irq_acq = sum(w["acct_irq"]["lock_acquisitions"] for w in res["workers"])
    # hold: one acquisition per submission; the rest are completions
    # (virtblk_done reaping the used ring under the same lock).
    assert irq_acq > 0
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
    p = subprocess.run([sys.executable, "-m", "virtio_py", "run", "--name", d.name,
                        "--workers", "2", "--size", "256k", "--verify", "--rw", "read"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "verify failed: 1 blocks" in p.stderr and f"byte {target - target % 512}" in p.stderr


def test_verify_reports_never_written_blocks(device):
    d = device()
    res = run_job(JobSpec(d.name, workers=1, rw="read", size=64 << 10, verify=True))
    assert res["verify"]["failures"] == 16
    assert "never written" in res["verify"]["first"]["kind"]


def test_randrw_verify_and_time_based(device):
    d = device()
    res = run_job(JobSpec(d.name, workers=2, rw="randrw", bs=4096, iodepth=8, size=128 << 10,
                          runtime=0.5, verify=True, strategy="prepare"))
    assert res["ios"] > 0 and res["errors"] == 0
    assert res["verify"]["failures"] == 0
    assert res["requests_added"] == res["requests_completed"] == res["ios"]
    ws = res["workers"]
    assert all(w["reads"] + w["writes"] == w["ios"] for w in ws)


def test_multi_queue_worker_per_queue(device):
    d = device(queues=2)
    res = run_job(JobSpec(d.name, workers=4, rw="read", size=256 << 10, iodepth=2,
                          strategy="prepare"))
    assert sorted(w["queue"] for w in res["workers"]) == [0, 0, 1, 1]
    assert res["config"]["queues_used"] == 2
    check_exactly_once(res, 64)


def test_measurements_are_all_there(device, tmp_path):
    d = device()
    out = tmp_path / "run.json"
    p = subprocess.run([sys.executable, "-m", "virtio_py", "run", "--name", d.name,
                        "--workers", "2", "--size", "128k", "--iodepth", "2",
                        "--strategy", "release", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "IOPS" in p.stdout and "lockstat" in p.stdout
    import json
    res = json.loads(out.read_text())
    for k in ("con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total",
              "acq-bounces", "acquisitions", "holdtime-min", "holdtime-max", "holdtime-total"):
        assert k in res["lockstat"]
    for k in ("iops", "mbps", "kicks", "interrupts", "kicks_per_request",
              "interrupts_per_request", "guest_cpu_pct", "host_cpu_pct", "host_cpu_s"):
        assert k in res
    assert set(res["latency_us"]) >= {"p50", "p99", "max"}
    for w in res["workers"]:
        for k in ("cpu_user_s", "cpu_sys_s", "cpu_pct", "lock_wait_ms", "lock_hold_ms",
                  "kick_ms", "io_wait_ms"):
            assert k in w


def test_bad_input_is_one_line(name):
    p = subprocess.run([sys.executable, "-m", "virtio_py", "run", "--name", name],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith("virtio-emu: error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_area_planning():
    assert plan_areas(JobSpec("x", workers=2, bs=4096), 1 << 20) == [(0, 512 << 10),
                                                                     (512 << 10, 512 << 10)]
    with pytest.raises(Exception, match="need"):
        plan_areas(JobSpec("x", workers=4, size=1 << 20), 1 << 20)


def test_worker_failure_is_reported(device):
    d = device()
    # 64 KiB of buffers per slot cannot hold iodepth 64 of 1 MiB requests.
    with pytest.raises(JobError, match="larger than a request buffer"):
        run_job(JobSpec(d.name, workers=2, bs=1 << 20, iodepth=64, size=32 * MB))
