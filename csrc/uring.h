/* A minimal io_uring of our own: the raw system calls and the two rings
 * mapped, no liburing (one build dependency less).  Where the kernel
 * headers lack <linux/io_uring.h> the build still works and
 * vp_uring_init says -ENOSYS; where the kernel refuses io_uring (too old,
 * kernel.io_uring_disabled, a seccomp filter) it says why, and the caller
 * uses its threads instead.
 *
 * One thread submits and reaps: completions of block I/O are finished by
 * task work in the submitting thread, so that thread is the one to wait. */
#ifndef VIRTIO_PY_URING_H
#define VIRTIO_PY_URING_H
#include <pthread.h>
#include <stdint.h>

struct vp_uring_sqe;  /* struct io_uring_sqe */

struct vp_uring {
	int fd;
	unsigned sq_entries, cq_entries;
	unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
	unsigned *cq_head, *cq_tail, *cq_mask;
	void *sqes;          /* struct io_uring_sqe[sq_entries] */
	void *cqes;          /* struct io_uring_cqe[cq_entries] */
	void *sq_map;        /* both rings, in our memory */
	uint64_t sq_map_len, sqes_len;
	unsigned sq_local;   /* SQEs filled, not yet published to the kernel */
	/* io-wq's completions: an eventfd and the thread that passes them on */
	int efd;
	int watch_stop;
	int watching;
	pthread_t watcher;
};

/* A ring with sq SQEs and cq CQEs (powers of two; cq >= sq), its rings
 * in our own memory (IORING_SETUP_NO_MMAP): 0, or -errno (-EOPNOTSUPP
 * where the kernel cannot, -ENOSYS without io_uring, -EPERM disabled).
 * The caller keeps at most cq_entries operations in flight, so no
 * completion ever overflows the CQ. */
int vp_uring_init(struct vp_uring *u, unsigned sq, unsigned cq);
void vp_uring_exit(struct vp_uring *u);
/* Queue a read or write of n bytes between buf and fd at off (op 0 read,
 * 1 write) or an fdatasync of fd (op 2), tagged with data.  -EBUSY when
 * the SQ is full: submit first. */
int vp_uring_prep(struct vp_uring *u, int op, int fd, void *buf, uint32_t n,
		  uint64_t off, uint64_t data);
/* Hand every queued SQE to the kernel: how many it took, or -errno. */
int vp_uring_submit(struct vp_uring *u);
/* The next completion, without sleeping: 1 with its tag and result, 0
 * when there is none.  Each one is consumed. */
int vp_uring_reap(struct vp_uring *u, uint64_t *data, int32_t *res);
/* The kernel's CQ tail word: it moves when a completion is posted (a
 * futex word to sleep on beside another).  A completion posted by task
 * work interrupts the submitting thread's sleep itself; one that the
 * kernel's io-wq threads post (work that would have blocked) only moves
 * the word, so vp_uring_init also starts a thread that FUTEX_WAKEs
 * whoever sleeps on it then (an eventfd registered for io-wq's
 * completions alone). */
uint32_t *vp_uring_cq_tail(struct vp_uring *u);
#endif
