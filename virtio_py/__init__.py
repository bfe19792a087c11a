"""virtio_py: a multiprocess, shared-memory emulator of a virtio block device."""

from importlib import metadata as _metadata

from .errors import (
    BlockIOError,
    ConfigError,
    DeviceGoneError,
    QueueBrokenError,
    QueueFullError,
    RegionError,
    RingError,
    VirtioError,
)
from .layout import vring_layout, vring_need_event, vring_size
from .lock import LOCKSTAT_COLUMNS, SharedLock
from .notifier import Notifier
from .region import Region
from .views import avail_ring, desc_table, used_ring
from .virtqueue import DeviceQueue, Virtqueue


def get_include() -> str:
    """The directory of region.h, the region's public C header (cc -I)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


try:  # the one version: pyproject.toml's, as installed
    __version__ = _metadata.version("virtio_py")
except _metadata.PackageNotFoundError:  # pragma: no cover - a tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "VirtioError",
    "QueueFullError",
    "RingError",
    "QueueBrokenError",
    "RegionError",
    "DeviceGoneError",
    "BlockIOError",
    "ConfigError",
    "vring_size",
    "vring_layout",
    "vring_need_event",
    "Region",
    "Virtqueue",
    "DeviceQueue",
    "SharedLock",
    "Notifier",
    "LOCKSTAT_COLUMNS",
    "desc_table",
    "avail_ring",
    "used_ring",
    "get_include",
]
