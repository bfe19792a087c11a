"""The shared region of one device: the POSIX shared-memory object, its
header, and the notifier semaphores that belong to it.

Whoever creates a region owns it: it unlinks the shared memory and every
semaphore, on close, on error and (through ``unlink``) on demand.
Attachers only map and unmap.
"""
import os
import re

import posix_ipc

from ._lowlevel import check, ffi, lib
from .errors import ConfigError, RegionError
from ._resource import Closeable

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}$")

LOCK_KINDS = {"spin": lib.VP_LOCK_SPIN, "spinyield": lib.VP_LOCK_SPINYIELD,
              "mutex": lib.VP_LOCK_MUTEX}
EXIT_MODES = {"async": lib.VP_EXIT_ASYNC, "sync": lib.VP_EXIT_SYNC}
SERVE_MODES = {"notify": lib.VP_MODE_NOTIFY, "poll": lib.VP_MODE_POLL}
NOTIFIER_ROLES = ("kick", "call", "ack")

FEATURE_BITS = {
    "SEG_MAX": lib.VIRTIO_BLK_F_SEG_MAX,
    "BLK_SIZE": lib.VIRTIO_BLK_F_BLK_SIZE,
    "FLUSH": lib.VIRTIO_BLK_F_FLUSH,
    "MQ": lib.VIRTIO_BLK_F_MQ,
    "DISCARD": lib.VIRTIO_BLK_F_DISCARD,
    "WRITE_ZEROES": lib.VIRTIO_BLK_F_WRITE_ZEROES,
    "EVENT_IDX": lib.VIRTIO_RING_F_EVENT_IDX,
    "VERSION_1": lib.VIRTIO_F_VERSION_1,
}


def feature_bits(names, queues=1):
    """The device feature word of the named features; MQ joins them when there
    is more than one queue."""
    bits = 0
    for f in names:
        bits |= 1 << FEATURE_BITS[f]
    if queues > 1:
        bits |= 1 << FEATURE_BITS["MQ"]
    return bits


def kind_name(kinds, value, what):
    for k, v in kinds.items():
        if v == value:
            return k
    return f"unknown {what} {value}"


def check_name(name):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"bad device name {name!r}: use 1-48 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'")
    return name


def shm_name(name):
    return "/" + check_name(name)


def sem_name(name, queue, role):
    return f"/{check_name(name)}.q{queue}.{role}"


def ipc_paths(name, queues=None):
    """Every /dev/shm path a device of this name can own (all queue slots if queues is None)."""
    n = lib.VP_MAX_QUEUES if queues is None else queues
    paths = ["/dev/shm" + shm_name(name)]
    for q in range(n):
        for role in NOTIFIER_ROLES:
            paths.append("/dev/shm/sem." + sem_name(name, q, role)[1:])
    return paths


def destroy(name):
    """Unlink every object a device of this name may have left; returns what was removed."""
    removed = []
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
        removed.append(shm_name(name))
    except posix_ipc.ExistentialError:
        pass
    for q in range(lib.VP_MAX_QUEUES):
        for role in NOTIFIER_ROLES:
            s = sem_name(name, q, role)
            try:
                posix_ipc.unlink_semaphore(s)
                removed.append(s)
            except posix_ipc.ExistentialError:
                pass
    return removed


def check_config(*, queues=1, queue_size=128, lock="spin", exit="async", exit_cost_us=0,
                 mode="notify"):
    """ConfigError unless Region.create takes these parameters."""
    if lock not in LOCK_KINDS:
        raise ConfigError(f"lock kind must be one of {', '.join(LOCK_KINDS)}, not {lock!r}")
    if exit not in EXIT_MODES:
        raise ConfigError(f"exit must be one of {', '.join(EXIT_MODES)}, not {exit!r}")
    if mode not in SERVE_MODES:
        raise ConfigError(f"mode must be one of {', '.join(SERVE_MODES)}, not {mode!r}")
    if not (isinstance(queue_size, int) and 1 <= queue_size <= lib.VP_MAX_QUEUE_SIZE
            and queue_size & (queue_size - 1) == 0):
        raise ConfigError(f"queue size must be a power of two from 1 to 32768, not {queue_size!r}")
    if not 1 <= queues <= lib.VP_MAX_QUEUES:
        raise ConfigError(f"queues must be from 1 to {lib.VP_MAX_QUEUES}, not {queues!r}")
    if not 0 <= exit_cost_us <= 1_000_000:     # also NaN
        raise ConfigError(f"exit cost must be 0 to 1000000 us, not {exit_cost_us!r}")


def exists(name):
    return os.path.exists("/dev/shm" + shm_name(name))


class Region(Closeable):
    """A mapped device region.  Use ``Region.create`` (device side, owner) or
    ``Region.attach`` (driver side)."""

    def __init__(self, name, base, size, owner):
        self.name = name
        self._base = base
        self.size = size
        self.owner = owner
        self._unlinked = not owner
        self.header = ffi.cast("struct vp_region_header *", base)

    # ---- construction ----
    @classmethod
    def create(cls, name, *, queues=1, queue_size=128, data_size=16 << 20,
               capacity=0, blk_size=512, seg_max=None, lock="spin",
               exit="async", exit_cost_us=0, mode="notify", event_idx=True,
               features=None):
        """Create the shared memory and the notifiers of a new device.

        Fails with RegionError if anything of that name exists already.
        """
        check_name(name)
        check_config(queues=queues, queue_size=queue_size, lock=lock, exit=exit,
                     exit_cost_us=exit_cost_us, mode=mode)
        if features is None:
            features = feature_bits(("VERSION_1", "BLK_SIZE", "SEG_MAX"), queues)
        if event_idx:
            features |= 1 << FEATURE_BITS["EVENT_IDX"]
        else:
            features &= ~(1 << FEATURE_BITS["EVENT_IDX"])
        params = ffi.new("struct vp_region_params *")
        cname = ffi.new("char[]", name.encode())
        params.num_queues = queues
        params.queue_size = queue_size
        params.data_size = data_size
        params.device_features = features
        params.capacity = capacity
        params.blk_size = blk_size
        params.seg_max = seg_max if seg_max is not None else max(1, queue_size - 2)
        params.lock_kind = LOCK_KINDS[lock]
        params.exit_mode = EXIT_MODES[exit]
        params.exit_cost_ns = int(exit_cost_us * 1000)
        params.serve_mode = SERVE_MODES[mode]
        params.name = cname
        size_p = ffi.new("uint64_t *")
        check(lib.vp_region_size(params, size_p), "region layout")
        size = size_p[0]

        created = []
        region = None
        try:
            try:
                shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX,
                                             mode=0o600, size=size)
            except posix_ipc.ExistentialError:
                raise RegionError(f"a device named {name!r} exists already "
                                  f"(/dev/shm{shm_name(name)})") from None
            created.append(("shm", shm_name(name)))
            try:
                base = _map_fd(shm.fd, size)
            finally:
                shm.close_fd()
            try:
                check(lib.vp_region_init(base, size, params), "region init")
            except Exception:
                lib.vp_unmap(base, size)
                raise
            region = cls(name, base, size, owner=True)
            region._created = created
            # The device's private copy of what it laid out: it never trusts
            # the header again once a guest can write to it.
            region.device_layout = [region.queue_info(q) for q in range(queues)]
            region.device_event_idx = bool(event_idx)
            region.device_exit_mode = EXIT_MODES[exit]
            for q in range(queues):
                for role in NOTIFIER_ROLES:
                    s = sem_name(name, q, role)
                    try:
                        sem = posix_ipc.Semaphore(s, posix_ipc.O_CREX, mode=0o600,
                                                  initial_value=0)
                    except posix_ipc.ExistentialError:
                        raise RegionError(f"semaphore {s} exists already: "
                                          f"stale objects of {name!r}") from None
                    sem.close()
                    created.append(("sem", s))
            return region
        except BaseException:
            if region is not None:
                region.close()
            _unlink_all(created)
            raise

    @classmethod
    def attach(cls, name):
        """Map an existing device's region (driver side)."""
        try:
            shm = posix_ipc.SharedMemory(shm_name(name))
        except posix_ipc.ExistentialError:
            raise RegionError(f"no device named {name!r} (is the daemon running?)") from None
        try:
            size = os.fstat(shm.fd).st_size
            if size == 0:
                raise RegionError(f"device {name!r} is not set up yet (empty region)")
            base = _map_fd(shm.fd, size)
        finally:
            shm.close_fd()
        rc = lib.vp_region_check(base, size)
        if rc < 0:
            lib.vp_unmap(base, size)
            check(rc, f"device {name!r}")
        return cls(name, base, size, owner=False)

    # ---- lifetime ----
    @property
    def base(self):
        if self._base is None:
            raise RegionError(f"region {self.name!r} is closed")
        return self._base

    @property
    def closed(self):
        return self._base is None

    def close(self):
        """Unmap; the owner also unlinks.  Views of the region die with it."""
        if self._base is not None:
            lib.vp_unmap(self._base, self.size)
            self._base = None
            self.header = None
        if self.owner:
            self.unlink()

    def unlink(self):
        if not self._unlinked:
            self._unlinked = True
            _unlink_all(getattr(self, "_created", []))

    # ---- contents ----
    @property
    def num_queues(self):
        return self.header.num_queues

    def queue_info(self, index):
        self._check_index(index)
        qi = self.header.queue[index]
        return {"num": qi.num, "desc": qi.desc, "avail": qi.avail, "used": qi.used,
                "shared": qi.shared, "tokens": qi.tokens, "data": qi.data,
                "data_size": qi.data_size}

    def _check_index(self, index):
        if not 0 <= index < self.header.num_queues:
            raise ConfigError(f"queue {index} out of range (device has {self.header.num_queues})")

    def queue_shared(self, index):
        self._check_index(index)
        return ffi.cast("struct vp_queue_shared *", self.base + self.header.queue[index].shared)

    @property
    def features(self):
        return self.header.device_features

    @property
    def event_idx(self):
        return bool(self.header.driver_features >> lib.VIRTIO_RING_F_EVENT_IDX & 1)

    @property
    def exit_mode(self):
        return kind_name(EXIT_MODES, self.header.exit_mode, "exit mode")

    @property
    def serve_mode(self):
        return kind_name(SERVE_MODES, self.header.serve_mode, "mode")

    @property
    def lock_kind(self):
        return kind_name(LOCK_KINDS, self.header.lock_kind, "lock kind")

    @property
    def daemon_pid(self):
        return self.header.daemon_pid

    def set_daemon_pid(self, pid):
        self.header.daemon_pid = pid

    def sem_name(self, index, role):
        return sem_name(self.name, index, role)

    def read(self, gpa, length):
        """Copy bytes out of the region, bounds-checked."""
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise ConfigError(f"range {gpa:#x}+{length} outside the region")
        return ffi.buffer(self.base + gpa, length)[:]

    def write_data(self, gpa, data):
        """Copy bytes into the request buffer area (never into rings or the header)."""
        lo = self.header.data_offset
        hi = lo + self.header.data_size
        if gpa < lo or gpa + len(data) > hi:
            raise ConfigError(f"range {gpa:#x}+{len(data)} outside the data area")
        ffi.memmove(self.base + gpa, data, len(data))

    def poke(self, gpa, value, width):
        """A hostile guest's raw store into any part of the region (tests only)."""
        check(lib.vp_guest_poke(self.base, self.size, gpa, value, width), "poke")


def _map_fd(fd, size):
    pp = ffi.new("void **")
    check(lib.vp_map(fd, size, pp), "mmap")
    return ffi.cast("uint8_t *", pp[0])


def _unlink_all(created):
    for kind, n in created:
        try:
            if kind == "shm":
                posix_ipc.unlink_shared_memory(n)
            else:
                posix_ipc.unlink_semaphore(n)
        except posix_ipc.ExistentialError:
            pass
