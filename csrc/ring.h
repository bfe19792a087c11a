/* Split-ring arithmetic shared by the region layout, the driver side
 * (virtio_ring.c) and the device side (vringh.c).  Private to csrc/. */
#ifndef VIRTIO_PY_RING_H
#define VIRTIO_PY_RING_H

#include <stdint.h>
#include <linux/virtio_ring.h>

/* Bytes of each ring part for a queue of num entries, the event index
 * words included (used_event ends the avail ring, avail_event the used). */
static inline uint64_t vring_desc_bytes(uint64_t num)
{
	return 16 * num;
}

static inline uint64_t vring_avail_bytes(uint64_t num)
{
	return 4 + 2 * num + 2;
}

static inline uint64_t vring_used_bytes(uint64_t num)
{
	return 4 + 8 * num + 2;
}

static inline int is_pow2(uint64_t x)
{
	return x && !(x & (x - 1));
}

/* [off, off + len) lies inside [0, size), and the sum cannot wrap. */
static inline int range_inside(uint64_t off, uint64_t len, uint64_t size)
{
	return off <= size && len <= size - off;
}

#endif
