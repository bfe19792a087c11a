/* Crash points (crashpoint.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include "crashpoint.h"
#include "vp.h"

int vp_crash_at;
int vp_crash_watching;
static uint32_t crash_left;
static uint64_t *crash_died, *watch_died;
static uint64_t resumed;

static const char *const names[VP_CRASH_NPOINTS] = {
	[VP_CRASH_NONE] = "none",
	[VP_CRASH_ADD_BEGIN] = "add_begin",
	[VP_CRASH_ADD_DESC] = "add_desc",
	[VP_CRASH_ADD_FREE] = "add_free",
	[VP_CRASH_ADD_TOKEN] = "add_token",
	[VP_CRASH_ADD_RING] = "add_ring",
	[VP_CRASH_ADD_PUBLISH] = "add_publish",
	[VP_CRASH_ADD_END] = "add_end",
	[VP_CRASH_KICK] = "kick",
	[VP_CRASH_GETBUF_INTENT] = "getbuf_intent",
	[VP_CRASH_GETBUF_DETACH] = "getbuf_detach",
	[VP_CRASH_GETBUF_DETACHED] = "getbuf_detached",
	[VP_CRASH_GETBUF_USED] = "getbuf_used",
	[VP_CRASH_DELIVER_LEN] = "deliver_len",
	[VP_CRASH_DELIVER_DONE] = "deliver_done",
	[VP_CRASH_DELIVER_COUNT] = "deliver_count",
	[VP_CRASH_DELIVER_WOKEN] = "deliver_woken",
};

const char *vp_crash_point_name(int p)
{
	return p >= 0 && p < VP_CRASH_NPOINTS ? names[p] : NULL;
}

int vp_crash_arm(int p, uint32_t n, uint64_t *died)
{
	if (p <= VP_CRASH_NONE || p >= VP_CRASH_NPOINTS || n == 0)
		return -EINVAL;
	crash_left = n;
	crash_died = died;
	__atomic_store_n(&vp_crash_at, p, __ATOMIC_RELEASE);
	return 0;
}

void vp_crash_hit(void)
{
	if (__atomic_sub_fetch(&crash_left, 1, __ATOMIC_ACQ_REL) != 0)
		return;
	if (crash_died)
		__atomic_store_n(crash_died, vp_now_ns(), __ATOMIC_SEQ_CST);
	raise(SIGKILL);
	for (;;)
		;                       /* SIGKILL cannot be caught: never here */
}

void vp_crash_watch(uint64_t *died)
{
	watch_died = died;
	__atomic_store_n(&vp_crash_watching, died != NULL, __ATOMIC_RELEASE);
}

void vp_crash_note_acquire(void)
{
	if (!__atomic_load_n(watch_died, __ATOMIC_ACQUIRE))
		return;
	uint64_t zero = 0;
	__atomic_compare_exchange_n(&resumed, &zero, vp_now_ns(), 0,
				    __ATOMIC_RELAXED, __ATOMIC_RELAXED);
	__atomic_store_n(&vp_crash_watching, 0, __ATOMIC_RELAXED);
}

uint64_t vp_crash_resumed_ns(void)
{
	return __atomic_load_n(&resumed, __ATOMIC_RELAXED);
}
