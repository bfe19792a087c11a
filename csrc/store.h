/* The block store behind the virtio-blk device: a RAID-0 set of files, or
 * a buffer in memory (tests and fuzzing).  Every function may be called
 * from any thread, concurrently; requests on overlapping ranges race as
 * they would on a disk. */
#ifndef VIRTIO_PY_STORE_H
#define VIRTIO_PY_STORE_H
#include <stdint.h>

#define VP_STORE_MAX_STRIPES 64

struct vp_store;
/* RAID-0: logical chunk k lies in stripe k mod nstripes, at offset
 * (k div nstripes) * chunk.  fds are borrowed: the caller opened them and
 * closes them after.  direct: they were opened with O_DIRECT. */
struct vp_store *vp_store_open(const int *fds, unsigned nstripes,
			       uint64_t chunk, uint64_t capacity, int direct,
			       int *err);
/* The same RAID-0 with every stripe file mapped shared (tmpfs: the page
 * cache is the store): data moves by memcpy.  Flush and zeroing go
 * through the fds, which stay borrowed. */
struct vp_store *vp_store_open_mapped(const int *fds, unsigned nstripes,
				      uint64_t chunk, uint64_t capacity,
				      int *err);
/* capacity bytes at buf, borrowed: the caller frees buf after. */
struct vp_store *vp_store_open_mem(void *buf, uint64_t capacity, int *err);
void vp_store_close(struct vp_store *s);
/* Bytes. */
uint64_t vp_store_capacity(const struct vp_store *s);
/* 1 if buffers and lengths must be 512-byte aligned (O_DIRECT). */
int vp_store_direct(const struct vp_store *s);
/* Logical I/O on the volume: 0, -ERANGE outside it, or -errno. */
int vp_store_rw(struct vp_store *s, int write, uint64_t off, uint8_t *buf,
		uint64_t len);
int vp_store_flush(struct vp_store *s);
/* Zero a range; punch: the blocks may be deallocated (discard, unmap). */
int vp_store_zero(struct vp_store *s, uint64_t off, uint64_t len, int punch);
/* Where logical byte off lies on a RAID-0 store over unmapped files: the
 * stripe's fd, the offset in it and the bytes left in its chunk.  0, or
 * -EINVAL (another kind of store, or off past the end). */
int vp_store_locate(const struct vp_store *s, uint64_t off, int *fd,
		    uint64_t *foff, uint64_t *room);
/* The stripe files' fds (borrowed) and their number; 0 for memory. */
unsigned vp_store_files(const struct vp_store *s, const int **fds);
#endif
