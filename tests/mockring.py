"""One split virtqueue written by hand, for every test that stores raw ring
memory: a hostile driver's descriptors, avail entries and avail index, the
used ring read back, and a hostile device's used entries.  In the spirit of
rust-vmm virtio-queue's MockSplitQueue.

The builder reaches the ring only through a guest-memory object with two
methods, ``write(gpa, data)`` and ``read(gpa, n)``, and the ring's addresses
(num, desc, avail, used: what VHOST_USER_SET_VRING_ADDR carries).  So the
same hostile rings can be written into whatever memory the device maps: the
native region today (RegionMemory), a vhost-user guest's fd-backed mappings
later.  What is written is never checked (a mock ring holds whatever the
test asks for); only where it goes must be part of the ring.
"""

import struct

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4  # VRING_DESC_F_*
DESC_SIZE, USED_ELEM_SIZE = 16, 8


def aligned_stores(gpa, data):
    """data at gpa as a guest CPU stores it: (address, little-endian value,
    width) in the widest aligned pieces (8, 4, 2, 1), lowest address first."""
    data = bytes(data)
    off = 0
    while off < len(data):
        a = gpa + off
        w = 8
        while w > 1 and (a % w or len(data) - off < w):
            w //= 2
        yield a, int.from_bytes(data[off : off + w], "little"), w
        off += w


class RegionMemory:
    """The guest memory of a native region.  Stores go through the C core's
    vp_guest_poke, each an aligned atomic store with release order as a
    guest CPU makes them, anywhere in the region (rings and header too)."""

    def __init__(self, region):
        self.region = region

    @property
    def size(self):
        """Guest memory ends here: the region's first byte past its end."""
        return self.region.size

    def write(self, gpa, data):
        """Store data at gpa in the widest aligned pieces, lowest address first."""
        for a, value, w in aligned_stores(gpa, data):
            self.region.poke(a, value, w)

    def read(self, gpa, n):
        return self.region.read(gpa, n)


class MockRing:
    """Queue of num entries at desc, avail and used (GPAs) in mem.

    data=(lo, hi) is the buffer area good descriptors point into (buf());
    kick, if given, is a notifier posted after every publish().  avail_idx
    starts from the index in memory and follows what publish() stores."""

    def __init__(self, mem, num, desc, avail, used, *, data=None, kick=None):
        self.mem = mem
        self.num = num
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        self.data = data
        self.kick = kick
        self.avail_idx = self._u16(avail + 2)

    @classmethod
    def of_queue(cls, region, q=0, kick=None):
        """Queue q of a native region, at the addresses its queue table gives a
        driver, with that queue's share of the data area."""
        qi = region.queue_info(q)
        return cls(
            RegionMemory(region),
            qi["num"],
            qi["desc"],
            qi["avail"],
            qi["used"],
            data=(qi["data"], qi["data"] + qi["data_size"]),
            kick=kick,
        )

    def _u16(self, gpa):
        return int.from_bytes(self.mem.read(gpa, 2), "little")

    # ---- the driver's side: descriptors and the avail ring --------------------

    def desc(self, i, addr, length, flags=0, next=0):
        """Write descriptor i of the table (i must be a table entry; its fields
        may hold anything)."""
        if not 0 <= i < self.num:
            raise IndexError(f"descriptor {i} is not in a table of {self.num}")
        self.mem.write(
            self.desc_gpa + DESC_SIZE * i, struct.pack("<QIHH", addr, length, flags, next)
        )

    def chain(self, segs, head=0):
        """Write segs [(gpa, len, writable)] as one chain from descriptor head
        on, each linked to the next; returns head."""
        for n, (addr, length, writable) in enumerate(segs):
            last = n == len(segs) - 1
            self.desc(
                head + n,
                addr,
                length,
                (F_WRITE if writable else 0) | (0 if last else F_NEXT),
                0 if last else head + n + 1,
            )
        return head

    def avail_entry(self, slot, head):
        """Write avail->ring[slot] without publishing it."""
        if not 0 <= slot < self.num:
            raise IndexError(f"avail slot {slot} is not in a ring of {self.num}")
        self.mem.write(self.avail_gpa + 4 + 2 * slot, struct.pack("<H", head))

    def publish(self, *heads, idx=None):
        """Put heads in the next avail entries, then store avail->idx: the
        index just past them, or idx (a hostile index) if given; kick."""
        for k, head in enumerate(heads):
            self.avail_entry((self.avail_idx + k) % self.num, head)
        self.avail_idx = (self.avail_idx + len(heads)) & 0xFFFF if idx is None else idx
        self.mem.write(self.avail_gpa + 2, struct.pack("<H", self.avail_idx))
        if self.kick is not None:
            self.kick.post()

    def buf(self, k, size):
        """GPA of the k-th buffer of size bytes in the data area."""
        lo, hi = self.data
        gpa = lo + size * k
        if gpa + size > hi:
            raise IndexError(f"buffer {k} of {size} bytes is past the data area")
        return gpa

    # ---- the device's side: the used ring --------------------------------------

    def used_idx(self):
        return self._u16(self.used_gpa + 2)

    def used_elem(self, slot):
        """(id, len) of used->ring[slot % num]."""
        gpa = self.used_gpa + 4 + USED_ELEM_SIZE * (slot % self.num)
        return struct.unpack("<II", self.mem.read(gpa, USED_ELEM_SIZE))

    def set_used_elem(self, slot, id_, length):
        """A hostile device's used entry at used->ring[slot]."""
        if not 0 <= slot < self.num:
            raise IndexError(f"used slot {slot} is not in a ring of {self.num}")
        self.mem.write(self.used_gpa + 4 + USED_ELEM_SIZE * slot, struct.pack("<II", id_, length))

    def set_used_idx(self, idx):
        """A hostile device's used->idx."""
        self.mem.write(self.used_gpa + 2, struct.pack("<H", idx))
