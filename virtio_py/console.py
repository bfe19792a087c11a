"""What a long run shows on a terminal, and how it stops: one progress line
that rewrites itself, and SIGTERM unwinding like Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import IO, Any


class Progress:
    """progress(label, elapsed, runtime, ios) draws one line on a terminal
    (nothing on a pipe); note() prints a line above it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.dirty = False

    def __call__(self, label: str, elapsed: float, runtime: float | None, ios: int) -> None:
        if not self.tty or elapsed < 1.0:
            return
        total = f"/{runtime:.0f}" if runtime else ""
        self.stream.write(
            f"\r  {label:<32} {elapsed:5.1f}{total} s  {ios:>10,} requests "
            f"{ios / max(elapsed, 1e-9):>9,.0f}/s "
        )
        self.stream.flush()
        self.dirty = True

    def note(self, text: str) -> None:
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.dirty:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
            self.dirty = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every finally runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
