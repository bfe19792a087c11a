"""The vhost-user-blk back-ends the front-end tests drive: qemu-storage-daemon
on a raw file, and our own daemon (virtio-hostd start --vhost-user) on a
one-stripe store, which is a raw file too.  Either way ``image`` is the file
whose bytes are the disk's, offset for offset.

A test that cannot have qemu-storage-daemon skips with the reason.
"""

import os

import pytest

from virtio_py.compare import DaemonProcess
from virtio_py.qsd import QSD_SERIAL, QsdProcess, qsd_path
from virtio_py.store import stripe_path

KINDS = ("qsd", "hostd")


class Backend:
    """One running back-end: ``sock``, ``image``, ``serial`` (what GET_ID
    answers), ``pid``; ``kill()`` ends it as a crash would, ``stop()`` in order."""

    kind = ""

    def kill(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError


class QsdBackend(Backend):
    kind = "qsd"

    def __init__(self, directory, size, num_queues=1):
        if qsd_path() is None:
            pytest.skip("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
        self.image = os.path.join(directory, "disk.raw")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.sock = os.path.join(directory, "qsd.sock")
        self.serial = QSD_SERIAL
        self.proc = QsdProcess(self.image, self.sock, num_queues=num_queues).start()
        self.pid = self.proc.pid

    def kill(self):
        self.proc.kill()

    def stop(self):
        self.proc.stop()


class HostdBackend(Backend):
    """``virtio-hostd start --foreground --vhost-user SOCK --stripes 1``: a
    child of the test, as compare runs its daemon."""

    kind = "hostd"

    def __init__(self, directory, size, name, num_queues=1):
        store = os.path.join(directory, "store")
        self.image = stripe_path(store, 0)
        self.sock = os.path.join(directory, "hostd.sock")
        self.serial = f"vpy-{name}".encode()[:20]
        cfg = {"size": size, "stripes": 1, "queues": num_queues, "vhost_user": self.sock}
        self.proc = DaemonProcess(name, store, cfg).start()
        self.pid = self.proc.pid

    def kill(self):
        self.proc.kill()

    def stop(self):
        self.proc.stop()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def start(kind, directory, size, name, num_queues=1):
    if kind == "qsd":
        return QsdBackend(directory, size, num_queues)
    return HostdBackend(directory, size, f"{name}-hd", num_queues)
