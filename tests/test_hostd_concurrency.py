"""Both serving modes and both exit modes, with several guest processes
sharing the daemon's queues at once: every byte reads back, the store
assembles to the reference, and the counters add up."""

import random

import pytest

import procs
from hostd_util import hostd, status
from virtio_py.blk import BlockDevice

WORKERS = 4
AREA = 512 << 10  # each worker's own part of the disk
SHARED = 256 << 10  # written first, then read by everyone
CHUNK = 8 << 10
SECTOR = 512


def _guest(name, queue, idx, shared_seed, rounds):
    """Random writes of random sizes in our area (across chunks and
    stripes), interleaved with reads of the shared area; then read back
    the whole area.  Returns (area image, requests by type)."""
    rnd = random.Random(1000 + idx)
    shared = random.Random(shared_seed).randbytes(SHARED)
    base = SHARED + idx * AREA
    img = bytearray(AREA)
    counts = {"in": 0, "out": 0}
    with BlockDevice.attach(name, queue=queue) as dev:
        for _ in range(rounds):
            n = rnd.randint(1, 4 * CHUNK // SECTOR) * SECTOR
            off = rnd.randrange(0, (AREA - n) // SECTOR + 1) * SECTOR
            data = rnd.randbytes(n)
            dev.write(base + off, data)
            img[off : off + n] = data
            counts["out"] += 1
            n = rnd.randint(1, 16) * SECTOR
            off = rnd.randrange(0, (SHARED - n) // SECTOR + 1) * SECTOR
            assert dev.read(off, n) == shared[off : off + n], f"shared read at {off}"
            counts["in"] += 1
        got = dev.read(base, AREA)
        counts["in"] += 1
        assert got == bytes(img), "own area"
    return bytes(img), counts


CASES = [
    # mode,   exit,    lock,        event_idx, queues, store
    ("notify", "async", "mutex", True, 1, "shm"),
    ("notify", "sync", "spinyield", False, 2, "disk"),
    ("poll", "async", "spinyield", True, 2, "disk"),
    ("poll", "sync", "mutex", False, 1, "disk"),
]


@pytest.mark.parametrize(
    "mode,exit,lock,event_idx,queues,where",
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{'evidx' if c[3] else 'flags'}-q{c[4]}-{c[5]}" for c in CASES],
)
def test_guests_at_once(
    mode, exit, lock, event_idx, queues, where, name, tmp_path, daemons, shm_store
):
    store = shm_store if where == "shm" else str(tmp_path / "s")
    size = SHARED + WORKERS * AREA
    daemons.start(
        name,
        store,
        "--mode",
        mode,
        "--exit",
        exit,
        "--lock",
        lock,
        "--event-idx" if event_idx else "--no-event-idx",
        "--queues",
        queues,
        "--stripes",
        5,
        "--chunk",
        "8K",
        "--queue-size",
        32,
        size=str(size),
    )
    shared = random.Random(7).randbytes(SHARED)
    with BlockDevice.attach(name) as dev:
        dev.write(0, shared)
    with procs.Children() as kids:
        ks = [kids.start(_guest, name, i % queues, i, 7, 60) for i in range(WORKERS)]
        results = [k.join(120) for k in ks]
    image = shared + b"".join(img for img, _ in results)

    out = tmp_path / "img"
    hostd("assemble", "--store", store, "--out", out, check=True)
    assert out.read_bytes() == image

    st = status(name)
    assert st["running"] and not st["needs_reset"]
    total_in = sum(c["in"] for _, c in results)
    total_out = sum(c["out"] for _, c in results) + 1
    assert sum(q["requests"]["in"] for q in st["queues"]) == total_in
    assert sum(q["requests"]["out"] for q in st["queues"]) == total_out
    for q in st["queues"]:
        assert not q["broken"] and q["inflight"] == 0
        assert q["requests"]["ioerr"] == 0
        assert q["avail_idx"] == q["used_idx"] == q["last_avail_idx"]
        assert q["lock"]["acquisitions"] > 0
        if exit == "sync":
            # every kick the guests sent was taken (and acknowledged)
            assert q["kicks_taken"] == q["guest_kicks"]
    assert st["config"]["mode"] == mode and st["config"]["exit"] == exit


@pytest.mark.parametrize(
    "mode,exit,where",
    [("notify", "sync", "disk"), ("poll", "async", "shm"), ("notify", "async", "disk")],
)
def test_deep_queues_verified(mode, exit, where, name, tmp_path, daemons, shm_store):
    """4 workers with 8 requests in flight each (the workload's C loop):
    a stamped write pass, then random reads that check every stamp."""
    from virtio_py.workload import JobSpec, run_job

    store = shm_store if where == "shm" else str(tmp_path / "s")
    area = 1536 << 10
    daemons.start(
        name,
        store,
        "--mode",
        mode,
        "--exit",
        exit,
        "--lock",
        "spinyield",
        "--stripes",
        5,
        "--chunk",
        "8K",
        "--queue-size",
        128,
        size=str(WORKERS * area),
    )
    common = dict(
        workers=WORKERS,
        bs=12 << 10,
        iodepth=8,
        size=area,
        verify=True,
        strategy="prepare",
        timeout=30.0,
    )
    w = run_job(JobSpec(name, rw="write", **common))
    r = run_job(JobSpec(name, rw="randread", **common))
    for res in (w, r):
        assert res["errors"] == 0 and res["dup_completions"] == 0
        assert res["requests_added"] == res["requests_completed"] == res["ios"]
    assert w["ios"] == WORKERS * (area // (12 << 10))
    assert r["verify"]["failures"] == 0 and r["verify"]["unwritten"] == 0
    assert r["verify"]["verified"] == r["ios"] > 0
    st = status(name)
    q = st["queues"][0]
    assert not q["broken"] and q["inflight"] == 0
    assert q["requests"]["out"] == w["ios"] and q["requests"]["in"] == r["ios"]
