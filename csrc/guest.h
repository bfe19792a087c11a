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
/* Whether a thread waiting in vp_guest_wait(_any) takes the interrupts
 * itself (the default where the call notifier allows it: a semaphore on
 * glibc's layout, Linux >= 5.16), or leaves them all to the irq thread,
 * which then wakes it.  set: -EOPNOTSUPP where it cannot.  Any thread. */
int vp_guest_set_direct_irq(struct vp_guest *g, int on);
int vp_guest_direct_irq(struct vp_guest *g);
/* Halt polling, as cpuidle-haltpoll does before a vCPU halts: a thread
 * about to sleep in vp_guest_wait(_any) first looks for its completion
 * again, yielding the CPU between looks, for up to a budget that adapts to
 * how long waits last, from max_ns, which caps it; 0 (the default) never
 * polls.  Any thread. */
int vp_guest_set_halt_poll(struct vp_guest *g, uint64_t max_ns);
uint64_t vp_guest_halt_poll(struct vp_guest *g);
/* The budget the next wait polls for (it adapts).  Any thread. */
uint64_t vp_guest_halt_poll_budget(struct vp_guest *g);
/* The budget after a wait of block_ns (haltpoll's adjust_poll_limit): a
 * wait longer than max_ns halves it (polling would not have paid); one
 * that outlasted the budget but not max_ns doubles it, to at least a
 * quarter of max_ns; one the budget covered leaves it. */
uint64_t vp_halt_poll_adjust(uint64_t budget_ns, uint64_t block_ns,
			     uint64_t max_ns);
/* Wait until the ring has need free descriptors (a hint: the submission
 * may still find it full), reaping what the device used meanwhile: 0,
 * -ETIMEDOUT, -VP_EDEVGONE, -VP_EBROKEN.  No lock held. */
int vp_guest_wait_room(struct vp_guest *g, unsigned need, int64_t timeout_ns);
/* vp_guest_wait_any that also gives when it ended (vp_now_ns), so the
 * loops of workload.c read the clock once per wait.  Not exported. */
int vp_guest_wait_any_t(struct vp_guest *g, uint64_t mask, int64_t timeout_ns,
			uint8_t *status, uint32_t *len, uint64_t *t_end);

/* ---- workload loops (workload.c) ---- */
#define VP_RW_READ       0
#define VP_RW_WRITE      1
#define VP_RW_RANDREAD   2
#define VP_RW_RANDWRITE  3
#define VP_RW_RANDRW     4
#define VP_VERIFY_MAGIC  0x5946495245565056ULL  /* "VPVERIFY" read as bytes */
#define VP_VERIFY_UNWRITTEN 1   /* all zeros: never written */
#define VP_VERIFY_CORRUPT   2   /* bad magic or checksum */
#define VP_VERIFY_MISPLACED 3   /* a good stamp of another sector */
#define VP_VERIFY_STALE     4   /* a good stamp with another seed */
struct vp_run_params {
	uint32_t rw;             /* VP_RW_* */
	uint32_t bs;             /* bytes per request, a multiple of 512 */
	uint32_t iodepth;        /* requests kept in flight, 1..VP_MAX_TAGS */
	uint32_t verify;         /* stamp writes, check reads */
	uint32_t rwmix_read;     /* randrw: percent of reads */
	uint32_t pad;
	uint64_t area_off;       /* bytes: the job's part of the disk */
	uint64_t area_len;
	uint64_t max_ios;        /* 0: no limit */
	uint64_t deadline_ns;    /* CLOCK_MONOTONIC; 0: none */
	uint64_t seed;           /* offsets of random jobs */
	uint64_t verify_seed;    /* goes into every stamp */
	int64_t  timeout_ns;     /* per wait for a completion */
	volatile int32_t *stop;  /* set non-zero to stop early (may be NULL) */
};
struct vp_run_result {
	uint64_t issued, ios, reads, writes, bytes_read, bytes_written;
	uint64_t errors;            /* completions with a status other than OK */
	uint64_t short_reads;       /* used length other than bs + 1 */
	uint64_t dup_completions;   /* completions of a tag not in flight */
	uint64_t queue_full;        /* submissions retried: no free descriptors */
	uint64_t verified, verify_failures, verify_unwritten;
	uint64_t first_bad_sector;
	int32_t  first_bad_kind;
	int32_t  first_error_status;
	uint64_t lat_recorded, lat_max_ns, lat_total_ns;
	uint64_t t_start_ns, t_end_ns;
	int32_t  rc;
	int32_t  pad;
};
void vp_verify_fill(uint8_t *buf, uint64_t sector, uint32_t nbytes,
		    uint64_t seed);
int vp_verify_check(const uint8_t *buf, uint64_t sector, uint32_t nbytes,
		    uint64_t seed, uint64_t *bad);
/* Run a job on g; lat gets up to lat_cap latencies (ns, a uniform sample
 * when there are more).  Returns 0 or the error that stopped it early. */
int vp_guest_run(struct vp_guest *g, int strategy,
		 const struct vp_run_params *p, struct vp_run_result *res,
		 uint32_t *lat, uint64_t lat_cap);
#endif
