"""Fixtures of the benchmarks (helpers in benchutil.py): an echo device in
its own process, regions for the lock benchmarks, and the guarantee that
nothing is left in /dev/shm.  Run: python3 -m pytest bench --benchmark-only
"""

import os

import pytest

# benchutil first: it sets OPENBLAS_NUM_THREADS before virtio_py loads numpy.
from benchutil import EchoDevice, is_ours, unique_name
from virtio_py import Region
from virtio_py.region import destroy


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Nothing the benchmarks create may remain in /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    yield
    left = sorted(e for e in set(os.listdir("/dev/shm")) - before if is_ours(e))
    assert not left, f"left behind in /dev/shm: {left}"


@pytest.fixture
def echo_device():
    """Factory: echo_device(mode=...) -> EchoDevice, closed after the test."""
    made = []

    def make(**kw):
        dev = EchoDevice(**kw)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.close()


@pytest.fixture
def lock_region():
    """Factory: lock_region(kind) -> a created Region whose queue locks are
    of that kind; closed and unlinked after the test."""
    made = []

    def make(kind):
        region = Region.create(unique_name("lock-" + kind), lock=kind, data_size=1 << 20)
        made.append(region)
        return region

    yield make
    for region in made:
        region.close()
        destroy(region.name)
