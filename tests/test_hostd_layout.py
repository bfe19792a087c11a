"""VIRTIO_F_VERSION_1 lets a driver lay a virtio-blk request over descriptors
any way it likes: the device finds the header in the first 16 readable bytes
and the status in the last writable byte, whatever the descriptor borders."""

import os
import struct

from procs import wait_for
from virtio_py import Region, Virtqueue
from virtio_py._lowlevel import lib
from virtio_py.blk import BlockDevice

SECTOR = 512


def _run(region, vq, out, in_, token):
    """Submit one chain by hand and poll the used ring for it."""
    vq.submit(out, in_, token, strategy="prepare")

    def reaped():
        with vq.lock:
            return vq.get_buf()

    return wait_for(reaped, "the device to answer", 20)


def test_header_data_and_status_split_any_way(name, tmp_path, daemons):
    daemons.start(name, str(tmp_path / "store"), size="8M")
    payload = os.urandom(4 * SECTOR)
    with BlockDevice.attach(name) as disk:
        disk.write(8 * SECTOR, payload)
    region = Region.attach(name)
    vq = Virtqueue(region, 0)
    try:
        q = region.queue_info(0)
        # Buffers in the last guest slot's share of the data area: no one else's.
        base = q["data"] + q["data_size"] - (256 << 10)
        hdr, data, tail = base, base + 4096, base + 64 * 1024

        # A read whose header is split 10 + 6 bytes over two descriptors and
        # whose data and status share one writable descriptor.
        blob = struct.pack("<IIQ", lib.VIRTIO_BLK_T_IN, 0, 8)
        region.write_data(hdr, blob[:10])
        region.write_data(hdr + 512, blob[10:])
        region.write_data(data + len(payload), b"\xff")
        tok, used = _run(region, vq, [(hdr, 10), (hdr + 512, 6)], [(data, len(payload) + 1)], 1)
        assert (tok, used) == (1, len(payload) + 1)
        assert region.read(data, len(payload)) == payload
        assert region.read(data + len(payload), 1) == bytes([lib.VIRTIO_BLK_S_OK])

        # A write whose header and data share one readable descriptor and
        # whose data crosses into a second one.
        new = os.urandom(2 * SECTOR)
        region.write_data(hdr, struct.pack("<IIQ", lib.VIRTIO_BLK_T_OUT, 0, 20) + new[:100])
        region.write_data(tail, new[100:])
        region.write_data(tail + 8192, b"\xff")
        tok, used = _run(
            region, vq, [(hdr, 16 + 100), (tail, len(new) - 100)], [(tail + 8192, 1)], 2
        )
        assert (tok, used) == (2, 1)
        assert region.read(tail + 8192, 1) == bytes([lib.VIRTIO_BLK_S_OK])

        # GET_ID answered into a buffer that also holds the status byte.
        region.write_data(hdr, struct.pack("<IIQ", lib.VIRTIO_BLK_T_GET_ID, 0, 0))
        tok, used = _run(region, vq, [(hdr, 16)], [(data, 21)], 3)
        assert (tok, used) == (3, 21)
        assert region.read(data + 20, 1) == bytes([lib.VIRTIO_BLK_S_OK])
        assert region.read(data, 20).rstrip(b"\0") == f"vpy-{name}"[:20].encode()

        # Data flowing the wrong way for the request type is an I/O error.
        region.write_data(hdr, struct.pack("<IIQ", lib.VIRTIO_BLK_T_IN, 0, 0) + bytes(512))
        tok, used = _run(region, vq, [(hdr, 16 + 512)], [(data, 513)], 4)
        assert region.read(data + 512, 1) == bytes([lib.VIRTIO_BLK_S_IOERR])
    finally:
        vq.close()
        region.close()
    with BlockDevice.attach(name) as disk:
        assert disk.read(20 * SECTOR, len(new)) == new
        assert disk.read(8 * SECTOR, len(payload)) == payload
