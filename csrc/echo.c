/* An echo device and a batch driver, both in C, for the tests that move
 * 100,000 requests and for the round-trip benchmarks. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <string.h>
#include "vp.h"
#include "compiler.h"

#define ECHO_MAX_SEGS 64

static int echo_one(struct vp_devq *q, uint32_t *seq)
{
	struct vp_chain c;
	struct vp_seg segs[ECHO_MAX_SEGS];
	int r = vp_devq_pop(q, &c, segs, ECHO_MAX_SEGS);
	if (r <= 0)
		return r;
	for (unsigned i = 0; i < c.nseg; i++) {
		if (segs[i].write && segs[i].len >= 4) {
			memcpy(segs[i].host, seq, 4);
			break;
		}
	}
	(*seq)++;
	r = vp_devq_push(q, c.head, c.in_len);
	return r < 0 ? r : 1;
}

int64_t vp_echo_serve(struct vp_devq *q, int64_t n, int poll,
		      volatile int32_t *stop)
{
	int64_t done = 0;
	uint32_t seq = 0;
	unsigned idle = 0;
	int kicks = 0;
	/* A polling device wants no kicks: it looks at the ring anyway. */
	if (poll)
		vp_devq_disable_notify(q);
	else
		vp_devq_enable_notify(q);
	while (n < 0 || done < n) {
		if (stop && *stop)
			break;
		int r = echo_one(q, &seq);
		if (r < 0)
			return r;
		if (r > 0) {
			done++;
			idle = 0;
			continue;
		}
		/* Ring empty: signal what we completed, then wait for more. */
		vp_devq_interrupt(q);
		/* Kicks reach a polling device too (event index, or sent before
		 * it turned them off), and a sync exit waits for the ack. */
		if (poll && (r = vp_devq_wait_kick(q, 0)) > 0)
			kicks += r;
		vp_devq_ack_kicks(q, kicks);
		kicks = 0;
		if (poll) {
			if (++idle > 1024)
				sched_yield();
			else
				cpu_relax();
			continue;
		}
		if (vp_devq_enable_notify(q))
			goto drain;
		r = vp_devq_wait_kick(q, 100000000);
		if (r < 0)
			return r;
		kicks = r;
	drain:
		vp_devq_disable_notify(q);
	}
	vp_devq_interrupt(q);
	/* Leave no sync exit waiting for a kick that came as we finished. */
	int r = vp_devq_wait_kick(q, 0);
	vp_devq_ack_kicks(q, kicks + (r > 0 ? r : 0));
	return done;
}

int64_t vp_echo_drive(struct vp_vq *vq, int64_t n, unsigned batch,
		      int strategy, uint64_t buf_gpa, uint32_t buf_len)
{
	uint64_t addr[2] = { buf_gpa, buf_gpa };
	uint32_t len[2] = { buf_len, buf_len };
	struct vp_lock *lock = vp_vq_lock(vq);
	uint64_t next_token = 1, expect = 1;
	int64_t done = 0;
	if (batch == 0 || batch > vp_vq_size(vq) / 2)
		batch = vp_vq_size(vq) / 2 ? vp_vq_size(vq) / 2 : 1;
	vp_lock_acquire(lock);
	virtqueue_disable_cb(vq);
	vp_lock_release(lock);
	while (done < n) {
		unsigned k = 0;
		int r = 0;
		vp_lock_acquire(lock);
		while (k < batch && (int64_t)(next_token - 1) < n &&
		       (r = virtqueue_add(vq, addr, len, 1, 1, next_token)) == 0) {
			next_token++;
			k++;
		}
		if (r && r != -ENOSPC) {
			vp_lock_release(lock);
			return r;
		}
		if (k) {
			if (strategy == VP_KICK_PREPARE) {
				int need = virtqueue_kick_prepare(vq);
				vp_lock_release(lock);
				r = need ? virtqueue_notify(vq) : 0;
				vp_lock_acquire(lock);
			} else {
				r = virtqueue_kick(vq, strategy == VP_KICK_RELEASE
						   ? lock : NULL);
			}
			if (r < 0) {
				vp_lock_release(lock);
				return r;
			}
		}
		vp_lock_release(lock);
		/* Reap everything in flight by polling the used ring, taking
		 * every used buffer that is there per lock acquisition. */
		while (done < (int64_t)(next_token - 1)) {
			uint64_t tok;
			uint32_t l;
			int64_t got = 0;
			vp_lock_acquire(lock);
			while ((r = virtqueue_get_buf(vq, &tok, &l)) == 1) {
				if (tok != expect || l != buf_len) {
					r = -EPROTO;
					break;
				}
				expect++;
				got++;
			}
			vp_lock_release(lock);
			done += got;
			if (r < 0)
				return r;
			if (!got)
				cpu_relax();
		}
	}
	return done;
}
