/* Guest memory as a table of regions, as the device sees it.
 *
 * Each region maps a range of guest physical addresses to host memory in
 * this process, and remembers the front-end's virtual address of the same
 * range (vhost-user names ring addresses that way).  The native transport
 * is the one-region case: the queue's data share, GPA = region offset.
 *
 * The table is plain data: a device queue keeps a copy, so it never points
 * at a table its owner frees.  The host memory the regions name must stay
 * mapped for as long as any copy of the table is in use.  Private to
 * csrc/; Python builds tables through vp_mem_new / vp_mem_add_region. */
#ifndef VIRTIO_PY_MEM_H
#define VIRTIO_PY_MEM_H

#include <stdint.h>

/* VHOST_MEMORY_BASELINE_NREGIONS: what a front-end sends a back-end that
 * does not offer VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS. */
#define VP_MEM_MAX_REGIONS 8

struct vp_mem_region {
	uint64_t guest_phys_addr;
	uint64_t size;
	uint64_t userspace_addr;   /* the front-end's address of the region */
	uint8_t *host;             /* where it is mapped here */
};

struct vp_mem {
	unsigned nregions;
	struct vp_mem_region r[VP_MEM_MAX_REGIONS];
};

/* The region holding [addr, addr + len) wholly, found by addr's offset
 * from each region's start (gpa or uva); overflow-safe.  len 0: NULL. */
static inline uint8_t *mem_find(const struct vp_mem *m, uint64_t addr,
				uint64_t len, int by_uva)
{
	if (!len)
		return NULL;
	for (unsigned i = 0; i < m->nregions; i++) {
		const struct vp_mem_region *r = &m->r[i];
		uint64_t off = addr - (by_uva ? r->userspace_addr
					      : r->guest_phys_addr);
		/* addr below the start wraps off past size. */
		if (off < r->size && len <= r->size - off)
			return r->host + off;
	}
	return NULL;
}

void vp_mem_init(struct vp_mem *m);
int vp_mem_add_region(struct vp_mem *m, uint64_t guest_phys_addr,
		      uint64_t size, uint64_t userspace_addr, void *host);

/* For callers outside csrc/ (cffi): an allocated table. */
struct vp_mem *vp_mem_new(int *err);
void vp_mem_free(struct vp_mem *m);
unsigned vp_mem_nregions(const struct vp_mem *m);
/* Host address of the len bytes at guest physical address gpa, or NULL
 * unless they lie wholly inside one region (len 0: NULL). */
uint8_t *vp_mem_translate(const struct vp_mem *m, uint64_t gpa, uint64_t len);
/* The same for a front-end virtual address (vhost-user ring addresses). */
uint8_t *vp_mem_translate_uva(const struct vp_mem *m, uint64_t uva,
			      uint64_t len);

#endif
