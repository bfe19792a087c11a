/* Process liveness: the one check every part of the project uses.
 *
 * A zombie counts as gone: an orphaned daemon killed with SIGKILL may never
 * be reaped (PID 1 need not reap), yet kill(pid, 0) still finds it.  Pids
 * are reused, so a caller that must know it still talks to the same process
 * compares the start time it recorded with vp_pid_starttime's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vp.h"

/* Read /proc/PID/stat and return what follows "(comm) ": "S ppid ...".
 * comm may hold any byte, ')' included, so the text starts after the last
 * ')'.  Returns 0, -ESRCH if there is no such process, or another -errno. */
static int read_stat(int32_t pid, char *buf, size_t size, char **rest)
{
	char path[32];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	ssize_t n;
	do
		n = read(fd, buf, size - 1);
	while (n < 0 && errno == EINTR);
	int e = errno;
	close(fd);
	if (n < 0)
		return e == ESRCH ? -ESRCH : -e;
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	if (!p || p[1] != ' ' || !p[2])
		return -EPROTO;
	*rest = p + 2;
	return 0;
}

int vp_pid_gone(int32_t pid)
{
	if (pid <= 0 || (kill(pid, 0) && errno == ESRCH))
		return 1;
	char buf[1024], *s;
	int r = read_stat(pid, buf, sizeof(buf), &s);
	if (r == -ESRCH)
		return 1;
	/* Unreadable for another reason: it exists, as kill() said. */
	return !r && (s[0] == 'Z' || s[0] == 'X');
}

int vp_pid_starttime(int32_t pid, uint64_t *start)
{
	if (pid <= 0)
		return -ESRCH;
	/* The line is at most a few hundred bytes; comm is 16 at most. */
	char buf[4096], *s;
	int r = read_stat(pid, buf, sizeof(buf), &s);
	if (r)
		return r;
	/* s is field 3 (state); starttime is field 22, 19 fields on. */
	for (int field = 3; field < 22; field++) {
		s = strchr(s, ' ');
		if (!s)
			return -EPROTO;
		s++;
	}
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (end == s || errno || (*end != ' ' && *end != '\n' && *end))
		return -EPROTO;
	*start = v;
	return 0;
}
