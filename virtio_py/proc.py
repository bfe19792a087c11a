"""Processes: is one alive, its CPU time, and what a child gets when its parent dies."""

from __future__ import annotations

import ctypes
import os
import signal

from ._lowlevel import lib

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    """True if pid runs.  A zombie does not: nobody may reap an orphaned
    daemon (PID 1 need not), and a zombie serves nothing.  The same test the
    C core makes before it reclaims a guest slot."""
    return not lib.vp_pid_gone(int(pid))


def flock_holder(fd: int) -> int | None:
    """The pid holding an flock on fd's file (0 if it runs in a pid namespace
    we cannot see into), or None if no one does, from /proc/locks.  Asks
    without taking the lock, so it never makes a taker fail."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"; a
                # waiter's line has "->" in field 1 and is skipped.
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == want:
                    return max(int(fields[4]), 0)
    except (OSError, ValueError):
        pass
    return None


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Get sig when the parent dies (a worker left spinning on the lock helps
    nobody; a daemon is asked to clean up)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


__all__ = ["flock_holder", "pid_alive", "proc_cpu_seconds", "set_pdeathsig"]
