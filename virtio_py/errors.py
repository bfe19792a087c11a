"""The exception hierarchy: everything the package raises derives from VirtioError."""


class VirtioError(Exception):
    """Root of every virtio_py error.  ``code`` is the C core's positive code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class QueueFullError(VirtioError):
    """No free descriptors for the chain (-ENOSPC from virtqueue_add)."""


class RingError(VirtioError):
    """The other side broke a ring rule; on the device side the queue is now broken."""


class QueueBrokenError(RingError):
    """The queue was marked broken (NEEDS_RESET) earlier and does not serve."""


class RegionError(VirtioError):
    """A shared region that is missing, of another layout, or inconsistent."""


class DeviceGoneError(VirtioError):
    """The device process died while the driver waited on it."""


class BlockIOError(VirtioError):
    """A virtio-blk request completed with a status other than OK."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, code=status)
        self.status = status


class ConfigError(VirtioError, ValueError):
    """Bad parameters from the caller."""


__all__ = [
    "VirtioError",
    "QueueFullError",
    "RingError",
    "QueueBrokenError",
    "RegionError",
    "DeviceGoneError",
    "BlockIOError",
    "ConfigError",
]
