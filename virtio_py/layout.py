"""Split-ring arithmetic of the legacy layout, as <linux/virtio_ring.h> has it."""

from __future__ import annotations

from ._lowlevel import lib
from .errors import ConfigError
from .limits import RING_SIZE

DESC_SIZE = 16
USED_ELEM_SIZE = 8


def _align_up(x: int, align: int) -> int:
    return (x + align - 1) & ~(align - 1)


def vring_layout(num: int, align: int = 4096) -> tuple[int, int, int]:
    """Byte offsets of (desc, avail, used) from the start of a ring, as vring_init places them."""
    RING_SIZE.check(num)
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise ConfigError(f"align must be a power of two, not {align!r}")
    desc = 0
    avail = DESC_SIZE * num
    # flags, idx, ring[num], used_event
    used = _align_up(avail + 2 * (2 + num) + 2, align)
    return desc, avail, used


def vring_size(num: int, align: int = 4096) -> int:
    """Bytes a ring of num entries takes, as vring_size() computes it."""
    _, _, used = vring_layout(num, align)
    # flags, idx, ring[num], avail_event
    return used + 2 * 2 + USED_ELEM_SIZE * num + 2


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """True if moving an index from old to new_idx passes event_idx (mod 2^16).

    This calls the header's own vring_need_event, compiled into the core.
    """
    return bool(lib.vring_need_event(event_idx & 0xFFFF, new_idx & 0xFFFF, old & 0xFFFF))
