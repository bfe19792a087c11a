"""The host daemon's data path, through the guest driver (BlockDevice):
random I/O reads back, lands in the stripe files where RAID-0 puts it,
assembles to the reference image (with holes where the disk is empty);
every request type and status; the config space; O_DIRECT and its fallback."""

import errno
import json
import os
import random
import struct

import pytest

import procs
from hostd_util import O_DIRECT, daemon_pid, direct_works, fd_flags, hostd, raid0_stripes, status
from virtio_py import BlockIOError, Region
from virtio_py._lowlevel import lib
from virtio_py.blk import T_DISCARD, T_IN, T_WRITE_ZEROES, BlockDevice

SECTOR = 512
OK, IOERR, UNSUPP = lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP


def _stripe_path(store, i):
    return os.path.join(store, f"stripe-{i:02d}.img")


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_random_io_reads_back_lands_raid0_and_assembles(where, name, tmp_path, daemons, shm_store):
    store = str(tmp_path / "store") if where == "disk" else shm_store
    stripes, chunk = 12, 16 << 10
    size = 12 * chunk * 24 + 5 * chunk + 3 * SECTOR  # no whole stripe row at the end
    p = daemons.start(name, store, "--stripes", stripes, "--chunk", "16K", size=str(size))
    pid = daemon_pid(name)

    # O_DIRECT where the filesystem takes it, else a one-line notice.
    flags = fd_flags(pid, _stripe_path(store, 0))
    assert flags is not None
    if direct_works(store):
        assert flags & O_DIRECT, "stripe files not opened with O_DIRECT"
        assert "O_DIRECT" not in p.stdout
    else:
        assert not flags & O_DIRECT
        notice = [ln for ln in p.stdout.splitlines() if "O_DIRECT" in ln]
        assert len(notice) == 1 and notice[0].startswith("virtio-hostd: notice:")

    ref = bytearray(size)
    rnd = random.Random(1234)
    crossings = 0
    with BlockDevice.attach(name) as dev:
        assert dev.capacity == size
        assert dev.get_id() == f"vpy-{name}".encode()[:20]
        writes = []
        for _ in range(160):
            n = rnd.randint(1, 3 * chunk // SECTOR) * SECTOR
            off = rnd.randrange(0, (size - n) // SECTOR + 1) * SECTOR
            crossings += off // chunk != (off + n - 1) // chunk
            data = rnd.randbytes(n)
            dev.write(off, data)
            ref[off : off + n] = data
            writes.append((off, n))
        # Big ones: across every stripe, and past one request's buffer.
        for off, n in ((chunk - SECTOR, 12 * chunk + 2 * SECTOR), (SECTOR, 3 << 20)):
            data = rnd.randbytes(n)
            dev.write(off, data)
            ref[off : off + n] = data
        assert crossings > 50
        for off, n in writes:
            assert dev.read(off, n) == bytes(ref[off : off + n]), f"{n} bytes at {off}"
        assert dev.read(0, size) == bytes(ref)
        dev.flush()

    # The stripe files hold each chunk where the RAID-0 rule puts it.
    expect = raid0_stripes(ref, stripes, chunk)
    for i in range(stripes):
        with open(_stripe_path(store, i), "rb") as f:
            got = f.read()
        assert len(got) == len(expect[i]), f"stripe {i} size"
        assert got == bytes(expect[i]), f"stripe {i} contents"
    assert not os.path.exists(_stripe_path(store, stripes))
    with open(os.path.join(store, "store.json")) as f:
        assert json.load(f) == {"stripes": stripes, "chunk": chunk, "size": size}

    # assemble equals the in-memory reference image.
    out = tmp_path / "disk.img"
    a = hostd("assemble", "--store", store, "--out", out, check=True)
    assert a.stdout.strip() == f"virtio-hostd: wrote {size} bytes to {out}"
    assert out.read_bytes() == bytes(ref)


def _counts(name, q=0):
    return status(name)["queues"][q]["requests"]


def test_request_types_and_statuses(name, tmp_path, daemons):
    serial = "ABCDEFGHIJKLMNOPQRST"  # exactly 20 bytes: no NUL
    size = 4 << 20
    daemons.start(
        name, tmp_path / "s", "--stripes", 3, "--chunk", "4K", "--serial", serial, size="4M"
    )
    want = dict.fromkeys(
        ("in", "out", "flush", "get_id", "discard", "write_zeroes", "unsupp", "ioerr"), 0
    )
    rnd = random.Random(5)
    with BlockDevice.attach(name) as dev:
        base = rnd.randbytes(256 << 10)
        dev.write(0, base)
        want["out"] += 1
        img = bytearray(base)

        dev.flush()
        want["flush"] += 1
        assert dev.get_id() == serial.encode()
        want["get_id"] += 1

        # DISCARD and WRITE_ZEROES (with and without UNMAP) read back as
        # zeros, across chunk and stripe boundaries, and nothing around them.
        for op, off, n in (
            ("discard", 4096 - 1024, 9 * 4096 + 512),
            ("wz", 100 << 10, 50 << 10),
            ("wz_unmap", 200 << 10, 13 * 4096),
        ):
            if op == "discard":
                dev.discard(off, n)
                want["discard"] += 1
            else:
                dev.write_zeroes(off, n, unmap=op == "wz_unmap")
                want["write_zeroes"] += 1
            img[off : off + n] = bytes(n)
        assert dev.read(0, len(img)) == bytes(img)
        want["in"] += 1

        # Other request types: UNSUPP, through the API of every request.
        for t in (2, 10, 14, 0x7FFFFFFF):
            st, used, _ = dev.raw_request(t)
            assert st == UNSUPP, f"type {t}"
            want["unsupp"] += 1
        # DISCARD may not ask for UNMAP (virtio 5.2.6.2): UNSUPP.
        st, _, _ = dev.raw_request(T_DISCARD, payload=struct.pack("<QII", 0, 8, 1))
        assert st == UNSUPP
        want["discard"] += 1

        # Past the capacity: IOERR, as a BlockIOError carrying the status.
        last = size - SECTOR
        assert dev.read(last, SECTOR) == bytes(SECTOR)  # the last sector: never written
        want["in"] += 1
        for what, call in (
            ("read at end", lambda: dev.read(size, SECTOR)),
            ("read across end", lambda: dev.read(last, 2 * SECTOR)),
            ("write across end", lambda: dev.write(last, bytes(1024))),
            ("discard across end", lambda: dev.discard(last, 1024)),
            ("write_zeroes past end", lambda: dev.write_zeroes(size, SECTOR)),
        ):
            with pytest.raises(BlockIOError) as ei:
                call()
            assert ei.value.status == IOERR, what
            assert "IOERR" in str(ei.value)
        want["in"] += 2
        want["out"] += 1
        want["discard"] += 1
        want["write_zeroes"] += 1
        want["ioerr"] += 5
        # Sector numbers that overflow a byte offset, odd lengths, bad flags.
        for t, sector, payload, nbytes in (
            (T_IN, 1 << 63, b"", 512),
            (T_IN, (1 << 64) - 1, b"", 512),
            (T_IN, 0, b"", 100),
            (T_WRITE_ZEROES, 0, struct.pack("<QII", 0, 1, 2), None),
            (T_DISCARD, 0, struct.pack("<QII", 1 << 60, 1, 0), None),
            (T_DISCARD, 0, bytes(8), None),
        ):
            st, used, _ = dev.raw_request(t, sector, payload, nbytes)
            assert st == IOERR, (t, sector, payload, nbytes)
            key = {T_IN: "in", T_WRITE_ZEROES: "write_zeroes", T_DISCARD: "discard"}[t]
            want[key] += 1
            want["ioerr"] += 1
        # Still serving.
        assert dev.read(0, 4096) == bytes(img[:4096])
        want["in"] += 1
    assert _counts(name) == want
    q = status(name)["queues"][0]
    assert not q["broken"] and q["inflight"] == 0
    assert q["bytes_written"] == 256 << 10


@pytest.mark.parametrize("queues,event_idx", [(1, True), (2, False)])
def test_config_space_and_features(queues, event_idx, name, tmp_path, daemons):
    daemons.start(
        name,
        tmp_path / "s",
        "--queues",
        queues,
        "--queue-size",
        64,
        "--event-idx" if event_idx else "--no-event-idx",
        size="6M",
    )
    r = Region.attach(name)
    try:
        h = r.header
        assert h.blk.capacity == (6 << 20) // SECTOR
        assert h.blk.blk_size == SECTOR
        assert h.blk.seg_max == 64 - 2
        assert h.blk.num_queues == queues == h.num_queues
        f = h.device_features
        for bit in (
            lib.VIRTIO_BLK_F_FLUSH,
            lib.VIRTIO_BLK_F_DISCARD,
            lib.VIRTIO_BLK_F_WRITE_ZEROES,
            lib.VIRTIO_BLK_F_BLK_SIZE,
            lib.VIRTIO_BLK_F_SEG_MAX,
        ):
            assert f >> bit & 1, bit
        assert bool(f >> lib.VIRTIO_BLK_F_MQ & 1) == (queues > 1)
        assert bool(f >> lib.VIRTIO_RING_F_EVENT_IDX & 1) == event_idx
        assert r.daemon_pid > 0
    finally:
        r.close()
    st = status(name)
    assert st["running"] and st["config"]["num_queues"] == queues
    assert ("MQ" in st["config"]["features"]) == (queues > 1)
    assert st["config"]["event_idx"] == event_idx
    # Every queue serves.
    for q in range(queues):
        with BlockDevice.attach(name, queue=q) as dev:
            dev.write(q * 4096, bytes([q + 1]) * 4096)
            assert dev.read(q * 4096, 4096) == bytes([q + 1]) * 4096


def _in_process_daemon_without_o_direct(name, store):
    """A HostDaemon in this (forked) process on a filesystem that refuses
    O_DIRECT: it falls back with one notice, serves, and status finds it."""
    import virtio_py.store as st
    from host_daemon import HostDaemon
    from host_daemon.status import device_status

    real_open = os.open

    def no_direct(path, flags, *a, **kw):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *a, **kw)

    st.os.open = no_direct
    try:
        with HostDaemon(name, store, 1 << 20, stripes=2, chunk=4096) as d:
            notices = list(d.notices)
            direct = d.store.direct
            with BlockDevice.attach(name) as dev:
                dev.write(4096 - 512, b"x" * 1024)
                data = dev.read(4096 - 512, 1024)
            running = device_status(name)["running"]
    finally:
        st.os.open = real_open
    return notices, direct, data, running


def test_o_direct_fallback_notice(name, tmp_path):
    notices, direct, data, running = procs.run(
        _in_process_daemon_without_o_direct, name, str(tmp_path / "s"), timeout=60
    )
    assert not direct
    assert len(notices) == 1 and "O_DIRECT" in notices[0] and "\n" not in notices[0]
    assert data == b"x" * 1024
    assert running, "status must see a daemon run in-process by another program"


def test_store_geometry_is_kept(name, tmp_path, daemons):
    store = tmp_path / "s"
    daemons.start(name, store, "--stripes", 3, "--chunk", "8K", size="3M")
    with BlockDevice.attach(name) as dev:
        dev.write(0, b"k" * (64 << 10))
    hostd("stop", "--name", name, check=True)
    # Same geometry, bigger disk: the data stays where it was.
    daemons.start(name, store, "--stripes", 3, "--chunk", "8K", size="6M")
    with BlockDevice.attach(name) as dev:
        assert dev.capacity == 6 << 20
        assert dev.read(0, 64 << 10) == b"k" * (64 << 10)
    hostd("stop", "--name", name, check=True)
    # Another geometry would scramble it: refused in one line.
    p = daemons.start(name, store, "--stripes", 4, "--chunk", "8K", size="6M", check=False)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and "stripes" in p.stderr


def test_assembled_image_keeps_holes(tmp_path):
    """The image of a mostly empty disk is sparse (a 100T store must not
    fill the disk), and reads the same."""
    from virtio_py.store import assemble

    store = tmp_path / "s"
    store.mkdir()
    chunk, size = 64 << 10, 64 << 20
    with open(store / "stripe-00.img", "wb") as f:
        f.truncate(size // 2)
        f.seek(chunk)
        f.write(b"hello")
    (store / "stripe-01.img").write_bytes(b"")  # all holes, and short
    out = tmp_path / "out.img"
    assert assemble(str(store), str(out), 2, chunk, size) == size
    data = out.read_bytes()
    assert len(data) == size
    assert data[2 * chunk : 2 * chunk + 5] == b"hello"  # chunk 2 is stripe 0's second
    assert data.count(0) == size - 5
    assert os.stat(out).st_blocks * 512 <= 4 * chunk
