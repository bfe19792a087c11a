"""The vhost-user front-end: the guest workers, their shared lock and kick
strategies drive a vhost-user-blk back-end they did not grow up with
(qemu-storage-daemon) and our own daemon over the same protocol.  Data lands
in the back-end's raw file where the offsets say; every request type and
status works; several worker processes share one call eventfd; a back-end
that goes away fails the workers with DeviceGoneError and leaves nothing
behind."""

import gc
import os
import shutil
import socket
import struct
import tempfile
import threading
import time

import pytest

import vhost_backends
from hostd_util import emu, one_line_error, shm_objects
from virtio_py import BlockIOError, ConfigError, DeviceGoneError
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import BlockDevice
from virtio_py.lock import LOCKSTAT_COLUMNS
from virtio_py.vhost_front import VhostUserDisk
from virtio_py.vhost_user.protocol import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_WRITE_ZEROES,
)
from virtio_py.workload import JobSpec, run_job

MB = 1 << 20
SIZE = 64 * MB
SECTOR = 512


@pytest.fixture
def short_dir():
    """A directory with a short path: a socket's path has at most 107 bytes."""
    d = tempfile.mkdtemp(prefix="vhu", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=vhost_backends.KINDS)
def backend(request, short_dir, name):
    b = vhost_backends.start(request.param, short_dir, SIZE, name)
    try:
        yield b
    finally:
        b.stop()


def pread(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def children():
    """Live children of this process (zombies do not count)."""
    me = str(os.getpid())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if ppid == me and state not in "ZX":
            found.append(int(pid))
    return found


def open_fds():
    """This process's fds, but multiprocessing's heap arena (one per process,
    kept for the next run's shared values)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/pym-"):
                fds.add(fd)
        except OSError:
            pass  # the listing's own fd
    return fds


def check_exactly_once(res, per_worker):
    ws = res["workers"]
    total = per_worker * len(ws)
    assert res["ios"] == res["requests_added"] == res["requests_completed"] == total
    assert res["dup_completions"] == 0 and res["errors"] == 0 and res["queue_full"] == 0
    for w in ws:
        assert w["ios"] == w["issued"] == per_worker
        assert w["delivered"] == per_worker, w  # to its owner, exactly once
    assert sum(w["reaped"] for w in ws) == total  # each used buffer reaped once


# ---- data and request types ----------------------------------------------------------


def test_verified_pattern_lands_in_the_raw_file_at_its_offsets(backend, name):
    seed = 0xC0FFEE
    area = MB
    spec = dict(workers=4, bs=8192, iodepth=4, size=area, offset=3 * MB, verify=True)
    with VhostUserDisk.open(backend.sock, name=name) as disk:
        assert disk.capacity == SIZE
        w = run_job(JobSpec(name, rw="write", verify_seed=seed, **spec), device=disk)
        assert w["errors"] == 0 and w["ios"] == 4 * area // 8192
        r = run_job(JobSpec(name, rw="read", verify_seed=seed, **spec), device=disk)
        assert r["verify"] == {"verified": 512, "failures": 0, "unwritten": 0, "first": None}
        check_exactly_once(r, area // 8192)
    # The back-end's file, read by offset: the bytes the writers stamped
    # there, and each sector's stamp names that very sector and seed.
    raw = pread(backend.image, 3 * MB, 4 * area)
    expected = bytearray(4 * area)
    lib.vp_verify_fill(ffi.from_buffer(expected), 3 * MB // SECTOR, 4 * area, seed)
    assert raw == bytes(expected)
    for off in range(0, len(raw), 64 * 1024 + SECTOR):
        magic, lba, stamp_seed = struct.unpack_from("<QQQ", raw, off)
        assert (magic, lba, stamp_seed) == (lib.VP_VERIFY_MAGIC, (3 * MB + off) // SECTOR, seed)
    # Nothing outside the area was touched.
    assert pread(backend.image, 3 * MB - 4096, 4096) == bytes(4096)
    assert pread(backend.image, 3 * MB + 4 * area, 4096) == bytes(4096)


def test_request_types_and_statuses(backend, name):
    with BlockDevice.attach_vhost_user(backend.sock, name=name) as d:
        data = os.urandom(96 * 1024)
        d.write(5 * MB + 4096, data)
        assert d.read(5 * MB + 4096, len(data)) == data
        assert d.transport.has_feature(VIRTIO_BLK_F_FLUSH)  # a writable export flushes
        d.flush()
        assert pread(backend.image, 5 * MB + 4096, len(data)) == data
        assert d.get_id() == backend.serial
        if d.transport.has_feature(VIRTIO_BLK_F_WRITE_ZEROES):
            d.write_zeroes(5 * MB + 8192, 16384)
            d.flush()
            assert d.read(5 * MB + 8192, 16384) == bytes(16384)
            assert pread(backend.image, 5 * MB + 8192, 16384) == bytes(16384)
            assert pread(backend.image, 5 * MB + 4096, 4096) == data[:4096]
        if d.transport.has_feature(VIRTIO_BLK_F_DISCARD):
            d.discard(6 * MB, MB)
        with pytest.raises(BlockIOError) as e:
            d.read(d.capacity, SECTOR)
        assert e.value.status == lib.VIRTIO_BLK_S_IOERR
        with pytest.raises(BlockIOError) as e:
            d.read(d.capacity - SECTOR, 2 * SECTOR)  # runs off the end
        assert e.value.status == lib.VIRTIO_BLK_S_IOERR
        d.write(0, b"\x5a" * SECTOR)  # the device serves on after errors
        assert d.read(0, SECTOR) == b"\x5a" * SECTOR


def test_qsd_offers_flush_discard_and_write_zeroes(short_dir, name):
    b = vhost_backends.start("qsd", short_dir, SIZE, name)
    try:
        with VhostUserDisk.open(b.sock, name=name) as disk:
            for bit in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
                assert disk.has_feature(bit), bit
            assert disk.max_queues == 1  # num-queues defaults to 1
    finally:
        b.stop()


# ---- the guests on a vhost-user device ---------------------------------------------


def test_workers_sharing_one_call_eventfd_complete_100000_requests_exactly_once(backend, name):
    per = 25_000
    with VhostUserDisk.open(backend.sock, name=name) as disk:
        assert len(disk.queue_fds()) == 1  # one call eventfd for every worker
        res = run_job(
            JobSpec(name, workers=4, rw="randread", bs=SECTOR, iodepth=8, size=per * SECTOR,
                    strategy="prepare"),
            device=disk,
        )  # fmt: skip
    check_exactly_once(res, per)
    # Interrupts went to more than one process's interrupt thread, and
    # completions to other processes than the one that took the interrupt.
    assert sum(1 for w in res["workers"] if w["irqs"]) > 1
    assert any(w["reaped"] != w["ios"] for w in res["workers"])
    assert res["interrupts"] == sum(w["irqs"] for w in res["workers"]) > 0


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.parametrize("strategy", ["hold", "release", "prepare"])
def test_strategies_with_flags_and_event_index_have_lockstat(backend, name, strategy, event_idx):
    with VhostUserDisk.open(backend.sock, name=name, event_idx=event_idx, lock="mutex") as disk:
        assert disk.region.event_idx == event_idx
        assert disk.has_feature(lib.VIRTIO_RING_F_EVENT_IDX) == event_idx
        res = run_job(
            JobSpec(name, workers=4, rw="read", bs=4096, iodepth=2, size=256 << 10,
                    strategy=strategy),
            device=disk,
        )  # fmt: skip
    per = (256 << 10) // 4096
    check_exactly_once(res, per)
    ios, ws = res["ios"], res["workers"]
    ls = res["lockstat"]
    assert set(ls) == set(LOCKSTAT_COLUMNS)
    # Every submission kick-prepares once: a kick or a suppressed one.
    assert res["kicks"] >= 1 and res["kicks"] + res["kicks_suppressed"] == ios
    # The submission path: one acquisition per request, and with release
    # one more after each kick, taken with the lock dropped (a waiter that
    # heard nothing for 20 ms reaps itself, under the lock: more is fine).
    main = sum(w["acct_main"]["lock_acquisitions"] for w in ws)
    assert main >= ios + (res["kicks"] if strategy == "release" else 0)
    # The completion path (virtblk_done) takes the same lock.
    irq = sum(w["acct_irq"]["lock_acquisitions"] for w in ws)
    assert irq > 0 and ls["acquisitions"] >= main + irq
    assert 0 < ls["holdtime-total"] and ls["holdtime-min"] <= ls["holdtime-max"]
    assert ls["contentions"] <= ls["acquisitions"]
    assert ls["waittime-min"] <= ls["waittime-max"] <= ls["waittime-total"]
    assert res["config"]["transport"] == "vhost-user"
    assert res["config"]["exit"] == "async"


def test_exit_cost_is_paid_inside_every_kick(backend, name):
    with VhostUserDisk.open(backend.sock, name=name, exit_cost_us=200) as disk:
        assert disk.region.header.exit_cost_ns == 200_000
        res = run_job(
            JobSpec(name, workers=1, rw="read", bs=4096, size=64 << 10, strategy="hold"),
            device=disk,
        )
    kicks = res["workers"][0]["acct_main"]["kicks"]
    assert kicks >= 1 and res["time_ms"]["kick_ms"] >= kicks * 0.2


# ---- the back-end goes away --------------------------------------------------------


class Relay:
    """A Unix socket relay with SCM_RIGHTS between a front-end and a back-end
    at sock; cut() shuts the front-end's connection down as a back-end that
    closes it would, the back-end living on."""

    def __init__(self, directory, sock):
        self.path = os.path.join(directory, "relay.sock")
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.path)
        self.lsock.listen(1)
        self.target = sock
        self.socks = []
        self.threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        try:
            front, _ = self.lsock.accept()
        except OSError:
            return
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        back.connect(self.target)
        self.socks += [front, back]
        for a, b in ((front, back), (back, front)):
            t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _pump(src, dst):
        while True:
            try:
                data, anc, _, _ = src.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
            except OSError:
                return
            if not data:
                return
            fds = []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4]))
            try:
                cm = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                dst.sendmsg([data], cm if fds else [])
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)

    def cut(self):
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # copies of the fd do not keep it open
            except OSError:
                pass

    def close(self):
        self.cut()
        self.lsock.close()
        for t in self.threads:
            t.join(5)
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("how", ["killed", "connection-closed"])
def test_back_end_gone_mid_run_fails_the_workers_with_device_gone(backend, name, short_dir, how):
    fds = open_fds()
    kids = set(children())
    relay = Relay(short_dir, backend.sock) if how == "connection-closed" else None
    gone_at = []

    def go_away():
        gone_at.append(time.monotonic())
        relay.cut() if relay else backend.kill()

    try:
        with VhostUserDisk.open(relay.path if relay else backend.sock, name=name) as disk:
            spec = JobSpec(name, workers=4, rw="randread", bs=4096, iodepth=4, runtime=120,
                           timeout=60, strategy="prepare")  # fmt: skip
            timer = threading.Timer(0.5, go_away)
            timer.start()
            try:
                run_job(spec, device=disk)
                pytest.fail("the run outlived its back-end")
            except DeviceGoneError as e:  # not kept: its frames hold the run's pipes
                why = str(e)
            finally:
                timer.cancel()
            ended = time.monotonic()
            assert disk.gone and disk.region.daemon_pid == 0
            assert "vhost-user back-end" in why
            # Long before the run's end or a wait's timeout: the waits noticed.
            assert ended - gone_at[0] < spec.timeout / 10
    finally:
        if relay:
            relay.close()
    assert shm_objects(name) == []
    assert set(children()) <= kids  # no worker is left
    gc.collect()  # the run's multiprocessing objects, in reference cycles
    assert open_fds() - fds == set()  # nor an eventfd, the socket or the region's fd


def test_opening_a_device_nobody_serves_is_one_error(short_dir, name):
    with pytest.raises(DeviceGoneError):
        VhostUserDisk.open(os.path.join(short_dir, "nobody.sock"), name=name)
    assert shm_objects(name) == []


def test_more_queues_than_the_back_end_serves_is_refused(short_dir, name):
    b = vhost_backends.start("qsd", short_dir, SIZE, name)
    try:
        fds = open_fds()
        with pytest.raises(ConfigError, match="serves 1 queue"):
            VhostUserDisk.open(b.sock, name=name, queues=2)
        assert shm_objects(name) == [] and open_fds() == fds
    finally:
        b.stop()


def test_sync_exit_is_refused_with_its_reason(short_dir, name):
    with pytest.raises(ConfigError, match="asynchronous"):
        VhostUserDisk.open(os.path.join(short_dir, "x.sock"), name=name, exit="sync")


# ---- virtio-emu run --vhost-user ---------------------------------------------------


def test_run_vhost_user_writes_then_verifies(backend, name):
    common = ["--vhost-user", backend.sock, "--name", name, "--size", "1M", "--verify",
              "--iodepth", "4", "--strategy", "prepare"]  # fmt: skip
    w = emu("run", "--rw", "write", *common)
    assert w.returncode == 0, w.stdout + w.stderr
    r = emu("run", "--rw", "read", *common)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: 1024 blocks good" in r.stdout
    assert f"vhost-user {backend.sock}" in r.stdout and "exit async" in r.stdout
    assert shm_objects(name) == []


@pytest.mark.parametrize(
    "opts,word",
    [
        (["--vhost-user", "SOCK", "--exit", "sync"], "asynchronous"),
        (["--name", "NAME", "--queues", "2"], "--queues"),
        (["--name", "NAME", "--exit-cost", "5"], "--exit-cost"),
        (["--vhost-user", "/nonexistent/sock"], "vhost-user"),
        (["--vhost-user", "SOCK", "--queues", "2"], "queue"),
        ([], "--vhost-user"),
    ],
)
def test_run_vhost_user_bad_input_is_one_line(short_dir, name, opts, word):
    b = vhost_backends.start("qsd", short_dir, SIZE, name)
    try:
        opts = [{"SOCK": b.sock, "NAME": name}.get(o, o) for o in opts]
        p = emu("run", "--runtime", "0.2", *opts)
        one_line_error(p, "virtio-emu", word)
        assert shm_objects(name) == []
    finally:
        b.stop()
