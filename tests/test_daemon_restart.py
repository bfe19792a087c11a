"""A daemon killed with SIGKILL and started again takes its device over:
guests attached to it keep going, what was in flight is run again, nothing
acknowledged is lost, and nothing leaks across the cycles.

VIRTIO_PY_SOAK=1 (make soak) runs the long counts: 100 kill/restart trials
under writers, 1,000 start/kill/restart cycles.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from hostd_util import hostd, shm_objects
from procs import used_idx_moves, wait_for
from virtio_py.blk import BlockDevice
from virtio_py.pidfile import probe, runtime_dir
from virtio_py.store import assemble

SOAK = bool(os.environ.get("VIRTIO_PY_SOAK"))
TRIALS = 100 if SOAK else 3
CYCLES = 1000 if SOAK else 20
BS = 4096
WORKERS = 4
BLOCKS = 16  # per worker, rewritten over and over

# One writer: rewrites its blocks with (worker, pass, block) stamps until
# told to stop, logging each write once acknowledged; then reads every block
# back and checks it holds its last stamp (--verify).
WRITER = r"""
import os, struct, sys, time
from virtio_py.blk import BlockDevice
name, w, blocks, log, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
BS = 4096
def stamp(p, b):
    return struct.pack("<QQQ", w, p, b) * (BS // 24) + bytes(BS % 24)
with BlockDevice.attach(name, timeout=60) as d, open(log, "w", buffering=1) as f:
    last = {}
    p = 0
    while not os.path.exists(stop):
        for b in range(blocks):
            off = (w * blocks + b) * BS
            d.write(off, stamp(p, b))
            f.write(f"{b} {p} {time.monotonic()}\n")
            last[b] = p
        p += 1
    for b, p in last.items():
        got = d.read((w * blocks + b) * BS, BS)
        assert got == stamp(p, b), f"block {b}: not pass {p}"
    f.write("verified\n")
"""


def _stamp(w, p, b):
    import struct

    return struct.pack("<QQQ", w, p, b) * (BS // 24) + bytes(BS % 24)


def _start(daemons, name, store):
    """Start the daemon, or take over a killed one's device: always the same
    options (other ones would replace the device instead)."""
    return daemons.start(name, store, "--stripes", 4)


def _kill(name):
    pid = probe(name).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not probe(name).alive, "the killed daemon to be gone")
    return pid


def _acked(log):
    """(block, pass, time) of every acknowledged write in a writer's log."""
    tail = _AckTail(log)
    tail.poll()
    return tail.acks


class _AckTail:
    """A writer's log read as it grows: each poll parses only the lines
    written since the last (a polling loop that re-read whole logs would
    spend the run parsing millions of lines)."""

    def __init__(self, log):
        self.log = log
        self.pos = 0
        self.acks = []

    def poll(self):
        """The acknowledged writes new since the last poll."""
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            f.seek(self.pos)
            data = f.read()
        end = data.rfind("\n") + 1  # a line still being written waits
        self.pos += len(data[:end].encode())
        new = []
        for line in data[:end].splitlines():
            parts = line.split()
            if len(parts) == 3:
                new.append((int(parts[0]), int(parts[1]), float(parts[2])))
        self.acks.extend(new)
        return new


def test_writers_survive_daemon_kills_and_the_store_equals_the_acknowledged_writes(
    daemons, name, tmp_path
):
    store = str(tmp_path / "store")
    _start(daemons, name, store)
    stop = tmp_path / "stop"
    logs = [str(tmp_path / f"w{w}.log") for w in range(WORKERS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, name, str(w), str(BLOCKS), logs[w], str(stop)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(WORKERS)
    ]
    first_completion = []
    tails = [_AckTail(g) for g in logs]
    try:
        for _ in range(TRIALS):
            # Under load: wait until every writer has acknowledged more.
            seen = [len(t.acks) for t in tails]

            def acked_more(seen=seen):
                for t in tails:
                    t.poll()
                assert all(p.poll() is None for p in procs), [
                    p.stderr.read() for p in procs if p.poll() is not None
                ]
                return all(len(t.acks) > n + 2 for t, n in zip(tails, seen))

            wait_for(acked_more, "every writer to acknowledge more writes", 120)
            _kill(name)
            t0 = time.monotonic()
            _start(daemons, name, store)
            # Restart to first completion: the first write acknowledged after.
            after = wait_for(
                lambda t0=t0: [at for t in tails for _, _, at in t.poll() if at > t0],
                "a write acknowledged after the restart",
                120,
            )
            first_completion.append(min(after) - t0)
        stop.touch()
        for p in procs:
            err = p.communicate(timeout=120)[1]
            assert p.returncode == 0, err
    finally:
        stop.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for g in logs:
        with open(g) as f:
            assert f.read().endswith("verified\n")
    # The model: every acknowledged write replayed in order.
    image = bytearray(8 << 20)
    for w, g in enumerate(logs):
        for b, p, _ in _acked(g):
            off = (w * BLOCKS + b) * BS
            image[off : off + BS] = _stamp(w, p, b)
    hostd("stop", "--name", name, check=True)
    out = str(tmp_path / "disk.raw")
    assemble(store, out)
    with open(out, "rb") as f:
        assert f.read() == bytes(image)
    med = statistics.median(first_completion)
    print(
        f"\nrestart-to-first-completion over {len(first_completion)} restarts: "
        f"median {med * 1000:.0f} ms, max {max(first_completion) * 1000:.0f} ms"
    )


def test_a_request_in_flight_at_the_kill_is_completed_by_the_successor(daemons, name, tmp_path):
    store = str(tmp_path / "store")
    _start(daemons, name, store)
    with BlockDevice.attach(name) as d:
        d.write(0, b"\x5a" * BS)
        _kill(name)
        _start(daemons, name, store)
        # Written while no daemon ran: waits, then completes.
        d.write(BS, b"\xa5" * BS)
        assert d.read(0, 2 * BS) == b"\x5a" * BS + b"\xa5" * BS


def test_a_guest_waiting_past_the_restart_wait_fails_with_device_gone(daemons, name, tmp_path):
    from virtio_py._lowlevel import lib
    from virtio_py.errors import DeviceGoneError

    store = str(tmp_path / "store")
    _start(daemons, name, store)
    old = lib.vp_restart_wait_ns()
    lib.vp_set_restart_wait_ns(200_000_000)
    try:
        with BlockDevice.attach(name, timeout=10) as d:
            _kill(name)
            t0 = time.monotonic()
            with pytest.raises(DeviceGoneError):
                d.write(0, b"\x01" * BS)
            assert time.monotonic() - t0 < 5
    finally:
        lib.vp_set_restart_wait_ns(old)


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_each_dead_device_process_gets_its_own_restart_wait():
    """A guest that waited out one daemon's restart gives the successor's
    death the whole wait again, however long ago the first one died."""
    from virtio_py._lowlevel import ffi, lib

    old = lib.vp_restart_wait_ns()
    lib.vp_set_restart_wait_ns(100_000_000)
    try:
        daemon_pid = ffi.new("int32_t *", _dead_pid())
        assert not lib.vp_device_gone(daemon_pid)
        wait_for(lambda: lib.vp_device_gone(daemon_pid), "the restart wait to pass", 5)
        # A successor serves (completions come, nobody asks) and dies.
        daemon_pid[0] = _dead_pid()
        assert not lib.vp_device_gone(daemon_pid)
        wait_for(lambda: lib.vp_device_gone(daemon_pid), "its restart wait to pass", 5)
        daemon_pid[0] = 0  # no device process, said on purpose
        assert lib.vp_device_gone(daemon_pid)
    finally:
        lib.vp_set_restart_wait_ns(old)


def test_start_with_other_options_replaces_instead_of_taking_over(daemons, name, tmp_path):
    store = str(tmp_path / "store")
    _start(daemons, name, store)
    with BlockDevice.attach(name) as d:
        d.write(0, b"\x44" * BS)
    _kill(name)
    p = hostd("start", "--name", name, "--store", store, "--size", "16M", "--stripes", "4")
    assert p.returncode == 0, p.stderr
    assert "replaced" in p.stdout and "other options: size" in p.stdout
    assert "took over" not in p.stdout


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_nothing_leaks_across_start_kill_restart_cycles(daemons, name, tmp_path):
    store = str(tmp_path / "store")
    _start(daemons, name, store)
    with BlockDevice.attach(name) as d:
        d.write(0, b"\x33" * BS)
        guest_fds = _fds(os.getpid())
        daemon_fds = _fds(probe(name).pid)
        objects = shm_objects(name)
        for i in range(CYCLES):
            _kill(name)
            _start(daemons, name, store)
            d.write(BS * (i % 64), bytes([i % 251]) * BS)
            assert shm_objects(name) == objects
            assert _fds(probe(name).pid) == daemon_fds
            assert _fds(os.getpid()) == guest_fds
    hostd("stop", "--name", name, check=True)
    assert shm_objects(name) == []
    assert not [e for e in os.listdir(runtime_dir()) if e.startswith(name + ".")]


def _emu_run(name, rw, runtime, out):
    """`virtio-emu run` of 4 workers over 1M each, with --verify and --json."""
    return [
        sys.executable, "-m", "virtio_py", "run", "--name", name, "--workers", "4",
        "--rw", rw, "--size", "1M", "--verify", "--runtime", str(runtime), "--json", str(out),
    ]  # fmt: skip


def test_emu_workers_writing_with_verify_ride_out_a_daemon_kill(daemons, name, tmp_path):
    """`virtio-emu run` workers (the C request loop) writing with --verify
    while the daemon is killed and started again: the run ends clean, and a
    read-back run with --verify finds every block it wrote."""
    store = str(tmp_path / "s")
    _start(daemons, name, store)
    out = tmp_path / "w.json"
    run = subprocess.Popen(
        _emu_run(name, "write", 4, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # The kill lands inside the run (it lasts 4 s): once writes complete.
        wait_for(used_idx_moves(lambda: name), "the workers' writes to complete")
        _kill(name)
        _start(daemons, name, store)
        text, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, text
    res = json.loads(out.read_text())
    assert res["verify"]["failures"] == 0, text
    back_json = tmp_path / "r.json"
    back = subprocess.run(
        _emu_run(name, "read", 1, back_json), capture_output=True, text=True, timeout=120
    )
    assert back.returncode == 0, back.stdout + back.stderr
    checked = json.loads(back_json.read_text())["verify"]
    assert checked["failures"] == 0 and checked["verified"] > 0, back.stdout
