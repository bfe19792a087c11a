/* What Python sees of the C core (cffi cdef: no preprocessor). */
#define VP_MAGIC ...
#define VP_LAYOUT_VERSION ...
#define VP_MAX_QUEUES ...
#define VP_MAX_QUEUE_SIZE ...
#define VP_LOCK_SPIN ...
#define VP_LOCK_SPINYIELD ...
#define VP_LOCK_MUTEX ...
#define VP_F_NOTIFICATION_DATA ...
#define VP_ND_OFF ...
#define VP_ND_TRUST ...
#define VP_ND_REREAD ...
#define VP_ND_LOCKED ...
#define VP_ND_MONOTONIC ...
#define VP_EXIT_ASYNC ...
#define VP_EXIT_SYNC ...
#define VP_MODE_NOTIFY ...
#define VP_MODE_POLL ...
#define VP_KICK_HOLD ...
#define VP_KICK_RELEASE ...
#define VP_KICK_PREPARE ...
#define VP_EBASE ...
#define VP_EHEAD ...
#define VP_ENEXT ...
#define VP_ELOOP ...
#define VP_EADDR ...
#define VP_EZEROLEN ...
#define VP_EORDER ...
#define VP_EAVAIL ...
#define VP_EINFLIGHT ...
#define VP_EINDIRECT ...
#define VP_EBROKEN ...
#define VP_EUSEDID ...
#define VP_ENOTINFLIGHT ...
#define VP_EMAGIC ...
#define VP_ELAYOUT ...
#define VP_ESEGMAX ...
#define VP_EDEVGONE ...
#define VP_EFRAME ...
#define VP_ELAST ...
#define VP_STATUS_NEEDS_RESET ...
#define VIRTIO_RING_F_EVENT_IDX ...
#define VIRTIO_RING_F_INDIRECT_DESC ...
#define VRING_DESC_F_NEXT ...
#define VRING_DESC_F_WRITE ...
#define VRING_DESC_F_INDIRECT ...
#define VRING_USED_F_NO_NOTIFY ...
#define VRING_AVAIL_F_NO_INTERRUPT ...

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
struct vp_lockhist {
	uint64_t hold[...];
	uint64_t wait[...];
};
struct vp_lock {
	uint32_t kind;
	uint32_t spin_ns;
	uint32_t next;
	uint32_t owner;
	int32_t last_cpu;
	uint64_t holder[2];
	uint64_t sleeps;
	uint64_t wakeups;
	uint64_t takeovers;
	uint32_t dirty;
	uint64_t pv_waiter[4];
	uint32_t pv_halted[...];
	struct vp_lockhist hist;
	...;
};
struct vp_driver_state {
	uint16_t free_head;
	uint16_t num_free;
	uint16_t num_added;
	uint16_t avail_idx_shadow;
	uint16_t last_used_idx;
	uint16_t avail_flags_shadow;
	uint32_t adding;
	uint64_t kicks;
	uint64_t kicks_suppressed;
	uint64_t added;
	uint64_t completed;
	uint64_t reap_token;
	uint64_t reap_info;
	...;
};
struct vp_device_stats {
	uint16_t last_avail_idx;
	uint16_t used_idx;
	uint32_t inflight;
	uint32_t broken;
	uint64_t kicks_taken;
	uint64_t interrupts;
	uint64_t interrupts_suppressed;
	uint64_t chains;
	uint64_t req[8];
	uint64_t bytes_read;
	uint64_t bytes_written;
	...;
};
struct vp_guest_slot {
	int32_t owner_pid;
	uint32_t wake_seq;
	uint64_t delivered;
	...;
};
struct vp_doorbell {
	uint32_t notify;
	uint32_t notified;
	uint64_t held_back;
	...;
};
struct vp_notif_stats {
	uint32_t behaviour;
	uint32_t reread_ms;
	uint16_t index;
	uint64_t doorbells;
	uint64_t reordered;
	uint64_t misdirected;
	uint64_t waiting;
	uint64_t stalls;
	uint64_t stall_ns;
	uint64_t stall_max_ns;
	uint64_t rereads;
	...;
};
struct vp_queue_shared {
	struct vp_lock lock;
	struct vp_driver_state drv;
	struct vp_device_stats dev;
	struct vp_guest_slot slot[];
	struct vp_doorbell bell;
	struct vp_notif_stats nd;
	...;
};
struct vp_queue_info {
	uint16_t num;
	uint64_t desc;
	uint64_t avail;
	uint64_t used;
	uint64_t shared;
	uint64_t tokens;
	uint64_t data;
	uint64_t data_size;
	...;
};
struct vp_blk_config {
	uint64_t capacity;
	uint32_t size_max;
	uint32_t seg_max;
	uint32_t blk_size;
	uint16_t num_queues;
	uint32_t max_discard_sectors;
	uint32_t max_discard_seg;
	uint32_t discard_sector_alignment;
	uint32_t max_write_zeroes_sectors;
	uint32_t max_write_zeroes_seg;
	uint8_t write_zeroes_may_unmap;
	...;
};
struct vp_region_header {
	uint64_t magic;
	uint32_t version;
	uint32_t header_size;
	uint64_t size;
	uint64_t device_features;
	uint64_t driver_features;
	uint32_t status;
	int32_t daemon_pid;
	uint32_t num_queues;
	uint32_t exit_mode;
	uint32_t exit_cost_ns;
	uint32_t serve_mode;
	uint32_t lock_kind;
	uint64_t data_offset;
	uint64_t data_size;
	char name[];
	struct vp_blk_config blk;
	struct vp_queue_info queue[];
	...;
};

const char *vp_strerror(int code);

struct vp_region_params {
	uint32_t num_queues;
	uint32_t queue_size;
	uint64_t data_size;
	uint64_t device_features;
	uint64_t capacity;
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
int vp_map(int fd, uint64_t size, void **base);
int vp_unmap(void *base, uint64_t size);

struct vp_acct {
	uint64_t lock_wait_ns;
	uint64_t lock_hold_ns;
	uint64_t lock_acquisitions;
	uint64_t kick_ns;
	uint64_t kicks;
	uint64_t io_wait_ns;
	uint64_t irqs;
	uint64_t reaped;
	uint64_t polled;
	uint64_t poll_ns;
};
void vp_acct_set(struct vp_acct *a);
void vp_lock_init(struct vp_lock *l, uint32_t kind, uint32_t spin_ns);
void vp_lock_acquire(struct vp_lock *l);
void vp_lock_release(struct vp_lock *l);
void vp_lock_read(const struct vp_lock *l, struct vp_lockstat *out);
void vp_lock_reset(struct vp_lock *l);
uint64_t vp_lock_takeovers(const struct vp_lock *l);
int vp_lock_holder(const struct vp_lock *l, int32_t *pid, uint64_t *start);
uint64_t vp_now_ns(void);

struct vp_notifier;
struct vp_notifier *vp_notifier_open_sem(const char *name, int *err);
struct vp_notifier *vp_notifier_open_eventfd(int fd, int *err);
void vp_notifier_close(struct vp_notifier *n);
int vp_notifier_post(struct vp_notifier *n);
int vp_notifier_wait(struct vp_notifier *n, int64_t timeout_ns);
int vp_notifier_drain(struct vp_notifier *n);

struct vp_vq;
struct vp_vq *vp_vq_open(void *base, uint64_t size, unsigned index, int *err);
void vp_vq_close(struct vp_vq *vq);
void vp_vq_set_notify(struct vp_vq *vq, struct vp_notifier *kick,
		      struct vp_notifier *ack, uint32_t exit_mode,
		      uint32_t exit_cost_ns);
struct vp_lock *vp_vq_lock(struct vp_vq *vq);
void vp_vq_lock_acquire(struct vp_vq *vq);
void vp_vq_repair(struct vp_vq *vq);
int vp_vq_repair_if_dirty(struct vp_vq *vq);
int vp_vq_check(struct vp_vq *vq, char *why, size_t n);
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
int vp_vq_set_nd(struct vp_vq *vq, unsigned remedy);
void vp_vq_set_gate(struct vp_vq *vq, uint32_t *gate, int64_t timeout_ns);
int vp_vq_submit(struct vp_vq *vq, int strategy, const uint64_t *addr,
		 const uint32_t *len, unsigned out, unsigned in, uint64_t token);

struct vp_seg {
	uint64_t addr;
	uint32_t len;
	uint32_t write;
	uint8_t *host;
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
unsigned vp_devq_num(struct vp_devq *q);
unsigned vp_devq_index(struct vp_devq *q);
struct vp_device_stats *vp_devq_stats(struct vp_devq *q);
int vp_devq_set_notification_data(struct vp_devq *q, int behaviour,
				  uint32_t reread_ms);
void vp_devq_doorbell(struct vp_devq *q);

/* ---- guest memory tables (mem.h) and queues over them ---- */
#define VP_MEM_MAX_REGIONS ...
struct vp_mem;
struct vp_mem *vp_mem_new(int *err);
void vp_mem_free(struct vp_mem *m);
int vp_mem_add_region(struct vp_mem *m, uint64_t guest_phys_addr,
		      uint64_t size, uint64_t userspace_addr, void *host);
unsigned vp_mem_nregions(const struct vp_mem *m);
uint8_t *vp_mem_translate(const struct vp_mem *m, uint64_t gpa, uint64_t len);
uint8_t *vp_mem_translate_uva(const struct vp_mem *m, uint64_t uva,
			      uint64_t len);
struct vp_devq *vp_devq_open_mem(const struct vp_mem *mem, unsigned index,
				 unsigned num, void *desc, void *avail,
				 void *used, struct vp_device_stats *stats,
				 int event_idx, uint32_t exit_mode, int *err);
int vp_devq_set_mem(struct vp_devq *q, const struct vp_mem *mem);
int vp_devq_set_base(struct vp_devq *q, uint16_t last_avail_idx,
		     uint16_t used_idx);
void vp_devq_get_base(struct vp_devq *q, uint16_t *last_avail_idx,
		      uint16_t *used_idx);

int64_t vp_echo_serve(struct vp_devq *q, int64_t n, int poll,
		      volatile int32_t *stop);
int64_t vp_echo_drive(struct vp_vq *vq, int64_t n, unsigned batch,
		      int strategy, uint64_t buf_gpa, uint32_t buf_len);
int vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old);

#define VIRTIO_BLK_F_SEG_MAX ...
#define VIRTIO_BLK_F_BLK_SIZE ...
#define VIRTIO_BLK_F_FLUSH ...
#define VIRTIO_BLK_F_MQ ...
#define VIRTIO_BLK_F_DISCARD ...
#define VIRTIO_BLK_F_WRITE_ZEROES ...
#define VIRTIO_BLK_T_IN ...
#define VIRTIO_BLK_T_OUT ...
#define VIRTIO_BLK_T_FLUSH ...
#define VIRTIO_BLK_T_GET_ID ...
#define VIRTIO_BLK_T_DISCARD ...
#define VIRTIO_BLK_T_WRITE_ZEROES ...
#define VIRTIO_BLK_S_OK ...
#define VIRTIO_BLK_S_IOERR ...
#define VIRTIO_BLK_S_UNSUPP ...
#define VIRTIO_BLK_ID_BYTES ...
#define VIRTIO_F_VERSION_1 ...

/* A hostile guest's raw stores, bounds-checked against the region; for
 * tests that feed the device malformed rings. */
int vp_guest_poke(void *base, uint64_t size, uint64_t gpa, uint64_t value,
		  unsigned width);

/* ---- processes (proc.c) ---- */
int vp_pid_gone(int32_t pid);
int vp_pid_starttime(int32_t pid, uint64_t *start);

/* ---- guest side of virtio-blk (guest.h) ---- */
#define VP_MAX_SLOTS ...
#define VP_MAX_TAGS ...
struct vp_guest;
struct vp_guest *vp_guest_open(void *base, uint64_t size, struct vp_vq *vq,
			       unsigned index, struct vp_notifier *call,
			       int *err);
void vp_guest_close(struct vp_guest *g);
int vp_guest_slot(struct vp_guest *g);
int vp_guest_set_depth(struct vp_guest *g, unsigned depth);
uint64_t vp_guest_max_data(struct vp_guest *g);
uint64_t vp_guest_data_gpa(struct vp_guest *g, unsigned tag);
uint8_t *vp_guest_data_ptr(struct vp_guest *g, unsigned tag);
int vp_guest_start_irq(struct vp_guest *g);
void vp_guest_stop_irq(struct vp_guest *g);
int vp_guest_reap(struct vp_guest *g);
int vp_guest_blk_submit(struct vp_guest *g, unsigned tag, uint32_t type,
			uint64_t sector, uint32_t nbytes, int strategy);
int vp_guest_wait(struct vp_guest *g, unsigned tag, int64_t timeout_ns,
		  uint8_t *status, uint32_t *len);
int vp_guest_wait_any(struct vp_guest *g, uint64_t mask, int64_t timeout_ns,
		      uint8_t *status, uint32_t *len);
struct vp_acct *vp_guest_irq_acct(struct vp_guest *g);

/* ---- device side of virtio-blk (store.h, blkdev.h) ---- */
#define VP_STORE_MAX_STRIPES ...
#define VP_MAX_IO_THREADS ...
#define VP_REQ_IN ...
#define VP_REQ_OUT ...
#define VP_REQ_FLUSH ...
#define VP_REQ_GET_ID ...
#define VP_REQ_DISCARD ...
#define VP_REQ_WZEROES ...
#define VP_REQ_UNSUPP ...
#define VP_REQ_IOERR ...
struct vp_store;
struct vp_store *vp_store_open(const int *fds, unsigned nstripes,
			       uint64_t chunk, uint64_t capacity, int direct,
			       int *err);
void vp_store_close(struct vp_store *s);
int vp_store_rw(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		uint64_t len);
int vp_store_flush(struct vp_store *s);
int vp_store_zero(struct vp_store *s, uint64_t off, uint64_t len, int punch);
struct vp_store *vp_store_open_mem(void *buf, uint64_t capacity, int *err);
uint64_t vp_store_capacity(const struct vp_store *s);
int vp_store_direct(const struct vp_store *s);
int64_t vp_blk_handle(struct vp_store *st, struct vp_devq *q,
		      const struct vp_chain *c, const struct vp_seg *segs,
		      const char *serial);
struct vp_server;
struct vp_server *vp_server_new(struct vp_store *st, int mode,
				unsigned io_threads, const char *serial,
				int *err);
int vp_server_add_queue(struct vp_server *srv, struct vp_devq *q);
int vp_server_start(struct vp_server *srv);
void vp_server_stop(struct vp_server *srv);
int vp_server_set_queue(struct vp_server *srv, unsigned qi,
			struct vp_devq *q);
int vp_server_start_queue(struct vp_server *srv, unsigned qi);
int vp_server_stop_queue(struct vp_server *srv, unsigned qi);
void vp_server_free(struct vp_server *srv);
/* the I/O engine (blkdev.h) and the mapped store (store.h) */
#define VP_ENGINE_AUTO    0
#define VP_ENGINE_THREADS 1
#define VP_ENGINE_URING   2
#define VP_ENGINE_INLINE  3
int vp_server_set_engine(struct vp_server *srv, int engine);
int vp_server_queue_engine(struct vp_server *srv, unsigned qi);
struct vp_store *vp_store_open_mapped(const int *fds, unsigned nstripes,
				      uint64_t chunk, uint64_t capacity,
				      int *err);

/* csrc/bench.c */
int64_t vp_lock_hammer(struct vp_lock *l, int64_t n);
uint32_t vp_bench_arrive(uint32_t *word);
void vp_bench_wait(const uint32_t *word, uint32_t target);

/* ---- guest workload loops (guest.h, workload.c) ---- */
#define VP_RW_READ ...
#define VP_RW_WRITE ...
#define VP_RW_RANDREAD ...
#define VP_RW_RANDWRITE ...
#define VP_RW_RANDRW ...
#define VP_VERIFY_MAGIC ...
#define VP_VERIFY_UNWRITTEN ...
#define VP_VERIFY_CORRUPT ...
#define VP_VERIFY_MISPLACED ...
#define VP_VERIFY_STALE ...
struct vp_run_params {
	uint32_t rw;             /* VP_RW_* */
	uint32_t bs;             /* bytes per request, a multiple of 512 */
	uint32_t iodepth;        /* requests kept in flight, 1..VP_MAX_TAGS */
	uint32_t verify;         /* stamp writes, check reads */
	uint32_t rwmix_read;     /* randrw: percent of reads */
	uint64_t area_off;       /* bytes: the job's part of the disk */
	uint64_t area_len;
	uint64_t max_ios;        /* 0: no limit */
	uint64_t deadline_ns;    /* CLOCK_MONOTONIC; 0: none */
	uint64_t seed;           /* offsets of random jobs */
	uint64_t verify_seed;    /* goes into every stamp */
	int64_t  timeout_ns;     /* per wait for a completion */
	volatile int32_t *stop;
	...;
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
	...;
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

/* ---- lock kinds, histograms and wake-up counters (lock.c, region.h) ---- */
#define VP_LOCK_PVSPIN ...
#define VP_LOCK_HIST_BUCKETS ...
#define VP_LOCK_PV_WAITERS ...
void vp_lock_read_hist(const struct vp_lock *l, struct vp_lockhist *out,
		       uint64_t *sleeps, uint64_t *wakeups);
/* ---- end of the lock block ---- */

/* ---- hardening: the creator's layout, the truncation guard, notifier
 * takes (region.c, notify.c) ---- */
int vp_region_layout(const struct vp_region_params *p, unsigned index,
		     struct vp_queue_info *qi);
uint64_t vp_region_shared_gpa(unsigned index, unsigned num);
int vp_guard_add(void *p, uint64_t len);
void vp_guard_remove(void *p);
uint32_t vp_guard_gen(void);
int vp_guard_lost(const void *p, uint64_t len);
int vp_notifier_take(struct vp_notifier *n, unsigned max);
int vp_notifier_lost(struct vp_notifier *n);
/* ---- end of the hardening block ---- */

/* ---- the request path: who takes interrupts, waiting for room
 * (guest.c, virtio_ring.c, notify.c) ---- */
int virtqueue_more_used(struct vp_vq *vq);
int vp_notifier_wait_or(struct vp_notifier *n, uint32_t *word, uint32_t val,
			int64_t timeout_ns);
int vp_notifier_can_wait_or(struct vp_notifier *n);
int vp_guest_set_direct_irq(struct vp_guest *g, int on);
int vp_guest_direct_irq(struct vp_guest *g);
int vp_guest_set_halt_poll(struct vp_guest *g, uint64_t max_ns);
uint64_t vp_guest_halt_poll(struct vp_guest *g);
uint64_t vp_guest_halt_poll_budget(struct vp_guest *g);
uint64_t vp_halt_poll_adjust(uint64_t budget_ns, uint64_t block_ns,
			     uint64_t max_ns);
int vp_guest_wait_room(struct vp_guest *g, unsigned need, int64_t timeout_ns);
/* ---- end of the request path block ---- */

/* ---- restart: the in-flight record, waiting for a successor (restart.h,
 * vringh.c, restart.c) ---- */
#define VP_INFLIGHT_VERSION ...
struct vp_inflight_desc {
	uint8_t  inflight;
	uint8_t  pad;
	uint16_t len_lo;
	uint16_t len_hi;
	uint16_t next;
	uint64_t counter;
};
struct vp_inflight_queue {
	uint64_t features;
	uint16_t version;
	uint16_t desc_num;
	uint16_t last_batch_head;
	uint16_t used_idx;
	struct vp_inflight_desc desc[];
};
uint64_t vp_inflight_queue_size(unsigned num);
int vp_devq_set_inflight(struct vp_devq *q, void *area, uint64_t size);
unsigned vp_devq_resubmit_pending(struct vp_devq *q);
int64_t vp_restart_wait_ns(void);
void vp_set_restart_wait_ns(int64_t ns);
int vp_device_gone(const int32_t *daemon_pid);
/* ---- end of the restart block ---- */

/* crash points (crashpoint.h) */
#define VP_CRASH_NPOINTS ...
const char *vp_crash_point_name(int p);
int vp_crash_arm(int p, uint32_t n, uint64_t *died);
void vp_crash_watch(uint64_t *died);
uint64_t vp_crash_resumed_ns(void);
