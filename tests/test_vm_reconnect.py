"""A real Linux guest keeps writing while its vhost-user back-end, the
daemon, is killed with SIGKILL and started again three times: QEMU
(`-chardev socket,...,reconnect=1`) reconnects, hands the daemon back the
in-flight area it kept (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and the guest
sees no I/O error; the pattern it wrote last is in the store.

Skips, with the reason, where QEMU, the kernel or busybox are missing."""

import os
import signal
import time
from functools import partial

import linux_guest
from hostd_util import hostd
from procs import wait_for
from virtio_py.pidfile import probe

SIZE = 64 << 20
OFFSETS = (0, 1 << 20)
KERNEL_ARGS = "cryptomgr.notests=1"
RESTARTS = 3


def _maps_inflight(pid):
    """Has pid mapped the in-flight memfd?"""
    with open(f"/proc/{pid}/maps") as f:
        return "memfd:vhost-user-inflight" in f.read()


def test_linux_guest_writes_on_through_three_daemon_restarts(guest_ready, name, tmp_path, daemons):
    sock, store = str(tmp_path / "vhost.sock"), str(tmp_path / "store")
    args = ("--vhost-user", sock, "--stripes", 4)
    daemons.start(name, store, *args, size="64M")
    with linux_guest.Guest(
        sock,
        mode="loop",
        secs=40,
        offsets=OFFSETS,
        reconnect=1,
        kernel_args=KERNEL_ARGS,
    ) as g:
        assert g.wait_for("loop_iter", 150) is not None, g.wait(1).report()
        for _ in range(RESTARTS):
            time.sleep(2)
            os.kill(probe(name).pid, signal.SIGKILL)
            wait_for(lambda: not probe(name).alive, "the killed daemon to be gone")
            p = daemons.start(name, store, *args, size="64M")
            assert "took over" in p.stdout, p.stdout
            # QEMU hands back the in-flight area the first daemon made.
            wait_for(
                partial(_maps_inflight, probe(name).pid), "the in-flight area after the reconnect"
            )
        res = g.wait(240)
    assert res.ok, res.report()
    hostd("stop", "--name", name, check=True)
    image = str(tmp_path / "disk.raw")
    hostd("assemble", "--store", store, "--out", image, check=True)
    assert linux_guest.image_mismatches(image, OFFSETS, 4096, res.get("loop_last_tag")) == []
