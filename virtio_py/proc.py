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


__all__ = ["pid_alive", "proc_cpu_seconds", "set_pdeathsig"]
