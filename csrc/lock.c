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
#include <errno.h>
#include <pthread.h>
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

/* A sleep that ends by VP_LOCK_CHECK_NS at the latest, so the sleeper can
 * ask whether the holder still lives. */
static long futex_wait_check(uint32_t *uaddr, uint32_t val)
{
	struct timespec ts = { 0, VP_LOCK_CHECK_NS };
	return syscall(SYS_futex, uaddr, FUTEX_WAIT, val, &ts, NULL, 0);
}

/* ---- the owner record and takeover ----
 *
 * A holder names itself by pid and start time (VP_LOCK_ID); a waiter that
 * has waited a while asks whether the holder lives, and if not, releases
 * the lock in the dead holder's place, counts a takeover and marks the
 * lock dirty: the state it protects may be half updated, and whoever
 * protects it with this lock repairs it (vp_vq_repair) before using it.
 * Nothing is added to the fast path but the record's two stores. */
static uint64_t self_id, self_start;
static int32_t self_pid;

static void self_forget(void)
{
	self_pid = 0;
}

static uint64_t lock_self_id(void)
{
	static int registered;
	if (__builtin_expect(self_pid != 0, 1))
		return self_id;
	if (!__atomic_exchange_n(&registered, 1, __ATOMIC_RELAXED))
		pthread_atfork(NULL, NULL, self_forget);
	int32_t pid = getpid();
	uint64_t start = 0;
	vp_pid_starttime(pid, &start);
	self_start = start;
	self_id = VP_LOCK_ID(pid, start);
	__atomic_store_n(&self_pid, pid, __ATOMIC_RELEASE);
	return self_id;
}

static void record_holder(struct vp_lock *l, uint64_t claim)
{
	__atomic_store_n(&l->holder[1], self_start, __ATOMIC_RELAXED);
	__atomic_store_n(&l->holder[0], claim, __ATOMIC_RELEASE);
}

/* A record's VP_LOCK_ID: below the ticket a claim keeps in bits 48..63. */
#define CLAIM_ID(c)      ((c) & ((1ULL << 48) - 1))

/* Is the process of id (VP_LOCK_ID) gone?  A zombie is. */
static int id_gone(uint64_t id)
{
	int32_t pid = (int32_t)(id & VP_LOCK_PID_MASK);
	uint64_t start;
	if (vp_pid_gone(pid))
		return 1;
	int r = vp_pid_starttime(pid, &start);
	if (r == -ESRCH)
		return 1;
	return !r && VP_LOCK_ID(pid, start) != CLAIM_ID(id);
}

/* The holder named by the pid in a lock word: with its start time if the
 * owner record is that pid's, else by pid only (it died before writing
 * the record). */
static int pid_holder_gone(struct vp_lock *l, uint32_t pid)
{
	uint64_t rec = __atomic_load_n(&l->holder[0], __ATOMIC_ACQUIRE);
	if ((rec & VP_LOCK_PID_MASK) == pid)
		return id_gone(rec);
	return vp_pid_gone((int32_t)pid);
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
 * matters when waiters outnumber cores and the holder needs ours.
 *
 * Serving ticket t is not yet holding the lock: its taker claims it by
 * compare-exchange of holder[0] to t << 48 | its id, so that a waiter that
 * finds ticket t unclaimed for VP_LOCK_STALL_NS (its taker died in line)
 * can skip it by claiming it for nobody (t << 48), and one that finds t's
 * claimant dead can release it; a skipped taker takes a new ticket. */
/* Ticket t is t + 1 in the record, so that a record of 0 claims none. */
#define TKT(t)           (((t) + 1) & 0xffff)
#define CLAIM_TICKET(c)  ((uint32_t)((c) >> 48))
#define CLAIM(t, id)     ((uint64_t)TKT(t) << 48 | (id))

/* Claim ticket t for id: 0, or -1 when it was skipped. */
static int ticket_claim(struct vp_lock *l, uint32_t t, uint64_t id)
{
	uint64_t c = __atomic_load_n(&l->holder[0], __ATOMIC_ACQUIRE);
	do {
		if (CLAIM_TICKET(c) == TKT(t))
			return -1;
	} while (!__atomic_compare_exchange_n(&l->holder[0], &c, CLAIM(t, id),
					      0, __ATOMIC_ACQ_REL,
					      __ATOMIC_ACQUIRE));
	__atomic_store_n(&l->holder[1], self_start, __ATOMIC_RELAXED);
	return 0;
}

struct stall {
	uint32_t seen;           /* the ticket (word) last seen served */
	uint64_t since;          /* ns: served since */
	uint64_t checked;        /* ns: last liveness check */
};

static void stall_start(struct stall *st, uint32_t seen, uint64_t now)
{
	st->seen = seen;
	st->since = st->checked = now;
}

/* 1 when a waiter that sees o served is due a liveness check: o served
 * since the last look, and VP_LOCK_CHECK_NS since the last check. */
static int stall_due(struct stall *st, uint32_t o, uint64_t now)
{
	if (o != st->seen) {
		stall_start(st, o, now);
		return 0;
	}
	if (now - st->checked < VP_LOCK_CHECK_NS)
		return 0;
	st->checked = now;
	return 1;
}

/* A ticket waiter's periodic look at the ticket now served: release it for
 * a dead claimant, skip it if nobody claimed it for VP_LOCK_STALL_NS. */
static void ticket_check(struct vp_lock *l, struct stall *st, uint32_t o,
			 uint64_t now)
{
	if (!stall_due(st, o, now))
		return;
	uint64_t c = __atomic_load_n(&l->holder[0], __ATOMIC_ACQUIRE);
	/* The record must be o's or older, read while o is still served: a
	 * newer one means the line moved past what we saw. */
	if ((int16_t)(CLAIM_TICKET(c) - TKT(o)) > 0 ||
	    __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST) != o)
		return;
	int claimed = CLAIM_TICKET(c) == TKT(o);
	if (claimed && !CLAIM_ID(c))
		return;                 /* skipped already: owner moves on */
	if (claimed ? !id_gone(c) : now - st->since < VP_LOCK_STALL_NS)
		return;
	if (!__atomic_compare_exchange_n(&l->holder[0], &c, CLAIM(o, 0), 0,
					 __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		return;
	if (claimed)
		__atomic_store_n(&l->dirty, 1, __ATOMIC_SEQ_CST);
	uint32_t want = o;
	if (__atomic_compare_exchange_n(&l->owner, &want, o + 1, 0,
					__ATOMIC_SEQ_CST, __ATOMIC_RELAXED) &&
	    claimed)
		__atomic_fetch_add(&l->takeovers, 1, __ATOMIC_RELAXED);
}

static int ticket_acquire(struct vp_lock *l, int yield, uint64_t *t_wait)
{
	uint64_t id = lock_self_id();
	int contended = 0;
	for (;;) {
		uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
		if (load_acquire(&l->owner) == t) {
			if (ticket_claim(l, t, id) == 0)
				return contended;
			if (!contended)
				*t_wait = vp_now_ns();
			contended = 1;
			continue;
		}
		uint64_t start = vp_now_ns();
		if (!contended)
			*t_wait = start;
		contended = 1;
		struct stall st;
		stall_start(&st, load_acquire(&l->owner), start);
		unsigned spins = 0;
		uint32_t o;
		while ((o = load_acquire(&l->owner)) != t &&
		       (int32_t)(o - t) < 0) {
			if ((++spins & 63) == 0) {
				uint64_t now = vp_now_ns();
				ticket_check(l, &st, o, now);
				if (yield && now - start > l->spin_ns) {
					sched_yield();
					continue;
				}
			}
			cpu_relax();
		}
		if (o == t && ticket_claim(l, t, id) == 0)
			return 1;
		/* Skipped: in line again. */
	}
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
 * head (no starvation; Linux's rw_semaphore hands off so too).  Taking the
 * lock, the head passes the headship on (owner = t) and, if the next
 * ticket sleeps, sets PV_SLOW so its own unlock kicks it: one kick per
 * hand-over, to the next in line only.
 *
 * A waiter among the first four in line names itself in pv_waiter (its
 * ticket and VP_LOCK_ID), so that the others skip a head that is gone, and
 * only such a one (pv_check).
 *
 * Announcements and the words they race with are SEQ_CST: "announce,
 * then look at owner / the lock word" here against "move owner / the lock
 * word, then look at the announcement" on the other side; one of them
 * always sees the other (no lost kick). */
#define PV_LOCKED       VP_PV_LOCKED
#define PV_HANDOFF      VP_PV_HANDOFF  /* the head waited too long: only it may take the lock */
#define PV_SLOW         VP_PV_SLOW     /* the head sleeps: the unlock kicks it */
#define PV_HANDOFF_NS   ((uint64_t)VP_PV_HANDOFF_NS)

#define PV_BITS         (PV_LOCKED | PV_HANDOFF | PV_SLOW)
#define PV_ME()         ((uint32_t)(lock_self_id() & VP_LOCK_PID_MASK) << VP_PV_PID_SHIFT)

static int pv_trylock(uint32_t *word)
{
	uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED);
	return !(v & (PV_LOCKED | PV_HANDOFF)) &&
	       __atomic_compare_exchange_n(word, &v,
					   (v & PV_BITS) | PV_LOCKED | PV_ME(), 0,
					   __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/* Sleep on our ticket's word, announced as halted; counts a kick. */
static void pv_sleep(uint32_t *w, uint32_t halted, uint64_t *slept)
{
	/* 0: a kick woke us.  EAGAIN: kicked before we slept.  EINTR: a
	 * signal.  ETIMEDOUT: time to look at the holder.  Either way the
	 * caller looks again. */
	if (futex_wait_check(w, halted) == 0)
		(*slept)++;
}

/* Pass the headship to t unless a skip has already moved the line past. */
static void pv_advance_owner(struct vp_lock *l, uint32_t t)
{
	uint32_t o = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
	while ((int32_t)(t - o) > 0 &&
	       !__atomic_compare_exchange_n(&l->owner, &o, t, 0,
					    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		;
}

static void pv_kick_head(struct vp_lock *l);

/* A waiter names itself, so that the others can tell a head of the line
 * that is gone from one that only waits for a CPU: the taker of ticket t writes
 * CLAIM(t, its id) into pv_waiter[t % PV_NAMED] once t is among the first
 * PV_NAMED in line (the ticket that had the word before has left the line;
 * a compare-exchange keeps a later ticket's record from a late writer), and
 * clears it once it holds the lock.  1 once named. */
#define PV_NAMED        (sizeof(((struct vp_lock *)0)->pv_waiter) / sizeof(uint64_t))

static int pv_name(struct vp_lock *l, uint32_t t, uint64_t id)
{
	uint32_t o = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
	if ((int32_t)(t - o) > (int32_t)PV_NAMED)
		return 0;
	uint64_t *rec = &l->pv_waiter[t % PV_NAMED];
	uint64_t c = __atomic_load_n(rec, __ATOMIC_SEQ_CST);
	do {
		if (c && (int16_t)(CLAIM_TICKET(c) - TKT(t)) > 0)
			return 1;       /* a later ticket's: the line passed us */
	} while (!__atomic_compare_exchange_n(rec, &c, CLAIM(t, id), 0,
					      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
	return 1;
}

static void pv_unname(struct vp_lock *l, uint32_t t, uint64_t id)
{
	uint64_t c = CLAIM(t, id);
	__atomic_compare_exchange_n(&l->pv_waiter[t % PV_NAMED], &c, 0, 0,
				    __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
}

/* A pvspin waiter's periodic look: release the word of a dead holder, and
 * skip a head that leaves the word free and is gone: named and dead, or
 * never named (it died before naming itself) and the head for
 * VP_LOCK_STALL_NS.  A live head is waited for, however long it waits for
 * a CPU: skipping it would break the line's order, and cost it and the
 * next head a sleep and a kick more. */
static void pv_check(struct vp_lock *l, struct stall *st, uint64_t now)
{
	uint32_t o = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
	if (!stall_due(st, o, now))
		return;
	uint32_t v = __atomic_load_n(&l->futex, __ATOMIC_SEQ_CST);
	if (v & PV_LOCKED) {
		if (!pid_holder_gone(l, v >> VP_PV_PID_SHIFT))
			return;
		__atomic_store_n(&l->dirty, 1, __ATOMIC_SEQ_CST);
		if (__atomic_compare_exchange_n(&l->futex, &v, v & PV_HANDOFF,
						0, __ATOMIC_SEQ_CST,
						__ATOMIC_RELAXED)) {
			__atomic_fetch_add(&l->takeovers, 1, __ATOMIC_RELAXED);
			pv_kick_head(l);
		}
		return;
	}
	uint32_t h = o + 1;
	uint64_t c = __atomic_load_n(&l->pv_waiter[h % PV_NAMED], __ATOMIC_SEQ_CST);
	int named = CLAIM_ID(c) && CLAIM_TICKET(c) == TKT(h);
	if (named ? !id_gone(c) : now - st->since < VP_LOCK_STALL_NS)
		return;
	if (__atomic_compare_exchange_n(&l->owner, &o, o + 1, 0,
					__ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
		pv_kick_head(l);
}

/* 1 once the line has reached want (or passed it: we were skipped). */
static int spin_until_owner(struct vp_lock *l, uint32_t want)
{
	uint64_t start = vp_now_ns();
	unsigned spins = 0;
	while ((int32_t)(load_acquire(&l->owner) - want) < 0) {
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
				    &l->futex, &v,
				    ((v & PV_BITS) | PV_LOCKED | PV_ME()) & ~PV_HANDOFF,
				    0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
				return 1;
			continue;
		}
		cpu_relax();
		if ((++spins & 63) == 0 && vp_now_ns() - start > l->spin_ns)
			return 0;
	}
}

static int pv_acquire(struct vp_lock *l, uint64_t *slept, uint64_t *t_wait)
{
	uint32_t *word = &l->futex;
	if (pv_trylock(word))
		return 0;
	*t_wait = vp_now_ns();
	uint64_t id = lock_self_id();
	uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_SEQ_CST);
	uint32_t *w = &l->pv_halted[t % VP_LOCK_PV_WAITERS];
	uint32_t halted = t << 1 | 1;
	int named = pv_name(l, t, id);
	struct stall st;
	stall_start(&st, __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST), *t_wait);
	/* In line until we are the head. */
	while (!spin_until_owner(l, t - 1)) {
		if (!named)
			named = pv_name(l, t, id);
		pv_check(l, &st, vp_now_ns());
		uint32_t o = __atomic_load_n(&l->owner, __ATOMIC_SEQ_CST);
		if ((int32_t)(o - (t - 1)) >= 0)
			break;
		if (t - 1 - o >= VP_LOCK_PV_WAITERS) {
			sched_yield();     /* too far back to own a word */
			continue;
		}
		__atomic_store_n(w, halted, __ATOMIC_SEQ_CST);
		if ((int32_t)(__atomic_load_n(&l->owner, __ATOMIC_SEQ_CST) -
			      (t - 1)) >= 0)
			break;
		pv_sleep(w, halted, slept);
	}
	/* The head. */
	if (!named)
		named = pv_name(l, t, id);
	uint64_t t_head = vp_now_ns();
	while (!pv_spin_take(l)) {
		pv_check(l, &st, vp_now_ns());
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
	pv_advance_owner(l, t);
	if (named)
		pv_unname(l, t, id);
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
	uint32_t old = __atomic_fetch_and(&l->futex, PV_HANDOFF, __ATOMIC_SEQ_CST);
	if (old & PV_SLOW)
		pv_kick_head(l);
}

static void pv_kick_head(struct vp_lock *l)
{
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

/* mutex: the word is 0 free, else the holder's pid | VP_MUTEX_WAITERS if
 * someone may sleep on it (as a robust futex holds the owner's TID).  A
 * sleeper wakes every VP_LOCK_CHECK_NS to ask whether the holder lives. */
static int mutex_acquire(struct vp_lock *l, uint64_t *slept, uint64_t *t_wait)
{
	uint32_t me = (uint32_t)(lock_self_id() & VP_LOCK_PID_MASK);
	uint32_t c = 0;
	if (__atomic_compare_exchange_n(&l->futex, &c, me, 0, __ATOMIC_ACQUIRE,
					__ATOMIC_RELAXED))
		return 0;
	*t_wait = vp_now_ns();
	for (;;) {
		if (c == 0) {
			/* Others may sleep: keep the bit, so our unlock wakes. */
			if (__atomic_compare_exchange_n(&l->futex, &c,
							me | VP_MUTEX_WAITERS, 0,
							__ATOMIC_ACQUIRE,
							__ATOMIC_RELAXED))
				return 1;
			continue;
		}
		if (!(c & VP_MUTEX_WAITERS) &&
		    !__atomic_compare_exchange_n(&l->futex, &c,
						 c | VP_MUTEX_WAITERS, 0,
						 __ATOMIC_RELAXED,
						 __ATOMIC_RELAXED))
			continue;
		c |= VP_MUTEX_WAITERS;
		long r = futex_wait_check(&l->futex, c);
		if (r == 0)
			(*slept)++;
		else if (errno == ETIMEDOUT &&
			 pid_holder_gone(l, c & VP_LOCK_PID_MASK)) {
			/* Take it over: the dead holder's word becomes ours. */
			__atomic_store_n(&l->dirty, 1, __ATOMIC_SEQ_CST);
			if (__atomic_compare_exchange_n(&l->futex, &c,
							me | VP_MUTEX_WAITERS,
							0, __ATOMIC_ACQUIRE,
							__ATOMIC_RELAXED)) {
				__atomic_fetch_add(&l->takeovers, 1,
						   __ATOMIC_RELAXED);
				return 1;
			}
			continue;
		}
		c = __atomic_load_n(&l->futex, __ATOMIC_RELAXED);
	}
}

static void mutex_release(struct vp_lock *l)
{
	if (__atomic_exchange_n(&l->futex, 0, __ATOMIC_RELEASE) &
	    VP_MUTEX_WAITERS) {
		long n = futex(&l->futex, FUTEX_WAKE, 1);
		if (n > 0)
			__atomic_fetch_add(&l->wakeups, (uint64_t)n,
					   __ATOMIC_RELAXED);
	}
}

/* 1 if it had to wait, and then *t_wait is when it first found the lock
 * taken: as the kernel's lockstat, only a contended acquisition reads the
 * clock for its wait. */
static int lock_raw(struct vp_lock *l, uint64_t *slept, uint64_t *t_wait)
{
	switch (l->kind) {
	case VP_LOCK_MUTEX:
		return mutex_acquire(l, slept, t_wait);
	case VP_LOCK_PVSPIN:
		return pv_acquire(l, slept, t_wait);
	case VP_LOCK_SPINYIELD:
		return ticket_acquire(l, 1, t_wait);
	default:
		return ticket_acquire(l, 0, t_wait);
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
	__atomic_store_n(&l->takeovers, 0, __ATOMIC_RELAXED);
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
	uint64_t slept = 0, t0 = 0;
	int contended = lock_raw(l, &slept, &t0);
	if (l->kind == VP_LOCK_MUTEX || l->kind == VP_LOCK_PVSPIN)
		record_holder(l, lock_self_id());
	uint64_t t1 = vp_now_ns();
	if (!contended)
		t0 = t1;
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

uint64_t vp_lock_takeovers(const struct vp_lock *l)
{
	return __atomic_load_n(&l->takeovers, __ATOMIC_RELAXED);
}

int vp_lock_holder(const struct vp_lock *l, int32_t *pid, uint64_t *start)
{
	uint64_t c = __atomic_load_n(&l->holder[0], __ATOMIC_ACQUIRE);
	*pid = (int32_t)(c & VP_LOCK_PID_MASK);
	*start = __atomic_load_n(&l->holder[1], __ATOMIC_RELAXED);
	return *pid != 0;
}

void vp_lock_reset(struct vp_lock *l)
{
	uint64_t slept = 0, t_wait;
	lock_raw(l, &slept, &t_wait);
	stat_clear(l);
	unlock_raw(l);
}
