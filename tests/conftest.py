import itertools
import os
import shutil
import tempfile
import uuid

import pytest

from hostd_util import Daemons

# /dev/shm is shared with other sessions (other pid namespaces too): names
# carry a random part, and the leftover check looks only at this session's.
SESSION = os.environ.setdefault("VIRTIO_PY_TEST_SESSION", f"vpt{uuid.uuid4().hex[:8]}")
_counter = itertools.count()


def _ours():
    return {e for e in os.listdir("/dev/shm") if SESSION in e}


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Nothing the tests create may remain in /dev/shm after the session."""
    before = _ours()
    yield
    left = sorted(_ours() - before)
    assert not left, f"left behind in /dev/shm: {left}"


@pytest.fixture
def name():
    """A device name unique to this test, recognisable as this session's."""
    return f"{SESSION}-{next(_counter)}"


@pytest.fixture
def daemons():
    """Starts daemons through the virtio-hostd command line (hostd_util.Daemons);
    teardown stops every one of them, and unlinks what a killed one left."""
    d = Daemons()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def shm_store():
    """A store directory in /dev/shm (tmpfs: memory speed), removed after."""
    d = tempfile.mkdtemp(prefix=f"{SESSION}-store-", dir="/dev/shm")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def device(name, tmp_path):
    """Factory: device(**cfg) -> a running daemon (a child process, as compare
    runs it) on a 64M store of 4 stripes in tmp_path, cfg changing the
    defaults of virtio_py.compare.BASE; stopped and unlinked after the test."""
    from virtio_py.compare import BASE, DaemonProcess

    started = []

    def make(**over):
        cfg = dict(BASE, size=64 << 20, stripes=4, chunk=64 << 10)
        cfg.update(over)
        # A random part: /dev/shm is shared with sessions in other pid
        # namespaces, whose test names can be the same as ours.
        d = DaemonProcess(
            f"{name}r{uuid.uuid4().hex[:6]}-{len(started)}",
            str(tmp_path / f"store{len(started)}"),
            cfg,
        )
        d.start()
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.stop()


@pytest.fixture(scope="module")
def guest_ready():
    """The Linux guest harness (tests/linux_guest.py) can boot: QEMU, a kernel
    and busybox there (installed if need be), the initramfs built; else skip."""
    import linux_guest

    reason = linux_guest.ensure_packages()
    if reason:
        pytest.skip(reason)
    linux_guest.build_initramfs()
