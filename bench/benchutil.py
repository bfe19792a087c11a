"""Helpers of the benchmarks: an echo device in its own process, a pool of
lock-hammering processes, and rate reporting.

Every benchmark runs a fixed number of rounds (benchmark.pedantic) so the
whole suite stays within a few minutes, and reports its rate in
benchmark.extra_info (see ``report_rate``).
"""

import contextlib
import functools
import os

# numpy (imported by virtio_py's workloads) starts OpenBLAS worker threads in this
# process; on a two-core machine they take CPU from the two processes being
# measured (measured: 30-40% off the batched rate).  Must precede the import.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import itertools  # noqa: E402
import mmap  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from virtio_py import DeviceQueue, Region, SharedLock, Virtqueue  # noqa: E402
from virtio_py.compare import write_json  # noqa: E402
from virtio_py.proc import set_pdeathsig  # noqa: E402
from virtio_py.region import destroy  # noqa: E402
from virtio_py.startline import StartLine  # noqa: E402

PREFIX = "vpb"
_counter = itertools.count()


def unique_name(tag):
    return f"{PREFIX}{os.getpid()}-{tag}-{next(_counter)}"


def is_ours(entry):
    """Is this /dev/shm entry one of this process's benchmark objects?"""
    mine = f"{PREFIX}{os.getpid()}-"
    return entry.startswith(mine) or entry.startswith("sem." + mine)


def report_rate(benchmark, key, per_call, **extra):
    """Record per_call/median seconds as extra_info[key] (and per_call/min as
    key_best); returns the median rate."""
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return None
    st = benchmark.stats.stats
    rate = per_call / st.median
    benchmark.extra_info[key] = round(rate)
    benchmark.extra_info[key + "_best"] = round(per_call / st.min)
    benchmark.extra_info[key + "_mean"] = round(per_call / st.mean)
    benchmark.extra_info.update(extra)
    return rate


# ---------------------------------------------------------------- processes


def _read_exact(fd, n, timeout, what):
    """n bytes from a pipe within timeout seconds, or RuntimeError."""
    buf = b""
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"{what}: no answer within {timeout} s")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise RuntimeError(f"{what}: the process died")
        buf += chunk
    return buf


def _reap(pid, timeout):
    """Wait for pid; SIGKILL it if it overstays.  Returns its wait status."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


def _child(body):
    """Run body() in a forked child and leave without running the parent's
    cleanup (pytest's, atexit): os._exit whatever happens."""
    code = 0
    try:
        set_pdeathsig(signal.SIGKILL)  # a polling device must not outlive a killed pytest
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


class EchoDevice:
    """A device process running DeviceQueue.echo_serve in C, and the driver's
    attached Region and Virtqueue in this process.

    The device process creates (and on exit unlinks) the region; this side
    also destroys every object of the name afterwards in case the device died.
    cpus, if given, pins the device process to that set of CPUs.
    """

    def __init__(
        self, mode="poll", queue_size=256, lock="spin", exit="async", event_idx=True, cpus=None
    ):
        self.mode = mode
        self.name = unique_name(mode)
        self.region = self.vq = None
        # The stop word lives in anonymous shared memory, shared by fork.
        self._stop = mmap.mmap(-1, mmap.PAGESIZE)
        rfd, wfd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(rfd)
            _child(lambda: self._serve(wfd, queue_size, lock, exit, event_idx, cpus))
        os.close(wfd)
        try:
            msg = _read_exact(rfd, 1, 10, "echo device start")
            if msg != b"k":
                raise RuntimeError("echo device failed to start")
            self.region = Region.attach(self.name)
            self.vq = Virtqueue(self.region)
            self.data = self.region.queue_info(0)["data"]
        except BaseException:
            self.close()
            raise
        finally:
            os.close(rfd)

    def _serve(self, wfd, queue_size, lock, exit, event_idx, cpus):
        if cpus:
            os.sched_setaffinity(0, cpus)
        region = Region.create(
            self.name,
            queue_size=queue_size,
            mode=self.mode,
            lock=lock,
            exit=exit,
            event_idx=event_idx,
        )
        try:
            region.set_daemon_pid(os.getpid())
            with DeviceQueue(region) as dq:
                os.write(wfd, b"k")
                os.close(wfd)
                dq.echo_serve(-1, poll=self.mode == "poll", stop=self._stop)
        finally:
            region.close()

    def close(self):
        if self.vq is not None:
            self.vq.close()
            self.vq = None
        if self.region is not None:
            self.region.close()
            self.region = None
        if self.pid:
            self._stop[:4] = struct.pack("<i", 1)
            status, self.pid = _reap(self.pid, 10), 0
            destroy(self.name)
            if status:
                raise RuntimeError(f"echo device exited with status {status:#x}")
        destroy(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LockCrowd:
    """nproc processes attached to one region, pinned round robin to this
    process's CPUs, each taking and dropping queue 0's lock n times per round
    (vp_lock_hammer, in C).

    The start line is a barrier on a word of shared memory (vp_bench_arrive
    and vp_bench_wait, in C) with this process as the last party: arm(n)
    sends every worker to the line and waits until all are there; release()
    lets them go and returns once every worker is done.  So a round times
    nproc*n acquisitions by processes that really overlap.  Use arm as
    pedantic's untimed setup and release as its target.

    (Processes woken by a notifier or a lock straggle in over a millisecond
    and, unpinned, tend to be queued on the waker's CPU: short runs then go
    one after another and never contend.)"""

    def __init__(self, region, nproc):
        self.region = region
        self.nproc = nproc
        self.line = StartLine()
        self.target = 0  # the line's value that starts this round
        self.pids, self.go, self.done = [], [], []
        try:
            cpus = sorted(os.sched_getaffinity(0))
            for i in range(nproc):
                cpu = cpus[i % len(cpus)]
                go_r, go_w = os.pipe()
                done_r, done_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    for fd in self.go + self.done + [go_w, done_r]:
                        os.close(fd)  # the parent's ends, the siblings' pipes
                    _child(functools.partial(self._work, go_r, done_w, cpu))
                os.close(go_r)
                os.close(done_w)
                self.pids.append(pid)
                self.go.append(go_w)
                self.done.append(done_r)
            for fd in self.done:
                _read_exact(fd, 1, 10, "lock worker start")
        except BaseException:
            self.close()
            raise

    def _work(self, go_r, done_w, cpu):
        os.sched_setaffinity(0, {cpu})
        region = Region.attach(self.region.name)
        try:
            lock = SharedLock.of_queue(region, 0)
            os.write(done_w, b"r")
            while True:
                msg = os.read(go_r, 16)
                if len(msg) != 16:
                    return
                n, target = struct.unpack("qq", msg)
                if n < 0:
                    return
                self.line.arrive()
                self.line.wait(target)
                lock.hammer(n)
                os.write(done_w, b"d")
        finally:
            region.close()

    def arm(self, n):
        """Send every worker to the start line for a round of n; return
        when they are all there."""
        self.target += self.nproc + 1
        msg = struct.pack("qq", n, self.target)
        for fd in self.go:
            os.write(fd, msg)
        deadline = time.monotonic() + 30
        while self.line.value != self.target - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("lock workers did not reach the start line")
            time.sleep(0.0005)

    def release(self, timeout=120):
        """Start them all; return when every worker has done its n."""
        self.line.arrive()
        for fd in self.done:
            _read_exact(fd, 1, timeout, "lock worker round")

    def close(self):
        if self.line.value == self.target - 1:
            self.line.arrive()  # armed, never released
        for fd in self.go:
            try:
                os.write(fd, struct.pack("qq", -1, 0))
            except OSError:
                pass
            os.close(fd)
        for fd in self.done:
            os.close(fd)
        for pid in self.pids:
            _reap(pid, 10)
        self.pids, self.go, self.done = [], [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def print_report(request, text):
    """Print a session's summary past pytest's output capture."""
    if not text:
        return
    cap = request.config.pluginmanager.getplugin("capturemanager")
    with cap.global_and_fixture_disabled() if cap else contextlib.nullcontext():
        print(text, flush=True)


def save_results(filename, obj):
    """Write a benchmark's figures as JSON to .benchmarks/FILENAME (beside
    pytest-benchmark's own); a read-only tree only loses the file."""
    out = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), os.pardir, ".benchmarks", filename
    )
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_json(obj, out)
    except OSError:
        pass
