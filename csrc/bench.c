/* Small C loops for bench/: measured in C so the figures are the lock's,
 * not the Python call's. */
#include "vp.h"

/* Take and drop the lock n times, as fast as possible; returns n.  Run by
 * several processes at once it measures the lock under contention, and the
 * holder-written lockstat acquisitions then count exactly n per process
 * (a lost update would mean two holders at once). */
int64_t vp_lock_hammer(struct vp_lock *l, int64_t n)
{
	int64_t i;
	for (i = 0; i < n; i++) {
		vp_lock_acquire(l);
		vp_lock_release(l);
	}
	return i;
}
