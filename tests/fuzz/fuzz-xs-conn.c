/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: the daemon's xenstore client (xs-conn.c) fed any byte
 * stream as xenstored's side of the connection.
 *
 * The harness listens on a UNIX socket as xenstored would, lets the client
 * connect, and from the connected callback queues four requests (read,
 * write, directory and watch: request ids 1-4).  Then the input goes out
 * as xenstored's replies and watch events, and the socket is closed for
 * writing.  What the client sends is read and thrown away.
 *
 * Besides what the sanitizers catch, the harness traps when:
 *   - connected comes twice, or a request's reply callback runs twice;
 *   - a reply's payload is not NUL-terminated at data[len], or an error
 *     reply is not a negative errno;
 *   - after the connection ends (disconnected), a request never got its
 *     reply or -ECONNRESET;
 *   - 5 s (of loop time) after the input ended, the client has not noticed
 *     the end of the connection.
 * FUZZ_VERBOSE=1 in the environment prints each input's outcome.
 *
 * Built by tests/fuzz/run-fuzz.sh, seeded from tests/fuzz/corpus-xs
 * (tests/fuzz/make-corpus.py writes it).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "tdr/log.h"
#include "tdr/loop.h"
#include "xs-conn.h"
#include "fuzz-peer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NREQS 4

struct harness {
	struct xs_conn *c;
	int connected, disconnected, events;
	int replies[NREQS];
	int err[NREQS];
	bool queued;
};

static struct harness h;

static void on_reply(void *arg, int err, const char *data, size_t len)
{
	int i = (int)(intptr_t)arg;

	if (i < 0 || i >= NREQS || h.replies[i]++)
		__builtin_trap();
	if (err > 0 || !data || data[len] != '\0')
		__builtin_trap();
	h.err[i] = err;
}

static void on_connected(void *arg)
{
	(void)arg;
	if (h.connected++)
		__builtin_trap();
	if (xs_conn_read(h.c, "/fuzz/a", on_reply, (void *)(intptr_t)0) < 0 ||
	    xs_conn_write(h.c, "/fuzz/b", "value", on_reply, (void *)(intptr_t)1) < 0 ||
	    xs_conn_directory(h.c, "/fuzz", on_reply, (void *)(intptr_t)2) < 0 ||
	    xs_conn_watch(h.c, "/fuzz/d", "token", on_reply, (void *)(intptr_t)3) < 0)
		__builtin_trap();
	h.queued = true;
}

static void on_disconnected(void *arg, int err)
{
	(void)arg;
	if (!h.connected || err >= 0)
		__builtin_trap();
	h.disconnected++;
}

static void on_watch_event(void *arg, const char *path, const char *token)
{
	(void)arg;
	/* Both are strings the client must have terminated. */
	if (!path || !token || strlen(path) > 4096 || strlen(token) > 4096)
		__builtin_trap();
	h.events++;
}

static const struct xs_conn_ops ops = { on_connected, on_disconnected, on_watch_event };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct tdr_loop *loop;
	static int lfd = -1;
	static char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct fuzz_peer s;
	int fd;
	uint64_t deadline;

	if (!loop) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		tdr_log_init("fuzz-xs-conn", false, TDR_LOG_ERR);
		loop = tdr_loop_new();
		snprintf(path, sizeof(path), "/tmp/fuzz-xs-conn.%d", (int)getpid());
		unlink(path);
		strcpy(sa.sun_path, path);
		lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (!loop || lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
		    listen(lfd, 4) < 0)
			__builtin_trap();
	}
	memset(&h, 0, sizeof(h));
	h.c = xs_conn_new(loop, path, &ops, NULL);
	if (!h.c)
		__builtin_trap();
	/* The client connects from its first timer: run until it has. */
	deadline = tdr_now_ns() + 5000000000ull;
	while (!h.connected) {
		if (tdr_loop_run_once(loop, 10) < 0 || tdr_now_ns() > deadline)
			__builtin_trap();
	}
	fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0 || fuzz_peer_start(&s, loop, fd, data, size, size) < 0)
		__builtin_trap();
	deadline = 0;
	while (!h.disconnected) {
		if (tdr_loop_run_once(loop, 10) < 0)
			__builtin_trap();
		if (s.sent == s.size && !deadline)
			deadline = tdr_now_ns() + 5000000000ull;
		if (deadline && tdr_now_ns() > deadline)
			__builtin_trap();
	}
	/* Every request got its answer: a reply, an error or -ECONNRESET. */
	for (int i = 0; i < NREQS; i++)
		if (h.replies[i] != 1)
			__builtin_trap();
	if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "replies err %d %d %d %d, watch events %d\n", h.err[0], h.err[1],
			h.err[2], h.err[3], h.events);
	xs_conn_free(h.c);
	fuzz_peer_stop(&s);
	return 0;
}
