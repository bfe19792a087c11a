/* Small C loops for bench/: measured in C so the figures are the lock's,
 * not the Python call's. */
#include <sched.h>
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

/* A start line for benchmark processes, on a word in shared memory: arrive
 * adds one and returns the new count; wait spins (yielding, so a process
 * sharing the CPU can arrive too) until the word reaches target.  Parties
 * woken by a notifier straggle in over milliseconds, long enough for the
 * first ones to finish a short run alone; after this barrier they start
 * within a scheduling turn of each other. */
uint32_t vp_bench_arrive(uint32_t *word)
{
	return __atomic_add_fetch(word, 1, __ATOMIC_SEQ_CST);
}

void vp_bench_wait(const uint32_t *word, uint32_t target)
{
	while ((int32_t)(__atomic_load_n(word, __ATOMIC_ACQUIRE) - target) < 0)
		sched_yield();
}
