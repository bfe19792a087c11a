"""Who the daemon is comes from its pidfile and the lock it holds on it,
never from the region header a guest can write: whatever a guest writes
into daemon_pid or the magic, `stop` stops the daemon and only it, a second
`start` is refused, and one store is served by one daemon at a time.  A
region's owner unlinks only the objects it created, not another's that took
their names."""

import mmap
import os
import signal
import stat
import subprocess

import pytest

from hostd_util import hostd, one_line_error, shm_objects, status
from procs import wait_for
from virtio_py import Region
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import BlockDevice
from virtio_py.pidfile import probe, runtime_dir
from virtio_py.proc import pid_alive
from virtio_py.region import destroy

PID_GPA = ffi.offsetof("struct vp_region_header", "daemon_pid")
MAGIC_GPA = ffi.offsetof("struct vp_region_header", "magic")


def _poke_header(name, gpa, value, width):
    """A guest's store into the header, through a mapping of its own (the
    object need not look like a region any more)."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        m = mmap.mmap(fd, 4096)
    finally:
        os.close(fd)
    try:
        base = ffi.from_buffer(m)
        assert lib.vp_guest_poke(base, 4096, gpa, value, width) == 0
        del base
    finally:
        m.close()


@pytest.fixture
def bystander():
    """A process that is not the daemon: a guest, say."""
    p = subprocess.Popen(["sleep", "600"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("lie", ["another process", "zero", "bad magic"])
def test_stop_stops_the_daemon_and_only_it_whatever_the_header_says(
    lie, name, tmp_path, daemons, bystander
):
    daemons.start(name, tmp_path / "s")
    pid = probe(name).pid
    if lie == "another process":
        _poke_header(name, PID_GPA, bystander.pid, 4)
    elif lie == "zero":
        _poke_header(name, PID_GPA, 0, 4)
    else:
        _poke_header(name, MAGIC_GPA, 0, 8)
    s = hostd("stop", "--name", name)
    assert s.returncode == 0, s.stderr
    assert s.stdout == f"virtio-hostd: stopped {name} (pid {pid})\n"
    assert not pid_alive(pid)
    assert bystander.poll() is None, "stop signalled a process that is not the daemon"
    assert shm_objects(name) == []
    assert probe(name) is None


def test_status_names_the_daemon_from_its_pidfile(name, tmp_path, daemons, bystander):
    daemons.start(name, tmp_path / "s")
    pid = probe(name).pid
    _poke_header(name, PID_GPA, bystander.pid, 4)
    st = status(name)
    assert st["daemon_pid"] == pid and st["running"]


def test_second_start_is_refused_whatever_the_header_says(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s")
    pid = probe(name).pid
    _poke_header(name, PID_GPA, 0, 4)
    _poke_header(name, MAGIC_GPA, 0, 8)
    p = daemons.start(name, tmp_path / "other", check=False)
    one_line_error(p, "virtio-hostd", "already")
    assert str(pid) in p.stderr
    assert not (tmp_path / "other").exists()
    # The first daemon's objects are all still there and still its own.
    assert os.path.exists(f"/dev/shm/{name}") and probe(name).pid == pid
    _poke_header(name, MAGIC_GPA, 0x4F49545249565056, 8)
    with BlockDevice.attach(name) as dev:
        dev.write(0, b"\x11" * 512)
        assert dev.read(0, 512) == b"\x11" * 512


def test_pidfile_is_private_and_goes_with_the_daemon(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s")
    rundir = runtime_dir()
    st = os.lstat(rundir)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) & 0o022 == 0
    path = os.path.join(rundir, f"{name}.pid")
    pst = os.lstat(path)
    assert stat.S_ISREG(pst.st_mode) and stat.S_IMODE(pst.st_mode) == 0o600
    with open(path) as f:
        pid = int(f.read())
    assert probe(name).pid == pid and pid_alive(pid)
    assert hostd("stop", "--name", name).returncode == 0
    assert not os.path.exists(path)


def test_a_killed_daemon_is_known_dead_by_its_released_lock(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s")
    pid = probe(name).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not probe(name).alive, "the lock to be released")
    st = status(name)
    assert st["daemon_pid"] == pid and not st["running"]


def test_one_store_is_served_by_one_daemon(name, tmp_path, daemons):
    store = tmp_path / "s"
    daemons.start(name, store)
    pid = probe(name).pid
    p = daemons.start(name + "b", store, check=False)
    one_line_error(p, "virtio-hostd", "in use by another daemon")
    assert f"pid {pid}" in p.stderr
    assert shm_objects(name + "b") == []
    with BlockDevice.attach(name) as dev:
        dev.write(0, b"\x22" * 512)
    # Once the first one stopped, the store is free.
    assert hostd("stop", "--name", name).returncode == 0
    daemons.start(name + "b", store)
    with BlockDevice.attach(name + "b") as dev:
        assert dev.read(0, 512) == b"\x22" * 512


def test_owner_unlinks_only_the_objects_it_created(name):
    """An orphan whose objects were removed and whose name was taken by a
    new device must not unlink the new device's objects when it closes."""
    first = Region.create(name)
    try:
        destroy(name)  # as `stop` does with leftovers
        second = Region.create(name)
        try:
            first.close()
            assert shm_objects(name) == sorted(
                [name] + [f"sem.{name}.q0.{r}" for r in ("kick", "call", "ack")]
            )
            Region.attach(name).close()
        finally:
            second.close()
        assert shm_objects(name) == []
    finally:
        first.close()
