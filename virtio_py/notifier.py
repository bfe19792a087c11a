"""Notifiers: a named POSIX semaphore (default) or an eventfd behind one interface."""

from __future__ import annotations

from typing import Any

from ._lowlevel import check, lib, opened
from ._resource import Closeable


class Notifier(Closeable):
    """One direction of notification: post() on one side, wait() on the other."""

    def __init__(self, handle: Any, label: str) -> None:
        self._h = handle
        self.label = label

    @classmethod
    def open_sem(cls, name: str) -> Notifier:
        """Open a semaphore created (and later unlinked) by the device's owner."""
        return cls(opened(lib.vp_notifier_open_sem, name.encode(), what=name), name)

    @classmethod
    def open_eventfd(cls, fd: int) -> Notifier:
        """Wrap an eventfd (the notifier keeps its own duplicate of fd)."""
        return cls(opened(lib.vp_notifier_open_eventfd, fd, what="eventfd"), f"eventfd:{fd}")

    @property
    def handle(self) -> Any:
        if self._h is None:
            raise ValueError(f"notifier {self.label} is closed")
        return self._h

    def post(self) -> None:
        check(lib.vp_notifier_post(self.handle), self.label)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for one notification; False on timeout (seconds, None = forever)."""
        ns = -1 if timeout is None else int(timeout * 1e9)
        return bool(check(lib.vp_notifier_wait(self.handle, ns), self.label))

    def drain(self) -> int:
        """Take every pending notification without sleeping; how many there were."""
        return check(lib.vp_notifier_drain(self.handle), self.label)

    def close(self) -> None:
        if self._h is not None:
            lib.vp_notifier_close(self._h)
            self._h = None
