/* Notifiers: kick (driver -> device), call (device -> driver) and the ack
 * that makes a sync exit wait for the device.  A named POSIX semaphore by
 * default; an eventfd fills the same interface, as in vhost-user. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
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
	uint64_t pending;   /* eventfd: counts read but not yet handed out */
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
	*err = 0;
	return n;
}

void vp_notifier_close(struct vp_notifier *n)
{
	if (!n)
		return;
	if (n->kind == VP_NOTIFIER_SEM)
		sem_close(n->sem);
	else
		close(n->fd);
	free(n);
}

int vp_notifier_post(struct vp_notifier *n)
{
	if (n->kind == VP_NOTIFIER_SEM)
		return sem_post(n->sem) ? -errno : 0;
	uint64_t one = 1;
	return write(n->fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
}

/* eventfd reads take the whole count; hand them out one at a time so both
 * kinds count alike. */
static int efd_take(struct vp_notifier *n, int timeout_ms)
{
	if (n->pending) {
		n->pending--;
		return 1;
	}
	struct pollfd p = { .fd = n->fd, .events = POLLIN };
	int r = poll(&p, 1, timeout_ms);
	if (r < 0)
		return errno == EINTR ? 0 : -errno;
	if (r == 0)
		return 0;
	uint64_t v;
	if (read(n->fd, &v, sizeof(v)) != sizeof(v))
		return errno == EAGAIN ? 0 : -errno;
	n->pending = v - 1;
	return 1;
}

int vp_notifier_wait(struct vp_notifier *n, int64_t timeout_ns)
{
	if (n->kind == VP_NOTIFIER_EVENTFD)
		return efd_take(n, timeout_ns < 0 ? -1 :
				(int)((timeout_ns + 999999) / 1000000));
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
	if (n->kind == VP_NOTIFIER_EVENTFD) {
		while (efd_take(n, 0) == 1)
			count++;
		return count;
	}
	while (sem_trywait(n->sem) == 0)
		count++;
	return count;
}
