/* Split virtqueue: the driver side (as drivers/virtio/virtio_ring.c) and the
 * device side (as vhost / libvhost-user), with notification suppression by
 * flags or by event index.
 *
 * Driver state lives in the region because several guest processes drive
 * one queue; callers serialise driver operations with the queue's lock, as
 * virtio_blk does with vblk->lock.  The device keeps its state private and
 * reads guest memory only through checked, single loads. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include "vp.h"
#include "compiler.h"

static const char *const vp_errors[] = {
	[VP_EHEAD - VP_EBASE] = "available head out of range",
	[VP_ENEXT - VP_EBASE] = "descriptor next out of range",
	[VP_ELOOP - VP_EBASE] = "descriptor chain longer than the queue (loop)",
	[VP_EADDR - VP_EBASE] = "buffer outside the data area",
	[VP_EZEROLEN - VP_EBASE] = "zero-length buffer",
	[VP_EORDER - VP_EBASE] = "readable buffer after a writable one",
	[VP_EAVAIL - VP_EBASE] = "avail index more than the queue size ahead",
	[VP_EINFLIGHT - VP_EBASE] = "head already in flight",
	[VP_EINDIRECT - VP_EBASE] = "indirect descriptor not negotiated",
	[VP_EBROKEN - VP_EBASE] = "queue is broken",
	[VP_EUSEDID - VP_EBASE] = "used id was never made available",
	[VP_ENOTINFLIGHT - VP_EBASE] = "head is not in flight",
	[VP_EMAGIC - VP_EBASE] = "not a virtio_py region of this version",
	[VP_ELAYOUT - VP_EBASE] = "region header describes an impossible layout",
	[VP_ESEGMAX - VP_EBASE] = "chain has more segments than allowed",
	[VP_EDEVGONE - VP_EBASE] = "the device process is gone",
	[VP_EFRAME - VP_EBASE] = "virtio-blk request without header or status",
};

const char *vp_strerror(int code)
{
	if (code < 0)
		code = -code;
	if (code > VP_EBASE && code <= VP_ELAST)
		return vp_errors[code - VP_EBASE];
	return strerror(code);
}

/* ================= driver ================= */

struct vp_vq {
	struct vring vr;
	uint8_t *base;
	uint64_t size;
	struct vp_queue_shared *sh;
	struct vp_driver_state *st;
	uint64_t *tokens;
	int event_idx;
	uint32_t exit_mode;
	uint32_t exit_cost_ns;
	struct vp_notifier *kick, *ack;
	const int32_t *daemon_pid;
};

struct vp_vq *vp_vq_open(void *base, uint64_t size, unsigned index, int *err)
{
	int r = vp_region_check(base, size);
	if (r) {
		*err = r;
		return NULL;
	}
	struct vp_region_header *h = base;
	if (index >= h->num_queues) {
		*err = -EINVAL;
		return NULL;
	}
	struct vp_vq *vq = calloc(1, sizeof(*vq));
	if (!vq) {
		*err = -ENOMEM;
		return NULL;
	}
	struct vp_queue_info *qi = &h->queue[index];
	uint8_t *b = base;
	vq->base = b;
	vq->size = size;
	vq->vr.num = qi->num;
	vq->vr.desc = (void *)(b + qi->desc);
	vq->vr.avail = (void *)(b + qi->avail);
	vq->vr.used = (void *)(b + qi->used);
	vq->sh = (void *)(b + qi->shared);
	vq->st = &vq->sh->drv;
	vq->tokens = (void *)(b + qi->tokens);
	vq->event_idx = !!(h->driver_features & (1ULL << VIRTIO_RING_F_EVENT_IDX));
	vq->exit_mode = h->exit_mode;
	vq->exit_cost_ns = h->exit_cost_ns;
	vq->daemon_pid = &h->daemon_pid;
	*err = 0;
	return vq;
}

void vp_vq_close(struct vp_vq *vq)
{
	free(vq);
}

void vp_vq_set_notify(struct vp_vq *vq, struct vp_notifier *kick,
		      struct vp_notifier *ack, uint32_t exit_mode,
		      uint32_t exit_cost_ns)
{
	vq->kick = kick;
	vq->ack = ack;
	vq->exit_mode = exit_mode;
	vq->exit_cost_ns = exit_cost_ns;
}

struct vp_lock *vp_vq_lock(struct vp_vq *vq)
{
	return &vq->sh->lock;
}

unsigned vp_vq_num_free(struct vp_vq *vq)
{
	return vq->st->num_free;
}

unsigned vp_vq_size(struct vp_vq *vq)
{
	return vq->vr.num;
}

int virtqueue_add(struct vp_vq *vq, const uint64_t *addr, const uint32_t *len,
		  unsigned out, unsigned in, uint64_t token)
{
	struct vp_driver_state *st = vq->st;
	unsigned total = out + in;
	if (total == 0 || token == 0)
		return -EINVAL;
	if (total > vq->vr.num)
		return -EINVAL;
	if (st->num_free < total)
		return -ENOSPC;
	uint16_t head = st->free_head, i = head, prev = head;
	for (unsigned n = 0; n < total; n++) {
		struct vring_desc *d = &vq->vr.desc[i];
		d->addr = addr[n];
		d->len = len[n];
		d->flags = VRING_DESC_F_NEXT | (n >= out ? VRING_DESC_F_WRITE : 0);
		prev = i;
		i = d->next;
	}
	vq->vr.desc[prev].flags &= ~VRING_DESC_F_NEXT;
	st->num_free -= total;
	st->free_head = i;
	vq->tokens[head] = token;

	/* Put the head in the next avail slot, then publish the index; the
	 * descriptors must be visible before the device can see the head. */
	uint16_t avail = st->avail_idx_shadow & (vq->vr.num - 1);
	WRITE_ONCE(vq->vr.avail->ring[avail], head);
	st->avail_idx_shadow++;
	store_release(&vq->vr.avail->idx, st->avail_idx_shadow);
	st->num_added++;
	__atomic_fetch_add(&st->added, 1, __ATOMIC_RELAXED);
	return 0;
}

int virtqueue_kick_prepare(struct vp_vq *vq)
{
	struct vp_driver_state *st = vq->st;
	/* The new avail idx must be visible before we read the device's wish. */
	virtio_mb();
	uint16_t new = st->avail_idx_shadow;
	uint16_t old = (uint16_t)(new - st->num_added);
	st->num_added = 0;
	int needs;
	if (vq->event_idx)
		needs = vring_need_event(READ_ONCE(vring_avail_event(&vq->vr)),
					 new, old);
	else
		needs = !(READ_ONCE(vq->vr.used->flags) & VRING_USED_F_NO_NOTIFY);
	if (!needs)
		__atomic_fetch_add(&st->kicks_suppressed, 1, __ATOMIC_RELAXED);
	return needs;
}

static void spin_ns(uint32_t ns)
{
	uint64_t end = vp_now_ns() + ns;
	while (vp_now_ns() < end)
		cpu_relax();
}

static int notify(struct vp_vq *vq);

int virtqueue_notify(struct vp_vq *vq)
{
	if (!vp_acct_cur)
		return notify(vq);
	uint64_t t0 = vp_now_ns();
	int r = notify(vq);
	vp_acct_cur->kick_ns += vp_now_ns() - t0;
	vp_acct_cur->kicks++;
	return r;
}

static int notify(struct vp_vq *vq)
{
	__atomic_fetch_add(&vq->st->kicks, 1, __ATOMIC_RELAXED);
	if (vq->exit_cost_ns)
		spin_ns(vq->exit_cost_ns);
	if (!vq->kick)
		return 0;
	int r = vp_notifier_post(vq->kick);
	if (r || vq->exit_mode != VP_EXIT_SYNC || !vq->ack)
		return r;
	/* A trapping exit: the vCPU resumes once the device has handled it. */
	for (;;) {
		r = vp_notifier_wait(vq->ack, 200000000);
		if (r != 0)
			return r < 0 ? r : 0;
		if (vp_pid_gone(READ_ONCE(*vq->daemon_pid)))
			return -VP_EDEVGONE;
	}
}

int virtqueue_kick(struct vp_vq *vq, struct vp_lock *lock)
{
	if (!virtqueue_kick_prepare(vq))
		return 0;
	/* The RFC: the guest should not exit with the lock held. */
	if (lock)
		vp_lock_release(lock);
	int r = virtqueue_notify(vq);
	if (lock)
		vp_lock_acquire(lock);
	return r ? r : 1;
}

static void detach_buf(struct vp_vq *vq, uint16_t head)
{
	struct vp_driver_state *st = vq->st;
	uint16_t i = head;
	unsigned n = 1;
	vq->tokens[head] = 0;
	while (vq->vr.desc[i].flags & VRING_DESC_F_NEXT) {
		i = vq->vr.desc[i].next;
		n++;
	}
	vq->vr.desc[i].next = st->free_head;
	st->free_head = head;
	st->num_free += n;
}

int virtqueue_get_buf(struct vp_vq *vq, uint64_t *token, uint32_t *len)
{
	struct vp_driver_state *st = vq->st;
	if (st->last_used_idx == load_acquire(&vq->vr.used->idx))
		return 0;
	vring_used_elem_t *e = &vq->vr.used->ring[st->last_used_idx &
						 (vq->vr.num - 1)];
	uint32_t id = READ_ONCE(e->id);
	uint32_t l = READ_ONCE(e->len);
	if (id >= vq->vr.num || vq->tokens[id] == 0)
		return -VP_EUSEDID;
	*token = vq->tokens[id];
	*len = l;
	detach_buf(vq, (uint16_t)id);
	st->last_used_idx++;
	__atomic_fetch_add(&st->completed, 1, __ATOMIC_RELAXED);
	/* Tell the device how far we got, unless callbacks are off. */
	if (!(st->avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT)) {
		__atomic_store_n(&vring_used_event(&vq->vr), st->last_used_idx,
				 __ATOMIC_RELAXED);
		virtio_mb();
	}
	return 1;
}

void virtqueue_disable_cb(struct vp_vq *vq)
{
	struct vp_driver_state *st = vq->st;
	if (st->avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT)
		return;
	st->avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT;
	/* With event index the device ignores the flag; used_event simply
	 * stops moving. */
	if (!vq->event_idx)
		WRITE_ONCE(vq->vr.avail->flags, st->avail_flags_shadow);
}

/* Returns 1 when callbacks are on and nothing is pending, 0 when buffers
 * arrived meanwhile (the caller must poll again): the race-free re-check. */
int virtqueue_enable_cb(struct vp_vq *vq)
{
	struct vp_driver_state *st = vq->st;
	if (st->avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT) {
		st->avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT;
		if (!vq->event_idx)
			WRITE_ONCE(vq->vr.avail->flags, st->avail_flags_shadow);
	}
	WRITE_ONCE(vring_used_event(&vq->vr), st->last_used_idx);
	virtio_mb();
	return st->last_used_idx == READ_ONCE(vq->vr.used->idx);
}

int vp_vq_submit(struct vp_vq *vq, int strategy, const uint64_t *addr,
		 const uint32_t *len, unsigned out, unsigned in, uint64_t token)
{
	struct vp_lock *lock = &vq->sh->lock;
	vp_lock_acquire(lock);
	int r = virtqueue_add(vq, addr, len, out, in, token);
	if (r) {
		vp_lock_release(lock);
		return r;
	}
	switch (strategy) {
	case VP_KICK_RELEASE:
		r = virtqueue_kick(vq, lock);
		vp_lock_release(lock);
		break;
	case VP_KICK_PREPARE: {
		int notify = virtqueue_kick_prepare(vq);
		vp_lock_release(lock);
		r = notify ? virtqueue_notify(vq) : 0;
		break;
	}
	default:
		r = virtqueue_kick(vq, NULL);
		vp_lock_release(lock);
		break;
	}
	return r < 0 ? r : 0;
}

/* ================= device ================= */

struct vp_devq {
	pthread_mutex_t mu;       /* pop, push and interrupt may run on threads */
	struct vring vr;
	uint8_t *base;
	uint64_t data_lo, data_hi;
	uint16_t num;
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint16_t signalled_used;
	int signalled_valid;
	int used_any;             /* pushed anything since open */
	uint16_t used_flags;
	int event_idx;
	uint32_t exit_mode;
	int broken;
	uint32_t inflight;
	uint8_t *inflight_map;
	struct vp_device_stats *stats;
	struct vp_notifier *kick, *call, *ack;
};

struct vp_devq *vp_devq_open(void *base, uint64_t size, uint64_t data_lo,
			     uint64_t data_hi, unsigned index, unsigned num,
			     uint64_t desc, uint64_t avail, uint64_t used,
			     int event_idx, uint32_t exit_mode, int *err)
{
	/* Each part must end inside the region without the sum wrapping. */
	if (index >= VP_MAX_QUEUES || !num || (num & (num - 1)) ||
	    num > VP_MAX_QUEUE_SIZE || data_lo > data_hi || data_hi > size ||
	    desc > size || 16ULL * num > size - desc ||
	    avail > size || 6 + 2ULL * num > size - avail ||
	    used > size || 6 + 8ULL * num > size - used) {
		*err = -EINVAL;
		return NULL;
	}
	struct vp_devq *q = calloc(1, sizeof(*q));
	uint8_t *map = calloc(num, 1);
	if (!q || !map) {
		free(q);
		free(map);
		*err = -ENOMEM;
		return NULL;
	}
	pthread_mutex_init(&q->mu, NULL);
	uint8_t *b = base;
	struct vp_region_header *h = base;
	q->base = b;
	q->data_lo = data_lo;
	q->data_hi = data_hi;
	q->num = (uint16_t)num;
	q->vr.num = num;
	q->vr.desc = (void *)(b + desc);
	q->vr.avail = (void *)(b + avail);
	q->vr.used = (void *)(b + used);
	q->event_idx = event_idx;
	q->exit_mode = exit_mode;
	q->inflight_map = map;
	/* The stats block is only written; a guest scribbling on it only
	 * lies to itself.  It must still be inside the region and aligned
	 * for the atomics: read its place once, check, then use it. */
	uint64_t shared = READ_ONCE(h->queue[index].shared);
	if (size < sizeof(struct vp_queue_shared) ||
	    shared > size - sizeof(struct vp_queue_shared) ||
	    shared % _Alignof(struct vp_queue_shared)) {
		vp_devq_close(q);
		*err = -EINVAL;
		return NULL;
	}
	q->stats = &((struct vp_queue_shared *)(b + shared))->dev;
	*err = 0;
	return q;
}

void vp_devq_close(struct vp_devq *q)
{
	if (!q)
		return;
	pthread_mutex_destroy(&q->mu);
	free(q->inflight_map);
	free(q);
}

void vp_devq_set_notify(struct vp_devq *q, struct vp_notifier *kick,
			struct vp_notifier *call, struct vp_notifier *ack)
{
	q->kick = kick;
	q->call = call;
	q->ack = ack;
}

static void publish_stats(struct vp_devq *q)
{
	WRITE_ONCE(q->stats->last_avail_idx, q->last_avail_idx);
	WRITE_ONCE(q->stats->used_idx, q->used_idx);
	WRITE_ONCE(q->stats->inflight, q->inflight);
}

static int mark_broken(struct vp_devq *q, int code)
{
	if (code < 0)
		code = -code;
	if (!q->broken) {
		q->broken = code;
		WRITE_ONCE(q->stats->broken, (uint32_t)code);
		struct vp_region_header *h = (void *)q->base;
		__atomic_fetch_or(&h->status, VP_STATUS_NEEDS_RESET,
				  __ATOMIC_RELAXED);
	}
	return -code;
}

void vp_devq_mark_broken(struct vp_devq *q, int code)
{
	pthread_mutex_lock(&q->mu);
	mark_broken(q, code);
	pthread_mutex_unlock(&q->mu);
}

int vp_devq_broken(struct vp_devq *q)
{
	return q->broken;
}

unsigned vp_devq_inflight(struct vp_devq *q)
{
	return q->inflight;
}

uint8_t *vp_devq_gpa(struct vp_devq *q, uint64_t gpa)
{
	return q->base + gpa;
}

unsigned vp_devq_num(struct vp_devq *q)
{
	return q->num;
}

struct vp_device_stats *vp_devq_stats(struct vp_devq *q)
{
	return q->stats;
}

struct vp_notifier *vp_devq_kick(struct vp_devq *q)
{
	return q->kick;
}

/* Walk one chain; every value read from the guest is read once and
 * checked before it is used. */
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
		if (addr < q->data_lo || addr > q->data_hi ||
		    len > q->data_hi - addr)
			return -VP_EADDR;
		int w = !!(flags & VRING_DESC_F_WRITE);
		if (!w && seen_write)
			return -VP_EORDER;
		seen_write |= w;
		segs[n].addr = addr;
		segs[n].len = len;
		segs[n].write = (uint32_t)w;
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
	if (q->broken) {
		r = -VP_EBROKEN;
		goto out;
	}
	uint16_t avail_idx = load_acquire(&q->vr.avail->idx);
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
	if (q->broken) {
		/* NEEDS_RESET: the driver must not expect the queue to move. */
		r = -VP_EBROKEN;
		goto out;
	}
	vring_used_elem_t *e = &q->vr.used->ring[q->used_idx & (q->num - 1)];
	WRITE_ONCE(e->id, head);
	WRITE_ONCE(e->len, len);
	q->used_idx++;
	q->used_any = 1;
	store_release(&q->vr.used->idx, q->used_idx);
	publish_stats(q);
out:
	pthread_mutex_unlock(&q->mu);
	return r;
}

/* Only asks: vp_devq_interrupt alone moves signalled_used, so a caller
 * that asks first and then interrupts does not lose the interrupt. */
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
	if (!q->event_idx) {
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
	int more = READ_ONCE(q->vr.avail->idx) != q->last_avail_idx;
	pthread_mutex_unlock(&q->mu);
	return more;
}

int vp_devq_wait_kick(struct vp_devq *q, int64_t timeout_ns)
{
	if (!q->kick)
		return -EINVAL;
	/* Timeout 0: take what is pending, without a system call (the
	 * polling device asks on every idle turn). */
	int r = timeout_ns ? vp_notifier_wait(q->kick, timeout_ns) : 0;
	if (r < 0 || (r == 0 && timeout_ns))
		return r;
	r += vp_notifier_drain(q->kick);
	if (r)
		__atomic_fetch_add(&q->stats->kicks_taken, r, __ATOMIC_RELAXED);
	return r;
}

int vp_devq_ack_kicks(struct vp_devq *q, int n)
{
	if (q->exit_mode != VP_EXIT_SYNC || !q->ack)
		return 0;
	for (int i = 0; i < n; i++) {
		int r = vp_notifier_post(q->ack);
		if (r)
			return r;
	}
	return 0;
}
