"""Split-ring arithmetic of the legacy layout, as <linux/virtio_ring.h> has it."""
from ._lowlevel import lib

DESC_SIZE = 16
USED_ELEM_SIZE = 8


def _check_num(num):
    if not isinstance(num, int) or num < 1 or num > 32768 or num & (num - 1):
        raise ValueError(f"queue size must be a power of two from 1 to 32768, not {num!r}")


def _align_up(x, align):
    return (x + align - 1) & ~(align - 1)


def vring_layout(num, align=4096):
    """Byte offsets of (desc, avail, used) from the start of a ring, as vring_init places them."""
    _check_num(num)
    if align < 1 or align & (align - 1):
        raise ValueError(f"align must be a power of two, not {align!r}")
    desc = 0
    avail = DESC_SIZE * num
    # flags, idx, ring[num], used_event
    used = _align_up(avail + 2 * (2 + num) + 2, align)
    return desc, avail, used


def vring_size(num, align=4096):
    """Bytes a ring of num entries takes, as vring_size() computes it."""
    _, _, used = vring_layout(num, align)
    # flags, idx, ring[num], avail_event
    return used + 2 * 2 + USED_ELEM_SIZE * num + 2


def vring_need_event(event_idx, new_idx, old):
    """True if moving an index from old to new_idx passes event_idx (mod 2^16).

    This calls the header's own vring_need_event, compiled into the core.
    """
    return bool(lib.vring_need_event(event_idx & 0xFFFF, new_idx & 0xFFFF, old & 0xFFFF))
