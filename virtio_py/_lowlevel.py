"""The one private layer over the cffi ``lib``: error codes become exceptions.

Nothing above this module touches ``_core`` directly.
"""

import errno
import os

from ._core import ffi, lib
from .errors import (
    ConfigError,
    DeviceGoneError,
    QueueBrokenError,
    QueueFullError,
    RegionError,
    RingError,
    VirtioError,
)

RING_CODES = {
    lib.VP_EHEAD: "EHEAD",
    lib.VP_ENEXT: "ENEXT",
    lib.VP_ELOOP: "ELOOP",
    lib.VP_EADDR: "EADDR",
    lib.VP_EZEROLEN: "EZEROLEN",
    lib.VP_EORDER: "EORDER",
    lib.VP_EAVAIL: "EAVAIL",
    lib.VP_EINFLIGHT: "EINFLIGHT",
    lib.VP_EINDIRECT: "EINDIRECT",
    lib.VP_EUSEDID: "EUSEDID",
    lib.VP_ENOTINFLIGHT: "ENOTINFLIGHT",
    lib.VP_ESEGMAX: "ESEGMAX",
    lib.VP_EFRAME: "EFRAME",
}


def strerror(code):
    return ffi.string(lib.vp_strerror(code)).decode()


def code_name(code):
    """Short name of a positive C core code, e.g. 1001 -> 'EHEAD'."""
    if code in RING_CODES:
        return RING_CODES[code]
    if code == lib.VP_EBROKEN:
        return "EBROKEN"
    return errno.errorcode.get(code, str(code))


def error_for(rc, what=""):
    """The exception for a negative return code."""
    code = -rc
    msg = strerror(code)
    if what:
        msg = f"{what}: {msg}"
    if code == errno.ENOSPC:
        return QueueFullError(msg, code)
    if code == lib.VP_EBROKEN:
        return QueueBrokenError(msg, code)
    if code in RING_CODES:
        return RingError(msg, code)
    if code in (lib.VP_EMAGIC, lib.VP_ELAYOUT):
        return RegionError(msg, code)
    if code == lib.VP_EDEVGONE:
        return DeviceGoneError(msg, code)
    if code == errno.EINVAL:
        return ConfigError(msg, code)
    if code < lib.VP_EBASE:
        return OSErrorVirtio(code, msg)
    return VirtioError(msg, code)


class OSErrorVirtio(VirtioError, OSError):
    """A system call in the C core failed."""

    def __init__(self, code, msg):
        VirtioError.__init__(self, msg, code)
        self.errno = code
        self.strerror = os.strerror(code)


def check(rc, what=""):
    """Return rc if it is not negative, else raise the matching exception."""
    if rc < 0:
        raise error_for(rc, what)
    return rc


def opened(fn, *args, what=""):
    """Call a C constructor that reports failure through a trailing int *err."""
    err = ffi.new("int *")
    handle = fn(*args, err)
    if handle == ffi.NULL:
        raise error_for(err[0] or -errno.ENOMEM, what)
    return handle


__all__ = ["ffi", "lib", "check", "opened", "error_for", "strerror", "code_name"]
