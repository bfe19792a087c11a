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
#endif
