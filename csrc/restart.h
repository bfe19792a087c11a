/* Restarting the device under running guests.
 *
 * The in-flight record: what a device keeps outside guest-writable memory
 * so that a new device process can take over its queues (libvhost-user's
 * inflight area for a split ring, VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, in
 * the same format).  Per queue, one struct vp_inflight_queue at a 64-byte
 * aligned offset, vp_inflight_queue_size(num) bytes apart.  A head is
 * marked 1 before its request starts and cleared after its used entry is
 * published; used_idx is the used index the device last published.  While
 * a completion is being published its head is 2, with its used length in
 * len_lo/len_hi and the used ring index it goes to in next, so a successor
 * publishes it again (the same bytes) instead of running it twice.
 *
 * And the guests' side: a guest that finds the device process gone waits
 * for a successor up to the restart wait before it gives up. */
#ifndef VIRTIO_PY_RESTART_H
#define VIRTIO_PY_RESTART_H
#include <stdint.h>

#define VP_INFLIGHT_VERSION 1
#define VP_INFLIGHT_ALIGN   64

struct vp_inflight_desc {
	uint8_t  inflight;       /* 0 free, 1 popped, 2 completion being published */
	uint8_t  pad;
	uint16_t len_lo;         /* 2: the used length */
	uint16_t len_hi;
	uint16_t next;           /* 2: the used ring index it is published at */
	uint64_t counter;        /* pop order: requests run again in it */
};

struct vp_inflight_queue {
	uint64_t features;       /* 0 */
	uint16_t version;        /* VP_INFLIGHT_VERSION; 0: new, started afresh */
	uint16_t desc_num;       /* queue size */
	uint16_t last_batch_head;/* head last being published */
	uint16_t used_idx;       /* used index last published */
	struct vp_inflight_desc desc[];
};

/* Bytes of one queue's record (libvhost-user's vu_inflight_queue_size). */
uint64_t vp_inflight_queue_size(unsigned num);

struct vp_devq;
/* Keep q's in-flight record in area (size bytes, at least
 * vp_inflight_queue_size of q's size; NULL: no record).  A record of
 * version 0 starts afresh from q's indices; one of VP_INFLIGHT_VERSION is
 * taken over: the used index and the avail index come from it alone, a
 * completion caught being published is published again, and every head
 * in flight is handed out again by vp_devq_pop, in pop order, before any
 * new one.  Returns the heads to run again, -EBUSY (something in flight),
 * -EINVAL, or -VP_ELAYOUT for an inconsistent record (the queue is then
 * broken).  Only while no thread serves q. */
int vp_devq_set_inflight(struct vp_devq *q, void *area, uint64_t size);
/* Heads taken over from a record and not handed out again yet.  Any thread. */
unsigned vp_devq_resubmit_pending(struct vp_devq *q);

/* How long a guest waits for a gone device process to be replaced, in ns
 * (default 5 s, or VIRTIO_PY_RESTART_WAIT in seconds; 0: fail at once). */
int64_t vp_restart_wait_ns(void);
void vp_set_restart_wait_ns(int64_t ns);
/* 1 once the device process whose pid *daemon_pid holds (a region header's,
 * rewritten by each successor) has been gone for the restart wait; 0 while
 * it lives or a successor may still come; 1 at once for a pid <= 0 (no
 * device, said on purpose).  One clock per dead pid and process: a
 * successor that dies starts a new wait.  Any thread. */
int vp_device_gone(const int32_t *daemon_pid);
#endif
