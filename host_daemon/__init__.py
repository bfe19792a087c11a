"""The virtio_py host daemon: the device process serving virtio-blk."""
from .daemon import HostDaemon
from .store import StripedStore, assemble, locate

__all__ = ["HostDaemon", "StripedStore", "assemble", "locate"]
