/* The guest's shared lock (vblk->lock), its lockstat counters and its
 * lock-time histograms.
 *
 * The counters follow Documentation/locking/lockstat.rst and are updated by
 * the holder, so they need no atomics and every acquisition is counted
 * exactly.  Wait time is only measured when the lock was found taken.
 *
 * Kinds: spin (a ticket lock, the kernel's before qspinlock), spinyield
 * (the same, yielding the CPU once it has spun spin_ns), mutex (a futex
 * word, unfair: the running thread may take it before a woken one), and
 * pvspin: a spinlock with the paravirtual slow path of Linux's qspinlock
 * (pv_wait/pv_kick), for waiters that outnumber the CPUs. */
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include "vp.h"
#include "compiler.h"

__thread struct vp_acct *vp_acct_cur;

void vp_acct_set(struct vp_acct *a)
{
	vp_acct_cur = a;
}

uint64_t vp_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static long futex(uint32_t *uaddr, int op, uint32_t val)
{
	/* Not FUTEX_PRIVATE: waiters live in different processes. */
	return syscall(SYS_futex, uaddr, op, val, NULL, NULL, 0);
}

/* Spin before sleeping (pvspin) or yielding (spinyield).  A cross-process
 * futex wake-up costs about 5 us of latency on an idle machine: a waiter
 * that spins a few of those catches the short holds without sleeping. */
#define DEFAULT_SPIN_NS 20000

static void stat_clear(struct vp_lock *l);

void vp_lock_init(struct vp_lock *l, uint32_t kind, uint32_t spin_ns)
{
	memset(l, 0, sizeof(*l));
	l->kind = kind;
	l->spin_ns = spin_ns ? spin_ns : DEFAULT_SPIN_NS;
	if (kind == VP_LOCK_PVSPIN)
		l->next = 1;    /* the head of the line is owner + 1 */
	stat_clear(l);
}

/* Ticket lock; spinyield gives the CPU away once it has spun spin_ns, which
 * matters when waiters outnumber cores and the holder needs ours. */
static int ticket_acquire(struct vp_lock *l, int yield)
{
	uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
	if (load_acquire(&l->owner) == t)
		return 0;
	uint64_t start = yield ? vp_now_ns() : 0;
	unsigned spins = 0;
	while (load_acquire(&l->owner) != t) {
		if (yield && (++spins & 63) == 0 &&
		    vp_now_ns() - start > l->spin_ns)
			sched_yield();
		else
			cpu_relax();
	}
	return 1;
}

/* pvspin: the paravirtual slow path of Linux's qspinlock (pv_wait /
 * pv_kick, with its lock stealing), on a lock word and a ticket line.
 *
 * The lock word (l->futex) is PV_LOCKED while held.  A thread that finds
 * it free takes it, even past waiters in line: a waiter that sleeps, or
 * whose CPU went to another thread, must not leave the lock idle for
 * everyone else (on a ticket lock the next waiter's wake-up and its wait
 * for a CPU stop every thread behind it).  Who finds it taken takes a
 * ticket and waits in line: the head of the line is ticket owner + 1
 * (next starts at 1, so next - owner - 1 are in line).  A waiter spins
 * spin_ns, then announces "ticket t sleeps" in
 * pv_halted[t % VP_LOCK_PV_WAITERS] and sleeps on that word; only a
 * waiter fewer than VP_LOCK_PV_WAITERS tickets from the head sleeps, so a
 * word is one waiter's (t - VP_LOCK_PV_WAITERS was served before).  The
 * head spins for the lock word, then sleeps, marking the word PV_SLOW so
 * the unlock kicks it; once it has been head longer than PV_HANDOFF_NS it
 * sets PV_HANDOFF, and then nobody else takes the lock: it waits for the
 * head (no starvation; Linux's mutex hands off the same way).  Taking the
 * lock, the head passes the headship on (owner = t) and, if the next
 * ticket sleeps, sets PV_SLOW so its own unlock kicks it: one kick per
 * hand-over, to the next in line only.
 *
 * Announcements and the words they race with are SEQ_CST: "announce,
 * then look at owner / the lock word" here against "move owner / the lock
 * word, then look at the announcement" on the other side; one of them
 * always sees the other (no lost kick). */
#define PV_LOCKED       VP_PV_LOCKED
#define PV_HANDOFF      VP_PV_HANDOFF  /* the head waited too long: only it may take the lock */
#define PV_SLOW         VP_PV_SLOW     /* the head sleeps: the unlock kicks it */
#define PV_HANDOFF_NS   ((uint64_t)VP_PV_HANDOFF_NS)

static int pv_trylock(uint32_t *word)
{
	uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED);
	return !(v & (PV_LOCKED | PV_HANDOFF)) &&
	       __atomic_compare_exchange_n(word, &v, v | PV_LOCKED, 0,
					   __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/* Sleep on our ticket's word, announced as halted; counts a kick. */
static void pv_sleep(uint32_t *w, uint32_t halted, uint64_t *slept)
{
	/* 0: a kick woke us.  EAGAIN: kicked before we slept.  EINTR: a
	 * signal.  Either way the caller looks again. */
	if (futex(w, FUTEX_WAIT, halted) == 0)
		(*slept)++;
}

static int spin_until_owner(struct vp_lock *l, uint32_t want)
{
	uint64_t start = vp_now_ns();
	unsigned spins = 0;
	while (load_acquire(&l->owner) != want) {
		cpu_relax();
		if ((++spins & 63) == 0 && vp_now_ns() - start > l->spin_ns)
			return 0;
	}
	return 1;
}

/* The head's spin for the lock word: 1 taken, 0 spin_ns passed. */
static int pv_spin_take(struct vp_lock *l)
{
	uint64_t start = vp_now_ns();
	unsigned spins = 0;
	for (;;) {
		uint32_t v = __atomic_load_n(&l->futex, __ATOMIC_RELAXED);
		if (!(v & PV_LOCKED)) {
			if (__atomic_compare_exchange_n(
				    &l->futex, &v, (v | PV_LOCKED) & ~PV_HANDOFF,
				    0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
				return 1;
			continue;
		}
		cpu_relax();
		if ((++spins & 63) == 0 && vp_now_ns() - start > l->spin_ns)
			return 0;
	}
}

static int pv_acquire(struct vp_lock *l, uint64_t *slept)
{
	uint32_t *word = &l->futex;
	if (pv_trylock(word))
		return 0;
	uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_SEQ_CST);
	uint32_t *w = &l->pv_halted[t % VP_LOCK_PV_WAITERS];
	uint32_t halted = t << 1 | 1;
	/* In line until we are the head. */
	while (!spin_until_owner(l, t - 1)) {
		uint32_t o = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
		if (o == t - 1)
			break;
		if (t - 1 - o >= VP_LOCK_PV_WAITERS) {
			sched_yield();     /* too far back to own a word */
			continue;
		}
		__atomic_store_n(w, halted, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&l->owner, __ATOMIC_SEQ_CST) == t - 1)
			break;
		pv_sleep(w, halted, slept);
	}
	/* The head. */
	uint64_t t_head = vp_now_ns();
	while (!pv_spin_take(l)) {
		/* Still held: sleep until the unlock kicks us. */
		uint32_t mine = vp_now_ns() - t_head > PV_HANDOFF_NS ?
				PV_HANDOFF : 0;
		__atomic_store_n(w, halted, __ATOMIC_SEQ_CST);
		uint32_t v = __atomic_load_n(word, __ATOMIC_SEQ_CST);
		if (!(v & PV_LOCKED))
			continue;
		if (__atomic_compare_exchange_n(word, &v, v | PV_SLOW | mine, 0,
						__ATOMIC_SEQ_CST,
						__ATOMIC_RELAXED))
			pv_sleep(w, halted, slept);
	}
	/* Pass the headship on; if the next in line sleeps, our unlock
	 * kicks it. */
	__atomic_store_n(&l->owner, t, __ATOMIC_SEQ_CST);
	uint32_t s = t + 1;
	if (__atomic_load_n(&l->next, __ATOMIC_SEQ_CST) != s &&
	    __atomic_load_n(&l->pv_halted[s % VP_LOCK_PV_WAITERS],
			    __ATOMIC_SEQ_CST) == (s << 1 | 1))
		__atomic_fetch_or(word, PV_SLOW, __ATOMIC_SEQ_CST);
	return 1;
}

/* The unlock (pv_kick): free the word; if the head sleeps, take its
 * announcement back and wake it.  The head may have changed since it set
 * PV_SLOW only by taking the lock, and then the kick goes to the next
 * head, which is no loss. */
static void pv_release(struct vp_lock *l)
{
	uint32_t old = __atomic_fetch_and(&l->futex, ~(PV_LOCKED | PV_SLOW),
					  __ATOMIC_SEQ_CST);
	if (!(old & PV_SLOW))
		return;
	uint32_t s = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST) + 1;
	uint32_t *w = &l->pv_halted[s % VP_LOCK_PV_WAITERS];
	uint32_t halted = s << 1 | 1;
	if (__atomic_load_n(w, __ATOMIC_SEQ_CST) == halted &&
	    __atomic_compare_exchange_n(w, &halted, s << 1, 0,
					__ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
		long n = futex(w, FUTEX_WAKE, 1);
		if (n > 0)
			__atomic_fetch_add(&l->wakeups, (uint64_t)n,
					   __ATOMIC_RELAXED);
	}
}

static int mutex_acquire(struct vp_lock *l, uint64_t *slept)
{
	uint32_t c = 0;
	if (__atomic_compare_exchange_n(&l->futex, &c, 1, 0, __ATOMIC_ACQUIRE,
					__ATOMIC_RELAXED))
		return 0;
	if (c != 2)
		c = __atomic_exchange_n(&l->futex, 2, __ATOMIC_ACQUIRE);
	while (c != 0) {
		if (futex(&l->futex, FUTEX_WAIT, 2) == 0)
			(*slept)++;
		c = __atomic_exchange_n(&l->futex, 2, __ATOMIC_ACQUIRE);
	}
	return 1;
}

static void mutex_release(struct vp_lock *l)
{
	if (__atomic_fetch_sub(&l->futex, 1, __ATOMIC_RELEASE) != 1) {
		__atomic_store_n(&l->futex, 0, __ATOMIC_RELEASE);
		long n = futex(&l->futex, FUTEX_WAKE, 1);
		if (n > 0)
			__atomic_fetch_add(&l->wakeups, (uint64_t)n,
					   __ATOMIC_RELAXED);
	}
}

static int lock_raw(struct vp_lock *l, uint64_t *slept)
{
	switch (l->kind) {
	case VP_LOCK_MUTEX:
		return mutex_acquire(l, slept);
	case VP_LOCK_PVSPIN:
		return pv_acquire(l, slept);
	case VP_LOCK_SPINYIELD:
		return ticket_acquire(l, 1);
	default:
		return ticket_acquire(l, 0);
	}
}

static void unlock_raw(struct vp_lock *l)
{
	switch (l->kind) {
	case VP_LOCK_MUTEX:
		mutex_release(l);
		break;
	case VP_LOCK_PVSPIN:
		pv_release(l);
		break;
	default:
		store_release(&l->owner, l->owner + 1);
	}
}

static void stat_clear(struct vp_lock *l)
{
	memset(&l->stat, 0, sizeof(l->stat));
	memset(&l->hist, 0, sizeof(l->hist));
	l->stat.wait_min = UINT64_MAX;
	l->stat.hold_min = UINT64_MAX;
	l->sleeps = 0;
	__atomic_store_n(&l->wakeups, 0, __ATOMIC_RELAXED);
	l->last_cpu = -1;
}

/* The log2 bucket of ns (see VP_LOCK_HIST_BUCKETS). */
static unsigned hist_bucket(uint64_t ns)
{
	unsigned b = ns ? 64 - (unsigned)__builtin_clzll(ns) : 0;
	return b < VP_LOCK_HIST_BUCKETS ? b : VP_LOCK_HIST_BUCKETS - 1;
}

void vp_lock_acquire(struct vp_lock *l)
{
	uint64_t slept = 0;
	uint64_t t0 = vp_now_ns();
	int contended = lock_raw(l, &slept);
	uint64_t t1 = vp_now_ns();
	int cpu = sched_getcpu();
	struct vp_lockstat *s = &l->stat;
	int bounce = l->last_cpu >= 0 && l->last_cpu != cpu;
	if (contended) {
		uint64_t w = t1 - t0;
		s->contentions++;
		s->con_bounces += bounce;
		s->wait_total += w;
		if (w < s->wait_min)
			s->wait_min = w;
		if (w > s->wait_max)
			s->wait_max = w;
		l->hist.wait[hist_bucket(w)]++;
		l->sleeps += slept;
	}
	s->acquisitions++;
	s->acq_bounces += bounce;
	l->last_cpu = cpu;
	l->t_acquired = t1;
	if (vp_acct_cur) {
		vp_acct_cur->lock_wait_ns += t1 - t0;
		vp_acct_cur->lock_acquisitions++;
	}
}

void vp_lock_release(struct vp_lock *l)
{
	uint64_t h = vp_now_ns() - l->t_acquired;
	struct vp_lockstat *s = &l->stat;
	s->hold_total += h;
	if (h < s->hold_min)
		s->hold_min = h;
	if (h > s->hold_max)
		s->hold_max = h;
	l->hist.hold[hist_bucket(h)]++;
	unlock_raw(l);
	if (vp_acct_cur)
		vp_acct_cur->lock_hold_ns += h;
}

void vp_lock_read(const struct vp_lock *l, struct vp_lockstat *out)
{
	memcpy(out, (const void *)&l->stat, sizeof(*out));
	if (out->wait_min == UINT64_MAX)
		out->wait_min = 0;
	if (out->hold_min == UINT64_MAX)
		out->hold_min = 0;
}

void vp_lock_read_hist(const struct vp_lock *l, struct vp_lockhist *out,
		       uint64_t *sleeps, uint64_t *wakeups)
{
	memcpy(out, (const void *)&l->hist, sizeof(*out));
	*sleeps = READ_ONCE(l->sleeps);
	*wakeups = __atomic_load_n(&l->wakeups, __ATOMIC_RELAXED);
}

void vp_lock_reset(struct vp_lock *l)
{
	uint64_t slept = 0;
	lock_raw(l, &slept);
	stat_clear(l);
	unlock_raw(l);
}
