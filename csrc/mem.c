/* Guest memory tables: building and looking up (see mem.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "mem.h"

void vp_mem_init(struct vp_mem *m)
{
	memset(m, 0, sizeof(*m));
}

/* [a, a + as) and [b, b + bs) share a byte.  Sizes are not 0, and the
 * last bytes, a + as - 1 and b + bs - 1, do not wrap. */
static int overlap(uint64_t a, uint64_t as, uint64_t b, uint64_t bs)
{
	return a <= b + (bs - 1) && b <= a + (as - 1);
}

/* Regions must not overlap in guest physical addresses: a buffer must have
 * one meaning.  Front-end addresses may alias (the same memory seen at two
 * GPAs); a lookup by them takes the first region that holds the range.
 * Returns 0, -EINVAL, or -ENOSPC when the table is full. */
int vp_mem_add_region(struct vp_mem *m, uint64_t guest_phys_addr,
		      uint64_t size, uint64_t userspace_addr, void *host)
{
	/* Sums are taken as end - 1, so a region may end at 2^64. */
	if (!size || !host || guest_phys_addr > UINT64_MAX - (size - 1) ||
	    userspace_addr > UINT64_MAX - (size - 1) ||
	    (uintptr_t)host > UINTPTR_MAX - (size - 1))
		return -EINVAL;
	for (unsigned i = 0; i < m->nregions; i++) {
		const struct vp_mem_region *r = &m->r[i];
		if (overlap(guest_phys_addr, size, r->guest_phys_addr, r->size))
			return -EINVAL;
	}
	if (m->nregions >= VP_MEM_MAX_REGIONS)
		return -ENOSPC;
	struct vp_mem_region *r = &m->r[m->nregions++];
	r->guest_phys_addr = guest_phys_addr;
	r->size = size;
	r->userspace_addr = userspace_addr;
	r->host = host;
	return 0;
}

struct vp_mem *vp_mem_new(int *err)
{
	struct vp_mem *m = calloc(1, sizeof(*m));
	*err = m ? 0 : -ENOMEM;
	return m;
}

void vp_mem_free(struct vp_mem *m)
{
	free(m);
}

unsigned vp_mem_nregions(const struct vp_mem *m)
{
	return m->nregions;
}

uint8_t *vp_mem_translate(const struct vp_mem *m, uint64_t gpa, uint64_t len)
{
	return mem_find(m, gpa, len, 0);
}

uint8_t *vp_mem_translate_uva(const struct vp_mem *m, uint64_t uva,
			      uint64_t len)
{
	return mem_find(m, uva, len, 1);
}
