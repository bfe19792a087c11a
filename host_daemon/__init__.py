"""The virtio_py host daemon: the device process serving virtio-blk."""

from .daemon import HostDaemon

__all__ = ["HostDaemon"]
