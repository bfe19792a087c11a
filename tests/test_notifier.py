"""Notifiers: a named POSIX semaphore and an eventfd behind one interface."""

import errno
import os
import select
import threading

import posix_ipc
import pytest

import procs
from procs import wait_for
from virtio_py import Notifier, Region, VirtioError
from virtio_py._lowlevel import lib


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
    assert n.wait(0.01) is False  # times out, no error
    n.post()
    assert n.wait(0.01) is True
    assert n.wait(0) is False
    for _ in range(5):
        n.post()
    assert n.wait(None) is True  # forever, but one is pending
    assert n.drain() == 4  # counted one by one, both kinds
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
        assert n.wait(30) is True  # blocks until the other process posts
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


def _asleep_in(stat, syscall, nr):
    """The task whose /proc files are stat and syscall sleeps in system call nr."""
    try:
        with open(stat) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(syscall) as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return state == "S" and first == str(nr)


def _poll_syscall():
    """The number of the system call libc's poll() makes, read off a child
    that can only be asleep in it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            p = select.poll()
            p.register(r, select.POLLIN)
            p.poll()
        finally:
            os._exit(0)
    try:

        def blocked():
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "S":
                    return None
            with open(f"/proc/{pid}/syscall") as f:
                return [int(f.read().split()[0])]

        return wait_for(blocked, "a child to sleep in poll()")[0]
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_eventfd_notifier_shared_by_threads_hands_out_each_count_once():
    """A device's I/O threads all wait on one kick.  With an eventfd, each
    count posted wakes one waiter asleep in poll(): none is kept aside where
    the others never see it (a lost wake-up), and no waiter woken with the
    others blocks in read() on a count another took."""
    poll_nr = _poll_syscall()
    fd = os.eventfd(0)  # blocking, as the tests' eventfds
    n = Notifier.open_eventfd(fd)
    threads = []
    try:
        for _ in range(10):
            got = []
            threads = [
                threading.Thread(
                    target=lambda got=got: got.append(
                        lib.vp_notifier_wait(n.handle, 30_000_000_000)
                    )
                )
                for _ in range(3)
            ]
            for t in threads:
                t.start()
            task = [f"/proc/self/task/{t.native_id}/" for t in threads]
            wait_for(
                lambda task=task: all(_asleep_in(p + "stat", p + "syscall", poll_nr) for p in task),
                "the three waiters to sleep in poll()",
            )
            os.eventfd_write(fd, 2)
            wait_for(lambda got=got: len(got) == 2, "two waiters to take the two counts", 10)
            assert got == [1, 1]
            assert n.drain() == 0
            os.eventfd_write(fd, 1)  # the third one's
            for t in threads:
                t.join(10)
            assert not any(t.is_alive() for t in threads)
            assert got == [1, 1, 1]
            assert n.drain() == 0
    finally:
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            os.eventfd_write(fd, stuck)  # let them go before the notifier is freed
        for t in threads:
            t.join(30)
        n.close()
        os.close(fd)
