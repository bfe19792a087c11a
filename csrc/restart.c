/* Waiting for a device process to be restarted (restart.h). */
#define _GNU_SOURCE
#include <stdlib.h>
#include "vp.h"
#include "restart.h"
#include "compiler.h"

#define RESTART_WAIT_DEFAULT_NS 5000000000LL

static int64_t restart_wait = -1;      /* -1: not read from the environment yet */

int64_t vp_restart_wait_ns(void)
{
	int64_t w = __atomic_load_n(&restart_wait, __ATOMIC_RELAXED);
	if (w >= 0)
		return w;
	w = RESTART_WAIT_DEFAULT_NS;
	const char *s = getenv("VIRTIO_PY_RESTART_WAIT");
	if (s && *s) {
		char *end;
		double v = strtod(s, &end);
		if (end != s && !*end && v >= 0 && v < 1e6)
			w = (int64_t)(v * 1e9);
	}
	__atomic_store_n(&restart_wait, w, __ATOMIC_RELAXED);
	return w;
}

void vp_set_restart_wait_ns(int64_t ns)
{
	__atomic_store_n(&restart_wait, ns < 0 ? 0 : ns, __ATOMIC_RELAXED);
}

/* Episodes of gone device processes, one per dead pid: pid << 32 | the
 * CLOCK_MONOTONIC ms (mod 2^32) it was first seen gone.  Keyed by pid, so
 * a successor's death starts a new wait instead of inheriting its
 * predecessor's clock, and two dead devices in one process do not share
 * one.  An episode older than the wait and a margin is over (whoever
 * waited has failed), so a reused pid starts afresh. */
#define EPISODES 8
#define EPISODE_OVER_MS 10000u
static uint64_t episode[EPISODES];

static uint32_t episode_age(uint64_t e, uint32_t now)
{
	return now - (uint32_t)e;
}

int vp_device_gone(const int32_t *daemon_pid)
{
	int32_t pid = READ_ONCE(*daemon_pid);
	if (pid <= 0)
		return 1;   /* no device process, said on purpose: no successor */
	if (!vp_pid_gone(pid))
		return 0;
	uint32_t now = (uint32_t)(vp_now_ns() / 1000000);
	uint32_t wait = (uint32_t)(vp_restart_wait_ns() / 1000000);
	unsigned oldest = 0;
	uint32_t oldest_age = 0;
	for (unsigned i = 0; i < EPISODES; i++) {
		uint64_t e = __atomic_load_n(&episode[i], __ATOMIC_RELAXED);
		uint32_t age = episode_age(e, now);
		if (e >> 32 == (uint32_t)pid && age < wait + EPISODE_OVER_MS)
			return age >= wait;
		if (!e) {
			oldest = i;
			break;
		}
		if (age >= oldest_age) {
			oldest = i;
			oldest_age = age;
		}
	}
	/* A new episode; losing the race to another thread's claim costs one
	 * entry, not the answer. */
	__atomic_store_n(&episode[oldest], (uint64_t)(uint32_t)pid << 32 | now,
			 __ATOMIC_RELAXED);
	return wait == 0;
}
