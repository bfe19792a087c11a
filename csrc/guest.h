/* The guest side of virtio-blk: a process's slot on a shared queue, its
 * interrupt handler thread, and request building (as virtio_blk does). */
#ifndef VIRTIO_PY_GUEST_H
#define VIRTIO_PY_GUEST_H
#include "vp.h"

struct vp_guest;
/* Claims a free slot of the queue (or one whose owner died). */
struct vp_guest *vp_guest_open(void *base, uint64_t size, struct vp_vq *vq,
			       unsigned index, struct vp_notifier *call,
			       int *err);
void vp_guest_close(struct vp_guest *g);
int vp_guest_slot(struct vp_guest *g);
/* Split this slot's share of the data area into depth request buffers. */
int vp_guest_set_depth(struct vp_guest *g, unsigned depth);
uint64_t vp_guest_max_data(struct vp_guest *g);
uint64_t vp_guest_data_gpa(struct vp_guest *g, unsigned tag);
uint8_t *vp_guest_data_ptr(struct vp_guest *g, unsigned tag);
/* Start the thread that takes this process's share of interrupts and runs
 * the completion path (virtblk_done) under the queue lock. */
int vp_guest_start_irq(struct vp_guest *g);
void vp_guest_stop_irq(struct vp_guest *g);
/* The completion path itself: reap the used ring under the lock and
 * deliver every completion to its owner.  Returns how many. */
int vp_guest_reap(struct vp_guest *g);
/* Build and submit a virtio-blk request on buffer tag: header, data
 * (nbytes, direction by type), status byte. */
int vp_guest_blk_submit(struct vp_guest *g, unsigned tag, uint32_t type,
			uint64_t sector, uint32_t nbytes, int strategy);
/* Wait for tag's completion: 0 done, -ETIMEDOUT, -VP_EDEVGONE.  *status
 * gets the virtio-blk status byte, *len the used length. */
int vp_guest_wait(struct vp_guest *g, unsigned tag, int64_t timeout_ns,
		  uint8_t *status, uint32_t *len);
/* Wait for any tag of mask: returns the tag, or a negative code. */
int vp_guest_wait_any(struct vp_guest *g, uint64_t mask, int64_t timeout_ns,
		      uint8_t *status, uint32_t *len);
struct vp_acct *vp_guest_irq_acct(struct vp_guest *g);
#endif
