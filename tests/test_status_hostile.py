"""`virtio-hostd status` against a guest that writes the header and the
counters: it copies the header once, checks the copy and reads nothing of
it again, and treats every counter as untrusted.  Whatever value lands in
any header field or device counter, status either reports or refuses the
region in one line; it never crashes (a fault, an uncaught exception)."""

import random
import threading

import procs
from host_daemon.status import device_status, format_status
from virtio_py import Region, VirtioError
from virtio_py._lowlevel import ffi, lib

HEADER = ffi.sizeof("struct vp_region_header")
VALUES = [0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63, 2**64 - 1, 2**64 - 4096]


def _status_or_refusal(name):
    """'ok', or the name of a VirtioError (a one-line refusal)."""
    try:
        format_status(device_status(name))
        return "ok"
    except VirtioError as e:
        return type(e).__name__


def _every_value_everywhere(name, targets):
    """In a child: status after each store of each value into each place;
    any other exception propagates and fails the test (a fault kills the
    child, which fails it too)."""
    r = Region.attach(name)
    outcomes = set()
    try:
        for gpa, width in targets:
            saved = int.from_bytes(r.read(gpa, width), "little")
            for v in VALUES:
                r.poke(gpa, v & ((1 << 8 * width) - 1), width)
                outcomes.add(_status_or_refusal(name))
            r.poke(gpa, saved, width)
    finally:
        r.close()
    return outcomes


def test_status_survives_any_value_in_any_header_field(name):
    with Region.create(name, queues=2, queue_size=16, event_idx=False) as r:
        targets = [(off, 4) for off in range(0, HEADER, 4)]
        targets += [(off, 8) for off in range(0, HEADER, 8)]
        outcomes = procs.run(_every_value_everywhere, name, targets, timeout=600)
        assert "ok" in outcomes  # not refused wholesale
        assert outcomes <= {"ok", "RegionError"}, outcomes
        assert device_status(name)["queues"][1]["broken"] is False  # all put back
        del r


def test_status_survives_any_value_in_the_device_counters(name):
    with Region.create(name, queues=2, queue_size=16) as r:
        base = r.device_layout[0]["shared"] + ffi.offsetof("struct vp_queue_shared", "dev")
        n = ffi.sizeof("struct vp_device_stats")
        targets = [(base + off, 4) for off in range(0, n, 4)]
        outcomes = procs.run(_every_value_everywhere, name, targets, timeout=600)
        assert outcomes == {"ok"}
        # An unknown code is shown as such (2^31 and up once raised).
        r.poke(base + ffi.offsetof("struct vp_device_stats", "broken"), 0x80000000, 4)
        q0 = device_status(name)["queues"][0]
        assert q0["broken"] and q0["broken_reason"] == f"unknown code {0x80000000}"
        r.poke(base + ffi.offsetof("struct vp_device_stats", "broken"), lib.VP_EHEAD, 4)
        assert device_status(name)["queues"][0]["broken_reason"].startswith("EHEAD:")


def _status_many(name, n):
    return [_status_or_refusal(name) for _ in range(n)]


def test_status_survives_a_queue_table_flipping_under_it(name):
    """Another guest flips queue 0's `shared` between its true place and
    wild ones while status runs: status reads it once, so it either sees a
    good table or refuses one (read twice, it faulted in about one call of
    sixty)."""
    with Region.create(name, queues=2, queue_size=16) as r:
        gpa = ffi.offsetof("struct vp_region_header", "queue") + ffi.offsetof(
            "struct vp_queue_info", "shared"
        )
        good = r.device_layout[0]["shared"]
        wild = [2**64 - 4096, r.size - 64, 1 << 40, r.size + (1 << 30)]
        stop = threading.Event()

        def flip():
            rng = random.Random(1)
            while not stop.is_set():
                r.poke(gpa, rng.choice(wild), 8)
                r.poke(gpa, good, 8)

        t = threading.Thread(target=flip)
        t.start()
        try:
            with procs.Children() as kids:
                runs = [kids.start(_status_many, name, 100) for _ in range(10)]
                outcomes = [o for c in runs for o in c.join(600)]
        finally:
            stop.set()
            t.join()
        assert set(outcomes) <= {"ok", "RegionError"}
        assert "ok" in outcomes
