/* The C core's interface: region layout, driver and device virtqueue
 * operations, the shared lock and the notifiers.  Functions return 0 (or a
 * count) on success and a negative errno or -VP_E* code on failure. */
#ifndef VIRTIO_PY_VP_H
#define VIRTIO_PY_VP_H

#include <stdint.h>
#include <stddef.h>
#include "region.h"

/* Ring validation errors (device side) and layout errors, as -VP_E*. */
#define VP_EBASE        1000
#define VP_EHEAD        1001  /* available head >= queue size */
#define VP_ENEXT        1002  /* descriptor next >= queue size */
#define VP_ELOOP        1003  /* chain longer than the queue: a loop */
#define VP_EADDR        1004  /* buffer outside the data area */
#define VP_EZEROLEN     1005  /* zero-length buffer */
#define VP_EORDER       1006  /* readable buffer after a writable one */
#define VP_EAVAIL       1007  /* avail index more than the queue size ahead */
#define VP_EINFLIGHT    1008  /* head already in flight */
#define VP_EINDIRECT    1009  /* indirect descriptor, not negotiated */
#define VP_EBROKEN      1010  /* queue already marked broken */
#define VP_EUSEDID      1011  /* used id the driver never made available */
#define VP_ENOTINFLIGHT 1012  /* device returns a head that is not in flight */
#define VP_EMAGIC       1013  /* not a virtio_py region, or another version */
#define VP_ELAYOUT      1014  /* header describes an impossible layout */
#define VP_ESEGMAX      1015  /* chain has more segments than the caller takes */
#define VP_EDEVGONE     1016  /* the device process is gone */
#define VP_EFRAME       1017  /* virtio-blk request without header or status */
#define VP_ELAST        1017

const char *vp_strerror(int code);

/* ---- region ---- */
struct vp_region_params {
	uint32_t num_queues;
	uint32_t queue_size;
	uint64_t data_size;          /* bytes of request buffers, for all queues */
	uint64_t device_features;
	uint64_t capacity;           /* sectors */
	uint32_t blk_size;
	uint32_t seg_max;
	uint32_t lock_kind;
	uint32_t exit_mode;
	uint32_t exit_cost_ns;
	uint32_t serve_mode;
	const char *name;
};

int vp_region_size(const struct vp_region_params *p, uint64_t *size);
int vp_region_init(void *base, uint64_t size, const struct vp_region_params *p);
int vp_region_check(const void *base, uint64_t size);
/* Map fd's first size bytes shared, between two PROT_NONE guard pages. */
int vp_map(int fd, uint64_t size, void **base);
int vp_unmap(void *base, uint64_t size);
int vp_guest_poke(void *base, uint64_t size, uint64_t gpa, uint64_t value,
		  unsigned width);
/* 1 if the process is gone (no such pid, or a zombie), else 0. */
int vp_pid_gone(int32_t pid);

/* ---- per-thread accounting: where a guest thread's time goes ---- */
struct vp_acct {
	uint64_t lock_wait_ns;      /* from asking for the lock to having it */
	uint64_t lock_hold_ns;
	uint64_t lock_acquisitions;
	uint64_t kick_ns;           /* inside virtqueue_notify (the exit) */
	uint64_t kicks;
	uint64_t io_wait_ns;        /* sleeping for a completion */
	uint64_t irqs;              /* interrupts handled */
	uint64_t reaped;            /* used buffers taken off the ring */
};
extern __thread struct vp_acct *vp_acct_cur;
void vp_acct_set(struct vp_acct *a);   /* this thread's counters, or NULL */

/* ---- shared lock ---- */
void vp_lock_init(struct vp_lock *l, uint32_t kind, uint32_t spin_ns);
void vp_lock_acquire(struct vp_lock *l);
void vp_lock_release(struct vp_lock *l);
void vp_lock_read(const struct vp_lock *l, struct vp_lockstat *out);
void vp_lock_reset(struct vp_lock *l);
uint64_t vp_now_ns(void);

/* ---- notifiers ---- */
struct vp_notifier;
struct vp_notifier *vp_notifier_open_sem(const char *name, int *err);
struct vp_notifier *vp_notifier_open_eventfd(int fd, int *err);
void vp_notifier_close(struct vp_notifier *n);
int vp_notifier_post(struct vp_notifier *n);
/* Wait up to timeout_ns (<0: forever): 1 taken, 0 timed out, <0 error. */
int vp_notifier_wait(struct vp_notifier *n, int64_t timeout_ns);
/* Take every pending notification without sleeping: how many. */
int vp_notifier_drain(struct vp_notifier *n);
/* The same, for a notifier that may be absent (NULL: 0). */
int vp_notifier_drain_opt(struct vp_notifier *n);

/* ---- driver side ---- */
struct vp_vq;
struct vp_vq *vp_vq_open(void *base, uint64_t size, unsigned index, int *err);
void vp_vq_close(struct vp_vq *vq);
void vp_vq_set_notify(struct vp_vq *vq, struct vp_notifier *kick,
		      struct vp_notifier *ack, uint32_t exit_mode,
		      uint32_t exit_cost_ns);
struct vp_lock *vp_vq_lock(struct vp_vq *vq);
unsigned vp_vq_num_free(struct vp_vq *vq);
unsigned vp_vq_size(struct vp_vq *vq);

int virtqueue_add(struct vp_vq *vq, const uint64_t *addr, const uint32_t *len,
		  unsigned out, unsigned in, uint64_t token);
int virtqueue_kick_prepare(struct vp_vq *vq);
int virtqueue_notify(struct vp_vq *vq);
int virtqueue_kick(struct vp_vq *vq, struct vp_lock *lock);
int virtqueue_get_buf(struct vp_vq *vq, uint64_t *token, uint32_t *len);
void virtqueue_disable_cb(struct vp_vq *vq);
int virtqueue_enable_cb(struct vp_vq *vq);

/* Kick strategies of a whole submission: lock, add, kick, unlock. */
#define VP_KICK_HOLD     0   /* kick with the lock held (2.6.35) */
#define VP_KICK_RELEASE  1   /* the RFC: drop the lock around the notify */
#define VP_KICK_PREPARE  2   /* kick_prepare under the lock, notify after */
int vp_vq_submit(struct vp_vq *vq, int strategy, const uint64_t *addr,
		 const uint32_t *len, unsigned out, unsigned in, uint64_t token);

/* ---- device side ---- */
struct vp_seg {
	uint64_t addr;
	uint32_t len;
	uint32_t write;
};
struct vp_chain {
	uint16_t head;
	uint16_t nseg;
	uint16_t n_out;
	uint16_t n_in;
	uint32_t out_len;
	uint32_t in_len;
};
struct vp_devq;
/* The device passes what it laid out itself, never what the region says. */
struct vp_devq *vp_devq_open(void *base, uint64_t size, uint64_t data_lo,
			     uint64_t data_hi, unsigned index, unsigned num,
			     uint64_t desc, uint64_t avail, uint64_t used,
			     int event_idx, uint32_t exit_mode, int *err);
void vp_devq_close(struct vp_devq *q);
void vp_devq_set_notify(struct vp_devq *q, struct vp_notifier *kick,
			struct vp_notifier *call, struct vp_notifier *ack);
int vp_devq_pop(struct vp_devq *q, struct vp_chain *c, struct vp_seg *segs,
		unsigned max_segs);
int vp_devq_push(struct vp_devq *q, unsigned head, uint32_t len);
int vp_devq_need_interrupt(struct vp_devq *q);
int vp_devq_interrupt(struct vp_devq *q);
void vp_devq_disable_notify(struct vp_devq *q);
int vp_devq_enable_notify(struct vp_devq *q);
int vp_devq_wait_kick(struct vp_devq *q, int64_t timeout_ns);
int vp_devq_ack_kicks(struct vp_devq *q, int n);
int vp_devq_broken(struct vp_devq *q);
void vp_devq_mark_broken(struct vp_devq *q, int code);
unsigned vp_devq_inflight(struct vp_devq *q);
uint8_t *vp_devq_gpa(struct vp_devq *q, uint64_t gpa);
unsigned vp_devq_num(struct vp_devq *q);
struct vp_device_stats *vp_devq_stats(struct vp_devq *q);
struct vp_notifier *vp_devq_kick(struct vp_devq *q);

/* ---- loops in C, for tests and benchmarks ---- */
/* Device: serve n chains (n<0: until *stop), writing a 32-bit sequence into
 * the first writable buffer and returning the writable length as used.
 * poll: spin on the avail ring instead of sleeping on the kick. */
int64_t vp_echo_serve(struct vp_devq *q, int64_t n, int poll,
		      volatile int32_t *stop);
/* Driver: push n chains of one readable and one writable buffer through the
 * queue, batch at a time, kicking after each batch; reaps by polling. */
int64_t vp_echo_drive(struct vp_vq *vq, int64_t n, unsigned batch,
		      int strategy, uint64_t buf_gpa, uint32_t buf_len);

/* ---- benchmarks (csrc/bench.c) ---- */
/* Acquire and release l n times; returns n. */
int64_t vp_lock_hammer(struct vp_lock *l, int64_t n);
/* A start line for benchmark processes on a shared word. */
uint32_t vp_bench_arrive(uint32_t *word);
void vp_bench_wait(const uint32_t *word, uint32_t target);

#endif
