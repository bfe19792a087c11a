"""The striped (RAID-0) block store: stripe-00.img, stripe-01.img, ... in a
directory.  Logical chunk k lives in stripe k mod N at byte (k div N) * chunk,
as md RAID-0 and LVM striping lay it out.

The geometry (where a byte lives, how big a stripe file is, the raw image of
the logical disk) is plain Python; ``StripedStore`` opens the files and the C
store that the device's I/O threads read and write through.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from ._lowlevel import ffi, lib, opened
from ._resource import Closeable
from .errors import ConfigError
from .limits import check_geometry

META = "store.json"
MEMORY_FS = ("tmpfs", "ramfs")


def stripe_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"stripe-{i:02d}.img")


def locate(offset: int, stripes: int, chunk: int) -> tuple[int, int]:
    """(stripe index, byte offset in that stripe) of a logical byte offset."""
    k, inner = divmod(offset, chunk)
    return k % stripes, (k // stripes) * chunk + inner


def stripe_file_size(size: int, stripes: int, chunk: int) -> int:
    chunks = -(-size // chunk)
    return -(-chunks // stripes) * chunk


def fs_type(path: str) -> str | None:
    """Type of the filesystem holding path, from /proc/self/mounts (the
    last, innermost mount wins)."""
    path = os.path.realpath(path)
    best, typ = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, typ = mnt, fields[2]
    except OSError:
        pass
    return typ


def _direct_supported(path: str, flags: int) -> bool:
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    os.close(fd)
    return True


def read_meta(directory: str) -> dict[str, Any] | None:
    """The geometry a store directory was created with (store.json), or None."""
    try:
        with open(os.path.join(directory, META)) as f:
            meta: dict[str, Any] = json.load(f)
            return meta
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {os.path.join(directory, META)}: {e}") from None


class StripedStore(Closeable):
    """Opened stripe files and the C store over them."""

    def __init__(
        self,
        directory: str,
        size: int,
        stripes: int = 12,
        chunk: int = 64 << 10,
        direct: bool = True,
    ) -> None:
        check_geometry(stripes, chunk, size)
        self.directory = directory
        self.size = size
        self.stripes = stripes
        self.chunk = chunk
        self.direct = False
        self.memory = False
        self.notice: str | None = None
        self.fds: list[int] = []
        self._st = None
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create store directory {directory}: {e.strerror}") from None
        self.memory = fs_type(directory) in MEMORY_FS
        meta = read_meta(directory)
        if meta and (meta.get("stripes"), meta.get("chunk")) != (stripes, chunk):
            # Another geometry would put every chunk somewhere else.
            raise ConfigError(
                f"store {directory} has {meta.get('stripes')} stripes of "
                f"{meta.get('chunk')}-byte chunks, not {stripes} of {chunk}"
            )
        try:
            self._open_files(direct)
            with open(os.path.join(directory, META), "w") as f:
                json.dump({"stripes": stripes, "chunk": chunk, "size": size}, f)
            fds = ffi.new("int[]", self.fds)
            self._st = opened(
                lib.vp_store_open, fds, stripes, chunk, size, int(self.direct), what="store"
            )
        except BaseException:
            self.close()
            raise

    def _open_files(self, direct: bool) -> None:
        fsize = stripe_file_size(self.size, self.stripes, self.chunk)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        if direct and not _direct_supported(stripe_path(self.directory, 0), flags):
            direct = False
            self.notice = (
                f"{self.directory}: O_DIRECT not supported by this filesystem, using buffered I/O"
            )
        if direct:
            flags |= os.O_DIRECT
        for i in range(self.stripes):
            path = stripe_path(self.directory, i)
            try:
                fd = os.open(path, flags, 0o600)
            except OSError as e:
                raise ConfigError(f"cannot open {path}: {e.strerror}") from None
            self.fds.append(fd)
            try:
                if os.fstat(fd).st_size < fsize:
                    os.ftruncate(fd, fsize)  # sparse
            except OSError as e:
                raise ConfigError(f"cannot make {path} {fsize} bytes: {e.strerror}") from None
        self.direct = direct

    @property
    def handle(self) -> Any:
        """The C store (struct vp_store *), for the device's server."""
        if self._st is None:
            raise ConfigError(f"store {self.directory} is closed")
        return self._st

    def close(self) -> None:
        if self._st is not None:
            lib.vp_store_close(self._st)
            self._st = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def assemble(
    directory: str,
    out: str,
    stripes: int | None = None,
    chunk: int | None = None,
    size: int | None = None,
) -> int:
    """Write the logical disk of a store as one raw image file, sparse
    where the store reads as zeros; returns its size."""
    meta = read_meta(directory) or {}
    stripes = meta.get("stripes") if stripes is None else stripes
    chunk = meta.get("chunk") if chunk is None else chunk
    size = meta.get("size") if size is None else size
    if stripes is None or chunk is None or size is None:
        raise ConfigError(f"{directory} has no {META}: give --stripes, --chunk and --size")
    check_geometry(stripes, chunk, size)
    files = []
    try:
        for i in range(stripes):
            try:
                files.append(open(stripe_path(directory, i), "rb"))
            except OSError as e:
                raise ConfigError(
                    f"cannot open {stripe_path(directory, i)}: {e.strerror}"
                ) from None
        with open(out, "wb") as o:
            off = 0
            while off < size:
                s, foff = locate(off, stripes, chunk)
                n = min(chunk - off % chunk, size - off)
                f = files[s]
                f.seek(foff)
                data = f.read(n)
                if data.count(0) == len(data):
                    o.seek(n, os.SEEK_CUR)  # a hole: the image of a 1T disk is not 1T
                else:
                    o.write(data + bytes(n - len(data)))
                off += n
            o.truncate(size)
    finally:
        for f in files:
            f.close()
    return size


def prewrite(store_dir: str, stripes: int, chunk: int, nbytes: int) -> int:
    """Write the first nbytes of the logical disk (every stripe's share) with
    non-zero data and flush it, so O_DIRECT reads go to the disk instead of
    returning zeros for holes in memory speed.  Returns the bytes written."""
    per = -(-nbytes // (chunk * stripes)) * chunk
    block = (b"virtio_py prewrite " * 64)[: 1 << 10] * (1 << 10)
    os.makedirs(store_dir, exist_ok=True)
    for i in range(stripes):
        fd = os.open(stripe_path(store_dir, i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            off = 0
            while off < per:
                n = min(len(block), per - off)
                os.pwrite(fd, block[:n], off)
                off += n
            os.fsync(fd)
            os.posix_fadvise(fd, 0, per, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return per * stripes


__all__ = [
    "META",
    "StripedStore",
    "assemble",
    "check_geometry",
    "fs_type",
    "locate",
    "prewrite",
    "read_meta",
    "stripe_file_size",
    "stripe_path",
]
