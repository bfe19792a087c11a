"""vhost-user: the protocol QEMU uses to hand a virtio device to another process.

protocol  wire format: requests, flags, feature bits, payload codecs
channel   whole messages over a Unix socket, fds by SCM_RIGHTS
memory    the guest memory table (fd-backed regions) and address translation
backend   a back-end's connection state machine and the device interface
server    a listening socket serving one front-end at a time
frontend  a front-end client (the role QEMU plays)
"""

from .backend import DEFAULT_PROTOCOL_FEATURES, VhostUserBackend, VhostUserDevice, Vring
from .channel import Channel
from .frontend import DEFAULT_FEATURES, FrontendVring, VhostUserFrontend
from .memory import AddressError, FrontendMemory, MappedRegion, MemoryTable
from .protocol import (
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VhostUserError,
    VirtioBlkConfig,
)
from .server import VhostUserServer

__all__ = [
    "Channel",
    "Message",
    "Request",
    "ProtocolFeature",
    "VirtioBlkConfig",
    "VhostUserError",
    "ProtocolError",
    "AddressError",
    "MemoryTable",
    "MappedRegion",
    "FrontendMemory",
    "VhostUserDevice",
    "Vring",
    "VhostUserBackend",
    "VhostUserServer",
    "DEFAULT_PROTOCOL_FEATURES",
    "DEFAULT_FEATURES",
    "VhostUserFrontend",
    "FrontendVring",
]
