/* virtio-blk request execution: one popped chain, start to status byte.
 *
 * VIRTIO_F_VERSION_1 lets a driver lay a request over its descriptors any
 * way it likes, so the header, the data and the status byte are found in
 * the chain's readable and writable streams, not in given descriptors: the
 * header opens the readable stream, the status byte closes the writable
 * one.  Data moves straight between the store and guest buffers, through
 * the host addresses vp_devq_pop translated; under O_DIRECT a layout that
 * cuts sectors apart goes through one aligned bounce buffer instead.
 * Header and ranges are copied out of guest memory once, then checked.
 * A read or write that finds guest memory gone (EFAULT: its object was
 * truncated) breaks the queue, as a fault on it would (vringh.c). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "blkdev.h"
#include "compiler.h"

static uint64_t seg_total(const struct vp_seg *segs, unsigned from,
			  unsigned to)
{
	uint64_t t = 0;
	for (unsigned i = from; i < to; i++)
		t += segs[i].len;
	return t;
}

/* len bytes of a chain's readable or writable stream (segments [i0, i1)),
 * starting skip bytes in. */
struct span {
	const struct vp_seg *segs;
	unsigned i0, i1;
	uint64_t skip, len;
};

/* Call fn on every piece of the span, with the piece's offset in it. */
static int span_walk(const struct span *s,
		     int (*fn)(uint8_t *p, uint32_t n, uint64_t pos, void *arg),
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
		int r = fn(s->segs[i].host + skip, (uint32_t)n, pos, arg);
		if (r)
			return r;
		pos += n;
		left -= n;
		skip = 0;
	}
	return 0;
}

static int piece_from_guest(uint8_t *p, uint32_t n, uint64_t pos, void *buf)
{
	memcpy((uint8_t *)buf + pos, p, n);
	return 0;
}

static int piece_to_guest(uint8_t *p, uint32_t n, uint64_t pos, void *buf)
{
	memcpy(p, (const uint8_t *)buf + pos, n);
	return 0;
}

struct store_io {
	struct vp_store *st;
	int write;
	uint64_t off;
};

static int piece_store(uint8_t *p, uint32_t n, uint64_t pos, void *arg)
{
	struct store_io *io = arg;
	return vp_store_rw(io->st, io->write, io->off + pos, p, n);
}

static int piece_unaligned(uint8_t *p, uint32_t n, uint64_t pos, void *arg)
{
	(void)pos;
	(void)arg;
	return ((uintptr_t)p | n) % 512 != 0;
}

#define BOUNCE_MAX (16U << 20)

/* Move a request's data between the store and the guest. */
static int data_io(struct vp_store *st, const struct span *data, int write,
		   uint64_t off)
{
	struct store_io io = { st, write, off };
	if (!vp_store_direct(st) || !span_walk(data, piece_unaligned, NULL))
		return span_walk(data, piece_store, &io);
	if (data->len > BOUNCE_MAX)
		return -E2BIG;
	uint8_t *b;
	if (posix_memalign((void **)&b, 4096, data->len ? data->len : 1))
		return -ENOMEM;
	int r;
	if (write) {
		span_walk(data, piece_from_guest, b);
		r = vp_store_rw(st, 1, off, b, data->len);
	} else {
		r = vp_store_rw(st, 0, off, b, data->len);
		if (!r)
			span_walk(data, piece_to_guest, b);
	}
	free(b);
	return r;
}

/* A read (rd) or write that moved total bytes: counted; its used.len. */
static uint32_t rw_moved(struct vp_device_stats *ds, int rd, uint64_t total)
{
	if (!rd) {
		__atomic_fetch_add(&ds->bytes_written, total, __ATOMIC_RELAXED);
		return 1;
	}
	/* used.len is 32 bits: segments may overlap, so a read can pass
	 * 4 GiB; say as much as fits. */
	__atomic_fetch_add(&ds->bytes_read, total, __ATOMIC_RELAXED);
	return total < UINT32_MAX ? (uint32_t)total + 1 : UINT32_MAX;
}

/* Count a request of class cls and write its status: used. */
static uint32_t answer(struct vp_device_stats *ds, int cls, uint8_t sts,
		       uint8_t *status, uint32_t used)
{
	__atomic_fetch_add(&ds->req[cls], 1, __ATOMIC_RELAXED);
	if (sts == VIRTIO_BLK_S_IOERR)
		__atomic_fetch_add(&ds->req[VP_REQ_IOERR], 1, __ATOMIC_RELAXED);
	WRITE_ONCE(*status, sts);
	return used;
}

int64_t vp_blk_handle(struct vp_store *st, struct vp_devq *q,
		      const struct vp_chain *c, const struct vp_seg *segs,
		      const char *serial)
{
	struct vp_device_stats *ds = vp_devq_stats(q);
	struct virtio_blk_outhdr hdr;
	unsigned n = c->nseg, nout = c->n_out;
	uint64_t out_len = seg_total(segs, 0, nout);
	uint64_t in_len = seg_total(segs, nout, n);
	/* Without room for a header and a status there is nothing to answer. */
	if (out_len < sizeof(hdr) || in_len < 1) {
		vp_devq_mark_broken(q, VP_EFRAME);
		return -VP_EFRAME;
	}
	const struct span head = { segs, 0, nout, 0, sizeof(hdr) };
	span_walk(&head, piece_from_guest, &hdr);   /* read once */
	const struct vp_seg *last = &segs[n - 1];
	uint8_t *status = last->host + last->len - 1;
	const struct span out = { segs, 0, nout, sizeof(hdr), out_len - sizeof(hdr) };
	const struct span in = { segs, nout, n, 0, in_len - 1 };
	uint8_t sts = VIRTIO_BLK_S_OK;
	uint32_t used = 1;
	uint64_t cap = vp_store_capacity(st);
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
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		int e = data_io(st, data, !rd, hdr.sector * 512);
		if (e == -EFAULT) {
			vp_devq_mark_broken(q, EFAULT);
			return -EFAULT;
		}
		if (e) {
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		used = rw_moved(ds, rd, total);
		break;
	}
	case VIRTIO_BLK_T_FLUSH:
		cls = VP_REQ_FLUSH;
		if (vp_store_flush(st))
			sts = VIRTIO_BLK_S_IOERR;
		break;
	case VIRTIO_BLK_T_GET_ID: {
		cls = VP_REQ_GET_ID;
		if (in.len == 0) {
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		/* 20 bytes, NUL-padded, not NUL-terminated when full. */
		char id[VIRTIO_BLK_ID_BYTES] = { 0 };
		if (serial)
			memcpy(id, serial, strnlen(serial, sizeof(id)));
		struct span idspan = in;
		if (idspan.len > sizeof(id))
			idspan.len = sizeof(id);
		span_walk(&idspan, piece_to_guest, id);
		used += (uint32_t)idspan.len;
		break;
	}
	case VIRTIO_BLK_T_DISCARD:
	case VIRTIO_BLK_T_WRITE_ZEROES: {
		int discard = hdr.type == VIRTIO_BLK_T_DISCARD;
		cls = discard ? VP_REQ_DISCARD : VP_REQ_WZEROES;
		/* One range per request (max_*_seg = 1 in config space). */
		struct virtio_blk_discard_write_zeroes r;
		if (out.len != sizeof(r)) {
			sts = VIRTIO_BLK_S_IOERR;
			break;
		}
		span_walk(&out, piece_from_guest, &r);
		if ((r.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ||
		    (discard && r.flags) || r.sector > cap / 512 ||
		    (uint64_t)r.num_sectors * 512 > cap - r.sector * 512) {
			sts = discard && r.flags ? VIRTIO_BLK_S_UNSUPP
						 : VIRTIO_BLK_S_IOERR;
			break;
		}
		if (vp_store_zero(st, r.sector * 512,
				  (uint64_t)r.num_sectors * 512,
				  discard || (r.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
			sts = VIRTIO_BLK_S_IOERR;
		break;
	}
	default:
		cls = VP_REQ_UNSUPP;
		sts = VIRTIO_BLK_S_UNSUPP;
		break;
	}
	return answer(ds, cls, sts, status, used);
}

/* ---- a read or write whose data the caller moves (an I/O engine) ---- */

int vp_blk_rw_begin(struct vp_store *st, struct vp_devq *q,
		    const struct vp_chain *c, const struct vp_seg *segs,
		    struct vp_blk_rw *rw)
{
	(void)q;
	struct virtio_blk_outhdr hdr;
	unsigned n = c->nseg, nout = c->n_out;
	uint64_t out_len = seg_total(segs, 0, nout);
	uint64_t in_len = seg_total(segs, nout, n);
	if (out_len < sizeof(hdr) || in_len < 1)
		return 0;   /* vp_blk_handle breaks the queue */
	const struct span head = { segs, 0, nout, 0, sizeof(hdr) };
	span_walk(&head, piece_from_guest, &hdr);   /* read once */
	const struct vp_seg *last = &segs[n - 1];
	rw->status = last->host + last->len - 1;
	rw->flush = hdr.type == VIRTIO_BLK_T_FLUSH;
	if (rw->flush) {
		rw->write = 0;
		rw->off = rw->len = rw->skip = 0;
		rw->i0 = rw->i1 = 0;
		rw->err = 0;
		return 1;
	}
	/* Anything else is vp_blk_handle's, which reads the header again
	 * and checks it all: this read only routes the request. */
	if (hdr.type != VIRTIO_BLK_T_IN && hdr.type != VIRTIO_BLK_T_OUT)
		return 0;
	int rd = hdr.type == VIRTIO_BLK_T_IN;
	const struct span out = { segs, 0, nout, sizeof(hdr), out_len - sizeof(hdr) };
	const struct span in = { segs, nout, n, 0, in_len - 1 };
	const struct span *data = rd ? &in : &out;
	uint64_t cap = vp_store_capacity(st), total = data->len;
	rw->write = !rd;
	rw->off = hdr.sector * 512;
	rw->len = total;
	rw->i0 = data->i0;
	rw->i1 = data->i1;
	rw->skip = data->skip;
	rw->err = 0;
	/* What vp_blk_handle answers with IOERR is answered so from this
	 * copy (err -EINVAL); what it moves by a bounce buffer is for
	 * vp_blk_rw_do (err 1). */
	if ((rd ? out.len : in.len) || total % 512 ||
	    hdr.sector > cap / 512 || total > cap - hdr.sector * 512) {
		rw->err = -EINVAL;
		return 1;
	}
	if (vp_store_direct(st) && span_walk(data, piece_unaligned, NULL))
		rw->err = 1;
	return 1;
}

int vp_blk_rw_walk(const struct vp_seg *segs, const struct vp_blk_rw *rw,
		   int (*fn)(uint8_t *p, uint32_t n, uint64_t pos, void *arg),
		   void *arg)
{
	const struct span s = { segs, rw->i0, rw->i1, rw->skip, rw->len };
	return span_walk(&s, fn, arg);
}

int vp_blk_rw_do(struct vp_store *st, const struct vp_seg *segs,
		 const struct vp_blk_rw *rw)
{
	const struct span s = { segs, rw->i0, rw->i1, rw->skip, rw->len };
	return data_io(st, &s, rw->write, rw->off);
}

int64_t vp_blk_rw_end(struct vp_devq *q, const struct vp_blk_rw *rw, int err)
{
	struct vp_device_stats *ds = vp_devq_stats(q);
	if (err == -EFAULT) {
		vp_devq_mark_broken(q, EFAULT);
		return -EFAULT;
	}
	int cls = VP_REQ_FLUSH;
	uint32_t used = 1;
	if (!rw->flush) {
		cls = rw->write ? VP_REQ_OUT : VP_REQ_IN;
		if (!err)
			used = rw_moved(ds, !rw->write, rw->len);
	}
	return answer(ds, cls, err ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK,
		      rw->status, used);
}
