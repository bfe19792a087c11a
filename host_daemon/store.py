"""The striped (RAID-0) block store: stripe-00.img, stripe-01.img, ... in a
directory.  Logical chunk k lives in stripe k mod N at byte (k div N) * chunk,
as md RAID-0 and LVM striping lay it out."""
import errno
import json
import os

from virtio_py._lowlevel import ffi, lib, opened
from virtio_py.errors import ConfigError

META = "store.json"
MEMORY_FS = ("tmpfs", "ramfs")


def stripe_path(directory, i):
    return os.path.join(directory, f"stripe-{i:02d}.img")


def locate(offset, stripes, chunk):
    """(stripe index, byte offset in that stripe) of a logical byte offset."""
    k, inner = divmod(offset, chunk)
    return k % stripes, (k // stripes) * chunk + inner


def stripe_file_size(size, stripes, chunk):
    chunks = -(-size // chunk)
    return -(-chunks // stripes) * chunk


def fs_type(path):
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
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) >= len(best):
                    best, typ = mnt, fields[2]
    except OSError:
        pass
    return typ


def _direct_supported(path, flags):
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise ConfigError(f"cannot open {path}: {e.strerror}") from None
    os.close(fd)
    return True


def check_geometry(stripes, chunk, size):
    """ConfigError unless a store can have this geometry."""
    if not 1 <= stripes <= lib.VP_STORE_MAX_STRIPES:
        raise ConfigError(f"stripes must be 1 to {lib.VP_STORE_MAX_STRIPES}, not {stripes}")
    if chunk < 512 or chunk % 512:
        raise ConfigError(f"chunk must be a multiple of 512, not {chunk}")
    if size < 512 or size % 512:
        raise ConfigError(f"size must be a positive multiple of 512, not {size}")


def read_meta(directory):
    try:
        with open(os.path.join(directory, META)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {os.path.join(directory, META)}: {e}") from None


class StripedStore:
    """Opened stripe files and the C store over them."""

    def __init__(self, directory, size, stripes=12, chunk=64 << 10, direct=True):
        check_geometry(stripes, chunk, size)
        self.directory = directory
        self.size = size
        self.stripes = stripes
        self.chunk = chunk
        self.direct = False
        self.memory = False
        self.notice = None
        self.fds = []
        self._st = None
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create store directory {directory}: {e.strerror}") from None
        self.memory = fs_type(directory) in MEMORY_FS
        meta = read_meta(directory)
        if meta and (meta.get("stripes"), meta.get("chunk")) != (stripes, chunk):
            # Another geometry would put every chunk somewhere else.
            raise ConfigError(f"store {directory} has {meta.get('stripes')} stripes of "
                              f"{meta.get('chunk')}-byte chunks, not {stripes} of {chunk}")
        try:
            self._open_files(direct)
            with open(os.path.join(directory, META), "w") as f:
                json.dump({"stripes": stripes, "chunk": chunk, "size": size}, f)
            fds = ffi.new("int[]", self.fds)
            self._st = opened(lib.vp_store_open, fds, stripes, chunk, size, int(self.direct),
                              what="store")
        except BaseException:
            self.close()
            raise

    def _open_files(self, direct):
        fsize = stripe_file_size(self.size, self.stripes, self.chunk)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        if direct and not _direct_supported(stripe_path(self.directory, 0), flags):
            direct = False
            self.notice = (f"{self.directory}: O_DIRECT not supported by this "
                           "filesystem, using buffered I/O")
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
    def handle(self):
        return self._st

    def close(self):
        if self._st is not None:
            lib.vp_store_close(self._st)
            self._st = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def assemble(directory, out, stripes=None, chunk=None, size=None):
    """Write the logical disk of a store as one raw image file, sparse
    where the store reads as zeros."""
    meta = read_meta(directory) or {}
    stripes = meta.get("stripes") if stripes is None else stripes
    chunk = meta.get("chunk") if chunk is None else chunk
    size = meta.get("size") if size is None else size
    if None in (stripes, chunk, size):
        raise ConfigError(f"{directory} has no {META}: give --stripes, --chunk and --size")
    check_geometry(stripes, chunk, size)
    files = []
    try:
        for i in range(stripes):
            try:
                files.append(open(stripe_path(directory, i), "rb"))
            except OSError as e:
                raise ConfigError(f"cannot open {stripe_path(directory, i)}: {e.strerror}") from None
        with open(out, "wb") as o:
            off = 0
            while off < size:
                s, foff = locate(off, stripes, chunk)
                n = min(chunk - off % chunk, size - off)
                f = files[s]
                f.seek(foff)
                data = f.read(n)
                if data.count(0) == len(data):
                    o.seek(n, os.SEEK_CUR)   # a hole: the image of a 1T disk is not 1T
                else:
                    o.write(data + bytes(n - len(data)))
                off += n
            o.truncate(size)
    finally:
        for f in files:
            f.close()
    return size
