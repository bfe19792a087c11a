/* Error codes of the C core, as text. */
#include <string.h>
#include "vp.h"

static const char *const vp_errors[] = {
	[VP_EHEAD - VP_EBASE] = "available head out of range",
	[VP_ENEXT - VP_EBASE] = "descriptor next out of range",
	[VP_ELOOP - VP_EBASE] = "descriptor chain longer than the queue (loop)",
	[VP_EADDR - VP_EBASE] = "buffer outside guest memory",
	[VP_EZEROLEN - VP_EBASE] = "zero-length buffer",
	[VP_EORDER - VP_EBASE] = "readable buffer after a writable one",
	[VP_EAVAIL - VP_EBASE] = "avail index more than the queue size ahead",
	[VP_EINFLIGHT - VP_EBASE] = "head already in flight",
	[VP_EINDIRECT - VP_EBASE] = "indirect descriptor not negotiated",
	[VP_EBROKEN - VP_EBASE] = "queue is broken",
	[VP_EUSEDID - VP_EBASE] = "used id was never made available",
	[VP_ENOTINFLIGHT - VP_EBASE] = "head is not in flight",
	[VP_EMAGIC - VP_EBASE] = "not a virtio_py region of this version",
	[VP_ELAYOUT - VP_EBASE] = "region header describes an impossible layout",
	[VP_ESEGMAX - VP_EBASE] = "chain has more segments than allowed",
	[VP_EDEVGONE - VP_EBASE] = "the device process is gone",
	[VP_EFRAME - VP_EBASE] = "virtio-blk request without header or status",
};

const char *vp_strerror(int code)
{
	if (code < 0)
		code = -code;
	if (code > VP_EBASE && code <= VP_ELAST)
		return vp_errors[code - VP_EBASE];
	return strerror(code);
}
