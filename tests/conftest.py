import itertools
import os
import uuid

import pytest

# /dev/shm is shared with other sessions (other pid namespaces too): names
# carry a random part, and the leftover check looks only at this session's.
SESSION = os.environ.setdefault("VIRTIO_PY_TEST_SESSION", f"vpt{uuid.uuid4().hex[:8]}")
_counter = itertools.count()


def _ours():
    return {e for e in os.listdir("/dev/shm") if SESSION in e}


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Nothing the tests create may remain in /dev/shm after the session."""
    before = _ours()
    yield
    left = sorted(_ours() - before)
    assert not left, f"left behind in /dev/shm: {left}"


@pytest.fixture
def name():
    """A device name unique to this test, recognisable as this session's."""
    return f"{SESSION}-{next(_counter)}"
