"""VIRTIO_F_NOTIFICATION_DATA: the doorbell word, the reordering hazard of
notifying outside the lock, the device's trust and reread behaviours, the
remedies, and doorbell values from a hostile guest."""

import mmap
import os
import random
import struct
import time

import pytest

import procs
from hostd_util import emu, hostd, one_line_error
from procs import wait_for
from virtio_py import ConfigError, DeviceQueue, Region, RingError, Virtqueue, avail_ring
from virtio_py._lowlevel import ffi, lib
from virtio_py.compare import BASE, format_tables, resolve
from virtio_py.compare.config import parse_row, variants
from virtio_py.workload import JobSpec, run_job

QSIZE = 16
EAVAIL = lib.VP_EAVAIL


def nd_region(name, **kw):
    kw.setdefault("queue_size", QSIZE)
    kw.setdefault("data_size", 1 << 20)
    kw.setdefault("exit", "async")
    kw.setdefault("event_idx", False)
    return Region.create(name, notification_data=True, **kw)


def bell_gpa(region, field="notify"):
    return (
        region.queue_info(0)["shared"]
        + ffi.offsetof("struct vp_queue_shared", "bell")
        + ffi.offsetof("struct vp_doorbell", field)
    )


def int16(x):
    x &= 0xFFFF
    return x - 0x10000 if x >= 0x8000 else x


def word(vqn, idx):
    return (idx & 0xFFFF) << 16 | vqn


# ---- the word and the negotiation -----------------------------------------


def test_feature_is_off_by_default_and_offered_when_asked(name):
    with Region.create(name) as r:
        assert not r.notification_data
    with nd_region(name + "n") as r:
        assert r.notification_data
        assert r.header.driver_features >> 38 & 1


def test_poll_mode_refuses_notification_data(name):
    with pytest.raises(ConfigError, match="never waits on a doorbell"):
        Region.create(name, mode="poll", notification_data=True)
    with pytest.raises(ConfigError, match="never waits on a doorbell"):
        resolve(BASE, dict(mode="poll", notification_data="trust"))


@pytest.mark.parametrize("strategy", ["hold", "release", "prepare"])
def test_notify_writes_the_split_ring_word(name, strategy):
    """vqn in bits 0..15, the driver's avail index in 16..31, one word per
    kick; nothing is written without the feature."""
    with nd_region(name, queues=2) as r:
        vq = Virtqueue(r, 1, notifiers=False)
        dq = DeviceQueue(r, 1, notifiers=False)
        data = r.queue_info(1)["data"]
        shared1 = r.queue_shared(1)
        for i in range(1, 40):  # several laps of the ring
            vq.submit([(data, 16)], [(data + 4096, 16)], token=i, strategy=strategy)
            assert shared1.bell.notify == word(1, i)
            assert shared1.bell.notified == i
            assert r.queue_shared(0).bell.notify == 0
            head, _ = dq.pop()
            dq.push(head, 0)
            assert vq.get_buf() == (i, 0)
            assert not dq.enable_notify()  # event index: kick me at the next one
        dq.close()
        vq.close()
    with Region.create(name + "x") as r:
        vq = Virtqueue(r, 0, notifiers=False)
        data = r.queue_info(0)["data"]
        vq.submit([(data, 16)], [], token=1, strategy=strategy)
        assert r.queue_shared(0).bell.notify == 0
        vq.close()


# ---- the forced interleaving: two drivers, a barrier before the doorbell ----


def driver(name, strategy, remedy, token, gate):
    r = Region.attach(name)
    vq = Virtqueue(r, 0)
    if remedy in ("lock", "monotonic"):
        assert vq.set_nd_remedy(remedy)
    if gate is not None:
        vq.set_gate(gate, timeout=2.0)
    data = r.queue_info(0)["data"] + 8192 * token
    vq.submit([(data, 16)], [(data + 4096, 16)], token=token, strategy=strategy)
    vq.set_gate(None)
    return token


def interleave(name, strategy, remedy, device_reads_between):
    """Driver A adds (index 1) and stops before its doorbell write; driver B
    adds (index 2) and notifies; then A writes its doorbell.  The device
    reads the doorbell after B's write and again after A's
    (device_reads_between), or once after both.  Returns the device's
    counters and the tokens it popped, with and without the re-read."""
    behaviour = "reread" if remedy == "reread" else "trust"
    gate = mmap.mmap(-1, 8)
    with nd_region(name, lock="mutex") as r:
        dq = DeviceQueue(r, 0)
        dq.set_notification_data(behaviour, reread_ms=100)
        popped = []

        def drain():
            n = 0
            while (c := dq.pop()) is not None:
                popped.append(c[1][0][0])
                dq.push(c[0], 0)
                n += 1
            return n

        with procs.Children() as kids:
            a = kids.start(driver, name, strategy, remedy, 1, gate)
            wait_for(lambda: struct.unpack_from("I", gate, 0)[0] == 1, "A at its doorbell")
            b = kids.start(driver, name, strategy, None if remedy == "lock" else remedy, 2, None)
            # B finishes unless A holds the lock across its doorbell.
            end = time.monotonic() + 0.5
            while b._pump(0.02) is False and time.monotonic() < end:
                pass
            b_done_first = b._fd is None
            if device_reads_between and b_done_first:
                dq.wait_kick(0)
                drain()
            struct.pack_into("I", gate, 4, 1)  # A goes on
            a.join(30)
            b.join(30)
        dq.wait_kick(0)
        drain()
        dq.enable_notify()  # the device's last look before it sleeps
        before = dq.nd_stats()
        before["popped"] = len(popped)
        # A trusting device reads avail->idx after reread_ms without a
        # notification: the stall is measured, never a hang.
        dq.wait_kick(1.0)
        drain()
        dq.enable_notify()
        after = dq.nd_stats()
        after["popped"] = len(popped)
        after["b_done_first"] = b_done_first
        after["avail_idx"] = int(avail_ring(r)["idx"])
        dq.close()
    gate.close()
    return before, after


@pytest.mark.parametrize("strategy", ["release", "prepare"])
def test_reordered_doorbell_is_stale_without_a_remedy(name, strategy):
    """The device sees B's word (index 2), then A's older one (index 1):
    stale, counted and ignored; both requests were served on B's word."""
    before, after = interleave(name, strategy, "none", device_reads_between=True)
    assert after["b_done_first"]
    assert after["reordered"] == 1
    assert before["popped"] == 2 and after["waiting"] == 0
    assert after["notify"] == word(0, 1)  # the register went backwards


@pytest.mark.parametrize("strategy", ["release", "prepare"])
def test_reordered_doorbell_stalls_a_trusting_device(name, strategy):
    """The device reads the register once both doorbells landed: it holds
    A's index 1, so the trusting device serves one request and leaves B's
    waiting past its notification, until its re-read."""
    before, after = interleave(name, strategy, "none", device_reads_between=False)
    assert after["b_done_first"]
    assert before["popped"] == 1
    assert before["waiting"] == 1 and before["stalls"] == 1
    assert before["stall_ns"] == 0  # still stalled
    # The re-read after reread_ms ends it.
    assert after["popped"] == 2 and after["rereads"] == 1
    assert after["stall_ns"] > 0 and after["stall_max_ns"] > 0


@pytest.mark.parametrize("between", [True, False], ids=["read-between", "read-after"])
@pytest.mark.parametrize("remedy", ["lock", "monotonic", "reread"])
@pytest.mark.parametrize("strategy", ["release", "prepare"])
def test_each_remedy_leaves_no_request_waiting(name, strategy, remedy, between):
    """The same interleaving with each remedy: notify under the lock (B
    cannot add before A's doorbell), a monotonic doorbell (A's older word
    is never stored), or a device that re-reads avail->idx."""
    before, after = interleave(name, strategy, remedy, device_reads_between=between)
    assert before["popped"] == 2  # both served at once, no re-read needed
    assert after["waiting"] == 0 and after["stalls"] == 0 and after["rereads"] == 0
    if remedy == "lock":
        assert not after["b_done_first"]  # A held the lock across its doorbell
        assert after["notify"] == word(0, 2) and after["reordered"] == 0
    if remedy == "monotonic":
        assert after["notify"] == word(0, 2) and after["reordered"] == 0
        assert after["held_back"] == 1
    if remedy == "reread" and between:
        # The stale word still arrives, and is harmless.
        assert after["reordered"] == 1


# ---- many processes ----------------------------------------------------------


def test_hold_orders_every_doorbell(device):
    """Under hold the lock orders the doorbell writes: 100,000 requests from
    4 processes, not one reordered doorbell, no request left waiting."""
    d = device(notification_data="trust", iodepth=1)
    spec = JobSpec(d.name, workers=4, rw="read", bs=512, size=25_000 * 512, strategy="hold")
    res = run_job(spec)
    assert res["ios"] == 100_000 and res["errors"] == 0
    nd = res["notification_data"]
    assert nd["device"] == "trust" and nd["notifications"] > 0
    assert nd["doorbells"] > 0
    assert nd["reordered"] == 0 and nd["waiting"] == 0 and nd["stalls"] == 0


@pytest.mark.parametrize(
    "strategy,event_idx,exit", [("release", True, "async"), ("prepare", False, "sync")]
)
def test_reread_device_never_leaves_a_request_waiting(device, strategy, event_idx, exit):
    """Whatever order the doorbells arrive in, a device that re-reads
    avail->idx leaves no request waiting past a notification."""
    d = device(notification_data="reread", event_idx=event_idx, exit=exit)
    spec = JobSpec(d.name, workers=4, rw="read", bs=512, size=5_000 * 512, strategy=strategy)
    res = run_job(spec)
    assert res["ios"] == 20_000 and res["errors"] == 0
    nd = res["notification_data"]
    assert nd["device"] == "reread"
    assert nd["waiting"] == 0 and nd["stalls"] == 0 and nd["rereads"] == 0


@pytest.mark.parametrize("remedy", ["none", "lock", "monotonic"])
def test_trusting_device_completes_every_request(device, remedy):
    """release with a trusting device: stalls, if any, end at a later kick
    or at the re-read; every request completes; with a remedy none waits."""
    d = device(notification_data="trust", exit="async")
    spec = JobSpec(d.name, workers=4, rw="read", bs=512, size=3_000 * 512,
                   strategy="release", nd_remedy=remedy)  # fmt: skip
    res = run_job(spec)
    assert res["ios"] == 12_000 and res["errors"] == 0
    nd = res["notification_data"]
    assert nd["remedy"] == remedy
    if remedy != "none":
        assert nd["waiting"] == 0 and nd["reordered"] == 0


def test_trusting_device_with_event_index_is_rescued_by_its_reread(device):
    """Event index's promise (the device reads the ring from avail_event on)
    is one a device that skips the avail read cannot keep: requests it was
    not told of wait, even under hold, until the re-read.  Measured, and
    every request completes."""
    d = device(notification_data="trust", event_idx=True, exit="async", nd_reread_ms=20)
    spec = JobSpec(d.name, workers=2, rw="read", bs=512, size=300 * 512, strategy="hold")
    res = run_job(spec)
    assert res["ios"] == 600 and res["errors"] == 0
    assert res["notification_data"]["reread_ms"] == 20


# ---- hostile doorbell values ---------------------------------------------------


def _publish(region, vq, n, token0=1):
    data = region.queue_info(0)["data"]
    for i in range(n):
        vq.add([(data, 16)], [(data + 4096, 16)], token=token0 + i)


@pytest.mark.parametrize("seed", range(4))
def test_hostile_doorbell_values_are_safe(name, seed):
    """Any 32 bits in the doorbell: a stale or misdirected word is ignored;
    one more than the queue size ahead of last_avail_idx breaks the queue
    (EAVAIL); the trusting device never pops past last_avail_idx + num, and
    whatever it pops is checked as any chain (a garbage one breaks the
    queue, nothing else)."""
    rng = random.Random(seed)
    with nd_region(name) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        dq = DeviceQueue(r, 0, notifiers=False)
        dq.set_notification_data("trust")
        token = 1
        for _ in range(300):
            if vq.num_free >= 2 and rng.random() < 0.6:
                _publish(r, vq, 1, token0=token)
                token += 1
            last = r.queue_shared(0).dev.last_avail_idx
            before = dq.nd_stats()
            v = rng.choice(
                [
                    rng.getrandbits(32),
                    word(0, last + rng.randrange(0, QSIZE + 1)),
                    word(0, before["index"] - rng.randrange(1, 0x8000)),
                    word(rng.randrange(1, 1 << 16), last + 1),
                    word(0, last + QSIZE + rng.randrange(1, 0x7FF0)),
                ]
            )
            r.poke(bell_gpa(r), v, 4)
            dq.doorbell()
            after = dq.nd_stats()
            vidx = v >> 16
            # Distances from last_avail_idx, as int16: behind the device's
            # notification index is stale.
            stale = int16(vidx - last) < int16(before["index"] - last)
            if v == before["notify"]:
                pass  # the same word again: no new write to classify
            elif v & 0xFFFF:
                assert after["misdirected"] == before["misdirected"] + 1
            elif stale:
                assert after["reordered"] == before["reordered"] + 1
            elif (vidx - last) & 0xFFFF > QSIZE:
                assert dq.broken == EAVAIL
                break
            else:
                assert after["index"] == vidx
            got = 0
            try:
                while (c := dq.pop()) is not None:
                    got += 1
                    dq.push(c[0], 0)
            except RingError:
                assert dq.broken
                break
            assert got <= QSIZE
            lav = r.queue_shared(0).dev.last_avail_idx
            assert (lav - last) & 0xFFFF <= QSIZE
        dq.close()
        vq.close()


def test_stale_and_ahead_words(name):
    with nd_region(name) as r:
        vq = Virtqueue(r, 0, notifiers=False)
        dq = DeviceQueue(r, 0, notifiers=False)
        dq.set_notification_data("trust")
        _publish(r, vq, 3)
        r.poke(bell_gpa(r), word(0, 2), 4)
        dq.doorbell()
        assert dq.pop() and dq.pop() and dq.pop() is None  # up to index 2 only
        r.poke(bell_gpa(r), word(0, 1), 4)
        dq.doorbell()
        assert dq.nd_stats()["reordered"] == 1 and dq.pop() is None
        r.poke(bell_gpa(r), word(3, 3), 4)
        dq.doorbell()
        assert dq.nd_stats()["misdirected"] == 1 and dq.pop() is None
        r.poke(bell_gpa(r), word(0, 3), 4)
        dq.doorbell()
        assert dq.pop() and dq.pop() is None
        r.poke(bell_gpa(r), word(0, 3 + QSIZE + 1), 4)
        dq.doorbell()
        assert dq.broken == EAVAIL
        dq.close()
        vq.close()


# ---- the experiment -------------------------------------------------------------


def test_compare_rows_and_variants():
    label, over = parse_row("shm+iodepth=16+nd=trust")
    assert over["notification_data"] == "trust"
    names = [v for v, _, _ in variants(["hold", "release", "prepare"], "trust")]
    assert names == ["hold", "release", "prepare", "release+lock", "prepare+lock",
                     "release+monotonic", "prepare+monotonic"]  # fmt: skip
    assert [v for v, _, _ in variants(["hold", "release"], "reread")] == ["hold", "release"]
    with pytest.raises(ConfigError):
        resolve(BASE, dict(notification_data="sometimes"))


def test_compare_notification_data_table(name, tmp_path):
    from virtio_py.compare import compare

    res = compare(
        rows=["shm+iodepth=2"],
        runtime=0.3,
        strategies=["hold", "release"],
        base={"workers": 2, "size": 64 << 20, "stripes": 2, "area": 1 << 20},
        name_prefix=f"{name}c",
        workdir=str(tmp_path),
        verbose=False,
        repeat=1,
        notification_data=True,
    )
    runs = {(r["row"], r["strategy"]) for r in res["runs"]}
    assert runs == {
        ("shm+iodepth=2+nd=trust", "hold"),
        ("shm+iodepth=2+nd=trust", "release"),
        ("shm+iodepth=2+nd=trust", "release+lock"),
        ("shm+iodepth=2+nd=trust", "release+monotonic"),
        ("shm+iodepth=2+nd=reread", "hold"),
        ("shm+iodepth=2+nd=reread", "release"),
    }
    text = format_tables(res)
    assert "Notification data" in text and "reordered/M" in text and "remedy cost" in text
    assert not [e for e in os.listdir("/dev/shm") if e.startswith(f"{name}c")]


@pytest.mark.parametrize(
    "run,prog,args",
    [
        (hostd, "virtio-hostd", ["start", "--mode", "poll", "--notification-data", "trust",
                                 "--size", "64M"]),
        (emu, "virtio-emu", ["compare", "--notification-data", "--poll", "--runtime", "1"]),
    ],
    ids=["virtio-hostd", "virtio-emu compare"],
)  # fmt: skip
def test_poll_mode_with_notification_data_is_one_line(name, tmp_path, run, prog, args):
    if run is hostd:
        args = args + ["--name", name, "--store", tmp_path / "store"]
    one_line_error(run(*args, timeout=60), prog, "never waits on a doorbell")
    assert not (tmp_path / "store").exists()
