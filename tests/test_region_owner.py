"""Provenance of a region: a shared-memory object of the device's name that
another local user made is not attached to (a guest would drive rings the
other user controls) and not replaced by `start`; a device's own object is
opened to its user only once it is laid out."""

import os
import stat

import posix_ipc
import pytest

import virtio_py.region as region_mod
from hostd_util import emu, hostd, one_line_error
from users import as_nobody, needs_root_and_nobody
from virtio_py import Region, RegionError


def _make_object(name):
    """As the other user: an object of the device's name, open to all, with
    a plausible size."""
    old = os.umask(0)
    try:
        shm = posix_ipc.SharedMemory(f"/{name}", posix_ipc.O_CREX, mode=0o666, size=1 << 20)
    finally:
        os.umask(old)
    shm.close_fd()
    return os.stat(f"/dev/shm/{name}").st_uid


@pytest.fixture
def foreign_object(name):
    uid = as_nobody(_make_object, name)
    try:
        yield uid
    finally:
        os.unlink(f"/dev/shm/{name}")


@needs_root_and_nobody
def test_attach_refuses_an_object_of_another_user(name, foreign_object):
    with pytest.raises(RegionError, match=f"belongs to uid {foreign_object}"):
        Region.attach(name)
    p = emu("run", "--name", name, "--rw", "read", "--size", "64K", "--runtime", "1")
    one_line_error(p, "virtio-emu", "belongs to uid")
    p = hostd("status", "--name", name)
    one_line_error(p, "virtio-hostd", "belongs to uid")


@needs_root_and_nobody
def test_start_does_not_replace_an_object_of_another_user(name, tmp_path, foreign_object):
    before = os.stat(f"/dev/shm/{name}")
    p = hostd("start", "--name", name, "--store", tmp_path / "s", "--size", "1M")
    one_line_error(p, "virtio-hostd", "another user")
    after = os.stat(f"/dev/shm/{name}")
    assert (after.st_ino, after.st_uid) == (before.st_ino, before.st_uid)
    assert not (tmp_path / "s").exists()


def test_region_is_opened_to_its_user_only_once_laid_out(name, monkeypatch):
    """While vp_region_init writes the header, the object's mode is 0: no
    process of our user opens it half made."""
    seen = []

    class Spy:
        def __getattr__(self, attr):
            return getattr(region_mod.lib_real, attr)

        def vp_region_init(self, *args):
            seen.append(stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode))
            return region_mod.lib_real.vp_region_init(*args)

    monkeypatch.setattr(region_mod, "lib_real", region_mod.lib, raising=False)
    monkeypatch.setattr(region_mod, "lib", Spy())
    with Region.create(name) as r:
        assert seen == [0]
        assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        assert r.header.magic == 0x4F49545249565056
