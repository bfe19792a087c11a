"""The host daemon against a hostile driver: malformed chains written with
raw stores mark their queue broken, status shows it, the daemon keeps
running and the other queues keep serving.  Malformed requests in
well-formed chains complete with IOERR or UNSUPP and break nothing."""
import struct
import time

import pytest

from hostd_util import daemon_pid, daemons, hostd, pid_running, status, wait_for  # noqa: F401
from virtio_py import QueueBrokenError, Region
from virtio_py._lowlevel import lib
from virtio_py.blk import T_DISCARD, T_GET_ID, T_IN, T_OUT, BlockDevice
from virtio_py.notifier import Notifier
from virtio_py.views import used_ring
from ringpoke import poke_desc

NUM = 16
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
OK, IOERR, UNSUPP = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP


class RawDriver:
    """A driver that writes queue q's ring with raw stores (Region.poke)."""

    def __init__(self, region, q):
        self.r = region
        self.q = q
        self.qi = region.queue_info(q)
        self.data = self.qi["data"]
        self.avail_idx = 0
        self.kick = Notifier.open_sem(region.sem_name(q, "kick"))

    def close(self):
        self.kick.close()

    def desc(self, i, addr, length, flags=0, next=0):
        poke_desc(self.r, self.qi["desc"], i, addr, length, flags, next)

    def publish(self, head, idx=None):
        self.r.poke(self.qi["avail"] + 4 + 2 * (self.avail_idx % self.qi["num"]), head, 2)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF if idx is None else idx
        self.r.poke(self.qi["avail"] + 2, self.avail_idx, 2)
        self.kick.post()

    def buf(self, k, length=4096):
        """GPA of the k-th 4 KiB page of this queue's data area."""
        return self.data + 4096 * k

    def chain(self, segs, head=0):
        """Write segs [(gpa, len, writable)] as a chain from desc head."""
        for n, (addr, length, w) in enumerate(segs):
            last = n == len(segs) - 1
            self.desc(head + n, addr, length, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                      0 if last else head + n + 1)

    def request(self, rtype, sector, data_segs, status_page=1, timeout=20):
        """A whole request: header (page 0), data segs, status byte; waits
        for the used entry and returns (status byte, used length)."""
        hdr = self.buf(0)
        self.r.write_data(hdr, struct.pack("<IIQ", rtype, 0, sector))
        st = self.buf(status_page)
        self.r.write_data(st, b"\xee")
        used_before = int(used_ring(self.r, self.q)["idx"])
        self.chain([(hdr, 16, False)] + data_segs + [(st, 1, True)])
        self.publish(0)
        wait_for(lambda: int(used_ring(self.r, self.q)["idx"]) != used_before, timeout,
                 "the used entry")
        u = used_ring(self.r, self.q)
        e = u["ring"][used_before % self.qi["num"]]
        assert e["id"] == 0
        return self.r.read(st, 1)[0], int(e["len"])


# One malformation per queue: (queue state reason, how to write it).
def _head_out_of_range(d):
    d.chain([(d.buf(0), 16, False), (d.buf(1), 1, True)])
    d.publish(NUM)


def _loop(d):
    d.desc(0, d.buf(0), 16, F_NEXT, 1)
    d.desc(1, d.buf(1), 512, F_NEXT, 0)
    d.publish(0)


def _outside_data_area(d):
    d.chain([(0, 16, False), (d.buf(1), 1, True)])    # GPA 0: the region header
    d.publish(0)


def _zero_length(d):
    d.chain([(d.buf(0), 16, False), (d.buf(2), 0, True), (d.buf(1), 1, True)])
    d.publish(0)


def _readable_after_writable(d):
    d.chain([(d.buf(0), 16, False), (d.buf(2), 512, True), (d.buf(3), 512, False),
             (d.buf(1), 1, True)])
    d.publish(0)


def _header_only(d):
    d.r.write_data(d.buf(0), struct.pack("<IIQ", T_IN, 0, 0))
    d.chain([(d.buf(0), 16, False)])
    d.publish(0)


def _avail_index_jump(d):
    d.chain([(d.buf(0), 16, False), (d.buf(1), 1, True)])
    d.publish(0, idx=NUM + 5)


def _indirect(d):
    d.desc(0, d.buf(0), 16, F_INDIRECT)
    d.publish(0)


BREAKERS = [("EHEAD", _head_out_of_range), ("ELOOP", _loop), ("EADDR", _outside_data_area),
            ("EZEROLEN", _zero_length), ("EORDER", _readable_after_writable),
            ("EFRAME", _header_only), ("EAVAIL", _avail_index_jump),
            ("EINDIRECT", _indirect)]
GOOD_RAW, GOOD_BLK = len(BREAKERS), len(BREAKERS) + 1     # the queues that must keep serving


def test_malformed_chains_break_only_their_queue(name, tmp_path, daemons):
    daemons.start(name, tmp_path / "s", "--queues", len(BREAKERS) + 2, "--queue-size", NUM,
                  "--stripes", 4, "--chunk", "4K", size="2M")
    pid = daemon_pid(name)
    region = Region.attach(name)
    drivers = []
    try:
        with BlockDevice.attach(name, queue=GOOD_BLK) as good:
            good.write(0, b"A" * 8192)
            for q, (_, breaker) in enumerate(BREAKERS):
                d = RawDriver(region, q)
                drivers.append(d)
                breaker(d)
            wait_for(lambda: all(q["broken"] for q in status(name)["queues"][:len(BREAKERS)]),
                     what="every hostile queue to be marked broken")
            st = status(name)
            assert st["running"] and pid_running(pid) and st["needs_reset"]
            for q, (reason, _) in enumerate(BREAKERS):
                assert st["queues"][q]["broken"], reason
                assert st["queues"][q]["broken_reason"].startswith(reason + ":"), \
                    (reason, st["queues"][q]["broken_reason"])
            assert not st["queues"][GOOD_RAW]["broken"]
            assert not st["queues"][GOOD_BLK]["broken"]
            text = hostd("status", "--name", name, check=True).stdout
            assert text.count("BROKEN") == len(BREAKERS)
            assert "NEEDS_RESET" in text

            # The other queues keep serving, the daemon keeps running.
            good.write(8192, b"B" * 8192)
            assert good.read(0, 16384) == b"A" * 8192 + b"B" * 8192

            # A guest on a broken queue is told, not left waiting.
            t0 = time.monotonic()
            with BlockDevice.attach(name, queue=0, timeout=20) as dev:
                with pytest.raises(QueueBrokenError):
                    dev.read(0, 4096)
            assert time.monotonic() - t0 < 15

            # Well-formed chains carrying bad requests: a status, not a break.
            raw = RawDriver(region, GOOD_RAW)
            drivers.append(raw)
            ok_read = [(raw.buf(2), 4096, True)]
            cases = [
                ("good read", T_IN, 0, ok_read, OK, 1 + 4096),
                ("IN into a readable buffer", T_IN, 0, [(raw.buf(2), 512, False)], IOERR, 1),
                ("OUT from a writable buffer", T_OUT, 0, [(raw.buf(2), 512, True)], IOERR, 1),
                ("IN of 100 bytes", T_IN, 0, [(raw.buf(2), 100, True)], IOERR, 1),
                ("IN past the end", T_IN, 4096, [(raw.buf(2), 512, True)], IOERR, 1),
                ("GET_ID into a readable buffer", T_GET_ID, 0, [(raw.buf(2), 20, False)],
                 IOERR, 1),
                # VERSION_1: any layout; the serial spreads over both.
                ("GET_ID in two buffers", T_GET_ID, 0,
                 [(raw.buf(2), 10, True), (raw.buf(3), 10, True)], OK, 21),
                ("DISCARD of 8 bytes", T_DISCARD, 0, [(raw.buf(2), 8, False)], IOERR, 1),
                ("unknown type", 0x1234, 0, [], UNSUPP, 1),
                ("split read", T_IN, 8, [(raw.buf(2), 512, True), (raw.buf(4), 3584, True)],
                 OK, 1 + 4096),
            ]
            for what, rtype, sector, segs, want, used in cases:
                got = raw.request(rtype, sector, segs)
                assert got == (want, used), what
            assert region.read(raw.buf(2), 4096) == b"A" * 4096
            assert region.read(raw.buf(4), 3584) == b"A" * 3584
            # A buffer O_DIRECT may refuse (memory alignment is the device's
            # business): it goes through a bounce buffer and reads fine.
            got = raw.request(T_IN, 0, [(raw.buf(6) + 1, 512, True)])
            assert got == (OK, 513)
            assert region.read(raw.buf(6) + 1, 512) == b"A" * 512
            ioerrs = 6
            st = status(name)
            q = st["queues"][GOOD_RAW]
            assert not q["broken"] and q["inflight"] == 0
            assert q["requests"]["ioerr"] == ioerrs and q["requests"]["unsupp"] == 1

            good.flush()
            assert good.read(8192, 8192) == b"B" * 8192
    finally:
        for d in drivers:
            d.close()
        region.close()
    s = hostd("stop", "--name", name)
    assert s.returncode == 0
