/* The guest's shared lock (vblk->lock) and its lockstat counters.
 *
 * The counters follow Documentation/locking/lockstat.rst and are updated by
 * the holder, so they need no atomics and every acquisition is counted
 * exactly.  Wait time is only measured when the lock was found taken. */
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

static void stat_clear(struct vp_lock *l);

void vp_lock_init(struct vp_lock *l, uint32_t kind, uint32_t spin_ns)
{
	memset(l, 0, sizeof(*l));
	l->kind = kind;
	l->spin_ns = spin_ns ? spin_ns : 20000;
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

static int mutex_acquire(struct vp_lock *l)
{
	uint32_t c = 0;
	if (__atomic_compare_exchange_n(&l->futex, &c, 1, 0, __ATOMIC_ACQUIRE,
					__ATOMIC_RELAXED))
		return 0;
	if (c != 2)
		c = __atomic_exchange_n(&l->futex, 2, __ATOMIC_ACQUIRE);
	while (c != 0) {
		futex(&l->futex, FUTEX_WAIT, 2);
		c = __atomic_exchange_n(&l->futex, 2, __ATOMIC_ACQUIRE);
	}
	return 1;
}

static int lock_raw(struct vp_lock *l)
{
	switch (l->kind) {
	case VP_LOCK_MUTEX:
		return mutex_acquire(l);
	case VP_LOCK_SPINYIELD:
		return ticket_acquire(l, 1);
	default:
		return ticket_acquire(l, 0);
	}
}

static void unlock_raw(struct vp_lock *l)
{
	if (l->kind == VP_LOCK_MUTEX) {
		if (__atomic_fetch_sub(&l->futex, 1, __ATOMIC_RELEASE) != 1) {
			__atomic_store_n(&l->futex, 0, __ATOMIC_RELEASE);
			futex(&l->futex, FUTEX_WAKE, 1);
		}
	} else {
		store_release(&l->owner, l->owner + 1);
	}
}

static void stat_clear(struct vp_lock *l)
{
	memset(&l->stat, 0, sizeof(l->stat));
	l->stat.wait_min = UINT64_MAX;
	l->stat.hold_min = UINT64_MAX;
	l->last_cpu = -1;
}

void vp_lock_acquire(struct vp_lock *l)
{
	uint64_t t0 = vp_now_ns();
	int contended = lock_raw(l);
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

void vp_lock_reset(struct vp_lock *l)
{
	lock_raw(l);
	stat_clear(l);
	unlock_raw(l);
}
