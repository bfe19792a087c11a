/* The shared region: one POSIX shared-memory object per device.
 *
 * Every offset stored in the region is a GPA: a byte offset from the start of
 * the region.  The layout is documented field by field in docs/REGION.md so a
 * program that only has that file and <linux/virtio_ring.h> can attach.
 *
 *   page 0            struct vp_region_header (config, queue table)
 *   per queue         struct vp_queue_shared, page aligned (lock, driver
 *                     state, device counters), then the token table
 *   per queue         the vring, page aligned, placed as vring_init(num, p, 4096)
 *   data_offset..size request buffers (the "guest RAM" devices may DMA to)
 *
 * Everything is host-endian (the emulator never crosses machines), which is
 * what a modern (VIRTIO_F_VERSION_1) device on x86/arm64 sees anyway.
 */
#ifndef VIRTIO_PY_REGION_H
#define VIRTIO_PY_REGION_H

#include <stdint.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_blk.h>

#define VP_MAGIC           0x4f49545249565056ULL /* "VPVIRTIO" read as bytes */
#define VP_LAYOUT_VERSION  1
#define VP_MAX_QUEUES      16
#define VP_MAX_QUEUE_SIZE  32768
#define VP_PAGE            4096UL
#define VP_RING_ALIGN      4096UL
#define VP_NAME_MAX        64

/* Lock kinds. */
#define VP_LOCK_SPIN       0   /* ticket spinlock, as the kernel's */
#define VP_LOCK_SPINYIELD  1   /* ticket lock that yields after a bounded spin */
#define VP_LOCK_MUTEX      2   /* sleeping lock on a shared futex */

/* Exit emulation for a kick. */
#define VP_EXIT_ASYNC      0   /* post and return (ioeventfd) */
#define VP_EXIT_SYNC       1   /* return once the device took the kick (PIO trap) */

/* Serving modes. */
#define VP_MODE_NOTIFY     0
#define VP_MODE_POLL       1

/* Device status bits (virtio spec 2.1). */
#define VP_STATUS_ACKNOWLEDGE  1
#define VP_STATUS_DRIVER       2
#define VP_STATUS_DRIVER_OK    4
#define VP_STATUS_FEATURES_OK  8
#define VP_STATUS_NEEDS_RESET  64
#define VP_STATUS_FAILED       128

/* lockstat counters: times in nanoseconds. */
struct vp_lockstat {
	uint64_t con_bounces;
	uint64_t contentions;
	uint64_t wait_min;
	uint64_t wait_max;
	uint64_t wait_total;
	uint64_t acq_bounces;
	uint64_t acquisitions;
	uint64_t hold_min;
	uint64_t hold_max;
	uint64_t hold_total;
};

/* The guest's lock (vblk->lock).  Counters are only written by the holder. */
struct vp_lock {
	uint32_t kind;
	uint32_t spin_ns;        /* spinyield: spin this long before yielding */
	uint32_t next;           /* ticket dispenser */
	uint32_t owner;          /* ticket now served */
	uint32_t futex;          /* mutex: 0 free, 1 held, 2 held with waiters */
	int32_t  last_cpu;       /* CPU of the last acquisition, -1 before any */
	uint64_t t_acquired;     /* CLOCK_MONOTONIC ns of the current acquisition */
	struct vp_lockstat stat;
} __attribute__((aligned(64)));

/* Driver (guest) state of one queue.  Shared because every guest worker
 * process drives the same virtqueue, as every vCPU does in the guest.  Only
 * touched with the queue's lock held, except the counters (atomic). */
struct vp_driver_state {
	uint16_t free_head;
	uint16_t num_free;
	uint16_t num_added;
	uint16_t avail_idx_shadow;
	uint16_t last_used_idx;
	uint16_t avail_flags_shadow;
	uint32_t pad;
	uint64_t kicks;          /* notifications actually sent */
	uint64_t kicks_suppressed;
	uint64_t added;          /* chains added */
	uint64_t completed;      /* chains returned by virtqueue_get_buf */
	uint64_t reserved[2];    /* fills the cache line: dev starts a new one */
};

/* Device counters of one queue: written by the device only, informational
 * (the device never reads them back for a decision).  A cache line of its
 * own: the device writes it on every pop and push, the driver its state on
 * every add. */
struct vp_device_stats {
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint32_t inflight;
	uint32_t broken;         /* 0 or the VP_E* code that broke the queue */
	uint32_t pad;
	uint64_t kicks_taken;    /* kick notifications consumed */
	uint64_t interrupts;     /* call notifications sent */
	uint64_t interrupts_suppressed;
	uint64_t chains;         /* chains popped */
	uint64_t req[8];         /* per request class, see VP_REQ_* in blkdev.h */
	uint64_t bytes_read;
	uint64_t bytes_written;
} __attribute__((aligned(64)));

/* Guest-internal completion records: one slot per guest process using the
 * queue, one record per outstanding request (tag).  Whoever reaps the used
 * ring delivers here and wakes the owner on wake_seq (a shared futex). */
#define VP_MAX_SLOTS  32
#define VP_MAX_TAGS   64
struct vp_completion {
	uint32_t done;
	uint32_t len;
};
struct vp_guest_slot {
	int32_t  owner_pid;      /* 0 free */
	uint32_t wake_seq;
	uint32_t gen;            /* bumped by each owner: tells stale completions */
	uint32_t pad;
	uint64_t delivered;      /* completions delivered to this slot */
	struct vp_completion comp[VP_MAX_TAGS];
} __attribute__((aligned(64)));   /* slots of different processes */

/* What lives in the region for each queue, page aligned. */
struct vp_queue_shared {
	struct vp_lock lock;
	struct vp_driver_state drv;
	struct vp_device_stats dev;
	struct vp_guest_slot slot[VP_MAX_SLOTS];
};

/* One row of the queue table. */
struct vp_queue_info {
	uint16_t num;            /* queue size, a power of two */
	uint16_t pad0;
	uint32_t pad1;
	uint64_t desc;           /* GPA of the descriptor table */
	uint64_t avail;          /* GPA of the available ring */
	uint64_t used;           /* GPA of the used ring */
	uint64_t shared;         /* GPA of struct vp_queue_shared */
	uint64_t tokens;         /* GPA of uint64_t tokens[num] (driver state) */
	uint64_t data;           /* GPA of this queue's share of the data area */
	uint64_t data_size;
};

struct vp_region_header {
	uint64_t magic;
	uint32_t version;
	uint32_t header_size;    /* sizeof(struct vp_region_header) */
	uint64_t size;           /* total bytes of the region */
	uint64_t device_features;
	uint64_t driver_features;
	uint32_t status;         /* virtio device status */
	int32_t  daemon_pid;     /* device process, 0 before one serves */
	uint32_t num_queues;
	uint32_t exit_mode;      /* VP_EXIT_* */
	uint32_t exit_cost_ns;   /* spent inside every notify */
	uint32_t serve_mode;     /* VP_MODE_* */
	uint32_t lock_kind;      /* VP_LOCK_* of every queue lock */
	uint32_t pad;
	uint64_t data_offset;    /* first byte of the request buffer area */
	uint64_t data_size;
	char     name[VP_NAME_MAX];  /* the shared-memory object's name */
	struct virtio_blk_config blk; /* virtio-blk config space */
	uint8_t  pad2[4];
	struct vp_queue_info queue[VP_MAX_QUEUES];
};

#endif
