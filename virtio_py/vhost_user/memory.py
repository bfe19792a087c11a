"""Guest memory as a table of fd-backed regions (SET_MEM_TABLE), mapped here.

A region is known by three addresses: its guest-physical address (what
descriptors carry), the front-end's virtual address ``userspace_addr`` (what
SET_VRING_ADDR carries) and ``va``, where this process mapped it.  Every
translation takes a length and succeeds only when the whole range lies in one
region: a buffer that runs off a region's end is refused, never read past it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._lowlevel import error_for, ffi, lib
from .._resource import Closeable
from .protocol import (
    VHOST_MEMORY_BASELINE_NREGIONS,
    MemoryRegionDesc,
    ProtocolError,
    VhostUserError,
)

PAGE_SIZE = mmap.PAGESIZE
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
U64_END = 1 << 64


class AddressError(VhostUserError):
    """An address range that does not lie wholly inside one region."""


@dataclass(frozen=True)
class MappedRegion:
    """One region and where this process mapped it.

    ``va`` is the address of the region's first byte here (hand it to C as
    ``(void *)va``); ``mmap`` is the mapping, which begins ``start`` bytes
    before the region (mmap offsets are page-aligned, mmap_offset need not be).
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    va: int
    start: int
    mmap: mmap.mmap = field(repr=False, compare=False)
    _buf: Any = field(repr=False, compare=False)  # cffi view pinning va

    @property
    def desc(self) -> MemoryRegionDesc:
        return MemoryRegionDesc(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


def _check_layout(descs: Sequence[MemoryRegionDesc]) -> None:
    if not 1 <= len(descs) <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(
            f"memory table of {len(descs)} regions (1 to {VHOST_MEMORY_BASELINE_NREGIONS})"
        )
    for i, d in enumerate(descs):
        if d.memory_size == 0:
            raise AddressError(f"region {i} is empty")
        for what, base in (
            ("guest_phys_addr", d.guest_phys_addr),
            ("userspace_addr", d.userspace_addr),
            ("mmap_offset", d.mmap_offset),
        ):
            if base + d.memory_size > U64_END:
                raise AddressError(f"region {i}: {what} {base:#x} + size {d.memory_size:#x} wraps")
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(d, key), d.memory_size, i) for i, d in enumerate(descs))
        for (a, asz, ai), (b, _, bi) in zip(spans, spans[1:]):
            if a + asz > b:
                raise AddressError(
                    f"regions {ai} and {bi} overlap in {key} ({a:#x}+{asz:#x} > {b:#x})"
                )


def _map_one(i: int, d: MemoryRegionDesc, fd: int) -> MappedRegion:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise AddressError(f"region {i}: fd {fd}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AddressError(f"region {i}: fd is not a memory file (mode {st.st_mode:#o})")
    if d.mmap_offset + d.memory_size > st.st_size:
        raise AddressError(
            f"region {i}: mmap_offset {d.mmap_offset:#x} + size "
            f"{d.memory_size:#x} is past the end of its file ({st.st_size:#x})"
        )
    # hugetlbfs reports its page size in st_blksize and needs offsets aligned to it
    align = (
        st.st_blksize
        if (st.st_blksize % PAGE_SIZE == 0 and st.st_blksize & (st.st_blksize - 1) == 0)
        else PAGE_SIZE
    )
    start = d.mmap_offset % align
    try:
        mm = mmap.mmap(
            fd,
            d.memory_size + start,
            flags=mmap.MAP_SHARED | MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=d.mmap_offset - start,
        )
    except (OSError, ValueError, OverflowError) as e:
        raise AddressError(f"region {i}: mmap failed: {e}") from None
    buf = ffi.from_buffer(mm)
    # A front-end that truncates its file must cost only its queues, never the
    # daemon: the C core's guard turns the SIGBUS into zero pages and EFAULT.
    rc = lib.vp_guard_add(buf, len(mm))
    if rc < 0:
        ffi.release(buf)
        mm.close()
        raise AddressError(f"region {i}: cannot guard the mapping: {error_for(rc)}")
    va = int(ffi.cast("uintptr_t", buf)) + start
    return MappedRegion(
        d.guest_phys_addr, d.memory_size, d.userspace_addr, d.mmap_offset, va, start, mm, buf
    )


def _unmap(r: MappedRegion) -> None:
    lib.vp_guard_remove(r._buf)
    ffi.release(r._buf)
    r.mmap.close()


class MemoryTable(Closeable):
    """The regions of one SET_MEM_TABLE, mapped read-write into this process."""

    def __init__(self, regions: Sequence[MappedRegion]) -> None:
        self.regions: tuple[MappedRegion, ...] = tuple(regions)

    @classmethod
    def map(cls, descs: Sequence[MemoryRegionDesc], fds: Sequence[int]) -> MemoryTable:
        """Check and map a table; one fd per region (one file may back several
        regions at different mmap_offsets).  The fds stay the caller's."""
        if len(fds) != len(descs):
            raise ProtocolError(f"memory table of {len(descs)} regions came with {len(fds)} fds")
        _check_layout(descs)
        mapped: list[MappedRegion] = []
        try:
            for i, (d, fd) in enumerate(zip(descs, fds)):
                mapped.append(_map_one(i, d, fd))
        except BaseException:
            for r in mapped:
                _unmap(r)
            raise
        return cls(mapped)

    @property
    def closed(self) -> bool:
        return not self.regions

    def _find(self, key: str, addr: int, length: int) -> tuple[MappedRegion, int]:
        if length <= 0:
            raise AddressError(f"empty range at {key} {addr:#x}")
        for r in self.regions:
            base = getattr(r, key)
            if base <= addr and addr - base + length <= r.memory_size:
                return r, addr - base
        raise AddressError(f"{key} range {addr:#x}+{length:#x} is not inside one region")

    def gpa_to_va(self, gpa: int, length: int) -> int:
        """This process's address of guest-physical [gpa, gpa+length)."""
        r, off = self._find("guest_phys_addr", gpa, length)
        return r.va + off

    def uaddr_to_va(self, uaddr: int, length: int) -> int:
        """This process's address of front-end-virtual [uaddr, uaddr+length)."""
        r, off = self._find("userspace_addr", uaddr, length)
        return r.va + off

    def gpa_to_uaddr(self, gpa: int, length: int) -> int:
        r, off = self._find("guest_phys_addr", gpa, length)
        return r.userspace_addr + off

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of guest memory (for inspection; the data plane is C)."""
        r, off = self._find("guest_phys_addr", gpa, length)
        return r.mmap[r.start + off : r.start + off + length]

    def write(self, gpa: int, data: bytes) -> None:
        """Store data buffers (not ring indices: C publishes those)."""
        r, off = self._find("guest_phys_addr", gpa, len(data))
        r.mmap[r.start + off : r.start + off + len(data)] = data

    def close(self) -> None:
        regions, self.regions = self.regions, ()
        for r in regions:
            _unmap(r)


class FrontendMemory(Closeable):
    """Guest RAM a front-end owns: memfd-backed regions to send with SET_MEM_TABLE.

    ``layout`` is (guest_phys_addr, memory_size) per region, sizes page
    multiples.  With ``shared_fd`` one memfd backs every region at increasing
    mmap_offset (as one QEMU RAM block backs several regions); otherwise each
    region has its own.  The front-end's addresses (userspace_addr) are
    ``uaddr_base`` + the region's offset in its file, a space of their own, so a
    back-end that confused them with guest-physical addresses would fail.
    Files are sealed against shrinking: a back-end's mapping cannot lose pages.
    """

    def __init__(
        self,
        layout: Sequence[tuple[int, int]],
        *,
        shared_fd: bool = True,
        uaddr_base: int = 0x7E00_0000_0000,
        name: str = "virtio_py-guest-ram",
    ) -> None:
        self.fds: list[int] = []
        self.table: MemoryTable | None = None
        try:
            descs = []
            offset = 0
            for i, (gpa, size) in enumerate(layout):
                if size <= 0 or size % PAGE_SIZE:
                    raise ValueError(f"region {i}: size {size:#x} is not a page multiple")
                if not shared_fd:
                    offset = 0
                    self.fds.append(self._memfd(name, size))
                uaddr = uaddr_base + (len(self.fds) - 1 if not shared_fd else 0) * (1 << 40)
                descs.append(MemoryRegionDesc(gpa, size, uaddr + offset, offset))
                offset += size
            if shared_fd:
                fd = self._memfd(name, offset)
                self.fds = [fd] * len(descs)
            self.table = MemoryTable.map(descs, self.fds)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _memfd(name: str, size: int) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        assert self.table is not None
        return self.table.regions

    def descs(self) -> list[MemoryRegionDesc]:
        return [r.desc for r in self.regions]

    def gpa_to_uaddr(self, gpa: int, length: int) -> int:
        assert self.table is not None
        return self.table.gpa_to_uaddr(gpa, length)

    def gpa_to_va(self, gpa: int, length: int) -> int:
        assert self.table is not None
        return self.table.gpa_to_va(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        assert self.table is not None
        return self.table.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        assert self.table is not None
        self.table.write(gpa, data)

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None
        for fd in set(self.fds):
            os.close(fd)
        self.fds = []
