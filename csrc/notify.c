/* Notifiers: kick (driver -> device), call (device -> driver) and the ack
 * that makes a sync exit wait for the device.  A named POSIX semaphore by
 * default; an eventfd fills the same interface, as in vhost-user.
 *
 * Both live where the other side can write them, so nothing here may hang,
 * spin or abort on what a guest wrote:
 * - a semaphore is a file in /dev/shm any guest can map.  glibc's sem_wait
 *   and sem_post abort the process when the futex call fails, and it does
 *   fail once a guest scribbles on the flags word beside the count; and a
 *   drain by sem_trywait costs one call per unit of a count a guest can
 *   set to 2^32.  So on glibc's 64-bit layout (checked once at run time)
 *   the semaphore is driven here: the count is taken whole with one
 *   compare-and-swap, and waits and wake-ups are shared futex calls whose
 *   errors end the wait instead of the process.  Elsewhere the libc calls
 *   are used and a drain stops at its cap.
 * - an eventfd read takes the whole count, and a read on a blocking fd
 *   sleeps when another waiter (thread or process) took it since our
 *   poll().  Reads here never block (RWF_NOWAIT, or the fd's O_NONBLOCK)
 *   and never write a count back, where another process could take it
 *   between our read and our write: a waiter that finds the count gone
 *   goes back to poll().  What a wait takes beyond the one it returns is
 *   this process's surplus, handed out by later waits and takes, and
 *   announced to its other waiters through a private eventfd they poll
 *   beside the shared one: one at a time for every kind, each count
 *   exactly once over all processes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include "vp.h"

#define VP_NOTIFIER_SEM      0
#define VP_NOTIFIER_EVENTFD  1

/* Drain cap where a count cannot be taken whole (libc semaphores). */
#define DRAIN_CAP 4096

struct vp_notifier {
	int kind;
	sem_t *sem;
	int fd;
	int no_nowait;   /* eventfd: preadv2 refused RWF_NOWAIT */
	int local;       /* eventfd: ours, readable while surplus may be > 0 */
	uint64_t surplus;   /* eventfd: counts taken but not handed out yet */
};

/* ---- semaphores on glibc's layout ----
 * struct new_sem of nptl with 64-bit atomics: the count in the low 32 bits
 * of data, the number of sleepers in the high 32, then the futex flags. */
struct glibc_sem {
	uint64_t data;
	int32_t private_flags;
	int32_t pad;
};
#define SEMV_MASK   0xffffffffULL
#define SEM_WAITER  (1ULL << 32)
#define SEMV_MAX    ((uint64_t)SEM_VALUE_MAX)

static int own_sem;   /* 1: this process drives semaphores itself */
static pthread_once_t own_sem_once = PTHREAD_ONCE_INIT;

static struct glibc_sem *gsem(sem_t *s)
{
	return (struct glibc_sem *)s;
}

/* The 32-bit futex word: the count half of data. */
static uint32_t *sem_word(struct glibc_sem *s)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return (uint32_t *)&s->data;
#else
	return (uint32_t *)&s->data + 1;
#endif
}

static long futex(uint32_t *word, int op, uint32_t val,
		  const struct timespec *ts)
{
	/* Never FUTEX_PRIVATE_FLAG: wake-ups cross processes whatever a
	 * guest wrote into private_flags. */
	return syscall(SYS_futex, word, op, val, ts, NULL, FUTEX_BITSET_MATCH_ANY);
}

/* Take up to max of the count (max >= 1): how many. */
static uint64_t gsem_take(struct glibc_sem *s, uint64_t max)
{
	uint64_t d = __atomic_load_n(&s->data, __ATOMIC_RELAXED);
	for (;;) {
		uint64_t v = d & SEMV_MASK;
		if (!v)
			return 0;
		uint64_t t = v < max ? v : max;
		if (__atomic_compare_exchange_n(&s->data, &d, d - t, 1,
						__ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			return t;
	}
}

static int gsem_post(struct glibc_sem *s)
{
	uint64_t d = __atomic_load_n(&s->data, __ATOMIC_RELAXED);
	do {
		/* A count at (or, written by a guest, past) the maximum
		 * must not carry into the sleepers' half. */
		if ((d & SEMV_MASK) >= SEMV_MAX)
			return -EOVERFLOW;
	} while (!__atomic_compare_exchange_n(&s->data, &d, d + 1, 1,
					      __ATOMIC_RELEASE,
					      __ATOMIC_RELAXED));
	if (d >> 32)
		futex(sem_word(s), FUTEX_WAKE, 1, NULL);
	return 0;
}

/* The CLOCK_MONOTONIC instant timeout_ns (>= 0) after from_ns (a
 * vp_now_ns() reading): an absolute deadline, so a wait restarted after
 * EINTR does not stretch. */
static struct timespec deadline_from(uint64_t from_ns, int64_t timeout_ns)
{
	uint64_t end = from_ns + (uint64_t)timeout_ns;
	return (struct timespec){ .tv_sec = (time_t)(end / 1000000000),
				  .tv_nsec = (long)(end % 1000000000) };
}

static struct timespec deadline_after(int64_t timeout_ns)
{
	return deadline_from(vp_now_ns(), timeout_ns);
}

/* A registered sleeper's take: while *d (the last look at s->data) shows
 * a post, take one and unregister in one step.  1 taken, 0 none (*d is
 * the word last seen). */
static int gsem_sleeper_take(struct glibc_sem *s, uint64_t *d)
{
	while (*d & SEMV_MASK)
		if (__atomic_compare_exchange_n(&s->data, d,
						*d - 1 - SEM_WAITER, 1,
						__ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			return 1;
	return 0;
}

/* sem_clockwait's protocol: register as a sleeper, sleep while the count
 * is 0, take one and unregister in one step. */
static int gsem_wait(struct glibc_sem *s, int64_t timeout_ns)
{
	if (gsem_take(s, 1))
		return 1;
	if (timeout_ns == 0)
		return 0;
	struct timespec end, *endp = NULL;
	if (timeout_ns > 0) {
		end = deadline_after(timeout_ns);
		endp = &end;
	}
	uint64_t d = __atomic_add_fetch(&s->data, SEM_WAITER, __ATOMIC_RELAXED);
	for (;;) {
		if (gsem_sleeper_take(s, &d))
			return 1;
		/* FUTEX_WAIT_BITSET: an absolute CLOCK_MONOTONIC deadline. */
		if (futex(sem_word(s), FUTEX_WAIT_BITSET, 0, endp) &&
		    errno != EAGAIN && errno != EINTR) {
			int e = errno;
			__atomic_fetch_sub(&s->data, SEM_WAITER, __ATOMIC_RELAXED);
			return e == ETIMEDOUT ? 0 : -e;
		}
		d = __atomic_load_n(&s->data, __ATOMIC_RELAXED);
	}
}

/* Is sem_t glibc's layout?  Asked of a private semaphore, by driving it
 * both ways: libc posts, we count and take; we post, libc sees and takes. */
static void own_sem_check(void)
{
	if (sizeof(sem_t) < sizeof(struct glibc_sem) ||
	    _Alignof(sem_t) < _Alignof(uint64_t))
		return;
	sem_t s;
	int v = -1;
	if (sem_init(&s, 1, 0))
		return;
	struct glibc_sem *g = gsem(&s);
	int ok = !sem_post(&s) && !sem_post(&s) && !sem_post(&s) &&
		 g->data == 3 && gsem_take(g, UINT64_MAX) == 3 &&
		 sem_trywait(&s) && errno == EAGAIN &&
		 !gsem_post(g) && !sem_getvalue(&s, &v) && v == 1 &&
		 !sem_trywait(&s) && g->data == 0;
	sem_destroy(&s);
	own_sem = ok;
}

/* ---- eventfds ---- */

/* Take the whole count without blocking: >0 taken, 0 none, <0 error. */
static int64_t efd_take(struct vp_notifier *n)
{
	uint64_t v = 0;
	for (;;) {
		ssize_t r;
		if (!__atomic_load_n(&n->no_nowait, __ATOMIC_RELAXED)) {
			struct iovec io = { &v, sizeof(v) };
			r = preadv2(n->fd, &io, 1, -1, RWF_NOWAIT);
			if (r < 0 && (errno == EOPNOTSUPP || errno == EINVAL)) {
				__atomic_store_n(&n->no_nowait, 1,
						 __ATOMIC_RELAXED);
				continue;
			}
		} else {
			/* An old kernel: only an O_NONBLOCK fd (what QEMU
			 * passes) is safe from sleeping in read(). */
			struct pollfd p = { .fd = n->fd, .events = POLLIN };
			if (!(fcntl(n->fd, F_GETFL) & O_NONBLOCK) &&
			    poll(&p, 1, 0) != 1)
				return 0;
			r = read(n->fd, &v, sizeof(v));
		}
		if (r == sizeof(v))
			return v > INT64_MAX ? INT64_MAX : (int64_t)v;
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return 0;   /* another waiter took it */
		return r < 0 ? -errno : -EIO;
	}
}

/* Up to max of the surplus: how many. */
static uint64_t surplus_take(struct vp_notifier *n, uint64_t max)
{
	uint64_t s = __atomic_load_n(&n->surplus, __ATOMIC_RELAXED), t;
	do {
		if (!s)
			return 0;
		t = s < max ? s : max;
	} while (!__atomic_compare_exchange_n(&n->surplus, &s, s - t, 1,
					      __ATOMIC_ACQUIRE,
					      __ATOMIC_RELAXED));
	return t;
}

/* Wake this process's waiters to the surplus (already readable: done). */
static void surplus_announce(struct vp_notifier *n)
{
	uint64_t one = 1;
	if (write(n->local, &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is full, so readable: nothing to do. */
	}
}

/* One count: from the surplus, else from the eventfd, keeping the rest as
 * surplus.  1, 0 none, <0 error.  Whoever leaves surplus announces it, so
 * a waiter never sleeps in poll() while a count waits in the surplus. */
static int efd_take_one(struct vp_notifier *n)
{
	if (surplus_take(n, 1)) {
		if (__atomic_load_n(&n->surplus, __ATOMIC_RELAXED))
			surplus_announce(n);
		return 1;
	}
	int64_t v = efd_take(n);
	if (v <= 0)
		return (int)v;
	if (v > 1) {
		__atomic_fetch_add(&n->surplus, (uint64_t)v - 1, __ATOMIC_RELEASE);
		surplus_announce(n);
	}
	return 1;
}

static int efd_wait(struct vp_notifier *n, int64_t timeout_ns)
{
	uint64_t end = vp_now_ns() + (timeout_ns > 0 ? (uint64_t)timeout_ns : 0);
	for (;;) {
		int r = efd_take_one(n);
		if (r || timeout_ns == 0)
			return r;
		int ms = -1;
		if (timeout_ns > 0) {
			uint64_t now = vp_now_ns();
			if (now >= end)
				return 0;
			uint64_t left = (end - now + 999999) / 1000000;
			ms = left < INT_MAX ? (int)left : INT_MAX;
		}
		struct pollfd p[2] = { { .fd = n->fd, .events = POLLIN },
				       { .fd = n->local, .events = POLLIN } };
		if (poll(p, 2, ms) < 0 && errno != EINTR)
			return -errno;
		if (p[1].revents & POLLIN) {
			/* Cleared, then the surplus looked at by the loop. */
			uint64_t v;
			if (read(n->local, &v, sizeof(v)) < 0) {
				/* EAGAIN: another waiter cleared it. */
			}
		}
	}
}

/* ---- the interface ---- */

struct vp_notifier *vp_notifier_open_sem(const char *name, int *err)
{
	pthread_once(&own_sem_once, own_sem_check);
	sem_t *s = sem_open(name, 0);
	if (s == SEM_FAILED) {
		*err = -errno;
		return NULL;
	}
	struct vp_notifier *n = calloc(1, sizeof(*n));
	if (!n) {
		sem_close(s);
		*err = -ENOMEM;
		return NULL;
	}
	n->kind = VP_NOTIFIER_SEM;
	n->sem = s;
	n->fd = -1;
	/* The semaphore's file is a guest's to truncate as well. */
	vp_guard_add(s, sizeof(sem_t));
	*err = 0;
	return n;
}

/* The notifier takes a duplicate of fd; the caller keeps its own.  Its
 * flags are shared with whoever else holds the fd: left as they are. */
struct vp_notifier *vp_notifier_open_eventfd(int fd, int *err)
{
	int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (d < 0) {
		*err = -errno;
		return NULL;
	}
	int local = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	struct vp_notifier *n = local < 0 ? NULL : calloc(1, sizeof(*n));
	if (!n) {
		*err = local < 0 ? -errno : -ENOMEM;
		if (local >= 0)
			close(local);
		close(d);
		return NULL;
	}
	n->kind = VP_NOTIFIER_EVENTFD;
	n->fd = d;
	n->local = local;
	*err = 0;
	return n;
}

void vp_notifier_close(struct vp_notifier *n)
{
	if (!n)
		return;
	if (n->kind == VP_NOTIFIER_SEM) {
		vp_guard_remove(n->sem);
		sem_close(n->sem);
	} else {
		close(n->fd);
		close(n->local);
	}
	free(n);
}

int vp_notifier_post(struct vp_notifier *n)
{
	if (n->kind == VP_NOTIFIER_SEM) {
		if (own_sem)
			return gsem_post(gsem(n->sem));
		return sem_post(n->sem) ? -errno : 0;
	}
	uint64_t one = 1;
	return write(n->fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
}

int vp_notifier_wait(struct vp_notifier *n, int64_t timeout_ns)
{
	if (n->kind == VP_NOTIFIER_EVENTFD)
		return efd_wait(n, timeout_ns);
	if (own_sem)
		return gsem_wait(gsem(n->sem), timeout_ns);
	if (timeout_ns < 0) {
		while (sem_wait(n->sem))
			if (errno != EINTR)
				return -errno;
		return 1;
	}
	/* Monotonic: a wall-clock step must not stretch or cut the wait. */
	struct timespec ts = deadline_after(timeout_ns);
	while (sem_clockwait(n->sem, CLOCK_MONOTONIC, &ts)) {
		if (errno == ETIMEDOUT)
			return 0;
		if (errno != EINTR)
			return -errno;
	}
	return 1;
}

int vp_notifier_take(struct vp_notifier *n, unsigned max)
{
	if (max == 0)
		return 0;
	if (max > INT_MAX)
		max = INT_MAX;
	if (n->kind == VP_NOTIFIER_EVENTFD) {
		uint64_t t = surplus_take(n, UINT64_MAX);
		int64_t r = efd_take(n);
		if (r < 0 && !t)
			return (int)r;
		if (r > 0)
			t = t > UINT64_MAX - (uint64_t)r ? UINT64_MAX : t + (uint64_t)r;
		return t > max ? (int)max : (int)t;
	}
	if (own_sem) {
		uint64_t t = gsem_take(gsem(n->sem), UINT64_MAX);
		return t > max ? (int)max : (int)t;
	}
	unsigned count = 0, cap = max < DRAIN_CAP ? max : DRAIN_CAP;
	while (count < cap && sem_trywait(n->sem) == 0)
		count++;
	return (int)count;
}

int vp_notifier_drain(struct vp_notifier *n)
{
	return vp_notifier_take(n, INT_MAX);
}

int vp_notifier_drain_opt(struct vp_notifier *n)
{
	return n ? vp_notifier_drain(n) : 0;
}

int vp_notifier_lost(struct vp_notifier *n)
{
	return n && n->kind == VP_NOTIFIER_SEM &&
	       vp_guard_lost(n->sem, sizeof(sem_t));
}

/* ---- a notification or a word: one sleep for both (guest.c) ----
 * A guest worker waiting for its completion takes the interrupt itself,
 * as a halted vCPU does, and is also woken by whoever reaped first and
 * delivered to its slot.  futex_waitv sleeps on the semaphore's count and
 * the slot's word at once; registered as a sleeper, as gsem_wait is, so a
 * post wakes us like any waiter. */
int vp_notifier_wait_or(struct vp_notifier *n, uint32_t *word, uint32_t val,
			int64_t timeout_ns)
{
	return vp_notifier_wait_or_from(n, word, val, 0, timeout_ns);
}

int vp_notifier_wait_or_from(struct vp_notifier *n, uint32_t *word,
			     uint32_t val, uint64_t from_ns, int64_t timeout_ns)
{
#if defined(SYS_futex_waitv) && defined(FUTEX_32)
	if (n->kind != VP_NOTIFIER_SEM || !own_sem || timeout_ns < 0)
		return -EOPNOTSUPP;
	struct glibc_sem *s = gsem(n->sem);
	if (gsem_take(s, 1))
		return 1;
	struct timespec end = from_ns ? deadline_from(from_ns, timeout_ns)
				      : deadline_after(timeout_ns);
	uint64_t d = __atomic_add_fetch(&s->data, SEM_WAITER, __ATOMIC_RELAXED);
	int leave = 0, err = 0;
	for (;;) {
		/* A post is taken even on the way out: its wake-up may have
		 * been ours, and no other sleeper would see it. */
		if (gsem_sleeper_take(s, &d))
			return 1;
		if (leave) {
			if (__atomic_compare_exchange_n(&s->data, &d,
							d - SEM_WAITER, 1,
							__ATOMIC_RELAXED,
							__ATOMIC_RELAXED))
				return err;
			continue;
		}
		/* Never FUTEX_PRIVATE_FLAG: both words are shared. */
		struct futex_waitv w[2] = {
			{ .val = 0, .uaddr = (uintptr_t)sem_word(s),
			  .flags = FUTEX_32 },
			{ .val = val, .uaddr = (uintptr_t)word, .flags = FUTEX_32 },
		};
		long r = syscall(SYS_futex_waitv, w, 2, 0, &end, CLOCK_MONOTONIC);
		if (r == 1)
			leave = 1;
		else if (r < 0 && errno == EAGAIN)
			leave = __atomic_load_n(word, __ATOMIC_SEQ_CST) != val;
		else if (r < 0 && errno != EINTR) {
			leave = 1;
			err = errno == ETIMEDOUT ? 0 : -errno;
		}
		d = __atomic_load_n(&s->data, __ATOMIC_RELAXED);
	}
#else
	(void)n;
	(void)word;
	(void)val;
	(void)from_ns;
	(void)timeout_ns;
	return -ENOSYS;
#endif
}

/* 1 if vp_notifier_wait_or can wait on n and a word with one sleep. */
int vp_notifier_can_wait_or(struct vp_notifier *n)
{
#if defined(SYS_futex_waitv) && defined(FUTEX_32)
	static int have = -1;
	if (have < 0) {
		/* No futexes: EINVAL where the call exists, ENOSYS where not. */
		long r = syscall(SYS_futex_waitv, NULL, 0, 0, NULL, 0);
		__atomic_store_n(&have, !(r < 0 && errno == ENOSYS), __ATOMIC_RELAXED);
	}
	return n && n->kind == VP_NOTIFIER_SEM && own_sem && have;
#else
	(void)n;
	return 0;
#endif
}
