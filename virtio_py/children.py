"""Child processes that a Ctrl-C neither loses nor leaves behind.

os.fork runs at-fork hooks in Python (logging's, multiprocessing's): a
SIGINT that arrives meanwhile raises KeyboardInterrupt inside a hook, where
Python prints "Exception ignored" and drops it, so the parent goes on as if
it had never been interrupted; and a child that takes the signal before it
set its own handling dies in its start-up code with a traceback.  Forking
with the stop signals blocked closes both windows: the parent takes a
signal that came meanwhile as soon as the fork is over, and the child
unblocks them once its dispositions are its own (``unblock_stop_signals``).

``spawn`` starts a program so (in a session of its own, so that a terminal's
Ctrl-C reaches us and we stop it in order; with a parent-death signal, so
that it does not outlive us); ``terminate`` stops it.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

from .proc import set_pdeathsig

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread for the body (a fork); one
    that came meanwhile is raised as the old mask comes back, after the
    body.  A child forked in the body starts with them blocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock_stop_signals(sigint: Any = signal.SIG_DFL) -> None:
    """In a child forked under stop_signals_blocked: SIGINT's disposition
    set to sigint and SIGTERM's to the default, then both unblocked (one
    pending is taken so).  Also before an exec: the mask survives it."""
    signal.signal(signal.SIGINT, sigint)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _exec_child(pdeathsig: int) -> None:
    set_pdeathsig(pdeathsig)
    unblock_stop_signals()


def spawn(cmd: list[str], stop_timeout: float = 10, **popen: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen(cmd, **popen) in a session of its own, with SIGTERM
    when we die, forked with the stop signals blocked.  A Ctrl-C during the
    fork is raised here once the child runs, and the child is terminated
    first (nobody else knows of it yet)."""
    p = None
    try:
        with stop_signals_blocked():
            p = subprocess.Popen(
                cmd,
                start_new_session=True,
                preexec_fn=functools.partial(_exec_child, signal.SIGTERM),
                **popen,
            )
    except BaseException:
        if p is not None:
            terminate(p, stop_timeout)
        raise
    return p


def terminate(p: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, wait up to timeout seconds, SIGKILL if it must; reaped."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def kill(p: subprocess.Popen[Any] | None) -> None:
    """SIGKILL, as a crash would end it, and reap; nothing if it has ended."""
    if p is not None and p.poll() is None:
        p.kill()
        p.wait()


__all__ = [
    "STOP_SIGNALS",
    "kill",
    "spawn",
    "stop_signals_blocked",
    "terminate",
    "unblock_stop_signals",
]
