"""A tiny virtio-blk driver over a vhost-user connection, for tests that drive
the daemon's vhost-user transport without a VM.

The guest's RAM is a FrontendMemory (memfd regions sent with SET_MEM_TABLE);
rings are written with tests/mockring.py's MockRing through GuestRam, whose
stores are aligned atomic stores made by the C core (vp_guest_poke), as a
guest CPU makes them.  The front-end is virtio_py's VhostUserFrontend, which
sends what QEMU sends, in QEMU's order.

    with VhostGuest.connect(sock) as g:
        d = g.vring(0)
        d.write(0, b"x" * 4096)
        assert d.read(0, 4096) == b"x" * 4096
"""

import os
import select
import struct
import time

from mockring import MockRing, aligned_stores
from virtio_py import DeviceGoneError
from virtio_py._lowlevel import check, ffi, lib
from virtio_py.vhost_user import FrontendMemory, VhostUserFrontend

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
OK, IOERR, UNSUPP = 0, 1, 2
PAGE = 4096
MiB = 1 << 20
# Guest RAM as QEMU's q35 lays out a small guest: low memory, a hole, then
# more above it, both backed by one memfd at increasing offsets.
LAYOUT = ((0, 2 * MiB), (4 * MiB, 2 * MiB))
RING_SPAN = 64 * 1024  # per vring: desc, avail and used, page-aligned parts


class GuestRam:
    """Guest memory for MockRing: ``write`` stores as a guest CPU does (aligned
    pieces, widest first), ``read`` copies out.  Both take guest-physical
    addresses and refuse a range that is not inside one region."""

    def __init__(self, layout=LAYOUT, **kw):
        self.mem = FrontendMemory(layout, **kw)

    def _region(self, gpa, n):
        for r in self.mem.regions:
            if r.guest_phys_addr <= gpa and gpa + n <= r.guest_phys_addr + r.memory_size:
                return r
        raise IndexError(f"gpa {gpa:#x}+{n} is not inside one region")

    def write(self, gpa, data):
        data = bytes(data)
        r = self._region(gpa, len(data))
        base = ffi.cast("void *", r.va)
        for a, value, w in aligned_stores(gpa, data):
            check(lib.vp_guest_poke(base, r.memory_size, a - r.guest_phys_addr, value, w), "poke")

    def read(self, gpa, n):
        return self.mem.read(gpa, n)

    @property
    def size(self):
        """Guest RAM ends here: the first byte past the highest region."""
        return max(r.guest_phys_addr + r.memory_size for r in self.mem.regions)

    def close(self):
        self.mem.close()


class EventfdKick:
    """MockRing's kick: a write to the vring's kick eventfd."""

    def __init__(self, fd):
        self.fd = fd

    def post(self):
        os.eventfd_write(self.fd, 1)


class BlkVring:
    """One vring of the guest with a virtio-blk driver on it.

    Descriptors, the header pages and the status bytes of request k lie in
    the vring's own span of guest RAM; data buffers are the caller's GPAs
    (``buf``) or, for read/write, pages of the data area after the span.
    Requests are synchronous: each waits for its used entry.
    """

    def __init__(self, guest, index, num, ring_gpa, data_gpa, data_size, base=0):
        self.guest, self.index, self.num = guest, index, num
        ram, fe = guest.ram, guest.fe
        desc = ring_gpa
        avail = desc + 16 * num
        used = (avail + 6 + 2 * num + PAGE - 1) // PAGE * PAGE
        self.hdr_gpa = (used + 6 + 8 * num + PAGE - 1) // PAGE * PAGE
        assert self.hdr_gpa + PAGE <= ring_gpa + RING_SPAN
        self.data = (data_gpa, data_gpa + data_size)
        mem = ram.mem
        self.vr = fe.setup_vring(
            index,
            num,
            mem.gpa_to_uaddr(desc, 16 * num),
            mem.gpa_to_uaddr(avail, 6 + 2 * num),
            mem.gpa_to_uaddr(used, 6 + 8 * num),
            base,
        )
        self.ring = MockRing(
            ram, num, desc, avail, used, data=self.data, kick=EventfdKick(self.vr.kick_fd)
        )
        self.next_head = 0

    def buf(self, k, size=PAGE):
        return self.ring.buf(k, size)

    def wait_used(self, used_before, n=1, timeout=20):
        """Wait for n used entries after used_before (sleeping on the call
        eventfd); their (id, len)."""
        deadline = time.monotonic() + timeout
        while (self.ring.used_idx() - used_before) & 0xFFFF < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"vring {self.index}: {n} used entries after {used_before}"
                    f", used idx {self.ring.used_idx()}"
                )
            r, _, _ = select.select([self.vr.call_fd], [], [], min(left, 0.2))
            if r:
                try:
                    os.eventfd_read(self.vr.call_fd)
                except BlockingIOError:
                    pass
        return [self.ring.used_elem(used_before + k) for k in range(n)]

    def submit(self, requests, timeout=20):
        """Publish requests [(type, sector, data_segs)] at once (data_segs:
        [(gpa, len, writable)]), each with its header and status byte; wait
        for all; [(status, used len)] in the order given."""
        ram = self.guest.ram
        heads, status_at = [], {}
        used_before = self.ring.used_idx()
        for k, (rtype, sector, segs) in enumerate(requests):
            hdr = self.hdr_gpa + 32 * k
            st = hdr + 16
            assert st < self.hdr_gpa + PAGE
            ram.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
            ram.write(st, b"\xee")
            chain = [(hdr, 16, False)] + list(segs) + [(st, 1, True)]
            head = self.next_head
            if head + len(chain) > self.num:
                head = 0
            self.next_head = head + len(chain)
            self.ring.chain(chain, head)
            heads.append(head)
            status_at[head] = st
        # EVENT_IDX: interrupt once the first of them is used (used_event).
        ram.write(self.ring.avail_gpa + 4 + 2 * self.num, struct.pack("<H", used_before))
        self.ring.publish(*heads)
        done = dict(self.wait_used(used_before, len(heads), timeout))
        return [(ram.read(status_at[h], 1)[0], done[h]) for h in heads]

    def request(self, rtype, sector, segs=(), timeout=20):
        return self.submit([(rtype, sector, segs)], timeout)[0]

    def write(self, offset, data, k=0):
        """Write data (a multiple of 512 bytes) at byte offset, from data pages k on."""
        gpa = self.buf(k, len(data))
        self.guest.ram.write(gpa, data)
        st, _ = self.request(T_OUT, offset // 512, [(gpa, len(data), False)])
        if st != OK:
            raise OSError(f"write at {offset}: status {st}")

    def read(self, offset, length, k=0):
        gpa = self.buf(k, length)
        self.guest.ram.write(gpa, b"\xdd" * length)
        st, used = self.request(T_IN, offset // 512, [(gpa, length, True)])
        if st != OK or used != length + 1:
            raise OSError(f"read at {offset}: status {st}, used {used}")
        return self.guest.ram.read(gpa, length)


class VhostGuest:
    """A front-end on the socket with guest RAM sent and vrings set up on demand."""

    def __init__(self, fe, ram):
        self.fe, self.ram = fe, ram
        self.vrings = {}

    @classmethod
    def connect(cls, sock, layout=LAYOUT, timeout=10):
        """Connect and negotiate, trying again while the back-end still serves
        the front-end before (it turns a second one away at once)."""
        deadline = time.monotonic() + timeout
        while True:
            fe = VhostUserFrontend.connect(sock, timeout=timeout)
            try:
                fe.negotiate()
                break
            except (DeviceGoneError, ConnectionError):
                fe.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            except BaseException:
                fe.close()
                raise
        ram = None
        try:
            ram = GuestRam(layout)
            fe.set_mem_table(ram.mem)
        except BaseException:
            fe.close()
            if ram is not None:
                ram.close()
            raise
        return cls(fe, ram)

    def vring(self, index, num=64, data_size=256 * 1024, base=0, data_gpa=None):
        """Vring index with a driver: its rings in the first region, its data
        pages in the last (so a request's buffers lie in two regions)."""
        first, last = self.ram.mem.regions[0], self.ram.mem.regions[-1]
        ring_gpa = first.guest_phys_addr + index * RING_SPAN
        data_lo = last.guest_phys_addr + index * data_size if data_gpa is None else data_gpa
        assert ring_gpa + RING_SPAN <= first.guest_phys_addr + first.memory_size
        assert data_lo + data_size <= last.guest_phys_addr + last.memory_size
        d = BlkVring(self, index, num, ring_gpa, data_lo, data_size, base)
        self.vrings[index] = d
        return d

    def close(self):
        self.fe.close()
        self.ram.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
