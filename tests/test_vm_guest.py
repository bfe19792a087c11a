"""A real Linux guest on the daemon: QEMU (TCG) boots Debian's kernel with a
busybox initramfs (tests/linux_guest.py), its vhost-user-blk-pci disk on
`virtio-hostd start --vhost-user`.  In the guest, Linux's own virtio_blk
binds, /dev/vda has the daemon's capacity, a pattern written with O_DIRECT
reads back equal and concurrent direct reads complete; on the host, the
assembled store holds the pattern where the guest wrote it.  One boot per
queue count.

Skips, with the reason, where QEMU, the kernel or busybox are missing and
cannot be installed (installing needs root and apt-get)."""

import os

import pytest

import linux_guest
from hostd_util import daemon_pid, hostd, status
from virtio_py.proc import pid_alive

SIZE = 64 << 20
# The first block, one across a 64 KiB chunk boundary, one further in, the
# last 8 KiB of the disk.
OFFSETS = (0, 65536 - 4096, 1 << 20, SIZE - 8192)
LENGTH = 8192
# The kernel's crypto self-tests only slow the boot (and stall it on a loaded host).
KERNEL_ARGS = "cryptomgr.notests=1"


@pytest.mark.parametrize("queues", [1, 2])
def test_linux_guest_does_direct_io_on_the_daemon(guest_ready, queues, name, tmp_path, daemons):
    sock, store = str(tmp_path / "vhost.sock"), str(tmp_path / "store")
    daemons.start(name, store, "--vhost-user", sock, "--queues", queues, "--stripes", 4, size="64M")
    pid = daemon_pid(name)
    tag = f"q{queues}"
    res = linux_guest.run_guest(
        sock,
        mode="check",
        num_queues=queues,
        offsets=OFFSETS,
        length=LENGTH,
        tag=tag,
        jobs=4,
        kernel_args=KERNEL_ARGS,
        count=256,
        timeout=150,
    )
    assert res.ok, res.report()
    assert res["driver"] == "virtio_blk"
    assert int(res["size_sectors"]) * 512 == SIZE
    assert res["num_queues"] == str(queues)
    assert res["write_cache"] == "write back"  # FLUSH negotiated
    assert res["read_failed"] == "0"

    # The guest's requests went through the daemon's queues and counters.
    st = status(name)
    assert st["vhost_user"] == sock and pid_alive(pid)
    qs = st["queues"]
    assert not any(q["broken"] for q in qs)
    assert sum(q["requests"]["out"] for q in qs) >= len(OFFSETS)
    assert sum(q["requests"]["in"] for q in qs) >= 4 * 256
    assert sum(q["bytes_written"] for q in qs) >= len(OFFSETS) * LENGTH

    hostd("stop", "--name", name, check=True)
    assert not os.path.exists(sock)
    image = str(tmp_path / "disk.raw")
    hostd("assemble", "--store", store, "--out", image, check=True)
    assert linux_guest.image_mismatches(image, OFFSETS, LENGTH, tag) == []
