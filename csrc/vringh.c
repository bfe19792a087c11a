/* Split virtqueue, device side: what the kernel's drivers/vhost/vringh.c
 * and libvhost-user's vu_queue_pop / vu_queue_push do for a host.
 *
 * The guest is hostile.  Every index, length, flag and address is read
 * from guest memory once, then checked, then used; a chain that breaks a
 * rule marks the queue broken (NEEDS_RESET) and touches nothing.  Buffers
 * must lie wholly inside one region of the queue's guest memory table, and
 * the device reaches them only through the host addresses the table gives.
 * The device's own state (indices, in-flight heads, the table, the ring
 * addresses) is private and never read back from guest memory.  Guest
 * memory may also vanish (its object truncated): the truncation guard
 * (region.c) keeps the device alive, and a queue that lost any of its
 * memory breaks with EFAULT. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "vp.h"
#include "mem.h"
#include "restart.h"
#include "ring.h"
#include "compiler.h"

struct vp_devq {
	pthread_mutex_t mu;       /* pop, push and interrupt may run on threads */
	struct vring vr;
	struct vp_mem mem;        /* where buffers may lie, and where that is here */
	uint16_t num;
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint16_t signalled_used;
	int signalled_valid;
	int used_any;             /* pushed anything since open or set_base */
	uint16_t used_flags;
	int event_idx;
	uint32_t exit_mode;
	unsigned index;
	int broken;
	uint32_t inflight;
	uint8_t *inflight_map;
	struct vp_device_stats *stats;
	struct vp_device_stats *own_stats;   /* stats, when the queue keeps them */
	uint32_t *status;         /* device status word for NEEDS_RESET, or NULL */
	struct vp_notifier *kick, *call, *ack;
	uint32_t guard_gen;       /* vp_guard_gen() when memory was last checked */
	/* The in-flight record (restart.h), or NULL; written, never read back
	 * but by vp_devq_set_inflight. */
	struct vp_inflight_queue *rec;
	uint64_t counter;         /* pops recorded */
	uint16_t *resubmit;       /* heads taken over, in pop order */
	unsigned nresubmit, resubmit_pos;
	/* VIRTIO_F_NOTIFICATION_DATA (vp_devq_set_notification_data). */
	struct vp_queue_shared *shared;  /* native transport: the doorbell's block */
	int nd;                   /* VP_ND_* */
	uint16_t nd_idx;          /* trust: how far pop may go; reread: newest word's index */
	uint16_t nd_target;       /* while stalled: the index notifications carried */
	uint32_t nd_word;         /* the register as last read */
	uint64_t nd_stall_t0;     /* when the stall began, 0: none */
	uint64_t nd_quiet_t0;     /* trust: last notification or re-read */
	uint64_t nd_reread_ns;
	uint32_t nd_pos;          /* last_avail_idx as a 32-bit count, as `notified` counts */
	uint16_t nd_pos_lo;       /* the last_avail_idx nd_pos was brought up to */
};

/* The queue's copy of a table.  Entries past nregions are zeroed: the
 * fast path of walk_chain tries r[0] without looking at nregions. */
static void mem_copy(struct vp_mem *dst, const struct vp_mem *src)
{
	unsigned n = src->nregions < VP_MEM_MAX_REGIONS ? src->nregions
							: VP_MEM_MAX_REGIONS;
	vp_mem_init(dst);
	dst->nregions = n;
	memcpy(dst->r, src->r, n * sizeof(dst->r[0]));
}

/* The common part of both opens.  Ring pointers: checked by the caller. */
static struct vp_devq *devq_new(const struct vp_mem *mem, unsigned index,
				unsigned num, void *desc, void *avail,
				void *used, struct vp_device_stats *stats,
				int event_idx, uint32_t exit_mode, int *err)
{
	if (!mem || index >= VP_MAX_QUEUES || !is_pow2(num) ||
	    num > VP_MAX_QUEUE_SIZE || !desc || !avail || !used ||
	    (uintptr_t)desc % VRING_DESC_ALIGN_SIZE ||
	    (uintptr_t)avail % VRING_AVAIL_ALIGN_SIZE ||
	    (uintptr_t)used % VRING_USED_ALIGN_SIZE ||
	    (uintptr_t)stats % 8) {
		*err = -EINVAL;
		return NULL;
	}
	struct vp_devq *q = calloc(1, sizeof(*q));
	uint8_t *map = calloc(num, 1);
	struct vp_device_stats *own = NULL;
	if (q && map && !stats) {
		own = aligned_alloc(_Alignof(struct vp_device_stats),
				    sizeof(*own));
		if (own)
			memset(own, 0, sizeof(*own));
	}
	if (!q || !map || (!stats && !own)) {
		free(q);
		free(map);
		free(own);
		*err = -ENOMEM;
		return NULL;
	}
	pthread_mutex_init(&q->mu, NULL);
	q->guard_gen = vp_guard_gen();
	mem_copy(&q->mem, mem);
	q->num = (uint16_t)num;
	q->vr.num = num;
	q->vr.desc = desc;
	q->vr.avail = avail;
	q->vr.used = used;
	q->event_idx = event_idx;
	q->exit_mode = exit_mode;
	q->index = index;
	q->inflight_map = map;
	q->own_stats = own;
	q->stats = stats ? stats : own;
	*err = 0;
	return q;
}

struct vp_devq *vp_devq_open_mem(const struct vp_mem *mem, unsigned index,
				 unsigned num, void *desc, void *avail,
				 void *used, struct vp_device_stats *stats,
				 int event_idx, uint32_t exit_mode, int *err)
{
	return devq_new(mem, index, num, desc, avail, used, stats, event_idx,
			exit_mode, err);
}

struct vp_devq *vp_devq_open(void *base, uint64_t size, uint64_t data_lo,
			     uint64_t data_hi, unsigned index, unsigned num,
			     uint64_t desc, uint64_t avail, uint64_t used,
			     int event_idx, uint32_t exit_mode, int *err)
{
	/* Each part must end inside the region without the sum wrapping. */
	if (index >= VP_MAX_QUEUES || !is_pow2(num) ||
	    num > VP_MAX_QUEUE_SIZE || data_lo > data_hi || data_hi > size ||
	    !range_inside(desc, vring_desc_bytes(num), size) ||
	    !range_inside(avail, vring_avail_bytes(num), size) ||
	    !range_inside(used, vring_used_bytes(num), size)) {
		*err = -EINVAL;
		return NULL;
	}
	uint8_t *b = base;
	struct vp_region_header *h = base;
	/* The stats block is only written; a guest scribbling on it only
	 * lies to itself.  Its place is ours, not the header's: a guest that
	 * rewrote queue[index].shared while the device started would aim the
	 * counters at another queue's ring. */
	uint64_t shared = vp_region_shared_gpa(index, num);
	if (!range_inside(shared, sizeof(struct vp_queue_shared), size) ||
	    shared % _Alignof(struct vp_queue_shared)) {
		*err = -EINVAL;
		return NULL;
	}
	/* Guest memory is the queue's data share alone, GPA = offset. */
	struct vp_mem mem;
	vp_mem_init(&mem);
	if (data_hi > data_lo)
		vp_mem_add_region(&mem, data_lo, data_hi - data_lo,
				  (uintptr_t)(b + data_lo), b + data_lo);
	struct vp_devq *q = devq_new(&mem, index, num, b + desc, b + avail,
				     b + used,
				     &((struct vp_queue_shared *)(b + shared))->dev,
				     event_idx, exit_mode, err);
	if (q) {
		q->status = &h->status;
		q->shared = (struct vp_queue_shared *)(b + shared);
	}
	return q;
}

void vp_devq_close(struct vp_devq *q)
{
	if (!q)
		return;
	pthread_mutex_destroy(&q->mu);
	free(q->inflight_map);
	free(q->resubmit);
	free(q->own_stats);
	free(q);
}

int vp_devq_set_mem(struct vp_devq *q, const struct vp_mem *mem)
{
	if (!mem)
		return -EINVAL;
	pthread_mutex_lock(&q->mu);
	mem_copy(&q->mem, mem);
	pthread_mutex_unlock(&q->mu);
	return 0;
}

static void publish_stats(struct vp_devq *q)
{
	WRITE_ONCE(q->stats->last_avail_idx, q->last_avail_idx);
	WRITE_ONCE(q->stats->used_idx, q->used_idx);
	WRITE_ONCE(q->stats->inflight, q->inflight);
}

int vp_devq_set_base(struct vp_devq *q, uint16_t last_avail_idx,
		     uint16_t used_idx)
{
	int r = 0;
	pthread_mutex_lock(&q->mu);
	if (q->inflight) {
		r = -EBUSY;
	} else {
		q->last_avail_idx = last_avail_idx;
		q->used_idx = used_idx;
		if (q->rec)
			store_release(&q->rec->used_idx, used_idx);
		/* Nothing pushed from here on yet: no interrupt owed. */
		q->signalled_used = used_idx;
		q->signalled_valid = 0;
		q->used_any = 0;
		publish_stats(q);
	}
	pthread_mutex_unlock(&q->mu);
	return r;
}

void vp_devq_get_base(struct vp_devq *q, uint16_t *last_avail_idx,
		      uint16_t *used_idx)
{
	pthread_mutex_lock(&q->mu);
	*last_avail_idx = q->last_avail_idx;
	*used_idx = q->used_idx;
	pthread_mutex_unlock(&q->mu);
}

void vp_devq_set_notify(struct vp_devq *q, struct vp_notifier *kick,
			struct vp_notifier *call, struct vp_notifier *ack)
{
	q->kick = kick;
	q->call = call;
	q->ack = ack;
}

/* Called with q->mu held. */
static int mark_broken(struct vp_devq *q, int code)
{
	if (code < 0)
		code = -code;
	if (!q->broken) {
		q->broken = code;
		WRITE_ONCE(q->stats->broken, (uint32_t)code);
		if (q->status)
			__atomic_fetch_or(q->status, VP_STATUS_NEEDS_RESET,
					  __ATOMIC_RELAXED);
	}
	return -code;
}

/* Did the queue lose memory to a truncation since we last looked?  Then
 * it is broken: what the device reads there is no longer the guest's, and
 * what it writes goes nowhere.  Called with q->mu held. */
static int check_lost(struct vp_devq *q)
{
	uint32_t gen = vp_guard_gen();
	if (likely(gen == q->guard_gen))
		return 0;
	q->guard_gen = gen;
	unsigned num = q->num;
	int lost = vp_guard_lost(q->vr.desc, vring_desc_bytes(num)) ||
		   vp_guard_lost(q->vr.avail, vring_avail_bytes(num)) ||
		   vp_guard_lost(q->vr.used, vring_used_bytes(num)) ||
		   vp_guard_lost(q->stats, sizeof(*q->stats)) ||
		   vp_guard_lost(q->status, sizeof(*q->status)) ||
		   vp_notifier_lost(q->kick) || vp_notifier_lost(q->call) ||
		   vp_notifier_lost(q->ack);
	for (unsigned i = 0; !lost && i < q->mem.nregions; i++)
		lost = vp_guard_lost(q->mem.r[i].host, q->mem.r[i].size);
	if (lost)
		mark_broken(q, EFAULT);
	return lost;
}

void vp_devq_mark_broken(struct vp_devq *q, int code)
{
	pthread_mutex_lock(&q->mu);
	mark_broken(q, code);
	pthread_mutex_unlock(&q->mu);
}

int vp_devq_broken(struct vp_devq *q)
{
	return READ_ONCE(q->broken);
}

unsigned vp_devq_inflight(struct vp_devq *q)
{
	return READ_ONCE(q->inflight);
}

unsigned vp_devq_num(struct vp_devq *q)
{
	return q->num;
}

unsigned vp_devq_index(struct vp_devq *q)
{
	return q->index;
}

struct vp_device_stats *vp_devq_stats(struct vp_devq *q)
{
	return q->stats;
}

struct vp_notifier *vp_devq_kick(struct vp_devq *q)
{
	return q->kick;
}

/* ---- VIRTIO_F_NOTIFICATION_DATA ----
 * The doorbell is guest memory like any other: any 32 bits.  A word is
 * classified against the device's notification index (nd_idx, the newest
 * word's index; a trusting device's last_avail_idx once it has drained):
 * behind it (int16 difference < 0) it is stale, a reordered notification,
 * counted and ignored; more than the queue size ahead of last_avail_idx it
 * is a ring violation (VP_EAVAIL), as an avail index would be.  A reread
 * device may have read the ring past a word: that word is old news.  So a trusting
 * device never pops past last_avail_idx + num, and reads only ring
 * entries (masked by num).  `notified` is measurement only: it decides
 * nothing but the stall counters.  All with q->mu held. */

static struct vp_notif_stats *nd_stats(struct vp_devq *q)
{
	return &q->shared->nd;
}

/* Trust: how far pop may go, never behind last_avail_idx. */
static uint16_t nd_limit(struct vp_devq *q)
{
	return (int16_t)(q->nd_idx - q->last_avail_idx) < 0 ? q->last_avail_idx
							   : q->nd_idx;
}

/* The device learned that the ring reaches idx: a stall waiting for it
 * ends. */
static void nd_reached(struct vp_devq *q, uint16_t idx)
{
	if (!q->nd_stall_t0 || (int16_t)(idx - q->nd_target) < 0)
		return;
	struct vp_notif_stats *ns = nd_stats(q);
	uint64_t dt = vp_now_ns() - q->nd_stall_t0;
	q->nd_stall_t0 = 0;
	WRITE_ONCE(ns->stall_ns, ns->stall_ns + dt);
	if (dt > ns->stall_max_ns)
		WRITE_ONCE(ns->stall_max_ns, dt);
}

static void nd_read(struct vp_devq *q)
{
	struct vp_notif_stats *ns = nd_stats(q);
	uint32_t w = load_acquire(&q->shared->bell.notify);
	if (w == q->nd_word)
		return;                   /* no new write since the last look */
	q->nd_word = w;
	WRITE_ONCE(ns->doorbells, ns->doorbells + 1);
	if (VP_ND_VQN(w) != q->index) {
		WRITE_ONCE(ns->misdirected, ns->misdirected + 1);
		return;
	}
	uint16_t v = VP_ND_IDX(w);
	/* Both indices as distances from last_avail_idx.  No word can be more
	 * than num ahead: a reread device's index that looks so has fallen
	 * more than 32768 behind, and is older than any word. */
	int rv = (int16_t)(v - q->last_avail_idx);
	int rn = (int16_t)(q->nd_idx - q->last_avail_idx);
	if (rn > (int)q->num)
		rn = INT16_MIN - 1;
	if (rv < rn) {
		WRITE_ONCE(ns->reordered, ns->reordered + 1);
		return;
	}
	if (q->nd == VP_ND_REREAD && rv <= 0) {
		q->nd_idx = v;            /* the ring was read past it already */
		WRITE_ONCE(ns->index, v);
		return;
	}
	if ((uint16_t)(v - q->last_avail_idx) > q->num) {
		mark_broken(q, VP_EAVAIL);
		return;
	}
	q->nd_idx = v;
	q->nd_quiet_t0 = vp_now_ns();
	WRITE_ONCE(ns->index, v);
	nd_reached(q, v);
}

/* Before sleeping: what told was (the furthest index notified, read
 * before the last look at the ring), past what the device knows, is
 * waiting past a notification: a stall begins or grows.  In 32 bits
 * (nd_pos follows last_avail_idx at every last look, fewer than 65536
 * pops apart), so a word delayed past a wrap of the 16-bit index is not
 * counted. */
static void nd_idle(struct vp_devq *q, uint32_t told)
{
	uint32_t ahead = told - q->nd_pos;
	if ((int32_t)ahead <= 0 || ahead > q->num)
		return;
	struct vp_notif_stats *ns = nd_stats(q);
	if (!q->nd_stall_t0) {
		q->nd_stall_t0 = vp_now_ns();
		q->nd_target = (uint16_t)told;
		WRITE_ONCE(ns->stalls, ns->stalls + 1);
		WRITE_ONCE(ns->waiting, ns->waiting + ahead);
	} else if ((int16_t)((uint16_t)told - q->nd_target) > 0) {
		WRITE_ONCE(ns->waiting,
			   ns->waiting + (uint16_t)(told - q->nd_target));
		q->nd_target = (uint16_t)told;
	}
}

/* enable_notify's last look, with notification data: trust looks at its
 * doorbell, reread at the ring. */
static int nd_more(struct vp_devq *q)
{
	/* Read first: every index it holds was published before it. */
	uint32_t told = load_acquire(&q->shared->bell.notified);
	int more;
	q->nd_pos += (uint16_t)(q->last_avail_idx - q->nd_pos_lo);
	q->nd_pos_lo = q->last_avail_idx;
	if (q->nd == VP_ND_TRUST) {
		nd_read(q);
		more = nd_limit(q) != q->last_avail_idx;
	} else {
		uint16_t a = load_acquire(&q->vr.avail->idx);
		more = a != q->last_avail_idx;
		nd_reached(q, a);
	}
	if (!more && !q->broken)
		nd_idle(q, told);
	return more;
}

/* Trust: sleep no longer than until the re-read is due. */
static int64_t nd_timeout(struct vp_devq *q, int64_t timeout_ns)
{
	pthread_mutex_lock(&q->mu);
	uint64_t now = vp_now_ns(), due = q->nd_quiet_t0 + q->nd_reread_ns;
	int64_t left = due > now ? (int64_t)(due - now) : 1000000;
	pthread_mutex_unlock(&q->mu);
	return timeout_ns < 0 || left < timeout_ns ? left : timeout_ns;
}

/* Trust, after a wait without a kick: once reread_ms passed without a
 * notification, read avail->idx, checked as any index. */
static void nd_expire(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	uint64_t now = vp_now_ns();
	if (q->nd == VP_ND_TRUST && !q->broken &&
	    now - q->nd_quiet_t0 >= q->nd_reread_ns) {
		q->nd_quiet_t0 = now;
		uint16_t a = load_acquire(&q->vr.avail->idx);
		uint16_t lim = nd_limit(q);
		if ((uint16_t)(a - q->last_avail_idx) > q->num) {
			mark_broken(q, VP_EAVAIL);
		} else if ((int16_t)(a - lim) > 0) {
			struct vp_notif_stats *ns = nd_stats(q);
			WRITE_ONCE(ns->rereads, ns->rereads + 1);
			q->nd_idx = a;
			WRITE_ONCE(ns->index, a);
			nd_reached(q, a);
		}
	}
	pthread_mutex_unlock(&q->mu);
}

void vp_devq_doorbell(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	if (q->nd && !q->broken) {
		q->nd_quiet_t0 = vp_now_ns();
		nd_read(q);
	}
	pthread_mutex_unlock(&q->mu);
}

int vp_devq_set_notification_data(struct vp_devq *q, int behaviour,
				  uint32_t reread_ms)
{
	if (!q->shared)
		return -EOPNOTSUPP;
	if (behaviour < VP_ND_OFF || behaviour > VP_ND_REREAD || !reread_ms ||
	    reread_ms > 3600000)
		return -EINVAL;
	pthread_mutex_lock(&q->mu);
	struct vp_notif_stats *ns = nd_stats(q);
	q->nd = behaviour;
	q->nd_idx = q->last_avail_idx;
	q->nd_word = load_acquire(&q->shared->bell.notify);
	q->nd_stall_t0 = 0;
	q->nd_quiet_t0 = vp_now_ns();
	q->nd_reread_ns = (uint64_t)reread_ms * 1000000;
	uint32_t told = load_acquire(&q->shared->bell.notified);
	q->nd_pos = told - (uint16_t)((uint16_t)told - q->last_avail_idx);
	q->nd_pos_lo = q->last_avail_idx;
	WRITE_ONCE(ns->behaviour, (uint32_t)behaviour);
	WRITE_ONCE(ns->reread_ms, reread_ms);
	WRITE_ONCE(ns->index, q->nd_idx);
	pthread_mutex_unlock(&q->mu);
	return 0;
}

/* Walk one chain; every value read from the guest is read once and
 * checked before it is used.  Called with q->mu held. */
static int walk_chain(struct vp_devq *q, uint16_t head, struct vp_chain *c,
		      struct vp_seg *segs, unsigned max_segs)
{
	unsigned i = head, n = 0;
	int seen_write = 0;
	uint64_t out_len = 0, in_len = 0;
	c->head = head;
	c->n_out = c->n_in = 0;
	for (;;) {
		if (n >= q->num)
			return -VP_ELOOP;
		if (n >= max_segs)
			return -VP_ESEGMAX;
		const struct vring_desc *dp = &q->vr.desc[i];
		uint64_t addr = READ_ONCE(dp->addr);
		uint32_t len = READ_ONCE(dp->len);
		uint16_t flags = READ_ONCE(dp->flags);
		uint16_t next = READ_ONCE(dp->next);
		if (flags & VRING_DESC_F_INDIRECT)
			return -VP_EINDIRECT;
		if (len == 0)
			return -VP_EZEROLEN;
		/* The first region first: the native transport has no other,
		 * and vhost-user's guest RAM lies mostly in one.  Below its
		 * start, off wraps past its size. */
		const struct vp_mem_region *r0 = &q->mem.r[0];
		uint64_t off = addr - r0->guest_phys_addr;
		uint8_t *host;
		if (likely(off < r0->size && len <= r0->size - off))
			host = r0->host + off;
		else if (!(host = mem_find(&q->mem, addr, len, 0)))
			return -VP_EADDR;
		int w = !!(flags & VRING_DESC_F_WRITE);
		if (!w && seen_write)
			return -VP_EORDER;
		seen_write |= w;
		segs[n].addr = addr;
		segs[n].len = len;
		segs[n].write = (uint32_t)w;
		segs[n].host = host;
		if (w) {
			c->n_in++;
			in_len += len;
		} else {
			c->n_out++;
			out_len += len;
		}
		n++;
		if (!(flags & VRING_DESC_F_NEXT))
			break;
		if (next >= q->num)
			return -VP_ENEXT;
		i = next;
	}
	c->nseg = (uint16_t)n;
	/* used.len is 32 bits; a chain past 4 GiB each way cannot be told. */
	c->out_len = out_len > UINT32_MAX ? UINT32_MAX : (uint32_t)out_len;
	c->in_len = in_len > UINT32_MAX ? UINT32_MAX : (uint32_t)in_len;
	return 0;
}

int vp_devq_pop(struct vp_devq *q, struct vp_chain *c, struct vp_seg *segs,
		unsigned max_segs)
{
	int r;
	pthread_mutex_lock(&q->mu);
	if (q->broken || check_lost(q)) {
		r = -VP_EBROKEN;
		goto out;
	}
	if (q->resubmit_pos < q->nresubmit) {
		/* Taken over in flight: its chain is walked (and checked)
		 * again, its avail entry was consumed by the predecessor. */
		uint16_t h = q->resubmit[q->resubmit_pos];
		r = walk_chain(q, h, c, segs, max_segs);
		if (r) {
			r = mark_broken(q, r);
			goto out;
		}
		q->resubmit_pos++;
		r = 1;
		goto out;
	}
	uint16_t avail_idx = q->nd == VP_ND_TRUST ? nd_limit(q)
						  : load_acquire(&q->vr.avail->idx);
	uint16_t pending = (uint16_t)(avail_idx - q->last_avail_idx);
	if (pending > q->num) {
		r = mark_broken(q, VP_EAVAIL);
		goto out;
	}
	if (pending == 0) {
		r = 0;
		goto out;
	}
	uint16_t head = READ_ONCE(q->vr.avail->ring[q->last_avail_idx &
						      (q->num - 1)]);
	if (head >= q->num) {
		r = mark_broken(q, VP_EHEAD);
		goto out;
	}
	if (q->inflight_map[head] || q->inflight >= q->num) {
		r = mark_broken(q, VP_EINFLIGHT);
		goto out;
	}
	r = walk_chain(q, head, c, segs, max_segs);
	if (r) {
		r = mark_broken(q, r);
		goto out;
	}
	q->inflight_map[head] = 1;
	q->inflight++;
	q->last_avail_idx++;
	if (q->rec) {
		/* Recorded before the request starts. */
		q->rec->desc[head].counter = ++q->counter;
		store_release(&q->rec->desc[head].inflight, 1);
	}
	q->stats->chains++;
	publish_stats(q);
	r = 1;
out:
	pthread_mutex_unlock(&q->mu);
	return r;
}

int vp_devq_push(struct vp_devq *q, unsigned head, uint32_t len)
{
	int r = 0;
	pthread_mutex_lock(&q->mu);
	if (head >= q->num || !q->inflight_map[head]) {
		r = -VP_ENOTINFLIGHT;
		goto out;
	}
	q->inflight_map[head] = 0;
	q->inflight--;
	struct vp_inflight_desc *d = q->rec ? &q->rec->desc[head] : NULL;
	if (q->broken || check_lost(q)) {
		/* NEEDS_RESET: the driver must not expect the queue to move. */
		if (d)
			store_release(&d->inflight, 0);
		r = -VP_EBROKEN;
		goto out;
	}
	if (d) {
		/* A successor that finds it 2 publishes it again, at next. */
		d->len_lo = (uint16_t)len;
		d->len_hi = (uint16_t)(len >> 16);
		d->next = q->used_idx;
		q->rec->last_batch_head = (uint16_t)head;
		store_release(&d->inflight, 2);
	}
	vring_used_elem_t *e = &q->vr.used->ring[q->used_idx & (q->num - 1)];
	WRITE_ONCE(e->id, head);
	WRITE_ONCE(e->len, len);
	q->used_idx++;
	q->used_any = 1;
	store_release(&q->vr.used->idx, q->used_idx);
	if (d) {
		store_release(&q->rec->used_idx, q->used_idx);
		store_release(&d->inflight, 0);
	}
	publish_stats(q);
out:
	pthread_mutex_unlock(&q->mu);
	return r;
}

/* Only asks: vp_devq_interrupt alone moves signalled_used, so a caller
 * that asks first and then interrupts does not lose the interrupt.
 * Called with q->mu held. */
static int need_interrupt(struct vp_devq *q)
{
	/* The used idx must be visible before we read the driver's wish. */
	virtio_mb();
	uint16_t old = q->signalled_used, new = q->used_idx;
	int valid = q->signalled_valid;
	/* Nothing used since the last interrupt, or ever: nothing to tell. */
	if (old == new && (valid || !q->used_any))
		return -1;
	if (q->event_idx)
		return !valid || vring_need_event(
			READ_ONCE(vring_used_event(&q->vr)), new, old);
	return !(READ_ONCE(q->vr.avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
}

int vp_devq_need_interrupt(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	int r = need_interrupt(q);
	pthread_mutex_unlock(&q->mu);
	return r > 0;
}

int vp_devq_interrupt(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	int r = q->broken ? -1 : need_interrupt(q);
	if (r >= 0) {
		q->signalled_used = q->used_idx;
		q->signalled_valid = 1;
	}
	if (r > 0)
		q->stats->interrupts++;
	else if (r == 0)
		q->stats->interrupts_suppressed++;
	pthread_mutex_unlock(&q->mu);
	if (r < 0)
		r = 0;
	if (r && q->call) {
		int e = vp_notifier_post(q->call);
		if (e)
			return e;
	}
	return r;
}

void vp_devq_disable_notify(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	/* A device that trusts notification data never looks at avail->idx,
	 * so it cannot say "no kicks, I am looking": it takes every one. */
	if (!q->event_idx && q->nd != VP_ND_TRUST) {
		q->used_flags |= VRING_USED_F_NO_NOTIFY;
		WRITE_ONCE(q->vr.used->flags, q->used_flags);
	}
	pthread_mutex_unlock(&q->mu);
}

/* Re-enable kicks; returns 1 when work arrived meanwhile, so the caller
 * drains again instead of sleeping on a kick that will never come. */
int vp_devq_enable_notify(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	if (q->event_idx) {
		WRITE_ONCE(vring_avail_event(&q->vr), q->last_avail_idx);
	} else {
		q->used_flags &= ~VRING_USED_F_NO_NOTIFY;
		WRITE_ONCE(q->vr.used->flags, q->used_flags);
	}
	virtio_mb();
	int more = (q->nd ? nd_more(q) : READ_ONCE(q->vr.avail->idx) !=
					 q->last_avail_idx) ||
		   q->resubmit_pos < q->nresubmit;
	pthread_mutex_unlock(&q->mu);
	return more;
}

int64_t vp_devq_kick_timeout(struct vp_devq *q, int64_t timeout_ns)
{
	if (q->nd == VP_ND_TRUST && timeout_ns)
		return nd_timeout(q, timeout_ns);
	return timeout_ns;
}

void vp_devq_kick_waited(struct vp_devq *q, int r)
{
	if (r == 0 && q->nd == VP_ND_TRUST)
		nd_expire(q);
	else if (r > 0 && q->nd)
		vp_devq_doorbell(q);
}

int vp_devq_wait_kick(struct vp_devq *q, int64_t timeout_ns)
{
	if (!q->kick)
		return -EINVAL;
	timeout_ns = vp_devq_kick_timeout(q, timeout_ns);
	/* Timeout 0: take what is pending, without a system call on a
	 * semaphore (the polling device asks on every idle turn). */
	int r = timeout_ns ? vp_notifier_wait(q->kick, timeout_ns) : 0;
	if (timeout_ns && r <= 0) {
		vp_devq_kick_waited(q, r);
		return r;
	}
	/* One take, whatever the count: a guest's store of 2^32 into the
	 * kick costs what one kick does. */
	int more = vp_notifier_take(q->kick, q->num);
	if (more > 0)
		r = (int64_t)r + more > q->num ? q->num : r + more;
	if (r > q->num)
		r = q->num;
	if (r) {
		__atomic_fetch_add(&q->stats->kicks_taken, r, __ATOMIC_RELAXED);
		vp_devq_kick_waited(q, r);
	}
	return r;
}

int vp_devq_ack_kicks(struct vp_devq *q, int n)
{
	if (q->exit_mode != VP_EXIT_SYNC || !q->ack)
		return 0;
	if (n > q->num)
		n = q->num;
	for (int i = 0; i < n; i++) {
		int r = vp_notifier_post(q->ack);
		if (r)
			return r;
	}
	return 0;
}

/* ---- the in-flight record (restart.h) ---- */

uint64_t vp_inflight_queue_size(unsigned num)
{
	uint64_t n = sizeof(struct vp_inflight_desc) * (uint64_t)num +
		     sizeof(uint16_t);
	return (n + VP_INFLIGHT_ALIGN - 1) & ~(uint64_t)(VP_INFLIGHT_ALIGN - 1);
}

struct resub {
	uint64_t counter;
	uint16_t head;
};

static int resub_cmp(const void *a, const void *b)
{
	const struct resub *x = a, *y = b;
	return x->counter < y->counter ? -1 : x->counter > y->counter;
}

/* Take over rec: every value read once, checked, then used.  Called with
 * q->mu held and nothing in flight. */
static int inflight_restore(struct vp_devq *q, struct vp_inflight_queue *rec)
{
	unsigned num = q->num, n = 0;
	int pending = -1;
	uint64_t maxc = 0;
	if (READ_ONCE(rec->desc_num) != num)
		return -VP_ELAYOUT;
	struct resub *list = malloc(num * sizeof(*list));
	if (!list)
		return -ENOMEM;
	for (unsigned i = 0; i < num; i++) {
		uint8_t st = READ_ONCE(rec->desc[i].inflight);
		if (st == 0)
			continue;
		if (st == 2 && pending < 0) {
			pending = (int)i;   /* one push at a time: at most one */
			continue;
		}
		if (st != 1) {
			free(list);
			return -VP_ELAYOUT;
		}
		uint64_t c = READ_ONCE(rec->desc[i].counter);
		list[n].counter = c;
		list[n].head = (uint16_t)i;
		maxc = c > maxc ? c : maxc;
		n++;
	}
	uint16_t used = READ_ONCE(rec->used_idx);
	if (pending >= 0) {
		struct vp_inflight_desc *d = &rec->desc[pending];
		uint16_t at = READ_ONCE(d->next);
		uint32_t len = READ_ONCE(d->len_lo) |
			       (uint32_t)READ_ONCE(d->len_hi) << 16;
		/* used_idx says before (at) or after (at + 1) it. */
		if (at != used && (uint16_t)(at + 1) != used) {
			free(list);
			return -VP_ELAYOUT;
		}
		/* Publish it again: the same bytes if it was already out. */
		vring_used_elem_t *e = &q->vr.used->ring[at & (num - 1)];
		WRITE_ONCE(e->id, (uint32_t)pending);
		WRITE_ONCE(e->len, len);
		used = (uint16_t)(at + 1);
		store_release(&q->vr.used->idx, used);
		store_release(&rec->used_idx, used);
		store_release(&d->inflight, 0);
	}
	qsort(list, n, sizeof(*list), resub_cmp);
	uint16_t *heads = n ? malloc(n * sizeof(*heads)) : NULL;
	if (n && !heads) {
		free(list);
		return -ENOMEM;
	}
	for (unsigned i = 0; i < n; i++) {
		heads[i] = list[i].head;
		q->inflight_map[list[i].head] = 1;
	}
	free(list);
	free(q->resubmit);
	q->resubmit = heads;
	q->nresubmit = n;
	q->resubmit_pos = 0;
	q->inflight = n;
	q->counter = maxc;
	q->used_idx = used;
	/* Every pop was either completed or is in flight. */
	q->last_avail_idx = (uint16_t)(used + n);
	/* The predecessor may have published without interrupting: the
	 * next vp_devq_interrupt does. */
	q->signalled_used = used;
	q->signalled_valid = 0;
	q->used_any = 1;
	return (int)n;
}

int vp_devq_set_inflight(struct vp_devq *q, void *area, uint64_t size)
{
	int r;
	pthread_mutex_lock(&q->mu);
	if (q->inflight) {
		r = -EBUSY;
		goto out;
	}
	if (!area) {
		q->rec = NULL;
		r = 0;
		goto out;
	}
	if ((uintptr_t)area % 8 || size < vp_inflight_queue_size(q->num)) {
		r = -EINVAL;
		goto out;
	}
	struct vp_inflight_queue *rec = area;
	if (READ_ONCE(rec->version) == 0) {
		memset(rec, 0, vp_inflight_queue_size(q->num));
		rec->desc_num = q->num;
		rec->used_idx = q->used_idx;
		store_release(&rec->version, VP_INFLIGHT_VERSION);
		q->counter = 0;
		r = 0;
	} else if (READ_ONCE(rec->version) != VP_INFLIGHT_VERSION) {
		r = -VP_ELAYOUT;
	} else {
		r = inflight_restore(q, rec);
	}
	if (r >= 0) {
		q->rec = rec;
		publish_stats(q);
	} else if (r == -VP_ELAYOUT) {
		mark_broken(q, r);
	}
out:
	pthread_mutex_unlock(&q->mu);
	return r;
}

unsigned vp_devq_resubmit_pending(struct vp_devq *q)
{
	pthread_mutex_lock(&q->mu);
	unsigned n = q->nresubmit - q->resubmit_pos;
	pthread_mutex_unlock(&q->mu);
	return n;
}
