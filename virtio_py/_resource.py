"""The one way our handles end: close() on leaving a with block, and when
the object is collected."""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T", bound="Closeable")


class Closeable:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
