"""Ring arithmetic against the kernel's own <linux/virtio_ring.h>, compiled
here with gcc, independently of the C core."""

import shutil
import subprocess

import pytest

from virtio_py import vring_layout, vring_need_event, vring_size

SIZES = [1 << k for k in range(16)]  # 1 .. 32768
ALIGNS = [4096, 64, 2]

HEADER_PROBE = r"""
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <linux/virtio_ring.h>

int main(void)
{
	static const unsigned long aligns[] = { %(aligns)s };
	for (unsigned a = 0; a < sizeof(aligns) / sizeof(aligns[0]); a++) {
		for (unsigned num = 1; num <= 32768; num <<= 1) {
			unsigned long align = aligns[a];
			unsigned size = vring_size(num, align);
			/* vring_init only computes pointers; place the ring at an
			 * address aligned like a real one so ALIGN() is exercised. */
			uint8_t *p = aligned_alloc(4096, (size + 4095) & ~4095UL);
			struct vring vr;
			vring_init(&vr, num, p, align);
			printf("%%lu %%u %%u %%ld %%ld %%ld\n", align, num, size,
			       (long)((uint8_t *)vr.desc - p),
			       (long)((uint8_t *)vr.avail - p),
			       (long)((uint8_t *)vr.used - p));
			free(p);
		}
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def header_values(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "a C compiler is required to check the layout against the header"
    d = tmp_path_factory.mktemp("vring_header")
    src = d / "probe.c"
    src.write_text(HEADER_PROBE % {"aligns": ", ".join(f"{a}UL" for a in ALIGNS)})
    exe = d / "probe"
    subprocess.run([gcc, "-O0", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        align, num, size, desc, avail, used = map(int, line.split())
        rows[(align, num)] = (size, (desc, avail, used))
    assert len(rows) == len(ALIGNS) * len(SIZES)
    return rows


@pytest.mark.parametrize("align", ALIGNS)
def test_layout_matches_header(header_values, align):
    for num in SIZES:
        size, layout = header_values[(align, num)]
        assert vring_layout(num, align) == layout, (align, num)
        assert vring_size(num, align) == size, (align, num)


def test_default_align_is_4096(header_values):
    for num in SIZES:
        size, layout = header_values[(4096, num)]
        assert vring_layout(num) == layout
        assert vring_size(num) == size


def test_known_values():
    # The legacy layout of a 256-entry ring (virtio spec 2.7.2 / QEMU's
    # default queue): desc 4096 bytes, avail 4+512+2, used page aligned.
    assert vring_layout(256) == (0, 4096, 8192)
    assert vring_size(256) == 8192 + 4 + 8 * 256 + 2


@pytest.mark.parametrize("num", [0, 3, 6, 65536, -1, 1.0, "8", None])
def test_bad_queue_size(num):
    with pytest.raises(ValueError):
        vring_layout(num)
    with pytest.raises(ValueError):
        vring_size(num)


@pytest.mark.parametrize("align", [0, 3, 100, -4096])
def test_bad_align(align):
    with pytest.raises(ValueError):
        vring_layout(8, align)


# (event_idx, new_idx, old, expected): "did moving from old to new pass
# event_idx", i.e. event_idx in [old, new) modulo 2^16.
NEED_EVENT_ROWS = [
    (0, 1, 0, True),  # the first buffer after event 0
    (0, 0, 0, False),  # nothing moved
    (5, 5, 5, False),
    (4, 5, 4, True),  # exactly the event entry
    (5, 5, 4, False),  # stopped just before the event entry
    (3, 10, 4, False),  # event already behind old
    (4, 10, 4, True),  # event is old
    (9, 10, 4, True),  # event is new - 1
    (10, 10, 4, False),  # event is new: not passed yet
    (11, 10, 4, False),  # event ahead
    (100, 200, 0, True),
    (200, 200, 0, False),
    # wraparound of the 16-bit indices
    (0xFFFF, 0, 0xFFFF, True),  # new wrapped to 0, event was 65535
    (0xFFFF, 2, 0xFFFE, True),
    (0, 2, 0xFFFE, True),  # event 0 passed while wrapping
    (1, 2, 0xFFFE, True),
    (2, 2, 0xFFFE, False),
    (0xFFFD, 2, 0xFFFE, False),  # event just behind old
    (0xFFF0, 0x10, 0xFFF0, True),
    (0x0F, 0x10, 0xFFF0, True),
    (0x10, 0x10, 0xFFF0, False),
    (0xFFEF, 0x10, 0xFFF0, False),
    (0x8000, 0x8001, 0x7FFF, True),
    # the largest possible step (a full 32768 ring's worth)
    (0, 0x8000, 0, True),
    (0x7FFF, 0x8000, 0, True),
    (0x8000, 0x8000, 0, False),
    (0xC000, 0x4000, 0xC000, True),  # half the index space across the wrap
    (0x3FFF, 0x4000, 0xC000, True),
    (0x4000, 0x4000, 0xC000, False),
    (0xBFFF, 0x4000, 0xC000, False),
]


@pytest.mark.parametrize("event,new,old,expected", NEED_EVENT_ROWS)
def test_vring_need_event_table(event, new, old, expected):
    assert vring_need_event(event, new, old) is expected


def test_vring_need_event_masks_to_16_bits():
    # Callers may pass free-running counters; only the low 16 bits count.
    assert vring_need_event(0x1_0000 + 4, 0x2_0000 + 5, 4) is True
    assert vring_need_event(0x1_0000 + 5, 5, 0x3_0000 + 4) is False
