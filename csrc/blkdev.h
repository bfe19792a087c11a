/* The device side of virtio-blk: executing one request (blkreq.c) and the
 * server whose threads drain queues into a store (blkdev.c). */
#ifndef VIRTIO_PY_BLKDEV_H
#define VIRTIO_PY_BLKDEV_H
#include "vp.h"
#include "store.h"
#include "restart.h"

/* Requests are counted in vp_device_stats.req[] by VP_REQ_* (region.h). */

/* Execute one request that vp_devq_pop took from q, on st: read its header,
 * move its data, write its status byte, count it in q's stats.  serial is
 * GET_ID's answer (up to VIRTIO_BLK_ID_BYTES, NUL-padded; NULL: empty).
 * Returns the used length to push, or -VP_EFRAME when the chain has no
 * room for a header and a status byte, or -EFAULT when its buffers were
 * lost to a truncation of guest memory (q is then broken).  Any thread;
 * the caller pushes the head afterwards. */
int64_t vp_blk_handle(struct vp_store *st, struct vp_devq *q,
		      const struct vp_chain *c, const struct vp_seg *segs,
		      const char *serial);

/* A read or write split for an I/O engine that moves the data itself:
 * vp_blk_rw_begin reads the header once and checks the request as
 * vp_blk_handle does.  0: not a read, write or flush (give it to
 * vp_blk_handle);
 * 1: rw describes a flush (rw->flush: sync the store, then end it) or a
 * read or write, and rw->err says what to do: 0 move rw->len bytes
 * between the store at rw->off and the data pieces (vp_blk_rw_walk),
 * 1 move them with vp_blk_rw_do (a layout O_DIRECT cannot take), or
 * -EINVAL answer it with vp_blk_rw_end(.., -EINVAL).  vp_blk_rw_end writes
 * the status byte for the outcome err (0, -errno) and counts it; its
 * result is vp_blk_handle's.  segs must be the ones begin saw.  Any
 * thread. */
struct vp_blk_rw {
	uint8_t *status;
	uint64_t off, len;
	int write, err, flush;
	unsigned i0, i1;
	uint64_t skip;
};
int vp_blk_rw_begin(struct vp_store *st, struct vp_devq *q,
		    const struct vp_chain *c, const struct vp_seg *segs,
		    struct vp_blk_rw *rw);
int vp_blk_rw_walk(const struct vp_seg *segs, const struct vp_blk_rw *rw,
		   int (*fn)(uint8_t *p, uint32_t n, uint64_t pos, void *arg),
		   void *arg);
int vp_blk_rw_do(struct vp_store *st, const struct vp_seg *segs,
		 const struct vp_blk_rw *rw);
int64_t vp_blk_rw_end(struct vp_devq *q, const struct vp_blk_rw *rw, int err);

/* The server: threads that sleep on each queue's kick (notify mode) or
 * poll its ring (poll mode) and run requests with vp_blk_handle.  Every
 * server function is for the thread that owns the server; none may run
 * concurrently with another on the same server. */
#define VP_MAX_IO_THREADS 1024   /* per queue; also caps the poll pool */

struct vp_server;
/* io_threads per queue, 0..VP_MAX_IO_THREADS: notify mode's workers (0:
 * one serve loop runs requests inline), or poll mode's pool share. */
struct vp_server *vp_server_new(struct vp_store *st, int mode,
				unsigned io_threads, const char *serial,
				int *err);
/* Borrow q as the next queue: its index is the number added before it.
 * q keeps its own notifiers; notify mode needs its kick. */
int vp_server_add_queue(struct vp_server *srv, struct vp_devq *q);
/* Put q at index qi (< VP_MAX_QUEUES), or take the queue there away (q
 * NULL).  Only while queue qi is stopped (-EBUSY). */
int vp_server_set_queue(struct vp_server *srv, unsigned qi,
			struct vp_devq *q);
/* Start every queue; -EINVAL without queues or with one running. */
int vp_server_start(struct vp_server *srv);
/* Stop popping, finish what is in flight, join every thread, interrupt the
 * guest for what completed.  Leaves nothing running; start serves again. */
void vp_server_stop(struct vp_server *srv);
/* The same for one queue; the others keep serving. */
int vp_server_start_queue(struct vp_server *srv, unsigned qi);
int vp_server_stop_queue(struct vp_server *srv, unsigned qi);
void vp_server_free(struct vp_server *srv);

/* How notify mode with I/O threads runs a queue's requests on a store of
 * files: io_uring where the kernel, the store and the kick allow it (one
 * thread per queue, batched submissions and completions; uring.h), else
 * io_threads threads each doing one request at a time (the default:
 * AUTO).  THREADS asks for the threads; URING fails a queue's start
 * where io_uring cannot serve.  Only while no queue runs (-EBUSY). */
#define VP_ENGINE_AUTO    0
#define VP_ENGINE_THREADS 1
#define VP_ENGINE_URING   2
#define VP_ENGINE_INLINE  3   /* reported: served by its loop (no I/O threads, or poll mode) */
int vp_server_set_engine(struct vp_server *srv, int engine);
/* The engine running queue qi (VP_ENGINE_THREADS, _URING or _INLINE), or
 * -EINVAL when it is not running. */
int vp_server_queue_engine(struct vp_server *srv, unsigned qi);
#endif
