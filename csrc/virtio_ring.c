/* Split virtqueue, driver side, as drivers/virtio/virtio_ring.c: add, kick
 * (prepare + notify), get_buf, and interrupt suppression by flag or by
 * event index.
 *
 * Driver state lives in the region because several guest processes drive
 * one queue; callers serialise driver operations with the queue's lock, as
 * virtio_blk does with vblk->lock (see each function's contract in vp.h).
 * The driver trusts the device as early Linux did: it checks used ids, not
 * used lengths. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "vp.h"
#include "restart.h"
#include "compiler.h"
#include "crashpoint.h"
#include <limits.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>


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
	/* VIRTIO_F_NOTIFICATION_DATA: negotiated, the remedies this driver
	 * takes (VP_ND_LOCKED, VP_ND_MONOTONIC), and the word its last
	 * kick_prepare made for the notify that follows.  One submitting
	 * thread per vp_vq. */
	unsigned index;
	int nd;
	unsigned nd_remedy;
	uint32_t nd_word;
	uint32_t nd_full;         /* the same index as a 32-bit count of adds (measurement) */
	uint32_t *gate;           /* test hook: wait here before the doorbell */
	int64_t gate_ns;
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
	vq->index = index;
	vq->nd = !!(h->driver_features & (1ULL << VP_F_NOTIFICATION_DATA));
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
	VP_CRASH_POINT(VP_CRASH_ADD_BEGIN);
	uint16_t head = st->free_head, i = head, prev = head;
	/* The head being added, for a repair after we die mid-way. */
	store_release(&st->adding, (uint32_t)head + 1);
	for (unsigned n = 0; n < total; n++) {
		struct vring_desc *d = &vq->vr.desc[i];
		d->addr = addr[n];
		d->len = len[n];
		d->flags = VRING_DESC_F_NEXT | (n >= out ? VRING_DESC_F_WRITE : 0);
		prev = i;
		i = d->next;
	}
	vq->vr.desc[prev].flags &= ~VRING_DESC_F_NEXT;
	VP_CRASH_POINT(VP_CRASH_ADD_DESC);
	st->num_free -= total;
	st->free_head = i;
	VP_CRASH_POINT(VP_CRASH_ADD_FREE);
	store_release(&vq->tokens[head], token);
	VP_CRASH_POINT(VP_CRASH_ADD_TOKEN);

	/* Put the head in the next avail slot, then publish the index; the
	 * descriptors must be visible before the device can see the head. */
	uint16_t avail = st->avail_idx_shadow & (vq->vr.num - 1);
	WRITE_ONCE(vq->vr.avail->ring[avail], head);
	VP_CRASH_POINT(VP_CRASH_ADD_RING);
	/* The shadow moves after the index: until then a repair sees
	 * avail->idx == avail_idx_shadow, an add that never published. */
	uint16_t next = (uint16_t)(st->avail_idx_shadow + 1);
	store_release(&vq->vr.avail->idx, next);
	VP_CRASH_POINT(VP_CRASH_ADD_PUBLISH);
	st->avail_idx_shadow = next;
	st->num_added++;
	store_release(&st->adding, 0);
	__atomic_fetch_add(&st->added, 1, __ATOMIC_RELAXED);
	VP_CRASH_POINT(VP_CRASH_ADD_END);
	return 0;
}

/* A slot token's slot as it is now, or NULL: out of range, or of another
 * generation (the slot's previous owner, or a dead one). */
static struct vp_guest_slot *token_slot(struct vp_queue_shared *sh,
					uint64_t token)
{
	uint64_t s = VP_TOKEN_SLOT(token), tag = VP_TOKEN_TAG(token);
	if (s >= VP_MAX_SLOTS || tag >= VP_MAX_TAGS)
		return NULL;
	struct vp_guest_slot *slot = &sh->slot[s];
	if (VP_TOKEN_GEN(token) != __atomic_load_n(&slot->gen, __ATOMIC_RELAXED))
		return NULL;
	return slot;
}

static void futex_wake_all(uint32_t *w)
{
	syscall(SYS_futex, w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void vp_vq_slot_wake(struct vp_vq *vq, unsigned s)
{
	futex_wake_all(&vq->sh->slot[s].wake_seq);
}

/* The reap record (REGION.md 7.1): a reaper that died between taking a
 * used entry and delivering it.  Not taken (the token is still on its
 * head): the entry stays for the next reaper.  Taken: last_used_idx is
 * moved past it if it was not, and the completion is delivered unless the
 * dead reaper got to done (then the owner may have taken it already: done
 * is 1, or 2 once taken, until the tag's next submission resets it under
 * this lock). */
static void repair_reap(struct vp_vq *vq)
{
	struct vp_driver_state *st = vq->st;
	unsigned num = vq->vr.num;
	uint16_t used = load_acquire(&vq->vr.used->idx);
	uint64_t t = load_acquire(&st->reap_token);
	if (!t) {
		/* No record (a foreign driver): a used entry whose token is
		 * already cleared was consumed. */
		if (st->last_used_idx != used) {
			uint32_t id = READ_ONCE(vq->vr.used->ring[st->last_used_idx &
								 (num - 1)].id);
			if (id < num && vq->tokens[id] == 0)
				st->last_used_idx++;
		}
		return;
	}
	uint64_t info = READ_ONCE(st->reap_info);
	unsigned id = (unsigned)(info >> 16) & 0xffff;
	if (id < num && vq->tokens[id] == t) {
		store_release(&st->reap_token, 0);
		return;
	}
	if (st->last_used_idx != used &&
	    READ_ONCE(vq->vr.used->ring[st->last_used_idx & (num - 1)].id) == id) {
		st->last_used_idx++;
		__atomic_fetch_add(&st->completed, 1, __ATOMIC_RELAXED);
	}
	struct vp_guest_slot *slot = token_slot(vq->sh, t);
	if (slot) {
		struct vp_completion *c = &slot->comp[VP_TOKEN_TAG(t)];
		if (!load_acquire(&c->done)) {
			c->len = (uint32_t)(info >> 32);
			store_release(&c->done, VP_COMP_DONE);
			__atomic_fetch_add(&slot->delivered, 1, __ATOMIC_RELAXED);
		} else if ((uint16_t)__atomic_load_n(&slot->delivered, __ATOMIC_RELAXED) ==
			   (uint16_t)info) {
			/* done was set, the count not yet. */
			__atomic_fetch_add(&slot->delivered, 1, __ATOMIC_RELAXED);
		}
		__atomic_fetch_add(&slot->wake_seq, 1, __ATOMIC_SEQ_CST);
		futex_wake_all(&slot->wake_seq);
	}
	store_release(&st->reap_token, 0);
}

/* Bring the driver state back after a holder died anywhere inside the
 * queue lock, from what the ring shows and the two records (adding, the
 * reap record): an add that did not reach avail->idx is undone, a
 * completion taken and not delivered is delivered, the free list is every
 * descriptor no in-flight head (a token) reaches, and the device is
 * kicked for whatever the dead holder published.  Slots of dead processes
 * get a new generation, so their completions are dropped, and are freed.
 * Caller holds the queue lock. */
void vp_vq_repair(struct vp_vq *vq)
{
	struct vp_driver_state *st = vq->st;
	unsigned num = vq->vr.num;
	uint16_t avail = load_acquire(&vq->vr.avail->idx);
	uint32_t adding = load_acquire(&st->adding);
	if (adding && adding <= num && avail == st->avail_idx_shadow)
		vq->tokens[adding - 1] = 0;       /* never published */
	st->adding = 0;
	st->avail_idx_shadow = avail;
	/* Dead owners first: their completions, the reap record's too, are
	 * dropped. */
	for (unsigned s = 0; s < VP_MAX_SLOTS; s++) {
		struct vp_guest_slot *slot = &vq->sh->slot[s];
		int32_t pid = __atomic_load_n(&slot->owner_pid, __ATOMIC_RELAXED);
		if (pid > 0 && vp_pid_gone(pid)) {
			__atomic_add_fetch(&slot->gen, 1, __ATOMIC_RELAXED);
			__atomic_compare_exchange_n(&slot->owner_pid, &pid, 0, 0,
						    __ATOMIC_RELEASE,
						    __ATOMIC_RELAXED);
		}
	}
	repair_reap(vq);
	/* Descriptors in flight: the chains of heads with a token. */
	uint8_t *busy = calloc(num, 1);
	if (!busy)
		return;                               /* dirty stays: next holder */
	for (unsigned h = 0; h < num; h++) {
		if (!vq->tokens[h])
			continue;
		unsigned i = h;
		for (unsigned n = 0; n < num && !busy[i]; n++) {
			busy[i] = 1;
			if (!(vq->vr.desc[i].flags & VRING_DESC_F_NEXT))
				break;
			i = vq->vr.desc[i].next % num;
		}
	}
	uint16_t head = (uint16_t)num, nfree = 0;
	for (unsigned i = num; i-- > 0;) {
		if (busy[i])
			continue;
		vq->vr.desc[i].next = head;
		head = (uint16_t)i;
		nfree++;
	}
	free(busy);
	st->free_head = head;
	st->num_free = nfree;
	st->num_added = 0x8000;   /* (new - old) covers every index: kick */
	__atomic_store_n(&vq->sh->lock.dirty, 0, __ATOMIC_RELEASE);
	/* A chain the dead holder published may never have been kicked, and
	 * no add need follow: kick now, whatever the device asked for. */
	if (nfree < num) {
		if (vq->nd) {   /* the word names what is published now */
			vq->nd_word = VP_ND_WORD(vq->index, st->avail_idx_shadow);
			vq->nd_full = (uint32_t)__atomic_load_n(&st->added,
								__ATOMIC_RELAXED);
		}
		virtqueue_notify(vq);
	}
}

void vp_vq_lock_acquire(struct vp_vq *vq)
{
	vp_lock_acquire(&vq->sh->lock);
	if (__builtin_expect(__atomic_load_n(&vq->sh->lock.dirty,
					     __ATOMIC_ACQUIRE), 0))
		vp_vq_repair(vq);
	VP_CRASH_ACQUIRED();
}

int vp_vq_repair_if_dirty(struct vp_vq *vq)
{
	if (!__atomic_load_n(&vq->sh->lock.dirty, __ATOMIC_ACQUIRE))
		return 0;
	vp_vq_repair(vq);
	return 1;
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
	if (vq->nd) {
		vq->nd_word = VP_ND_WORD(vq->index, new);
		vq->nd_full = (uint32_t)__atomic_load_n(&st->added, __ATOMIC_RELAXED);
	}
	return needs;
}

static void spin_ns(uint32_t ns)
{
	uint64_t end = vp_now_ns() + ns;
	while (vp_now_ns() < end)
		cpu_relax();
}

/* Test hook: announce arrival at the doorbell (gate[0]++), then wait up to
 * gate_ns for gate[1] to be set.  A barrier between the ring update and
 * the doorbell write, to force an interleaving. */
static void gate_wait(struct vp_vq *vq)
{
	__atomic_fetch_add(&vq->gate[0], 1, __ATOMIC_SEQ_CST);
	uint64_t end = vp_now_ns() + (uint64_t)vq->gate_ns;
	struct timespec ts = { 0, 100000 };
	while (!__atomic_load_n(&vq->gate[1], __ATOMIC_ACQUIRE) &&
	       vp_now_ns() < end)
		nanosleep(&ts, NULL);
}

/* The notify register write of VIRTIO_F_NOTIFICATION_DATA: the word
 * kick_prepare made (virtio 1.2 §2.9 "Driver Notifications": vqn, then
 * next_off and next_wrap, which for a split ring are the 16-bit avail
 * index), stored with one aligned 32-bit store, as Linux's
 * vp_notify_with_data does with iowrite32.  It lands after the exit's cost:
 * the register is what the device model sees once the exit reaches it.
 * The monotonic remedy stores only a word ahead of the register's, by
 * compare-and-swap; a real notify register is write-only, so it exists
 * only in emulation.  Then the measurement word `notified` moves to the
 * furthest index notified (as a count of adds: its low 16 bits are the
 * avail index), before the kick is posted. */
static void doorbell_write(struct vp_vq *vq)
{
	struct vp_doorbell *b = &vq->sh->bell;
	uint32_t w = vq->nd_word;
	if (vq->gate)
		gate_wait(vq);
	if (vq->nd_remedy & VP_ND_MONOTONIC) {
		uint32_t cur = __atomic_load_n(&b->notify, __ATOMIC_RELAXED);
		for (;;) {
			int16_t d = (int16_t)(VP_ND_IDX(w) - VP_ND_IDX(cur));
			if (VP_ND_VQN(cur) == VP_ND_VQN(w) && d <= 0) {
				if (d < 0)
					__atomic_fetch_add(&b->held_back, 1,
							   __ATOMIC_RELAXED);
				break;
			}
			if (__atomic_compare_exchange_n(&b->notify, &cur, w, 1,
							__ATOMIC_RELEASE,
							__ATOMIC_RELAXED))
				break;
		}
	} else {
		store_release(&b->notify, w);
	}
	/* 32 bits: a word delayed past a wrap of the 16-bit index must not
	 * look ahead here, as it would to the device. */
	uint32_t full = vq->nd_full;
	uint32_t told = __atomic_load_n(&b->notified, __ATOMIC_RELAXED);
	while ((int32_t)(full - told) > 0 &&
	       !__atomic_compare_exchange_n(&b->notified, &told, full, 1,
					    __ATOMIC_RELEASE, __ATOMIC_RELAXED))
		;
}

/* The kick itself: post to the device and pay the exit.  A sync exit (a
 * trapping PIO write) returns once the device has taken the kick. */
static int kick_exit(struct vp_vq *vq)
{
	VP_CRASH_POINT(VP_CRASH_KICK);
	__atomic_fetch_add(&vq->st->kicks, 1, __ATOMIC_RELAXED);
	if (vq->exit_cost_ns)
		spin_ns(vq->exit_cost_ns);
	if (vq->nd)
		doorbell_write(vq);
	if (!vq->kick)
		return 0;
	int r = vp_notifier_post(vq->kick);
	if (r || vq->exit_mode != VP_EXIT_SYNC || !vq->ack)
		return r;
	for (;;) {
		r = vp_notifier_wait(vq->ack, 200000000);
		if (r != 0)
			return r < 0 ? r : 0;
		if (vp_device_gone(vq->daemon_pid))
			return -VP_EDEVGONE;
	}
}

int virtqueue_notify(struct vp_vq *vq)
{
	if (!vp_acct_cur)
		return kick_exit(vq);
	uint64_t t0 = vp_now_ns();
	int r = kick_exit(vq);
	vp_acct_cur->kick_ns += vp_now_ns() - t0;
	vp_acct_cur->kicks++;
	return r;
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
		vp_vq_lock_acquire(vq);
	return r ? r : 1;
}

static void detach_buf(struct vp_vq *vq, uint16_t head)
{
	struct vp_driver_state *st = vq->st;
	uint16_t i = head;
	unsigned n = 1;
	store_release(&vq->tokens[head], 0);
	VP_CRASH_POINT(VP_CRASH_GETBUF_DETACH);
	while (vq->vr.desc[i].flags & VRING_DESC_F_NEXT) {
		i = vq->vr.desc[i].next;
		n++;
	}
	vq->vr.desc[i].next = st->free_head;
	st->free_head = head;
	st->num_free += n;
}

/* get_buf, leaving the reap record (REGION.md 7.1) set: the caller
 * delivers the token (vp_vq_deliver) or clears the record. */
static int get_buf(struct vp_vq *vq, uint64_t *token, uint32_t *len)
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
	uint64_t t = vq->tokens[id];
	uint64_t s = VP_TOKEN_SLOT(t);
	uint16_t d0 = s < VP_MAX_SLOTS ?
		(uint16_t)__atomic_load_n(&vq->sh->slot[s].delivered,
					  __ATOMIC_RELAXED) : 0;
	WRITE_ONCE(st->reap_info, (uint64_t)l << 32 | (uint64_t)id << 16 | d0);
	store_release(&st->reap_token, t);
	VP_CRASH_POINT(VP_CRASH_GETBUF_INTENT);
	*token = t;
	*len = l;
	detach_buf(vq, (uint16_t)id);
	VP_CRASH_POINT(VP_CRASH_GETBUF_DETACHED);
	store_release(&st->last_used_idx, (uint16_t)(st->last_used_idx + 1));
	__atomic_fetch_add(&st->completed, 1, __ATOMIC_RELAXED);
	VP_CRASH_POINT(VP_CRASH_GETBUF_USED);
	/* Tell the device how far we got, unless callbacks are off. */
	if (!(st->avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT)) {
		__atomic_store_n(&vring_used_event(&vq->vr), st->last_used_idx,
				 __ATOMIC_RELAXED);
		virtio_mb();
	}
	return 1;
}

int virtqueue_get_buf(struct vp_vq *vq, uint64_t *token, uint32_t *len)
{
	int r = get_buf(vq, token, len);
	if (r == 1)   /* the token is the caller's now: nothing to deliver */
		store_release(&vq->st->reap_token, 0);
	return r;
}

int vp_vq_get_buf_reap(struct vp_vq *vq, uint64_t *token, uint32_t *len)
{
	return get_buf(vq, token, len);
}

int vp_vq_deliver(struct vp_vq *vq, uint64_t token, uint32_t len)
{
	struct vp_guest_slot *slot = token_slot(vq->sh, token);
	int s = -1;
	if (slot) {
		struct vp_completion *c = &slot->comp[VP_TOKEN_TAG(token)];
		c->len = len;
		VP_CRASH_POINT(VP_CRASH_DELIVER_LEN);
		store_release(&c->done, VP_COMP_DONE);
		VP_CRASH_POINT(VP_CRASH_DELIVER_DONE);
		__atomic_fetch_add(&slot->delivered, 1, __ATOMIC_RELAXED);
		VP_CRASH_POINT(VP_CRASH_DELIVER_COUNT);
		__atomic_fetch_add(&slot->wake_seq, 1, __ATOMIC_SEQ_CST);
		VP_CRASH_POINT(VP_CRASH_DELIVER_WOKEN);
		s = (int)(slot - vq->sh->slot);
	}
	store_release(&vq->st->reap_token, 0);
	return s;
}

int virtqueue_more_used(struct vp_vq *vq)
{
	return READ_ONCE(vq->st->last_used_idx) !=
	       load_acquire(&vq->vr.used->idx);
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

static int submit(struct vp_vq *vq, int strategy, const uint64_t *addr,
		  const uint32_t *len, unsigned out, unsigned in, uint64_t token,
		  uint32_t *reset)
{
	struct vp_lock *lock = &vq->sh->lock;
	if (vq->nd && (vq->nd_remedy & VP_ND_LOCKED))
		strategy = VP_KICK_HOLD;   /* the remedy: notify under the lock */
	vp_vq_lock_acquire(vq);
	if (reset)
		store_release(reset, 0);
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
		int needs_kick = virtqueue_kick_prepare(vq);
		vp_lock_release(lock);
		r = needs_kick ? virtqueue_notify(vq) : 0;
		break;
	}
	default:
		r = virtqueue_kick(vq, NULL);
		vp_lock_release(lock);
		break;
	}
	return r < 0 ? r : 0;
}

int vp_vq_submit(struct vp_vq *vq, int strategy, const uint64_t *addr,
		 const uint32_t *len, unsigned out, unsigned in, uint64_t token)
{
	return submit(vq, strategy, addr, len, out, in, token, NULL);
}

int vp_vq_submit_reset(struct vp_vq *vq, int strategy, const uint64_t *addr,
		       const uint32_t *len, unsigned out, unsigned in,
		       uint64_t token, uint32_t *done)
{
	return submit(vq, strategy, addr, len, out, in, token, done);
}

static int bad(char *why, size_t n, const char *fmt, unsigned a, unsigned b)
{
	if (why && n)
		snprintf(why, n, fmt, a, b);
	return -EUCLEAN;
}

int vp_vq_check(struct vp_vq *vq, char *why, size_t n)
{
	struct vp_driver_state *st = vq->st;
	unsigned num = vq->vr.num;
	uint16_t avail = load_acquire(&vq->vr.avail->idx);
	uint16_t used = load_acquire(&vq->vr.used->idx);
	if (st->avail_idx_shadow != avail)
		return bad(why, n, "avail_idx_shadow %u, avail->idx %u",
			   st->avail_idx_shadow, avail);
	if (st->adding || st->reap_token)
		return bad(why, n, "a record left set: adding %u, reap %u",
			   st->adding, st->reap_token != 0);
	if ((uint16_t)(used - st->last_used_idx) > num)
		return bad(why, n, "used->idx %u is more than the queue ahead of last_used_idx %u",
			   used, st->last_used_idx);
	uint8_t *seen = calloc(num, 1);
	if (!seen)
		return -ENOMEM;
	int r = 0;
	unsigned i = st->free_head, heads = 0;
	for (unsigned k = 0; k < st->num_free && !r; k++) {
		if (i >= num || seen[i])
			r = bad(why, n, "free list: entry %u is descriptor %u (out of range or twice)", k, i);
		else {
			seen[i] = 1;
			i = vq->vr.desc[i].next;
		}
	}
	for (unsigned h = 0; h < num && !r; h++) {
		if (!vq->tokens[h])
			continue;
		heads++;
		unsigned d = h;
		for (unsigned k = 0;; k++) {
			if (d >= num || seen[d] || k >= num) {
				r = bad(why, n, "chain of head %u: descriptor %u is free, in another chain or out of range", h, d);
				break;
			}
			seen[d] = 1;
			if (!(vq->vr.desc[d].flags & VRING_DESC_F_NEXT))
				break;
			d = vq->vr.desc[d].next;
		}
	}
	for (unsigned d = 0; d < num && !r; d++)
		if (!seen[d])
			r = bad(why, n, "descriptor %u is neither free nor in a chain (%u)", d, 0);
	free(seen);
	if (r)
		return r;
	if (heads != (uint16_t)(avail - st->last_used_idx))
		return bad(why, n, "%u heads with a token, %u made available and not taken back",
			   heads, (uint16_t)(avail - st->last_used_idx));
	for (uint16_t u = st->last_used_idx; u != used; u++) {
		uint32_t id = READ_ONCE(vq->vr.used->ring[u & (num - 1)].id);
		if (id >= num || !vq->tokens[id])
			return bad(why, n, "used entry %u names head %u, which has no token", u, id);
	}
	return 0;
}

int vp_vq_set_nd(struct vp_vq *vq, unsigned remedy)
{
	if (remedy & ~(unsigned)(VP_ND_LOCKED | VP_ND_MONOTONIC))
		return -EINVAL;
	vq->nd_remedy = remedy;
	return vq->nd;
}

void vp_vq_set_gate(struct vp_vq *vq, uint32_t *gate, int64_t timeout_ns)
{
	vq->gate = gate;
	vq->gate_ns = timeout_ns;
}
