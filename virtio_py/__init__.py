"""virtio_py: a multiprocess, shared-memory emulator of a virtio block device."""
import os as _os

# numpy only inspects here; OpenBLAS's spinning helper threads would take
# CPU from the guests and the daemon on a small machine.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from .errors import (BlockIOError, ConfigError, DeviceGoneError, QueueBrokenError,
                     QueueFullError, RegionError, RingError, VirtioError)
from .layout import vring_layout, vring_need_event, vring_size
from .lock import LOCKSTAT_COLUMNS, SharedLock
from .notifier import Notifier
from .region import Region
from .views import avail_ring, desc_table, used_ring
from .virtqueue import DeviceQueue, Virtqueue

__all__ = [
    "VirtioError", "QueueFullError", "RingError", "QueueBrokenError", "RegionError",
    "DeviceGoneError", "BlockIOError", "ConfigError",
    "vring_size", "vring_layout", "vring_need_event",
    "Region", "Virtqueue", "DeviceQueue", "SharedLock", "Notifier", "LOCKSTAT_COLUMNS",
    "desc_table", "avail_ring", "used_ring",
]
__version__ = "0.1.0"
