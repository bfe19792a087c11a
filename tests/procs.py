"""Run test code in forked processes and get its result back; wait for
concurrent test code to reach a point without guessing a delay; Ctrl-C a
command line and check that it stopped as an interrupted command should.

A child reports through a pipe (pickled) and always leaves with os._exit, so
it never runs pytest's teardown or a Region's finaliser (which would unlink
the parent's objects).  A child that dies by a signal, e.g. SIGSEGV on a
guard page, is a test failure of its own.
"""

import os
import pickle
import select
import signal
import subprocess
import time
import traceback

import pytest

from hostd_util import processes_with
from virtio_py._lowlevel import ffi
from virtio_py.errors import VirtioError
from virtio_py.region import Region
from virtio_py.views import used_ring


class Child:
    def __init__(self, fn, *args, **kwargs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                res = ("ok", fn(*args, **kwargs))
            except BaseException as e:  # report everything, never unwind into pytest
                res = (
                    "exc",
                    f"{type(e).__name__}: {e}",
                    traceback.format_exc(),
                    type(e).__name__,
                    getattr(e, "code", None),
                )
            try:
                data = pickle.dumps(res)
            except Exception as e:
                data = pickle.dumps(("exc", f"unpicklable result: {e!r}", "", "", None))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view) :]
            finally:
                os._exit(0)
        os.close(w)
        self.pid = pid
        self._fd = r
        self._data = bytearray()
        self._result = None
        self.status = None

    def _pump(self, wait):
        """Read what the child sent; True once it has closed its end."""
        if self._fd is None:
            return True
        ready, _, _ = select.select([self._fd], [], [], wait)
        if ready:
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                os.close(self._fd)
                self._fd = None
                return True
            self._data += chunk
        return False

    def join(self, timeout=120, watch=()):
        """The child's return value; fails the test if it raised, died or hung.

        Children in watch are checked meanwhile: one that ends early (e.g. the
        device of a driver being joined) is joined at once, so its failure is
        reported instead of a timeout.
        """
        if self.status is not None:
            return self._result
        deadline = time.monotonic() + timeout
        while not self._pump(0.05):
            for other in watch:
                if other is not self and other.status is None and other._pump(0):
                    other.join(1)
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"child {self.pid} did not finish within {timeout} s")
        _, status = os.waitpid(self.pid, 0)
        self.status = status
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            pytest.fail(f"child {self.pid} killed by {signal.Signals(sig).name}")
        assert os.WEXITSTATUS(status) == 0
        res = pickle.loads(bytes(self._data))
        if res[0] == "exc":
            pytest.fail(f"child {self.pid} raised {res[1]}\n{res[2]}")
        self._result = res[1]
        return self._result

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, self.status = os.waitpid(self.pid, 0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def fork_call(fn):
    """Fork a child that runs fn() and exits: 0 when it returns, 1 when it
    raises (the traceback on stderr); the caller waits for the pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def run(fn, *args, timeout=120, **kwargs):
    return Child(fn, *args, **kwargs).join(timeout)


class Children:
    """Several children joined together; any still running at exit is killed."""

    def __init__(self):
        self.kids = []

    def start(self, fn, *args, **kwargs):
        c = Child(fn, *args, **kwargs)
        self.kids.append(c)
        return c

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for c in self.kids:
            c.kill()


def wait_for(cond, what, timeout=30):
    """Poll cond until it returns something true, and return that; fail (not
    hang) if it never does.  what names the awaited event in the failure."""
    end = time.monotonic() + timeout
    pause = 0.001
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def interrupt_cli(cmd, running, gone, *, group=False, what="it to run", timeout=120):
    """Ctrl-C a command line while it works: start cmd in a session of its
    own, wait until running() is true (cmd must not end meanwhile), send
    SIGINT to cmd alone or, with group, to its whole process group (a
    terminal's Ctrl-C), then check it as assert_interrupted does.  Returns
    its stderr."""
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:

        def ready():
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"exited ({p.returncode}) before {what}:\n{out}{err}")
            return running()

        wait_for(ready, what, timeout)
        if group:
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            pytest.fail(f"still running {timeout} s after SIGINT; its stderr:\n{err}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert_interrupted(p.returncode, err, gone)
    return err


def assert_interrupted(returncode, err, gone, timeout=30):
    """A command line stopped by Ctrl-C: exit status 130, "interrupted" and
    no traceback on stderr, and gone() (nothing of it left: shared memory,
    processes, files) true soon after (the kernel reaps its last children)."""
    assert returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    wait_for(gone, "its objects and processes to go", timeout)


def prefixed(prefix):
    """/dev/shm entries and live processes (by command line) that carry
    prefix: what a command run with a name prefix left, or still runs."""
    return [e for e in os.listdir("/dev/shm") if prefix in e], processes_with(prefix)


def compare_serving(prefix, workers=4):
    """The device ``virtio-emu compare --name-prefix prefix`` runs its
    workers on, once they all run (compare, its daemon or back-end and the
    workers carry the prefix), else None."""
    shm, pids = prefixed(prefix)
    devs = [e for e in shm if e.startswith(prefix) and "store" not in e]
    return devs[0] if devs and len(pids) >= workers + 2 else None


def interrupt_compare(cmd, prefix, group=False):
    """interrupt_cli on ``virtio-emu compare --name-prefix prefix`` (cmd)
    once its workers' requests complete; nothing carrying prefix may be
    left after."""
    return interrupt_cli(
        cmd,
        used_idx_moves(lambda: compare_serving(prefix)),
        lambda: prefixed(prefix) == ([], []),
        group=group,
        what="compare's workers' requests to complete",
    )


def used_idx_moves(find):
    """A condition for wait_for: true once requests complete on the device
    that find() names (None until it is there and serving): its queue 0's
    used index moves on from the first value read."""
    first = []

    def moved():
        name = find()
        if name is None:
            return False
        try:
            region = Region.attach(name)
        except VirtioError:
            return False  # gone already; the caller's own checks say why
        try:
            idx = int(used_ring(region)["idx"])
        finally:
            region.close()
        first[:] = first or [idx]
        return idx != first[0]

    return moved


# The ticket and futex words of struct vp_lock, at the offsets region.h gives
# them.  They are not part of the Python interface; tests read them to know,
# without guessing a delay, that a waiter is queued on the lock.
LOCK_NEXT, LOCK_OWNER, LOCK_FUTEX = 8, 12, 16


def lock_waiter_queued(region, q=0):
    """True once some thread or process waits for queue q's lock (held by
    someone else): the futex word says "contended", or a ticket is out
    beyond the holder's."""
    gpa = region.queue_info(q)["shared"] + ffi.offsetof("struct vp_queue_shared", "lock")
    raw = region.read(gpa, 20)

    def word(off):
        return int.from_bytes(raw[off : off + 4], "little")

    if region.lock_kind == "mutex":
        return bool(word(LOCK_FUTEX) & 0x80000000)  # VP_MUTEX_WAITERS
    return (word(LOCK_NEXT) - word(LOCK_OWNER)) & 0xFFFFFFFF >= 2
