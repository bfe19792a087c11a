"""A real Linux guest's disk: the daemon against qemu-storage-daemon.

The guest (tests/linux_guest.py: Debian's kernel under QEMU TCG, a busybox
initramfs) runs four concurrent `dd bs=4k iflag=direct` of 2048 blocks each
on its vhost-user-blk disk.  The disk is one raw file, served in turn by
`virtio-hostd start --vhost-user` (one stripe: the stripe file is the raw
image) and by qemu-storage-daemon (`driver=file, cache.direct=on`), each
with O_DIRECT, behind the same socket path and the same QEMU command line.
Rounds alternate (qemu-storage-daemon's is the untimed setup of each of
ours), so load drifting on the machine affects both alike.

Under TCG the guest's own CPU dominates: this is a sanity ratio (about 1.0
expected), not a device-speed comparison.  extra_info has both sides' MB/s
per round and the ratio of medians; nothing is asserted.
"""

import os
import shutil
import statistics
import sys
import tempfile

import pytest

from benchutil import print_report
from virtio_py.compare import DaemonProcess
from virtio_py.store import prewrite, stripe_path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
import linux_guest  # noqa: E402

ROUNDS = 3
JOBS, COUNT = 4, 2048  # 4 x 8 MiB, each job at its own place
SIZE = 64 << 20
CHUNK = 64 << 10
RESULTS = {}
# The kernel's crypto self-tests only slow the boot.
KERNEL_ARGS = "cryptomgr.notests=1"


@pytest.fixture(scope="module")
def bed(request):
    reason = linux_guest.ensure_packages()
    if reason:
        pytest.skip(reason)
    linux_guest.build_initramfs()
    work = tempfile.mkdtemp(prefix=f"vpb{os.getpid()}-vm-", dir="/var/tmp")
    try:
        store = os.path.join(work, "store")
        # Written through, so the reads reach the disk rather than holes; one
        # stripe lays the logical disk out as it is, so this file is the image.
        prewrite(store, 1, CHUNK, SIZE)
        yield {
            "name": f"vpb{os.getpid()}-vm",
            "store": store,
            "image": stripe_path(store, 0),
            "sock": os.path.join(work, "vhost.sock"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print_report(request, _report())


def _guest(sock):
    res = linux_guest.run_guest(
        sock, mode="bench", num_queues=1, jobs=JOBS, count=COUNT, kernel_args=KERNEL_ARGS
    )
    if not res.ok:
        pytest.fail("guest run failed:\n" + res.report())
    return res


def test_guest_dd_4k_direct_vs_qemu_storage_daemon(benchmark, bed):
    ours, qsd, boots = [], [], []

    def qsd_round():
        with linux_guest.StorageDaemon(bed["image"], bed["sock"]):
            res = _guest(bed["sock"])
        qsd.append(res.rates()["total"])

    def our_round():
        cfg = {"size": SIZE, "stripes": 1, "chunk": CHUNK, "vhost_user": bed["sock"]}
        with DaemonProcess(bed["name"], bed["store"], cfg):
            res = _guest(bed["sock"])
        ours.append(res.rates()["total"])
        boots.append(res.boot_s)

    benchmark.group = "vm"
    benchmark.pedantic(our_round, setup=qsd_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    med = {
        "mb_s": round(statistics.median(ours), 1),
        "qsd_mb_s": round(statistics.median(qsd), 1),
        "ratio": round(statistics.median(ours) / statistics.median(qsd), 3),
        "mb_s_rounds": [round(x, 1) for x in ours],
        "qsd_mb_s_rounds": [round(x, 1) for x in qsd],
        "kernel_boot_s": statistics.median(boots),
        "config": {
            "jobs": JOBS,
            "count": COUNT,
            "bs": 4096,
            "queues": 1,
            "size": SIZE,
            "accel": "tcg",
            "smp": 2,
            "direct": True,
        },  # fmt: skip
    }
    benchmark.extra_info.update(med)
    RESULTS["dd"] = med


def _report():
    r = RESULTS.get("dd")
    if not r:
        return None
    return (
        f"\nLinux guest, {JOBS} x dd bs=4k iflag=direct count={COUNT} (QEMU TCG, one queue), "
        f"median of {ROUNDS} rounds:\n"
        f"  virtio-hostd --vhost-user  {r['mb_s']:7.1f} MB/s  rounds {r['mb_s_rounds']}\n"
        f"  qemu-storage-daemon        {r['qsd_mb_s']:7.1f} MB/s  rounds {r['qsd_mb_s_rounds']}\n"
        f"  ratio {r['ratio']:.2f}"
    )
