/* Crash points: a process that kills itself (SIGKILL) at a chosen step of
 * the driver's critical sections, so that tests can put a death at every
 * step deterministically.  Armed once at worker start (a run's worker
 * reads VIRTIO_PY_CRASH_AT); unarmed, a point costs one load and one
 * predictable branch. */
#ifndef VIRTIO_PY_CRASHPOINT_H
#define VIRTIO_PY_CRASHPOINT_H
#include <stdint.h>
#include "compiler.h"

/* The points, in the order a request passes them.  Names in crashpoint.c. */
enum vp_crash_point {
	VP_CRASH_NONE = 0,
	VP_CRASH_ADD_BEGIN,       /* virtqueue_add: checked, nothing written */
	VP_CRASH_ADD_DESC,        /* descriptors written, free list not yet */
	VP_CRASH_ADD_FREE,        /* free list and num_free moved */
	VP_CRASH_ADD_TOKEN,       /* the head's token written */
	VP_CRASH_ADD_RING,        /* the avail entry written, idx not published */
	VP_CRASH_ADD_PUBLISH,     /* avail->idx published, num_added not counted */
	VP_CRASH_ADD_END,         /* add done, kick decision not made */
	VP_CRASH_KICK,            /* kick decided, notify not posted */
	VP_CRASH_GETBUF_INTENT,   /* get_buf: reap record written, nothing taken */
	VP_CRASH_GETBUF_DETACH,   /* token cleared, free list not yet */
	VP_CRASH_GETBUF_DETACHED, /* chain on the free list, last_used_idx not moved */
	VP_CRASH_GETBUF_USED,     /* last_used_idx moved, not delivered */
	VP_CRASH_DELIVER_LEN,     /* comp[tag].len written, done not */
	VP_CRASH_DELIVER_DONE,    /* done = 1, delivered not counted */
	VP_CRASH_DELIVER_COUNT,   /* delivered counted, wake_seq not moved */
	VP_CRASH_DELIVER_WOKEN,   /* wake_seq moved, the reap record not cleared */
	VP_CRASH_NPOINTS
};

/* The armed point, VP_CRASH_NONE unarmed. */
extern int vp_crash_at __attribute__((visibility("hidden")));
/* Non-zero while a crash run is watched (vp_crash_watch). */
extern int vp_crash_watching __attribute__((visibility("hidden")));
void vp_crash_hit(void);
void vp_crash_note_acquire(void);

#define VP_CRASH_POINT(p) \
	do { if (unlikely(vp_crash_at == (p))) vp_crash_hit(); } while (0)
/* After every queue lock acquisition (vp_vq_lock_acquire). */
#define VP_CRASH_ACQUIRED() \
	do { if (unlikely(vp_crash_watching)) vp_crash_note_acquire(); } while (0)

/* Name of point p, NULL past the last.  No lock. */
const char *vp_crash_point_name(int p);
/* Arm: die by SIGKILL the n-th time (n >= 1) this process passes point p
 * (any thread), writing CLOCK_MONOTONIC ns into *died first (shared memory
 * the run's other processes watch; may be NULL).  0 or -EINVAL.  Once, at
 * start, before the driver runs. */
int vp_crash_arm(int p, uint32_t n, uint64_t *died);
/* Watch *died (the armed process's word): the first queue lock acquisition
 * of this process after it became non-zero is kept (vp_crash_resumed_ns).
 * Once, at start. */
void vp_crash_watch(uint64_t *died);
/* ns of this process's first queue lock acquisition after the death, 0 if
 * none (yet).  Any thread. */
uint64_t vp_crash_resumed_ns(void);
#endif
