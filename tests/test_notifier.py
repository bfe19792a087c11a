"""Notifiers: a named POSIX semaphore and an eventfd behind one interface."""
import errno
import os

import posix_ipc
import pytest

import procs
from virtio_py import Notifier, Region, VirtioError


@pytest.fixture
def sem_notifier(name):
    """A semaphore notifier on a device's kick semaphore."""
    with Region.create(name, queue_size=8, data_size=1 << 16) as r:
        n = Notifier.open_sem(r.sem_name(0, "kick"))
        try:
            yield n, r
        finally:
            n.close()


@pytest.fixture
def efd():
    fd = os.eventfd(0)
    try:
        yield fd
    finally:
        os.close(fd)


def exercise(n):
    """What both kinds must do alike."""
    assert n.drain() == 0
    assert n.wait(0) is False
    assert n.wait(0.01) is False          # times out, no error
    n.post()
    assert n.wait(0.01) is True
    assert n.wait(0) is False
    for _ in range(5):
        n.post()
    assert n.wait(None) is True           # forever, but one is pending
    assert n.drain() == 4                 # counted one by one, both kinds
    assert n.drain() == 0
    assert n.wait(0.01) is False


def test_semaphore_post_wait_drain(sem_notifier):
    exercise(sem_notifier[0])


def test_eventfd_post_wait_drain(efd):
    with Notifier.open_eventfd(efd) as n:
        exercise(n)


def test_eventfd_shares_the_counter(efd):
    """The notifier keeps a duplicate of fd: the same eventfd object."""
    with Notifier.open_eventfd(efd) as n:
        os.eventfd_write(efd, 3)
        assert n.wait(0) is True
        assert n.drain() == 2
        n.post()
        n.post()
        assert os.eventfd_read(efd) == 2
        assert n.wait(0) is False
    # Closing the notifier leaves the caller's fd open.
    os.eventfd_write(efd, 1)
    assert os.eventfd_read(efd) == 1


def test_semaphore_shared_by_name(sem_notifier):
    """Two notifiers opened by one name are one semaphore, as a driver's
    and a device's are; posix_ipc sees the same count."""
    n, r = sem_notifier
    with Notifier.open_sem(r.sem_name(0, "kick")) as other:
        other.post()
        other.post()
        assert n.wait(0) is True
        assert posix_ipc.Semaphore(r.sem_name(0, "kick")).value == 1
        assert n.drain() == 1
        # Each role of each queue is its own semaphore.
        with Notifier.open_sem(r.sem_name(0, "call")) as call:
            call.post()
            assert n.wait(0) is False
            assert call.wait(0) is True


def _poster(sem, count):
    n = Notifier.open_sem(sem)
    for _ in range(count):
        n.post()
    n.close()
    return count


def _efd_poster(fd, count):
    with Notifier.open_eventfd(fd) as n:
        for _ in range(count):
            n.post()
    return count


def _take_all_posts(n, kid, count):
    """Take count posts from another process: nothing is lost or doubled."""
    taken = 0
    while taken < count:
        assert n.wait(30) is True      # blocks until the other process posts
        taken += 1 + n.drain()
    assert kid.join(timeout=60) == count
    assert taken == count
    assert n.wait(0) is False


def test_semaphore_across_processes(sem_notifier):
    n, r = sem_notifier
    _take_all_posts(n, procs.Child(_poster, r.sem_name(0, "kick"), 1000), 1000)


def test_eventfd_across_processes(efd):
    with Notifier.open_eventfd(efd) as n:
        _take_all_posts(n, procs.Child(_efd_poster, efd, 1000), 1000)


def test_open_errors(name):
    with pytest.raises(VirtioError) as e:
        Notifier.open_sem(f"/{name}.missing")
    assert e.value.code == errno.ENOENT
    with pytest.raises(VirtioError) as e:
        Notifier.open_eventfd(10_000)
    assert e.value.code == errno.EBADF


def test_closed_notifier(efd):
    n = Notifier.open_eventfd(efd)
    n.close()
    n.close()
    with pytest.raises(ValueError):
        n.post()
