/* Block stores: RAID-0 over files, and a memory buffer (see store.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "store.h"

struct vp_store_ops {
	int (*rw)(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		  uint64_t len);
	int (*flush)(struct vp_store *s);
	int (*zero)(struct vp_store *s, uint64_t off, uint64_t len, int punch);
};

struct vp_store {
	const struct vp_store_ops *ops;
	uint64_t capacity;   /* bytes */
	int direct;
	/* striped */
	unsigned n;
	int fds[VP_STORE_MAX_STRIPES];
	uint64_t chunk;
	uint8_t *zeros;      /* aligned zero buffer for write-zeroes fallback */
	/* memory */
	uint8_t *mem;
};

#define ZERO_BUF (1 << 20)

/* ================= RAID-0 over files ================= */

/* RAID-0: logical chunk k is in stripe k mod N at (k div N) * chunk. */
static void locate(const struct vp_store *s, uint64_t off, unsigned *stripe,
		   uint64_t *foff, uint64_t *room)
{
	uint64_t k = off / s->chunk, in = off % s->chunk;
	*stripe = (unsigned)(k % s->n);
	*foff = (k / s->n) * s->chunk + in;
	*room = s->chunk - in;
}

static int striped_rw(struct vp_store *s, int write, uint64_t off,
		      uint8_t *buf, uint64_t len)
{
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

static int striped_flush(struct vp_store *s)
{
	for (unsigned i = 0; i < s->n; i++)
		if (fdatasync(s->fds[i]))
			return -errno;
	return 0;
}

static int striped_zero(struct vp_store *s, uint64_t off, uint64_t len,
			int punch)
{
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

static const struct vp_store_ops striped_ops = {
	.rw = striped_rw,
	.flush = striped_flush,
	.zero = striped_zero,
};

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
	s->ops = &striped_ops;
	s->n = nstripes;
	memcpy(s->fds, fds, nstripes * sizeof(int));
	s->chunk = chunk;
	s->capacity = capacity;
	s->direct = direct;
	*err = 0;
	return s;
}

/* ================= memory ================= */

static int mem_rw(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		  uint64_t len)
{
	if (write)
		memcpy(s->mem + off, buf, len);
	else
		memcpy(buf, s->mem + off, len);
	return 0;
}

static int mem_flush(struct vp_store *s)
{
	(void)s;   /* nothing is volatile that memory keeps */
	return 0;
}

static int mem_zero(struct vp_store *s, uint64_t off, uint64_t len, int punch)
{
	(void)punch;
	memset(s->mem + off, 0, len);
	return 0;
}

static const struct vp_store_ops mem_ops = {
	.rw = mem_rw,
	.flush = mem_flush,
	.zero = mem_zero,
};

struct vp_store *vp_store_open_mem(void *buf, uint64_t capacity, int *err)
{
	if (!buf || capacity % 512) {
		*err = -EINVAL;
		return NULL;
	}
	struct vp_store *s = calloc(1, sizeof(*s));
	if (!s) {
		*err = -ENOMEM;
		return NULL;
	}
	s->ops = &mem_ops;
	s->mem = buf;
	s->capacity = capacity;
	*err = 0;
	return s;
}

/* ================= any store ================= */

void vp_store_close(struct vp_store *s)
{
	if (!s)
		return;
	free(s->zeros);
	free(s);
}

uint64_t vp_store_capacity(const struct vp_store *s)
{
	return s->capacity;
}

int vp_store_direct(const struct vp_store *s)
{
	return s->direct;
}

int vp_store_rw(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		uint64_t len)
{
	if (off > s->capacity || len > s->capacity - off)
		return -ERANGE;
	return s->ops->rw(s, write, off, buf, len);
}

int vp_store_flush(struct vp_store *s)
{
	return s->ops->flush(s);
}

int vp_store_zero(struct vp_store *s, uint64_t off, uint64_t len, int punch)
{
	if (off > s->capacity || len > s->capacity - off)
		return -ERANGE;
	return s->ops->zero(s, off, len, punch);
}
