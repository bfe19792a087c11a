/* virtio-blk device: the threads that serve queues.
 *
 * Notify mode: each queue has io_threads workers that all sleep on its
 * kick; the one woken pops a request and does it itself (one wake-up per
 * request, not a serve loop's plus a pool thread's), re-arming kicks first
 * so the next request wakes an idle worker.  Without I/O threads (a memory
 * store: nothing to wait for) one serve loop per queue runs requests
 * inline.  Poll mode: one loop per queue spins on the avail ring and hands
 * requests to a pool.  Whoever runs a request executes it (vp_blk_handle),
 * pushes the used entry and interrupts the guest, so no request waits
 * behind another's disk I/O.
 *
 * Queues start and stop one by one (vhost-user enables and stops rings
 * separately) or all together; a stopped queue has no thread, no request
 * in flight and no kick pending.
 *
 * Kicks are a guest's to forge: any count it writes into the notifier is
 * taken in one step and saturates at the queue size (vp_devq_wait_kick),
 * acks follow what was taken, and every loop looks at its stop flag
 * between bounded waits, so a kick flood cannot keep a stop waiting. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "blkdev.h"
#include "compiler.h"
#include "uring.h"

struct srv_queue;
struct uring_state;

/* A serve loop or an I/O worker, with its own segment array. */
struct srv_thread {
	struct srv_queue *sq;
	pthread_t tid;
	struct vp_seg *segs;
	struct uring_state *us;     /* the io_uring engine's loop: its ring */
};

struct srv_queue {
	struct vp_server *srv;
	struct vp_devq *q;          /* borrowed; NULL: no queue here */
	int running;                /* threads started: owner's view */
	int stop;                   /* threads: stop popping */
	/* Kicks a worker posted to wake a peer: not the guest's, never acked. */
	uint32_t self_kicks;
	unsigned busy;              /* poll mode: at the pool, not done (srv->mu) */
	struct srv_thread *thr;
	unsigned nthr, started;
	int engine;                 /* VP_ENGINE_* its threads run */
};

struct work {
	struct work *next;
	struct srv_queue *sq;
	struct vp_chain c;
	struct vp_seg segs[];
};

struct vp_server {
	struct vp_store *st;
	int mode;
	unsigned io_threads;        /* per queue */
	int engine;                 /* VP_ENGINE_*: asked for */
	char serial[VIRTIO_BLK_ID_BYTES];
	unsigned nq;                /* queues lie in sq[0, nq) */
	struct srv_queue sq[VP_MAX_QUEUES];
	/* poll mode: the I/O pool, fed by the poll loops */
	pthread_t *pool;
	unsigned npool, pool_started;
	pthread_mutex_t mu;
	pthread_cond_t cv;          /* work queued, or the pool stops */
	pthread_cond_t idle_cv;     /* a queue's busy fell to 0 */
	struct work *head, *tail;
	int pool_stop;
};

static void complete(struct srv_queue *sq, const struct vp_chain *c,
		     const struct vp_seg *segs, int interrupt)
{
	struct vp_devq *q = sq->q;
	int64_t used = vp_blk_handle(sq->srv->st, q, c, segs, sq->srv->serial);
	/* A framing error broke the queue: the push only ends the request. */
	vp_devq_push(q, c->head, used < 0 ? 0 : (uint32_t)used);
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

		struct srv_queue *sq = w->sq;
		complete(sq, &w->c, w->segs, 1);
		free(w);

		pthread_mutex_lock(&srv->mu);
		if (--sq->busy == 0)
			pthread_cond_broadcast(&srv->idle_cv);
		pthread_mutex_unlock(&srv->mu);
	}
}

static void dispatch(struct srv_queue *sq, const struct vp_chain *c,
		     const struct vp_seg *segs)
{
	struct vp_server *srv = sq->srv;
	struct work *w = malloc(sizeof(*w) + c->nseg * sizeof(struct vp_seg));
	if (!w) {
		complete(sq, c, segs, 1);   /* no memory: do it here */
		return;
	}
	w->next = NULL;
	w->sq = sq;
	w->c = *c;
	memcpy(w->segs, segs, c->nseg * sizeof(struct vp_seg));
	pthread_mutex_lock(&srv->mu);
	if (srv->tail)
		srv->tail->next = w;
	else
		srv->head = w;
	srv->tail = w;
	sq->busy++;
	pthread_cond_signal(&srv->cv);
	pthread_mutex_unlock(&srv->mu);
}

/* Pop everything available; returns how many requests were taken. */
static int drain(struct srv_queue *sq, struct vp_seg *segs, unsigned max_segs)
{
	struct vp_devq *q = sq->q;
	int pool = sq->srv->pool != NULL;
	struct vp_chain c;
	int n = 0;
	while (!READ_ONCE(sq->stop) && vp_devq_pop(q, &c, segs, max_segs) == 1) {
		if (pool)
			dispatch(sq, &c, segs);
		else
			complete(sq, &c, segs, 0);
		n++;
	}
	if (!pool && n)
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

/* Every kick pending on q, taken without sleeping: how many (0 without a
 * kick notifier), at most the queue size, counted as taken. */
static int take_kicks(struct vp_devq *q)
{
	int k = vp_devq_kick(q) ? vp_devq_wait_kick(q, 0) : 0;
	return k > 0 ? k : 0;
}

/* a + b, saturating at the queue size: acks owed never exceed what the
 * queue could have had kicked. */
static int acks_add(struct vp_devq *q, int a, int b)
{
	int num = (int)vp_devq_num(q);
	return a + b > num ? num : a + b;
}

/* Of k kicks taken from the kick notifier (and counted as taken), how many
 * were the guest's: the rest were posted by the server to wake its own
 * threads, and are taken back out of the count. */
static int guest_kicks(struct srv_queue *sq, int k)
{
	uint32_t s = __atomic_load_n(&sq->self_kicks, __ATOMIC_RELAXED), take;
	do {
		take = s < (uint32_t)k ? s : (uint32_t)k;
	} while (take && !__atomic_compare_exchange_n(&sq->self_kicks, &s,
						      s - take, 0,
						      __ATOMIC_RELAXED,
						      __ATOMIC_RELAXED));
	if (take)
		__atomic_fetch_sub(&vp_devq_stats(sq->q)->kicks_taken, take,
				   __ATOMIC_RELAXED);
	return k - (int)take;
}

static void wake_thread(struct srv_queue *sq)
{
	__atomic_fetch_add(&sq->self_kicks, 1, __ATOMIC_RELAXED);
	vp_notifier_post(vp_devq_kick(sq->q));
}

/* Notify mode with I/O threads.  Every worker of a queue sleeps on the
 * queue's kick itself and does the I/O of the request it pops: a request
 * costs the device one wake-up, not a serve loop's plus a pool thread's.
 * A worker re-enables kicks as soon as it has popped, so the next request
 * wakes an idle peer, and wakes one itself for a request already waiting:
 * no request waits behind another's disk I/O while a worker is idle. */
static void *worker_main(void *arg)
{
	struct srv_thread *t = arg;
	struct srv_queue *sq = t->sq;
	struct vp_devq *q = sq->q;
	unsigned max_segs = vp_devq_num(q);
	struct vp_chain c;
	int acks = 0;
	while (!READ_ONCE(sq->stop)) {
		/* Kicks that came while we worked are taken now: a sync exit
		 * must not wait until some worker goes idle. */
		int k = take_kicks(q);
		if (k > 0)
			acks = acks_add(q, acks, guest_kicks(sq, k));
		int r = vp_devq_broken(q) ? 0 : vp_devq_pop(q, &c, t->segs, max_segs);
		/* Acked once popped: the exit returns when its request is
		 * taken (by us or a peer), not when it is done. */
		if (acks) {
			vp_devq_ack_kicks(q, acks);
			acks = 0;
		}
		if (r == 1) {
			if (vp_devq_enable_notify(q))
				wake_thread(sq);
			complete(sq, &c, t->segs, 1);
			continue;
		}
		/* Idle: kicks on, and a last look before sleeping. */
		if (!vp_devq_broken(q) && vp_devq_enable_notify(q))
			continue;
		k = vp_devq_wait_kick(q, 200000000);
		if (k > 0)
			acks = acks_add(q, acks, guest_kicks(sq, k));
	}
	if (acks)
		vp_devq_ack_kicks(q, acks);
	return NULL;
}

/* One per queue: notify mode without I/O threads (a memory store, served
 * inline), or poll mode (handing requests to the pool). */
static void *serve_main(void *arg)
{
	struct srv_thread *t = arg;
	struct srv_queue *sq = t->sq;
	struct vp_devq *q = sq->q;
	unsigned max_segs = vp_devq_num(q);
	if (sq->srv->mode == VP_MODE_POLL) {
		vp_devq_disable_notify(q);
		unsigned idle = 0;
		while (!READ_ONCE(sq->stop)) {
			/* Kicks still arrive from a guest that saw none
			 * suppressed yet; a sync exit waits for its ack. */
			int k = take_kicks(q);
			int n = vp_devq_broken(q) ? 0 : drain(sq, t->segs, max_segs);
			if (k > 0)
				vp_devq_ack_kicks(q, k);
			idle = n || k ? 0 : idle + 1;
			if (!n && !k)
				backoff(idle);
		}
		return NULL;
	}
	while (!READ_ONCE(sq->stop)) {
		if (!vp_devq_broken(q) && vp_devq_enable_notify(q)) {
			vp_devq_disable_notify(q);
			/* Kicks posted so far are for requests this drain
			 * pops: a sync exit returns now, not at the next wait
			 * (under steady load that never came and exits
			 * stalled for up to hundreds of ms). */
			int k = vp_devq_wait_kick(q, 0);
			drain(sq, t->segs, max_segs);
			if (k > 0)
				vp_devq_ack_kicks(q, guest_kicks(sq, k));
			continue;
		}
		int k = vp_devq_wait_kick(q, 50000000);
		if (k <= 0)
			continue;
		k = guest_kicks(sq, k);   /* stop wakes us with a kick */
		vp_devq_disable_notify(q);
		if (!vp_devq_broken(q))
			drain(sq, t->segs, max_segs);
		/* The exit returns once its requests are submitted. */
		vp_devq_ack_kicks(q, k);
	}
	return NULL;
}

/* ================= the io_uring engine =================
 *
 * Notify mode on a store of files: one thread per queue instead of
 * io_threads.  It pops every request available, queues the reads and
 * writes of all of them on its io_uring and hands them to the kernel in
 * one call; completions are reaped in batches, each finished request is
 * pushed, and one interrupt goes for the batch.  It sleeps once for both
 * events: futex_waitv on the kick semaphore and on the ring's CQ tail
 * word.  Block I/O completes by task work queued to this (the submitting)
 * thread, which interrupts the sleep; the system call restarts, finds the
 * tail moved and returns (what the kernel's io-wq completes is passed on
 * by uring.c's watcher).  A flush syncs every stripe file at once.
 * Everything else (discard, write zeroes, GET_ID, a bounce buffer, a
 * request cut into more pieces than a batch takes, a short transfer's
 * rest) runs inline, synchronously, as the threads would run it. */

#define URING_SQ          256
#define URING_CQ          2048     /* pieces in flight at most */
#define URING_MAX_PIECES  64       /* a request cut in more runs inline */

struct upiece {
	uint8_t *buf;
	uint64_t off;            /* logical */
	uint32_t len;
	uint16_t head;
};

struct ureq {
	struct vp_blk_rw rw;
	unsigned pending;        /* pieces in flight */
	int err;
};

struct uring_state {
	struct vp_uring u;
	struct ureq *req;        /* by head */
	struct upiece pc[URING_CQ];
	uint32_t free[URING_CQ];
	unsigned nfree;
	unsigned inflight;       /* requests with pieces in flight */
};

static void uring_state_free(struct uring_state *us)
{
	if (!us)
		return;
	vp_uring_exit(&us->u);
	free(us->req);
	free(us);
}

/* A ring for queue q, or NULL (with *err) where io_uring cannot serve. */
static struct uring_state *uring_state_new(struct vp_server *srv,
					   struct vp_devq *q, int *err)
{
	const int *fds;
	int fd;
	uint64_t foff, room;
	if (!vp_store_files(srv->st, &fds) ||
	    vp_store_locate(srv->st, 0, &fd, &foff, &room) ||
	    !vp_notifier_can_wait_or(vp_devq_kick(q))) {
		*err = -EOPNOTSUPP;
		return NULL;
	}
	struct uring_state *us = calloc(1, sizeof(*us));
	if (!us || !(us->req = calloc(vp_devq_num(q), sizeof(*us->req)))) {
		free(us);
		*err = -ENOMEM;
		return NULL;
	}
	*err = vp_uring_init(&us->u, URING_SQ, URING_CQ);
	if (*err) {
		free(us->req);
		free(us);
		return NULL;
	}
	us->nfree = us->u.cq_entries < URING_CQ ? us->u.cq_entries : URING_CQ;
	for (unsigned i = 0; i < us->nfree; i++)
		us->free[i] = us->nfree - 1 - i;
	return us;
}

static void uring_finish(struct srv_queue *sq, unsigned head,
			 const struct vp_blk_rw *rw, int err)
{
	int64_t used = vp_blk_rw_end(sq->q, rw, err);
	vp_devq_push(sq->q, head, used < 0 ? 0 : (uint32_t)used);
}

/* Queue piece pc (op as vp_uring_prep's, on fd at foff) on a free tag. */
static void uring_queue(struct uring_state *us, struct upiece pc, int op,
			int fd, uint64_t foff)
{
	uint32_t i = us->free[--us->nfree];
	us->pc[i] = pc;
	while (vp_uring_prep(&us->u, op, fd, pc.buf, pc.len, foff, i) == -EBUSY)
		vp_uring_submit(&us->u);
}

struct uring_walk {
	struct vp_store *st;
	struct uring_state *us;
	const struct vp_blk_rw *rw;
	uint16_t head;
	unsigned n;              /* pieces counted, or queued */
	int queue;               /* 0: count only */
};

/* One guest piece, cut where the store's chunks end. */
static int uring_piece(uint8_t *p, uint32_t n, uint64_t pos, void *arg)
{
	struct uring_walk *w = arg;
	while (n) {
		int fd;
		uint64_t foff, room, off = w->rw->off + pos;
		if (vp_store_locate(w->st, off, &fd, &foff, &room))
			return -EIO;
		uint32_t m = room < n ? (uint32_t)room : n;
		if (w->queue) {
			uring_queue(w->us, (struct upiece){ p, off, m, w->head },
				    w->rw->write, fd, foff);
		} else if (w->n >= URING_MAX_PIECES) {
			return 1;
		}
		w->n++;
		p += m;
		pos += m;
		n -= m;
	}
	return 0;
}

/* Start one popped request: queued on the ring, or done now.  Returns 1
 * if it was pushed already. */
static int uring_start(struct srv_queue *sq, struct uring_state *us,
		       const struct vp_chain *c, const struct vp_seg *segs)
{
	struct vp_store *st = sq->srv->st;
	struct ureq *r = &us->req[c->head];
	if (!vp_blk_rw_begin(st, sq->q, c, segs, &r->rw)) {
		complete(sq, c, segs, 0);
		return 1;
	}
	if (r->rw.flush) {
		/* fdatasync of every stripe file, all at once. */
		const int *fds;
		unsigned nf = vp_store_files(st, &fds);
		r->pending = nf;
		r->err = 0;
		for (unsigned i = 0; i < nf; i++)
			uring_queue(us, (struct upiece){ NULL, 0, 0, (uint16_t)c->head },
				    2, fds[i], 0);
		us->inflight++;
		return 0;
	}
	struct uring_walk w = { st, us, &r->rw, (uint16_t)c->head, 0, 0 };
	int e = r->rw.err;
	if (!e && vp_blk_rw_walk(segs, &r->rw, uring_piece, &w))
		e = 1;   /* too many pieces: inline */
	if (e || !w.n) {
		if (e > 0)
			e = vp_blk_rw_do(st, segs, &r->rw);
		uring_finish(sq, c->head, &r->rw, e);
		return 1;
	}
	r->pending = w.n;
	r->err = 0;
	w.queue = 1;
	w.n = 0;
	vp_blk_rw_walk(segs, &r->rw, uring_piece, &w);
	us->inflight++;
	return 0;
}

/* Every completion posted: how many requests it finished (pushed). */
static int uring_reap(struct srv_queue *sq, struct uring_state *us)
{
	uint64_t d;
	int32_t res;
	int done = 0;
	while (vp_uring_reap(&us->u, &d, &res)) {
		if (d >= URING_CQ)
			continue;   /* not ours */
		struct upiece *p = &us->pc[d];
		struct ureq *r = &us->req[p->head];
		if (r->rw.flush) {
			if (res == -EINTR || res == -EAGAIN)
				res = vp_store_flush(sq->srv->st);
			if (res < 0 && !r->err)
				r->err = res;
		} else if (res < 0 || (uint32_t)res < p->len) {
			/* A short transfer, or one to retry: the rest inline,
			 * as the threads would (zeros past a stripe's end). */
			int e = res;
			if (res >= 0 || res == -EINTR || res == -EAGAIN) {
				uint32_t got = res > 0 ? (uint32_t)res : 0;
				e = vp_store_rw(sq->srv->st, r->rw.write,
						p->off + got, p->buf + got,
						p->len - got);
			}
			if (e && !r->err)
				r->err = e;
		}
		us->free[us->nfree++] = (uint32_t)d;
		if (--r->pending == 0) {
			us->inflight--;
			uring_finish(sq, p->head, &r->rw, r->err);
			done++;
		}
	}
	return done;
}

static void *uring_main(void *arg)
{
	struct srv_thread *t = arg;
	struct srv_queue *sq = t->sq;
	struct vp_devq *q = sq->q;
	struct uring_state *us = t->us;
	uint32_t *cq_tail = vp_uring_cq_tail(&us->u);
	unsigned max_segs = vp_devq_num(q);
	struct vp_chain c;
	int acks = 0;
	for (;;) {
		int stop = READ_ONCE(sq->stop);
		if (stop && !us->inflight)
			break;
		int pushed = uring_reap(sq, us), popped = 0;
		if (!stop) {
			int k = take_kicks(q);
			if (k > 0)
				acks = acks_add(q, acks, guest_kicks(sq, k));
			while (us->nfree >= URING_MAX_PIECES &&
			       !READ_ONCE(sq->stop) && !vp_devq_broken(q) &&
			       vp_devq_pop(q, &c, t->segs, max_segs) == 1) {
				pushed += uring_start(sq, us, &c, t->segs);
				popped++;
			}
		}
		vp_uring_submit(&us->u);
		/* Acked once submitted: a sync exit returns when its
		 * request is taken, not when it is done. */
		if (acks) {
			vp_devq_ack_kicks(q, acks);
			acks = 0;
		}
		if (pushed)
			vp_devq_interrupt(q);
		if (pushed || popped)
			continue;
		/* Idle: kicks on, and a last look before sleeping. */
		if (!stop && us->nfree >= URING_MAX_PIECES &&
		    !vp_devq_broken(q) && vp_devq_enable_notify(q))
			continue;
		uint32_t tail = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);
		if (tail != *us->u.cq_head)
			continue;
		int r = vp_notifier_wait_or(vp_devq_kick(q), cq_tail, tail,
					    vp_devq_kick_timeout(q, 200000000));
		vp_devq_kick_waited(q, r);
		if (r > 0) {
			__atomic_fetch_add(&vp_devq_stats(q)->kicks_taken, 1,
					   __ATOMIC_RELAXED);
			acks = acks_add(q, acks, guest_kicks(sq, 1));
			/* Busy from here: no kicks until we go idle again. */
			vp_devq_disable_notify(q);
		} else if (r < 0) {
			/* A wait that fails (a guest's scribble on the kick)
			 * must not make this loop spin. */
			struct timespec ts = { 0, 1000000 };
			nanosleep(&ts, NULL);
		}
	}
	if (acks)
		vp_devq_ack_kicks(q, acks);
	return NULL;
}

int vp_server_set_engine(struct vp_server *srv, int engine)
{
	if (engine < VP_ENGINE_AUTO || engine > VP_ENGINE_URING)
		return -EINVAL;
	for (unsigned i = 0; i < srv->nq; i++)
		if (srv->sq[i].running)
			return -EBUSY;
	srv->engine = engine;
	return 0;
}

int vp_server_queue_engine(struct vp_server *srv, unsigned qi)
{
	if (qi >= VP_MAX_QUEUES || !srv->sq[qi].running)
		return -EINVAL;
	return srv->sq[qi].engine;
}

struct vp_server *vp_server_new(struct vp_store *st, int mode,
				unsigned io_threads, const char *serial,
				int *err)
{
	if (!st || mode < VP_MODE_NOTIFY || mode > VP_MODE_POLL ||
	    io_threads > VP_MAX_IO_THREADS) {
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
	for (unsigned i = 0; i < VP_MAX_QUEUES; i++)
		srv->sq[i].srv = srv;
	pthread_mutex_init(&srv->mu, NULL);
	pthread_cond_init(&srv->cv, NULL);
	pthread_cond_init(&srv->idle_cv, NULL);
	*err = 0;
	return srv;
}

int vp_server_set_queue(struct vp_server *srv, unsigned qi, struct vp_devq *q)
{
	if (qi >= VP_MAX_QUEUES)
		return -EINVAL;
	struct srv_queue *sq = &srv->sq[qi];
	if (sq->running)
		return -EBUSY;
	/* Notify mode sleeps on the queue's kick and wakes workers with it. */
	if (q && srv->mode == VP_MODE_NOTIFY && !vp_devq_kick(q))
		return -EINVAL;
	sq->q = q;
	sq->self_kicks = 0;
	if (q && qi >= srv->nq)
		srv->nq = qi + 1;
	while (srv->nq && !srv->sq[srv->nq - 1].q)
		srv->nq--;
	return 0;
}

int vp_server_add_queue(struct vp_server *srv, struct vp_devq *q)
{
	if (!q || srv->nq >= VP_MAX_QUEUES)
		return -EINVAL;
	return vp_server_set_queue(srv, srv->nq, q);
}

static unsigned queues_set(const struct vp_server *srv)
{
	unsigned n = 0;
	for (unsigned i = 0; i < srv->nq; i++)
		n += srv->sq[i].q != NULL;
	return n;
}

static void pool_stop(struct vp_server *srv);

/* Poll mode: the pool, io_threads per queue there is, made at the first
 * start and kept until the whole server stops.  No poll loop runs before
 * it exists: the pool pointer never changes under one. */
static int pool_start(struct vp_server *srv)
{
	if (srv->pool || srv->mode != VP_MODE_POLL || !srv->io_threads)
		return 0;
	unsigned nq = queues_set(srv);
	unsigned n = srv->io_threads * (nq ? nq : 1);
	if (n > VP_MAX_IO_THREADS)
		n = VP_MAX_IO_THREADS;
	srv->pool = calloc(n, sizeof(pthread_t));
	if (!srv->pool)
		return -ENOMEM;
	srv->npool = n;
	srv->pool_stop = 0;
	for (; srv->pool_started < srv->npool; srv->pool_started++) {
		int r = pthread_create(&srv->pool[srv->pool_started], NULL,
				       pool_main, srv);
		if (r) {
			pool_stop(srv);
			return -r;
		}
	}
	return 0;
}

/* Every queue stopped first: nothing is at the pool any more. */
static void pool_stop(struct vp_server *srv)
{
	if (!srv->pool)
		return;
	pthread_mutex_lock(&srv->mu);
	srv->pool_stop = 1;
	pthread_cond_broadcast(&srv->cv);
	pthread_mutex_unlock(&srv->mu);
	for (unsigned i = 0; i < srv->pool_started; i++)
		pthread_join(srv->pool[i], NULL);
	srv->pool_started = 0;
	srv->npool = 0;
	free(srv->pool);
	srv->pool = NULL;
}

/* Tell a queue's threads to stop, and wake those asleep on the kick. */
static void queue_stop_begin(struct srv_queue *sq)
{
	WRITE_ONCE(sq->stop, 1);
	if (sq->srv->mode == VP_MODE_NOTIFY)
		for (unsigned i = 0; i < sq->started; i++)
			wake_thread(sq);
}

/* Join them, let the pool finish the queue's requests, and leave no kick
 * behind: our own wake-ups are taken back, and a guest's sync exit that
 * kicked meanwhile returns (its request is served at the next start). */
static void queue_stop_end(struct srv_queue *sq)
{
	struct vp_server *srv = sq->srv;
	for (unsigned i = 0; i < sq->started; i++)
		pthread_join(sq->thr[i].tid, NULL);
	for (unsigned i = 0; i < sq->nthr; i++) {
		free(sq->thr[i].segs);
		uring_state_free(sq->thr[i].us);
	}
	free(sq->thr);
	sq->thr = NULL;
	sq->nthr = sq->started = 0;
	pthread_mutex_lock(&srv->mu);
	while (sq->busy)
		pthread_cond_wait(&srv->idle_cv, &srv->mu);
	pthread_mutex_unlock(&srv->mu);
	int k = take_kicks(sq->q);
	if (k > 0)
		vp_devq_ack_kicks(sq->q, guest_kicks(sq, k));
	sq->self_kicks = 0;
	vp_devq_interrupt(sq->q);
	sq->running = 0;
}

int vp_server_start_queue(struct vp_server *srv, unsigned qi)
{
	if (qi >= VP_MAX_QUEUES || !srv->sq[qi].q)
		return -EINVAL;
	struct srv_queue *sq = &srv->sq[qi];
	struct vp_devq *q = sq->q;
	if (sq->running)
		return -EBUSY;
	if (srv->mode == VP_MODE_NOTIFY && !vp_devq_kick(q))
		return -EINVAL;
	int r = pool_start(srv);
	if (r)
		return r;
	int workers = srv->mode == VP_MODE_NOTIFY && srv->io_threads;
	unsigned n = workers ? srv->io_threads : 1;
	/* The io_uring engine where it can serve: one thread, one ring. */
	struct uring_state *us = NULL;
	sq->engine = workers || srv->pool ? VP_ENGINE_THREADS : VP_ENGINE_INLINE;
	if (workers && srv->engine != VP_ENGINE_THREADS) {
		int e;
		us = uring_state_new(srv, q, &e);
		if (!us && srv->engine == VP_ENGINE_URING)
			return e;
		if (us) {
			n = 1;
			sq->engine = VP_ENGINE_URING;
		}
	}
	sq->thr = calloc(n, sizeof(*sq->thr));
	if (!sq->thr) {
		uring_state_free(us);
		return -ENOMEM;
	}
	sq->thr[0].us = us;
	sq->nthr = n;
	sq->started = 0;
	sq->running = 1;
	WRITE_ONCE(sq->stop, 0);
	for (unsigned i = 0; i < n; i++) {
		sq->thr[i].sq = sq;
		sq->thr[i].segs = calloc(vp_devq_num(q), sizeof(struct vp_seg));
		if (!sq->thr[i].segs) {
			r = -ENOMEM;
			break;
		}
	}
	for (unsigned i = 0; !r && i < n; i++) {
		r = -pthread_create(&sq->thr[i].tid, NULL,
				    us ? uring_main : workers ? worker_main : serve_main,
				    &sq->thr[i]);
		if (!r)
			sq->started++;
	}
	if (r) {
		queue_stop_begin(sq);
		queue_stop_end(sq);
	}
	return r;
}

int vp_server_stop_queue(struct vp_server *srv, unsigned qi)
{
	if (qi >= VP_MAX_QUEUES)
		return -EINVAL;
	struct srv_queue *sq = &srv->sq[qi];
	if (sq->running) {
		queue_stop_begin(sq);
		queue_stop_end(sq);
	}
	return 0;
}

int vp_server_start(struct vp_server *srv)
{
	if (!queues_set(srv))
		return -EINVAL;
	for (unsigned i = 0; i < srv->nq; i++)
		if (srv->sq[i].running)
			return -EINVAL;
	for (unsigned i = 0; i < srv->nq; i++) {
		if (!srv->sq[i].q)
			continue;
		int r = vp_server_start_queue(srv, i);
		if (r) {
			vp_server_stop(srv);
			return r;
		}
	}
	return 0;
}

void vp_server_stop(struct vp_server *srv)
{
	/* Every queue's threads are told first, so they stop together. */
	for (unsigned i = 0; i < srv->nq; i++)
		if (srv->sq[i].running)
			queue_stop_begin(&srv->sq[i]);
	for (unsigned i = 0; i < srv->nq; i++)
		if (srv->sq[i].running)
			queue_stop_end(&srv->sq[i]);
	pool_stop(srv);
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
