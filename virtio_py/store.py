"""The striped (RAID-0) block store: stripe-00.img, stripe-01.img, ... in a
directory.  Logical chunk k lives in stripe k mod N at byte (k div N) * chunk,
as md RAID-0 and LVM striping lay it out.

The geometry (where a byte lives, how big a stripe file is, the raw image of
the logical disk) is plain Python; ``StripedStore`` opens the files and the C
store that the device's I/O threads read and write through.

The daemon writes guest data into the directory, so it must be ours alone:
created 0700, or refused unless it is a real directory of this user that no
one else may write.  Everything in it is opened relative to the directory,
never through a symlink, and stripe files must be regular files with one
link; store.json is replaced by rename.  One daemon serves a store at a
time: it holds an flock on the directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from typing import Any

from ._lowlevel import ffi, lib, opened
from ._resource import Closeable
from .errors import ConfigError
from .limits import check_geometry
from .proc import flock_holder

META = "store.json"
MEMORY_FS = ("tmpfs", "ramfs")


def _stripe_name(i: int) -> str:
    return f"stripe-{i:02d}.img"


def stripe_path(directory: str, i: int) -> str:
    return os.path.join(directory, _stripe_name(i))


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


def open_store_dir(directory: str) -> int:
    """An O_DIRECTORY fd of a store directory this user can trust: made 0700
    if missing; an existing one only if it is not a symlink, belongs to this
    user and is writable by no one else."""
    path = os.path.abspath(directory)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigError(f"cannot create store directory {directory}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        # A symlink fails O_DIRECTORY | O_NOFOLLOW with ENOTDIR or ELOOP.
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise ConfigError(f"store {directory} is a symlink: refusing it") from None
        if e.errno == errno.ENOTDIR:
            raise ConfigError(f"store {directory} is not a directory") from None
        raise ConfigError(f"cannot open store {directory}: {e.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        os.close(fd)
        raise ConfigError(f"store {directory} {problem}: refusing it")
    return fd


def _open_in(dirfd: int, directory: str, name: str, flags: int, *, owned: bool = True) -> int:
    """name in the directory, never through a symlink, and only a regular file
    with one link (of this user, if owned)."""
    path = os.path.join(directory, name)
    try:
        # Looked at before it is opened: opening a device or a FIFO may
        # already do something.
        mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as e:
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    if stat.S_ISLNK(mode):
        raise ConfigError(f"{path} is a symlink: refusing it")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path} is not a regular file: refusing it")
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symlink: refusing it") from None
        if e.errno == errno.EINVAL and flags & os.O_DIRECT:
            raise
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} links"
    elif owned and st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}"
    if problem:
        os.close(fd)
        raise ConfigError(f"{path} {problem}: refusing it")
    return fd


def _direct_supported(dirfd: int, directory: str, name: str, flags: int) -> bool:
    try:
        fd = _open_in(dirfd, directory, name, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise ConfigError(f"cannot open {os.path.join(directory, name)}: {e.strerror}") from None
    os.close(fd)
    return True


def _read_meta_at(dirfd: int, directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, META)
    try:
        fd = _open_in(dirfd, directory, META, os.O_RDONLY, owned=False)
    except ConfigError:
        if not os.path.lexists(path):
            return None
        raise
    try:
        with os.fdopen(fd) as f:
            meta: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"cannot read {path}: not a JSON object")
    return meta


def _write_meta_at(dirfd: int, directory: str, meta: dict[str, Any]) -> None:
    """store.json replaced whole: written to a new file, then renamed."""
    tmp = f".{META}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    fd = _open_in(dirfd, directory, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.rename(tmp, META, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise


def read_meta(directory: str) -> dict[str, Any] | None:
    """The geometry a store directory was created with (store.json), or None."""
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read {os.path.join(directory, META)}: {e}") from None
    try:
        return _read_meta_at(dirfd, directory)
    finally:
        os.close(dirfd)


MAP_ENV = "VIRTIO_PY_STORE_MAP"


def default_mapped() -> bool:
    """$VIRTIO_PY_STORE_MAP: 0 keeps a memory store on read and write calls."""
    return os.environ.get(MAP_ENV, "1") != "0"


class StripedStore(Closeable):
    """Opened stripe files and the C store over them.  On a memory
    filesystem (tmpfs) the stripe files are mapped and requests copy to
    and from the page cache directly (mapped=None: default_mapped())."""

    def __init__(
        self,
        directory: str,
        size: int,
        stripes: int = 12,
        chunk: int = 64 << 10,
        direct: bool = True,
        mapped: bool | None = None,
    ) -> None:
        check_geometry(stripes, chunk, size)
        self.directory = directory
        self.size = size
        self.stripes = stripes
        self.chunk = chunk
        self.direct = False
        self.memory = False
        self.mapped = False
        self.notice: str | None = None
        self.fds: list[int] = []
        self._st = None
        self.dirfd: int | None = None
        dirfd = self.dirfd = open_store_dir(directory)
        try:
            try:
                fcntl.flock(dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = flock_holder(dirfd)
                raise ConfigError(
                    f"store {directory} is in use by another daemon"
                    + (f" (pid {pid})" if pid else "")
                ) from None
            self.memory = fs_type(directory) in MEMORY_FS
            meta = _read_meta_at(dirfd, directory)
            if meta and (meta.get("stripes"), meta.get("chunk")) != (stripes, chunk):
                # Another geometry would put every chunk somewhere else.
                raise ConfigError(
                    f"store {directory} has {meta.get('stripes')} stripes of "
                    f"{meta.get('chunk')}-byte chunks, not {stripes} of {chunk}"
                )
            self._open_files(dirfd, direct)
            _write_meta_at(dirfd, directory, {"stripes": stripes, "chunk": chunk, "size": size})
            fds = ffi.new("int[]", self.fds)
            if self.memory and (default_mapped() if mapped is None else mapped):
                self._st = opened(lib.vp_store_open_mapped, fds, stripes, chunk, size, what="store")
                self.mapped = True
            else:
                self._st = opened(
                    lib.vp_store_open, fds, stripes, chunk, size, int(self.direct), what="store"
                )
        except BaseException:
            self.close()
            raise

    def _open_files(self, dirfd: int, direct: bool) -> None:
        fsize = stripe_file_size(self.size, self.stripes, self.chunk)
        flags = os.O_RDWR | os.O_CREAT
        if direct and not _direct_supported(dirfd, self.directory, _stripe_name(0), flags):
            direct = False
            self.notice = (
                f"{self.directory}: O_DIRECT not supported by this filesystem, using buffered I/O"
            )
        if direct:
            flags |= os.O_DIRECT
        for i in range(self.stripes):
            path = stripe_path(self.directory, i)
            fd = _open_in(dirfd, self.directory, _stripe_name(i), flags)
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
        if self.dirfd is not None:
            os.close(self.dirfd)  # and with it the store's lock
            self.dirfd = None


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
        try:
            dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open {directory}: {e.strerror}") from None
        try:
            for i in range(stripes):
                fd = _open_in(dirfd, directory, _stripe_name(i), os.O_RDONLY, owned=False)
                files.append(os.fdopen(fd, "rb"))
        finally:
            os.close(dirfd)
        # The whole disk: for this user's eyes only, and never written
        # through a symlink someone left where the image goes.
        try:
            ofd = os.open(
                out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            if os.path.islink(out):
                raise ConfigError(f"{out} is a symlink: refusing to write through it") from None
            raise ConfigError(f"cannot write {out}: {e.strerror}") from None
        if stat.S_ISREG(os.fstat(ofd).st_mode):
            os.fchmod(ofd, 0o600)
        with os.fdopen(ofd, "wb") as o:
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
    dirfd = open_store_dir(store_dir)
    try:
        for i in range(stripes):
            fd = _open_in(dirfd, store_dir, _stripe_name(i), os.O_RDWR | os.O_CREAT)
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
    finally:
        os.close(dirfd)
    return per * stripes


__all__ = [
    "MAP_ENV",
    "META",
    "StripedStore",
    "assemble",
    "check_geometry",
    "default_mapped",
    "fs_type",
    "locate",
    "open_store_dir",
    "prewrite",
    "read_meta",
    "stripe_file_size",
    "stripe_path",
]
