/* Waiting for a device process to be restarted (restart.h). */
#define _GNU_SOURCE
#include <stdlib.h>
#include "vp.h"
#include "restart.h"
#include "compiler.h"

#define RESTART_WAIT_DEFAULT_NS 5000000000LL

static int64_t restart_wait = -1;      /* -1: not read from the environment yet */
static uint64_t gone_since;            /* when the device was first seen gone; 0 */

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

int vp_device_gone(const int32_t *daemon_pid)
{
	int32_t pid = READ_ONCE(*daemon_pid);
	if (pid <= 0)
		return 1;   /* no device process, said on purpose: no successor */
	if (!vp_pid_gone(pid)) {
		__atomic_store_n(&gone_since, 0, __ATOMIC_RELAXED);
		return 0;
	}
	uint64_t now = vp_now_ns(), since = 0;
	if (!__atomic_compare_exchange_n(&gone_since, &since, now, 0,
					 __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		now = now > since ? now : since;
	else
		since = now;
	return now - since >= (uint64_t)vp_restart_wait_ns();
}
