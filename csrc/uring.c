/* The raw io_uring (uring.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "uring.h"

#if defined(__has_include)
#if __has_include(<linux/io_uring.h>) && defined(__NR_io_uring_setup)
#define HAVE_URING 1
#endif
#endif

#ifdef HAVE_URING
#include <linux/io_uring.h>

/* The rings in our own memory (IORING_SETUP_NO_MMAP, Linux 6.5): their CQ
 * tail is then a word of an ordinary anonymous page, which a futex can
 * wait on; the kernel's own ring pages cannot be.  Older headers call the
 * address field resv2. */
#ifndef IORING_SETUP_NO_MMAP
#define IORING_SETUP_NO_MMAP (1U << 14)
#define RING_USER_ADDR resv2
#else
#define RING_USER_ADDR user_addr
#endif

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
	return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned submit, unsigned min, unsigned flags)
{
	return (int)syscall(__NR_io_uring_enter, fd, submit, min, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, void *arg, unsigned n)
{
	return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

/* io-wq posted completions: wake the sleeper on the CQ tail.  Never
 * FUTEX_PRIVATE_FLAG: the sleeper's futex_waitv waits shared. */
static void *watch_main(void *arg)
{
	struct vp_uring *u = arg;
	for (;;) {
		uint64_t v;
		ssize_t r = read(u->efd, &v, sizeof(v));
		if (__atomic_load_n(&u->watch_stop, __ATOMIC_ACQUIRE))
			return NULL;
		if (r == sizeof(v))
			syscall(SYS_futex, u->cq_tail, FUTEX_WAKE, 1, NULL, NULL, 0);
	}
}

static int watch_start(struct vp_uring *u)
{
	u->efd = eventfd(0, EFD_CLOEXEC);
	if (u->efd < 0)
		return -errno;
	if (sys_register(u->fd, IORING_REGISTER_EVENTFD_ASYNC, &u->efd, 1))
		return -errno;
	int r = pthread_create(&u->watcher, NULL, watch_main, u);
	if (r)
		return -r;
	u->watching = 1;
	return 0;
}

static void watch_stop(struct vp_uring *u)
{
	if (u->watching) {
		uint64_t one = 1;
		__atomic_store_n(&u->watch_stop, 1, __ATOMIC_RELEASE);
		while (write(u->efd, &one, sizeof(one)) < 0 && errno == EINTR)
			;
		pthread_join(u->watcher, NULL);
		u->watching = 0;
	}
	if (u->efd >= 0)
		close(u->efd);
	u->efd = -1;
}

static void *anon(uint64_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	/* The kernel holds these pages: a fork must not make them copies. */
	madvise(p, len, MADV_DONTFORK);
	return p;
}

int vp_uring_init(struct vp_uring *u, unsigned sq, unsigned cq)
{
	struct io_uring_params p;
	memset(u, 0, sizeof(*u));
	u->fd = -1;
	u->efd = -1;
	if (!sq || sq & (sq - 1) || cq < sq || cq & (cq - 1) || cq > 65536)
		return -EINVAL;
	/* Room for the kernel's struct io_rings, the CQEs and the SQ index
	 * array with its alignment (the kernel lays them out and says
	 * where), and for the SQEs. */
	u->sq_map_len = ((uint64_t)cq * sizeof(struct io_uring_cqe) +
			 (uint64_t)sq * sizeof(unsigned) + 3 * 4096 + 4095) & ~4095ULL;
	u->sqes_len = ((uint64_t)sq * sizeof(struct io_uring_sqe) + 4095) & ~4095ULL;
	u->sq_map = anon(u->sq_map_len);
	u->sqes = anon(u->sqes_len);
	int e = -ENOMEM;
	if (!u->sq_map || !u->sqes)
		goto fail;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_NO_MMAP;
	p.cq_entries = cq;
	p.cq_off.RING_USER_ADDR = (uintptr_t)u->sq_map;
	p.sq_off.RING_USER_ADDR = (uintptr_t)u->sqes;
	int fd = sys_setup(sq, &p);
	if (fd < 0) {
		/* EINVAL: a kernel without NO_MMAP, or one that wants the
		 * rings in fewer pages than ours take. */
		e = errno == EINVAL ? -EOPNOTSUPP : -errno;
		goto fail;
	}
	u->fd = fd;
	/* No completion may be dropped: the kernel must keep overflows. */
	e = -EOPNOTSUPP;
	if (!(p.features & IORING_FEAT_NODROP) || p.sq_entries != sq ||
	    p.cq_entries != cq || p.sq_off.array + sq * sizeof(unsigned) > u->sq_map_len ||
	    p.cq_off.cqes + cq * sizeof(struct io_uring_cqe) > u->sq_map_len)
		goto fail;
	u->sq_entries = p.sq_entries;
	u->cq_entries = p.cq_entries;
	char *r = u->sq_map;
	u->sq_head = (unsigned *)(r + p.sq_off.head);
	u->sq_tail = (unsigned *)(r + p.sq_off.tail);
	u->sq_mask = (unsigned *)(r + p.sq_off.ring_mask);
	u->sq_array = (unsigned *)(r + p.sq_off.array);
	u->cq_head = (unsigned *)(r + p.cq_off.head);
	u->cq_tail = (unsigned *)(r + p.cq_off.tail);
	u->cq_mask = (unsigned *)(r + p.cq_off.ring_mask);
	u->cqes = r + p.cq_off.cqes;
	e = watch_start(u);
	if (e)
		goto fail;
	return 0;
fail:
	vp_uring_exit(u);
	return e;
}

void vp_uring_exit(struct vp_uring *u)
{
	watch_stop(u);
	/* The ring first: it holds the pages pinned. */
	if (u->fd >= 0)
		close(u->fd);
	if (u->sqes)
		munmap(u->sqes, u->sqes_len);
	if (u->sq_map)
		munmap(u->sq_map, u->sq_map_len);
	memset(u, 0, sizeof(*u));
	u->fd = -1;
	u->efd = -1;
}

int vp_uring_prep(struct vp_uring *u, int op, int fd, void *buf, uint32_t n,
		  uint64_t off, uint64_t data)
{
	unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
	unsigned tail = *u->sq_tail + u->sq_local;
	if (tail - head >= u->sq_entries)
		return -EBUSY;
	unsigned i = tail & *u->sq_mask;
	struct io_uring_sqe *e = (struct io_uring_sqe *)u->sqes + i;
	memset(e, 0, sizeof(*e));
	e->fd = fd;
	e->user_data = data;
	if (op == 2) {
		e->opcode = IORING_OP_FSYNC;
		e->fsync_flags = IORING_FSYNC_DATASYNC;
	} else {
		e->opcode = op ? IORING_OP_WRITE : IORING_OP_READ;
		e->addr = (uintptr_t)buf;
		e->len = n;
		e->off = off;
	}
	u->sq_array[i] = i;
	u->sq_local++;
	return 0;
}

int vp_uring_submit(struct vp_uring *u)
{
	unsigned n = u->sq_local;
	if (!n)
		return 0;
	/* The SQEs first, then the tail that hands them over. */
	__atomic_store_n(u->sq_tail, *u->sq_tail + n, __ATOMIC_RELEASE);
	u->sq_local = 0;
	unsigned done = 0;
	while (done < n) {
		int r = sys_enter(u->fd, n - done, 0, 0);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN || errno == EBUSY)
				continue;
			return done ? (int)done : -errno;
		}
		done += (unsigned)r;
	}
	return (int)done;
}

int vp_uring_reap(struct vp_uring *u, uint64_t *data, int32_t *res)
{
	unsigned head = *u->cq_head;
	/* No overflow to fetch: the caller keeps at most cq_entries in flight. */
	if (head == __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE))
		return 0;
	struct io_uring_cqe *c = (struct io_uring_cqe *)u->cqes + (head & *u->cq_mask);
	*data = c->user_data;
	*res = c->res;
	__atomic_store_n(u->cq_head, head + 1, __ATOMIC_RELEASE);
	return 1;
}

uint32_t *vp_uring_cq_tail(struct vp_uring *u)
{
	return u->cq_tail;
}

#else /* no <linux/io_uring.h>: the threads serve */

int vp_uring_init(struct vp_uring *u, unsigned sq, unsigned cq)
{
	(void)sq;
	(void)cq;
	memset(u, 0, sizeof(*u));
	return -ENOSYS;
}

void vp_uring_exit(struct vp_uring *u)
{
	(void)u;
}

int vp_uring_prep(struct vp_uring *u, int op, int fd, void *buf, uint32_t n,
		  uint64_t off, uint64_t data)
{
	(void)u; (void)op; (void)fd; (void)buf; (void)n; (void)off; (void)data;
	return -ENOSYS;
}

int vp_uring_submit(struct vp_uring *u)
{
	(void)u;
	return -ENOSYS;
}

int vp_uring_reap(struct vp_uring *u, uint64_t *data, int32_t *res)
{
	(void)u; (void)data; (void)res;
	return 0;
}

uint32_t *vp_uring_cq_tail(struct vp_uring *u)
{
	return u->cq_tail;
}
#endif
