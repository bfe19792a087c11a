"""The two workload engines do the same job: with the same seed the Python
loop issues the same requests in the same order as the C loop
(csrc/workload.c) and keeps the same latency sample.

Each engine runs in this process against a device served by hand in a
thread.  The device completes the oldest request only when the job has
iodepth requests in flight (or has issued them all), one at a time, so what
a job sees does not depend on timing.
"""

import collections
import os
import struct
import threading
import time
import types

import numpy as np
import pytest

from virtio_py import DeviceQueue, Region, Virtqueue
from virtio_py._lowlevel import ffi
from virtio_py.blk import GuestSlot
from virtio_py.workload import RW_MODES, run_engine
from virtio_py.workload.worker import RESULT_FIELDS

SEED = 0x5EED5EED
SECTOR = 512
OK = 0


class HandServedDevice:
    """Queue 0 of a fresh region, served by a thread: it records each
    request's (type, sector) in arrival order and completes requests in
    order, one at a time, each only once `depth` are pending or all `total`
    arrived.  Completions whose index is in `hold` wait `hold_s` first."""

    def __init__(self, name, depth, total, hold=(), hold_s=0.0):
        self.region = Region.create(name, queue_size=256, capacity=1 << 16, event_idx=False)
        self.region.set_daemon_pid(os.getpid())
        self.dq = DeviceQueue(self.region, 0)
        self.vq = Virtqueue(Region.attach(name), 0)
        self.slot = GuestSlot(self.vq, depth=depth)
        self.depth, self.total, self.hold, self.hold_s = depth, total, set(hold), hold_s
        self.requests = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        pending = collections.deque()
        served = 0
        while served < self.total and not self.done.is_set():
            chain = self.dq.pop()
            if chain is not None:
                head, segs = chain
                rtype, _, sector = struct.unpack("<IIQ", self.region.read(segs[0][0], 16))
                self.requests.append((rtype, sector))
                pending.append(chain)
                continue
            if pending and (len(pending) == self.depth or len(self.requests) == self.total):
                head, segs = pending.popleft()
                if served in self.hold:
                    time.sleep(self.hold_s)
                st_gpa, st_len, _ = segs[-1]
                self.region.write_data(st_gpa + st_len - 1, bytes([OK]))
                self.dq.push(head, sum(ln for _, ln, w in segs if w))
                self.dq.interrupt()
                served += 1
                continue
            self.dq.wait_kick(0.005)

    def close(self):
        self.done.set()
        self.thread.join(30)
        self.slot.close()
        self.vq.close()
        self.vq.region.close()
        self.dq.close()
        self.region.close()


def run(engine, name, rw, depth, nblocks, total, cap=0, hold=(), hold_s=0.0):
    """One job with engine on a hand-served device: (requests, result fields, latencies)."""
    dev = HandServedDevice(f"{name}{engine}", depth, total, hold, hold_s)
    try:
        p = ffi.new("struct vp_run_params *")
        p.rw, p.bs, p.iodepth, p.rwmix_read = RW_MODES[rw], SECTOR, depth, 50
        p.area_off, p.area_len, p.max_ios = 0, nblocks * SECTOR, total
        p.seed, p.timeout_ns = SEED, 20_000_000_000
        res = ffi.new("struct vp_run_result *")
        lat = np.zeros(max(cap, 1), dtype=np.uint32)
        rc = run_engine(engine, dev.slot, p, res, lat, cap, types.SimpleNamespace(value=0))
        assert rc == 0
        return dev.requests, {f: getattr(res, f) for f in RESULT_FIELDS}, lat[:cap].copy()
    finally:
        dev.close()


@pytest.mark.parametrize("rw,depth,nblocks", [
    ("randrw", 4, 6),       # clashes with blocks in flight, reads and writes drawn
    ("randread", 4, 2),     # fewer blocks than requests in flight: a clash is taken anyway
    ("read", 3, 5),         # sequential, round the area
])  # fmt: skip
def test_both_engines_issue_the_same_requests_for_a_seed(name, rw, depth, nblocks):
    total = 60
    c_req, c_res, _ = run("c", name, rw, depth, nblocks, total)
    py_req, py_res, _ = run("python", name, rw, depth, nblocks, total)
    assert len(c_req) == total
    assert py_req == c_req
    for f in ("issued", "ios", "reads", "writes", "short_reads", "dup_completions", "errors"):
        assert py_res[f] == c_res[f], f
    if rw == "randrw":
        assert 0 < c_res["writes"] < total


def test_both_engines_keep_the_same_latency_sample(name):
    """Reservoir sampling of 24 latencies into 6 slots: completions 1, 10, 19
    and 20 are held long, so the slots that hold a long latency show which
    completions each engine kept.  (A long latency is told apart only when
    the others' sum proves it: otherwise the round is run again.)"""
    total, cap, hold = 24, 6, (1, 10, 19, 20)
    hold_s = 0.15
    hold_ns = int(hold_s * 1e9)
    kept = {}
    for engine in ("c", "python"):
        for _ in range(3):
            _, res, lat = run(engine, name, "read", 1, 32, total, cap, hold, hold_s)
            if res["lat_total_ns"] < (len(hold) + 1) * hold_ns:
                break
        else:
            pytest.fail(f"{engine}: the short requests never took less than {hold_s} s together")
        assert res["lat_recorded"] == cap
        kept[engine] = [j for j in range(cap) if lat[j] >= hold_ns]
    assert kept["python"] == kept["c"]
    # Keeping the first six (completion 1 in slot 1 only) would differ.
    assert kept["c"] != [1]
