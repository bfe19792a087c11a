"""Requests moving between a driver and a device: 16-bit index wraparound,
notification suppression, and 100,000-request exchanges between two
processes under every kick strategy, notification scheme, device mode and
exit kind."""

import math
import os

import pytest

import procs
from procs import wait_for
from virtio_py import (
    ConfigError,
    DeviceQueue,
    QueueFullError,
    Region,
    RegionError,
    Virtqueue,
    avail_ring,
    used_ring,
)
from virtio_py import region as region_mod
from virtio_py._lowlevel import ffi

NO_NOTIFY = 1  # VRING_USED_F_NO_NOTIFY
NO_INTERRUPT = 1  # VRING_AVAIL_F_NO_INTERRUPT


# ---- wraparound, both ends in this process ---------------------------------


@pytest.mark.parametrize("num", [1, 2, 4, 16, 256])
def test_indices_wrap(name, num):
    """More than 65536 chains through one queue, a batch of up to num at a
    time, completed in reverse order; every token and length comes back and
    both ring indices wrap, as do the event indices."""
    total = 70_000 + num // 2 + 1  # not a multiple of any batch
    with Region.create(name, queue_size=num, data_size=1 << 20, event_idx=True) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        dq = DeviceQueue(r, 0, notifiers=False)
        avail, used = avail_ring(r), used_ring(r)
        lo = r.queue_info(0)["data"]
        added = completed = 0
        wrapped_avail = wrapped_used = False
        batch_no = 0
        while completed < total:
            # Alternate batches: num one-descriptor chains (every avail slot),
            # then num/2 chains of a readable and a writable descriptor.
            two = num > 1 and batch_no % 2 == 1
            batch_no += 1
            k = min(num // 2 if two else num, total - added)
            # The device asks for a kick at the next entry (event index).
            assert not dq.enable_notify()
            old = added & 0xFFFF
            for j in range(k):
                t = added + 1
                if two:
                    vq.add([(lo + 64 * j, 16)], [(lo + 8192 + 64 * j, 1 + t % 61)], token=t)
                else:
                    vq.add([], [(lo + 64 * j, 1 + t % 61)], token=t)
                added += 1
            assert avail["idx"] == added & 0xFFFF
            wrapped_avail |= avail["idx"] < old
            # The entry the device asked about was passed: a kick is due.
            assert vq.kick_prepare()
            heads = []
            ndesc = 0
            for j in range(k):
                head, segs = dq.pop()
                ndesc += len(segs)
                t = completed + j + 1
                if two:
                    assert segs == [
                        (lo + 64 * j, 16, False),
                        (lo + 8192 + 64 * j, 1 + t % 61, True),
                    ]
                else:
                    assert segs == [(lo + 64 * j, 1 + t % 61, True)]
                heads.append((head, segs[-1][1]))
            assert dq.pop() is None
            assert vq.num_free == num - ndesc
            uold = completed & 0xFFFF
            for head, length in reversed(heads):
                dq.push(head, length)
            assert used["idx"] == (completed + k) & 0xFFFF
            wrapped_used |= used["idx"] < uold
            # The driver published used_event = its last_used_idx, which
            # the device just passed: an interrupt is due.
            assert dq.need_interrupt()
            got = [vq.get_buf() for _ in range(k)]
            assert vq.get_buf() is None
            want = [(t, 1 + t % 61) for t in range(completed + k, completed, -1)]
            assert got == want
            completed += k
            assert avail["used_event"] == completed & 0xFFFF
            assert vq.num_free == num
        st = vq.state()
        assert st["added"] == st["completed"] == total
        assert st["avail_idx"] == st["last_used_idx"] == total & 0xFFFF
        dev = r.queue_shared(0).dev
        assert dev.chains == total
        assert dev.last_avail_idx == dev.used_idx == total & 0xFFFF
        assert dev.inflight == 0 and dev.broken == 0
        assert wrapped_avail and wrapped_used
        assert avail["idx"] == used["idx"] == total - 65536
        assert used["avail_event"] == (total - k) & 0xFFFF
        vq.close()
        dq.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_suppression_in_process(name, event_idx):
    """Both ends' wishes, each way, with flags or event index."""
    with Region.create(name, queue_size=8, data_size=1 << 16, event_idx=event_idx) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        dq = DeviceQueue(r, 0, notifiers=False)
        lo = r.queue_info(0)["data"]

        def one(token):
            vq.add([(lo, 8)], [(lo + 64, 8)], token=token)

        # The device is draining: no kick wanted.
        dq.disable_notify()
        if not event_idx:
            assert used_ring(r)["flags"] & NO_NOTIFY
        assert not dq.enable_notify()
        if not event_idx:
            assert not used_ring(r)["flags"] & NO_NOTIFY
        one(1)
        assert vq.kick_prepare()
        dq.disable_notify()
        one(2)
        # Flags: the device said stop.  Event index: avail_event is 0 and
        # was passed already by the first chain.
        assert not vq.kick_prepare()
        assert vq.state()["kicks_suppressed"] == 1
        # The device re-enables with work pending: it must drain, not sleep.
        assert dq.enable_notify()
        for _ in range(2):
            head, _ = dq.pop()
            dq.push(head, 8)
        assert not dq.enable_notify()
        one(3)
        assert vq.kick_prepare()

        # Interrupts: the driver is polling with callbacks off.
        vq.disable_cb()
        if not event_idx:
            assert avail_ring(r)["flags"] & NO_INTERRUPT
        # Event index: the first used buffers are always told (vhost's
        # signalled_used_valid).  Flags: NO_INTERRUPT says no.
        assert dq.interrupt() is event_idx
        assert vq.get_buf() == (1, 8)
        head, _ = dq.pop()
        dq.push(head, 8)
        assert dq.interrupt() is False  # callbacks off, used_event left behind
        assert dq.interrupt() is False  # and nothing new since
        # enable_cb with buffers pending says "poll again".
        assert vq.enable_cb() is False
        assert vq.get_buf() == (2, 8)
        assert vq.get_buf() == (3, 8)
        assert vq.enable_cb() is True
        if not event_idx:
            assert not avail_ring(r)["flags"] & NO_INTERRUPT
        assert avail_ring(r)["used_event"] == 3
        one(4)
        head, _ = dq.pop()
        dq.push(head, 8)
        assert dq.interrupt() is True
        dev = r.queue_shared(0).dev
        assert (dev.interrupts, dev.interrupts_suppressed) == ((2, 1) if event_idx else (1, 2))
        vq.close()
        dq.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_asking_for_an_interrupt_does_not_consume_it(name, event_idx):
    """need_interrupt only asks: the interrupt that follows is sent."""
    with Region.create(name, queue_size=8, event_idx=event_idx) as region:
        dq = DeviceQueue(region, 0)
        vq = Virtqueue(Region.attach(name), 0)
        try:
            data = region.queue_info(0)["data"]
            vq.submit([(data, 16)], [(data + 4096, 64)], token=1)
            head, _ = dq.pop()
            dq.push(head, 64)
            assert dq.need_interrupt()
            assert dq.interrupt()  # asking did not eat it
            assert vq.wait_interrupt(1.0)
            assert not dq.need_interrupt()  # told once, nothing new since
        finally:
            vq.close()
            vq.region.close()
            dq.close()


def test_driver_api_errors(name):
    with Region.create(name, queue_size=4, data_size=1 << 16) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        lo = r.queue_info(0)["data"]
        with pytest.raises(ConfigError):
            vq.add([(lo, 8)], [], token=0)  # tokens are non-zero
        with pytest.raises(ConfigError):
            vq.add([], [], token=1)  # an empty chain
        with pytest.raises(ConfigError):
            vq.add([(lo, 8)] * 5, [], token=1)  # longer than the queue
        with pytest.raises(ConfigError):
            vq.submit([(lo, 8)], [], 1, strategy="yield")
        vq.add([(lo, 8)] * 3, [], token=1)
        with pytest.raises(QueueFullError):
            vq.add([(lo, 8)], [(lo, 8)], token=2)
        vq.add([(lo, 8)], [], token=3)
        with pytest.raises(QueueFullError):
            vq.add([(lo, 8)], [], token=4)
        # A failed add changed nothing.
        assert vq.state()["added"] == 2 and vq.num_free == 0
        assert avail_ring(r)["idx"] == 2
        with Region.attach(name) as guest:
            with pytest.raises(ConfigError):
                DeviceQueue(guest, 0)  # only the creator serves
            with pytest.raises(ConfigError):
                Virtqueue(guest, 1)
        vq.close()


# ---- two processes ---------------------------------------------------------

N = 100_000
QSIZE = 128
BATCH = 48  # does not divide N: the last batch is short


def device_main(region, n, poll, stop_gpa, event_idx):
    """The device process: echo n chains (or until the stop word is set)."""
    region.set_daemon_pid(os.getpid())
    dq = DeviceQueue(region, 0)
    stop = ffi.NULL if stop_gpa is None else ffi.cast("int32_t *", region.base + stop_gpa)
    done = dq.echo_serve(n if stop_gpa is None else -1, poll=poll, stop=stop)
    dev = region.queue_shared(0).dev
    return {
        "done": done,
        "broken": dq.broken,
        "inflight": dq.inflight,
        "chains": dev.chains,
        "kicks_taken": dev.kicks_taken,
        "interrupts": dev.interrupts,
        "interrupts_suppressed": dev.interrupts_suppressed,
    }


def driver_main(name, n, batch, strategy):
    """The driver process: attach by name and push n chains from C, which
    checks every token and length on the way back."""
    r = Region.attach(name)
    vq = Virtqueue(r, 0)
    got = vq.echo_drive(n, batch, strategy)
    return {"got": got, "state": vq.state(), "lock": vq.lock.stats()}


def exchange(
    name,
    *,
    strategy,
    event_idx,
    poll,
    exit="async",
    lock="spinyield",
    use_stop=False,
    n=N,
    batch=BATCH,
):
    with Region.create(
        name,
        queue_size=QSIZE,
        data_size=1 << 20,
        event_idx=event_idx,
        exit=exit,
        lock=lock,
        mode="poll" if poll else "notify",
    ) as r:
        stop_gpa = r.queue_info(0)["data"] + 4096 if use_stop else None
        with procs.Children() as kids:
            dev = kids.start(device_main, r, n, poll, stop_gpa, event_idx)
            # Let the device set up before the driver adds: the kick counts
            # below then do not depend on who started first.
            wait_for(lambda: r.daemon_pid == dev.pid, "the device process")
            if poll and not event_idx:
                wait_for(
                    lambda: used_ring(r)["flags"] & NO_NOTIFY,
                    "the polling device to turn kicks off",
                )
            drv = kids.start(driver_main, name, n, batch, strategy)
            d = drv.join(timeout=150, watch=[dev])
            if use_stop:
                r.write_data(stop_gpa, (1).to_bytes(4, "little"))
            v = dev.join(timeout=30)
        drv_state = r.queue_shared(0).drv
        dev_stats = r.queue_shared(0).dev
        assert drv_state.kicks == d["state"]["kicks"]
        return d, v, avail_ring(r)["idx"], used_ring(r)["idx"], dev_stats.last_avail_idx


STRATEGIES = ["hold", "release", "prepare"]


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "sleep"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exchange(name, strategy, event_idx, poll):
    d, v, avail_idx, used_idx, last_avail = exchange(
        name, strategy=strategy, event_idx=event_idx, poll=poll
    )
    batches = math.ceil(N / BATCH)
    # Every request came back with its own token and length (checked in C).
    assert d["got"] == N
    assert v["done"] == N and v["chains"] == N
    assert v["broken"] == 0 and v["inflight"] == 0
    st = d["state"]
    assert st["added"] == st["completed"] == N
    assert st["num_free"] == QSIZE
    assert avail_idx == used_idx == last_avail == N & 0xFFFF
    # One kick decision per batch; each kick posted once, taken at most once.
    assert st["kicks"] + st["kicks_suppressed"] == batches
    assert v["kicks_taken"] <= st["kicks"]
    if poll and event_idx:
        # The polling device never moved avail_event from 0: the driver
        # kicks when its index passes 0, at the start and at the wrap.
        assert st["kicks"] == 2
    elif poll:
        assert st["kicks"] == 0  # VRING_USED_F_NO_NOTIFY all along
    else:
        assert 1 <= v["kicks_taken"]
        assert 1 <= st["kicks"] <= batches
    # The driver polls with callbacks off.
    if event_idx:
        # used_event stays 0: the first completion, then the wrap.
        assert v["interrupts"] == 2
    else:
        assert v["interrupts"] == 0
    assert v["interrupts_suppressed"] >= 1
    # Lock traffic: disable_cb once, then per batch at least the add and
    # one reap.
    lk = d["lock"]
    assert lk["acquisitions"] >= 2 * batches + 1
    assert lk["contentions"] <= lk["acquisitions"]


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "sleep"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exchange_sync_exit(name, strategy, poll):
    """A trapping kick: the driver resumes only after the device took it.
    The device serves until told to stop, as a real one would."""
    d, v, *_ = exchange(
        name,
        strategy=strategy,
        event_idx=not poll,
        poll=poll,
        exit="sync",
        lock="mutex",
        use_stop=True,
        n=N // 2,
    )
    assert d["got"] == N // 2 and v["done"] == N // 2
    assert v["broken"] == 0 and v["inflight"] == 0
    st = d["state"]
    assert st["kicks"] + st["kicks_suppressed"] == math.ceil(N // 2 / BATCH)
    # Each kick returned after an ack: the device took every one of them.
    assert v["kicks_taken"] == st["kicks"]


def test_exchange_full_batches_spin_lock(name):
    """The batch driver's default (half the queue) with the spin lock."""
    d, v, *_ = exchange(name, strategy="prepare", event_idx=True, poll=False, lock="spin", batch=0)
    assert d["got"] == N and v["done"] == N
    assert d["state"]["kicks"] + d["state"]["kicks_suppressed"] == math.ceil(N / (QSIZE // 2))


def device_owner(name, n, poll):
    """A device process as the daemon is one: it creates the region, serves,
    and unlinks everything when done."""
    r = Region.create(
        name,
        queue_size=16,
        data_size=1 << 20,
        event_idx=False,
        lock="mutex",
        mode="poll" if poll else "notify",
    )
    try:
        with DeviceQueue(r, 0) as dq:
            r.set_daemon_pid(os.getpid())  # serving from now on
            done = dq.echo_serve(n, poll=poll)
            dev = r.queue_shared(0).dev
            return {
                "done": done,
                "broken": dq.broken,
                "chains": dev.chains,
                "interrupts": dev.interrupts,
            }
    finally:
        r.close()


def attach_when_served(name, timeout=30):
    def served():
        try:
            r = Region.attach(name)
        except RegionError:
            return None  # not there yet, or not set up yet
        if r.daemon_pid:
            return r
        r.close()
        return None

    return wait_for(served, f"device {name} to come up", timeout)


def python_driver(name, n, strategy, wait_irq):
    """One request at a time from Python: submit, then get_buf."""
    r = attach_when_served(name)
    vq = Virtqueue(r, 0)
    lo = r.queue_info(0)["data"]
    if not wait_irq:
        vq.disable_cb()
    irqs = 0
    for t in range(1, n + 1):
        length = 4 + t % 500
        vq.submit([(lo + 1024, 16)], [(lo + 4096, length)], t, strategy)
        while True:
            got = vq.get_buf()
            if got is not None:
                break
            if wait_irq and vq.enable_cb():
                # Nothing pending and callbacks on: sleep for the call.  Ten
                # seconds without one for a request in flight is a lost
                # interrupt, not slowness.
                if not vq.wait_interrupt(10):
                    raise AssertionError(f"no interrupt for request {t}")
                irqs += 1
        if got != (t, length):
            raise AssertionError(f"request {t}: got {got}, want {(t, length)}")
        # The echo device stores its running count in the first writable
        # buffer.
        seq = int.from_bytes(r.read(lo + 4096, 4), "little")
        if seq != t - 1:
            raise AssertionError(f"request {t}: device wrote {seq}")
    return {"state": vq.state(), "irqs": irqs}


@pytest.mark.parametrize(
    "poll,wait_irq,strategy",
    [(True, False, "prepare"), (False, True, "hold"), (False, True, "release")],
    ids=["poll-device-polling-driver", "sleeping-both-hold", "sleeping-both-release"],
)
def test_python_one_at_a_time(name, poll, wait_irq, strategy):
    n = 20_000 if poll else 5_000
    try:
        with procs.Children() as kids:
            dev = kids.start(device_owner, name, n, poll)
            res = kids.start(python_driver, name, n, strategy, wait_irq).join(
                timeout=150, watch=[dev]
            )
            v = dev.join(timeout=30)
    finally:
        left = region_mod.destroy(name)
    assert left == [], "the device left objects behind"
    assert v["done"] == v["chains"] == n and v["broken"] == 0
    st = res["state"]
    assert st["added"] == st["completed"] == n
    assert st["kicks"] + st["kicks_suppressed"] == n
    if wait_irq:
        assert res["irqs"] >= 1
        # Every wakeup took one posted interrupt.
        assert v["interrupts"] >= res["irqs"]
    else:
        assert v["interrupts"] == 0
        # The polling device turned kicks off before it served the first.
        assert st["kicks"] <= 1
