/* Attach to a virtio_py device region with nothing but docs/REGION.md and
 * <linux/virtio_ring.h>: map it, check it, print its queue table, place
 * every ring with vring_init, and optionally act as a driver for one
 * request (lock, add a chain, kick, wait for the used ring).
 *
 *   cc -O2 -o attach_example docs/attach_example.c -pthread   (glibc >= 2.34;
 *                                                  older: add -lrt)
 *   ./attach_example NAME            print the layout
 *   ./attach_example NAME --submit   also send one request on queue 0
 *
 * NAME is the device name (the region is /dev/shm/NAME).  Output lines are
 * "key value ..." pairs; tests/test_region_doc.py checks them.
 *
 * The submit path assumes this program is the only driver reaping queue 0
 * (see "Sharing a queue" in REGION.md for the token and slot rules that
 * apply when virtio_py guest processes use it too).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <linux/virtio_ring.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

/* ---- the layout, as REGION.md gives it ---- */
#define VP_MAGIC          0x4f49545249565056ULL   /* "VPVIRTIO" */
#define VP_LAYOUT_VERSION 1
#define VP_HEADER_SIZE    1256
#define VP_MAX_QUEUES     16
#define VP_LOCK_SPIN      0
#define VP_LOCK_SPINYIELD 1
#define VP_LOCK_MUTEX     2
#define VP_EXIT_SYNC      1
#define F_EVENT_IDX       29    /* VIRTIO_RING_F_EVENT_IDX */

struct queue_info {                 /* header + 232 + 64 * q */
	uint16_t num, pad0;
	uint32_t pad1;
	uint64_t desc, avail, used, shared, tokens, data, data_size;
};

struct header {
	uint64_t magic;             /*   0 */
	uint32_t version;           /*   8 */
	uint32_t header_size;       /*  12 */
	uint64_t size;              /*  16 */
	uint64_t device_features;   /*  24 */
	uint64_t driver_features;   /*  32 */
	uint32_t status;            /*  40 */
	int32_t  daemon_pid;        /*  44 */
	uint32_t num_queues;        /*  48 */
	uint32_t exit_mode;         /*  52 */
	uint32_t exit_cost_ns;      /*  56 */
	uint32_t serve_mode;        /*  60 */
	uint32_t lock_kind;         /*  64 */
	uint32_t pad;               /*  68 */
	uint64_t data_offset;       /*  72 */
	uint64_t data_size;         /*  80 */
	char     name[64];          /*  88 */
	uint8_t  blk[72];           /* 152: struct virtio_blk_config (packed) */
	uint8_t  pad2[8];           /* 224 */
	struct queue_info queue[VP_MAX_QUEUES];   /* 232 */
};

struct lock {                       /* struct vp_queue_shared + 0 */
	uint32_t kind, spin_ns, next, owner, futex;
	int32_t  last_cpu;
	uint64_t t_acquired;
	uint64_t con_bounces, contentions, wait_min, wait_max, wait_total,
		 acq_bounces, acquisitions, hold_min, hold_max, hold_total;
};

struct driver_state {               /* struct vp_queue_shared + 128 */
	uint16_t free_head, num_free, num_added, avail_idx_shadow,
		 last_used_idx, avail_flags_shadow;
	uint32_t pad;
	uint64_t kicks, kicks_suppressed, added, completed;
};

/* If any of these fail, this file and REGION.md disagree. */
_Static_assert(sizeof(struct header) == VP_HEADER_SIZE, "header size");
_Static_assert(offsetof(struct header, data_offset) == 72, "data_offset");
_Static_assert(offsetof(struct header, queue) == 232, "queue table");
_Static_assert(sizeof(struct queue_info) == 64, "queue_info size");
_Static_assert(offsetof(struct lock, futex) == 16, "lock futex");
_Static_assert(offsetof(struct lock, acquisitions) == 80, "lockstat acquisitions");
_Static_assert(offsetof(struct driver_state, kicks) == 16, "drv kicks");
_Static_assert(sizeof(struct driver_state) == 48, "drv size");
#define SHARED_LOCK 0
#define SHARED_DRV  128

static uint8_t *base;

static void *gpa(uint64_t g)
{
	return base + g;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* ---- the queue lock (REGION.md, "The lock") ---- */
static void lock_acquire(struct lock *l)
{
	if (l->kind == VP_LOCK_MUTEX) {
		uint32_t c = 0;
		if (!__atomic_compare_exchange_n(&l->futex, &c, 1, 0,
						 __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
			if (c != 2)
				c = __atomic_exchange_n(&l->futex, 2, __ATOMIC_ACQUIRE);
			while (c != 0) {
				/* FUTEX_WAIT, not FUTEX_WAIT_PRIVATE: the
				 * other waiters are other processes. */
				syscall(SYS_futex, &l->futex, FUTEX_WAIT, 2, NULL, NULL, 0);
				c = __atomic_exchange_n(&l->futex, 2, __ATOMIC_ACQUIRE);
			}
		}
	} else {
		uint32_t t = __atomic_fetch_add(&l->next, 1, __ATOMIC_RELAXED);
		uint64_t t0 = now_ns();
		while (__atomic_load_n(&l->owner, __ATOMIC_ACQUIRE) != t)
			if (l->kind == VP_LOCK_SPINYIELD && now_ns() - t0 > l->spin_ns)
				sched_yield();
	}
	/* The holder keeps the lockstat counters; count ours. */
	l->acquisitions++;
	l->t_acquired = now_ns();
}

static void lock_release(struct lock *l)
{
	if (l->kind == VP_LOCK_MUTEX) {
		if (__atomic_fetch_sub(&l->futex, 1, __ATOMIC_RELEASE) != 1) {
			__atomic_store_n(&l->futex, 0, __ATOMIC_RELEASE);
			syscall(SYS_futex, &l->futex, FUTEX_WAKE, 1, NULL, NULL, 0);
		}
	} else {
		__atomic_store_n(&l->owner, l->owner + 1, __ATOMIC_RELEASE);
	}
}

static int sem_wait_ms(sem_t *s, long ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	while (sem_timedwait(s, &ts))
		if (errno != EINTR)
			return -errno;
	return 0;
}

/* One request on queue 0: a 16-byte readable buffer and a 64-byte writable
 * one in the queue's data share, as virtqueue_add + kick + get_buf do. */
static int submit_one(struct header *h, const char *name)
{
	struct queue_info *qi = &h->queue[0];
	struct lock *lk = gpa(qi->shared + SHARED_LOCK);
	struct driver_state *st = gpa(qi->shared + SHARED_DRV);
	uint64_t *tokens = gpa(qi->tokens);
	struct vring vr;
	int event_idx = !!(h->driver_features & (1ULL << F_EVENT_IDX));
	vring_init(&vr, qi->num, gpa(qi->desc), 4096);

	uint64_t out_gpa = qi->data, in_gpa = qi->data + 4096;
	memcpy(gpa(out_gpa), "attach_example\n", 16);
	memset(gpa(in_gpa), 0xff, 64);
	uint64_t addr[2] = { out_gpa, in_gpa };
	uint32_t len[2] = { 16, 64 };
	uint64_t token = 0xc0ffee;          /* any non-zero value */

	lock_acquire(lk);
	if (st->num_free < 2) {
		lock_release(lk);
		fprintf(stderr, "queue full\n");
		return 1;
	}
	/* virtqueue_add: take descriptors off the free list (linked by next). */
	uint16_t head = st->free_head, i = head, prev = head;
	for (unsigned n = 0; n < 2; n++) {
		struct vring_desc *d = &vr.desc[i];
		d->addr = addr[n];
		d->len = len[n];
		d->flags = VRING_DESC_F_NEXT | (n >= 1 ? VRING_DESC_F_WRITE : 0);
		prev = i;
		i = d->next;
	}
	vr.desc[prev].flags &= ~VRING_DESC_F_NEXT;
	st->num_free -= 2;
	st->free_head = i;
	tokens[head] = token;
	__atomic_store_n(&vr.avail->ring[st->avail_idx_shadow & (qi->num - 1)],
			 head, __ATOMIC_RELAXED);
	st->avail_idx_shadow++;
	__atomic_store_n(&vr.avail->idx, st->avail_idx_shadow, __ATOMIC_RELEASE);
	st->num_added++;
	__atomic_fetch_add(&st->added, 1, __ATOMIC_RELAXED);

	/* virtqueue_kick_prepare. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	uint16_t new = st->avail_idx_shadow, old = new - st->num_added;
	st->num_added = 0;
	int kick = event_idx
		? vring_need_event(__atomic_load_n(&vring_avail_event(&vr),
						   __ATOMIC_RELAXED), new, old)
		: !(__atomic_load_n(&vr.used->flags, __ATOMIC_RELAXED) &
		    VRING_USED_F_NO_NOTIFY);
	if (!kick)
		__atomic_fetch_add(&st->kicks_suppressed, 1, __ATOMIC_RELAXED);
	lock_release(lk);

	/* virtqueue_notify, outside the lock. */
	if (kick) {
		char sem[128];
		__atomic_fetch_add(&st->kicks, 1, __ATOMIC_RELAXED);
		snprintf(sem, sizeof(sem), "/%s.q0.kick", name);
		sem_t *k = sem_open(sem, 0);
		if (k == SEM_FAILED) {
			perror(sem);
			return 1;
		}
		sem_post(k);
		sem_close(k);
		if (h->exit_mode == VP_EXIT_SYNC) {
			/* A trapping exit: resume once the device took it. */
			snprintf(sem, sizeof(sem), "/%s.q0.ack", name);
			sem_t *a = sem_open(sem, 0);
			if (a == SEM_FAILED || sem_wait_ms(a, 5000)) {
				fprintf(stderr, "no ack from the device\n");
				return 1;
			}
			sem_close(a);
		}
	}

	/* virtqueue_get_buf, polling (a driver could wait on q0.call). */
	uint64_t t0 = now_ns();
	for (;;) {
		lock_acquire(lk);
		if (st->last_used_idx != __atomic_load_n(&vr.used->idx, __ATOMIC_ACQUIRE))
			break;
		lock_release(lk);
		if (now_ns() - t0 > 5000000000ULL) {
			fprintf(stderr, "no used buffer within 5 s\n");
			return 1;
		}
		usleep(100);
	}
	struct vring_used_elem *e = &vr.used->ring[st->last_used_idx & (qi->num - 1)];
	uint32_t id = __atomic_load_n(&e->id, __ATOMIC_RELAXED);
	uint32_t ulen = __atomic_load_n(&e->len, __ATOMIC_RELAXED);
	if (id >= qi->num || tokens[id] != token) {
		lock_release(lk);
		fprintf(stderr, "used id %u is not ours\n", id);
		return 1;
	}
	/* detach_buf: the chain goes back on the free list. */
	uint16_t j = (uint16_t)id;
	unsigned n = 1;
	tokens[id] = 0;
	while (vr.desc[j].flags & VRING_DESC_F_NEXT) {
		j = vr.desc[j].next;
		n++;
	}
	vr.desc[j].next = st->free_head;
	st->free_head = (uint16_t)id;
	st->num_free += n;
	st->last_used_idx++;
	__atomic_fetch_add(&st->completed, 1, __ATOMIC_RELAXED);
	if (!(st->avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT)) {
		__atomic_store_n(&vring_used_event(&vr), st->last_used_idx,
				 __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
	}
	lock_release(lk);

	uint32_t first;
	memcpy(&first, gpa(in_gpa), 4);
	printf("submit head %u token %#llx used_len %u first_word %u kicked %d\n",
	       (unsigned)head, (unsigned long long)token, ulen, first, kick);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s NAME [--submit]\n", argv[0]);
		return 2;
	}
	char path[128];
	snprintf(path, sizeof(path), "/%s", argv[1]);
	int fd = shm_open(path, O_RDWR, 0);
	if (fd < 0) {
		perror(path);
		return 1;
	}
	struct stat sb;
	if (fstat(fd, &sb) || (size_t)sb.st_size < sizeof(struct header)) {
		fprintf(stderr, "%s: too small to be a region\n", path);
		return 1;
	}
	base = mmap(NULL, sb.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (base == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	struct header *h = (void *)base;
	if (h->magic != VP_MAGIC || h->version != VP_LAYOUT_VERSION ||
	    h->header_size != sizeof(*h)) {
		fprintf(stderr, "not a virtio_py region of layout %d\n", VP_LAYOUT_VERSION);
		return 1;
	}
	if (h->size > (uint64_t)sb.st_size || h->num_queues < 1 ||
	    h->num_queues > VP_MAX_QUEUES) {
		fprintf(stderr, "impossible layout\n");
		return 1;
	}
	printf("version %u header_size %u size %llu\n", h->version, h->header_size,
	       (unsigned long long)h->size);
	printf("name %.64s\n", h->name);
	printf("features %#llx event_idx %d lock_kind %u exit_mode %u serve_mode %u\n",
	       (unsigned long long)h->driver_features,
	       !!(h->driver_features & (1ULL << F_EVENT_IDX)), h->lock_kind,
	       h->exit_mode, h->serve_mode);
	printf("data_offset %llu data_size %llu\n",
	       (unsigned long long)h->data_offset, (unsigned long long)h->data_size);
	printf("num_queues %u\n", h->num_queues);
	for (unsigned q = 0; q < h->num_queues; q++) {
		struct queue_info *qi = &h->queue[q];
		if (!qi->num || (qi->num & (qi->num - 1)) ||
		    qi->desc + vring_size(qi->num, 4096) > h->size) {
			fprintf(stderr, "queue %u: bad ring\n", q);
			return 1;
		}
		/* The ring starts at desc and is laid out by vring_init. */
		struct vring vr;
		vring_init(&vr, qi->num, gpa(qi->desc), 4096);
		if ((uint8_t *)vr.avail != gpa(qi->avail) ||
		    (uint8_t *)vr.used != gpa(qi->used)) {
			fprintf(stderr, "queue %u: rings not where vring_init puts them\n", q);
			return 1;
		}
		struct lock *lk = gpa(qi->shared + SHARED_LOCK);
		printf("queue %u num %u desc %llu avail %llu used %llu shared %llu "
		       "tokens %llu data %llu data_size %llu lock %u\n", q, qi->num,
		       (unsigned long long)qi->desc, (unsigned long long)qi->avail,
		       (unsigned long long)qi->used, (unsigned long long)qi->shared,
		       (unsigned long long)qi->tokens, (unsigned long long)qi->data,
		       (unsigned long long)qi->data_size, lk->kind);
	}
	int rc = 0;
	if (argc > 2 && !strcmp(argv[2], "--submit"))
		rc = submit_one(h, argv[1]);
	fflush(stdout);
	munmap(base, sb.st_size);
	return rc;
}
