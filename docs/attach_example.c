/* A driver of a virtio_py device, written from docs/REGION.md and the
 * public header region.h alone, with the kernel's uapi headers: map the
 * region, check it, print its queue table, place every ring with
 * vring_init, and optionally drive requests on queue 0.
 *
 *   cc -O2 -I csrc -o attach_example docs/attach_example.c -pthread
 *      (installed package: -I "$(python3 -m virtio_py include-dir)";
 *       glibc older than 2.34: add -lrt)
 *
 *   ./attach_example NAME            print the layout
 *   ./attach_example NAME --submit   one request, alone on queue 0, through a
 *                                    device that echoes (the tests' echo device)
 *   ./attach_example NAME --slot     the same from a claimed guest slot, beside
 *                                    virtio_py guest processes (REGION.md §11)
 *   ./attach_example NAME --blk      virtio-blk requests of every type against
 *                                    the host daemon, alone on queue 0 (§10)
 *
 * NAME is the device name (the region is /dev/shm/NAME).  Output lines are
 * "key value ..." pairs; tests/test_region_doc.py checks them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include "region.h"

#define WAIT_NS      5000000000ULL   /* give up on a request after 5 s */
#define QUIET_NS     20000000ULL     /* reap on our own after 20 ms without a call */

static uint8_t *base;

static void *gpa(uint64_t g)
{
	return base + g;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* REGION.md §2: gone if no such process, or a zombie. */
static int pid_gone(int32_t pid)
{
	if (pid <= 0 || (kill(pid, 0) && errno == ESRCH))
		return 1;
	char path[32], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *p = strrchr(buf, ')');      /* the command name may hold ')' */
	return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

static long futex(uint32_t *word, int op, uint32_t val)
{
	/* Shared, never FUTEX_*_PRIVATE: the others are other processes. */
	return syscall(SYS_futex, word, op, val, NULL, NULL, 0);
}

/* 0 taken, -ETIMEDOUT, or another -errno. */
static int sem_wait_ns(sem_t *s, uint64_t ns)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ns / 1000000000ULL;
	ts.tv_nsec += ns % 1000000000ULL;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	while (sem_timedwait(s, &ts))
		if (errno != EINTR)
			return -errno;
	return 0;
}

/* ---- the queue lock (REGION.md §7) ---- */

/* pvspin, as a waiter that never sleeps (it then needs no kick): take the
 * word if it is free and nobody asked for a hand-off; else queue (named
 * as our ticket's taker), wait to be the head of the line, ask for the
 * hand-off at once, take the word, and pass the headship on, asking our
 * unlock to kick the next if it sleeps. */
#define PV_BITS (VP_PV_LOCKED | VP_PV_HANDOFF | VP_PV_SLOW)

static uint64_t lock_self_id(void);

/* pvspin: name ourselves the taker of ticket t in pv_waiter[t % 4] once t is
 * among the first four in line, so that the line waits for us however long
 * we wait for a CPU, and skips us only if we die (§7.1).  1 once named. */
static int pvspin_name(struct vp_lock *l, uint32_t t)
{
	uint64_t mine = (uint64_t)((t + 1) & 0xffff) << 48 | lock_self_id();
	if ((int32_t)(t - __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST)) > 4)
		return 0;
	uint64_t *w = &l->pv_waiter[t % 4];
	uint64_t c = __atomic_load_n(w, __ATOMIC_SEQ_CST);
	do {
		if (c && (int16_t)((c >> 48) - ((t + 1) & 0xffff)) > 0)
			return 1;       /* a later ticket's: the line passed us */
	} while (!__atomic_compare_exchange_n(w, &c, mine, 0, __ATOMIC_SEQ_CST,
					      __ATOMIC_SEQ_CST));
	return 1;
}

static void pvspin_acquire(struct vp_lock *l)
{
	uint32_t *word = &l->futex;
	/* The word names its holder (§7.1): our pid above the bits. */
	uint32_t me = (uint32_t)(lock_self_id() & VP_LOCK_PID_MASK) << VP_PV_PID_SHIFT;
	uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED);
	if (!(v & (VP_PV_LOCKED | VP_PV_HANDOFF)) &&
	    __atomic_compare_exchange_n(word, &v, (v & PV_BITS) | VP_PV_LOCKED | me, 0,
					__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
		return;
	uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_SEQ_CST);
	int named = pvspin_name(l, t);
	/* Until the head, or past it: a waiter skipped us (§7.1). */
	while ((int32_t)(__atomic_load_n(&l->owner, __ATOMIC_SEQ_CST) - (t - 1)) < 0) {
		if (!named)
			named = pvspin_name(l, t);
		sched_yield();
	}
	if (!named)
		named = pvspin_name(l, t);
	__atomic_fetch_or(word, VP_PV_HANDOFF, __ATOMIC_SEQ_CST);
	for (;;) {
		v = __atomic_load_n(word, __ATOMIC_SEQ_CST);
		if (!(v & VP_PV_LOCKED) &&
		    __atomic_compare_exchange_n(word, &v,
						((v & PV_BITS) | VP_PV_LOCKED | me) &
						~VP_PV_HANDOFF,
						0, __ATOMIC_SEQ_CST,
						__ATOMIC_RELAXED))
			break;
		sched_yield();
	}
	/* Pass the headship on: raise owner to t, never lower it. */
	uint32_t o = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
	while ((int32_t)(t - o) > 0 &&
	       !__atomic_compare_exchange_n(&l->owner, &o, t, 0, __ATOMIC_SEQ_CST,
					    __ATOMIC_SEQ_CST))
		;
	if (named) {          /* out of the line: clear our name */
		uint64_t c = (uint64_t)((t + 1) & 0xffff) << 48 | lock_self_id();
		__atomic_compare_exchange_n(&l->pv_waiter[t % 4], &c, 0, 0,
					    __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
	}
	uint32_t s = t + 1;
	if (__atomic_load_n(&l->next, __ATOMIC_SEQ_CST) != s &&
	    __atomic_load_n(&l->pv_halted[s % VP_LOCK_PV_WAITERS],
			    __ATOMIC_SEQ_CST) == (s << 1 | 1))
		__atomic_fetch_or(word, VP_PV_SLOW, __ATOMIC_SEQ_CST);
}

/* pvspin: free the word (all but a hand-off asked for: the pid goes
 * too); if the head of the line sleeps, kick it.  Returns how many were
 * woken. */
static long pvspin_release(struct vp_lock *l)
{
	uint32_t old = __atomic_fetch_and(&l->futex, VP_PV_HANDOFF,
					  __ATOMIC_SEQ_CST);
	if (!(old & VP_PV_SLOW))
		return 0;
	uint32_t s = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST) + 1;
	uint32_t *w = &l->pv_halted[s % VP_LOCK_PV_WAITERS];
	uint32_t halted = s << 1 | 1;
	if (__atomic_load_n(w, __ATOMIC_SEQ_CST) == halted &&
	    __atomic_compare_exchange_n(w, &halted, s << 1, 0,
					__ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
		return futex(w, FUTEX_WAKE, 1);
	return 0;
}

/* Who we are in the owner record (§7.1): VP_LOCK_ID of our pid and start
 * time, the start time being field 22 of /proc/self/stat (after the
 * command in parentheses, which may hold anything). */
static uint64_t self_start, self_id;

static uint64_t lock_self_id(void)
{
	if (self_id)
		return self_id;
	char buf[1024];
	int fd = open("/proc/self/stat", O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = 0;
	char *p = strrchr(buf, ')');
	for (int field = 2; p && field < 22; field++)
		p = strchr(p + 1, ' ');
	self_start = p ? strtoull(p + 1, NULL, 10) : 0;
	self_id = VP_LOCK_ID(getpid(), self_start);
	return self_id;
}

/* spin, spinyield: being served ticket t is not yet holding the lock.
 * Claim it in holder[0] (ticket + 1 in bits 48..63, then our id), unless
 * a waiter already claimed it for nobody: it skips a ticket nobody claims
 * for VP_LOCK_STALL_NS, and then we queue again.  0 claimed, -1 skipped. */
static int ticket_claim(struct vp_lock *l, uint32_t t)
{
	uint64_t mine = (uint64_t)((t + 1) & 0xffff) << 48 | lock_self_id();
	uint64_t c = __atomic_load_n(&l->holder[0], __ATOMIC_ACQUIRE);
	do {
		if (c >> 48 == ((t + 1) & 0xffff))
			return -1;
	} while (!__atomic_compare_exchange_n(&l->holder[0], &c, mine, 0,
					      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
	return 0;
}

static void ticket_acquire(struct vp_lock *l)
{
	for (;;) {
		uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
		uint64_t t0 = now_ns();
		uint32_t o;
		/* Until served, or skipped: the line moved past our ticket. */
		while ((o = __atomic_load_n(&l->owner, __ATOMIC_ACQUIRE)) != t &&
		       (int32_t)(o - t) < 0)
			if (l->kind == VP_LOCK_SPINYIELD && now_ns() - t0 > l->spin_ns)
				sched_yield();
		if (o == t && ticket_claim(l, t) == 0)
			return;
	}
}

static void lock_acquire(struct vp_lock *l)
{
	uint64_t slept = 0;   /* sleeps a wake-up ended (§7: sleeps) */
	lock_self_id();       /* read before the ticket: a claim must be quick */
	if (l->kind == VP_LOCK_MUTEX) {
		/* The word: 0 free, else the holder's pid, | VP_MUTEX_WAITERS
		 * once someone may sleep on it (§7.1). */
		uint32_t me = (uint32_t)lock_self_id() & VP_LOCK_PID_MASK;
		uint32_t c = 0;
		if (!__atomic_compare_exchange_n(&l->futex, &c, me, 0,
						 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
			for (;;) {
				/* Free: take it keeping the bit, as others may sleep. */
				if (c == 0) {
					if (__atomic_compare_exchange_n(&l->futex, &c,
							me | VP_MUTEX_WAITERS, 0,
							__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
						break;
					continue;
				}
				if (!(c & VP_MUTEX_WAITERS) &&
				    !__atomic_compare_exchange_n(&l->futex, &c,
						c | VP_MUTEX_WAITERS, 0,
						__ATOMIC_RELAXED, __ATOMIC_RELAXED))
					continue;
				if (futex(&l->futex, FUTEX_WAIT, c | VP_MUTEX_WAITERS) == 0)
					slept++;
				c = __atomic_load_n(&l->futex, __ATOMIC_RELAXED);
			}
		}
	} else if (l->kind == VP_LOCK_PVSPIN) {
		pvspin_acquire(l);
	} else {
		ticket_acquire(l);
	}
	/* The owner record: our start time; the id too where no claim wrote it. */
	__atomic_store_n(&l->holder[1], self_start, __ATOMIC_RELAXED);
	if (l->kind == VP_LOCK_MUTEX || l->kind == VP_LOCK_PVSPIN)
		__atomic_store_n(&l->holder[0], self_id, __ATOMIC_RELEASE);
	/* The holder keeps the lockstat counters; count ours. */
	l->stat.acquisitions++;
	l->sleeps += slept;
	l->t_acquired = now_ns();
}

/* The log2 bucket of a time in ns (REGION.md §6.1). */
static unsigned hist_bucket(uint64_t ns)
{
	unsigned b = ns ? 64 - (unsigned)__builtin_clzll(ns) : 0;
	return b < VP_LOCK_HIST_BUCKETS ? b : VP_LOCK_HIST_BUCKETS - 1;
}

static void lock_release(struct vp_lock *l)
{
	/* Our hold in its bucket, so the histogram keeps counting every
	 * acquisition. */
	l->hist.hold[hist_bucket(now_ns() - l->t_acquired)]++;
	long woken = 0;
	if (l->kind == VP_LOCK_MUTEX) {
		if (__atomic_exchange_n(&l->futex, 0, __ATOMIC_RELEASE) &
		    VP_MUTEX_WAITERS)
			woken = futex(&l->futex, FUTEX_WAKE, 1);
	} else if (l->kind == VP_LOCK_PVSPIN) {
		woken = pvspin_release(l);
	} else {
		__atomic_store_n(&l->owner, l->owner + 1, __ATOMIC_RELEASE);
	}
	if (woken > 0)   /* counted after the release: atomically */
		__atomic_fetch_add(&l->wakeups, (uint64_t)woken, __ATOMIC_RELAXED);
}

/* ---- one virtqueue, driver side (REGION.md §8, §9) ---- */
struct queue {
	struct vp_region_header *h;
	struct vp_queue_info *qi;
	struct vp_queue_shared *sh;
	struct vp_driver_state *st;
	uint64_t *tokens;
	struct vring vr;
	int event_idx;
	int nd;                   /* VIRTIO_F_NOTIFICATION_DATA negotiated (§9.1) */
	uint32_t nd_word, nd_full; /* made by kick_prepare for the notify */
	sem_t *kick, *call, *ack;
	unsigned delivered;       /* completions we delivered to others' slots */
};

static sem_t *open_sem(const char *name, unsigned q, const char *role)
{
	char path[128];
	snprintf(path, sizeof(path), VP_SEM_NAME_FMT, name, q, role);
	sem_t *s = sem_open(path, 0);
	if (s == SEM_FAILED)
		perror(path);
	return s;
}

static int queue_open(struct queue *q, struct vp_region_header *h,
		      const char *name, unsigned index)
{
	memset(q, 0, sizeof(*q));
	q->h = h;
	q->qi = &h->queue[index];
	q->sh = gpa(q->qi->shared);
	q->st = &q->sh->drv;
	q->tokens = gpa(q->qi->tokens);
	q->event_idx = !!(h->driver_features & (1ULL << VIRTIO_RING_F_EVENT_IDX));
	q->nd = !!(h->driver_features & (1ULL << VP_F_NOTIFICATION_DATA));
	vring_init(&q->vr, q->qi->num, gpa(q->qi->desc), VP_RING_ALIGN);
	q->kick = open_sem(name, index, "kick");
	q->call = open_sem(name, index, "call");
	q->ack = open_sem(name, index, "ack");
	return q->kick == SEM_FAILED || q->call == SEM_FAILED ||
	       q->ack == SEM_FAILED ? -1 : 0;
}

static void queue_close(struct queue *q)
{
	sem_t *s[3] = { q->kick, q->call, q->ack };
	for (unsigned i = 0; i < 3; i++)
		if (s[i] && s[i] != SEM_FAILED)
			sem_close(s[i]);
}

/* virtqueue_add, lock held: out readable buffers, then in writable ones. */
static int add(struct queue *q, const uint64_t *addr, const uint32_t *len,
	       unsigned out, unsigned in, uint64_t token)
{
	struct vp_driver_state *st = q->st;
	unsigned n = out + in;
	if (n == 0 || token == 0 || st->num_free < n)
		return -1;
	uint16_t head = st->free_head, i = head, prev = head;
	for (unsigned k = 0; k < n; k++) {
		struct vring_desc *d = &q->vr.desc[i];
		d->addr = addr[k];
		d->len = len[k];
		d->flags = VRING_DESC_F_NEXT | (k >= out ? VRING_DESC_F_WRITE : 0);
		prev = i;
		i = d->next;
	}
	q->vr.desc[prev].flags &= ~VRING_DESC_F_NEXT;
	st->num_free -= n;
	st->free_head = i;
	q->tokens[head] = token;
	__atomic_store_n(&q->vr.avail->ring[st->avail_idx_shadow & (q->qi->num - 1)],
			 head, __ATOMIC_RELAXED);
	st->avail_idx_shadow++;
	__atomic_store_n(&q->vr.avail->idx, st->avail_idx_shadow, __ATOMIC_RELEASE);
	st->num_added++;
	__atomic_fetch_add(&st->added, 1, __ATOMIC_RELAXED);
	return 0;
}

/* virtqueue_kick_prepare, lock held: does the device want a kick? */
static int kick_prepare(struct queue *q)
{
	struct vp_driver_state *st = q->st;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	uint16_t new = st->avail_idx_shadow, old = (uint16_t)(new - st->num_added);
	st->num_added = 0;
	int kick = q->event_idx
		? vring_need_event(__atomic_load_n(&vring_avail_event(&q->vr),
						   __ATOMIC_RELAXED), new, old)
		: !(__atomic_load_n(&q->vr.used->flags, __ATOMIC_RELAXED) &
		    VRING_USED_F_NO_NOTIFY);
	if (!kick)
		__atomic_fetch_add(&st->kicks_suppressed, 1, __ATOMIC_RELAXED);
	/* Notification data: the index we published, for the notify. */
	q->nd_word = VP_ND_WORD(q->qi - q->h->queue, new);
	q->nd_full = (uint32_t)__atomic_load_n(&st->added, __ATOMIC_RELAXED);
	return kick;
}

/* virtqueue_notify, outside the lock; under the sync exit, wait for the ack
 * in 200 ms slices while the device process lives. */
static int notify(struct queue *q)
{
	__atomic_fetch_add(&q->st->kicks, 1, __ATOMIC_RELAXED);
	uint64_t end = now_ns() + q->h->exit_cost_ns;
	while (now_ns() < end)
		;                        /* the emulated cost of an exit */
	if (q->nd) {
		/* The doorbell: one aligned 32-bit store, then the measurement
		 * word moves to the furthest index notified (§9.1). */
		struct vp_doorbell *b = &q->sh->bell;
		__atomic_store_n(&b->notify, q->nd_word, __ATOMIC_RELEASE);
		uint32_t told = __atomic_load_n(&b->notified, __ATOMIC_RELAXED);
		while ((int32_t)(q->nd_full - told) > 0 &&
		       !__atomic_compare_exchange_n(&b->notified, &told, q->nd_full, 1,
						    __ATOMIC_RELEASE, __ATOMIC_RELAXED))
			;
	}
	sem_post(q->kick);
	if (q->h->exit_mode != VP_EXIT_SYNC)
		return 0;
	for (;;) {
		int r = sem_wait_ns(q->ack, 200000000ULL);
		if (r != -ETIMEDOUT)
			return r;
		if (pid_gone(__atomic_load_n(&q->h->daemon_pid, __ATOMIC_RELAXED))) {
			fprintf(stderr, "the device process is gone\n");
			return -1;
		}
	}
}

/* virtqueue_get_buf, lock held: 1 and the token, 0 if nothing is used, -1
 * for a used id we never made available. */
static int get_buf(struct queue *q, uint64_t *token, uint32_t *len)
{
	struct vp_driver_state *st = q->st;
	uint16_t num = q->qi->num;
	if (st->last_used_idx == __atomic_load_n(&q->vr.used->idx, __ATOMIC_ACQUIRE))
		return 0;
	struct vring_used_elem *e = &q->vr.used->ring[st->last_used_idx & (num - 1)];
	uint32_t id = __atomic_load_n(&e->id, __ATOMIC_RELAXED);
	uint32_t l = __atomic_load_n(&e->len, __ATOMIC_RELAXED);
	if (id >= num || q->tokens[id] == 0)
		return -1;
	*token = q->tokens[id];
	*len = l;
	/* detach_buf: the chain goes back on the free list. */
	uint16_t j = (uint16_t)id;
	unsigned n = 1;
	q->tokens[id] = 0;
	while (q->vr.desc[j].flags & VRING_DESC_F_NEXT) {
		j = q->vr.desc[j].next;
		n++;
	}
	q->vr.desc[j].next = st->free_head;
	st->free_head = (uint16_t)id;
	st->num_free += n;
	st->last_used_idx++;
	__atomic_fetch_add(&st->completed, 1, __ATOMIC_RELAXED);
	if (!(st->avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT)) {
		__atomic_store_n(&vring_used_event(&q->vr), st->last_used_idx,
				 __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
	}
	return 1;
}

/* Lock held: put a slot token's completion in its slot (REGION.md §11).
 * Returns the slot to wake, or -1 for a token that is no live slot's. */
static int deliver(struct queue *q, uint64_t token, uint32_t len)
{
	uint64_t s = VP_TOKEN_SLOT(token), tag = VP_TOKEN_TAG(token);
	if (s >= VP_MAX_SLOTS || tag >= VP_MAX_TAGS)
		return -1;
	struct vp_guest_slot *slot = &q->sh->slot[s];
	if (VP_TOKEN_GEN(token) != __atomic_load_n(&slot->gen, __ATOMIC_RELAXED))
		return -1;               /* the slot's previous owner's */
	slot->comp[tag].len = len;
	__atomic_store_n(&slot->comp[tag].done, 1, __ATOMIC_RELEASE);
	__atomic_fetch_add(&slot->delivered, 1, __ATOMIC_RELAXED);
	__atomic_fetch_add(&slot->wake_seq, 1, __ATOMIC_SEQ_CST);
	return (int)s;
}

/* The completion path, for everybody on the queue: take every used buffer
 * under the lock, keep the one whose token is mine, deliver slot tokens
 * (my_slot's too), and wake every slot that got one once the lock is
 * dropped.  No callback flags: get_buf with callbacks on keeps used_event
 * where the device needs it.  1 if mine was there (its length in *len). */
static int reap(struct queue *q, uint64_t mine, int my_slot, uint32_t *len)
{
	uint64_t token, wake = 0;
	uint32_t l;
	int found = 0, r;
	lock_acquire(&q->sh->lock);
	while ((r = get_buf(q, &token, &l)) == 1) {
		if (token == mine) {
			*len = l;
			found = 1;
			continue;
		}
		int s = deliver(q, token, l);
		if (s >= 0) {
			wake |= 1ULL << s;
			q->delivered += s != my_slot;
		}
	}
	lock_release(&q->sh->lock);
	for (; wake; wake &= wake - 1)
		syscall(SYS_futex, &q->sh->slot[__builtin_ctzll(wake)].wake_seq,
			FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
	if (r < 0) {
		fprintf(stderr, "a used id the driver never made available\n");
		return -1;
	}
	return found;
}

/* Add one chain, kick if the device wants it (outside the lock).  Returns
 * whether it kicked, or -1. */
static int submit(struct queue *q, const uint64_t *addr, const uint32_t *len,
		  unsigned out, unsigned in, uint64_t token)
{
	lock_acquire(&q->sh->lock);
	if (add(q, addr, len, out, in, token)) {
		lock_release(&q->sh->lock);
		fprintf(stderr, "queue full\n");
		return -1;
	}
	int kick = kick_prepare(q);
	lock_release(&q->sh->lock);
	if (kick && notify(q))
		return -1;
	return kick;
}

/* Wait for a request: by its token (alone on the queue), or by its slot's
 * completion record (slot != NULL; another process may have reaped it).
 * Reap on every call we take, and on our own after a quiet spell. */
static int wait_done(struct queue *q, uint64_t token, int my_slot,
		     struct vp_guest_slot *slot, unsigned tag, uint32_t *len)
{
	uint64_t t0 = now_ns();
	for (;;) {
		int r = reap(q, slot ? 0 : token, my_slot, len);
		if (r < 0)
			return -1;
		if (r > 0)
			return 0;
		if (slot && __atomic_load_n(&slot->comp[tag].done, __ATOMIC_ACQUIRE) == 1) {
			*len = slot->comp[tag].len;
			/* 2, taken: not 0, which a repair would read as "never
			 * delivered" (REGION.md §7.1). */
			__atomic_store_n(&slot->comp[tag].done, 2, __ATOMIC_RELEASE);
			return 0;
		}
		if (now_ns() - t0 > WAIT_NS) {
			fprintf(stderr, "no completion within 5 s\n");
			return -1;
		}
		sem_wait_ns(q->call, QUIET_NS);
	}
}

/* ---- --submit and --slot: one request through the echo device ---- */

/* Claim a slot as REGION.md §11 says: a free one, else one whose owner is
 * gone; then a new generation and clean records, under the lock. */
static int slot_claim(struct queue *q, uint32_t *gen)
{
	int32_t me = getpid();
	int got = -1;
	for (int i = 0; i < VP_MAX_SLOTS && got < 0; i++) {
		int32_t cur = 0;
		if (__atomic_compare_exchange_n(&q->sh->slot[i].owner_pid, &cur, me, 0,
						__ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			got = i;
	}
	for (int i = 0; i < VP_MAX_SLOTS && got < 0; i++) {
		int32_t cur = __atomic_load_n(&q->sh->slot[i].owner_pid, __ATOMIC_RELAXED);
		if (cur > 0 && pid_gone(cur) &&
		    __atomic_compare_exchange_n(&q->sh->slot[i].owner_pid, &cur, me, 0,
						__ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			got = i;
	}
	if (got < 0)
		return -1;
	struct vp_guest_slot *s = &q->sh->slot[got];
	lock_acquire(&q->sh->lock);
	*gen = __atomic_add_fetch(&s->gen, 1, __ATOMIC_RELAXED);
	memset(s->comp, 0, sizeof(s->comp));
	lock_release(&q->sh->lock);
	return got;
}

static int echo_request(struct queue *q, int use_slot)
{
	int s = -1;
	uint32_t gen = 0;
	uint64_t buf = q->qi->data, token = 0xc0ffee;   /* alone: any non-zero token */
	if (use_slot) {
		s = slot_claim(q, &gen);
		if (s < 0) {
			fprintf(stderr, "no free slot\n");
			return 1;
		}
		uint64_t share = VP_SLOT_SHARE(q->qi->data_size);
		if (VP_TAG_SIZE(share, 1) <= VP_SLOT_HDR_AREA) {
			fprintf(stderr, "data share too small for a slot\n");
			__atomic_store_n(&q->sh->slot[s].owner_pid, 0, __ATOMIC_RELEASE);
			return 1;
		}
		buf = q->qi->data + (uint64_t)s * share;   /* tag 0's buffer */
		token = VP_TOKEN(gen, s, 0);
		__atomic_store_n(&q->sh->slot[s].comp[0].done, 0, __ATOMIC_RELEASE);
	}
	/* 16 readable bytes, then 64 writable ones a page further. */
	uint64_t addr[2] = { buf, buf + VP_SLOT_HDR_AREA };
	uint32_t len[2] = { 16, 64 };
	memcpy(gpa(addr[0]), "attach_example\n", 16);
	memset(gpa(addr[1]), 0xff, 64);
	int kicked = submit(q, addr, len, 1, 1, token);
	uint32_t used = 0;
	int r = kicked < 0 ? -1
		: wait_done(q, token, s, s >= 0 ? &q->sh->slot[s] : NULL, 0, &used);
	if (s >= 0)   /* nothing of ours in flight any more: release */
		__atomic_store_n(&q->sh->slot[s].owner_pid, 0, __ATOMIC_RELEASE);
	if (r)
		return 1;
	uint32_t first;
	memcpy(&first, gpa(addr[1]), 4);
	if (s >= 0)
		printf("slot %d gen %u token %#llx used_len %u first_word %u kicked %d "
		       "delivered_to_others %u\n", s, gen, (unsigned long long)token,
		       used, first, kicked, q->delivered);
	else
		printf("submit token %#llx used_len %u first_word %u kicked %d\n",
		       (unsigned long long)token, used, first, kicked);
	return 0;
}

/* ---- --blk: virtio-blk requests (REGION.md §10) ---- */

/* Header at the start of the queue's data share, status byte right after
 * it, data a page further; one request at a time. */
static int blk_request(struct queue *q, uint32_t type, uint64_t sector,
		       const void *out, uint32_t out_len, uint32_t in_len,
		       uint8_t *status, uint32_t *used)
{
	static uint64_t next_token = 1;
	uint64_t hdr = q->qi->data, st = hdr + sizeof(struct virtio_blk_outhdr);
	uint64_t data = hdr + VP_PAGE;
	struct virtio_blk_outhdr *oh = gpa(hdr);
	oh->type = type;
	oh->ioprio = 0;
	oh->sector = sector;
	*(uint8_t *)gpa(st) = 0xff;
	if (out_len)
		memcpy(gpa(data), out, out_len);
	uint64_t addr[3];
	uint32_t len[3];
	unsigned n_out = 0, n_in = 0;
	addr[n_out] = hdr;
	len[n_out++] = sizeof(*oh);
	if (out_len) {
		addr[n_out] = data;
		len[n_out++] = out_len;
	}
	if (in_len) {
		addr[n_out + n_in] = data;
		len[n_out + n_in++] = in_len;
	}
	addr[n_out + n_in] = st;
	len[n_out + n_in++] = 1;
	uint64_t token = next_token++;   /* alone on the queue: any non-zero token */
	if (submit(q, addr, len, n_out, n_in, token) < 0 ||
	    wait_done(q, token, -1, NULL, 0, used))
		return -1;
	*status = *(volatile uint8_t *)gpa(st);
	return 0;
}

static int blk_run(struct queue *q)
{
	enum { BYTES = 8192, SECTOR = 8 };
	static uint8_t pattern[BYTES], zeros[BYTES];
	uint64_t capacity = q->h->blk.capacity;
	uint8_t status;
	uint32_t used;
	uint8_t *data = gpa(q->qi->data + VP_PAGE);
	struct virtio_blk_discard_write_zeroes range = { .sector = SECTOR,
							 .num_sectors = BYTES / 512 };
	if (q->qi->data_size < VP_PAGE + BYTES || capacity < SECTOR + BYTES / 512) {
		fprintf(stderr, "device too small\n");
		return 1;
	}
	for (unsigned i = 0; i < BYTES; i++)
		pattern[i] = (uint8_t)(i * 7 + 1);
#define REQ(what, ...) do { \
		if (blk_request(q, __VA_ARGS__, &status, &used)) \
			return 1; \
		printf("blk %s status %u used %u", what, status, used); \
	} while (0)
	REQ("out", VIRTIO_BLK_T_OUT, SECTOR, pattern, BYTES, 0);
	printf("\n");
	memset(data, 0, BYTES);
	REQ("in", VIRTIO_BLK_T_IN, SECTOR, NULL, 0, BYTES);
	printf(" match %d\n", !memcmp(data, pattern, BYTES));
	REQ("flush", VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0);
	printf("\n");
	REQ("get_id", VIRTIO_BLK_T_GET_ID, 0, NULL, 0, VIRTIO_BLK_ID_BYTES);
	printf(" id %.*s\n", VIRTIO_BLK_ID_BYTES, (char *)data);
	REQ("write_zeroes", VIRTIO_BLK_T_WRITE_ZEROES, 0, &range, sizeof(range), 0);
	printf("\n");
	memset(data, 0xff, BYTES);
	REQ("in_zeroed", VIRTIO_BLK_T_IN, SECTOR, NULL, 0, BYTES);
	printf(" zero %d\n", !memcmp(data, zeros, BYTES));
	REQ("discard", VIRTIO_BLK_T_DISCARD, 0, &range, sizeof(range), 0);
	printf("\n");
	range.flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
	REQ("discard_flags", VIRTIO_BLK_T_DISCARD, 0, &range, sizeof(range), 0);
	printf("\n");
	REQ("in_past_end", VIRTIO_BLK_T_IN, capacity, NULL, 0, 512);
	printf("\n");
	REQ("out_partial_sector", VIRTIO_BLK_T_OUT, SECTOR, pattern, 100, 0);
	printf("\n");
	REQ("unknown_type", 99, 0, NULL, 0, 0);
	printf("\n");
#undef REQ
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s NAME [--submit | --slot | --blk]\n", argv[0]);
		return 2;
	}
	char path[128];
	snprintf(path, sizeof(path), VP_SHM_NAME_FMT, argv[1]);
	int fd = shm_open(path, O_RDWR, 0);
	if (fd < 0) {
		perror(path);
		return 1;
	}
	struct stat sb;
	if (fstat(fd, &sb) || (size_t)sb.st_size < sizeof(struct vp_region_header)) {
		fprintf(stderr, "%s: too small to be a region\n", path);
		return 1;
	}
	base = mmap(NULL, sb.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (base == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	struct vp_region_header *h = (void *)base;
	if (h->magic != VP_MAGIC || h->version != VP_LAYOUT_VERSION ||
	    h->header_size != sizeof(*h)) {
		fprintf(stderr, "not a virtio_py region of layout %d\n", VP_LAYOUT_VERSION);
		return 1;
	}
	if (h->size > (uint64_t)sb.st_size || h->num_queues < 1 ||
	    h->num_queues > VP_MAX_QUEUES) {
		fprintf(stderr, "impossible layout\n");
		return 1;
	}
	printf("version %u header_size %u size %llu\n", h->version, h->header_size,
	       (unsigned long long)h->size);
	printf("name %.64s\n", h->name);
	printf("features %#llx event_idx %d lock_kind %u exit_mode %u serve_mode %u\n",
	       (unsigned long long)h->driver_features,
	       !!(h->driver_features & (1ULL << VIRTIO_RING_F_EVENT_IDX)), h->lock_kind,
	       h->exit_mode, h->serve_mode);
	printf("data_offset %llu data_size %llu\n",
	       (unsigned long long)h->data_offset, (unsigned long long)h->data_size);
	printf("num_queues %u\n", h->num_queues);
	for (unsigned q = 0; q < h->num_queues; q++) {
		struct vp_queue_info *qi = &h->queue[q];
		if (!qi->num || (qi->num & (qi->num - 1)) ||
		    qi->desc > h->size || vring_size(qi->num, VP_RING_ALIGN) > h->size - qi->desc ||
		    qi->shared > h->size || sizeof(struct vp_queue_shared) > h->size - qi->shared) {
			fprintf(stderr, "queue %u: bad ring\n", q);
			return 1;
		}
		/* The ring starts at desc and is laid out by vring_init. */
		struct vring vr;
		vring_init(&vr, qi->num, gpa(qi->desc), VP_RING_ALIGN);
		if ((uint8_t *)vr.avail != gpa(qi->avail) ||
		    (uint8_t *)vr.used != gpa(qi->used)) {
			fprintf(stderr, "queue %u: rings not where vring_init puts them\n", q);
			return 1;
		}
		struct vp_queue_shared *sh = gpa(qi->shared);
		printf("queue %u num %u desc %llu avail %llu used %llu shared %llu "
		       "tokens %llu data %llu data_size %llu lock %u\n", q, qi->num,
		       (unsigned long long)qi->desc, (unsigned long long)qi->avail,
		       (unsigned long long)qi->used, (unsigned long long)qi->shared,
		       (unsigned long long)qi->tokens, (unsigned long long)qi->data,
		       (unsigned long long)qi->data_size, sh->lock.kind);
	}
	int rc = 0;
	if (argc > 2) {
		struct queue q;
		if (queue_open(&q, h, argv[1], 0)) {
			rc = 1;
		} else if (!strcmp(argv[2], "--submit")) {
			rc = echo_request(&q, 0);
		} else if (!strcmp(argv[2], "--slot")) {
			rc = echo_request(&q, 1);
		} else if (!strcmp(argv[2], "--blk")) {
			rc = blk_run(&q);
		} else {
			fprintf(stderr, "unknown option %s\n", argv[2]);
			rc = 2;
		}
		queue_close(&q);
	}
	fflush(stdout);
	munmap(base, sb.st_size);
	return rc;
}
