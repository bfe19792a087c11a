/* The device side of virtio-blk: a RAID-0 store of files and the serve
 * loops that drain queues into it. */
#ifndef VIRTIO_PY_BLKDEV_H
#define VIRTIO_PY_BLKDEV_H
#include "vp.h"

#define VP_STORE_MAX_STRIPES 64

/* Request classes counted in vp_device_stats.req[]. */
#define VP_REQ_IN       0
#define VP_REQ_OUT      1
#define VP_REQ_FLUSH    2
#define VP_REQ_GET_ID   3
#define VP_REQ_DISCARD  4
#define VP_REQ_WZEROES  5
#define VP_REQ_UNSUPP   6
#define VP_REQ_IOERR    7

struct vp_store;
/* fds are borrowed: the caller opened them and closes them after. */
struct vp_store *vp_store_open(const int *fds, unsigned nstripes,
			       uint64_t chunk, uint64_t capacity, int direct,
			       int *err);
void vp_store_close(struct vp_store *s);
/* Logical I/O on the striped volume, split at chunk boundaries. */
int vp_store_rw(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		uint64_t len);
int vp_store_flush(struct vp_store *s);
int vp_store_zero(struct vp_store *s, uint64_t off, uint64_t len, int punch);

struct vp_server;
struct vp_server *vp_server_new(struct vp_store *st, int mode,
				unsigned io_threads, const char *serial,
				int *err);
/* The server borrows q; q keeps its own notifiers. */
int vp_server_add_queue(struct vp_server *srv, struct vp_devq *q);
int vp_server_start(struct vp_server *srv);
/* Stop popping, finish what is in flight, join every thread. */
void vp_server_stop(struct vp_server *srv);
void vp_server_free(struct vp_server *srv);
#endif
