"""The host daemon against a hostile driver: malformed chains written with
raw stores mark their queue broken, status shows it, the daemon keeps
running and the other queues keep serving.  Malformed requests in
well-formed chains complete with IOERR or UNSUPP and break nothing."""

import struct

import pytest

from hostd_util import daemon_pid, hostd, status
from mockring import F_INDIRECT, F_NEXT, MockRing
from procs import wait_for
from virtio_py import QueueBrokenError, Region
from virtio_py._lowlevel import lib
from virtio_py.blk import T_DISCARD, T_GET_ID, T_IN, T_OUT, BlockDevice
from virtio_py.notifier import Notifier
from virtio_py.proc import pid_alive

NUM = 16
PAGE = 4096
OK, IOERR, UNSUPP = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP


def raw_driver(region, q):
    """Queue q's ring written with raw stores; each publish kicks the daemon.
    The caller closes m.kick."""
    return MockRing.of_queue(region, q, kick=Notifier.open_sem(region.sem_name(q, "kick")))


def page(m, k):
    """GPA of the k-th 4 KiB page of the queue's data area."""
    return m.buf(k, PAGE)


def request(m, rtype, sector, data_segs, timeout=20):
    """A whole request from head 0: header (page 0), data segs, status byte
    (page 1); waits for the used entry and returns (status byte, used length)."""
    hdr, st = page(m, 0), page(m, 1)
    m.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    m.mem.write(st, b"\xee")
    used_before = m.used_idx()
    m.chain([(hdr, 16, False)] + data_segs + [(st, 1, True)])
    m.publish(0)
    wait_for(lambda: m.used_idx() != used_before, "the used entry", timeout)
    id_, length = m.used_elem(used_before)
    assert id_ == 0
    return m.mem.read(st, 1)[0], length


# One malformation per queue: (queue state reason, how to write it).
def _head_out_of_range(d):
    d.chain([(page(d, 0), 16, False), (page(d, 1), 1, True)])
    d.publish(NUM)


def _loop(d):
    d.desc(0, page(d, 0), 16, F_NEXT, 1)
    d.desc(1, page(d, 1), 512, F_NEXT, 0)
    d.publish(0)


def _outside_data_area(d):
    d.chain([(0, 16, False), (page(d, 1), 1, True)])  # GPA 0: the region header
    d.publish(0)


def _zero_length(d):
    d.chain([(page(d, 0), 16, False), (page(d, 2), 0, True), (page(d, 1), 1, True)])
    d.publish(0)


def _readable_after_writable(d):
    d.chain(
        [
            (page(d, 0), 16, False),
            (page(d, 2), 512, True),
            (page(d, 3), 512, False),
            (page(d, 1), 1, True),
        ]
    )
    d.publish(0)


def _header_only(d):
    d.mem.write(page(d, 0), struct.pack("<IIQ", T_IN, 0, 0))
    d.chain([(page(d, 0), 16, False)])
    d.publish(0)


def _avail_index_jump(d):
    d.chain([(page(d, 0), 16, False), (page(d, 1), 1, True)])
    d.publish(0, idx=NUM + 5)


def _indirect(d):
    d.desc(0, page(d, 0), 16, F_INDIRECT)
    d.publish(0)


BREAKERS = [
    ("EHEAD", _head_out_of_range),
    ("ELOOP", _loop),
    ("EADDR", _outside_data_area),
    ("EZEROLEN", _zero_length),
    ("EORDER", _readable_after_writable),
    ("EFRAME", _header_only),
    ("EAVAIL", _avail_index_jump),
    ("EINDIRECT", _indirect),
]
GOOD_RAW, GOOD_BLK = len(BREAKERS), len(BREAKERS) + 1  # the queues that must keep serving


def test_malformed_chains_break_only_their_queue(name, tmp_path, daemons):
    daemons.start(
        name,
        tmp_path / "s",
        "--queues",
        len(BREAKERS) + 2,
        "--queue-size",
        NUM,
        "--stripes",
        4,
        "--chunk",
        "4K",
        size="2M",
    )
    pid = daemon_pid(name)
    region = Region.attach(name)
    drivers = []
    try:
        with BlockDevice.attach(name, queue=GOOD_BLK) as good:
            good.write(0, b"A" * 8192)
            for q, (_, breaker) in enumerate(BREAKERS):
                d = raw_driver(region, q)
                drivers.append(d)
                breaker(d)
            wait_for(
                lambda: all(q["broken"] for q in status(name)["queues"][: len(BREAKERS)]),
                "every hostile queue to be marked broken",
            )
            st = status(name)
            assert st["running"] and pid_alive(pid) and st["needs_reset"]
            for q, (reason, _) in enumerate(BREAKERS):
                assert st["queues"][q]["broken"], reason
                assert st["queues"][q]["broken_reason"].startswith(reason + ":"), (
                    reason,
                    st["queues"][q]["broken_reason"],
                )
            assert not st["queues"][GOOD_RAW]["broken"]
            assert not st["queues"][GOOD_BLK]["broken"]
            text = hostd("status", "--name", name, check=True).stdout
            assert text.count("BROKEN") == len(BREAKERS)
            assert "NEEDS_RESET" in text

            # The other queues keep serving, the daemon keeps running.
            good.write(8192, b"B" * 8192)
            assert good.read(0, 16384) == b"A" * 8192 + b"B" * 8192

            # A guest on a broken queue is told, not left waiting (that
            # would end in a timeout error).
            with BlockDevice.attach(name, queue=0, timeout=20) as dev:
                with pytest.raises(QueueBrokenError):
                    dev.read(0, 4096)

            # Well-formed chains carrying bad requests: a status, not a break.
            raw = raw_driver(region, GOOD_RAW)
            drivers.append(raw)
            ok_read = [(page(raw, 2), 4096, True)]
            cases = [
                ("good read", T_IN, 0, ok_read, OK, 1 + 4096),
                ("IN into a readable buffer", T_IN, 0, [(page(raw, 2), 512, False)], IOERR, 1),
                ("OUT from a writable buffer", T_OUT, 0, [(page(raw, 2), 512, True)], IOERR, 1),
                ("IN of 100 bytes", T_IN, 0, [(page(raw, 2), 100, True)], IOERR, 1),
                ("IN past the end", T_IN, 4096, [(page(raw, 2), 512, True)], IOERR, 1),
                (
                    "GET_ID into a readable buffer",
                    T_GET_ID,
                    0,
                    [(page(raw, 2), 20, False)],
                    IOERR,
                    1,
                ),
                # VERSION_1: any layout; the serial spreads over both.
                (
                    "GET_ID in two buffers",
                    T_GET_ID,
                    0,
                    [(page(raw, 2), 10, True), (page(raw, 3), 10, True)],
                    OK,
                    21,
                ),
                ("DISCARD of 8 bytes", T_DISCARD, 0, [(page(raw, 2), 8, False)], IOERR, 1),
                ("unknown type", 0x1234, 0, [], UNSUPP, 1),
                (
                    "split read",
                    T_IN,
                    8,
                    [(page(raw, 2), 512, True), (page(raw, 4), 3584, True)],
                    OK,
                    1 + 4096,
                ),
            ]
            for what, rtype, sector, segs, want, used in cases:
                got = request(raw, rtype, sector, segs)
                assert got == (want, used), what
            assert region.read(page(raw, 2), 4096) == b"A" * 4096
            assert region.read(page(raw, 4), 3584) == b"A" * 3584
            # A buffer O_DIRECT may refuse (memory alignment is the device's
            # business): it goes through a bounce buffer and reads fine.
            got = request(raw, T_IN, 0, [(page(raw, 6) + 1, 512, True)])
            assert got == (OK, 513)
            assert region.read(page(raw, 6) + 1, 512) == b"A" * 512
            ioerrs = 6
            st = status(name)
            q = st["queues"][GOOD_RAW]
            assert not q["broken"] and q["inflight"] == 0
            assert q["requests"]["ioerr"] == ioerrs and q["requests"]["unsupp"] == 1

            good.flush()
            assert good.read(8192, 8192) == b"B" * 8192
    finally:
        for d in drivers:
            d.kick.close()
        region.close()
    s = hostd("stop", "--name", name)
    assert s.returncode == 0
