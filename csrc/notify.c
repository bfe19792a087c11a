/* Notifiers: kick (driver -> device), call (device -> driver) and the ack
 * that makes a sync exit wait for the device.  A named POSIX semaphore by
 * default; an eventfd fills the same interface, as in vhost-user. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include "vp.h"

#define VP_NOTIFIER_SEM      0
#define VP_NOTIFIER_EVENTFD  1

struct vp_notifier {
	int kind;
	sem_t *sem;
	int fd;
	pthread_mutex_t mu; /* eventfd: this process's threads read one at a time */
};

struct vp_notifier *vp_notifier_open_sem(const char *name, int *err)
{
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
	*err = 0;
	return n;
}

/* The notifier takes a duplicate of fd; the caller keeps its own. */
struct vp_notifier *vp_notifier_open_eventfd(int fd, int *err)
{
	int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (d < 0) {
		*err = -errno;
		return NULL;
	}
	struct vp_notifier *n = calloc(1, sizeof(*n));
	if (!n) {
		close(d);
		*err = -ENOMEM;
		return NULL;
	}
	n->kind = VP_NOTIFIER_EVENTFD;
	n->fd = d;
	pthread_mutex_init(&n->mu, NULL);
	*err = 0;
	return n;
}

void vp_notifier_close(struct vp_notifier *n)
{
	if (!n)
		return;
	if (n->kind == VP_NOTIFIER_SEM) {
		sem_close(n->sem);
	} else {
		close(n->fd);
		pthread_mutex_destroy(&n->mu);
	}
	free(n);
}

int vp_notifier_post(struct vp_notifier *n)
{
	if (n->kind == VP_NOTIFIER_SEM)
		return sem_post(n->sem) ? -errno : 0;
	uint64_t one = 1;
	return write(n->fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
}

/* An eventfd read takes the whole count.  To count as a semaphore does,
 * take one (or, for a drain, all) and write the rest straight back, where
 * every waiter polling the fd still sees it: a count kept aside in the
 * notifier left the device's other I/O threads asleep on it.  This
 * process's threads read under mu and only while the fd is readable, so
 * none blocks in read() on a count another thread took since its poll.
 * Returns how many were taken, or a negative error. */
static int64_t efd_try(struct vp_notifier *n, int all)
{
	struct pollfd p = { .fd = n->fd, .events = POLLIN };
	uint64_t v = 0;
	int64_t r = 0;
	pthread_mutex_lock(&n->mu);
	if (poll(&p, 1, 0) == 1) {
		if (read(n->fd, &v, sizeof(v)) == sizeof(v)) {
			uint64_t take = all ? (v < INT_MAX ? v : INT_MAX) : 1;
			uint64_t rest = v - take;
			r = (int64_t)take;
			if (rest && write(n->fd, &rest, sizeof(rest)) != sizeof(rest))
				r = -errno;
		} else if (errno != EAGAIN) {
			r = -errno;
		}
	}
	pthread_mutex_unlock(&n->mu);
	return r;
}

static int efd_wait(struct vp_notifier *n, int64_t timeout_ns)
{
	uint64_t end = vp_now_ns() + (timeout_ns > 0 ? (uint64_t)timeout_ns : 0);
	for (;;) {
		int r = (int)efd_try(n, 0);
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
		struct pollfd p = { .fd = n->fd, .events = POLLIN };
		if (poll(&p, 1, ms) < 0 && errno != EINTR)
			return -errno;
	}
}

int vp_notifier_wait(struct vp_notifier *n, int64_t timeout_ns)
{
	if (n->kind == VP_NOTIFIER_EVENTFD)
		return efd_wait(n, timeout_ns);
	if (timeout_ns < 0) {
		while (sem_wait(n->sem))
			if (errno != EINTR)
				return -errno;
		return 1;
	}
	struct timespec ts;
	/* Monotonic: a wall-clock step must not stretch or cut the wait. */
	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += timeout_ns / 1000000000;
	ts.tv_nsec += timeout_ns % 1000000000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	while (sem_clockwait(n->sem, CLOCK_MONOTONIC, &ts)) {
		if (errno == ETIMEDOUT)
			return 0;
		if (errno != EINTR)
			return -errno;
	}
	return 1;
}

int vp_notifier_drain_opt(struct vp_notifier *n)
{
	return n ? vp_notifier_drain(n) : 0;
}

int vp_notifier_drain(struct vp_notifier *n)
{
	int count = 0;
	if (n->kind == VP_NOTIFIER_EVENTFD)
		return (int)efd_try(n, 1);
	while (sem_trywait(n->sem) == 0)
		count++;
	return count;
}
