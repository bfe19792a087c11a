/* virtio-blk device: the striped store and the threads that serve queues.
 *
 * Notify mode: each queue has io_threads workers that all sleep on its
 * kick; the one woken pops a request and does it itself (one wake-up per
 * request, not a serve loop's plus a pool thread's), re-arming kicks first
 * so the next request wakes an idle worker.  Without I/O threads (a memory
 * store: nothing to wait for) one serve loop per queue runs requests
 * inline.  Poll mode: one loop per queue spins on the avail ring and hands
 * requests to a pool.  Whoever runs a request does the I/O straight
 * between the stripe files and the region's buffers, writes the status
 * byte, pushes the used entry and interrupts the guest, so no request
 * waits behind another's disk I/O. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "blkdev.h"
#include "compiler.h"

/* ================= striped store ================= */

struct vp_store {
	unsigned n;
	int fds[VP_STORE_MAX_STRIPES];
	uint64_t chunk;
	uint64_t capacity;   /* bytes */
	int direct;
	uint8_t *zeros;      /* aligned zero buffer for write-zeroes fallback */
};

#define ZERO_BUF (1 << 20)

struct vp_store *vp_store_open(const int *fds, unsigned nstripes,
			       uint64_t chunk, uint64_t capacity, int direct,
			       int *err)
{
	if (nstripes < 1 || nstripes > VP_STORE_MAX_STRIPES || chunk < 512 ||
	    chunk % 512 || capacity % 512) {
		*err = -EINVAL;
		return NULL;
	}
	struct vp_store *s = calloc(1, sizeof(*s));
	if (!s || posix_memalign((void **)&s->zeros, 4096, ZERO_BUF)) {
		free(s);
		*err = -ENOMEM;
		return NULL;
	}
	memset(s->zeros, 0, ZERO_BUF);
	s->n = nstripes;
	memcpy(s->fds, fds, nstripes * sizeof(int));
	s->chunk = chunk;
	s->capacity = capacity;
	s->direct = direct;
	*err = 0;
	return s;
}

void vp_store_close(struct vp_store *s)
{
	if (!s)
		return;
	free(s->zeros);
	free(s);
}

/* RAID-0: logical chunk k is in stripe k mod N at (k div N) * chunk. */
static void locate(const struct vp_store *s, uint64_t off, unsigned *stripe,
		   uint64_t *foff, uint64_t *room)
{
	uint64_t k = off / s->chunk, in = off % s->chunk;
	*stripe = (unsigned)(k % s->n);
	*foff = (k / s->n) * s->chunk + in;
	*room = s->chunk - in;
}

int vp_store_rw(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		uint64_t len)
{
	if (off > s->capacity || len > s->capacity - off)
		return -ERANGE;
	while (len) {
		unsigned st;
		uint64_t foff, room;
		locate(s, off, &st, &foff, &room);
		size_t n = len < room ? len : room;
		ssize_t r = write ? pwrite(s->fds[st], buf, n, (off_t)foff)
				  : pread(s->fds[st], buf, n, (off_t)foff);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0) {
			/* Past the end of a sparse stripe file: zeros. */
			if (write)
				return -EIO;
			memset(buf, 0, n);
			r = (ssize_t)n;
		}
		off += (uint64_t)r;
		buf += r;
		len -= (uint64_t)r;
	}
	return 0;
}

int vp_store_flush(struct vp_store *s)
{
	for (unsigned i = 0; i < s->n; i++)
		if (fdatasync(s->fds[i]))
			return -errno;
	return 0;
}

int vp_store_zero(struct vp_store *s, uint64_t off, uint64_t len, int punch)
{
	if (off > s->capacity || len > s->capacity - off)
		return -ERANGE;
	int mode = punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
			 : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	while (len) {
		unsigned st;
		uint64_t foff, room;
		locate(s, off, &st, &foff, &room);
		uint64_t n = len < room ? len : room;
		if (fallocate(s->fds[st], mode, (off_t)foff, (off_t)n)) {
			/* Not every filesystem punches holes: write zeros. */
			if (errno != EOPNOTSUPP && errno != ENOSYS &&
			    errno != EINVAL)
				return -errno;
			for (uint64_t done = 0; done < n;) {
				size_t w = n - done < ZERO_BUF ? n - done : ZERO_BUF;
				ssize_t r = pwrite(s->fds[st], s->zeros, w,
						   (off_t)(foff + done));
				if (r <= 0) {
					if (r < 0 && errno == EINTR)
						continue;
					return r < 0 ? -errno : -EIO;
				}
				done += (uint64_t)r;
			}
		}
		off += n;
		len -= n;
	}
	return 0;
}

/* ================= requests ================= */

struct vp_server;
struct serve_arg {
	struct vp_server *srv;
	unsigned qi;
};

struct work {
	struct work *next;
	struct vp_devq *q;
	struct vp_chain c;
	struct vp_seg segs[];
};

struct vp_server {
	struct vp_store *st;
	int mode;
	unsigned io_threads;    /* per queue */
	char serial[VIRTIO_BLK_ID_BYTES];
	unsigned nq;
	struct vp_devq *q[VP_MAX_QUEUES];
	/* Kicks a worker posted to wake a peer: not the guest's, never acked. */
	uint32_t self_kicks[VP_MAX_QUEUES];
	pthread_t *threads;     /* serve loops, or each queue's workers */
	struct serve_arg *args;
	unsigned nthreads, started;
	pthread_t *pool;        /* poll mode: the I/O pool */
	unsigned npool, pool_started;
	/* poll mode: work handed from the poll loops to the pool */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	pthread_cond_t idle_cv;
	struct work *head, *tail;
	unsigned busy;          /* queued or running */
	volatile int stop;      /* serve threads: stop popping */
	int pool_stop;
};

static uint64_t seg_total(const struct vp_seg *segs, unsigned from,
			  unsigned to)
{
	uint64_t t = 0;
	for (unsigned i = from; i < to; i++)
		t += segs[i].len;
	return t;
}

/* len bytes of a chain's readable or writable stream (segments [i0, i1)),
 * starting skip bytes in.  VIRTIO_F_VERSION_1 lets a driver lay a request
 * over descriptors any way it likes, so the header, the data and the status
 * byte are found in the streams, not in particular descriptors. */
struct span {
	const struct vp_seg *segs;
	unsigned i0, i1;
	uint64_t skip, len;
};

/* Call fn on every piece of the span, with the piece's offset in it. */
static int span_walk(struct vp_devq *q, const struct span *s,
		     int (*fn)(struct vp_devq *q, uint8_t *p, uint32_t n,
			       uint64_t pos, void *arg),
		     void *arg)
{
	uint64_t skip = s->skip, left = s->len, pos = 0;
	for (unsigned i = s->i0; i < s->i1 && left; i++) {
		uint64_t l = s->segs[i].len;
		if (skip >= l) {
			skip -= l;
			continue;
		}
		uint64_t n = l - skip < left ? l - skip : left;
		int r = fn(q, vp_devq_gpa(q, s->segs[i].addr + skip),
			   (uint32_t)n, pos, arg);
		if (r)
			return r;
		pos += n;
		left -= n;
		skip = 0;
	}
	return 0;
}

static int piece_from_guest(struct vp_devq *q, uint8_t *p, uint32_t n,
			    uint64_t pos, void *buf)
{
	(void)q;
	memcpy((uint8_t *)buf + pos, p, n);
	return 0;
}

static int piece_to_guest(struct vp_devq *q, uint8_t *p, uint32_t n,
			  uint64_t pos, void *buf)
{
	(void)q;
	memcpy(p, (const uint8_t *)buf + pos, n);
	return 0;
}

struct store_io {
	struct vp_store *st;
	int write;
	uint64_t off;
};

static int piece_store(struct vp_devq *q, uint8_t *p, uint32_t n,
		       uint64_t pos, void *arg)
{
	(void)q;
	struct store_io *io = arg;
	return vp_store_rw(io->st, io->write, io->off + pos, p, n);
}

static int piece_unaligned(struct vp_devq *q, uint8_t *p, uint32_t n,
			   uint64_t pos, void *arg)
{
	(void)q;
	(void)pos;
	(void)arg;
	return ((uintptr_t)p | n) % 512 != 0;
}

#define BOUNCE_MAX (16U << 20)

/* Move a request's data between the store and the guest.  Straight from
 * and into the guest's buffers where O_DIRECT can take them; a layout that
 * cuts sectors apart goes through one aligned bounce buffer instead. */
static int data_io(struct vp_store *st, struct vp_devq *q,
		   const struct span *data, int write, uint64_t off)
{
	struct store_io io = { st, write, off };
	if (!st->direct || !span_walk(q, data, piece_unaligned, NULL))
		return span_walk(q, data, piece_store, &io);
	if (data->len > BOUNCE_MAX)
		return -E2BIG;
	uint8_t *b;
	if (posix_memalign((void **)&b, 4096, data->len ? data->len : 1))
		return -ENOMEM;
	int r;
	if (write) {
		span_walk(q, data, piece_from_guest, b);
		r = vp_store_rw(st, 1, off, b, data->len);
	} else {
		r = vp_store_rw(st, 0, off, b, data->len);
		if (!r)
			span_walk(q, data, piece_to_guest, b);
	}
	free(b);
	return r;
}

/* Execute one request; returns the used length.  The chain was checked by
 * vp_devq_pop: every segment lies inside the data area, and the readable
 * segments [0, n_out) come before the writable ones. */
static uint32_t execute(struct vp_server *srv, struct vp_devq *q,
			const struct vp_chain *c, const struct vp_seg *segs,
			struct vp_device_stats *ds)
{
	struct virtio_blk_outhdr hdr;
	unsigned n = c->nseg, nout = c->n_out;
	uint64_t out_len = seg_total(segs, 0, nout);
	uint64_t in_len = seg_total(segs, nout, n);
	/* The header opens the readable stream, the status byte closes the
	 * writable one; without room for both there is nothing to answer. */
	if (out_len < sizeof(hdr) || in_len < 1) {
		vp_devq_mark_broken(q, VP_EFRAME);
		return 0;
	}
	const struct span head = { segs, 0, nout, 0, sizeof(hdr) };
	span_walk(q, &head, piece_from_guest, &hdr);   /* read once */
	const struct vp_seg *last = &segs[n - 1];
	uint8_t *status = vp_devq_gpa(q, last->addr + last->len - 1);
	const struct span out = { segs, 0, nout, sizeof(hdr), out_len - sizeof(hdr) };
	const struct span in = { segs, nout, n, 0, in_len - 1 };
	uint8_t st = VIRTIO_BLK_S_OK;
	uint32_t used = 1;
	uint64_t cap = srv->st->capacity;
	int cls;

	switch (hdr.type) {
	case VIRTIO_BLK_T_IN:
	case VIRTIO_BLK_T_OUT: {
		int rd = hdr.type == VIRTIO_BLK_T_IN;
		const struct span *data = rd ? &in : &out;
		uint64_t total = data->len;
		cls = rd ? VP_REQ_IN : VP_REQ_OUT;
		/* Data flowing the wrong way for the request is an error. */
		if ((rd ? out.len : in.len) || total % 512 ||
		    hdr.sector > cap / 512 || total > cap - hdr.sector * 512) {
			st = VIRTIO_BLK_S_IOERR;
			break;
		}
		if (data_io(srv->st, q, data, !rd, hdr.sector * 512)) {
			st = VIRTIO_BLK_S_IOERR;
			break;
		}
		if (rd) {
			/* used.len is 32 bits: segments may overlap, so a
			 * read can pass 4 GiB; say as much as fits. */
			used = total < UINT32_MAX ? (uint32_t)total + 1 : UINT32_MAX;
			__atomic_fetch_add(&ds->bytes_read, total, __ATOMIC_RELAXED);
		} else {
			__atomic_fetch_add(&ds->bytes_written, total, __ATOMIC_RELAXED);
		}
		break;
	}
	case VIRTIO_BLK_T_FLUSH:
		cls = VP_REQ_FLUSH;
		if (vp_store_flush(srv->st))
			st = VIRTIO_BLK_S_IOERR;
		break;
	case VIRTIO_BLK_T_GET_ID: {
		cls = VP_REQ_GET_ID;
		if (in.len == 0) {
			st = VIRTIO_BLK_S_IOERR;
			break;
		}
		struct span id = in;
		if (id.len > VIRTIO_BLK_ID_BYTES)
			id.len = VIRTIO_BLK_ID_BYTES;
		span_walk(q, &id, piece_to_guest, srv->serial);
		used += (uint32_t)id.len;
		break;
	}
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES: {
		int discard = hdr.type == VIRTIO_BLK_T_DISCARD;
		cls = discard ? VP_REQ_DISCARD : VP_REQ_WZEROES;
		/* One range per request (max_*_seg = 1 in config space). */
		struct virtio_blk_discard_write_zeroes r;
		if (out.len != sizeof(r)) {
			st = VIRTIO_BLK_S_IOERR;
			break;
		}
		span_walk(q, &out, piece_from_guest, &r);
		if ((r.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ||
		    (discard && r.flags) || r.sector > cap / 512 ||
		    (uint64_t)r.num_sectors * 512 > cap - r.sector * 512) {
			st = discard && r.flags ? VIRTIO_BLK_S_UNSUPP
						: VIRTIO_BLK_S_IOERR;
			break;
		}
		if (vp_store_zero(srv->st, r.sector * 512,
				  (uint64_t)r.num_sectors * 512,
				  discard || (r.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
			st = VIRTIO_BLK_S_IOERR;
		break;
	}
	default:
		cls = VP_REQ_UNSUPP;
		st = VIRTIO_BLK_S_UNSUPP;
		break;
	}
	__atomic_fetch_add(&ds->req[cls], 1, __ATOMIC_RELAXED);
	if (st == VIRTIO_BLK_S_IOERR)
		__atomic_fetch_add(&ds->req[VP_REQ_IOERR], 1, __ATOMIC_RELAXED);
	WRITE_ONCE(*status, st);
	return used;
}

static void complete(struct vp_server *srv, struct vp_devq *q,
		     const struct vp_chain *c, const struct vp_seg *segs,
		     int interrupt)
{
	uint32_t used = execute(srv, q, c, segs, vp_devq_stats(q));
	vp_devq_push(q, c->head, used);
	if (interrupt)
		vp_devq_interrupt(q);
}

static void *pool_main(void *arg)
{
	struct vp_server *srv = arg;
	for (;;) {
		pthread_mutex_lock(&srv->mu);
		while (!srv->head && !srv->pool_stop)
			pthread_cond_wait(&srv->cv, &srv->mu);
		struct work *w = srv->head;
		if (!w) {
			pthread_mutex_unlock(&srv->mu);
			return NULL;
		}
		srv->head = w->next;
		if (!srv->head)
			srv->tail = NULL;
		pthread_mutex_unlock(&srv->mu);

		complete(srv, w->q, &w->c, w->segs, 1);
		free(w);

		pthread_mutex_lock(&srv->mu);
		if (--srv->busy == 0)
			pthread_cond_broadcast(&srv->idle_cv);
		pthread_mutex_unlock(&srv->mu);
	}
}

static void dispatch(struct vp_server *srv, struct vp_devq *q,
		     const struct vp_chain *c, const struct vp_seg *segs)
{
	struct work *w = malloc(sizeof(*w) + c->nseg * sizeof(struct vp_seg));
	if (!w) {
		complete(srv, q, c, segs, 1);   /* no memory: do it here */
		return;
	}
	w->next = NULL;
	w->q = q;
	w->c = *c;
	memcpy(w->segs, segs, c->nseg * sizeof(struct vp_seg));
	pthread_mutex_lock(&srv->mu);
	if (srv->tail)
		srv->tail->next = w;
	else
		srv->head = w;
	srv->tail = w;
	srv->busy++;
	pthread_cond_signal(&srv->cv);
	pthread_mutex_unlock(&srv->mu);
}

/* Pop everything available; returns how many requests were taken. */
static int drain(struct vp_server *srv, struct vp_devq *q,
		 struct vp_seg *segs, unsigned max_segs)
{
	struct vp_chain c;
	int n = 0, r;
	while (!srv->stop && (r = vp_devq_pop(q, &c, segs, max_segs)) == 1) {
		if (srv->pool)
			dispatch(srv, q, &c, segs);
		else
			complete(srv, q, &c, segs, 0);
		n++;
	}
	if (!srv->pool && n)
		vp_devq_interrupt(q);
	return n;
}

static void backoff(unsigned idle)
{
	if (idle < 256) {
		cpu_relax();
	} else if (idle < 512) {
		sched_yield();
	} else {
		/* Idle for a while: sleep, longer and longer, up to 1 ms. */
		unsigned shift = idle < 512 + 5 ? idle - 512 : 5;
		struct timespec ts = { 0, 31250L << shift };
		nanosleep(&ts, NULL);
	}
}

/* Of k kicks taken from the kick notifier, how many were the guest's: the
 * rest were posted by workers to wake each other.  Counted as taken only
 * if counted is 0 (vp_devq_wait_kick counts all it takes). */
static int guest_kicks(struct vp_server *srv, unsigned qi, int k, int counted)
{
	uint32_t *self = &srv->self_kicks[qi];
	uint32_t s = __atomic_load_n(self, __ATOMIC_RELAXED), take;
	do {
		take = s < (uint32_t)k ? s : (uint32_t)k;
	} while (take && !__atomic_compare_exchange_n(self, &s, s - take, 0,
						      __ATOMIC_RELAXED,
						      __ATOMIC_RELAXED));
	struct vp_device_stats *ds = vp_devq_stats(srv->q[qi]);
	if (counted)
		__atomic_fetch_sub(&ds->kicks_taken, take, __ATOMIC_RELAXED);
	else
		__atomic_fetch_add(&ds->kicks_taken, k - take, __ATOMIC_RELAXED);
	return k - (int)take;
}

static void wake_peer(struct vp_server *srv, unsigned qi)
{
	__atomic_fetch_add(&srv->self_kicks[qi], 1, __ATOMIC_RELAXED);
	vp_notifier_post(vp_devq_kick(srv->q[qi]));
}

/* Notify mode with I/O threads.  Every worker of a queue sleeps on the
 * queue's kick itself and does the I/O of the request it pops: a request
 * costs the device one wake-up, not a serve loop's plus a pool thread's.
 * A worker re-enables kicks as soon as it has popped, so the next request
 * wakes an idle peer, and wakes one itself for a request already waiting:
 * no request waits behind another's disk I/O while a worker is idle. */
static void *worker_main(void *arg)
{
	struct serve_arg *a = arg;
	struct vp_server *srv = a->srv;
	struct vp_devq *q = srv->q[a->qi];
	unsigned max_segs = vp_devq_num(q);
	struct vp_seg *segs = calloc(max_segs, sizeof(*segs));
	struct vp_chain c;
	int acks = 0;
	if (!segs)
		return NULL;
	while (!srv->stop) {
		/* Kicks that came while we worked are taken now: a sync exit
		 * must not wait until some worker goes idle. */
		int k = vp_notifier_drain_opt(vp_devq_kick(q));
		if (k > 0)
			acks += guest_kicks(srv, a->qi, k, 0);
		int r = vp_devq_broken(q) ? 0 : vp_devq_pop(q, &c, segs, max_segs);
		/* Acked once popped: the exit returns when its request is
		 * taken (by us or a peer), not when it is done. */
		if (acks) {
			vp_devq_ack_kicks(q, acks);
			acks = 0;
		}
		if (r == 1) {
			if (vp_devq_enable_notify(q))
				wake_peer(srv, a->qi);
			complete(srv, q, &c, segs, 1);
			continue;
		}
		/* Idle: kicks on, and a last look before sleeping. */
		if (!vp_devq_broken(q) && vp_devq_enable_notify(q))
			continue;
		k = vp_devq_wait_kick(q, 200000000);
		if (k > 0)
			acks += guest_kicks(srv, a->qi, k, 1);
	}
	if (acks)
		vp_devq_ack_kicks(q, acks);
	free(segs);
	return NULL;
}

/* One per queue: notify mode without I/O threads (a memory store, served
 * inline), or poll mode (handing requests to the pool). */
static void *serve_main(void *arg)
{
	struct serve_arg *a = arg;
	struct vp_server *srv = a->srv;
	struct vp_devq *q = srv->q[a->qi];
	unsigned max_segs = vp_devq_num(q);
	struct vp_seg *segs = calloc(max_segs, sizeof(*segs));
	if (!segs)
		return NULL;
	if (srv->mode == VP_MODE_POLL) {
		vp_devq_disable_notify(q);
		unsigned idle = 0;
		while (!srv->stop) {
			/* Kicks still arrive from a guest that saw none
			 * suppressed yet; a sync exit waits for its ack. */
			int k = vp_notifier_drain_opt(vp_devq_kick(q));
			int n = vp_devq_broken(q) ? 0 : drain(srv, q, segs, max_segs);
			if (k > 0) {
				__atomic_fetch_add(&vp_devq_stats(q)->kicks_taken, k,
						   __ATOMIC_RELAXED);
				vp_devq_ack_kicks(q, k);
			}
			idle = n || k ? 0 : idle + 1;
			if (!n && !k)
				backoff(idle);
		}
	} else {
		while (!srv->stop) {
			if (!vp_devq_broken(q) && vp_devq_enable_notify(q)) {
				vp_devq_disable_notify(q);
				/* Kicks posted so far are for requests this drain
				 * pops: a sync exit returns now, not at the next
				 * wait (under steady load that never came and
				 * exits stalled for up to hundreds of ms). */
				int k = vp_devq_wait_kick(q, 0);
				drain(srv, q, segs, max_segs);
				if (k > 0)
					vp_devq_ack_kicks(q, k);
				continue;
			}
			int k = vp_devq_wait_kick(q, 50000000);
			if (k <= 0)
				continue;
			vp_devq_disable_notify(q);
			if (!vp_devq_broken(q))
				drain(srv, q, segs, max_segs);
			/* The exit returns once its requests are submitted. */
			vp_devq_ack_kicks(q, k);
		}
	}
	free(segs);
	return NULL;
}

struct vp_server *vp_server_new(struct vp_store *st, int mode,
				unsigned io_threads, const char *serial,
				int *err)
{
	if (!st || mode < VP_MODE_NOTIFY || mode > VP_MODE_POLL ||
	    io_threads > 1024) {
		*err = -EINVAL;
		return NULL;
	}
	struct vp_server *srv = calloc(1, sizeof(*srv));
	if (!srv) {
		*err = -ENOMEM;
		return NULL;
	}
	srv->st = st;
	srv->mode = mode;
	srv->io_threads = io_threads;
	if (serial)
		/* 20 bytes, NUL-padded, not NUL-terminated when full. */
		memcpy(srv->serial, serial, strnlen(serial, sizeof(srv->serial)));
	pthread_mutex_init(&srv->mu, NULL);
	pthread_cond_init(&srv->cv, NULL);
	pthread_cond_init(&srv->idle_cv, NULL);
	*err = 0;
	return srv;
}

int vp_server_add_queue(struct vp_server *srv, struct vp_devq *q)
{
	/* Notify mode sleeps on the queue's kick and wakes workers with it. */
	if (srv->nq >= VP_MAX_QUEUES || srv->threads ||
	    (srv->mode == VP_MODE_NOTIFY && !vp_devq_kick(q)))
		return -EINVAL;
	srv->q[srv->nq++] = q;
	return 0;
}

int vp_server_start(struct vp_server *srv)
{
	if (srv->threads || !srv->nq)
		return -EINVAL;
	/* A server stopped before may start again. */
	srv->stop = 0;
	srv->pool_stop = 0;
	int workers = srv->mode == VP_MODE_NOTIFY && srv->io_threads;
	unsigned per_q = workers ? srv->io_threads : 1;
	srv->nthreads = per_q * srv->nq;
	srv->threads = calloc(srv->nthreads, sizeof(pthread_t));
	srv->args = calloc(srv->nthreads, sizeof(struct serve_arg));
	if (!srv->threads || !srv->args) {
		vp_server_stop(srv);
		return -ENOMEM;
	}
	if (srv->mode == VP_MODE_POLL && srv->io_threads) {
		unsigned n = srv->io_threads * srv->nq;
		srv->npool = n < 1024 ? n : 1024;
		srv->pool = calloc(srv->npool, sizeof(pthread_t));
		if (!srv->pool) {
			vp_server_stop(srv);
			return -ENOMEM;
		}
		for (; srv->pool_started < srv->npool; srv->pool_started++) {
			int r = pthread_create(&srv->pool[srv->pool_started],
					       NULL, pool_main, srv);
			if (r) {
				vp_server_stop(srv);
				return -r;
			}
		}
	}
	for (unsigned i = 0; i < srv->nthreads; i++) {
		struct serve_arg *a = &srv->args[i];
		a->srv = srv;
		a->qi = i % srv->nq;
		int r = pthread_create(&srv->threads[i], NULL,
				       workers ? worker_main : serve_main, a);
		if (r) {
			vp_server_stop(srv);
			return -r;
		}
		srv->started++;
	}
	return 0;
}

void vp_server_stop(struct vp_server *srv)
{
	srv->stop = 1;
	if (srv->mode == VP_MODE_NOTIFY && srv->io_threads)
		/* Wake sleeping workers now rather than at their timeout. */
		for (unsigned i = 0; i < srv->started; i++)
			wake_peer(srv, i % srv->nq);
	for (unsigned i = 0; i < srv->started; i++)
		pthread_join(srv->threads[i], NULL);
	srv->started = 0;
	free(srv->threads);
	free(srv->args);
	srv->threads = NULL;
	srv->args = NULL;
	/* Requests already popped complete before the pool goes. */
	pthread_mutex_lock(&srv->mu);
	while (srv->busy)
		pthread_cond_wait(&srv->idle_cv, &srv->mu);
	srv->pool_stop = 1;
	pthread_cond_broadcast(&srv->cv);
	pthread_mutex_unlock(&srv->mu);
	for (unsigned i = 0; i < srv->pool_started; i++)
		pthread_join(srv->pool[i], NULL);
	srv->pool_started = 0;
	free(srv->pool);
	srv->pool = NULL;
	for (unsigned i = 0; i < srv->nq; i++)
		vp_devq_interrupt(srv->q[i]);
}

void vp_server_free(struct vp_server *srv)
{
	if (!srv)
		return;
	vp_server_stop(srv);
	pthread_mutex_destroy(&srv->mu);
	pthread_cond_destroy(&srv->cv);
	pthread_cond_destroy(&srv->idle_cv);
	free(srv);
}
