/* The C core's interface: region layout, driver and device virtqueue
 * operations, the shared lock and the notifiers.  Functions return 0 (or a
 * count) on success and a negative errno or -VP_E* code on failure.
 *
 * Each section names the file that implements it.  Guest memory tables
 * (mem.h), block stores (store.h), virtio-blk (blkdev.h) and the guest's
 * side of it (guest.h) have headers of their own. */
#ifndef VIRTIO_PY_VP_H
#define VIRTIO_PY_VP_H

#include <stdint.h>
#include <stddef.h>
#include "region.h"

/* Text of a VP_E* code (region.h) or an errno, either sign.  error.c */
const char *vp_strerror(int code);

/* ---- region (region.c) ---- */
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
/* Queue index's row of the queue table as vp_region_init writes it, from
 * p alone: the creator's private copy of its layout.  No lock. */
int vp_region_layout(const struct vp_region_params *p, unsigned index,
		     struct vp_queue_info *qi);
/* GPA of queue index's struct vp_queue_shared in a region vp_region_init
 * laid out with queue size num.  No lock. */
uint64_t vp_region_shared_gpa(unsigned index, unsigned num);
/* Map fd's first size bytes shared, between two PROT_NONE guard pages,
 * guarded against truncation (vp_guard_add). */
int vp_map(int fd, uint64_t size, void **base);
int vp_unmap(void *base, uint64_t size);

/* ---- truncation guard (region.c) ----
 * A SIGBUS in a guarded mapping (its object was truncated) maps private
 * zero pages over the rest of it instead of killing the process.  Any
 * thread. */
int vp_guard_add(void *p, uint64_t len);    /* 0, -ENOSPC: table full */
void vp_guard_remove(void *p);              /* before unmapping p */
/* Moves on every repair: compare to learn that memory was lost. */
uint32_t vp_guard_gen(void);
/* 1 if any of [p, p + len) was lost to a truncation. */
int vp_guard_lost(const void *p, uint64_t len);
int vp_guest_poke(void *base, uint64_t size, uint64_t gpa, uint64_t value,
		  unsigned width);

/* ---- processes (proc.c) ---- */
/* 1 if the process is gone (no such pid, or a zombie), else 0. */
int vp_pid_gone(int32_t pid);
/* The process's start time (clock ticks after boot, /proc/PID/stat field
 * 22): with the pid it names one process, as pids are reused.  0, or
 * -ESRCH if there is none. */
int vp_pid_starttime(int32_t pid, uint64_t *start);

/* ---- per-thread accounting: where a guest thread's time goes (lock.c) ---- */
struct vp_acct {
	uint64_t lock_wait_ns;      /* contended: from finding it taken to having it */
	uint64_t lock_hold_ns;
	uint64_t lock_acquisitions;
	uint64_t kick_ns;           /* inside virtqueue_notify (the exit) */
	uint64_t kicks;
	uint64_t io_wait_ns;        /* polling or asleep for a completion */
	uint64_t irqs;              /* interrupts handled */
	uint64_t reaped;            /* used buffers taken off the ring */
	uint64_t polled;            /* waits that halt polling ended, unslept */
	uint64_t poll_ns;           /* spent halt polling */
};
extern __thread struct vp_acct *vp_acct_cur;
void vp_acct_set(struct vp_acct *a);   /* this thread's counters, or NULL */

/* ---- shared lock (lock.c) ---- */
void vp_lock_init(struct vp_lock *l, uint32_t kind, uint32_t spin_ns);
void vp_lock_acquire(struct vp_lock *l);
void vp_lock_release(struct vp_lock *l);
void vp_lock_read(const struct vp_lock *l, struct vp_lockstat *out);
/* The histograms and the sleep/wake-up counters.  No lock (a snapshot). */
void vp_lock_read_hist(const struct vp_lock *l, struct vp_lockhist *out,
		       uint64_t *sleeps, uint64_t *wakeups);
void vp_lock_reset(struct vp_lock *l);
/* Holders found dead and released by a waiter.  No lock (a snapshot). */
uint64_t vp_lock_takeovers(const struct vp_lock *l);
/* The owner record: pid and start time of the last holder; 0 if none.  No
 * lock (a snapshot). */
int vp_lock_holder(const struct vp_lock *l, int32_t *pid, uint64_t *start);
uint64_t vp_now_ns(void);

/* ---- notifiers (notify.c) ---- */
struct vp_notifier;
struct vp_notifier *vp_notifier_open_sem(const char *name, int *err);
struct vp_notifier *vp_notifier_open_eventfd(int fd, int *err);
void vp_notifier_close(struct vp_notifier *n);
int vp_notifier_post(struct vp_notifier *n);
/* Wait up to timeout_ns (<0: forever): 1 taken, 0 timed out, <0 error.
 * Any thread, any process: each notification posted is taken once. */
int vp_notifier_wait(struct vp_notifier *n, int64_t timeout_ns);
/* The same wait (timeout_ns >= 0), also ended by a FUTEX_WAKE of word (a
 * shared futex word) and never begun while *word != val: 1 took a
 * notification, 0 woken by word or timed out.  -EOPNOTSUPP where one
 * sleep cannot cover both (an eventfd, a semaphore not on glibc's
 * layout), -ENOSYS without futex_waitv (Linux < 5.16).  Any thread. */
int vp_notifier_wait_or(struct vp_notifier *n, uint32_t *word, uint32_t val,
			int64_t timeout_ns);
/* vp_notifier_wait_or with the timeout counted from from_ns, a recent
 * vp_now_ns() reading the caller has (0: now), so the hot path does not
 * read the clock twice.  Any thread. */
int vp_notifier_wait_or_from(struct vp_notifier *n, uint32_t *word,
			     uint32_t val, uint64_t from_ns, int64_t timeout_ns);
/* 1 if vp_notifier_wait_or can wait on n, else 0.  Any thread. */
int vp_notifier_can_wait_or(struct vp_notifier *n);
/* Take every pending notification at once, without sleeping: how many,
 * saturating at max (a guest may have written any count).  Any thread. */
int vp_notifier_take(struct vp_notifier *n, unsigned max);
/* vp_notifier_take with max INT_MAX. */
int vp_notifier_drain(struct vp_notifier *n);
/* The same, for a notifier that may be absent (NULL: 0). */
int vp_notifier_drain_opt(struct vp_notifier *n);
/* 1 if the notifier's shared memory was lost to a truncation. */
int vp_notifier_lost(struct vp_notifier *n);

/* ---- driver side (virtio_ring.c) ----
 * Driver state lives in the region and is shared by every guest process on
 * the queue; "the queue lock" is vp_vq_lock(vq), vblk->lock's counterpart. */
struct vp_vq;
/* Attach to queue index of a mapped region.  Any thread, no lock. */
struct vp_vq *vp_vq_open(void *base, uint64_t size, unsigned index, int *err);
/* Detach; the caller's threads no longer use vq.  No lock. */
void vp_vq_close(struct vp_vq *vq);
/* Set before the queue is used: no other thread of ours uses vq. */
void vp_vq_set_notify(struct vp_vq *vq, struct vp_notifier *kick,
		      struct vp_notifier *ack, uint32_t exit_mode,
		      uint32_t exit_cost_ns);
/* The queue lock itself.  No lock. */
struct vp_lock *vp_vq_lock(struct vp_vq *vq);
/* Take the queue lock, repairing the driver state first if a holder died
 * inside it (vp_vq_repair).  Any thread. */
void vp_vq_lock_acquire(struct vp_vq *vq);
/* Rebuild the driver state from the ring after a dead holder.  Caller
 * holds the queue lock. */
void vp_vq_repair(struct vp_vq *vq);
/* vp_vq_repair if the lock is marked dirty: 1 repaired, 0 clean.  For a
 * holder that took the lock by vp_lock_acquire.  Caller holds the queue
 * lock. */
int vp_vq_repair_if_dirty(struct vp_vq *vq);
/* Consistency of the driver state against the ring: the free list and the
 * chains of the heads with a token cover every descriptor once, num_free
 * counts the free list, the shadows match the ring, no record is left
 * set.  0, or -EUCLEAN with the first fault in why.  Caller holds the
 * queue lock, or nobody drives the queue. */
int vp_vq_check(struct vp_vq *vq, char *why, size_t n);
/* Free descriptors.  Caller holds the queue lock (unlocked: a hint). */
unsigned vp_vq_num_free(struct vp_vq *vq);
/* Queue size.  No lock. */
unsigned vp_vq_size(struct vp_vq *vq);

/* Expose a chain of out readable then in writable buffers.  Caller holds
 * the queue lock.  -ENOSPC: not enough free descriptors. */
int virtqueue_add(struct vp_vq *vq, const uint64_t *addr, const uint32_t *len,
		  unsigned out, unsigned in, uint64_t token);
/* 1 if the device wants a kick for what was added since the last call.
 * Caller holds the queue lock. */
int virtqueue_kick_prepare(struct vp_vq *vq);
/* Kick the device (and pay the exit).  Caller need not hold the queue
 * lock, and should not: that is the point of kick_prepare.  With
 * VIRTIO_F_NOTIFICATION_DATA it first stores the word this vq's last
 * kick_prepare made into the queue's doorbell. */
int virtqueue_notify(struct vp_vq *vq);
/* kick_prepare, then notify.  Caller holds the queue lock; with lock
 * non-NULL (the queue lock) it is dropped around the notify, as the RFC
 * does, and held again on return.  1 kicked, 0 suppressed, <0 error. */
int virtqueue_kick(struct vp_vq *vq, struct vp_lock *lock);
/* Take one used buffer: 1 (token, len), 0 none, <0 bad used id.  Caller
 * holds the queue lock. */
int virtqueue_get_buf(struct vp_vq *vq, uint64_t *token, uint32_t *len);
/* The completion path's get_buf: the same, but the reap record (REGION.md
 * 7.1) stays set until vp_vq_deliver, so a repair after the caller died
 * in between delivers the token.  Caller holds the queue lock. */
int vp_vq_get_buf_reap(struct vp_vq *vq, uint64_t *token, uint32_t *len);
/* Deliver a slot token's completion (comp[tag], delivered, wake_seq) and
 * clear the reap record: the slot to wake after unlocking, or -1 (no
 * slot, or another generation's: dropped).  Caller holds the queue lock. */
int vp_vq_deliver(struct vp_vq *vq, uint64_t token, uint32_t len);
/* Wake the waiters of slot s (a slot vp_vq_deliver returned) on its
 * wake_seq.  Any thread; best after the queue lock is dropped. */
void vp_vq_slot_wake(struct vp_vq *vq, unsigned s);
/* comp[tag].done: 0 submitted (reset under the queue lock), VP_COMP_DONE
 * delivered, VP_COMP_TAKEN taken by its owner (REGION.md 7.1). */
#define VP_COMP_DONE   1
#define VP_COMP_TAKEN  2
/* 1 if the device has used buffers nobody took yet.  A hint, read
 * without the lock (Linux's virtqueue_poll): get_buf under the lock
 * decides. */
int virtqueue_more_used(struct vp_vq *vq);
/* Ask for no interrupts.  Caller holds the queue lock. */
void virtqueue_disable_cb(struct vp_vq *vq);
/* Ask for interrupts again: 1 on, nothing pending; 0 used buffers came
 * meanwhile, reap again.  Caller holds the queue lock. */
int virtqueue_enable_cb(struct vp_vq *vq);

/* Kick strategies of a whole submission: lock, add, kick, unlock. */
#define VP_KICK_HOLD     0   /* kick with the lock held (2.6.35) */
#define VP_KICK_RELEASE  1   /* the RFC: drop the lock around the notify */
#define VP_KICK_PREPARE  2   /* kick_prepare under the lock, notify after */
/* A whole submission.  Takes and drops the queue lock itself: the caller
 * must not hold it. */
int vp_vq_submit(struct vp_vq *vq, int strategy, const uint64_t *addr,
		 const uint32_t *len, unsigned out, unsigned in, uint64_t token);
/* vp_vq_submit that stores 0 into *done once it holds the lock, before the
 * add: a slot tag's completion record (REGION.md 7.1).  Caller must not
 * hold the queue lock. */
int vp_vq_submit_reset(struct vp_vq *vq, int strategy, const uint64_t *addr,
		       const uint32_t *len, unsigned out, unsigned in,
		       uint64_t token, uint32_t *done);

/* VIRTIO_F_NOTIFICATION_DATA, driver side: the remedies (VP_ND_LOCKED,
 * VP_ND_MONOTONIC, or 0) this driver takes.  Returns 1 if the feature is
 * negotiated (the remedies then apply), 0 if not, -EINVAL for unknown
 * bits.  Before the queue is used, like vp_vq_set_notify. */
int vp_vq_set_nd(struct vp_vq *vq, unsigned remedy);
/* Test hook: before every doorbell write, gate[0]++ and wait up to
 * timeout_ns for gate[1] != 0 (gate: two shared words; NULL: off).  Like
 * vp_vq_set_notify. */
void vp_vq_set_gate(struct vp_vq *vq, uint32_t *gate, int64_t timeout_ns);

/* ---- device side (vringh.c) ----
 * One device queue is served by the device process's threads.  pop, push,
 * interrupt and notify suppression take the queue's own mutex: any thread
 * may call them, concurrently.  open/close, set_notify, set_mem and
 * set_base are for the thread that owns the queue, while no other thread
 * uses it (the server's threads for it stopped). */
struct vp_seg {
	uint64_t addr;           /* GPA, as the descriptor says */
	uint32_t len;
	uint32_t write;
	uint8_t *host;           /* addr translated: where the device reads or writes */
};
struct vp_chain {
	uint16_t head;
	uint16_t nseg;
	uint16_t n_out;
	uint16_t n_in;
	uint32_t out_len;
	uint32_t in_len;
};
struct vp_mem;
struct vp_devq;
/* Native transport: the queue of a region this process laid out with
 * vp_region_init.  The device passes what it laid out itself, never what
 * the region says: ring parts as GPAs, and the queue's data share
 * [data_lo, data_hi), the only guest memory its buffers may use.  Counters
 * go to the queue's stats block, found by vp_region_shared_gpa (not by the
 * header), NEEDS_RESET to the header's status.  A queue whose memory is
 * lost to a truncation breaks with EFAULT. */
struct vp_devq *vp_devq_open(void *base, uint64_t size, uint64_t data_lo,
			     uint64_t data_hi, unsigned index, unsigned num,
			     uint64_t desc, uint64_t avail, uint64_t used,
			     int event_idx, uint32_t exit_mode, int *err);
/* Any transport: rings at host addresses the caller translated and checked
 * (desc 16*num bytes, avail 6+2*num, used 6+8*num, each naturally
 * aligned), buffers checked against a copy of mem.  Counters go to stats
 * (private memory, at least 8-byte aligned, kept by the caller for the
 * queue's life) or, with NULL, to the queue's own block. */
struct vp_devq *vp_devq_open_mem(const struct vp_mem *mem, unsigned index,
				 unsigned num, void *desc, void *avail,
				 void *used, struct vp_device_stats *stats,
				 int event_idx, uint32_t exit_mode, int *err);
void vp_devq_close(struct vp_devq *q);
/* A new guest memory table (vhost-user SET_MEM_TABLE), copied.  Only while
 * no thread serves q. */
int vp_devq_set_mem(struct vp_devq *q, const struct vp_mem *mem);
/* Where the queue starts (vhost-user SET_VRING_BASE) and where it is
 * (GET_VRING_BASE).  set: only while no thread serves q, with nothing in
 * flight (-EBUSY).  get: any thread. */
int vp_devq_set_base(struct vp_devq *q, uint16_t last_avail_idx,
		     uint16_t used_idx);
void vp_devq_get_base(struct vp_devq *q, uint16_t *last_avail_idx,
		      uint16_t *used_idx);
void vp_devq_set_notify(struct vp_devq *q, struct vp_notifier *kick,
			struct vp_notifier *call, struct vp_notifier *ack);
/* Next available chain, every rule checked: 1 taken, 0 none, <0 the rule
 * broken (the queue is then broken).  Any thread. */
int vp_devq_pop(struct vp_devq *q, struct vp_chain *c, struct vp_seg *segs,
		unsigned max_segs);
/* Return a popped head with its used length.  Any thread. */
int vp_devq_push(struct vp_devq *q, unsigned head, uint32_t len);
/* Would vp_devq_interrupt send one now?  Only asks.  Any thread. */
int vp_devq_need_interrupt(struct vp_devq *q);
/* Interrupt the driver if it wants one: 1 sent, 0 not.  Any thread. */
int vp_devq_interrupt(struct vp_devq *q);
/* Kick suppression.  enable: 1 if work came meanwhile.  Any thread. */
void vp_devq_disable_notify(struct vp_devq *q);
int vp_devq_enable_notify(struct vp_devq *q);
/* Sleep on the kick (timeout 0: do not), then take every pending one at
 * once: how many, at most the queue size (a count a guest wrote into the
 * notifier saturates there).  Any thread. */
int vp_devq_wait_kick(struct vp_devq *q, int64_t timeout_ns);
/* For a kick wait of the caller's own (the io_uring engine also waits on
 * its completions): the timeout to wait with (a trusting notification-data
 * device wakes for its re-read), and what the wait's end needs, r kicks
 * taken (0: none, the wait timed out or woke for something else; <0:
 * it failed, nothing to do).  Serve thread of q. */
int64_t vp_devq_kick_timeout(struct vp_devq *q, int64_t timeout_ns);
void vp_devq_kick_waited(struct vp_devq *q, int r);
/* Let n sync exits return; at most the queue size are acked at once (no
 * more exits can wait than kicks were taken).  Any thread. */
int vp_devq_ack_kicks(struct vp_devq *q, int n);
/* 0, or the VP_E* code that broke the queue.  Any thread. */
int vp_devq_broken(struct vp_devq *q);
void vp_devq_mark_broken(struct vp_devq *q, int code);
/* Accessors.  Any thread. */
unsigned vp_devq_inflight(struct vp_devq *q);
unsigned vp_devq_num(struct vp_devq *q);
unsigned vp_devq_index(struct vp_devq *q);
struct vp_device_stats *vp_devq_stats(struct vp_devq *q);
struct vp_notifier *vp_devq_kick(struct vp_devq *q);
/* VIRTIO_F_NOTIFICATION_DATA, device side (native transport only:
 * -EOPNOTSUPP elsewhere): read the queue's doorbell after each kick taken,
 * with behaviour VP_ND_TRUST (pop only up to its index; after reread_ms
 * without a notification, read avail->idx once) or VP_ND_REREAD (a hint:
 * pop reads avail->idx), counting into the queue's vp_notif_stats;
 * VP_ND_OFF stops.  Starts from the queue's last_avail_idx: call after
 * vp_devq_set_base and vp_devq_set_inflight.  Only while no thread
 * serves q. */
int vp_devq_set_notification_data(struct vp_devq *q, int behaviour,
				  uint32_t reread_ms);
/* The word just read and classified, as the device does after a kick:
 * for tests and the fuzzer.  Any thread. */
void vp_devq_doorbell(struct vp_devq *q);

/* ---- loops in C, for tests and benchmarks (echo.c); no lock held ---- */
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
