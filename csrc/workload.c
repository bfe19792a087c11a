/* Guest workload loops in C: a dd/fio-like job on one guest slot.
 *
 * vp_guest_run keeps iodepth requests in flight on a vp_guest (submit
 * through the kick strategy, sleep in vp_guest_wait_any), records the
 * latency of every request into the caller's array and, with verify, stamps
 * every 512-byte sector it writes and checks every sector it reads.
 *
 * The stamp of a sector (eight 64-bit words, then the pattern):
 *   w[0] VP_VERIFY_MAGIC   w[1] sector (LBA)   w[2] seed
 *   w[3] checksum of w[1], w[2] and w[4..63]
 *   w[4..63] splitmix64(seed, sector, i)
 * so a reader needs nothing but the sector to tell a good sector from a
 * corrupted, misplaced, stale (other seed) or never written one. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include "guest.h"
#include "compiler.h"

#define SECTOR 512u
#define WORDS (SECTOR / 8)

static inline uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t sector_sum(const uint64_t *w)
{
	uint64_t h = 0x84222325cbf29ce4ULL ^ w[1] ^ (w[2] << 1);
	for (unsigned i = 4; i < WORDS; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL + (h >> 29);
	return splitmix64(h);
}

void vp_verify_fill(uint8_t *buf, uint64_t sector, uint32_t nbytes,
		    uint64_t seed)
{
	for (uint32_t off = 0; off + SECTOR <= nbytes; off += SECTOR, sector++) {
		uint64_t w[WORDS];
		uint64_t base = seed ^ (sector * 0xd1342543de82ef95ULL);
		w[0] = VP_VERIFY_MAGIC;
		w[1] = sector;
		w[2] = seed;
		for (unsigned i = 4; i < WORDS; i++)
			w[i] = splitmix64(base + i);
		w[3] = sector_sum(w);
		memcpy(buf + off, w, SECTOR);
	}
}

static int all_zero(const uint64_t *w)
{
	for (unsigned i = 0; i < WORDS; i++)
		if (w[i])
			return 0;
	return 1;
}

/* Check nbytes of sectors starting at sector: 0 when every sector is good,
 * else the VP_VERIFY_* kind of the first bad one (its LBA in *bad). */
int vp_verify_check(const uint8_t *buf, uint64_t sector, uint32_t nbytes,
		    uint64_t seed, uint64_t *bad)
{
	for (uint32_t off = 0; off + SECTOR <= nbytes; off += SECTOR, sector++) {
		uint64_t w[WORDS];
		memcpy(w, buf + off, SECTOR);
		int kind = 0;
		if (w[0] != VP_VERIFY_MAGIC)
			kind = all_zero(w) ? VP_VERIFY_UNWRITTEN : VP_VERIFY_CORRUPT;
		else if (w[1] != sector)
			kind = VP_VERIFY_MISPLACED;
		else if (w[2] != seed)
			kind = VP_VERIFY_STALE;
		else if (w[3] != sector_sum(w))
			kind = VP_VERIFY_CORRUPT;
		if (kind) {
			if (bad)
				*bad = sector;
			return kind;
		}
	}
	return 0;
}

static inline uint64_t rng_next(uint64_t *s)
{
	/* xorshift64* */
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static void record_latency(struct vp_run_result *res, uint32_t *lat,
			   uint64_t cap, uint64_t *rng, uint64_t ns)
{
	if (ns > res->lat_max_ns)
		res->lat_max_ns = ns;
	res->lat_total_ns += ns;
	uint32_t v = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
	uint64_t n = res->ios;   /* completions before this one */
	if (!lat || !cap)
		return;
	if (n < cap) {
		lat[n] = v;
		res->lat_recorded = n + 1;
	} else {
		/* Reservoir sampling: every latency is kept with equal odds. */
		uint64_t j = rng_next(rng) % (n + 1);
		if (j < cap)
			lat[j] = v;
	}
}

static int is_write_rw(uint32_t rw, uint64_t *rng, uint32_t mix)
{
	switch (rw) {
	case VP_RW_WRITE:
	case VP_RW_RANDWRITE:
		return 1;
	case VP_RW_RANDRW:
		return rng_next(rng) % 100 >= mix;
	default:
		return 0;
	}
}

int vp_guest_run(struct vp_guest *g, int strategy,
		 const struct vp_run_params *p, struct vp_run_result *res,
		 uint32_t *lat, uint64_t lat_cap)
{
	unsigned depth = p->iodepth;
	memset(res, 0, sizeof(*res));
	if (depth < 1 || depth > VP_MAX_TAGS || p->bs == 0 || p->bs % SECTOR ||
	    p->bs > vp_guest_max_data(g) || p->area_len < p->bs ||
	    p->area_off % SECTOR || p->rw > VP_RW_RANDRW || p->rwmix_read > 100)
		return -EINVAL;
	int random = p->rw == VP_RW_RANDREAD || p->rw == VP_RW_RANDWRITE ||
		     p->rw == VP_RW_RANDRW;
	uint64_t nblocks = p->area_len / p->bs;
	uint64_t rng = p->seed ? p->seed : 0x9e3779b97f4a7c15ULL;
	uint64_t lrng = splitmix64(rng);
	uint64_t t_sub[VP_MAX_TAGS], sec[VP_MAX_TAGS];
	uint8_t wr[VP_MAX_TAGS];
	uint64_t busy = 0, pos = 0, issued = 0;
	uint64_t all = depth == 64 ? ~0ULL : (1ULL << depth) - 1;
	int stopping = 0;
	uint64_t full_since = 0;   /* ring full with none of ours in flight */
	uint8_t status;
	uint32_t len;
	/* The clock is read once per submission and once per wait; the
	 * deadline is checked against the last reading. */
	uint64_t now = vp_now_ns();

	res->t_start_ns = now;
	for (;;) {
		/* Fill the queue up to iodepth. */
		while (!stopping && busy != all) {
			if ((p->max_ios && issued >= p->max_ios) ||
			    (p->stop && READ_ONCE(*p->stop)) ||
			    (p->deadline_ns && now >= p->deadline_ns)) {
				stopping = 1;
				break;
			}
			unsigned tag = (unsigned)__builtin_ctzll(~busy & all);
			uint64_t blk;
			if (random) {
				/* Never two requests on one block at once: a read
				 * racing a write would see a torn block. */
				for (unsigned tries = 0;; tries++) {
					blk = rng_next(&rng) % nblocks;
					uint64_t s = (p->area_off + blk * p->bs) / SECTOR;
					int clash = 0;
					for (uint64_t m = busy; m && tries < 64; m &= m - 1)
						if (sec[__builtin_ctzll(m)] == s)
							clash = 1;
					if (!clash)
						break;
				}
			} else {
				blk = pos++ % nblocks;
			}
			uint64_t s = (p->area_off + blk * p->bs) / SECTOR;
			int w = is_write_rw(p->rw, &rng, p->rwmix_read);
			if (w && p->verify)
				vp_verify_fill(vp_guest_data_ptr(g, tag), s, p->bs,
					       p->verify_seed);
			sec[tag] = s;
			wr[tag] = (uint8_t)w;
			t_sub[tag] = now = vp_now_ns();
			int r = vp_guest_blk_submit(g, tag, w ? VIRTIO_BLK_T_OUT
							      : VIRTIO_BLK_T_IN,
						    s, p->bs, strategy);
			if (r == -ENOSPC) {
				/* Ring full (other workers' requests): as blk-mq
				 * requeues on BLK_STS_RESOURCE, retry the same
				 * block once something completed. */
				res->queue_full++;
				if (!random)
					pos--;
				if (!busy) {
					/* Nothing of ours to wait for: wait for
					 * room, as long as we would wait for one
					 * of our own. */
					int64_t left = p->timeout_ns;
					if (!full_since)
						full_since = now;
					else if (left >= 0)
						left -= (int64_t)(now - full_since);
					r = left < 0 && p->timeout_ns >= 0 ? -ETIMEDOUT
						: vp_guest_wait_room(g, 3, left);
					now = vp_now_ns();
					if (r) {
						res->rc = r;
						stopping = 1;
					}
				}
				break;
			}
			full_since = 0;
			if (r) {
				res->rc = r;
				stopping = 1;
				break;
			}
			busy |= 1ULL << tag;
			issued++;
		}
		if (!busy) {
			if (stopping)
				break;
			continue;      /* the ring was full: try again */
		}
		int tag = vp_guest_wait_any_t(g, busy, p->timeout_ns, &status,
					      &len, &now);
		if (tag < 0) {
			res->rc = tag;
			break;
		}
		if (!(busy >> tag & 1)) {
			/* A completion for a tag not in flight: delivered twice. */
			res->dup_completions++;
			continue;
		}
		busy &= ~(1ULL << tag);
		record_latency(res, lat, lat_cap, &lrng, now - t_sub[tag]);
		res->ios++;
		if (status != VIRTIO_BLK_S_OK) {
			res->errors++;
			if (!res->first_error_status)
				res->first_error_status = status;
			continue;
		}
		if (wr[tag]) {
			res->writes++;
			res->bytes_written += p->bs;
			continue;
		}
		res->reads++;
		res->bytes_read += p->bs;
		if (len != p->bs + 1)
			res->short_reads++;
		if (p->verify) {
			uint64_t bad = 0;
			int k = vp_verify_check(vp_guest_data_ptr(g, tag), sec[tag],
						p->bs, p->verify_seed, &bad);
			/* Mixed jobs read blocks they may not have written yet. */
			if (k == VP_VERIFY_UNWRITTEN && p->rw == VP_RW_RANDRW) {
				res->verify_unwritten++;
			} else if (k) {
				res->verify_failures++;
				if (res->verify_failures == 1) {
					res->first_bad_sector = bad;
					res->first_bad_kind = k;
				}
			} else {
				res->verified++;
			}
		}
	}
	res->t_end_ns = now;
	res->issued = issued;
	return res->rc;
}
