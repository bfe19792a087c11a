"""Where the processes run: a CPU list in taskset's syntax (``1``,
``0-1``, ``0,2-3``), checked against the CPUs this process may use, and
applied with sched_setaffinity.

Placing the device's threads and the guests' on CPUs of their own is how
a host runs a VM with an I/O thread (QEMU's iothread, a vhost worker): a
wake-up between the two then goes to a CPU that is not running the waker,
and neither side's threads preempt the other's."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import ConfigError


def allowed() -> frozenset[int]:
    """The CPUs this process may run on."""
    return frozenset(os.sched_getaffinity(0))


def format_cpus(cpus: Iterable[int]) -> str:
    """0,1,2,5 -> "0-2,5" (taskset's list)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c != run[-1] + 1:
            out.append(_run_text(run))
            run = []
        run.append(c)
    if run:
        out.append(_run_text(run))
    return ",".join(out)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list, every CPU one this process may use; ConfigError (one
    line) otherwise."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            first, last = 0, -1
        if first < 0 or last < first:
            raise ConfigError(f"not a CPU list (as 1, 0-1 or 0,2-3): {text!r}")
        cpus.update(range(first, last + 1))
    return check_cpus(cpus)


def check_cpus(cpus: Iterable[int]) -> frozenset[int]:
    """cpus as a set, or ConfigError unless it names CPUs this process
    may use (at least one)."""
    out = frozenset(cpus)
    ok = allowed()
    if not out:
        raise ConfigError("no CPU given")
    if not out <= ok:
        raise ConfigError(
            f"CPU {format_cpus(out - ok)} is not one this process may use ({format_cpus(ok)})"
        )
    return out


def pin(cpus: Iterable[int] | None) -> None:
    """Run the calling process (and the threads it starts from now on) on
    cpus; None: leave it where it is."""
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))


def split_for_device() -> tuple[frozenset[int], frozenset[int]] | None:
    """(device CPUs, guest CPUs) that give each side CPUs of its own: the
    last allowed CPU for the device, the rest for the guests; None on a
    single CPU."""
    ok = sorted(allowed())
    if len(ok) < 2:
        return None
    return frozenset(ok[-1:]), frozenset(ok[:-1])


__all__ = ["allowed", "check_cpus", "format_cpus", "parse_cpus", "pin", "split_for_device"]
