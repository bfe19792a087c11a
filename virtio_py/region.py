"""The shared region of one device: the POSIX shared-memory object, its
header, and the notifier semaphores that belong to it.

Whoever creates a region owns it: it unlinks the shared memory and every
semaphore, on close, on error and (through ``unlink``) on demand, and only
while the name still leads to the object it created.  The object is
created with mode 0 and opened to its user (0600) once it is laid out.
Attachers only map and unmap, and only objects of their own user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import posix_ipc

from ._lowlevel import check, ffi, lib
from ._resource import Closeable
from .errors import ConfigError, RegionError
from .limits import EXIT, LOCK, LOCK_DEFAULT, MODE, POLL_REFUSES_ND, check_region

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}$")

LOCK_KINDS = LOCK.codes
EXIT_MODES = EXIT.codes
SERVE_MODES = MODE.codes
NOTIFIER_ROLES = ("kick", "call", "ack")
STATUS_NEEDS_RESET: int = lib.VP_STATUS_NEEDS_RESET

FEATURE_BITS = {
    "SEG_MAX": lib.VIRTIO_BLK_F_SEG_MAX,
    "BLK_SIZE": lib.VIRTIO_BLK_F_BLK_SIZE,
    "FLUSH": lib.VIRTIO_BLK_F_FLUSH,
    "MQ": lib.VIRTIO_BLK_F_MQ,
    "DISCARD": lib.VIRTIO_BLK_F_DISCARD,
    "WRITE_ZEROES": lib.VIRTIO_BLK_F_WRITE_ZEROES,
    "EVENT_IDX": lib.VIRTIO_RING_F_EVENT_IDX,
    "VERSION_1": lib.VIRTIO_F_VERSION_1,
    "NOTIFICATION_DATA": lib.VP_F_NOTIFICATION_DATA,
}


def feature_bits(names: Iterable[str], queues: int = 1) -> int:
    """The device feature word of the named features; MQ joins them when there
    is more than one queue."""
    bits = 0
    for f in names:
        bits |= 1 << FEATURE_BITS[f]
    if queues > 1:
        bits |= 1 << FEATURE_BITS["MQ"]
    return bits


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"bad device name {name!r}: use 1-48 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def shm_name(name: str) -> str:
    return "/" + check_name(name)


def sem_name(name: str, queue: int, role: str) -> str:
    return f"/{check_name(name)}.q{queue}.{role}"


def ipc_paths(name: str, queues: int | None = None) -> list[str]:
    """Every /dev/shm path a device of this name can own (all queue slots if queues is None)."""
    n = lib.VP_MAX_QUEUES if queues is None else queues
    paths = ["/dev/shm" + shm_name(name)]
    for q in range(n):
        for role in NOTIFIER_ROLES:
            paths.append("/dev/shm/sem." + sem_name(name, q, role)[1:])
    return paths


def object_path(kind: str, posix_name: str) -> str:
    """Where glibc keeps a POSIX object: /dev/shm/NAME, /dev/shm/sem.NAME."""
    return "/dev/shm/" + ("" if kind == "shm" else "sem.") + posix_name[1:]


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of path itself, None if there is nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _unlink(kind: str, posix_name: str) -> None:
    try:
        if kind == "shm":
            posix_ipc.unlink_shared_memory(posix_name)
        else:
            posix_ipc.unlink_semaphore(posix_name)
    except posix_ipc.ExistentialError:
        pass
    except OSError as e:
        # posix_ipc names no file (a directory in the way, say): name it.
        raise RegionError(
            f"cannot remove {object_path(kind, posix_name)}: {e.strerror or e}"
        ) from None


def _objects(name: str) -> list[tuple[str, str]]:
    objs = [("shm", shm_name(name))]
    for q in range(lib.VP_MAX_QUEUES):
        for role in NOTIFIER_ROLES:
            objs.append(("sem", sem_name(name, q, role)))
    return objs


def _owner(kind: str, posix_name: str) -> int | None:
    """The uid of an object of a device, None if there is none."""
    try:
        return os.lstat(object_path(kind, posix_name)).st_uid
    except FileNotFoundError:
        return None


def foreign_objects(name: str) -> list[str]:
    """The /dev/shm paths of device name that belong to another user."""
    return [
        object_path(kind, n)
        for kind, n in _objects(name)
        if _owner(kind, n) not in (None, os.geteuid())
    ]


def destroy(name: str) -> list[str]:
    """Unlink every object of this user that a device of this name may have
    left; returns what was removed.  Another user's objects stay.  A dead
    daemon's pidfile goes too (not counted); a live one's stays."""
    from .pidfile import remove_stale

    remove_stale(name)
    removed = []
    for kind, n in _objects(name):
        if _owner(kind, n) != os.geteuid():
            continue  # none there, or another user's
        _unlink(kind, n)
        removed.append(n)
    return removed


def exists(name: str) -> bool:
    return os.path.lexists("/dev/shm" + shm_name(name))


def _queue_info(header: Any, index: int) -> dict[str, int]:
    return _queue_info_of(header.queue[index])


def _queue_info_of(qi: Any) -> dict[str, int]:
    return {
        "num": qi.num,
        "desc": qi.desc,
        "avail": qi.avail,
        "used": qi.used,
        "shared": qi.shared,
        "tokens": qi.tokens,
        "data": qi.data,
        "data_size": qi.data_size,
    }


def _region_params(
    name: bytes,
    queues: int,
    queue_size: int,
    data_size: int,
    capacity: int,
    blk_size: int,
    seg_max: int | None,
    lock: str,
    exit: str,
    exit_cost_us: float,
    mode: str,
    features: int,
) -> tuple[Any, Any]:
    """struct vp_region_params of a region, and the name buffer it points
    to (keep it referenced while the struct is used)."""
    p = ffi.new("struct vp_region_params *")
    cname = ffi.new("char[]", name)
    p.num_queues = queues
    p.queue_size = queue_size
    p.data_size = data_size
    p.device_features = features
    p.capacity = capacity
    p.blk_size = blk_size
    p.seg_max = seg_max if seg_max is not None else max(1, queue_size - 2)
    p.lock_kind = LOCK.code(lock)
    p.exit_mode = EXIT.code(exit)
    p.exit_cost_ns = int(exit_cost_us * 1000)
    p.serve_mode = MODE.code(mode)
    p.name = cname
    return p, cname


def _region_layout(params: Any, queues: int) -> tuple[int, list[dict[str, int]]]:
    """The size of a region and each queue's layout, from its parameters."""
    size_p = ffi.new("uint64_t *")
    check(lib.vp_region_size(params, size_p), "region layout")
    qi = ffi.new("struct vp_queue_info *")
    layout = []
    for q in range(queues):
        check(lib.vp_region_layout(params, q, qi), "region layout")
        layout.append(_queue_info_of(qi))
    return int(size_p[0]), layout


class Region(Closeable):
    """A mapped device region.  Use ``Region.create`` (device side, owner) or
    ``Region.attach`` (driver side).

    The owner also holds the device's private copy of what it laid out
    (``device_layout``, ``device_event_idx``, ``device_exit_mode``): it never
    trusts the header again once a guest can write to it.  An attached
    region has ``device_layout`` None.
    """

    def __init__(
        self,
        name: str,
        base: Any,
        size: int,
        owner: bool,
        *,
        created: list[tuple[str, str, tuple[int, int] | None]] | None = None,
        device_layout: list[dict[str, int]] | None = None,
        device_event_idx: bool = False,
        device_exit_mode: int = lib.VP_EXIT_ASYNC,
    ) -> None:
        self.name = name
        self._base = base
        self.size = size
        self.owner = owner
        self._unlinked = not owner
        # What the owner must unlink, with the (st_dev, st_ino) it created:
        # filled as it creates them.
        self._created: list[tuple[str, str, tuple[int, int] | None]] = (
            created if created is not None else []
        )
        self.device_layout = device_layout
        self.device_event_idx = device_event_idx
        self.device_exit_mode = device_exit_mode
        self.header: Any = ffi.cast("struct vp_region_header *", base)

    # ---- construction
    @classmethod
    def create(
        cls,
        name: str,
        *,
        queues: int = 1,
        queue_size: int = 128,
        data_size: int = 16 << 20,
        capacity: int = 0,
        blk_size: int = 512,
        seg_max: int | None = None,
        lock: str = LOCK_DEFAULT,
        exit: str = "async",
        exit_cost_us: float = 0,
        mode: str = "notify",
        event_idx: bool = True,
        features: int | None = None,
        notification_data: bool = False,
    ) -> Region:
        """Create the shared memory and the notifiers of a new device.

        notification_data offers (and so negotiates) VIRTIO_F_NOTIFICATION_DATA;
        not with mode "poll", where the device never waits on a doorbell.

        Fails with RegionError if anything of that name exists already, and
        with ConfigError on a parameter outside virtio_py.limits.
        """
        check_name(name)
        check_region(
            queues=queues,
            queue_size=queue_size,
            lock=lock,
            exit=exit,
            exit_cost_us=exit_cost_us,
            mode=mode,
        )
        if features is None:
            features = feature_bits(("VERSION_1", "BLK_SIZE", "SEG_MAX"), queues)
        if event_idx:
            features |= 1 << FEATURE_BITS["EVENT_IDX"]
        else:
            features &= ~(1 << FEATURE_BITS["EVENT_IDX"])
        if notification_data:
            if mode == "poll":
                raise ConfigError(POLL_REFUSES_ND)
            features |= 1 << FEATURE_BITS["NOTIFICATION_DATA"]
        params, _cname = _region_params(
            name.encode(), queues, queue_size, data_size, capacity, blk_size, seg_max,
            lock, exit, exit_cost_us, mode, features,
        )  # fmt: skip
        # The device's copy of its layout, from the parameters alone: a
        # guest may rewrite the header as soon as it can open the object.
        size, layout = _region_layout(params, queues)

        created: list[tuple[str, str, tuple[int, int] | None]] = []
        region = None
        try:
            try:
                # Mode 0 until laid out: no one of our user opens it half made.
                shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=0, size=size)
            except posix_ipc.ExistentialError:
                raise RegionError(
                    f"a device named {name!r} exists already (/dev/shm{shm_name(name)})"
                ) from None
            try:
                st = os.fstat(shm.fd)
                created.append(("shm", shm_name(name), (st.st_dev, st.st_ino)))
                base = _map_fd(shm.fd, size)
                try:
                    check(lib.vp_region_init(base, size, params), "region init")
                    os.fchmod(shm.fd, 0o600)
                except BaseException:
                    lib.vp_unmap(base, size)
                    raise
            finally:
                shm.close_fd()
            region = cls(
                name,
                base,
                size,
                owner=True,
                created=created,
                device_layout=layout,
                device_event_idx=bool(event_idx),
                device_exit_mode=EXIT.code(exit),
            )
            for q in range(queues):
                for role in NOTIFIER_ROLES:
                    s = sem_name(name, q, role)
                    try:
                        sem = posix_ipc.Semaphore(s, posix_ipc.O_CREX, mode=0o600, initial_value=0)
                    except posix_ipc.ExistentialError:
                        raise RegionError(
                            f"semaphore {s} exists already: stale objects of {name!r}"
                        ) from None
                    sem.close()
                    created.append(("sem", s, _identity(object_path("sem", s))))
            return region
        except BaseException:
            if region is not None:
                region.close()
            _unlink_all(created)
            raise

    @classmethod
    def adopt(cls, name: str, **params: Any) -> Region:
        """Take over the region of a device whose creator died, as its new
        owner: the layout comes from params (what the creator was given,
        from its private record), never from the header.  The object must
        be this user's, 0600, of the size params lay out; its rings, locks
        and guest slots are left as they are.  Missing semaphores are made
        again.  RegionError if it does not fit."""
        check_name(name)
        probe = cls._layout_of(params)
        size, layout = probe["size"], probe["layout"]
        try:
            shm = posix_ipc.SharedMemory(shm_name(name))
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            raise RegionError(f"no region of {name!r} to take over") from None
        created: list[tuple[str, str, tuple[int, int] | None]] = []
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o777 != 0o600:
                raise RegionError(f"region of {name!r} is not this user's 0600 object")
            if st.st_size != size:
                raise RegionError(
                    f"region of {name!r} has {st.st_size} bytes, its record lays out {size}"
                )
            created.append(("shm", shm_name(name), (st.st_dev, st.st_ino)))
            base = _map_fd(shm.fd, size)
        finally:
            shm.close_fd()
        region = cls(
            name,
            base,
            size,
            owner=True,
            created=created,
            device_layout=layout,
            device_event_idx=bool(probe["event_idx"]),
            device_exit_mode=probe["exit_mode"],
        )
        try:
            for q in range(len(layout)):
                for role in NOTIFIER_ROLES:
                    s = sem_name(name, q, role)
                    try:
                        sem = posix_ipc.Semaphore(s, posix_ipc.O_CREAT, mode=0o600, initial_value=0)
                    except posix_ipc.PermissionsError:
                        raise RegionError(f"semaphore {s} is not ours") from None
                    sem.close()
                    path = object_path("sem", s)
                    if os.lstat(path).st_uid != os.geteuid():
                        raise RegionError(f"semaphore {s} belongs to another user")
                    created.append(("sem", s, _identity(path)))
        except BaseException:
            region.close()
            raise
        return region

    @staticmethod
    def _layout_of(params: dict[str, Any]) -> dict[str, Any]:
        """Size and per-queue layout that Region.create(**params) makes."""
        queues = params.get("queues", 1)
        queue_size = params.get("queue_size", 128)
        event_idx = params.get("event_idx", True)
        features = params.get("features")
        if features is None:
            features = feature_bits(("VERSION_1", "BLK_SIZE", "SEG_MAX"), queues)
        p, _cname = _region_params(
            b"x",
            queues,
            queue_size,
            params.get("data_size", 16 << 20),
            params.get("capacity", 0),
            params.get("blk_size", 512),
            params.get("seg_max"),
            params.get("lock", LOCK_DEFAULT),
            params.get("exit", "async"),
            params.get("exit_cost_us", 0),
            params.get("mode", "notify"),
            features,
        )
        size, layout = _region_layout(p, queues)
        return {
            "size": size,
            "layout": layout,
            "event_idx": event_idx,
            "exit_mode": EXIT.code(params.get("exit", "async")),
        }

    @classmethod
    def attach(cls, name: str) -> Region:
        """Map an existing device's region (driver side)."""
        try:
            shm = posix_ipc.SharedMemory(shm_name(name))
        except posix_ipc.ExistentialError:
            raise RegionError(f"no device named {name!r} (is the daemon running?)") from None
        except posix_ipc.PermissionsError:
            raise RegionError(
                f"device {name!r} is not ours to open (/dev/shm{shm_name(name)})"
            ) from None
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.geteuid():
                raise RegionError(
                    f"device {name!r} belongs to uid {st.st_uid}, not to this user "
                    f"(uid {os.geteuid()}): refusing to attach"
                )
            size = st.st_size
            if size == 0 or st.st_mode & 0o777 == 0:
                raise RegionError(f"device {name!r} is not set up yet")
            base = _map_fd(shm.fd, size)
        finally:
            shm.close_fd()
        rc = lib.vp_region_check(base, size)
        if rc < 0:
            lib.vp_unmap(base, size)
            check(rc, f"device {name!r}")
        return cls(name, base, size, owner=False)

    # ---- lifetime
    @property
    def base(self) -> Any:
        if self._base is None:
            raise RegionError(f"region {self.name!r} is closed")
        return self._base

    @property
    def closed(self) -> bool:
        return self._base is None

    def close(self) -> None:
        """Unmap; the owner also unlinks.  Views of the region die with it."""
        if self._base is not None:
            lib.vp_unmap(self._base, self.size)
            self._base = None
            self.header = None
        if self.owner:
            self.unlink()

    def unlink(self) -> None:
        if not self._unlinked:
            self._unlinked = True
            _unlink_all(self._created)

    # ---- contents
    @property
    def num_queues(self) -> int:
        return int(self.header.num_queues)

    def queue_info(self, index: int) -> dict[str, int]:
        """Where queue index lies, as the header says (a guest may have written it)."""
        self._check_index(index)
        return _queue_info(self.header, index)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.header.num_queues:
            raise ConfigError(f"queue {index} out of range (device has {self.header.num_queues})")

    def queue_shared(self, index: int) -> Any:
        """Queue index's struct vp_queue_shared: where the owner laid it out,
        or where the header says, checked to lie inside the region."""
        self._check_index(index)
        if self.device_layout is not None:
            gpa = self.device_layout[index]["shared"]
        else:
            gpa = int(self.header.queue[index].shared)
        n = ffi.sizeof("struct vp_queue_shared")
        if gpa % 64 or gpa > self.size or n > self.size - gpa:
            raise RegionError(f"queue {index}: shared block {gpa:#x} outside the region")
        return ffi.cast("struct vp_queue_shared *", self.base + gpa)

    @property
    def features(self) -> int:
        return int(self.header.device_features)

    @property
    def needs_reset(self) -> bool:
        """The device set NEEDS_RESET in the status (a queue broke)."""
        return bool(self.header.status & lib.VP_STATUS_NEEDS_RESET)

    @property
    def event_idx(self) -> bool:
        return bool(self.header.driver_features >> lib.VIRTIO_RING_F_EVENT_IDX & 1)

    @property
    def notification_data(self) -> bool:
        """VIRTIO_F_NOTIFICATION_DATA negotiated (in driver_features)."""
        return bool(self.header.driver_features >> lib.VP_F_NOTIFICATION_DATA & 1)

    @property
    def exit_mode(self) -> str:
        return EXIT.name_of(self.header.exit_mode)

    @property
    def serve_mode(self) -> str:
        return MODE.name_of(self.header.serve_mode)

    @property
    def lock_kind(self) -> str:
        return LOCK.name_of(self.header.lock_kind)

    @property
    def daemon_pid(self) -> int:
        return int(self.header.daemon_pid)

    def set_daemon_pid(self, pid: int) -> None:
        self.header.daemon_pid = pid

    def sem_name(self, index: int, role: str) -> str:
        return sem_name(self.name, index, role)

    def read(self, gpa: int, length: int) -> bytes:
        """Copy bytes out of the region, bounds-checked."""
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise ConfigError(f"range {gpa:#x}+{length} outside the region")
        return ffi.buffer(self.base + gpa, length)[:]

    def write_data(self, gpa: int, data: bytes) -> None:
        """Copy bytes into the request buffer area (never into rings or the header)."""
        lo = self.header.data_offset
        hi = lo + self.header.data_size
        if gpa < lo or gpa + len(data) > hi:
            raise ConfigError(f"range {gpa:#x}+{len(data)} outside the data area")
        ffi.memmove(self.base + gpa, data, len(data))

    # ---- private copies, for a reader that must not read guest memory twice
    def header_copy(self) -> Any:
        """The header, copied once and checked (RegionError if the copy
        describes an impossible layout): a reader that trusts no guest uses
        this copy, never ``header`` again."""
        h = ffi.new("struct vp_region_header *")
        ffi.memmove(h, self.base, ffi.sizeof("struct vp_region_header"))
        check(lib.vp_region_check(h, self.size), f"device {self.name!r}")
        return h

    def copy_of(self, gpa: int, ctype: str) -> Any:
        """A private copy (an owning pointer) of the ctype at gpa."""
        n = ffi.sizeof(ctype)
        if gpa < 0 or gpa > self.size or n > self.size - gpa:
            raise RegionError(f"{ctype} at {gpa:#x} is outside the region")
        out = ffi.new(ctype + " *")
        ffi.memmove(out, self.base + gpa, n)
        return out

    def queue_copy(self, hdr: Any, index: int) -> dict[str, Any]:
        """Queue index as the checked header copy hdr places it, copied once:
        "shared" (struct vp_queue_shared *), "lock" (a pointer to the lock
        in that copy, for SharedLock's statistics), "avail_idx", "used_idx"."""
        qi = hdr.queue[index]
        sh = self.copy_of(int(qi.shared), "struct vp_queue_shared")
        return {
            "shared": sh,
            "lock": ffi.addressof(sh[0], "lock"),
            "avail_idx": int(self.copy_of(int(qi.avail) + 2, "uint16_t")[0]),
            "used_idx": int(self.copy_of(int(qi.used) + 2, "uint16_t")[0]),
        }

    def poke(self, gpa: int, value: int, width: int) -> None:
        """A hostile guest's raw store into any part of the region (tests only)."""
        check(lib.vp_guest_poke(self.base, self.size, gpa, value, width), "poke")


def _map_fd(fd: int, size: int) -> Any:
    pp = ffi.new("void **")
    check(lib.vp_map(fd, size, pp), "mmap")
    return ffi.cast("uint8_t *", pp[0])


def _unlink_all(created: list[tuple[str, str, tuple[int, int] | None]]) -> None:
    """Unlink what we created, where the name still leads to it: an object
    someone put in its place since is theirs."""
    for kind, n, ident in created:
        if ident is not None and _identity(object_path(kind, n)) == ident:
            _unlink(kind, n)
