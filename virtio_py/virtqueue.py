"""Both ends of a split virtqueue: ``Virtqueue`` for the driver (guest) and
``DeviceQueue`` for the device (host), named after drivers/virtio/virtio_ring.c.

Driver operations that change ring state must be serialised by the queue's
lock when several processes share the queue, as virtio_blk does under
vblk->lock; ``submit`` does lock, add, kick and unlock in one C call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._lowlevel import check, code_name, ffi, lib, opened, strerror
from ._resource import Closeable
from .errors import ConfigError
from .limits import ND_DEVICE, ND_REMEDY, ND_REREAD_MS_DEFAULT, STRATEGY
from .lock import SharedLock
from .notifier import Notifier

if TYPE_CHECKING:
    from .region import Region

STRATEGIES = STRATEGY.codes
#: Driver remedies of the notification-data reordering hazard (vp_vq_set_nd).
ND_REMEDIES = ND_REMEDY.codes
#: What a device does with the notification word.
ND_BEHAVIOURS = {"off": lib.VP_ND_OFF, **ND_DEVICE.codes}
_ND_NAMES = {v: k for k, v in ND_BEHAVIOURS.items()}
# A buffer of a chain: (guest physical address, length).
Buffer = tuple[int, int]
# A popped chain: (head, [(gpa, length, writable), ...]).
Chain = tuple[int, list[tuple[int, int, bool]]]


def strategy_code(strategy: str) -> int:
    """The C code of a kick strategy name (ConfigError for another name)."""
    return STRATEGY.code(strategy)


def broken_reason(code: int) -> str | None:
    """Why a queue is broken, from DeviceQueue.broken's code (None: it is not),
    e.g. 'EHEAD: ...'.  Any value a guest may have left there has a text."""
    if not code:
        return None
    if not 0 < code < 1 << 31:
        return f"unknown code {code}"
    return f"{code_name(code)}: {strerror(code)}"


class QueueLock(SharedLock):
    """A queue's lock as its driver takes it: acquiring repairs the driver
    state first when a holder died inside it (vp_vq_lock_acquire)."""

    def __init__(self, region: Region, lock_ptr: Any, vq: Virtqueue) -> None:
        super().__init__(region, lock_ptr)
        self._vq = vq

    def acquire(self) -> None:
        vq = self._vq._vq
        if vq is None:  # the virtqueue is closed: the lock alone
            super().acquire()
        else:
            lib.vp_vq_lock_acquire(vq)


class Virtqueue(Closeable):
    """The driver's handle on queue ``index`` of an attached region.

    ``lock`` is the queue's lock; the operations that need it held (add,
    kick_prepare, get_buf, disable_cb, enable_cb) repair the driver state
    first if a holder died inside it, however the lock was taken."""

    def __init__(self, region: Region, index: int = 0, notifiers: bool = True) -> None:
        region._check_index(index)
        self.region = region
        self.index = index
        self._vq = opened(lib.vp_vq_open, region.base, region.size, index, what=f"queue {index}")
        self.num = lib.vp_vq_size(self._vq)
        self._lockp = lib.vp_vq_lock(self._vq)
        self.lock: SharedLock = QueueLock(region, self._lockp, self)
        self.kick_notifier: Notifier | None = None
        self.ack_notifier: Notifier | None = None
        self.call_notifier: Notifier | None = None
        if notifiers:
            self.kick_notifier = Notifier.open_sem(region.sem_name(index, "kick"))
            self.ack_notifier = Notifier.open_sem(region.sem_name(index, "ack"))
            self.call_notifier = Notifier.open_sem(region.sem_name(index, "call"))
            lib.vp_vq_set_notify(
                self._vq,
                self.kick_notifier.handle,
                self.ack_notifier.handle,
                region.header.exit_mode,
                region.header.exit_cost_ns,
            )
        self._gate: Any = None
        # Reused argument arrays: no allocation per request.
        self._addr = ffi.new("uint64_t[]", self.num)
        self._len = ffi.new("uint32_t[]", self.num)
        self._tok = ffi.new("uint64_t *")
        self._blen = ffi.new("uint32_t *")

    @property
    def handle(self) -> Any:
        if self._vq is None:
            raise ConfigError("virtqueue is closed")
        return self._vq

    def close(self) -> None:
        if self._vq is not None:
            lib.vp_vq_close(self._vq)
            self._vq = None
        for n in (self.kick_notifier, self.ack_notifier, self.call_notifier):
            if n is not None:
                n.close()

    def set_nd_remedy(self, remedy: str) -> bool:
        """Take a remedy of the notification-data hazard: "none", "lock"
        (notify with the lock held, whatever the strategy) or "monotonic" (a
        doorbell that never goes backwards; emulation only).  True if
        notification data is negotiated (the remedy then applies)."""
        if remedy not in ND_REMEDIES:
            raise ConfigError(
                f"notification-data remedy must be one of {', '.join(ND_REMEDIES)}, not {remedy!r}"
            )
        return bool(check(lib.vp_vq_set_nd(self.handle, ND_REMEDIES[remedy]), "remedy"))

    def set_gate(self, gate: Any, timeout: float = 1.0) -> None:
        """Test hook: before each doorbell write, add 1 to the gate's first
        uint32 and wait up to timeout for its second to be non-zero.  gate:
        a writable shared buffer of at least 8 bytes (kept referenced), or
        None to turn it off."""
        if gate is None:
            self._gate = None
            lib.vp_vq_set_gate(self.handle, ffi.NULL, 0)
            return
        self._gate = ffi.cast("uint32_t *", ffi.from_buffer(gate, require_writable=True))
        lib.vp_vq_set_gate(self.handle, self._gate, int(timeout * 1e9))

    def _load(self, out: Iterable[Buffer], in_: Iterable[Buffer]) -> tuple[int, int]:
        out, in_ = list(out), list(in_)
        n = 0
        for gpa, length in out + in_:
            if n >= self.num:
                raise ConfigError(f"chain longer than the queue ({self.num})")
            self._addr[n] = gpa
            self._len[n] = length
            n += 1
        return len(out), len(in_)

    def _repaired(self) -> Any:
        """The handle, the driver state repaired first if the lock (held by
        the caller) was taken over from a dead holder."""
        vq = self.handle
        if self._lockp.dirty:
            lib.vp_vq_repair_if_dirty(vq)
        return vq

    def add(self, out: Iterable[Buffer], in_: Iterable[Buffer], token: int) -> None:
        """virtqueue_add: out and in_ are lists of (gpa, length); token is a non-zero int."""
        o, i = self._load(out, in_)
        vq = self._repaired()
        check(lib.virtqueue_add(vq, self._addr, self._len, o, i, token), "virtqueue_add")

    def kick_prepare(self) -> bool:
        return bool(lib.virtqueue_kick_prepare(self._repaired()))

    def notify(self) -> None:
        check(lib.virtqueue_notify(self.handle), "virtqueue_notify")

    def kick(self, lock: SharedLock | None = None) -> bool:
        """virtqueue_kick; with a lock (held by the caller) it is released around the notify."""
        return bool(
            check(
                lib.virtqueue_kick(self._repaired(), lock._l if lock else ffi.NULL),
                "virtqueue_kick",
            )
        )

    def submit(
        self, out: Iterable[Buffer], in_: Iterable[Buffer], token: int, strategy: str = "prepare"
    ) -> None:
        """Lock, add, kick by the given strategy, unlock: one C call."""
        code = strategy_code(strategy)
        o, i = self._load(out, in_)
        check(lib.vp_vq_submit(self.handle, code, self._addr, self._len, o, i, token), "submit")

    def submit1(
        self,
        out_gpa: int,
        out_len: int,
        in_gpa: int,
        in_len: int,
        token: int,
        strategy: str = "prepare",
    ) -> None:
        """The one-readable-one-writable fast path of submit."""
        code = STRATEGIES.get(strategy)
        if code is None:
            code = strategy_code(strategy)  # raises the one-line ConfigError
        a, ln = self._addr, self._len
        a[0] = out_gpa
        ln[0] = out_len
        a[1] = in_gpa
        ln[1] = in_len
        rc = lib.vp_vq_submit(self._vq, code, a, ln, 1, 1, token)
        if rc < 0:
            check(rc, "submit")

    def get_buf(self) -> tuple[int, int] | None:
        """virtqueue_get_buf: (token, written length) or None when nothing is used."""
        r = lib.virtqueue_get_buf(self._repaired(), self._tok, self._blen)
        if r == 0:
            return None
        check(r, "virtqueue_get_buf")
        return self._tok[0], self._blen[0]

    def disable_cb(self) -> None:
        lib.virtqueue_disable_cb(self._repaired())

    def enable_cb(self) -> bool:
        """True when callbacks are on and nothing is pending; False: poll again."""
        return bool(lib.virtqueue_enable_cb(self._repaired()))

    def check_ring(self) -> str | None:
        """The ring consistency check (vp_vq_check) under the queue lock,
        after any repair it needs: None when the free list and the chains
        in flight cover every descriptor once, num_free, the shadows and
        the records agree with the ring; else the first fault."""
        why = ffi.new("char[]", 256)
        with self.lock:
            r = lib.vp_vq_check(self.handle, why, 256)
        return ffi.string(why).decode() if r else None

    @property
    def num_free(self) -> int:
        return lib.vp_vq_num_free(self.handle)

    def wait_interrupt(self, timeout: float | None = None) -> bool:
        """Wait for the device's call; False on timeout."""
        if self.call_notifier is None:
            raise ConfigError("virtqueue opened without notifiers")
        return self.call_notifier.wait(timeout)

    def state(self) -> dict[str, int]:
        st = self.region.queue_shared(self.index).drv
        return {
            "free_head": st.free_head,
            "num_free": st.num_free,
            "avail_idx": st.avail_idx_shadow,
            "last_used_idx": st.last_used_idx,
            "kicks": st.kicks,
            "kicks_suppressed": st.kicks_suppressed,
            "added": st.added,
            "completed": st.completed,
        }

    def echo_drive(
        self,
        n: int,
        batch: int = 0,
        strategy: str = "hold",
        buf_gpa: int | None = None,
        buf_len: int = 64,
    ) -> int:
        """Drive n requests through an echo device from C (tests and benchmarks)."""
        if buf_gpa is None:
            buf_gpa = self.region.queue_info(self.index)["data"]
        return check(
            lib.vp_echo_drive(self.handle, n, batch, strategy_code(strategy), buf_gpa, buf_len),
            "echo_drive",
        )


class DeviceQueue(Closeable):
    """The device's handle on a queue it laid out itself.

    It takes the ring addresses from the creating Region object's own copy of
    the layout, never from the region header a guest can overwrite.
    """

    def __init__(
        self,
        region: Region,
        index: int = 0,
        notifiers: bool = True,
        max_segs: int | None = None,
    ) -> None:
        if not region.owner or region.device_layout is None:
            raise ConfigError("only the region's creator serves its queues")
        region._check_index(index)
        info = region.device_layout[index]
        self.region = region
        self.index = index
        self.num = info["num"]
        self.max_segs = max_segs or self.num
        self._q = opened(
            lib.vp_devq_open,
            region.base,
            region.size,
            info["data"],
            info["data"] + info["data_size"],
            index,
            self.num,
            info["desc"],
            info["avail"],
            info["used"],
            int(region.device_event_idx),
            region.device_exit_mode,
            what=f"device queue {index}",
        )
        self._chain = ffi.new("struct vp_chain *")
        self._segs = ffi.new("struct vp_seg[]", self.max_segs)
        self.kick_notifier: Notifier | None = None
        self.call_notifier: Notifier | None = None
        self.ack_notifier: Notifier | None = None
        if notifiers:
            self.kick_notifier = Notifier.open_sem(region.sem_name(index, "kick"))
            self.call_notifier = Notifier.open_sem(region.sem_name(index, "call"))
            self.ack_notifier = Notifier.open_sem(region.sem_name(index, "ack"))
            lib.vp_devq_set_notify(
                self._q,
                self.kick_notifier.handle,
                self.call_notifier.handle,
                self.ack_notifier.handle,
            )

    @property
    def handle(self) -> Any:
        if self._q is None:
            raise ConfigError("device queue is closed")
        return self._q

    def close(self) -> None:
        if self._q is not None:
            lib.vp_devq_close(self._q)
            self._q = None
        for n in (self.kick_notifier, self.call_notifier, self.ack_notifier):
            if n is not None:
                n.close()

    def pop(self) -> Chain | None:
        """Next available chain as (head, [(gpa, length, writable), ...]) or None.

        A chain that breaks a ring rule raises RingError and marks the queue broken.
        """
        r = check(lib.vp_devq_pop(self.handle, self._chain, self._segs, self.max_segs), "pop")
        if r == 0:
            return None
        c = self._chain
        segs = [
            (self._segs[i].addr, self._segs[i].len, bool(self._segs[i].write))
            for i in range(c.nseg)
        ]
        return c.head, segs

    def push(self, head: int, length: int) -> None:
        check(lib.vp_devq_push(self.handle, head, length), "push")

    def interrupt(self) -> bool:
        """Send the call notification if the driver wants it; True if sent."""
        return bool(check(lib.vp_devq_interrupt(self.handle), "interrupt"))

    def need_interrupt(self) -> bool:
        return bool(lib.vp_devq_need_interrupt(self.handle))

    def disable_notify(self) -> None:
        lib.vp_devq_disable_notify(self.handle)

    def enable_notify(self) -> bool:
        """Re-enable kicks; True when work arrived meanwhile (drain again, do not sleep)."""
        return bool(lib.vp_devq_enable_notify(self.handle))

    def wait_kick(self, timeout: float | None = None) -> int:
        """Wait for kicks; how many were taken (0 on timeout)."""
        ns = -1 if timeout is None else int(timeout * 1e9)
        return check(lib.vp_devq_wait_kick(self.handle, ns), "wait_kick")

    def ack_kicks(self, n: int) -> None:
        check(lib.vp_devq_ack_kicks(self.handle, n), "ack_kicks")

    def set_notification_data(self, behaviour: str, reread_ms: int = ND_REREAD_MS_DEFAULT) -> None:
        """Read the doorbell after each kick: "trust" (pop only up to its
        index; read avail->idx once after reread_ms without a notification),
        "reread" (a hint: read avail->idx) or "off".  After the in-flight
        record is attached, before the queue is served."""
        if behaviour not in ND_BEHAVIOURS:
            raise ConfigError(
                f"notification data must be one of {', '.join(ND_BEHAVIOURS)}, not {behaviour!r}"
            )
        check(
            lib.vp_devq_set_notification_data(self.handle, ND_BEHAVIOURS[behaviour], reread_ms),
            "notification data",
        )

    def doorbell(self) -> None:
        """Read and classify the doorbell now, as after a kick."""
        lib.vp_devq_doorbell(self.handle)

    def nd_stats(self) -> dict[str, int]:
        """The queue's notification-data counters (struct vp_notif_stats) and doorbell."""
        return nd_stats(self.region.queue_shared(self.index))

    @property
    def broken(self) -> int:
        """0, or the positive code of the rule that broke the queue."""
        return lib.vp_devq_broken(self.handle)

    def mark_broken(self, code: int) -> None:
        lib.vp_devq_mark_broken(self.handle, code)

    @property
    def inflight(self) -> int:
        return lib.vp_devq_inflight(self.handle)

    def echo_serve(self, n: int = -1, poll: bool = False, stop: Any = None) -> int:
        """Serve n chains (n < 0: until the stop word is set) as an echo device, in C.

        stop: an int32_t * from cffi, or a writable buffer whose first four
        bytes are the word (an mmap shared with the process that sets it).
        """
        if stop is None:
            stop = ffi.NULL
        elif not isinstance(stop, ffi.CData):
            stop = ffi.cast("int32_t *", ffi.from_buffer(stop, require_writable=True))
        return check(lib.vp_echo_serve(self.handle, n, int(poll), stop), "echo_serve")


ND_STAT_FIELDS = (
    "behaviour", "reread_ms", "index", "doorbells", "reordered", "misdirected", "waiting",
    "stalls", "stall_ns", "stall_max_ns", "rereads",
)  # fmt: skip


def nd_behaviour(code: int) -> str:
    """The name of a behaviour read back from a queue's shared block; "off"
    for any value but trust's and reread's."""
    return _ND_NAMES.get(code, "off")


def nd_stats(shared: Any) -> dict[str, int]:
    """struct vp_notif_stats of a queue's shared block as a dict, with the
    doorbell's words (notify, notified, held_back)."""
    out = {k: int(getattr(shared.nd, k)) for k in ND_STAT_FIELDS}
    out["notify"] = int(shared.bell.notify)
    out["notified"] = int(shared.bell.notified)
    out["held_back"] = int(shared.bell.held_back)
    return out
