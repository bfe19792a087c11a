/* Block stores: RAID-0 over files, and a memory buffer (see store.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "store.h"
#include "vp.h"

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
	/* mapped: every stripe file mapped whole (guarded), map_len bytes */
	uint8_t *maps[VP_STORE_MAX_STRIPES];
	uint64_t map_len;
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

/* ================= RAID-0 over mapped files ================= */

/* A store on tmpfs keeps its bytes in the page cache: mapping the stripe
 * files moves a request's data with one memcpy, without a read or write
 * system call and its page-cache lookup.  A stripe file truncated under
 * us is caught by the truncation guard (private zeros from there on), and
 * the request that saw it fails. */
/* The copy the kernel's read and write would do: rep movsb (fast on any
 * x86 with ERMS) leaves the vector registers alone, where glibc's memcpy
 * takes AVX-512 registers for a 4 KiB block; measured, that made the
 * serve thread's copy and its frequent context switches (which then save
 * and restore that state) cost more than the read call it replaced. */
static void copy_bytes(uint8_t *dst, const uint8_t *src, uint64_t n)
{
#if defined(__x86_64__)
	__asm__ volatile("rep movsb"
			 : "+D"(dst), "+S"(src), "+c"(n)
			 :
			 : "memory");
#else
	memcpy(dst, src, n);
#endif
}

static int mapped_rw(struct vp_store *s, int write, uint64_t off,
		     uint8_t *buf, uint64_t len)
{
	uint32_t gen = vp_guard_gen();
	uint8_t *b = buf;
	for (uint64_t left = len, o = off; left;) {
		unsigned st;
		uint64_t foff, room;
		locate(s, o, &st, &foff, &room);
		uint64_t n = left < room ? left : room;
		if (write)
			copy_bytes(s->maps[st] + foff, b, n);
		else
			copy_bytes(b, s->maps[st] + foff, n);
		o += n;
		b += n;
		left -= n;
	}
	if (vp_guard_gen() == gen)
		return 0;
	/* Something was lost meanwhile: ours, or the guest's buffer. */
	if (vp_guard_lost(buf, len))
		return -EFAULT;
	for (unsigned i = 0; i < s->n; i++)
		if (vp_guard_lost(s->maps[i], s->map_len))
			return -EIO;
	return 0;
}

static const struct vp_store_ops mapped_ops = {
	.rw = mapped_rw,
	.flush = striped_flush,
	.zero = striped_zero,   /* fallocate: the mappings see the zeros */
};

static void unmap_all(struct vp_store *s)
{
	for (unsigned i = 0; i < s->n; i++)
		if (s->maps[i])
			vp_unmap(s->maps[i], s->map_len);
	memset(s->maps, 0, sizeof(s->maps));
}

struct vp_store *vp_store_open_mapped(const int *fds, unsigned nstripes,
				      uint64_t chunk, uint64_t capacity,
				      int *err)
{
	struct vp_store *s = vp_store_open(fds, nstripes, chunk, capacity, 0, err);
	if (!s)
		return NULL;
	uint64_t chunks = (capacity + chunk - 1) / chunk;
	s->map_len = (chunks + nstripes - 1) / nstripes * chunk;
	s->ops = &mapped_ops;
	if (!s->map_len) {
		*err = -EINVAL;
		vp_store_close(s);
		return NULL;
	}
	for (unsigned i = 0; i < nstripes; i++) {
		int r = vp_map(fds[i], s->map_len, (void **)&s->maps[i]);
		if (r) {
			s->maps[i] = NULL;
			*err = r;
			vp_store_close(s);
			return NULL;
		}
	}
	return s;
}

int vp_store_locate(const struct vp_store *s, uint64_t off, int *fd,
		    uint64_t *foff, uint64_t *room)
{
	if (s->ops != &striped_ops || off >= s->capacity)
		return -EINVAL;
	unsigned st;
	locate(s, off, &st, foff, room);
	*fd = s->fds[st];
	return 0;
}

unsigned vp_store_files(const struct vp_store *s, const int **fds)
{
	if (s->ops == &mem_ops) {
		*fds = NULL;
		return 0;
	}
	*fds = s->fds;
	return s->n;
}

/* ================= any store ================= */

void vp_store_close(struct vp_store *s)
{
	if (!s)
		return;
	unmap_all(s);
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
