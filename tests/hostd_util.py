"""Helpers of the tests that drive the two command lines: run virtio-hostd
and virtio-emu as a user would, check their one-line errors, look at a
daemon's status and processes, and build the reference image a striped
store must equal.

Every daemon a test starts through Daemons is stopped by the ``daemons``
fixture's teardown (conftest.py), also when the test failed; one that does
not stop is killed and its objects are unlinked, so nothing is left in
/dev/shm.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from virtio_py.proc import pid_alive
from virtio_py.region import Region, destroy

HOSTD = [sys.executable, "-m", "host_daemon"]
# The RFC's lockstat columns, as its table's header spells them: a renamed
# column fails the tests that look for them.
LOCKSTAT = tuple(
    "con-bounces contentions waittime-min waittime-max waittime-total "
    "acq-bounces acquisitions holdtime-min holdtime-max holdtime-total".split()
)
EMU = [sys.executable, "-m", "virtio_py"]
O_DIRECT = os.O_DIRECT


def hostd(*args, timeout=60, check=False):
    """Run ``python3 -m host_daemon ARGS``; the CompletedProcess (text)."""
    p = subprocess.run(
        HOSTD + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and p.returncode != 0:
        pytest.fail(
            f"virtio-hostd {' '.join(map(str, args))} failed ({p.returncode}):\n"
            f"{p.stdout}{p.stderr}"
        )
    return p


def emu(*args, timeout=120, env=None):
    """Run ``python3 -m virtio_py ARGS`` (in env, if given); the
    CompletedProcess (text)."""
    return subprocess.run(
        EMU + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def one_line_error(p, prog, word):
    """p failed with one line on stderr, from prog, saying error and word."""
    assert p.returncode not in (0, None), p.stdout + p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(prog) and "error" in lines[0] and word in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def daemon_pid(name):
    r = Region.attach(name)
    try:
        return r.daemon_pid
    finally:
        r.close()


def processes_with(text):
    """pids of live processes, other than this one, whose command line
    contains text."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read() and pid_alive(int(pid)):
                        found.append(int(pid))
            except OSError:
                pass
    return found


def shm_objects(name):
    """What /dev/shm holds of device name."""
    return sorted(e for e in os.listdir("/dev/shm") if e == name or e.startswith(f"sem.{name}."))


def status(name):
    p = hostd("status", "--name", name, "--json", check=True)
    return json.loads(p.stdout)


class Daemons:
    """Starts daemons through the CLI; teardown stops every one of them."""

    def __init__(self):
        self.names = []
        self.popens = []

    def start(self, name, store, *opts, size="8M", check=True):
        """Detached start; returns the CompletedProcess."""
        if name not in self.names:  # a restart: one stop at teardown is enough
            self.names.append(name)
        p = hostd("start", "--name", name, "--store", store, "--size", size, *opts)
        if check and p.returncode != 0:
            pytest.fail(f"start failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def foreground(self, name, store, *opts, size="8M"):
        """``start --foreground`` as a child; returns (Popen, lines before ready)."""
        self.names.append(name)
        p = subprocess.Popen(
            HOSTD
            + ["start", "--foreground", "--name", name, "--store", str(store), "--size", size]
            + [str(o) for o in opts],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        self.popens.append(p)
        lines = []
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if "ready:" in line:
                return p, lines
        p.wait(10)
        pytest.fail(f"foreground daemon did not get ready: {lines}")

    def cleanup(self):
        for p in self.popens:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            p.stdout.close()
        for name in self.names:
            if not os.path.exists(f"/dev/shm/{name}"):
                destroy(name)  # semaphores a killed daemon left
                continue
            try:
                pid = daemon_pid(name)
            except Exception:
                pid = 0
            p = hostd("stop", "--name", name, "--timeout", 20)
            if p.returncode != 0 and pid > 0 and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            destroy(name)


def raid0_stripes(image, stripes, chunk):
    """The stripe files' expected contents for a logical image, written out
    from the rule itself: chunk k lives in stripe k mod N at (k div N)*chunk."""
    nchunks = -(-len(image) // chunk)
    per = -(-nchunks // stripes) * chunk
    files = [bytearray(per) for _ in range(stripes)]
    for k in range(nchunks):
        piece = image[k * chunk : (k + 1) * chunk]
        at = (k // stripes) * chunk
        files[k % stripes][at : at + len(piece)] = piece
    return files


def fd_flags(pid, path):
    """open(2) flags of pid's descriptor of path (from /proc/PID/fdinfo)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("flags:"):
                            return int(line.split()[1], 8)
        except OSError:
            continue
    return None


def direct_works(directory):
    """Does this filesystem take O_DIRECT opens (tmpfs does since Linux 6.6)?"""
    path = os.path.join(directory, ".direct-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_DIRECT, 0o600)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
