/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Blocking client side of the control protocol, for tdr-ctl and the tests.
 * Never linked into the daemon's paths: it waits with poll().
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "tdr/ctl-message.h"

const char *tdr_ctl_dir(void)
{
	const char *d = getenv("TDR_CONTROL_DIR");

	return d && *d ? d : BLKTAP_CONTROL_DIR;
}

int tdr_ctl_socket_path(char *buf, size_t len, const char *dir, long pid)
{
	int n = snprintf(buf, len, "%s/" BLKTAP_CONTROL_SOCKET "%ld", dir, pid);

	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int tdr_ctl_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, err;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	return fd;
}

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for events on fd until the deadline (-1: none); 0, -ETIMEDOUT or -errno. */
static int wait_fd(int fd, short events, long long deadline)
{
	struct pollfd p = { .fd = fd, .events = events };
	int r, timeout;

	for (;;) {
		timeout = -1;
		if (deadline >= 0) {
			long long left = deadline - now_ms();

			if (left <= 0)
				return -ETIMEDOUT;
			timeout = left > 1000000 ? 1000000 : (int)left;
		}
		r = poll(&p, 1, timeout);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -errno;
	}
}

int tdr_ctl_send(int fd, const struct tdr_ctl_msg *msg, int timeout_ms)
{
	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	const char *p = (const char *)msg;
	size_t off = 0;
	int r;

	while (off < sizeof(*msg)) {
		ssize_t n = send(fd, p + off, sizeof(*msg) - off, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return -errno;
		r = wait_fd(fd, POLLOUT, deadline);
		if (r < 0)
			return r;
	}
	return 0;
}

int tdr_ctl_recv_raw(int fd, void *buf, size_t len, int timeout_ms)
{
	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	size_t off = 0;
	int r;

	while (off < len) {
		ssize_t n = recv(fd, (char *)buf + off, len - off, MSG_DONTWAIT);

		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n == 0)
			return -EPIPE;
		if (errno != EAGAIN && errno != EINTR)
			return -errno;
		r = wait_fd(fd, POLLIN, deadline);
		if (r < 0)
			return r;
	}
	return 0;
}

int tdr_ctl_recv(int fd, struct tdr_ctl_msg *msg, int timeout_ms)
{
	return tdr_ctl_recv_raw(fd, msg, sizeof(*msg), timeout_ms);
}
