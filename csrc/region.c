/* Laying out, checking and mapping the shared region, and surviving its
 * truncation. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include "vp.h"
#include "ring.h"

static uint64_t page_up(uint64_t x)
{
	return (x + VP_PAGE - 1) & ~(VP_PAGE - 1);
}

/* Where everything goes; shared by size and init so they cannot disagree. */
struct layout {
	uint64_t shared[VP_MAX_QUEUES], tokens[VP_MAX_QUEUES], ring[VP_MAX_QUEUES];
	uint64_t data_offset, per_queue_data, size;
};

/* Where queue index's struct vp_queue_shared lies: a function of the
 * queue size alone, as plan() lays the blocks out one after the other. */
uint64_t vp_region_shared_gpa(unsigned index, unsigned num)
{
	return page_up(sizeof(struct vp_region_header)) +
	       (uint64_t)index * (page_up(sizeof(struct vp_queue_shared)) +
				  page_up(8ULL * num));
}

/* The ring parts of a vring at GPA ring, where vring_init puts them. */
static void ring_parts(uint64_t ring, unsigned num, struct vp_queue_info *qi)
{
	qi->desc = ring;
	qi->avail = ring + vring_desc_bytes(num);
	qi->used = (qi->avail + vring_avail_bytes(num) + VP_RING_ALIGN - 1) &
		   ~(VP_RING_ALIGN - 1);
}

static int plan(const struct vp_region_params *p, struct layout *l)
{
	if (p->num_queues < 1 || p->num_queues > VP_MAX_QUEUES)
		return -EINVAL;
	if (!is_pow2(p->queue_size) || p->queue_size > VP_MAX_QUEUE_SIZE)
		return -EINVAL;
	if (p->lock_kind > VP_LOCK_PVSPIN || p->exit_mode > VP_EXIT_SYNC ||
	    p->serve_mode > VP_MODE_POLL)
		return -EINVAL;
	uint64_t per_queue = (p->data_size / p->num_queues) & ~(VP_PAGE - 1);
	if (per_queue == 0)
		return -EINVAL;
	uint64_t off = page_up(sizeof(struct vp_region_header));
	for (unsigned q = 0; q < p->num_queues; q++) {
		l->shared[q] = off;
		l->tokens[q] = off + page_up(sizeof(struct vp_queue_shared));
		off = page_up(l->tokens[q] + 8ULL * p->queue_size);
	}
	/* The device finds the blocks by this formula (vp_devq_open). */
	if (l->shared[p->num_queues - 1] !=
	    vp_region_shared_gpa(p->num_queues - 1, p->queue_size))
		return -EINVAL;
	for (unsigned q = 0; q < p->num_queues; q++) {
		l->ring[q] = off;
		off = page_up(off + vring_size(p->queue_size, VP_RING_ALIGN));
	}
	/* per_queue * num_queues <= data_size, but off on top may wrap. */
	if (per_queue * p->num_queues > UINT64_MAX - off)
		return -EINVAL;
	l->data_offset = off;
	l->per_queue_data = per_queue;
	l->size = off + per_queue * p->num_queues;
	return 0;
}

int vp_region_size(const struct vp_region_params *p, uint64_t *size)
{
	struct layout l;
	int r = plan(p, &l);
	if (r == 0)
		*size = l.size;
	return r;
}

/* What vp_region_init writes into the queue table, from the parameters
 * alone: the creator's private copy, which no guest can have touched. */
int vp_region_layout(const struct vp_region_params *p, unsigned index,
		     struct vp_queue_info *qi)
{
	struct layout l;
	int r = plan(p, &l);
	if (r)
		return r;
	if (index >= p->num_queues)
		return -EINVAL;
	memset(qi, 0, sizeof(*qi));
	qi->num = (uint16_t)p->queue_size;
	ring_parts(l.ring[index], p->queue_size, qi);
	qi->shared = l.shared[index];
	qi->tokens = l.tokens[index];
	qi->data = l.data_offset + index * l.per_queue_data;
	qi->data_size = l.per_queue_data;
	return 0;
}

int vp_region_init(void *base, uint64_t size, const struct vp_region_params *p)
{
	struct layout l;
	int r = plan(p, &l);
	if (r)
		return r;
	if (size < l.size)
		return -ENOSPC;
	uint8_t *b = base;
	memset(b, 0, l.data_offset);
	struct vp_region_header *h = base;
	h->magic = VP_MAGIC;
	h->version = VP_LAYOUT_VERSION;
	h->header_size = sizeof(*h);
	h->size = l.size;
	h->device_features = p->device_features;
	/* The emulated driver accepts everything the device offers. */
	h->driver_features = p->device_features;
	h->status = VP_STATUS_ACKNOWLEDGE | VP_STATUS_DRIVER |
		    VP_STATUS_FEATURES_OK | VP_STATUS_DRIVER_OK;
	h->num_queues = p->num_queues;
	h->exit_mode = p->exit_mode;
	h->exit_cost_ns = p->exit_cost_ns;
	h->serve_mode = p->serve_mode;
	h->lock_kind = p->lock_kind;
	h->data_offset = l.data_offset;
	h->data_size = l.per_queue_data * p->num_queues;
	if (p->name)
		strncpy(h->name, p->name, VP_NAME_MAX - 1);
	h->blk.capacity = p->capacity;
	h->blk.blk_size = p->blk_size;
	h->blk.seg_max = p->seg_max;
	h->blk.num_queues = (uint16_t)p->num_queues;
	h->blk.max_discard_sectors = 0xffffffffU;
	h->blk.max_discard_seg = 1;
	h->blk.discard_sector_alignment = 1;
	h->blk.max_write_zeroes_sectors = 0xffffffffU;
	h->blk.max_write_zeroes_seg = 1;
	h->blk.write_zeroes_may_unmap = 0;
	unsigned num = p->queue_size;
	for (unsigned q = 0; q < p->num_queues; q++) {
		struct vp_queue_info *qi = &h->queue[q];
		struct vring vr;
		vring_init(&vr, num, b + l.ring[q], VP_RING_ALIGN);
		vp_region_layout(p, q, qi);   /* 32768 fits num; 65536 is not allowed */
		if ((uint8_t *)vr.used - b != (ptrdiff_t)qi->used)
			return -EINVAL;   /* ring_parts and vring_init disagree */
		struct vp_queue_shared *s = (void *)(b + l.shared[q]);
		vp_lock_init(&s->lock, p->lock_kind, 0);
		s->drv.free_head = 0;
		s->drv.num_free = (uint16_t)num;
		for (unsigned i = 0; i + 1 < num; i++)
			vr.desc[i].next = (uint16_t)(i + 1);
	}
	return 0;
}

/* A driver's check of what the device laid out. */
int vp_region_check(const void *base, uint64_t size)
{
	const struct vp_region_header *h = base;
	if (size < sizeof(*h))
		return -VP_EMAGIC;
	if (h->magic != VP_MAGIC || h->version != VP_LAYOUT_VERSION ||
	    h->header_size != sizeof(*h))
		return -VP_EMAGIC;
	if (h->size > size || h->num_queues < 1 ||
	    h->num_queues > VP_MAX_QUEUES || h->data_offset > h->size ||
	    h->data_size > h->size - h->data_offset)
		return -VP_ELAYOUT;
	for (unsigned q = 0; q < h->num_queues; q++) {
		const struct vp_queue_info *qi = &h->queue[q];
		uint64_t num = qi->num;
		if (!is_pow2(qi->num) || num > VP_MAX_QUEUE_SIZE)
			return -VP_ELAYOUT;
		if (!range_inside(qi->desc, vring_desc_bytes(num), h->size) ||
		    !range_inside(qi->avail, vring_avail_bytes(num), h->size) ||
		    !range_inside(qi->used, vring_used_bytes(num), h->size) ||
		    !range_inside(qi->shared, sizeof(struct vp_queue_shared),
				  h->size) ||
		    !range_inside(qi->tokens, 8 * num, h->size) ||
		    !range_inside(qi->data, qi->data_size, h->size))
			return -VP_ELAYOUT;
		/* The driver reaches all of these with aligned atomics. */
		if (qi->desc % VRING_DESC_ALIGN_SIZE ||
		    qi->avail % VRING_AVAIL_ALIGN_SIZE ||
		    qi->used % VRING_USED_ALIGN_SIZE || qi->tokens % 8 ||
		    qi->shared % _Alignof(struct vp_queue_shared))
			return -VP_ELAYOUT;
	}
	return 0;
}

int vp_map(int fd, uint64_t size, void **base)
{
	if (size == 0)
		return -EINVAL;
	uint64_t len = page_up(size);
	uint8_t *res = mmap(NULL, len + 2 * VP_PAGE, PROT_NONE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (res == MAP_FAILED)
		return -errno;
	void *p = mmap(res + VP_PAGE, len, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_FIXED, fd, 0);
	if (p == MAP_FAILED) {
		int e = errno;
		munmap(res, len + 2 * VP_PAGE);
		return -e;
	}
	/* Unguarded (the table is full), a truncation kills us as before. */
	vp_guard_add(p, len);
	*base = p;
	return 0;
}

int vp_unmap(void *base, uint64_t size)
{
	uint64_t len = page_up(size);
	vp_guard_remove(base);
	return munmap((uint8_t *)base - VP_PAGE, len + 2 * VP_PAGE) ? -errno : 0;
}

/* ---- surviving truncation ----
 *
 * Whoever can open a shared-memory object can ftruncate it, and a process
 * touching a mapped page past the new end gets SIGBUS.  POSIX objects
 * cannot be sealed (a memfd could, but has no name to reopen it by), so
 * the device survives the way Wayland compositors survive a client's shm
 * pool: a SIGBUS inside a guarded mapping maps anonymous memory over the
 * lost pages, from the faulting one to the end, and returns, so the access
 * completes on private zeros.  vp_guard_gen() moves on every such repair;
 * users of the memory ask vp_guard_lost() whether theirs was hit (a device
 * queue then breaks itself).  A SIGBUS anywhere else goes on to the action
 * that was there before. */
#define GUARD_MAX 1024

struct guard {
	uintptr_t lo, hi;        /* lo 0: a free entry */
	uintptr_t lost;          /* first lost byte; hi while none is */
};

static struct guard guards[GUARD_MAX];
static uint32_t guard_gen;
static pthread_mutex_t guard_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction guard_old;
static int guard_installed;

static void guard_sigbus(int sig, siginfo_t *si, void *ctx)
{
	uintptr_t a = (uintptr_t)si->si_addr;
	for (unsigned i = 0; si->si_code > 0 && i < GUARD_MAX; i++) {
		struct guard *g = &guards[i];
		uintptr_t lo = __atomic_load_n(&g->lo, __ATOMIC_ACQUIRE);
		uintptr_t hi = __atomic_load_n(&g->hi, __ATOMIC_RELAXED);
		if (!lo || a < lo || a >= hi)
			continue;
		uintptr_t from = a & ~(uintptr_t)(VP_PAGE - 1);
		if (mmap((void *)from, hi - from, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
		    MAP_FAILED)
			break;
		uintptr_t old = __atomic_load_n(&g->lost, __ATOMIC_RELAXED);
		while (from < old &&
		       !__atomic_compare_exchange_n(&g->lost, &old, from, 0,
						    __ATOMIC_RELEASE,
						    __ATOMIC_RELAXED))
			;
		__atomic_fetch_add(&guard_gen, 1, __ATOMIC_RELEASE);
		return;
	}
	/* Not ours: what would have happened without this handler. */
	if (guard_old.sa_flags & SA_SIGINFO) {
		guard_old.sa_sigaction(sig, si, ctx);
	} else if (guard_old.sa_handler != SIG_DFL &&
		   guard_old.sa_handler != SIG_IGN) {
		guard_old.sa_handler(sig);
	} else {
		signal(sig, SIG_DFL);
		/* A fault repeats on return; a sent signal must be raised. */
		if (si->si_code <= 0)
			raise(sig);
	}
}

int vp_guard_add(void *p, uint64_t len)
{
	uintptr_t lo = (uintptr_t)p;
	if (!p || !len || len > UINTPTR_MAX - lo)
		return -EINVAL;
	int r = -ENOSPC;
	pthread_mutex_lock(&guard_mu);
	if (!guard_installed) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = guard_sigbus;
		sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
		sigemptyset(&sa.sa_mask);
		if (sigaction(SIGBUS, &sa, &guard_old)) {
			r = -errno;
			goto out;
		}
		guard_installed = 1;
	}
	for (unsigned i = 0; i < GUARD_MAX; i++) {
		struct guard *g = &guards[i];
		if (g->lo)
			continue;
		__atomic_store_n(&g->hi, lo + len, __ATOMIC_RELAXED);
		__atomic_store_n(&g->lost, lo + len, __ATOMIC_RELAXED);
		__atomic_store_n(&g->lo, lo, __ATOMIC_RELEASE);
		r = 0;
		break;
	}
out:
	pthread_mutex_unlock(&guard_mu);
	return r;
}

void vp_guard_remove(void *p)
{
	pthread_mutex_lock(&guard_mu);
	for (unsigned i = 0; i < GUARD_MAX; i++) {
		if (guards[i].lo == (uintptr_t)p) {
			__atomic_store_n(&guards[i].lo, 0, __ATOMIC_RELEASE);
			break;
		}
	}
	pthread_mutex_unlock(&guard_mu);
}

uint32_t vp_guard_gen(void)
{
	return __atomic_load_n(&guard_gen, __ATOMIC_ACQUIRE);
}

int vp_guard_lost(const void *p, uint64_t len)
{
	uintptr_t lo = (uintptr_t)p, hi = lo + len;
	if (!p || !len)
		return 0;
	for (unsigned i = 0; i < GUARD_MAX; i++) {
		const struct guard *g = &guards[i];
		uintptr_t glo = __atomic_load_n(&g->lo, __ATOMIC_ACQUIRE);
		if (!glo)
			continue;
		uintptr_t lost = __atomic_load_n(&g->lost, __ATOMIC_ACQUIRE);
		uintptr_t ghi = __atomic_load_n(&g->hi, __ATOMIC_RELAXED);
		if (lost < ghi && lo < ghi && hi > lost)
			return 1;
	}
	return 0;
}

int vp_guest_poke(void *base, uint64_t size, uint64_t gpa, uint64_t value,
		  unsigned width)
{
	if ((width != 1 && width != 2 && width != 4 && width != 8) ||
	    gpa > size || width > size - gpa || gpa % width)
		return -EINVAL;
	uint8_t *p = (uint8_t *)base + gpa;
	switch (width) {
	case 1: __atomic_store_n(p, (uint8_t)value, __ATOMIC_RELEASE); break;
	case 2: __atomic_store_n((uint16_t *)p, (uint16_t)value, __ATOMIC_RELEASE); break;
	case 4: __atomic_store_n((uint32_t *)p, (uint32_t)value, __ATOMIC_RELEASE); break;
	default: __atomic_store_n((uint64_t *)p, value, __ATOMIC_RELEASE); break;
	}
	return 0;
}
