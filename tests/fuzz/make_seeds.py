"""Write the seed inputs of fuzz_devq.c into a directory: valid requests of
every type and layout, and rings broken in each way the device checks.

    python3 make_seeds.py DIR

The encoding mirrors LLVMFuzzerTestOneInput: four configuration bytes, the
multi-region table, then operations (an opcode byte and its arguments).
"""

import os
import struct
import sys

# Opcodes, in the order of the target's enum.
(REQ, DESC, AVAIL, RAW, POP, COMPLETE, DRAIN, PUSH, INTERRUPT, NEED_INTERRUPT) = range(10)
(DISABLE, ENABLE, SET_BASE, KICK, WAIT_KICK, SET_MEM, POP_RACE, ACK, DOORBELL) = range(10, 19)
# c3 bits 5-6: notification data, the device trusting the doorbell or re-reading the ring
ND_TRUST, ND_REREAD = 0x20, 0x40
IN, OUT, FLUSH, GET_ID, DISCARD, WZ = range(6)
# lay bits
SPLIT1, SPLIT2, SPLIT4 = 0, 1, 3
MERGE_HDR, MERGE_STS, SPLIT_HDR, NO_STS, HDR_WRITE, NO_PUBLISH = 4, 8, 16, 32, 64, 128
# place bits
ODD, HOSTILE, SPREAD = 4, 8, 16


def config(
    lg=3, event_idx=False, multi=False, qindex=0, store=0, cap=16, serial=1, c2=0, c3=0, regions=()
):
    c0 = lg | (8 if event_idx else 0) | (16 if multi else 0) | (qindex << 5) | (store << 6)
    c1 = cap | (serial << 5)
    b = bytes([c0, c1, c2, c3])
    for size_code, gpa_code in regions:
        b += bytes([size_code, gpa_code])
    return b


def req(t, sector=0, nsec=1, lay=0, place=0):
    return bytes([REQ, t, sector, nsec, lay, place])


def desc_next(i, nxt):
    return bytes([DESC, i, 3]) + struct.pack("<H", nxt)


def desc_flags(i, flags):
    return bytes([DESC, i, 2, flags & 0xFF])


def desc_len(i, length):
    return bytes([DESC, i, 1]) + struct.pack("<I", length)


def desc_addr_raw(i, addr):
    return bytes([DESC, i, 0, 0x0C, 0, 0]) + struct.pack("<Q", addr)


def avail_idx(v):
    return bytes([AVAIL, 0]) + struct.pack("<H", v)


def avail_ring(slot, v):
    return bytes([AVAIL, 2 | (slot << 3)]) + struct.pack("<H", v)


def used_event(v):
    return bytes([AVAIL, 4]) + struct.pack("<H", v)


def avail_flags(v):
    return bytes([AVAIL, 3]) + struct.pack("<H", v)


def set_base(la, ui):
    return bytes([SET_BASE]) + struct.pack("<HH", la, ui)


def push(head, length=0):
    return bytes([PUSH]) + struct.pack("<H", head) + bytes([length])


def race(*writes):
    """A pop with guest writes at the device's k-th read of guest memory:
    (at, what, idx, value bytes); what 0 addr, 1 len, 2 flags, 3 next (of
    descriptor idx), 4 avail idx, 5 avail ring[idx]."""
    b = bytes([POP_RACE, len(writes) - 1])
    for at, what, idx, value in writes:
        b += bytes([at, what, idx]) + value
    return b


def raw(off, width_code, value):
    return bytes([RAW]) + struct.pack("<I", off)[:3] + bytes([width_code]) + value


def doorbell_near(delta, other_queue=False):
    """A doorbell word for the served queue (or the other), last_avail + delta."""
    return bytes([DOORBELL, 2 if other_queue else 0]) + struct.pack("<i", delta)


def doorbell_raw(word):
    return bytes([DOORBELL, 1]) + struct.pack("<I", word)


MULTI4 = dict(multi=True, c2=3, regions=[(3, 0), (1, 2), (2, 0x41), (0, 0x85)])

SEEDS = {
    # one request of each type
    "read": config() + req(IN) + bytes([DRAIN]),
    "write-read": config() + req(OUT, 2, 2) + bytes([DRAIN]) + req(IN, 2, 2) + bytes([DRAIN]),
    "flush": config() + req(FLUSH, nsec=0) + bytes([DRAIN]),
    "get-id": config(serial=2) + req(GET_ID, nsec=20) + bytes([DRAIN]),
    "get-id-long-serial": config(serial=3) + req(GET_ID, nsec=31, lay=MERGE_STS) + bytes([DRAIN]),
    "get-id-no-serial": config(serial=0) + req(GET_ID, nsec=5) + bytes([DRAIN]),
    "discard": config() + req(OUT, 0, 4) + req(DISCARD, 0, (1 << 5) | 2) + bytes([DRAIN]),
    "write-zeroes-unmap": config() + req(WZ, 0, 3, place=0x40) + bytes([DRAIN]),
    "discard-flags": config() + req(DISCARD, 0, 3, place=0x40) + bytes([DRAIN]),
    "discard-two-ranges": config() + req(DISCARD, 0, 3, place=0x20) + bytes([DRAIN]),
    "unsupported-type": config() + req(6 | (9 << 3), nsec=1) + bytes([DRAIN]),
    "read-past-end": config(cap=4) + req(IN, 3, 2) + bytes([DRAIN]),
    "read-huge-sector": config() + req(IN, 0x85, 1) + bytes([DRAIN]),
    "read-wrong-direction": config()
    + req(IN, 0, 1, lay=MERGE_HDR)
    + req(OUT, 0, 1, lay=MERGE_STS)
    + bytes([DRAIN]),
    "write-partial-sector": config() + req(OUT, 0, 1 | 8 | (3 << 4)) + bytes([DRAIN]),
    # layouts
    "read-split4": config() + req(IN, 1, 4, lay=SPLIT4) + bytes([DRAIN]),
    "write-merged-header": config() + req(OUT, 1, 3, lay=SPLIT2 | MERGE_HDR) + bytes([DRAIN]),
    "read-merged-status": config() + req(IN, 1, 3, lay=SPLIT2 | MERGE_STS) + bytes([DRAIN]),
    "write-split-header": config() + req(OUT, 0, 2, lay=SPLIT4 | SPLIT_HDR) + bytes([DRAIN]),
    "out-of-order": config(lg=4)
    + req(OUT, 0, 1)
    + req(OUT, 1, 1)
    + req(IN, 0, 2)
    + bytes([POP, POP, POP, COMPLETE, 2, COMPLETE, 0x80, COMPLETE, 0, INTERRUPT]),
    "batch": config(lg=2)
    + req(OUT, 0, 1) * 4
    + bytes([DRAIN])
    + req(IN, 0, 1) * 4
    + bytes([DRAIN])
    + req(IN, 1, 1) * 4
    + bytes([DRAIN]),
    "queue-size-1-no-room": config(lg=0) + req(OUT, 0, 1, lay=MERGE_HDR) + bytes([DRAIN]) * 2,
    "queue-size-128": config(lg=7) + req(IN, 0, 7, lay=SPLIT4) * 3 + bytes([DRAIN]),
    "second-queue": config(qindex=1) + req(OUT, 2, 1) + bytes([DRAIN]),
    "other-queue-data": config() + req(OUT, 0, 1, place=3) + bytes([DRAIN]),
    # notification and interrupt suppression
    "event-idx": config(event_idx=True)
    + req(IN)
    + used_event(0)
    + bytes([ENABLE, DRAIN])
    + req(IN)
    + used_event(5)
    + bytes([DRAIN, NEED_INTERRUPT, INTERRUPT]),
    "no-interrupt-flag": config()
    + avail_flags(1)
    + req(IN)
    + bytes([DISABLE, DRAIN, ENABLE])
    + avail_flags(0)
    + req(IN)
    + bytes([DRAIN, NEED_INTERRUPT]),
    "kicks-acked": config(c3=0x10)
    + bytes([KICK, 3, WAIT_KICK, ACK, ACK, KICK, 1, KICK, 2, WAIT_KICK])
    + req(IN)
    + bytes([DRAIN, ACK]),
    # guest writes between the device's reads inside one pop (reads: 0 the
    # avail entry, then addr, len, flags, next of each descriptor)
    "race-len-after-check": config() + req(IN) + race((7, 1, 1, b"\xff" * 4)) + bytes([DRAIN]),
    "race-len-before-read": config() + req(IN) + race((6, 1, 1, b"\0\1\0\0")) + bytes([DRAIN]),
    "race-next-loop": config() + req(IN) + race((4, 3, 0, b"\0\0")) + bytes([DRAIN]),
    "race-addr": config()
    + req(OUT, 0, 1)
    + race((5, 0, 1, b"\x00\x10"), (9, 2, 1, b"\x03\x00"))
    + bytes([DRAIN]),
    "race-head": config()
    + req(IN)
    + req(IN)
    + race((0, 5, 0, b"\x03\x00"), (2, 4, 0, b"\x09\x00"))
    + bytes([POP, DRAIN]),
    "race-multi": config(**MULTI4)
    + req(IN, 0, 2, lay=SPLIT2, place=SPREAD)
    + race((5, 0x80, 1, b"\0" * 6 + b"\xff\xff"), (13, 1, 2, b"\x10\0\0\0"))
    + bytes([DRAIN]),
    "kicks": config() + bytes([KICK, 3, WAIT_KICK, KICK, 0xFF, KICK, 1, WAIT_KICK, WAIT_KICK]),
    "set-base": config()
    + set_base(0xFFFE, 0xFFFE)
    + avail_idx(0xFFFE)
    + bytes([AVAIL, 2 | (6 << 3), 0, 0])
    + req(OUT, 0, 1, lay=NO_PUBLISH)
    + avail_idx(0xFFFF)
    + bytes([DRAIN])
    + req(IN, 0, 1)
    + bytes([DRAIN]),
    "set-base-busy": config()
    + req(IN)
    + bytes([POP])
    + set_base(5, 5)
    + bytes([DRAIN, COMPLETE, 0]),
    "push-bogus": config() + req(IN) + bytes([POP]) + push(7) + push(300) + push(0, 1) + push(0, 1),
    # guest memory tables
    "multi-read": config(**MULTI4)
    + req(OUT, 0, 3, lay=SPLIT4, place=SPREAD)
    + bytes([DRAIN])
    + req(IN, 0, 3, lay=SPLIT4, place=SPREAD | 1)
    + bytes([DRAIN]),
    "multi-rings-inside": config(multi=True, c2=4 | 1, regions=[(3, 1), (2, 3)])
    + req(OUT, 1, 2)
    + bytes([DRAIN])
    + req(IN, 1, 2, place=1)
    + bytes([DRAIN]),
    "multi-overlap": config(multi=True, c2=2, regions=[(3, 1), (3, 1), (1, 0xC0)])
    + req(OUT, 0, 1, place=1)
    + bytes([DRAIN]),
    "multi-top-of-memory": config(multi=True, c2=8 | 1, regions=[(3, 0x40), (3, 0x7F)])
    + req(IN, 0, 2, lay=SPLIT2)
    + bytes([DRAIN]),
    "multi-set-mem": config(**MULTI4)
    + req(OUT, 0, 1)
    + bytes([SET_MEM, 0x03, DRAIN, SET_MEM, 0x0F])
    + req(OUT, 0, 1, place=2)
    + bytes([DRAIN, SET_MEM, 0x01])
    + req(OUT, 0, 1, place=1)
    + bytes([DRAIN]),
    # stores
    "striped-direct-odd": config(store=3, c3=1 | 4)
    + req(OUT, 0, 3, lay=SPLIT4, place=ODD)
    + bytes([DRAIN])
    + req(IN, 0, 3, lay=SPLIT4, place=ODD)
    + bytes([DRAIN])
    + req(WZ, 0, 5)
    + req(DISCARD, 0, 5)
    + bytes([DRAIN]),
    "striped": config(store=2, c3=3 | 8)
    + req(OUT, 1, 7, lay=SPLIT4)
    + bytes([DRAIN])
    + req(IN, 0, 7)
    + req(WZ, 0, 7, place=0x40)
    + bytes([DRAIN]),
    # rings broken in each way the device checks
    "broken-avail-jump": config()
    + req(IN)
    + avail_idx(100)
    + bytes([DRAIN, POP])
    + req(IN)
    + bytes([DRAIN]),
    "broken-head": config()
    + req(IN, lay=NO_PUBLISH)
    + avail_ring(0, 200)
    + bytes([AVAIL, 1, 0, 0, DRAIN]),
    "broken-next": config() + req(IN) + desc_next(1, 99) + desc_flags(1, 3) + bytes([DRAIN]),
    "broken-loop": config() + req(IN) + desc_next(1, 0) + desc_flags(1, 3) + bytes([DRAIN]),
    "broken-zero-len": config() + req(IN) + desc_len(1, 0) + bytes([DRAIN]),
    "broken-order": config() + req(OUT, 0, 1, lay=HDR_WRITE) + bytes([DRAIN]),
    "broken-indirect": config() + req(IN) + desc_flags(0, 4 | 1) + bytes([DRAIN]),
    "broken-addr": config() + req(IN) + desc_addr_raw(1, 0xFFFFFFFFFFFFFE00) + bytes([DRAIN]),
    "broken-addr-ring": config() + req(IN) + desc_addr_raw(2, 0x2000) + bytes([DRAIN]),
    "broken-len-wrap": config() + req(IN) + desc_len(1, 0xFFFFFFFF) + bytes([DRAIN]),
    "broken-inflight-twice": config()
    + req(IN)
    + bytes([POP])
    + avail_ring(1, 0)
    + avail_idx(2)
    + bytes([POP, DRAIN, COMPLETE, 0]),
    "hostile-reuse": config(lg=2)
    + req(OUT, 0, 1)
    + bytes([POP])
    + req(OUT, 0, 1, place=HOSTILE)
    + bytes([POP, DRAIN]),
    "broken-no-status": config() + req(OUT, 0, 1, lay=NO_STS) + bytes([DRAIN, POP]),
    "broken-short-header": config() + req(OUT, 0, 0) + desc_len(0, 8) + bytes([DRAIN]),
    "broken-segmax": config(c3=0x80 | 1) + req(IN, 0, 2, lay=SPLIT4) + bytes([DRAIN]),
    "broken-then-push": config()
    + req(IN)
    + req(IN)
    + bytes([POP])
    + avail_idx(77)
    + bytes([POP, COMPLETE, 0, INTERRUPT, ENABLE, DISABLE]),
    "scribble-header": config()
    + raw(0, 3, b"\xff" * 8)
    + raw(0x40, 2, b"\xff" * 4)
    + req(IN)
    + bytes([DRAIN])
    + raw(0x1000 + 64 * 3, 3, b"\x01" * 8)
    + bytes([DRAIN]),
    # notification data: a trusting device pops up to the word, ignores a
    # stale or misdirected one, breaks on one more than the queue ahead
    "nd-trust": config(c3=ND_TRUST)
    + req(IN)
    + req(IN)
    + req(IN)
    + doorbell_near(1)
    + bytes([DRAIN])
    + doorbell_near(-1)
    + doorbell_near(2, other_queue=True)
    + bytes([DRAIN, ENABLE, KICK, 1, WAIT_KICK])
    + doorbell_near(2)
    + bytes([DRAIN, ENABLE, DISABLE, COMPLETE, 0, INTERRUPT]),
    "nd-trust-ahead": config(c3=ND_TRUST) + req(IN) + doorbell_near(9) + bytes([DRAIN]),
    "nd-trust-raw": config(c3=ND_TRUST, event_idx=True)
    + req(OUT)
    + doorbell_raw(0x80000000)
    + doorbell_raw(0x00010000)
    + bytes([DRAIN, ENABLE]),
    "nd-reread": config(c3=ND_REREAD)
    + req(IN)
    + req(IN)
    + bytes([KICK, 1, WAIT_KICK])
    + doorbell_near(1)
    + bytes([DRAIN])
    + doorbell_near(-1)
    + doorbell_near(40)
    + bytes([DRAIN, ENABLE]),
    "multi-broken-addr": config(**MULTI4)
    + req(IN, place=1)
    + bytes([DESC, 1, 0, 0x05, 0x00, 0x01])
    + bytes([DRAIN]),
}


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, f"seed-{name}"), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {out}")


if __name__ == "__main__":
    main()
