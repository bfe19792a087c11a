"""The per-request loop of a worker, in two engines that do the same job.

``c`` is ``vp_guest_run`` (csrc/workload.c): Python costs several
microseconds per request, as much as the whole device round trip on a
memory store, so a loop in Python measures the interpreter, not the kick
path.  ``python`` is the same loop over the same C calls, step for step, to
show that cost: with the same seed it issues the same requests in the same
order (the same xorshift64* draws, a block in flight drawn again, up to 64
times) and keeps the same latency sample (reservoir sampling from its own
generator, seeded with splitmix64 of the seed).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .._lowlevel import ffi, lib
from ..blk import GuestSlot
from ..limits import SECTOR

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
CLASH_TRIES = 64  # draws before a block already in flight is taken anyway
_RANDOM = (lib.VP_RW_RANDREAD, lib.VP_RW_RANDWRITE, lib.VP_RW_RANDRW)
_WRITES = (lib.VP_RW_WRITE, lib.VP_RW_RANDWRITE)


def splitmix64(x: int) -> int:
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class XorShift64Star:
    """The C engine's generator (rng_next in csrc/workload.c)."""

    def __init__(self, state: int) -> None:
        self.state = state & MASK64

    def next(self) -> int:
        x = self.state
        x ^= x >> 12
        x ^= (x << 25) & MASK64
        x ^= x >> 27
        self.state = x
        return (x * 0x2545F4914F6CDD1D) & MASK64


def run_engine(
    engine: str, slot: GuestSlot, params: Any, res: Any, lat: Any, cap: int, stop: Any
) -> int:
    """Run the job of params on slot with the named engine; 0 or the error
    code that stopped it.  lat (a numpy uint32 array) gets up to cap latencies."""
    if engine == "c":
        lat_p = ffi.cast("uint32_t *", lat.ctypes.data) if cap else ffi.NULL
        return int(lib.vp_guest_run(slot._g, slot.strategy, params, res, lat_p, cap))
    return python_loop(slot, params, res, lat, cap, stop)


def python_loop(slot: GuestSlot, params: Any, res: Any, lat: Any, cap: int, stop: Any) -> int:
    """vp_guest_run with the loop in Python (engine=python).  stop.value set
    ends the job as params.stop does the C one's."""
    g = slot._g
    submit, wait_any, now = lib.vp_guest_blk_submit, lib.vp_guest_wait_any, lib.vp_now_ns
    data_ptr = lib.vp_guest_data_ptr
    ffi.memmove(res, bytes(ffi.sizeof("struct vp_run_result")), ffi.sizeof("struct vp_run_result"))
    depth, bs, rw, verify = params.iodepth, params.bs, params.rw, params.verify
    if (
        not 1 <= depth <= lib.VP_MAX_TAGS
        or bs == 0
        or bs % SECTOR
        or bs > lib.vp_guest_max_data(g)
        or params.area_len < bs
        or params.area_off % SECTOR
        or rw > lib.VP_RW_RANDRW
        or params.rwmix_read > 100
    ):
        return -errno.EINVAL
    status, ln = ffi.new("uint8_t *"), ffi.new("uint32_t *")
    bad = ffi.new("uint64_t *")
    rand = rw in _RANDOM
    mixed = rw == lib.VP_RW_RANDRW
    always_write = rw in _WRITES
    nblocks = params.area_len // bs
    area_off, mix, vseed = params.area_off, params.rwmix_read, params.verify_seed
    seed = params.seed or GOLDEN
    rng = XorShift64Star(seed)
    lrng = XorShift64Star(splitmix64(seed))
    max_ios, deadline, timeout = params.max_ios, params.deadline_ns, params.timeout_ns
    t_sub = [0] * depth
    sec = [0] * depth
    wr = [False] * depth
    busy = pos = issued = ios = 0
    full = (1 << depth) - 1
    lat_max = lat_total = recorded = 0
    stopping = False
    full_since = 0
    res.t_start_ns = now()
    while True:
        # Fill the queue up to iodepth.
        while not stopping and busy != full:
            if (max_ios and issued >= max_ios) or stop.value or (deadline and now() >= deadline):
                stopping = True
                break
            free = ~busy & full
            tag = (free & -free).bit_length() - 1
            if rand:
                # Never two requests on one block at once: a read racing a
                # write would see a torn block.
                tries = 0
                while True:
                    blk = rng.next() % nblocks
                    s = (area_off + blk * bs) // SECTOR
                    if tries >= CLASH_TRIES or not any(
                        sec[t] == s for t in range(depth) if busy >> t & 1
                    ):
                        break
                    tries += 1
            else:
                blk = pos % nblocks
                pos += 1
                s = (area_off + blk * bs) // SECTOR
            w = always_write or (mixed and rng.next() % 100 >= mix)
            if w and verify:
                lib.vp_verify_fill(data_ptr(g, tag), s, bs, vseed)
            sec[tag], wr[tag] = s, w
            t_sub[tag] = now()
            r = submit(
                g, tag, lib.VIRTIO_BLK_T_OUT if w else lib.VIRTIO_BLK_T_IN, s, bs, slot.strategy
            )
            if r == -errno.ENOSPC:
                # Ring full (other workers' requests): retry once something completed.
                res.queue_full += 1
                if not rand:
                    pos -= 1
                if not busy:
                    # Nothing of ours to wait for: retry after the others'
                    # completions, as long as we would wait for our own.
                    t = now()
                    if not full_since:
                        full_since = t
                    elif timeout >= 0 and t - full_since >= timeout:
                        res.rc = -errno.ETIMEDOUT
                        stopping = True
                    os.sched_yield()
                break
            full_since = 0
            if r:
                res.rc = r
                stopping = True
                break
            busy |= 1 << tag
            issued += 1
        if not busy:
            if stopping:
                break
            continue  # the ring was full: try again
        tag = wait_any(g, busy, timeout, status, ln)
        t = now()
        if tag < 0:
            res.rc = tag
            break
        if not busy >> tag & 1:
            res.dup_completions += 1  # a completion for a tag not in flight
            continue
        busy &= ~(1 << tag)
        d = t - t_sub[tag]
        lat_max = max(lat_max, d)
        lat_total += d
        if cap:
            if ios < cap:
                lat[ios] = min(d, 0xFFFFFFFF)
                recorded = ios + 1
            else:
                # Reservoir sampling: every latency is kept with equal odds.
                j = lrng.next() % (ios + 1)
                if j < cap:
                    lat[j] = min(d, 0xFFFFFFFF)
        ios += 1
        if status[0] != lib.VIRTIO_BLK_S_OK:
            res.errors += 1
            if not res.first_error_status:
                res.first_error_status = status[0]
            continue
        if wr[tag]:
            res.writes += 1
            continue
        res.reads += 1
        if ln[0] != bs + 1:
            res.short_reads += 1
        if verify:
            kind = lib.vp_verify_check(data_ptr(g, tag), sec[tag], bs, vseed, bad)
            # Mixed jobs read blocks they may not have written yet.
            if kind == lib.VP_VERIFY_UNWRITTEN and mixed:
                res.verify_unwritten += 1
            elif kind:
                res.verify_failures += 1
                if res.verify_failures == 1:
                    res.first_bad_sector, res.first_bad_kind = bad[0], kind
            else:
                res.verified += 1
    res.t_end_ns = now()
    res.issued, res.ios = issued, ios
    res.bytes_read, res.bytes_written = res.reads * bs, res.writes * bs
    res.lat_recorded, res.lat_max_ns, res.lat_total_ns = recorded, lat_max, lat_total
    return int(res.rc)
