/* Coverage-guided fuzzer of the device side: one virtqueue served as the
 * daemon serves it (vp_devq_pop, vp_blk_handle, vp_devq_push,
 * vp_devq_interrupt), against a guest that lays out requests and scribbles
 * on the rings and on guest memory between the device's steps.
 *
 * The input is a configuration (4 bytes) then a script of operations, one
 * opcode byte and its arguments each: guest operations (lay out a request,
 * overwrite a descriptor field, the avail ring, any guest byte, kick) and
 * device operations (pop, complete one popped request, drain as the
 * daemon's serve loop does, push any head, interrupt, notify suppression,
 * set_base, set_mem, ack sync exits).  Every loop is bounded by the
 * input's length or the queue size.
 *
 * A racing pop lands guest writes between the device's own reads inside
 * one vp_devq_pop: build.sh compiles the core with a compiler.h that wraps
 * the core's and routes every READ_ONCE through fuzz_guest_read() below,
 * which counts the reads of guest memory and applies the write scheduled
 * for the k-th.  No model can say what such a pop returns, so the target
 * checks that whatever it returns obeys every rule by itself (a value
 * checked and then read again would not).
 *
 * Guest memory is either the native transport's region (vp_region_init
 * over a memfd, mapped by vp_map between guard pages; two queues, one
 * served) or a vhost-user style table of up to four heap regions at
 * arbitrary guest physical addresses, rings in their own exactly-sized heap
 * blocks or inside the first region.  ASan and the guard pages catch any
 * access outside guest memory.  Beside the real memory the target keeps a
 * shadow copy and a reference model of the device: each device step is
 * replayed on the shadow from the rules the device is meant to follow, and
 * the two must agree (result, chain, indices, every byte of guest memory
 * and of the store).  Any disagreement aborts with a message.
 *
 * Built two ways by build.sh: with libFuzzer (make fuzz), or with a main()
 * that runs files through LLVMFuzzerTestOneInput (make test replays the
 * corpus and the regressions). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include "vp.h"
#include "mem.h"
#include "ring.h"
#include "store.h"
#include "blkdev.h"

#define MAX_NUM      128          /* largest queue size fuzzed */
#define MAX_RAM      4            /* guest RAM ranges (multi-region mode) */
#define MAX_AREAS    (MAX_RAM + 3)
#define NATIVE_QUEUES 2
#define NATIVE_DATA  (2 * 4096)   /* one page of data per queue */
#define MAX_CAP_SECT 31
#define NSTRIPES_MAX 4

/* ---------------------------------------------------------------- checks */

static unsigned cur_op;   /* index of the operation being run, for messages */

__attribute__((noreturn, format(printf, 1, 2)))
static void fail(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fuzz_devq: invariant broken at op %u: ", cur_op);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

#define CHECK(cond, ...) do { if (!(cond)) fail(__VA_ARGS__); } while (0)

/* ----------------------------------------------------------- input reader */

struct rd {
	const uint8_t *p;
	size_t n, i;
};

static uint8_t u8(struct rd *r)
{
	return r->i < r->n ? r->p[r->i++] : 0;
}

static uint64_t uN(struct rd *r, unsigned bytes)
{
	uint64_t v = 0;
	for (unsigned k = 0; k < bytes; k++)
		v |= (uint64_t)u8(r) << (8 * k);
	return v;
}

/* ------------------------------------------------ memory: real and shadow */

/* A stretch of guest memory as the device's process maps it, with the
 * shadow the model keeps of it. */
struct area {
	uint8_t *real, *shadow;
	uint64_t size;
};

/* A range of guest RAM: what the guest believes lies at gpa. */
struct ram {
	uint64_t gpa, size;
	uint64_t lo;              /* the guest lays requests out from here */
	uint8_t *host;
	int in_table;             /* vp_mem_add_region took it */
};

struct model {
	unsigned num;
	int event_idx;
	uint16_t last_avail, used_idx, used_flags, signalled_used;
	int signalled_valid, used_any;
	int broken;               /* the device's code once broken (> 0) */
	unsigned inflight;
	uint8_t map[MAX_NUM];     /* heads popped and not pushed */
	struct vp_mem mem;        /* the table the device was given */
	/* notification data (native): VP_ND_*, the notification index, and
	 * the doorbell word as last read */
	int nd;
	uint16_t nd_idx;
	uint32_t nd_word;
};

/* A popped chain, kept until the target completes it. */
struct popped {
	struct vp_chain c;
	struct vp_seg *segs;      /* nseg entries, allocated at pop */
};

struct fz {
	/* layout */
	int native;
	unsigned num, qindex, max_segs;
	struct vring vr;          /* the device's ring pointers (real memory) */
	struct area areas[MAX_AREAS];
	unsigned nareas;
	struct ram ram[MAX_RAM];
	unsigned nram;
	uint32_t *hdr_status;     /* native: the header's status word */
	uint8_t *care_lo, *care_hi;   /* bytes the model does not predict (stats) */
	uint8_t *care2_lo, *care2_hi; /* and the notification-data counters */
	uint32_t *bell;           /* native: the queue's doorbell */
	/* device */
	struct vp_devq *q;
	struct vp_seg *segs;      /* exactly max_segs entries: ASan sees overruns */
	struct model m;
	struct popped *pop;       /* popped, not completed, in pop order */
	unsigned npop;
	int first_broken;
	/* store */
	struct vp_store *st;
	uint8_t *store_buf;       /* memory store */
	uint8_t sstore[MAX_CAP_SECT * 512 + 1];   /* its shadow */
	uint64_t cap;
	int striped;
	const char *serial;
	/* notifiers */
	struct vp_notifier *kick, *call, *ack;
	uint64_t kicks_pending;
	int kicks_taken;          /* by the last wait_kick: what the daemon acks */
	/* guest */
	uint16_t g_avail, g_last_used;
	unsigned g_next_desc;
	uint64_t g_cursor[MAX_RAM];
	uint8_t g_busy[MAX_NUM];           /* descriptor in an outstanding chain */
	uint8_t g_chain[MAX_NUM][MAX_NUM]; /* head -> its descriptors (1 = used) */
	uint8_t g_outstanding[MAX_NUM];
	uint8_t pattern;
	int dirty;
	/* FUZZ_DEVQ_VERBOSE: what an input did, to check a seed's intent */
	unsigned n_pops, n_done[4], n_irq, n_frame, n_raced;                /* a device step ran since memory was compared */
};

static struct area *area_of(struct fz *f, const void *p, uint64_t len)
{
	const uint8_t *b = p;
	for (unsigned i = 0; i < f->nareas; i++) {
		struct area *a = &f->areas[i];
		if (b >= a->real && (uint64_t)(b - a->real) <= a->size &&
		    len <= a->size - (uint64_t)(b - a->real))
			return a;
	}
	return NULL;
}

/* The shadow of len bytes at host address p (which must be guest memory). */
static uint8_t *sh(struct fz *f, const void *p, uint64_t len)
{
	struct area *a = area_of(f, p, len);
	CHECK(a, "host address %p+%llu outside guest memory", p,
	      (unsigned long long)len);
	return a->shadow + ((const uint8_t *)p - a->real);
}

/* The guest stores: real memory and the shadow alike. */
static void guest_store(struct fz *f, void *p, const void *v, size_t n)
{
	memcpy(p, v, n);
	memcpy(sh(f, p, n), v, n);
}

static void guest_u16(struct fz *f, void *p, uint16_t v)
{
	guest_store(f, p, &v, 2);
}

/* Compare every byte of guest memory with the model's shadow: the device
 * wrote exactly what the rules say, nowhere else.  The stats block is the
 * device's to write as it likes. */
static void compare_memory(struct fz *f)
{
	for (unsigned i = 0; i < f->nareas; i++) {
		struct area *a = &f->areas[i];
		if (f->care_lo && f->care_lo >= a->real &&
		    f->care_hi <= a->real + a->size) {
			uint64_t o = (uint64_t)(f->care_lo - a->real);
			memcpy(a->shadow + o, f->care_lo,
			       (size_t)(f->care_hi - f->care_lo));
		}
		if (f->care2_lo && f->care2_lo >= a->real &&
		    f->care2_hi <= a->real + a->size) {
			uint64_t o = (uint64_t)(f->care2_lo - a->real);
			memcpy(a->shadow + o, f->care2_lo,
			       (size_t)(f->care2_hi - f->care2_lo));
		}
		if (memcmp(a->real, a->shadow, a->size)) {
			uint64_t k = 0;
			while (a->real[k] == a->shadow[k])
				k++;
			fail("guest memory area %u differs from the model at "
			     "offset %llu: 0x%02x, expected 0x%02x", i,
			     (unsigned long long)k, a->real[k], a->shadow[k]);
		}
	}
	if (!f->striped) {
		CHECK(!memcmp(f->store_buf, f->sstore, f->cap),
		      "store differs from the model");
	}
	f->dirty = 0;
}

/* Before the guest writes again, and at the end. */
static void settle(struct fz *f)
{
	if (f->dirty)
		compare_memory(f);
}

/* ---------------------------------------------------------- model: state */

static void model_break(struct fz *f)
{
	if (!f->m.broken) {
		f->m.broken = 1;
		if (f->hdr_status) {
			uint32_t *s = (uint32_t *)sh(f, f->hdr_status, 4);
			*s |= VP_STATUS_NEEDS_RESET;
		}
	}
}

/* The device's own view of the queue agrees with the model's. */
static void check_state(struct fz *f)
{
	uint16_t la, ui;
	vp_devq_get_base(f->q, &la, &ui);
	CHECK(la == f->m.last_avail, "last_avail_idx %u, model %u", la,
	      f->m.last_avail);
	CHECK(ui == f->m.used_idx, "used_idx %u, model %u", ui, f->m.used_idx);
	CHECK(vp_devq_inflight(f->q) == f->m.inflight,
	      "in flight %u, model %u", vp_devq_inflight(f->q), f->m.inflight);
	int b = vp_devq_broken(f->q);
	CHECK(!!b == !!f->m.broken, "broken %d, model %d", b, f->m.broken);
	if (b) {
		CHECK(b > VP_EBASE && b <= VP_ELAST, "broken code %d", b);
		if (!f->first_broken)
			f->first_broken = b;
		CHECK(b == f->first_broken, "broken code changed %d -> %d",
		      f->first_broken, b);
	}
}

/* ------------------------------------------------------- model: pop rules */

/* The model's GPA lookup: the region that holds [addr, addr + len) wholly. */
static uint8_t *model_translate(const struct model *m, uint64_t addr,
				uint32_t len)
{
	for (unsigned i = 0; i < m->mem.nregions; i++) {
		const struct vp_mem_region *r = &m->mem.r[i];
		if (addr >= r->guest_phys_addr &&
		    addr - r->guest_phys_addr < r->size &&
		    len <= r->size - (addr - r->guest_phys_addr))
			return r->host + (addr - r->guest_phys_addr);
	}
	return NULL;
}

/* What a pop must return, read from the shadow: 0 nothing, 1 a chain (in
 * c, segs), -1 a rule broken. */
/* Notification data: how far a trusting device may pop. */
static uint16_t model_nd_limit(const struct model *m)
{
	return (int16_t)(m->nd_idx - m->last_avail) < 0 ? m->last_avail
							: m->nd_idx;
}

/* The device reads its doorbell: a new word behind the notification index
 * (both as int16 distances from last_avail; an index more than num ahead
 * counts as older than any word) is ignored, one more than num ahead of
 * last_avail breaks the queue, a reread device takes a word it already
 * read past as is, any other becomes the index. */
static void model_nd_read(struct fz *f)
{
	struct model *m = &f->m;
	uint32_t w;
	memcpy(&w, sh(f, f->bell, 4), 4);
	if (w == m->nd_word)
		return;
	m->nd_word = w;
	if (VP_ND_VQN(w) != f->qindex)
		return;
	uint16_t v = VP_ND_IDX(w);
	int rv = (int16_t)(v - m->last_avail);
	int rn = (int16_t)(m->nd_idx - m->last_avail);
	if (rn > (int)m->num)
		rn = INT16_MIN - 1;
	if (rv < rn)
		return;
	if (m->nd == VP_ND_REREAD && rv <= 0) {
		m->nd_idx = v;
		return;
	}
	if ((uint16_t)(v - m->last_avail) > m->num) {
		model_break(f);
		return;
	}
	m->nd_idx = v;
}

static int model_pop(struct fz *f, struct vp_chain *c, struct vp_seg *segs)
{
	struct model *m = &f->m;
	struct vring *vr = &f->vr;
	unsigned num = m->num;
	uint16_t aidx;
	memcpy(&aidx, sh(f, &vr->avail->idx, 2), 2);
	if (m->nd == VP_ND_TRUST)
		aidx = model_nd_limit(m);
	uint16_t pending = (uint16_t)(aidx - m->last_avail);
	if (pending > num)
		return -1;
	if (!pending)
		return 0;
	uint16_t head;
	memcpy(&head, sh(f, &vr->avail->ring[m->last_avail & (num - 1)], 2), 2);
	if (head >= num || m->map[head] || m->inflight >= num)
		return -1;
	unsigned i = head, n = 0;
	int seen_write = 0;
	uint64_t out_len = 0, in_len = 0;
	memset(c, 0, sizeof(*c));
	c->head = head;
	for (;;) {
		if (n >= num || n >= f->max_segs)
			return -1;
		struct vring_desc d;
		memcpy(&d, sh(f, &vr->desc[i], sizeof(d)), sizeof(d));
		if ((d.flags & VRING_DESC_F_INDIRECT) || !d.len)
			return -1;
		uint8_t *host = model_translate(m, d.addr, d.len);
		if (!host)
			return -1;
		int w = !!(d.flags & VRING_DESC_F_WRITE);
		if (!w && seen_write)
			return -1;
		seen_write |= w;
		segs[n] = (struct vp_seg){ d.addr, d.len, (uint32_t)w, host };
		if (w) {
			c->n_in++;
			in_len += d.len;
		} else {
			c->n_out++;
			out_len += d.len;
		}
		n++;
		if (!(d.flags & VRING_DESC_F_NEXT))
			break;
		if (d.next >= num)
			return -1;
		i = d.next;
	}
	c->nseg = (uint16_t)n;
	c->out_len = out_len > UINT32_MAX ? UINT32_MAX : (uint32_t)out_len;
	c->in_len = in_len > UINT32_MAX ? UINT32_MAX : (uint32_t)in_len;
	return 1;
}

/* One vp_devq_pop, checked against the model.  1: the chain is in
 * f->pop[f->npop - 1]. */
static int do_pop(struct fz *f)
{
	struct vp_chain want_c, got_c;
	static struct vp_seg want_s[MAX_NUM];
	int want = f->m.broken ? -2 : model_pop(f, &want_c, want_s);
	memset(&got_c, 0xa5, sizeof(got_c));
	int r = vp_devq_pop(f->q, &got_c, f->segs, f->max_segs);
	f->dirty = 1;
	if (want == -2) {
		CHECK(r == -VP_EBROKEN, "pop on a broken queue returned %d", r);
	} else if (want == -1) {
		CHECK(r < 0 && -r > VP_EBASE && -r <= VP_ELAST,
		      "pop returned %d where a rule is broken", r);
		CHECK(vp_devq_broken(f->q) == -r,
		      "pop failed with %d but the queue says %d", r,
		      vp_devq_broken(f->q));
		model_break(f);
	} else if (want == 0) {
		CHECK(r == 0, "pop returned %d with nothing available", r);
	} else {
		CHECK(r == 1, "pop returned %d for a valid chain (head %u)", r,
		      want_c.head);
		CHECK(got_c.head == want_c.head && got_c.nseg == want_c.nseg &&
		      got_c.n_out == want_c.n_out && got_c.n_in == want_c.n_in &&
		      got_c.out_len == want_c.out_len &&
		      got_c.in_len == want_c.in_len,
		      "popped chain head %u nseg %u out %u/%u in %u/%u, model "
		      "head %u nseg %u out %u/%u in %u/%u", got_c.head,
		      got_c.nseg, got_c.n_out, got_c.out_len, got_c.n_in,
		      got_c.in_len, want_c.head, want_c.nseg, want_c.n_out,
		      want_c.out_len, want_c.n_in, want_c.in_len);
		for (unsigned i = 0; i < got_c.nseg; i++) {
			const struct vp_seg *a = &f->segs[i], *b = &want_s[i];
			CHECK(a->addr == b->addr && a->len == b->len &&
			      a->write == b->write && a->host == b->host,
			      "segment %u: gpa %llx len %u write %u host %p, "
			      "model %llx %u %u %p", i,
			      (unsigned long long)a->addr, a->len, a->write,
			      (void *)a->host, (unsigned long long)b->addr,
			      b->len, b->write, (void *)b->host);
			/* Every translated buffer is guest memory. */
			CHECK(area_of(f, a->host, a->len),
			      "segment %u outside guest memory", i);
		}
		CHECK(f->npop < f->num, "more chains popped than the queue holds");
		struct popped *p = &f->pop[f->npop++];
		p->c = got_c;
		p->segs = malloc(got_c.nseg * sizeof(f->segs[0]));
		CHECK(p->segs, "out of memory");
		memcpy(p->segs, f->segs, got_c.nseg * sizeof(f->segs[0]));
		f->n_pops++;
		f->m.map[got_c.head] = 1;
		f->m.inflight++;
		f->m.last_avail++;
	}
	check_state(f);
	return r;
}

/* ------------------------------------------------------------ racing pop */

/* Guest writes scheduled at the device's k-th read of guest memory. */
struct race {
	unsigned at;
	void *p;
	uint8_t v[8];
	unsigned w;
	int done;
};
static struct fz *race_f;   /* set while a racing pop runs */
static struct race races[4];
static unsigned nraces, race_reads;

const volatile void *fuzz_guest_read(const volatile void *p, unsigned long n);

/* The core's READ_ONCE, in the fuzz build: p is about to be read. */
const volatile void *fuzz_guest_read(const volatile void *p, unsigned long n)
{
	struct fz *f = race_f;
	if (f && area_of(f, (const void *)p, n)) {
		for (unsigned i = 0; i < nraces; i++)
			if (!races[i].done && races[i].at == race_reads) {
				races[i].done = 1;
				f->n_raced++;
				guest_store(f, races[i].p, races[i].v, races[i].w);
			}
		race_reads++;
	}
	return p;
}

/* A popped chain obeys every rule on its own: what it says is what the
 * device uses, so a field checked and read again would show here. */
static void check_chain(struct fz *f, const struct vp_chain *c,
			const struct vp_seg *segs)
{
	struct model *m = &f->m;
	CHECK(c->head < m->num && !m->map[c->head] && m->inflight < m->num,
	      "racing pop took head %u (in flight %u)", c->head,
	      c->head < m->num ? m->map[c->head] : 0);
	CHECK(c->nseg >= 1 && c->nseg <= m->num && c->nseg <= f->max_segs &&
	      c->n_out + c->n_in == c->nseg, "racing pop: %u segments "
	      "(%u out, %u in)", c->nseg, c->n_out, c->n_in);
	uint64_t out = 0, in = 0;
	for (unsigned i = 0; i < c->nseg; i++) {
		const struct vp_seg *s = &segs[i];
		CHECK(s->len && s->write == (i >= c->n_out),
		      "racing pop: segment %u len %u write %u", i, s->len,
		      s->write);
		CHECK(s->host && s->host == model_translate(m, s->addr, s->len),
		      "racing pop: segment %u gpa %llx len %u is not where "
		      "the table puts it", i, (unsigned long long)s->addr,
		      s->len);
		CHECK(area_of(f, s->host, s->len), "racing pop: segment %u "
		      "outside guest memory", i);
		if (s->write)
			in += s->len;
		else
			out += s->len;
	}
	CHECK(c->out_len == (out > UINT32_MAX ? UINT32_MAX : out) &&
	      c->in_len == (in > UINT32_MAX ? UINT32_MAX : in),
	      "racing pop: lengths %u/%u, segments say %llu/%llu",
	      c->out_len, c->in_len, (unsigned long long)out,
	      (unsigned long long)in);
}

/* OP_POP_RACE: a pop with guest writes between its reads. */
static void do_pop_race(struct fz *f, struct rd *in)
{
	nraces = 1 + u8(in) % 3;
	for (unsigned i = 0; i < nraces; i++) {
		struct race *r = &races[i];
		uint8_t at = u8(in), what = u8(in), idx = u8(in);
		struct vring_desc *d = &f->vr.desc[idx % f->num];
		r->at = at % 32;
		r->done = 0;
		switch (what % 6) {
		case 0: r->p = &d->addr; r->w = 8; break;
		case 1: r->p = &d->len; r->w = 4; break;
		case 2: r->p = &d->flags; r->w = 2; break;
		case 3: r->p = &d->next; r->w = 2; break;
		case 4: r->p = &f->vr.avail->idx; r->w = 2; break;
		default:
			r->p = &f->vr.avail->ring[idx % f->num];
			r->w = 2;
			break;
		}
		for (unsigned k = 0; k < r->w; k++)
			r->v[k] = u8(in);
		/* Addresses: mostly a GPA near guest RAM, to pass or
		 * nearly pass the checks. */
		if (r->w == 8 && !(what & 0x80)) {
			const struct ram *ra = &f->ram[(what >> 3) % f->nram];
			uint64_t a = ra->gpa + (r->v[0] | (r->v[1] << 8));
			memcpy(r->v, &a, 8);
		}
	}
	struct model *m = &f->m;
	struct vp_chain c;
	int was_broken = m->broken;
	race_reads = 0;
	race_f = f;
	int r = vp_devq_pop(f->q, &c, f->segs, f->max_segs);
	race_f = NULL;
	/* Writes the device read past land now: the guest made them anyway. */
	for (unsigned i = 0; i < nraces; i++)
		if (!races[i].done)
			guest_store(f, races[i].p, races[i].v, races[i].w);
	f->dirty = 1;
	if (was_broken) {
		CHECK(r == -VP_EBROKEN, "pop on a broken queue returned %d", r);
	} else if (r < 0) {
		CHECK(-r > VP_EBASE && -r <= VP_ELAST && vp_devq_broken(f->q) == -r,
		      "racing pop returned %d, queue says %d", r,
		      vp_devq_broken(f->q));
		model_break(f);
	} else if (r == 1) {
		check_chain(f, &c, f->segs);
		CHECK(f->npop < f->num, "more chains popped than the queue holds");
		struct popped *p = &f->pop[f->npop++];
		p->c = c;
		p->segs = malloc(c.nseg * sizeof(f->segs[0]));
		CHECK(p->segs, "out of memory");
		memcpy(p->segs, f->segs, c.nseg * sizeof(f->segs[0]));
		f->n_pops++;
		m->map[c.head] = 1;
		m->inflight++;
		m->last_avail++;
	} else {
		CHECK(r == 0, "racing pop returned %d", r);
	}
	check_state(f);
}

/* --------------------------------------------------- model: push, notify */

static int do_push(struct fz *f, unsigned head, uint32_t len)
{
	struct model *m = &f->m;
	int r = vp_devq_push(f->q, head, len);
	f->dirty = 1;
	if (head >= m->num || !m->map[head]) {
		CHECK(r == -VP_ENOTINFLIGHT, "push of head %u not in flight "
		      "returned %d", head, r);
	} else {
		m->map[head] = 0;
		m->inflight--;
		if (m->broken) {
			CHECK(r == -VP_EBROKEN, "push on a broken queue returned %d", r);
		} else {
			CHECK(r == 0, "push of head %u returned %d", head, r);
			vring_used_elem_t e = { head, len };
			memcpy(sh(f, &f->vr.used->ring[m->used_idx & (m->num - 1)],
				  sizeof(e)), &e, sizeof(e));
			m->used_idx++;
			m->used_any = 1;
			memcpy(sh(f, &f->vr.used->idx, 2), &m->used_idx, 2);
			/* Seen by the guest right away. */
			uint16_t gi;
			memcpy(&gi, &f->vr.used->idx, 2);
			CHECK(gi == m->used_idx, "used idx %u in guest memory, "
			      "model %u", gi, m->used_idx);
		}
	}
	check_state(f);
	return r;
}

/* -1: nothing to tell, 0: suppressed, 1: interrupt. */
static int model_need_interrupt(struct fz *f)
{
	struct model *m = &f->m;
	uint16_t old = m->signalled_used, new = m->used_idx;
	if (old == new && (m->signalled_valid || !m->used_any))
		return -1;
	if (m->event_idx) {
		uint16_t ev;
		memcpy(&ev, sh(f, &f->vr.avail->ring[m->num], 2), 2);
		return !m->signalled_valid || vring_need_event(ev, new, old);
	}
	uint16_t fl;
	memcpy(&fl, sh(f, &f->vr.avail->flags, 2), 2);
	return !(fl & VRING_AVAIL_F_NO_INTERRUPT);
}

static uint64_t efd_take(struct vp_notifier *n, int fd)
{
	(void)n;
	uint64_t v = 0;
	if (read(fd, &v, sizeof(v)) != sizeof(v))
		v = 0;
	return v;
}

static int call_fd = -1, kick_fd = -1;

static void do_interrupt(struct fz *f)
{
	struct model *m = &f->m;
	int want = m->broken ? -1 : model_need_interrupt(f);
	int r = vp_devq_interrupt(f->q);
	f->dirty = 1;
	CHECK(r == (want > 0), "interrupt returned %d, model %d", r, want);
	f->n_irq += want > 0;
	if (want >= 0) {
		m->signalled_used = m->used_idx;
		m->signalled_valid = 1;
	}
	uint64_t posted = efd_take(f->call, call_fd);
	CHECK(posted == (uint64_t)(want > 0), "call notifier posted %llu, "
	      "model %d", (unsigned long long)posted, want);
	check_state(f);
}

static void do_need_interrupt(struct fz *f)
{
	int want = model_need_interrupt(f);
	int r = vp_devq_need_interrupt(f->q);
	f->dirty = 1;
	CHECK(r == (want > 0), "need_interrupt returned %d, model %d", r, want);
	check_state(f);
}

static void do_disable(struct fz *f)
{
	struct model *m = &f->m;
	vp_devq_disable_notify(f->q);
	f->dirty = 1;
	if (!m->event_idx && m->nd != VP_ND_TRUST) {
		m->used_flags |= VRING_USED_F_NO_NOTIFY;
		memcpy(sh(f, &f->vr.used->flags, 2), &m->used_flags, 2);
	}
	check_state(f);
}

static void do_enable(struct fz *f)
{
	struct model *m = &f->m;
	uint16_t aidx;
	if (m->event_idx) {
		memcpy(sh(f, &f->vr.used->ring[m->num], 2), &m->last_avail, 2);
	} else {
		m->used_flags &= ~VRING_USED_F_NO_NOTIFY;
		memcpy(sh(f, &f->vr.used->flags, 2), &m->used_flags, 2);
	}
	memcpy(&aidx, sh(f, &f->vr.avail->idx, 2), 2);
	int r = vp_devq_enable_notify(f->q);
	f->dirty = 1;
	if (m->nd == VP_ND_TRUST) {
		/* Its last look is at the doorbell, not the ring. */
		model_nd_read(f);
		aidx = model_nd_limit(m);
	}
	CHECK(r == (aidx != m->last_avail), "enable_notify returned %d, "
	      "model %d", r, aidx != m->last_avail);
	check_state(f);
}

static void do_set_base(struct fz *f, uint16_t la, uint16_t ui)
{
	struct model *m = &f->m;
	int r = vp_devq_set_base(f->q, la, ui);
	f->dirty = 1;
	if (m->inflight) {
		CHECK(r == -EBUSY, "set_base with requests in flight returned %d", r);
	} else {
		CHECK(r == 0, "set_base returned %d", r);
		m->last_avail = la;
		m->used_idx = ui;
		m->signalled_used = ui;
		m->signalled_valid = 0;
		m->used_any = 0;
	}
	check_state(f);
}

/* A take empties the notifier at once, whatever the guest wrote there, and
 * counts at most the queue size. */
static void do_wait_kick(struct fz *f)
{
	int r = vp_devq_wait_kick(f->q, 0);
	uint64_t want = f->kicks_pending < f->num ? f->kicks_pending : f->num;
	CHECK(r >= 0 && (uint64_t)r == want, "wait_kick took %d of %llu",
	      r, (unsigned long long)f->kicks_pending);
	f->kicks_pending = 0;
	f->kicks_taken = r;
	if (r > 0 && f->m.nd && !f->m.broken) {
		f->dirty = 1;
		model_nd_read(f);
	}
}

/* OP_DOORBELL: the guest writes any word into the doorbell (native), and
 * the device reads it as after a kick. */
static void guest_doorbell(struct fz *f, struct rd *in)
{
	uint8_t sel = u8(in);
	uint32_t w = (uint32_t)uN(in, 4);
	if (!f->bell)
		return;
	if (!(sel & 1))   /* mostly near the ring's indices */
		w = VP_ND_WORD(sel & 2 ? f->qindex ^ 1 : f->qindex,
			       f->m.last_avail + (int8_t)(w & 0xff));
	guest_store(f, f->bell, &w, 4);
	vp_devq_doorbell(f->q);
	f->dirty = 1;
	if (f->m.nd && !f->m.broken)
		model_nd_read(f);
	check_state(f);
}

static int ack_fd = -1;

/* The daemon acks the kicks it took: a sync exit returns per ack.  No more
 * acks than kicks taken (and those are at most the queue size). */
static void do_ack(struct fz *f)
{
	int n = f->kicks_taken;
	f->kicks_taken = 0;
	int r = vp_devq_ack_kicks(f->q, n);
	CHECK(r == 0, "ack_kicks(%d) returned %d", n, r);
	uint64_t posted = efd_take(f->ack, ack_fd);
	CHECK(posted <= (uint64_t)n, "%llu acks for %d kicks",
	      (unsigned long long)posted, n);
}

/* --------------------------------------------------- model: the request */

/* Walk n bytes of a stream of segments [i0, i1) from skip on, calling fn on
 * each piece: the model's own copy of the device's span walk. */
typedef void (*piece_fn)(struct fz *f, uint8_t *shadow, uint32_t n,
			 uint64_t pos, void *arg);

static void walk(struct fz *f, const struct vp_seg *segs, unsigned i0,
		 unsigned i1, uint64_t skip, uint64_t len, piece_fn fn, void *arg)
{
	uint64_t pos = 0;
	for (unsigned i = i0; i < i1 && len; i++) {
		uint64_t l = segs[i].len;
		if (skip >= l) {
			skip -= l;
			continue;
		}
		uint64_t n = l - skip < len ? l - skip : len;
		fn(f, sh(f, segs[i].host + skip, n), (uint32_t)n, pos, arg);
		pos += n;
		len -= n;
		skip = 0;
	}
}

static void gather(struct fz *f, uint8_t *s, uint32_t n, uint64_t pos, void *buf)
{
	(void)f;
	memcpy((uint8_t *)buf + pos, s, n);
}

static void scatter(struct fz *f, uint8_t *s, uint32_t n, uint64_t pos, void *buf)
{
	(void)f;
	memcpy(s, (const uint8_t *)buf + pos, n);
}

/* What vp_blk_handle must do to the shadow and the shadow store; returns
 * the used length it must return. */
static int64_t model_handle(struct fz *f, const struct popped *p)
{
	const struct vp_chain *c = &p->c;
	const struct vp_seg *segs = p->segs;
	unsigned n = c->nseg, nout = c->n_out;
	uint64_t out_len = 0, in_len = 0;
	for (unsigned i = 0; i < nout; i++)
		out_len += segs[i].len;
	for (unsigned i = nout; i < n; i++)
		in_len += segs[i].len;
	if (out_len < 16 || in_len < 1) {
		model_break(f);
		return -VP_EFRAME;
	}
	struct virtio_blk_outhdr hdr;
	walk(f, segs, 0, nout, 0, 16, gather, &hdr);
	uint64_t olen = out_len - 16, ilen = in_len - 1, cap = f->cap;
	uint8_t sts = VIRTIO_BLK_S_OK;
	int64_t used = 1;
	static uint8_t buf[MAX_CAP_SECT * 512 + 64];
	switch (hdr.type) {
	case VIRTIO_BLK_T_IN:
	case VIRTIO_BLK_T_OUT: {
		int rd = hdr.type == VIRTIO_BLK_T_IN;
		uint64_t total = rd ? ilen : olen;
		if ((rd ? olen : ilen) || total % 512 || hdr.sector > cap / 512 ||
		    total > cap - hdr.sector * 512) {
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		if (rd) {
			walk(f, segs, nout, n, 0, total, scatter,
			     f->sstore + hdr.sector * 512);
			used = (int64_t)total + 1;
		} else {
			walk(f, segs, 0, nout, 16, total, gather, buf);
			memcpy(f->sstore + hdr.sector * 512, buf, total);
		}
		break;
	}
	case VIRTIO_BLK_T_FLUSH:
		break;
	case VIRTIO_BLK_T_GET_ID: {
		if (!ilen) {
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		char id[VIRTIO_BLK_ID_BYTES] = { 0 };
		if (f->serial)
			memcpy(id, f->serial, strnlen(f->serial, sizeof(id)));
		uint64_t l = ilen < sizeof(id) ? ilen : sizeof(id);
		walk(f, segs, nout, n, 0, l, scatter, id);
		used += (int64_t)l;
		break;
	}
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES: {
		int discard = hdr.type == VIRTIO_BLK_T_DISCARD;
		struct virtio_blk_discard_write_zeroes r;
		if (olen != sizeof(r)) {
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		walk(f, segs, 0, nout, 16, sizeof(r), gather, &r);
		if ((r.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ||
		    (discard && r.flags) || r.sector > cap / 512 ||
		    (uint64_t)r.num_sectors * 512 > cap - r.sector * 512) {
			sts = discard && r.flags ? VIRTIO_BLK_S_UNSUPP
						 : VIRTIO_BLK_S_IOERR;
			break;
		}
		memset(f->sstore + r.sector * 512, 0,
		       (uint64_t)r.num_sectors * 512);
		break;
	}
	default:
		sts = VIRTIO_BLK_S_UNSUPP;
		break;
	}
	const struct vp_seg *last = &segs[n - 1];
	*sh(f, last->host + last->len - 1, 1) = sts;
	return used;
}

/* The daemon's complete(): execute, push, maybe interrupt. */
static void do_complete(struct fz *f, unsigned k, int interrupt)
{
	struct popped p = f->pop[k];
	memmove(&f->pop[k], &f->pop[k + 1], (f->npop - k - 1) * sizeof(f->pop[0]));
	f->npop--;
	int64_t want = model_handle(f, &p);
	int64_t used = vp_blk_handle(f->st, f->q, &p.c, p.segs, f->serial);
	f->dirty = 1;
	CHECK(used == want, "vp_blk_handle returned %lld, model %lld",
	      (long long)used, (long long)want);
	if (used < 0) {
		f->n_frame++;
	} else {
		const struct vp_seg *last = &p.segs[p.c.nseg - 1];
		f->n_done[*(last->host + last->len - 1) & 3]++;
	}
	free(p.segs);
	do_push(f, p.c.head, used < 0 ? 0 : (uint32_t)used);
	if (interrupt)
		do_interrupt(f);
}

/* The daemon's drain(): pop everything, run each inline, interrupt once. */
static void do_drain(struct fz *f)
{
	uint16_t before = f->m.used_idx;
	unsigned pops = 0;
	for (;;) {
		if (do_pop(f) != 1)
			break;
		/* Nothing is added meanwhile: at most a queue's worth. */
		CHECK(++pops <= f->num, "drain popped more than the queue size");
		do_complete(f, f->npop - 1, 0);
	}
	CHECK((uint16_t)(f->m.used_idx - before) <= f->num,
	      "used idx moved by %u in one batch",
	      (uint16_t)(f->m.used_idx - before));
	if (pops)
		do_interrupt(f);
}

/* -------------------------------------------------------------- the guest */

/* Host address of len bytes at gpa, as the guest sees its RAM. */
static uint8_t *guest_ptr(struct fz *f, uint64_t gpa, uint64_t len)
{
	for (unsigned i = 0; i < f->nram; i++) {
		struct ram *r = &f->ram[i];
		if (gpa >= r->gpa && gpa - r->gpa < r->size &&
		    len <= r->size - (gpa - r->gpa))
			return r->host + (gpa - r->gpa);
	}
	return NULL;
}

/* Take back the descriptors of chains the device returned. */
static void guest_reap(struct fz *f)
{
	uint16_t uidx;
	memcpy(&uidx, &f->vr.used->idx, 2);
	uint16_t ahead = (uint16_t)(uidx - f->g_last_used);
	if (ahead > f->num) {   /* the guest scribbled on it: resync */
		f->g_last_used = uidx;
		return;
	}
	for (; f->g_last_used != uidx; f->g_last_used++) {
		vring_used_elem_t e;
		memcpy(&e, &f->vr.used->ring[f->g_last_used & (f->num - 1)],
		       sizeof(e));
		if (e.id >= f->num || !f->g_outstanding[e.id])
			continue;
		f->g_outstanding[e.id] = 0;
		for (unsigned d = 0; d < f->num; d++)
			if (f->g_chain[e.id][d]) {
				f->g_chain[e.id][d] = 0;
				f->g_busy[d] = 0;
			}
	}
}

/* A piece of a request: where it goes and what it holds. */
struct piece {
	uint64_t gpa;
	uint32_t len;
	int write;
};

/* len bytes of guest RAM range ri, from its cursor on. */
static uint64_t guest_alloc(struct fz *f, unsigned ri, uint32_t len, int odd)
{
	struct ram *r = &f->ram[ri];
	uint64_t c = f->g_cursor[ri] + (odd ? 1 : 0);
	if (c < r->lo)
		c = r->lo + (odd ? 1 : 0);
	if (c > r->size || len > r->size - c)
		c = r->lo;
	f->g_cursor[ri] = (c + len + 511) & ~511ULL;
	return r->gpa + c;
}

/* OP_REQ: lay out one virtio-blk request and make it available. */
static void guest_request(struct fz *f, struct rd *in)
{
	uint8_t t = u8(in), sec = u8(in), nsec = u8(in), lay = u8(in),
		place = u8(in);
	static const uint32_t types[] = { VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
		VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
		VIRTIO_BLK_T_WRITE_ZEROES };
	uint32_t type = (t & 7) < 6 ? types[t & 7]
				    : (t & 7) == 6 ? (uint32_t)(t >> 3)
						   : 0xffffff00u | t;
	uint64_t sector = sec & 0x3f;
	if (sec & 0x40)
		sector = f->cap / 512 - (sec & 7);
	if (sec & 0x80)
		sector = UINT64_MAX - (sec & 0x3f);
	int ranged = type == VIRTIO_BLK_T_DISCARD ||
		     type == VIRTIO_BLK_T_WRITE_ZEROES;
	int to_guest = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
	uint32_t dlen = (nsec & 7) * 512u;
	if (nsec & 8)
		dlen += (nsec >> 4) + 1u;
	if (type == VIRTIO_BLK_T_GET_ID)
		dlen = nsec & 0x1f;
	struct virtio_blk_discard_write_zeroes range[2];
	if (ranged) {
		for (int k = 0; k < 2; k++) {
			range[k].sector = (nsec >> 5) + (uint64_t)k;
			range[k].num_sectors = nsec & 0x1f;
			range[k].flags = (place >> 6) & 3;
		}
		dlen = place & 0x20 ? 32 : 16;
	}
	/* Native: the other queue's data share now and then. */
	unsigned ri = f->native ? (place & 3) == 3 : (place & 3) % f->nram;
	int odd = !!(place & 4), hostile = !!(place & 8);

	/* The pieces, readable first. */
	struct piece pc[8];
	unsigned np = 0, ndata = 1 + (lay & 3);
	if (dlen < ndata)
		ndata = dlen ? dlen : 1;
	int merge_hdr = (lay & 4) && dlen && !to_guest;
	if (lay & 0x10 && !merge_hdr) {
		pc[np++] = (struct piece){ 0, 8, !!(lay & 0x40) };
		pc[np++] = (struct piece){ 0, 8, !!(lay & 0x40) };
	} else {
		pc[np++] = (struct piece){ 0, 16 + (merge_hdr ? dlen / ndata : 0),
					   !!(lay & 0x40) };
	}
	uint32_t left = dlen - (merge_hdr ? dlen / ndata : 0);
	for (unsigned k = merge_hdr ? 1 : 0; k < ndata && left; k++) {
		uint32_t l = k + 1 == ndata ? left : dlen / ndata;
		pc[np++] = (struct piece){ 0, l, to_guest };
		left -= l;
	}
	int merge_sts = (lay & 8) && to_guest && dlen;
	if (merge_sts)
		pc[np - 1].len++;
	else if (!(lay & 0x20))
		pc[np++] = (struct piece){ 0, 1, 1 };
	/* Multi-region: pieces spread over the ranges. */
	for (unsigned k = 0; k < np; k++)
		pc[k].gpa = guest_alloc(f, (place & 0x10) && k && !f->native
					? (ri + k) % f->nram : ri, pc[k].len, odd);
	if (np > f->num)
		np = f->num;

	/* The bytes: header, then data or the range, into the pieces. */
	uint8_t bytes[16 + 8 * 512 + 64];
	struct virtio_blk_outhdr h = { .type = type, .ioprio = 0, .sector = sector };
	memcpy(bytes, &h, 16);
	if (ranged)
		memcpy(bytes + 16, range, dlen);
	else
		for (uint32_t k = 0; k < dlen; k++)
			bytes[16 + k] = (uint8_t)(f->pattern + k * 7);
	f->pattern += 13;
	uint32_t total = 16 + (to_guest ? 0 : dlen), pos = 0;
	for (unsigned k = 0; k < np && pos < total; k++) {
		uint32_t l = pc[k].len < total - pos ? pc[k].len : total - pos;
		uint8_t *p = guest_ptr(f, pc[k].gpa, l);
		if (p)
			guest_store(f, p, bytes + pos, l);
		pos += l;
	}

	/* Descriptors: free ones, unless the guest reuses in-flight ones. */
	guest_reap(f);
	unsigned slot[8], ns = 0;
	for (unsigned k = 0; k < f->num && ns < np; k++) {
		unsigned d = (f->g_next_desc + k) % f->num;
		if (hostile || !f->g_busy[d])
			slot[ns++] = d;
	}
	if (ns < np)
		return;   /* the ring is full: a driver waits */
	f->g_next_desc = (slot[np - 1] + 1) % f->num;
	for (unsigned k = 0; k < np; k++) {
		struct vring_desc d = {
			.addr = pc[k].gpa,
			.len = pc[k].len,
			.flags = (uint16_t)((pc[k].write ? VRING_DESC_F_WRITE : 0) |
					    (k + 1 < np ? VRING_DESC_F_NEXT : 0)),
			.next = (uint16_t)(k + 1 < np ? slot[k + 1] : 0),
		};
		guest_store(f, &f->vr.desc[slot[k]], &d, sizeof(d));
	}
	unsigned head = slot[0];
	if (!f->g_outstanding[head]) {
		f->g_outstanding[head] = 1;
		for (unsigned k = 0; k < np; k++) {
			f->g_chain[head][slot[k]] = 1;
			f->g_busy[slot[k]] = 1;
		}
	}
	guest_u16(f, &f->vr.avail->ring[f->g_avail & (f->num - 1)],
		  (uint16_t)head);
	f->g_avail++;
	if (!(lay & 0x80))
		guest_u16(f, &f->vr.avail->idx, f->g_avail);
}

/* OP_DESC: overwrite one field of one descriptor. */
static void guest_desc(struct fz *f, struct rd *in)
{
	struct vring_desc *d = &f->vr.desc[u8(in) % f->num];
	uint8_t field = u8(in);
	switch (field & 3) {
	case 0: {
		uint8_t sel = u8(in);
		uint64_t off = uN(in, 2), a;
		const struct ram *r = &f->ram[(sel & 3) % f->nram];
		switch ((sel >> 2) & 3) {
		case 0: a = r->gpa + off; break;
		case 1: a = r->gpa + r->size - off; break;
		case 2: a = r->gpa - off; break;
		default: a = uN(in, 8); break;
		}
		guest_store(f, &d->addr, &a, 8);
		break;
	}
	case 1: {
		uint32_t l = (uint32_t)uN(in, 4);
		guest_store(f, &d->len, &l, 4);
		break;
	}
	case 2:
		guest_u16(f, &d->flags, (uint16_t)(u8(in) | (field & 0x80 ? 0x100 : 0)));
		break;
	default:
		guest_u16(f, &d->next, (uint16_t)uN(in, 2));
		break;
	}
}

/* OP_AVAIL: the avail ring's index, entries, flags or used_event. */
static void guest_avail(struct fz *f, struct rd *in)
{
	uint8_t what = u8(in);
	uint16_t v = (uint16_t)uN(in, 2);
	struct vring_avail *a = f->vr.avail;
	switch (what % 5) {
	case 0: guest_u16(f, &a->idx, v); break;
	case 1: guest_u16(f, &a->idx, f->g_avail); break;   /* publish */
	case 2: guest_u16(f, &a->ring[(what >> 3) % f->num], v); break;
	case 3: guest_u16(f, &a->flags, v); break;
	default: guest_u16(f, &a->ring[f->num], v); break;   /* used_event */
	}
}

/* OP_RAW: any store of 1, 2, 4 or 8 bytes anywhere in guest memory. */
static void guest_raw(struct fz *f, struct rd *in)
{
	uint64_t off = uN(in, 3), total = 0;
	unsigned w = 1u << (u8(in) & 3);
	uint8_t v[8];
	for (unsigned k = 0; k < w; k++)
		v[k] = u8(in);
	for (unsigned i = 0; i < f->nareas; i++)
		total += f->areas[i].size;
	off %= total;
	for (unsigned i = 0; i < f->nareas; i++) {
		struct area *a = &f->areas[i];
		if (off < a->size) {
			if (w > a->size - off)
				w = (unsigned)(a->size - off);
			guest_store(f, a->real + off, v, w);
			return;
		}
		off -= a->size;
	}
}

static void guest_kick(struct fz *f, uint8_t b)
{
	uint64_t v = b == 0xff ? 0xfffffffffffffffeULL : b ? b : 1;
	if (write(kick_fd, &v, sizeof(v)) == sizeof(v))
		f->kicks_pending += v;
}

/* ---------------------------------------------------------------- set-up */

/* Native regions, one per queue size, mapped once: memfd + vp_map. */
struct native {
	void *base;
	uint64_t size;
};
static struct native natives[8];

static struct native *native_region(unsigned lg)
{
	struct native *n = &natives[lg];
	if (n->base)
		return n;
	struct vp_region_params p = {
		.num_queues = NATIVE_QUEUES, .queue_size = 1u << lg,
		.data_size = NATIVE_DATA, .capacity = MAX_CAP_SECT,
		.blk_size = 512, .seg_max = 1u << lg,
	};
	uint64_t size;
	CHECK(vp_region_size(&p, &size) == 0, "vp_region_size");
	int fd = memfd_create("fuzz_devq", MFD_CLOEXEC);
	CHECK(fd >= 0 && ftruncate(fd, (off_t)size) == 0, "memfd: %s",
	      strerror(errno));
	CHECK(vp_map(fd, size, &n->base) == 0, "vp_map");
	close(fd);
	n->size = size;
	return n;
}

static int stripe_fd[NSTRIPES_MAX] = { -1, -1, -1, -1 };

static void setup_once(void)
{
	static int done;
	if (done)
		return;
	done = 1;
	kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	ack_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	CHECK(kick_fd >= 0 && call_fd >= 0 && ack_fd >= 0, "eventfd: %s",
	      strerror(errno));
	for (int i = 0; i < NSTRIPES_MAX; i++) {
		stripe_fd[i] = memfd_create("fuzz_stripe", MFD_CLOEXEC);
		CHECK(stripe_fd[i] >= 0, "memfd: %s", strerror(errno));
	}
}

static const char *const serials[] = {
	NULL, "fuzz", "0123456789abcdefghij", "0123456789abcdefghijKLMNO",
};

/* One guest RAM range of the multi-region layout. */
static uint8_t *ram_block(uint64_t size)
{
	void *p;
	CHECK(!posix_memalign(&p, 4096, size), "out of memory");
	memset(p, 0, size);
	return p;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 4)
		return 0;
	setup_once();
	static struct fz fzs;
	struct fz *f = &fzs;
	memset(f, 0, sizeof(*f));
	struct rd in = { data, size, 0 };
	cur_op = 0;
	uint8_t c0 = u8(&in), c1 = u8(&in), c2 = u8(&in), c3 = u8(&in);
	unsigned lg = c0 & 7;
	f->num = 1u << lg;
	f->m.num = f->num;
	f->m.event_idx = !!(c0 & 8);
	f->native = !(c0 & 0x10);
	f->qindex = f->native ? (c0 >> 5) & 1 : 0;
	f->max_segs = c3 & 0x80 ? 1 + (c3 & 0x7f) % f->num : f->num;
	f->cap = (uint64_t)(c1 & 31) * 512;
	f->serial = serials[(c1 >> 5) & 3];
	f->striped = (c0 >> 6) >= 2;
	uint32_t exit_mode = c3 & 0x10 ? VP_EXIT_SYNC : VP_EXIT_ASYNC;
	f->pop = calloc(f->num, sizeof(*f->pop));
	f->segs = malloc(f->max_segs * sizeof(*f->segs));
	CHECK(f->pop && f->segs, "out of memory");

	/* Guest memory and the queue. */
	int err = 0;
	void *multi_blocks[MAX_RAM + 3] = { 0 };
	unsigned nblocks = 0;
	struct vp_device_stats *priv_stats = NULL;
	if (f->native) {
		struct native *n = native_region(lg);
		struct vp_region_params p = {
			.num_queues = NATIVE_QUEUES, .queue_size = f->num,
			.data_size = NATIVE_DATA, .capacity = f->cap / 512,
			.blk_size = 512, .seg_max = f->num,
			.device_features = c2,
		};
		memset(n->base, 0, n->size);
		CHECK(vp_region_init(n->base, n->size, &p) == 0, "vp_region_init");
		uint8_t *b = n->base;
		struct vp_region_header *h = n->base;
		struct vp_queue_info qi = h->queue[f->qindex];
		f->q = vp_devq_open(b, n->size, qi.data, qi.data + qi.data_size,
				    f->qindex, f->num, qi.desc, qi.avail, qi.used,
				    f->m.event_idx, exit_mode, &err);
		CHECK(f->q, "vp_devq_open: %d", err);
		vring_init(&f->vr, f->num, b + qi.desc, VP_RING_ALIGN);
		CHECK((uint8_t *)f->vr.avail == b + qi.avail &&
		      (uint8_t *)f->vr.used == b + qi.used, "ring layout");
		f->areas[f->nareas++] = (struct area){ b, NULL, n->size };
		f->hdr_status = &h->status;
		struct vp_queue_shared *qs = (void *)(b + qi.shared);
		f->care_lo = (uint8_t *)&qs->dev;
		f->care_hi = f->care_lo + sizeof(qs->dev);
		f->care2_lo = (uint8_t *)&qs->nd;
		f->care2_hi = f->care2_lo + sizeof(qs->nd);
		f->bell = &qs->bell.notify;
		/* c3 bits 5-6: notification data, the device trusting the
		 * doorbell (1) or re-reading the ring (2). */
		int nd = (c3 >> 5) & 3;
		if (nd == VP_ND_TRUST || nd == VP_ND_REREAD) {
			CHECK(vp_devq_set_notification_data(f->q, nd, 200) == 0,
			      "set_notification_data");
			f->m.nd = nd;
		}
		/* RAM: the served queue's data share, then the other's. */
		for (unsigned k = 0; k < NATIVE_QUEUES; k++) {
			struct vp_queue_info *o = &h->queue[(f->qindex + k) %
							    NATIVE_QUEUES];
			f->ram[f->nram++] = (struct ram){ o->data, o->data_size,
							  0, b + o->data, k == 0 };
		}
		vp_mem_init(&f->m.mem);
		vp_mem_add_region(&f->m.mem, qi.data, qi.data_size,
				  (uintptr_t)(b + qi.data), b + qi.data);
	} else {
		/* A vhost-user style table: c2 says how many regions, where
		 * the rings go, and where each region lies. */
		unsigned nr = 1 + (c2 & 3);
		int rings_inside = !!(c2 & 4);
		uint64_t ring_end = 0, ua = 0, aa = 0;
		if (rings_inside) {
			ua = (16ULL * f->num + 6 + 2 * f->num + 3) & ~3ULL;
			aa = 16ULL * f->num;
			ring_end = ua + 6 + 8ULL * f->num;
		}
		vp_mem_init(&f->m.mem);
		for (unsigned i = 0; i < nr; i++) {
			uint8_t bs = u8(&in), bg = u8(&in);
			uint64_t rsz = 512ULL << (bs & 3);
			if (i == 0 && ring_end + 512 > rsz)
				rsz = (ring_end + 512 + 511) & ~511ULL;
			uint64_t gpa = (uint64_t)(bg & 0x3f) << 12;
			if (bg & 0x40)
				gpa = 0 - (((uint64_t)(bg & 0x3f) + 1) << 12);
			if (bg & 0x80)
				gpa += (bs >> 2) * 8;
			uint8_t *host = ram_block(rsz);
			multi_blocks[nblocks++] = host;
			struct vp_mem before = f->m.mem;
			int r = vp_mem_add_region(&f->m.mem, gpa, rsz, gpa, host);
			/* The table takes a region iff it overlaps none. */
			int clash = gpa > UINT64_MAX - (rsz - 1);
			for (unsigned k = 0; k < before.nregions; k++) {
				const struct vp_mem_region *o = &before.r[k];
				if (gpa <= o->guest_phys_addr + (o->size - 1) &&
				    o->guest_phys_addr <= gpa + (rsz - 1))
					clash = 1;
			}
			CHECK(!r == !clash, "vp_mem_add_region(%llx, %llu) "
			      "returned %d", (unsigned long long)gpa,
			      (unsigned long long)rsz, r);
			f->ram[f->nram++] = (struct ram){ gpa, rsz,
				i == 0 ? (ring_end + 511) & ~511ULL : 0, host, !r };
			f->areas[f->nareas++] = (struct area){ host, NULL, rsz };
		}
		uint8_t *desc, *avail, *used;
		if (rings_inside) {
			/* As vhost-user does: rings in guest RAM, where
			 * buffers may alias them. */
			desc = f->ram[0].host;
			avail = desc + aa;
			used = desc + ua;
		} else {
			/* Exactly sized blocks: ASan sees a byte past a ring. */
			desc = malloc(16 * f->num);
			avail = malloc(6 + 2 * f->num);
			used = malloc(6 + 8 * f->num);
			CHECK(desc && avail && used, "out of memory");
			memset(desc, 0, 16 * f->num);
			memset(avail, 0, 6 + 2 * f->num);
			memset(used, 0, 6 + 8 * f->num);
			multi_blocks[nblocks++] = desc;
			multi_blocks[nblocks++] = avail;
			multi_blocks[nblocks++] = used;
			f->areas[f->nareas++] = (struct area){ desc, NULL, 16 * f->num };
			f->areas[f->nareas++] = (struct area){ avail, NULL, 6 + 2 * f->num };
			f->areas[f->nareas++] = (struct area){ used, NULL, 6 + 8 * f->num };
		}
		f->vr.num = f->num;
		f->vr.desc = (void *)desc;
		f->vr.avail = (void *)avail;
		f->vr.used = (void *)used;
		if (c2 & 8) {
			priv_stats = aligned_alloc(64, sizeof(*priv_stats));
			CHECK(priv_stats, "out of memory");
			memset(priv_stats, 0, sizeof(*priv_stats));
		}
		f->q = vp_devq_open_mem(&f->m.mem, 0, f->num, desc, avail, used,
					priv_stats, f->m.event_idx,
					exit_mode, &err);
		CHECK(f->q, "vp_devq_open_mem: %d", err);
	}
	for (unsigned i = 0; i < f->nareas; i++) {
		struct area *a = &f->areas[i];
		a->shadow = malloc(a->size);
		CHECK(a->shadow, "out of memory");
		memcpy(a->shadow, a->real, a->size);
	}

	/* Notifiers: eventfds, emptied. */
	uint64_t junk;
	while (read(kick_fd, &junk, 8) == 8)
		;
	while (read(call_fd, &junk, 8) == 8)
		;
	while (read(ack_fd, &junk, 8) == 8)
		;
	f->kick = vp_notifier_open_eventfd(kick_fd, &err);
	f->call = vp_notifier_open_eventfd(call_fd, &err);
	f->ack = vp_notifier_open_eventfd(ack_fd, &err);
	CHECK(f->kick && f->call && f->ack, "notifier: %d", err);
	vp_devq_set_notify(f->q, f->kick, f->call, f->ack);

	/* The store: memory, or RAID-0 over memfds (c3: stripes, chunk,
	 * O_DIRECT's alignment rules with a bounce buffer). */
	if (f->striped) {
		unsigned ns = 1 + (c3 & 3);
		for (unsigned i = 0; i < ns; i++)
			CHECK(ftruncate(stripe_fd[i], 0) == 0, "ftruncate");
		f->st = vp_store_open(stripe_fd, ns, 512ULL << ((c3 >> 2) & 3),
				      f->cap, (c0 >> 6) == 3, &err);
	} else {
		f->store_buf = malloc(f->cap ? f->cap : 1);
		CHECK(f->store_buf, "out of memory");
		memset(f->store_buf, 0, f->cap);
		f->st = vp_store_open_mem(f->store_buf, f->cap, &err);
	}
	CHECK(f->st, "store: %d", err);

	/* The script. */
	enum { OP_REQ, OP_DESC, OP_AVAIL, OP_RAW, OP_POP, OP_COMPLETE,
	       OP_DRAIN, OP_PUSH, OP_INTERRUPT, OP_NEED_INTERRUPT,
	       OP_DISABLE, OP_ENABLE, OP_SET_BASE, OP_KICK, OP_WAIT_KICK,
	       OP_SET_MEM, OP_POP_RACE, OP_ACK, OP_DOORBELL, OP_COUNT };
	while (in.i < in.n) {
		cur_op++;
		uint8_t op = u8(&in) % OP_COUNT;
		if (op <= OP_RAW || op == OP_KICK || op == OP_POP_RACE ||
		    op == OP_DOORBELL)
			settle(f);   /* the guest writes: compare first */
		switch (op) {
		case OP_REQ: guest_request(f, &in); break;
		case OP_DESC: guest_desc(f, &in); break;
		case OP_AVAIL: guest_avail(f, &in); break;
		case OP_RAW: guest_raw(f, &in); break;
		case OP_POP: do_pop(f); break;
		case OP_COMPLETE: {
			uint8_t k = u8(&in);
			if (f->npop)
				do_complete(f, k % f->npop, k & 0x80);
			break;
		}
		case OP_DRAIN: do_drain(f); break;
		case OP_PUSH: {
			unsigned head = (unsigned)uN(&in, 2);
			uint32_t len = u8(&in);
			/* A head the target holds leaves its list. */
			for (unsigned k = 0; k < f->npop; k++)
				if (f->pop[k].c.head == head) {
					free(f->pop[k].segs);
					memmove(&f->pop[k], &f->pop[k + 1],
						(f->npop - k - 1) * sizeof(f->pop[0]));
					f->npop--;
					break;
				}
			do_push(f, head, len);
			break;
		}
		case OP_INTERRUPT: do_interrupt(f); break;
		case OP_NEED_INTERRUPT: do_need_interrupt(f); break;
		case OP_DISABLE: do_disable(f); break;
		case OP_ENABLE: do_enable(f); break;
		case OP_SET_BASE: {
			uint16_t la = (uint16_t)uN(&in, 2), ui = (uint16_t)uN(&in, 2);
			do_set_base(f, la, ui);
			break;
		}
		case OP_KICK: guest_kick(f, u8(&in)); break;
		case OP_WAIT_KICK: do_wait_kick(f); break;
		case OP_POP_RACE: do_pop_race(f, &in); break;
		case OP_ACK: do_ack(f); break;
		case OP_DOORBELL: guest_doorbell(f, &in); break;
		case OP_SET_MEM: {
			uint8_t mask = u8(&in);
			if (f->native)
				break;
			/* A new table: some of the ranges, rotated. */
			struct vp_mem nm;
			vp_mem_init(&nm);
			for (unsigned k = 0; k < f->nram; k++) {
				struct ram *r = &f->ram[(k + (mask >> 4)) % f->nram];
				if (mask & (1u << k))
					vp_mem_add_region(&nm, r->gpa, r->size,
							  r->gpa, r->host);
			}
			CHECK(vp_devq_set_mem(f->q, &nm) == 0, "set_mem");
			f->m.mem = nm;
			break;
		}
		}
	}
	cur_op++;
	/* Complete what is still popped, as stop does, and compare all. */
	while (f->npop)
		do_complete(f, 0, 0);
	do_interrupt(f);
	compare_memory(f);
	if (f->striped) {
		static uint8_t back[MAX_CAP_SECT * 512 + 1];
		CHECK(vp_store_rw(f->st, 0, 0, back, f->cap) == 0, "store read");
		CHECK(!memcmp(back, f->sstore, f->cap), "striped store differs "
		      "from the model");
	}
	CHECK(vp_devq_inflight(f->q) == 0, "requests left in flight");
	if (getenv("FUZZ_DEVQ_VERBOSE"))
		fprintf(stderr, "%s num %u: %u popped, ok %u ioerr %u unsupp %u, "
			"no frame %u, %u interrupts, broken %d, used idx %u, "
			"%u writes landed inside a pop\n",
			f->native ? "native" : "multi", f->num, f->n_pops,
			f->n_done[0], f->n_done[1], f->n_done[2], f->n_frame,
			f->n_irq, vp_devq_broken(f->q), f->m.used_idx, f->n_raced);

	vp_devq_close(f->q);
	vp_notifier_close(f->kick);
	vp_notifier_close(f->call);
	vp_notifier_close(f->ack);
	vp_store_close(f->st);
	free(f->store_buf);
	for (unsigned i = 0; i < f->nareas; i++)
		free(f->areas[i].shadow);
	for (unsigned i = 0; i < nblocks; i++)
		free(multi_blocks[i]);
	free(priv_stats);
	free(f->pop);
	free(f->segs);
	return 0;
}
