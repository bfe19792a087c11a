"""Ring invariants under any sequence of driver and device operations.

A Hypothesis state machine drives one queue through the public API: the
driver (Virtqueue on an attached region) adds chains of readable and
writable buffers, kicks, reaps and switches callbacks; the device
(DeviceQueue on the creating region, in the same process) pops, pushes in
any order, interrupts and switches notifications.  After every step the
ring must agree with a plain model of it:

- free descriptors + descriptors held by chains not yet reaped == queue size;
- no head is twice in flight (available, or popped and not pushed);
- used <= avail: avail idx - used idx == chains added and not yet pushed;
- the device pops chains in the order they were added, with their buffers;
- get_buf returns pushed chains in used-ring order, every token exactly once;
- the device refuses to push a head that is not in flight.
"""

from __future__ import annotations

import itertools
import os
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import virtio_py as vp

# conftest.py sets the session's tag; the leftover check looks for it in /dev/shm.
SESSION = os.environ.get("VIRTIO_PY_TEST_SESSION", "vpt")
_names = itertools.count()

Seg = tuple[int, int, bool]


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.region: vp.Region | None = None
        self.guest: vp.Region | None = None
        self.drv: vp.Virtqueue | None = None
        self.dev: vp.DeviceQueue | None = None

    # ---- set-up and tear-down: every region created is closed and unlinked

    @initialize(num=st.sampled_from([2, 4, 8, 16]), event_idx=st.booleans())
    def open_queue(self, num: int, event_idx: bool) -> None:
        name = f"{SESSION}-ring-{os.getpid()}-{next(_names)}"
        self.region = vp.Region.create(
            name, queue_size=num, data_size=64 << 10, event_idx=event_idx
        )
        self.guest = vp.Region.attach(name)
        self.drv = vp.Virtqueue(self.guest, 0, notifiers=False)
        self.dev = vp.DeviceQueue(self.region, 0, notifiers=False)
        self.num = num
        self.data = self.region.queue_info(0)["data"]
        self.next_token = 1
        self.pending: deque[tuple[int, list[Seg]]] = deque()  # added, not popped
        self.popped: dict[int, tuple[int, list[Seg]]] = {}  # head -> chain, not pushed
        self.used: deque[tuple[int, int]] = deque()  # pushed, not reaped: (token, len)
        self.held: dict[int, int] = {}  # token -> descriptors, until reaped
        self.returned: set[int] = set()

    def teardown(self) -> None:
        for obj in (self.dev, self.drv, self.guest, self.region):
            if obj is not None:
                obj.close()

    # ---- the driver

    @rule(
        out=st.lists(st.integers(1, 4096), max_size=3),
        in_=st.lists(st.integers(1, 4096), max_size=3),
    )
    def add(self, out: list[int], in_: list[int]) -> None:
        assert self.drv is not None
        n = len(out) + len(in_)
        if n == 0:
            in_ = [1]
            n = 1
        gpas = [self.data + 4096 * i for i in range(n)]
        out_b = list(zip(gpas, out))
        in_b = list(zip(gpas[len(out) :], in_))
        token = self.next_token
        self.next_token += 1
        free = self.num - sum(self.held.values())
        with self.drv.lock:
            if n > self.num:
                with pytest.raises(vp.ConfigError):
                    self.drv.add(out_b, in_b, token)
                return
            if n > free:
                with pytest.raises(vp.QueueFullError):
                    self.drv.add(out_b, in_b, token)
                return
            self.drv.add(out_b, in_b, token)
        segs = [(g, ln, False) for g, ln in out_b] + [(g, ln, True) for g, ln in in_b]
        self.pending.append((token, segs))
        self.held[token] = n

    @rule()
    def kick(self) -> None:
        assert self.drv is not None
        with self.drv.lock:
            self.drv.kick()

    @rule()
    def get_buf(self) -> None:
        assert self.drv is not None
        with self.drv.lock:
            got = self.drv.get_buf()
        if not self.used:
            assert got is None
            return
        want = self.used.popleft()
        assert got == want
        token = got[0]
        assert token not in self.returned, f"token {token} returned twice"
        self.returned.add(token)
        del self.held[token]

    @rule()
    def enable_cb(self) -> None:
        assert self.drv is not None
        with self.drv.lock:
            quiet = self.drv.enable_cb()
        # True: callbacks on and nothing used is waiting to be reaped.
        assert quiet == (not self.used)

    @rule()
    def disable_cb(self) -> None:
        assert self.drv is not None
        with self.drv.lock:
            self.drv.disable_cb()

    # ---- the device

    @rule()
    def pop(self) -> None:
        assert self.dev is not None
        got = self.dev.pop()
        if not self.pending:
            assert got is None
            return
        token, segs = self.pending.popleft()
        assert got is not None
        head, got_segs = got
        assert got_segs == segs
        assert head not in self.popped, f"head {head} popped twice"
        self.popped[head] = (token, segs)

    @rule(data=st.data(), length=st.integers(0, 1 << 16))
    def push(self, data: st.DataObject, length: int) -> None:
        assert self.dev is not None
        if not self.popped:
            # A head not in flight: refused, and the queue stays as it was.
            head = data.draw(st.integers(0, 2 * self.num), label="stray head")
            with pytest.raises(vp.RingError) as e:
                self.dev.push(head, length)
            assert e.value.args[0].endswith("head is not in flight")
            return
        head = data.draw(st.sampled_from(sorted(self.popped)), label="head")
        self.dev.push(head, length)
        token, _ = self.popped.pop(head)
        self.used.append((token, length))

    @rule()
    def interrupt(self) -> None:
        assert self.dev is not None
        self.dev.interrupt()

    @rule()
    def enable_notify(self) -> None:
        assert self.dev is not None
        # True: work came meanwhile, the device must drain before it sleeps.
        assert self.dev.enable_notify() == bool(self.pending)

    @rule()
    def disable_notify(self) -> None:
        assert self.dev is not None
        self.dev.disable_notify()

    # ---- the invariants

    @invariant()
    def descriptors_are_free_or_held(self) -> None:
        if self.drv is None:
            return
        assert self.drv.num_free + sum(self.held.values()) == self.num

    @invariant()
    def used_never_passes_avail(self) -> None:
        if self.region is None:
            return
        avail = int(vp.avail_ring(self.region)["idx"])
        used = int(vp.used_ring(self.region)["idx"])
        assert (avail - used) & 0xFFFF == len(self.pending) + len(self.popped) <= self.num

    @invariant()
    def no_head_twice_in_flight(self) -> None:
        if self.region is None:
            return
        ring = vp.avail_ring(self.region)
        idx = int(ring["idx"])
        waiting = [
            int(ring["ring"][(idx - len(self.pending) + i) % self.num])
            for i in range(len(self.pending))
        ]
        heads = waiting + list(self.popped)
        assert len(set(heads)) == len(heads), f"a head twice in flight: {heads}"
        assert all(h < self.num for h in heads)

    @invariant()
    def device_agrees(self) -> None:
        if self.dev is None:
            return
        assert self.dev.broken == 0
        assert self.dev.inflight == len(self.popped)


RingMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, database=None
)
test_ring_invariants_hold_for_any_operation_sequence = RingMachine.TestCase
