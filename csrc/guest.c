/* Guest side of virtio-blk over a shared queue.
 *
 * Several processes submit on one queue under its lock.  An interrupt goes
 * to whoever takes the call notification; the taker reaps every used
 * buffer (virtblk_done) and delivers each completion to the slot that owns
 * it, waking the owner on a shared futex.  Tokens are VP_TOKEN(gen, slot,
 * tag) (region.h), so a completion finds its owner without a search, and
 * one for a slot's previous owner is dropped.
 *
 * Who takes the interrupt: a thread waiting for a completion sleeps on the
 * call and on its slot's futex at once and takes the interrupt itself, as
 * a halted vCPU takes the interrupt that wakes it; the process's irq
 * thread waits on the call only while no thread of its process does.  So
 * the hop from an interrupt thread to the waiting worker, a cross-process
 * wake-up here but an in-guest task switch on a real guest, is paid only
 * when the completion is another process's.  A worker also takes the
 * interrupts pending when it starts a wait (a running vCPU takes one at
 * once), and one that finds used buffers before it sleeps reaps them.
 * Where one sleep cannot cover both (an eventfd call, Linux < 5.16) the
 * irq thread takes every interrupt and wakes the owner, as before. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include "guest.h"
#include "restart.h"
#include "compiler.h"

struct vp_guest {
	uint8_t *base;
	struct vp_vq *vq;
	struct vp_region_header *h;
	struct vp_queue_shared *sh;
	struct vp_guest_slot *slot;
	unsigned slot_idx;
	struct vp_notifier *call;
	uint64_t share_gpa, share_size;
	unsigned depth;
	uint32_t gen;
	uint64_t tag_size;
	pthread_t irq;
	int irq_running;
	volatile int stop;
	struct vp_acct irq_acct;
	int direct;         /* waiters take interrupts themselves (see top) */
	uint32_t waiting;   /* our threads asleep in a wait, taking interrupts */
	uint32_t waits;     /* sleeps and polls begun: the irq thread's sign */
	uint32_t asleep;    /* our threads asleep on the slot's wake_seq */
	uint64_t poll_max;  /* halt polling: cap of the budget, 0 off */
	uint64_t poll_ns;   /* the budget of the next wait */
};

static long futex_wait(uint32_t *w, uint32_t val, int64_t ns)
{
	struct timespec ts = { ns / 1000000000, ns % 1000000000 };
	return syscall(SYS_futex, w, FUTEX_WAIT, val, ns >= 0 ? &ts : NULL,
		       NULL, 0);
}

/* A slot owner that died; 0 is a free slot, not a dead owner. */
static int pid_dead(int32_t pid)
{
	return pid > 0 && vp_pid_gone(pid);
}

struct vp_guest *vp_guest_open(void *base, uint64_t size, struct vp_vq *vq,
			       unsigned index, struct vp_notifier *call,
			       int *err)
{
	struct vp_region_header *h = base;
	int r = vp_region_check(base, size);
	if (r || index >= h->num_queues) {
		*err = r ? r : -EINVAL;
		return NULL;
	}
	struct vp_queue_info *qi = &h->queue[index];
	struct vp_queue_shared *sh = (void *)((uint8_t *)base + qi->shared);
	int32_t me = getpid();
	int claimed = -1;
	for (unsigned i = 0; i < VP_MAX_SLOTS && claimed < 0; i++) {
		int32_t cur = 0;
		if (__atomic_compare_exchange_n(&sh->slot[i].owner_pid, &cur, me,
						0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED))
			claimed = i;
	}
	/* All taken: reclaim one whose owner is gone. */
	for (unsigned i = 0; i < VP_MAX_SLOTS && claimed < 0; i++) {
		int32_t cur = __atomic_load_n(&sh->slot[i].owner_pid,
					      __ATOMIC_RELAXED);
		if (pid_dead(cur) &&
		    __atomic_compare_exchange_n(&sh->slot[i].owner_pid, &cur,
						me, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED))
			claimed = i;
	}
	if (claimed < 0) {
		*err = -EBUSY;
		return NULL;
	}
	struct vp_guest *g = calloc(1, sizeof(*g));
	if (!g) {
		__atomic_store_n(&sh->slot[claimed].owner_pid, 0,
				 __ATOMIC_RELEASE);
		*err = -ENOMEM;
		return NULL;
	}
	g->base = base;
	g->vq = vq;
	g->h = h;
	g->sh = sh;
	g->slot_idx = claimed;
	g->slot = &sh->slot[claimed];
	g->call = call;
	g->share_size = VP_SLOT_SHARE(qi->data_size);
	g->share_gpa = qi->data + claimed * g->share_size;
	/* Under the queue lock: a reaper checks gen and delivers under it, so
	 * a completion of the slot's last owner lands before the reset (and
	 * is cleared) or after the new gen (and is dropped), never on a tag
	 * we just submitted. */
	struct vp_lock *lock = vp_vq_lock(vq);
	vp_vq_lock_acquire(g->vq);
	g->gen = __atomic_add_fetch(&g->slot->gen, 1, __ATOMIC_RELAXED);
	memset(g->slot->comp, 0, sizeof(g->slot->comp));
	vp_lock_release(lock);
	g->direct = vp_notifier_can_wait_or(call);
	if (vp_guest_set_depth(g, 1)) {
		vp_guest_close(g);
		*err = -ENOSPC;
		return NULL;
	}
	*err = 0;
	return g;
}

void vp_guest_close(struct vp_guest *g)
{
	if (!g)
		return;
	vp_guest_stop_irq(g);
	__atomic_store_n(&g->slot->owner_pid, 0, __ATOMIC_RELEASE);
	free(g);
}

int vp_guest_slot(struct vp_guest *g)
{
	return (int)g->slot_idx;
}

int vp_guest_set_depth(struct vp_guest *g, unsigned depth)
{
	if (depth < 1 || depth > VP_MAX_TAGS)
		return -EINVAL;
	uint64_t t = VP_TAG_SIZE(g->share_size, depth);
	if (t <= VP_SLOT_HDR_AREA)
		return -ENOSPC;
	g->depth = depth;
	g->tag_size = t;
	return 0;
}

uint64_t vp_guest_max_data(struct vp_guest *g)
{
	uint64_t m = g->tag_size - VP_SLOT_HDR_AREA;
	return m > UINT32_MAX ? (UINT32_MAX & ~4095U) : m;
}

uint64_t vp_guest_data_gpa(struct vp_guest *g, unsigned tag)
{
	return g->share_gpa + (uint64_t)tag * g->tag_size + VP_SLOT_HDR_AREA;
}

uint8_t *vp_guest_data_ptr(struct vp_guest *g, unsigned tag)
{
	return g->base + vp_guest_data_gpa(g, tag);
}

int vp_guest_reap(struct vp_guest *g)
{
	struct vp_lock *lock = vp_vq_lock(g->vq);
	uint64_t token;
	uint32_t len;
	int n = 0, r;
	uint64_t wake = 0;     /* slots with new completions */
	vp_vq_lock_acquire(g->vq);
	do {
		virtqueue_disable_cb(g->vq);
		while ((r = vp_vq_get_buf_reap(g->vq, &token, &len)) == 1) {
			/* Counted before the owner can see it: whoever saw
			 * the completion also sees it counted. */
			if (vp_acct_cur)
				vp_acct_cur->reaped++;
			/* The wake-up waits until the lock is dropped: in the
			 * kernel the completion path runs under a spinlock
			 * with preemption off, so the woken task cannot
			 * preempt the holder; a futex wake under our lock
			 * lets it do just that (holder preemption) and shows
			 * up as milliseconds of hold time. */
			int s = vp_vq_deliver(g->vq, token, len);
			if (s >= 0)
				wake |= 1ULL << s;
			n++;
		}
	} while (r == 0 && !virtqueue_enable_cb(g->vq));
	vp_lock_release(lock);
	/* wake_seq moved before the unlock, so a waiter that has not slept
	 * yet will not sleep on the old value: no wake-up is lost.  Only our
	 * own threads wait on our slot: with none asleep (the reaper is the
	 * waiter, the common case) its wake would be a system call for
	 * nobody.  Both sides order with a full barrier: wake_seq++ before
	 * this load, asleep++ before the futex compares wake_seq. */
	if (wake >> g->slot_idx & 1 &&
	    !__atomic_load_n(&g->asleep, __ATOMIC_SEQ_CST))
		wake &= ~(1ULL << g->slot_idx);
	for (; wake; wake &= wake - 1)
		vp_vq_slot_wake(g->vq, (unsigned)__builtin_ctzll(wake));
	return r < 0 ? r : n;
}

/* The irq thread steps aside while a thread of ours waits, and while
 * sleeps (or halt polls) keep beginning: a post then wakes the waiter, not
 * us (a futex wakes its oldest sleeper, and we would be it).  Checked every
 * 25 ms, longer than a waiter's 20 ms slices, so a worker pays nothing to
 * enter or leave a wait. */
static int waiters_active(struct vp_guest *g, uint32_t *seen)
{
	uint32_t w = __atomic_load_n(&g->waits, __ATOMIC_RELAXED);
	int active = READ_ONCE(g->direct) &&
		     (w != *seen || __atomic_load_n(&g->waiting, __ATOMIC_RELAXED));
	*seen = w;
	return active;
}

static void *irq_main(void *arg)
{
	struct vp_guest *g = arg;
	uint32_t seen = __atomic_load_n(&g->waits, __ATOMIC_RELAXED);
	vp_acct_set(&g->irq_acct);
	while (!g->stop) {
		if (waiters_active(g, &seen)) {
			struct timespec ts = { 0, 25000000 };
			nanosleep(&ts, NULL);
			continue;
		}
		int r = vp_notifier_wait(g->call, 50000000);
		if (r < 0)
			break;
		if (r == 0)
			continue;
		g->irq_acct.irqs++;
		/* Taken even when stopping: the interrupt is ours to serve. */
		vp_guest_reap(g);
	}
	return NULL;
}

int vp_guest_start_irq(struct vp_guest *g)
{
	if (g->irq_running)
		return 0;
	if (!g->call)
		return -EINVAL;
	g->stop = 0;
	int r = pthread_create(&g->irq, NULL, irq_main, g);
	if (r)
		return -r;
	g->irq_running = 1;
	return 0;
}

void vp_guest_stop_irq(struct vp_guest *g)
{
	if (!g->irq_running)
		return;
	g->stop = 1;
	pthread_join(g->irq, NULL);
	g->irq_running = 0;
}

struct vp_acct *vp_guest_irq_acct(struct vp_guest *g)
{
	return &g->irq_acct;
}

int vp_guest_blk_submit(struct vp_guest *g, unsigned tag, uint32_t type,
			uint64_t sector, uint32_t nbytes, int strategy)
{
	if (tag >= g->depth || nbytes > vp_guest_max_data(g))
		return -EINVAL;
	uint64_t tag_gpa = g->share_gpa + (uint64_t)tag * g->tag_size;
	struct virtio_blk_outhdr *hdr = (void *)(g->base + tag_gpa);
	uint8_t *status = g->base + tag_gpa + sizeof(*hdr);
	hdr->type = type;
	hdr->ioprio = 0;
	hdr->sector = sector;
	*status = 0xff;
	uint64_t addr[3];
	uint32_t len[3];
	unsigned out = 1, in = 0;
	addr[0] = tag_gpa;
	len[0] = sizeof(*hdr);
	if (nbytes) {
		addr[1] = tag_gpa + VP_SLOT_HDR_AREA;
		len[1] = nbytes;
		/* Device writes for IN and GET_ID, reads for the rest. */
		if (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID)
			in++;
		else
			out++;
	}
	addr[out + in] = tag_gpa + sizeof(*hdr);
	len[out + in] = 1;
	in++;
	/* done is reset under the lock (vp_vq_submit_reset): a repair after a
	 * reaper died mid-delivery tells by it whether the tag's last
	 * completion was delivered (REGION.md 7.1). */
	uint64_t token = VP_TOKEN(g->gen, g->slot_idx, tag);
	return vp_vq_submit_reset(g->vq, strategy, addr, len, out, in, token,
				  &g->slot->comp[tag].done);
}

static int device_gone(struct vp_guest *g)
{
	return vp_device_gone(&g->h->daemon_pid);
}

static int done_in(struct vp_guest *g, uint64_t mask)
{
	for (unsigned t = 0; t < g->depth; t++)
		if ((mask >> t & 1) &&
		    load_acquire(&g->slot->comp[t].done) == VP_COMP_DONE)
			return (int)t;
	return -1;
}

/* Take the posts of the call that are pending now: whoever reaps next
 * covers what they announced.  Saves a sleeper a wake-up for buffers we
 * are about to reap (only where a take costs no system call). */
static int take_calls(struct vp_guest *g)
{
	return g->direct && g->call ? vp_notifier_take(g->call, UINT_MAX) : 0;
}

/* Sleep until *word moves from seq, or (direct) an interrupt comes, for ns
 * from now (the caller's last clock reading): 1 took an interrupt, 0 woken
 * or timed out. */
static int guest_sleep(struct vp_guest *g, uint32_t *word, uint32_t seq,
		       uint64_t now, int64_t ns)
{
	int r = -EOPNOTSUPP;
	__atomic_add_fetch(&g->asleep, 1, __ATOMIC_SEQ_CST);
	if (g->direct && g->call) {
		__atomic_add_fetch(&g->waits, 1, __ATOMIC_RELAXED);
		__atomic_add_fetch(&g->waiting, 1, __ATOMIC_RELAXED);
		r = vp_notifier_wait_or_from(g->call, word, seq, now, ns);
		__atomic_sub_fetch(&g->waiting, 1, __ATOMIC_RELAXED);
		if (r == -EOPNOTSUPP || r == -ENOSYS)
			WRITE_ONCE(g->direct, 0);   /* for good: the irq thread takes them */
	}
	if (r < 0) {
		futex_wait(word, seq, ns);
		r = 0;
	}
	__atomic_sub_fetch(&g->asleep, 1, __ATOMIC_RELAXED);
	return r;
}

uint64_t vp_halt_poll_adjust(uint64_t budget_ns, uint64_t block_ns,
			     uint64_t max_ns)
{
	if (block_ns > max_ns)
		return budget_ns / 2;
	if (block_ns <= budget_ns)
		return budget_ns;
	uint64_t grown = budget_ns * 2;
	if (grown < max_ns / 4)
		grown = max_ns / 4;
	return grown < max_ns ? grown : max_ns;
}

int vp_guest_set_halt_poll(struct vp_guest *g, uint64_t max_ns)
{
	__atomic_store_n(&g->poll_max, max_ns, __ATOMIC_RELAXED);
	__atomic_store_n(&g->poll_ns, max_ns, __ATOMIC_RELAXED);
	return 0;
}

uint64_t vp_guest_halt_poll(struct vp_guest *g)
{
	return __atomic_load_n(&g->poll_max, __ATOMIC_RELAXED);
}

uint64_t vp_guest_halt_poll_budget(struct vp_guest *g)
{
	return __atomic_load_n(&g->poll_ns, __ATOMIC_RELAXED);
}

/* A wait of block_ns, poll_ns of it polling, ended: count it and adapt
 * the budget. */
static void halt_poll_done(struct vp_guest *g, uint64_t budget,
			   uint64_t block_ns, uint64_t poll_ns, int slept)
{
	uint64_t max = __atomic_load_n(&g->poll_max, __ATOMIC_RELAXED);
	if (!max)
		return;
	if (vp_acct_cur) {
		vp_acct_cur->polled += poll_ns && !slept;
		vp_acct_cur->poll_ns += poll_ns;
	}
	__atomic_store_n(&g->poll_ns, vp_halt_poll_adjust(budget, block_ns, max),
			 __ATOMIC_RELAXED);
}

/* Sleep until one tag of mask completes.  A lost interrupt (its taker
 * died before reaping) is covered by reaping ourselves after a quiet
 * period.  The clock is read once when the wait does not sleep (for
 * *t_end), and io_wait counts from the first sleep. */
int vp_guest_wait_any_t(struct vp_guest *g, uint64_t mask, int64_t timeout_ns,
			uint8_t *status, uint32_t *len, uint64_t *t_end)
{
	struct vp_guest_slot *s = g->slot;
	uint64_t t0 = 0, now = 0;
	uint64_t budget = __atomic_load_n(&g->poll_ns, __ATOMIC_RELAXED);
	uint64_t t_poll = 0;   /* the last look while polling */
	int tag, reap_failed = 0, slept = 0;
	/* A running vCPU takes a pending interrupt at once; a worker between
	 * requests does so here, where it passes between every request: with
	 * the irq thread aside, nobody else would reap until it slept. */
	if (take_calls(g) > 0)
		reap_failed = vp_guest_reap(g) < 0;
	while ((tag = done_in(g, mask)) < 0) {
		uint32_t seq = __atomic_load_n(&s->wake_seq, __ATOMIC_SEQ_CST);
		if ((tag = done_in(g, mask)) >= 0)
			break;
		/* Already used: reap now instead of sleeping until the
		 * interrupt's taker delivers it (a bad used id would make
		 * this spin: then leave it to the taker). */
		if (!reap_failed && virtqueue_more_used(g->vq)) {
			take_calls(g);
			reap_failed = vp_guest_reap(g) < 0;
			continue;
		}
		if (!t0) {
			t0 = now = vp_now_ns();
			/* A poll begun keeps the irq thread aside as a sleep
			 * does: a poller takes the interrupts by reaping. */
			if (budget)
				__atomic_add_fetch(&g->waits, 1, __ATOMIC_RELAXED);
		}
		/* Halt polling: a sleep and its wake-up cost more than a
		 * completion that comes within the budget. */
		if (now - t0 < budget &&
		    (timeout_ns < 0 || now - t0 < (uint64_t)timeout_ns)) {
			sched_yield();
			t_poll = now = vp_now_ns();
			continue;
		}
		if (timeout_ns >= 0 && now - t0 >= (uint64_t)timeout_ns) {
			if (vp_acct_cur)
				vp_acct_cur->io_wait_ns += now - t0;
			*t_end = now;
			return -ETIMEDOUT;
		}
		int64_t slice = 20000000;
		if (timeout_ns >= 0 && (uint64_t)timeout_ns - (now - t0) < (uint64_t)slice)
			slice = timeout_ns - (int64_t)(now - t0);
		slept = 1;
		int r = guest_sleep(g, &s->wake_seq, seq, now, slice);
		now = vp_now_ns();
		if (r == 1) {
			/* The interrupt is ours to serve, whoever's it is. */
			if (vp_acct_cur)
				vp_acct_cur->irqs++;
			reap_failed = vp_guest_reap(g) < 0;
			continue;
		}
		if (done_in(g, mask) >= 0 ||
		    __atomic_load_n(&s->wake_seq, __ATOMIC_SEQ_CST) != seq)
			continue;
		/* Quiet: reap ourselves, then ask whether anyone will
		 * complete it at all. */
		reap_failed = vp_guest_reap(g) < 0;
		if (done_in(g, mask) >= 0)
			continue;
		*t_end = now;
		if (device_gone(g))
			return -VP_EDEVGONE;
		/* NEEDS_RESET: the device will not complete it. */
		if (READ_ONCE(g->sh->dev.broken))
			return -VP_EBROKEN;
	}
	if (t0)
		halt_poll_done(g, budget, now - t0, t_poll ? t_poll - t0 : 0, slept);
	else
		t0 = now = vp_now_ns();
	if (vp_acct_cur)
		vp_acct_cur->io_wait_ns += now - t0;
	*t_end = now;
	uint64_t tag_gpa = g->share_gpa + (uint64_t)tag * g->tag_size;
	*status = g->base[tag_gpa + sizeof(struct virtio_blk_outhdr)];
	*len = s->comp[tag].len;
	/* Taken, not 0: a repair must not deliver it again (REGION.md 7.1). */
	store_release(&s->comp[tag].done, VP_COMP_TAKEN);
	return tag;
}

int vp_guest_wait_any(struct vp_guest *g, uint64_t mask, int64_t timeout_ns,
		      uint8_t *status, uint32_t *len)
{
	uint64_t t_end;
	return vp_guest_wait_any_t(g, mask, timeout_ns, status, len, &t_end);
}

int vp_guest_wait(struct vp_guest *g, unsigned tag, int64_t timeout_ns,
		  uint8_t *status, uint32_t *len)
{
	if (tag >= g->depth)
		return -EINVAL;
	int r = vp_guest_wait_any(g, 1ULL << tag, timeout_ns, status, len);
	return r < 0 ? r : 0;
}

int vp_guest_set_direct_irq(struct vp_guest *g, int on)
{
	if (on && !vp_notifier_can_wait_or(g->call))
		return -EOPNOTSUPP;
	WRITE_ONCE(g->direct, !!on);
	return 0;
}

int vp_guest_direct_irq(struct vp_guest *g)
{
	return READ_ONCE(g->direct);
}

/* blk-mq stops a hardware queue that is out of descriptors until a
 * completion frees some; here whoever reaps frees them, so wait for the
 * free count (a hint, read without the lock) and reap what is used
 * meanwhile: a retry of the whole submission would take the queue lock on
 * every turn (2 to 20 times per request at 4 x iodepth 16 on 128 entries). */
int vp_guest_wait_room(struct vp_guest *g, unsigned need, int64_t timeout_ns)
{
	uint64_t t0 = vp_now_ns(), checked = t0, now = t0;
	int reap_failed = 0;
	for (unsigned turn = 1;; turn++) {
		if (vp_vq_num_free(g->vq) >= need)
			return 0;
		if (!reap_failed && virtqueue_more_used(g->vq)) {
			take_calls(g);
			reap_failed = vp_guest_reap(g) < 0;
			continue;
		}
		/* Direct: sleep until the next interrupt, whose reap frees
		 * descriptors (1 ms at most, for reaps by others).  Else
		 * yield, and read the clock every 64 turns only. */
		int slept = g->direct && g->call;
		if (slept) {
			uint32_t *w = &g->slot->wake_seq;
			uint32_t seq = __atomic_load_n(w, __ATOMIC_SEQ_CST);
			if (guest_sleep(g, w, seq, now, 1000000) == 1) {
				if (vp_acct_cur)
					vp_acct_cur->irqs++;
				reap_failed = vp_guest_reap(g) < 0;
			}
		} else {
			sched_yield();
		}
		if (!slept && turn % 64)
			continue;
		/* The device every 20 ms, as a waiter asks after a quiet
		 * period. */
		now = vp_now_ns();
		if (timeout_ns >= 0 && now - t0 >= (uint64_t)timeout_ns)
			return -ETIMEDOUT;
		if (now - checked >= 20000000) {
			checked = now;
			if (device_gone(g))
				return -VP_EDEVGONE;
			if (READ_ONCE(g->sh->dev.broken))
				return -VP_EBROKEN;
		}
	}
}
