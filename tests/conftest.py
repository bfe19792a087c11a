import itertools
import os

import pytest

_counter = itertools.count()


def _shm_entries():
    return set(os.listdir("/dev/shm"))


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Nothing the tests create may remain in /dev/shm after the session."""
    before = _shm_entries()
    yield
    left = sorted(e for e in _shm_entries() - before if "vpt" in e)
    assert not left, f"left behind in /dev/shm: {left}"


@pytest.fixture
def name():
    """A device name unique to this test, recognisable as a test's (vpt)."""
    return f"vpt{os.getpid()}-{next(_counter)}"
