/* virtio_py region: the public contract, layout version 3.
 *
 * This header is everything a program outside the project needs, beside
 * the kernel's uapi headers, to attach to a virtio_py device and drive it:
 * the structures of the shared region, the constants stored in it, and the
 * token format of the guests that share a queue.  docs/REGION.md explains
 * every field and the protocols (locking, kick, interrupt, completion
 * delivery); docs/attach_example.c is a driver built on this header alone.
 * The project compiles its own C core against this same file, and
 * tests/test_region_doc.py checks REGION.md's tables against it.
 *
 * Needs: a C11 compiler with GNU attributes (gcc, clang), and the kernel's
 * <linux/virtio_ring.h> and <linux/virtio_blk.h> of any version (the
 * config space is restated below at its fixed size).  Nothing else of the
 * project.
 *
 *   page 0            struct vp_region_header (config, queue table)
 *   per queue         struct vp_queue_shared, page aligned (lock, driver
 *                     state, device counters, guest slots), then the token
 *                     table
 *   per queue         the vring, page aligned, placed as vring_init(num, p, 4096)
 *   data_offset..size request buffers (the "guest RAM" devices may DMA to)
 *
 * Every offset stored in the region is a GPA: a byte offset from the start
 * of the region.  Everything is host-endian (the region never crosses
 * machines), which is what a VIRTIO_F_VERSION_1 device on x86/arm64 sees
 * anyway.  Any change of a size or an offset below is a new layout version.
 */
#ifndef VIRTIO_PY_REGION_H
#define VIRTIO_PY_REGION_H

#include <stdint.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_blk.h>

#define VP_MAGIC           0x4f49545249565056ULL /* "VPVIRTIO" read as bytes */
#define VP_LAYOUT_VERSION  3
#define VP_MAX_QUEUES      16
#define VP_MAX_QUEUE_SIZE  32768
#define VP_PAGE            4096UL
#define VP_RING_ALIGN      4096UL
#define VP_NAME_MAX        64    /* bytes of header.name, NUL included */

/* POSIX names of a device's objects: the region, and one notifier per queue
 * and role ("kick", "call", "ack"), e.g. "/disk0.q0.kick". */
#define VP_SHM_NAME_FMT    "/%s"
#define VP_SEM_NAME_FMT    "/%s.q%u.%s"

/* Lock kinds. */
#define VP_LOCK_SPIN       0   /* ticket spinlock, as the kernel's */
#define VP_LOCK_SPINYIELD  1   /* ticket lock that yields after a bounded spin */
#define VP_LOCK_MUTEX      2   /* sleeping lock on a shared futex */
#define VP_LOCK_PVSPIN     3   /* ticket lock: spin a bounded time, then sleep until the unlocker kicks (paravirtual spinlock) */

/* Lock-time histograms, log2 of nanoseconds as funclatency's: bucket 0
 * counts 0 ns, bucket b >= 1 counts [2^(b-1), 2^b) ns, and the last one
 * also everything longer. */
#define VP_LOCK_HIST_BUCKETS 48
/* pvspin: the words sleeping waiters wait on, one per ticket mod this;
 * only a waiter fewer than this many tickets from the head sleeps.  The
 * bits of its lock word (vp_lock.futex), and how long the head of the
 * line lets others take the lock past it before it asks for a hand-off. */
#define VP_LOCK_PV_WAITERS   64
#define VP_PV_LOCKED         1U   /* held */
#define VP_PV_HANDOFF        2U   /* only the head of the line may take it */
#define VP_PV_SLOW           4U   /* the head sleeps: the unlock kicks it */
#define VP_PV_HANDOFF_NS     1000000
/* The owner record.  A process is named by its pid and the low 26 bits of
 * its start time (/proc/PID/stat field 22), never by its pid alone:
 * VP_LOCK_ID(pid, start).  holder[0] is the holder's id (spin, spinyield:
 * with the ticket it holds in bits 48..63, written by the claim that
 * acquires); holder[1] its full start time.  The mutex word is the holder's
 * pid | VP_MUTEX_WAITERS, the pvspin word pid << VP_PV_PID_SHIFT | VP_PV_*
 * bits.  A waiter that has waited VP_LOCK_CHECK_NS asks whether the holder
 * lives; a ticket nobody claims (pvspin: a head nobody named in pv_waiter)
 * for VP_LOCK_STALL_NS is skipped. */
#define VP_LOCK_PID_BITS     22
#define VP_LOCK_PID_MASK     ((1U << VP_LOCK_PID_BITS) - 1)
#define VP_LOCK_START_MASK   ((1ULL << 26) - 1)
#define VP_LOCK_ID(pid, start) \
	(((uint64_t)(start) & VP_LOCK_START_MASK) << VP_LOCK_PID_BITS | \
	 ((uint64_t)(pid) & VP_LOCK_PID_MASK))
#define VP_MUTEX_WAITERS     0x80000000U
#define VP_PV_PID_SHIFT      3
#define VP_LOCK_CHECK_NS     2000000
#define VP_LOCK_STALL_NS     10000000

/* VIRTIO_F_NOTIFICATION_DATA (virtio 1.2 §6, bit 38; §2.9 "Driver
 * Notifications"): a kick also carries the queue index and the driver's
 * avail index, written into the queue's doorbell (struct vp_doorbell).
 * Older kernel headers lack the name. */
#define VP_F_NOTIFICATION_DATA 38
/* The split ring's notification word: vqn in bits 0..15, next_off (bits
 * 16..30) and next_wrap (bit 31) together the 16-bit avail index. */
#define VP_ND_WORD(vqn, avail_idx) \
	((uint32_t)(uint16_t)(avail_idx) << 16 | (uint32_t)(uint16_t)(vqn))
#define VP_ND_VQN(word)    ((uint16_t)((uint32_t)(word) & 0xffff))
#define VP_ND_IDX(word)    ((uint16_t)((uint32_t)(word) >> 16))
/* What the device does with the word (vp_notif_stats.behaviour). */
#define VP_ND_OFF          0   /* not negotiated: the doorbell is not read */
#define VP_ND_TRUST        1   /* process up to the word's index, never read avail->idx */
#define VP_ND_REREAD       2   /* the word is a hint: read avail->idx */
/* Driver remedies of the reordering hazard (a driver's own choice). */
#define VP_ND_LOCKED       1   /* notify with the queue lock held, whatever the strategy */
#define VP_ND_MONOTONIC    2   /* the doorbell never goes backwards (emulation only) */

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

/* Ring validation errors (device side) and layout errors, as -VP_E*.  The
 * device stores the one that broke a queue in vp_device_stats.broken. */
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

/* Request classes of the virtio-blk device, the index into
 * vp_device_stats.req[].  An IOERR is counted in its class and in IOERR. */
#define VP_REQ_IN       0
#define VP_REQ_OUT      1
#define VP_REQ_FLUSH    2
#define VP_REQ_GET_ID   3
#define VP_REQ_DISCARD  4
#define VP_REQ_WZEROES  5
#define VP_REQ_UNSUPP   6
#define VP_REQ_IOERR    7

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

/* Time distributions of one lock, beside the lockstat counters and, like
 * them, written by the holder only. */
struct vp_lockhist {
	uint64_t hold[VP_LOCK_HIST_BUCKETS];  /* every acquisition, by hold time */
	uint64_t wait[VP_LOCK_HIST_BUCKETS];  /* every contention, by wait time */
};

/* The guest's lock (vblk->lock).  Counters are only written by the holder,
 * except wakeups (atomic: unlockers count after the release).  The first
 * line holds the lock words and lockstat; the pvspin words and the
 * histograms follow on lines of their own.  1216 bytes, 19 cache lines. */
struct vp_lock {
	uint32_t kind;
	uint32_t spin_ns;        /* spinyield, pvspin: spin this long before yielding, sleeping */
	uint32_t next;           /* ticket dispenser (pvspin: of the line, from 1) */
	uint32_t owner;          /* ticket now served (pvspin: the head is owner + 1) */
	uint32_t futex;          /* mutex: 0 free, 1 held, 2 held with waiters;
				  * pvspin: VP_PV_* bits (REGION.md §7) */
	int32_t  last_cpu;       /* CPU of the last acquisition, -1 before any */
	uint64_t t_acquired;     /* CLOCK_MONOTONIC ns of the current acquisition */
	struct vp_lockstat stat;
	uint64_t holder[2];      /* the owner record: VP_LOCK_ID of the holder (REGION.md §7) */
	uint64_t sleeps;         /* mutex, pvspin: sleeps a wake-up ended */
	uint64_t wakeups;        /* mutex, pvspin: sleepers woken by unlockers */
	uint64_t takeovers;      /* holders found dead and released by a waiter (atomic) */
	uint32_t dirty;          /* 1 from a takeover until the queue's driver state is repaired */
	uint32_t pad;
	uint64_t pv_waiter[4];   /* pvspin: who took ticket t, among the first four in
				  * line: (t + 1) << 48 | VP_LOCK_ID in word t % 4, 0 none */
	uint32_t pv_halted[VP_LOCK_PV_WAITERS]; /* pvspin: t << 1 | 1 while ticket t sleeps here */
	struct vp_lockhist hist;
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
	uint32_t adding;         /* head + 1 while virtqueue_add runs, else 0 (repair, §7.1) */
	uint64_t kicks;          /* notifications actually sent */
	uint64_t kicks_suppressed;
	uint64_t added;          /* chains added */
	uint64_t completed;      /* chains returned by virtqueue_get_buf */
	/* The reap record (REGION.md §7.1): a reaper writes it before it takes
	 * a used entry and clears it once the completion is delivered, so a
	 * repair after it died in between delivers exactly once.  reap_token:
	 * the token being taken, 0 none; reap_info: its used length << 32 |
	 * its head << 16 | the low 16 bits of its slot's delivered before. */
	uint64_t reap_token;
	uint64_t reap_info;
};

/* Device counters of one queue: written by the device only, informational
 * (the device never reads them back for a decision).  A cache line of its
 * own: the device writes it on every pop and push, the driver its state on
 * every add. */
struct vp_device_stats {
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint32_t inflight;
	uint32_t broken;         /* 0, the VP_E* code that broke the queue, or EFAULT (memory lost) */
	uint32_t pad;
	uint64_t kicks_taken;    /* kick notifications consumed */
	uint64_t interrupts;     /* call notifications sent */
	uint64_t interrupts_suppressed;
	uint64_t chains;         /* chains popped */
	uint64_t req[8];         /* per request class, VP_REQ_* */
	uint64_t bytes_read;
	uint64_t bytes_written;
} __attribute__((aligned(64)));

/* Guest-internal completion records: one slot per guest process using the
 * queue, one record per outstanding request (tag).  Whoever reaps the used
 * ring delivers here and wakes the owner on wake_seq (a shared futex). */
#define VP_MAX_SLOTS  32
#define VP_MAX_TAGS   64

/* The token of a slot's request: gen << 32 | (slot + 1) << 16 | tag, never
 * 0.  A reaper drops a token whose slot or tag is out of range, or whose gen
 * is not the slot's gen now (a completion for the slot's previous owner). */
#define VP_TOKEN(gen, slot, tag) \
	((uint64_t)(uint32_t)(gen) << 32 | ((uint64_t)(slot) + 1) << 16 | (uint64_t)(tag))
#define VP_TOKEN_GEN(tok)  ((uint32_t)((uint64_t)(tok) >> 32))
#define VP_TOKEN_SLOT(tok) ((((uint64_t)(tok) >> 16) & 0xffff) - 1)  /* >= VP_MAX_SLOTS: none */
#define VP_TOKEN_TAG(tok)  ((uint64_t)(tok) & 0xffff)                /* >= VP_MAX_TAGS: none */

/* Buffers of virtio_py guests (a convention between drivers; the device
 * accepts any buffer in the queue's data share).  Slot s uses
 * VP_SLOT_SHARE(queue data_size) bytes at queue data + s * share, split
 * into depth tag buffers of VP_TAG_SIZE(share, depth) bytes; a tag buffer
 * holds the virtio-blk header at +0, the status byte at +16 and the data
 * at +VP_SLOT_HDR_AREA.  Both sizes round down to whole pages. */
#define VP_SLOT_HDR_AREA   4096
#define VP_SLOT_SHARE(data_size) \
	(((uint64_t)(data_size) / VP_MAX_SLOTS) & ~(uint64_t)(VP_PAGE - 1))
#define VP_TAG_SIZE(share, depth) \
	(((uint64_t)(share) / (depth)) & ~(uint64_t)(VP_PAGE - 1))

struct vp_completion {
	uint32_t done;
	uint32_t len;
};
/* 536 bytes of fields, padded to nine whole cache lines: a reaper writing
 * one process's slot does not take the line of another's. */
struct vp_guest_slot {
	int32_t  owner_pid;      /* 0 free */
	uint32_t wake_seq;
	uint32_t gen;            /* bumped by each owner: tells stale completions */
	uint32_t pad;
	uint64_t delivered;      /* completions delivered to this slot */
	struct vp_completion comp[VP_MAX_TAGS];
} __attribute__((aligned(64)));   /* slots of different processes */

/* The queue's doorbell: the notify register a driver writes with
 * notification data, on a line of its own (no false sharing with the
 * lock's or the driver state's).  Written by drivers, read by the device. */
struct vp_doorbell {
	uint32_t notify;         /* the register: VP_ND_WORD of the last notification, one aligned store */
	uint32_t notified;       /* measurement only: the furthest index any notification carried, as a
				  * 32-bit count of adds (its low 16 bits: the avail index) */
	uint64_t held_back;      /* monotonic doorbell: stores not made, the register was ahead (atomic) */
	uint64_t reserved[6];    /* 0 */
} __attribute__((aligned(64)));

/* The device's notification-data counters of one queue: written by the
 * device only, informational, as vp_device_stats. */
struct vp_notif_stats {
	uint32_t behaviour;      /* VP_ND_* the device serves with */
	uint32_t reread_ms;      /* trust: a stalled device reads avail->idx after this long */
	uint16_t index;          /* the device's notification index (trust: how far it may pop) */
	uint16_t pad0;
	uint32_t pad1;
	uint64_t doorbells;      /* doorbell reads */
	uint64_t reordered;      /* words behind the notification index: stale, ignored */
	uint64_t misdirected;    /* words naming another queue: ignored */
	uint64_t waiting;        /* requests left waiting past a notification */
	uint64_t stalls;         /* times the device went idle with such requests */
	uint64_t stall_ns;       /* time they waited, total */
	uint64_t stall_max_ns;   /* the longest */
	uint64_t rereads;        /* trust: stalls ended by reading avail->idx after reread_ms */
	uint64_t reserved[6];    /* 0 */
} __attribute__((aligned(64)));

/* What lives in the region for each queue, page aligned. */
struct vp_queue_shared {
	struct vp_lock lock;
	struct vp_driver_state drv;
	struct vp_device_stats dev;
	struct vp_guest_slot slot[VP_MAX_SLOTS];
	struct vp_doorbell bell;
	struct vp_notif_stats nd;
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

/* virtio-blk config space: the kernel's struct virtio_blk_config with the
 * secure-erase fields and without the zoned ones (72 bytes, packed).
 * Restated so the layout does not follow the installed headers: older ones
 * end the struct at 60 bytes, newer ones add the zoned fields (96). */
struct vp_blk_geometry {
	__virtio16 cylinders;
	__u8 heads;
	__u8 sectors;
};
struct vp_blk_config {
	__virtio64 capacity;
	__virtio32 size_max;
	__virtio32 seg_max;
	struct vp_blk_geometry geometry;
	__virtio32 blk_size;
	__u8 physical_block_exp;
	__u8 alignment_offset;
	__virtio16 min_io_size;
	__virtio32 opt_io_size;
	__u8 wce;
	__u8 unused;
	__virtio16 num_queues;
	__virtio32 max_discard_sectors;
	__virtio32 max_discard_seg;
	__virtio32 discard_sector_alignment;
	__virtio32 max_write_zeroes_sectors;
	__virtio32 max_write_zeroes_seg;
	__u8 write_zeroes_may_unmap;
	__u8 unused1[3];
	__virtio32 max_secure_erase_sectors;
	__virtio32 max_secure_erase_seg;
	__virtio32 secure_erase_sector_alignment;
} __attribute__((packed));

struct vp_region_header {
	uint64_t magic;
	uint32_t version;
	uint32_t header_size;    /* sizeof(struct vp_region_header) */
	uint64_t size;           /* total bytes of the region */
	uint64_t device_features;
	uint64_t driver_features;
	uint32_t status;         /* virtio device status */
	int32_t  daemon_pid;     /* device process, 0 before one serves; for drivers only */
	uint32_t num_queues;
	uint32_t exit_mode;      /* VP_EXIT_* */
	uint32_t exit_cost_ns;   /* spent inside every notify */
	uint32_t serve_mode;     /* VP_MODE_* */
	uint32_t lock_kind;      /* VP_LOCK_* of every queue lock */
	uint32_t pad;
	uint64_t data_offset;    /* first byte of the request buffer area */
	uint64_t data_size;
	char     name[VP_NAME_MAX];  /* the shared-memory object's name */
	struct vp_blk_config blk; /* virtio-blk config space */
	uint8_t  pad2[4];        /* then 4 bytes of padding: queue is 8-aligned */
	struct vp_queue_info queue[VP_MAX_QUEUES];
};

/* Layout version 3, pinned: a compiler or an edit that moves anything
 * fails here instead of attaching to a region it misreads. */
_Static_assert(sizeof(struct vp_region_header) == 1256, "vp_region_header");
_Static_assert(sizeof(struct vp_blk_config) == 72, "vp_blk_config");
_Static_assert(sizeof(struct vp_queue_info) == 64, "vp_queue_info");
_Static_assert(sizeof(struct vp_queue_shared) == 20032, "vp_queue_shared");
_Static_assert(sizeof(struct vp_doorbell) == 64, "vp_doorbell");
_Static_assert(sizeof(struct vp_notif_stats) == 128, "vp_notif_stats");
_Static_assert(__builtin_offsetof(struct vp_queue_shared, bell) == 19840, "vp_doorbell place");
_Static_assert(sizeof(struct vp_lock) == 1216, "vp_lock");
_Static_assert(sizeof(struct vp_lockhist) == 768, "vp_lockhist");
_Static_assert(sizeof(struct vp_driver_state) == 64, "vp_driver_state");
_Static_assert(sizeof(struct vp_device_stats) == 128, "vp_device_stats");
_Static_assert(sizeof(struct vp_guest_slot) == 576, "vp_guest_slot");
_Static_assert(_Alignof(struct vp_queue_shared) == 64, "vp_queue_shared alignment");

#endif
