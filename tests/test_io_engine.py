"""The daemon's two ways of running disk requests -- io_uring (one thread
per queue, batched) and a thread per outstanding request -- give the same
answers, byte for byte and status for status; and a store on tmpfs served
through mapped stripe files reads and writes the same bytes as one served
by read and write calls."""

import os
import struct

import pytest

from conftest import SESSION
from hostd_util import emu, hostd
from mockring import MockRing
from procs import wait_for
from virtio_py import DeviceQueue, Region
from virtio_py._lowlevel import ffi, lib
from virtio_py.blk import T_IN, BlockDevice, BlockIOError
from virtio_py.device import BlockServer
from virtio_py.notifier import Notifier
from virtio_py.store import StripedStore, locate, stripe_path

STRIPES, CHUNK = 4, 4096
SIZE = 1 << 20
ENGINES = ("threads", "uring")


@pytest.fixture(scope="module")
def uring_works(tmp_path_factory):
    """Can this kernel run the io_uring engine (rings in our own memory)?
    Where it cannot, auto serves with threads.  Probed once."""
    st = StripedStore(str(tmp_path_factory.mktemp("probe")), SIZE, STRIPES, CHUNK, direct=False)
    try:
        with Region.create(f"{SESSION}-uring-probe", queue_size=8) as region:
            dq = DeviceQueue(region, 0)
            srv = BlockServer(st, [dq], io_threads=1, engine="auto")
            try:
                srv.start()
                return srv.engines() == ["uring"]
            finally:
                srv.close()
                dq.close()
    finally:
        st.close()


def _pattern(n, seed):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def _raw(store_dir, off, n):
    """n bytes of the logical disk at off, read from the stripe files."""
    out = bytearray()
    while n:
        s, foff = locate(off, STRIPES, CHUNK)
        k = min(n, CHUNK - off % CHUNK)
        with open(stripe_path(store_dir, s), "rb") as f:
            f.seek(foff)
            out += f.read(k).ljust(k, b"\0")
        off += k
        n -= k
    return bytes(out)


class Device:
    """A region, a store and a BlockServer in this process, and a guest."""

    def __init__(self, name, store_dir, engine, *, chunk=CHUNK, mapped=None):
        self.region = Region.create(name, queue_size=64, capacity=SIZE // 512)
        self.region.set_daemon_pid(os.getpid())
        self.dq = DeviceQueue(self.region, 0)
        self.store = StripedStore(store_dir, SIZE, STRIPES, chunk, direct=False, mapped=mapped)
        self.server = BlockServer(
            self.store, [self.dq], io_threads=4, engine=engine, serial="engine-test"
        )
        self.server.start()
        self.disk = BlockDevice.attach(name, timeout=10)

    def close(self):
        self.disk.close()
        self.server.close()
        self.store.close()
        self.dq.close()
        self.region.close()


@pytest.fixture
def device(name, tmp_path):
    made = []

    def make(engine, **kw):
        d = Device(f"{name}-{len(made)}", str(tmp_path / f"store{len(made)}"), engine, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_serves_the_queue_it_was_asked_for(device, engine, uring_works):
    if engine == "uring" and not uring_works:
        pytest.skip("this kernel cannot run the io_uring engine")
    d = device(engine)
    assert d.server.engines() == [engine]


def test_auto_is_io_uring_where_the_kernel_runs_it_else_threads(device, uring_works):
    d = device("auto")
    assert d.server.engines() == ["uring" if uring_works else "threads"]


@pytest.mark.parametrize("engine", ENGINES)
def test_writes_cut_across_chunks_land_where_raid0_puts_them(device, engine):
    d = device(engine)
    data = _pattern(5 * CHUNK + 1024, 3)
    d.disk.write(CHUNK - 512, data)  # starts 512 bytes before a chunk's end
    assert _raw(d.store.directory, CHUNK - 512, len(data)) == data
    assert d.disk.read(CHUNK - 512, len(data)) == data
    assert d.disk.read(0, 512) == bytes(512)  # untouched


@pytest.mark.parametrize("engine", ENGINES)
def test_a_request_cut_into_more_pieces_than_a_batch_takes_is_still_whole(device, engine):
    """512-byte chunks: a 64 KiB write is 128 pieces, more than the engine
    queues for one request; it runs inline, with the same result."""
    d = device(engine, chunk=512)
    data = _pattern(64 << 10, 5)
    d.disk.write(8192, data)
    assert d.disk.read(8192, len(data)) == data


@pytest.mark.parametrize("engine", ENGINES)
def test_every_request_type_answers_as_under_the_other_engine(device, engine):
    d = device(engine)
    d.disk.write(0, _pattern(8 * CHUNK, 1))
    d.disk.flush()
    assert d.disk.get_id() == b"engine-test"
    d.disk.discard(CHUNK, CHUNK)
    d.disk.write_zeroes(3 * CHUNK, 1024)
    want = bytearray(_pattern(8 * CHUNK, 1))
    want[CHUNK : 2 * CHUNK] = bytes(CHUNK)
    want[3 * CHUNK : 3 * CHUNK + 1024] = bytes(1024)
    assert d.disk.read(0, 8 * CHUNK) == bytes(want)
    # Past the end, and an unknown type: IOERR and UNSUPP, the queue serving on.
    with pytest.raises(BlockIOError) as e:
        d.disk.read(SIZE - 512, 1024)
    assert e.value.status == lib.VIRTIO_BLK_S_IOERR
    status, _, _ = d.disk.raw_request(99)
    assert status == lib.VIRTIO_BLK_S_UNSUPP
    assert d.disk.read(0, 512) == bytes(want[:512])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_read_of_a_stripe_file_cut_short_returns_zeros_past_its_end(device, engine):
    """A stripe file truncated under the device (a sparse end): a read past
    its end is zeros, as with the read calls, not an error."""
    d = device(engine)
    d.disk.write(0, _pattern(STRIPES * CHUNK * 2, 9))
    os.truncate(stripe_path(d.store.directory, 1), CHUNK)  # its second chunk gone
    got = d.disk.read(0, STRIPES * CHUNK * 2)
    want = bytearray(_pattern(STRIPES * CHUNK * 2, 9))
    k = STRIPES + 1  # logical chunk 5: stripe 1's second chunk
    want[k * CHUNK : (k + 1) * CHUNK] = bytes(CHUNK)
    assert got == bytes(want)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_mapped_store_on_tmpfs_moves_the_same_bytes_as_read_and_write_calls(name, shm_store):
    for mapped in (True, False):
        d = Device(f"{name}-m{int(mapped)}", f"{shm_store}/{int(mapped)}", "auto", mapped=mapped)
        try:
            assert d.store.mapped is mapped
            data = _pattern(3 * CHUNK + 512, 4)
            d.disk.write(CHUNK - 512, data)
            assert _raw(d.store.directory, CHUNK - 512, len(data)) == data
            assert d.disk.read(CHUNK - 512, len(data)) == data
            d.disk.discard(CHUNK, CHUNK)  # punched: the mapping reads zeros
            assert d.disk.read(CHUNK, CHUNK) == bytes(CHUNK)
            assert _raw(d.store.directory, CHUNK, CHUNK) == bytes(CHUNK)
        finally:
            d.close()


def test_mapped_store_reports_a_truncated_stripe_as_an_io_error(shm_store):
    """A stripe file truncated under a mapped store: the request that finds
    its bytes gone fails (EIO) instead of the process dying of SIGBUS."""
    fds = []
    try:
        for i in range(2):
            fd = os.open(os.path.join(shm_store, f"s{i}"), os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 64 << 10)
            fds.append(fd)
        err = ffi.new("int *")
        st = lib.vp_store_open_mapped(ffi.new("int[]", fds), 2, 4096, 128 << 10, err)
        assert err[0] == 0
        try:
            buf = ffi.new("uint8_t[]", 4096)
            assert lib.vp_store_rw(st, 1, 4096, buf, 4096) == 0
            os.ftruncate(fds[1], 0)
            assert lib.vp_store_rw(st, 0, 4096, buf, 4096) == -5  # EIO
            assert lib.vp_store_rw(st, 0, 0, buf, 4096) == 0  # stripe 0 still there
        finally:
            lib.vp_store_close(st)
    finally:
        for fd in fds:
            os.close(fd)


def test_raw_chain_with_header_split_over_descriptors_reads_under_io_uring(name, tmp_path):
    """The header over two descriptors and the data over three: the engine
    finds them in the streams as vp_blk_handle does."""
    with Region.create(name, queue_size=16, capacity=SIZE // 512, event_idx=False) as region:
        region.set_daemon_pid(os.getpid())
        dq = DeviceQueue(region, 0)
        store = StripedStore(str(tmp_path / "s"), SIZE, STRIPES, CHUNK, direct=False)
        srv = BlockServer(store, [dq], io_threads=2, engine="auto")
        kick = Notifier.open_sem(region.sem_name(0, "kick"))
        try:
            fd = os.open(stripe_path(store.directory, 0), os.O_RDWR)
            os.pwrite(fd, _pattern(CHUNK, 6), 0)
            os.close(fd)
            srv.start()
            m = MockRing.of_queue(region, 0, kick=kick)
            lo, _ = m.data
            m.mem.write(lo, struct.pack("<IIQ", T_IN, 0, 0))
            m.chain(
                [
                    (lo, 10, False),
                    (lo + 10, 6, False),
                    (lo + 4096, 1000, True),
                    (lo + 8192, 3096, True),
                    (lo + 16384, 1, True),
                ]
            )
            m.publish(0)
            wait_for(lambda: m.used_idx() == 1, "the used entry", 10)
            assert m.mem.read(lo + 16384, 1)[0] == lib.VIRTIO_BLK_S_OK
            assert m.used_elem(0)[1] == 4097
            got = m.mem.read(lo + 4096, 1000) + m.mem.read(lo + 8192, 3096)
            assert got == _pattern(CHUNK, 6)
        finally:
            srv.close()
            kick.close()
            store.close()
            dq.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_daemon_started_with_an_engine_serves_verified_writes(
    daemons, name, tmp_path, engine, uring_works
):
    """virtio-hostd start --io-engine: `virtio-emu run --verify` over it
    finds every block it wrote (either engine, or auto where io_uring
    cannot serve)."""
    if engine == "uring" and not uring_works:
        pytest.skip("this kernel cannot run the io_uring engine")
    daemons.start(name, str(tmp_path / "store"), "--io-engine", engine)
    p = emu(
        "run", "--name", name, "--workers", 2, "--rw", "randrw", "--iodepth", 4,
        "--size", "1M", "--verify", "--quiet",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr


def test_daemon_refuses_an_unknown_engine(name, tmp_path):
    p = hostd("start", "--name", name, "--store", str(tmp_path / "s"), "--io-engine", "aio")
    assert p.returncode != 0
    assert "--io-engine" in p.stderr
    assert not os.path.exists(f"/dev/shm/{name}")
