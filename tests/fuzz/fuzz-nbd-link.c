/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: the primary's link (its own NBD client,
 * replica-link-native.c) fed a secondary's byte stream.
 *
 * Input: a 2-byte big-endian length H, then the server's bytes.  The first
 * H of them (all of them if H is larger) go out at once: greeting and
 * option replies.  If the link reports itself connected, the harness
 * queues four commands (a 4 KiB write, a write-zeroes, a flush and a
 * 64 KiB write, in slots 0-3, cookies 0-3).  When the loop has nothing
 * left to do (the link sent its commands, or failed, or waits for more),
 * the rest goes out: the replies.  Then the server side closes for
 * writing, and what the client sent is read and thrown away throughout.
 *
 * Besides what the sanitizers catch, the harness traps when:
 *   - connected is reported more than once, or a command's done runs
 *     more than once, or broken comes without a connected success;
 *   - a link reports success for an export of the wrong size;
 *   - 5 s (of loop time) after the input ended, the link has not
 *     completed every command (the link's own timeout is 2 s), or the
 *     handshake part has kept the loop busy for 10 s.
 * FUZZ_VERBOSE=1 in the environment prints each input's outcome.
 *
 * Built by tests/fuzz/run-fuzz.sh, seeded from tests/fuzz/corpus-link
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
#include "replica-link.h"
#include "fuzz-peer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EXPORT_SIZE (1u << 20)
#define NCMDS 4

struct harness {
	struct replica_link *l;
	int connected;			/* calls of connected */
	int conn_err;
	int broken;
	struct replica_link_req req[NCMDS];
	int done[NCMDS];
	int err[NCMDS];
	unsigned queued;
	char wbuf[65536];
};

static void cmd_done(struct replica_link_req *lr, int err)
{
	struct harness *h = lr->arg;
	unsigned i = (unsigned)(lr - h->req);

	if (i >= NCMDS || h->done[i]++)
		__builtin_trap();
	h->err[i] = err;
}

static void on_connected(void *arg, int err, const char *msg)
{
	struct harness *h = arg;

	(void)msg;
	if (h->connected++)
		__builtin_trap();
	h->conn_err = err;
	if (err)
		return;
	for (unsigned i = 0; i < NCMDS; i++)
		h->req[i].arg = h;
	replica_link_pwrite(h->l, &h->req[0], h->wbuf, 4096, 0, cmd_done, h);
	replica_link_zero(h->l, &h->req[1], 4096, 4096, true, cmd_done, h);
	replica_link_flush(h->l, &h->req[2], cmd_done, h);
	replica_link_pwrite(h->l, &h->req[3], h->wbuf, 65536, 8192, cmd_done, h);
	h->queued = NCMDS;
}

static void on_broken(void *arg, int err, const char *msg)
{
	struct harness *h = arg;

	(void)err;
	(void)msg;
	if (h->broken++ || h->connected != 1 || h->conn_err)
		__builtin_trap();
}

static bool all_done(const struct harness *h)
{
	for (unsigned i = 0; i < h->queued; i++)
		if (!h->done[i])
			return false;
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct tdr_loop *loop;
	static int lfd = -1;
	static char addr[sizeof(((struct sockaddr_un *)0)->sun_path) + 8];
	struct replica_link_cbs cbs = { on_connected, on_broken };
	struct replica_link_config cfg = {
		.export_name = "", .timeout_ms = 2000, .expect_size = EXPORT_SIZE,
		.client = REPLICA_LINK_NATIVE,
	};
	static struct harness h;
	struct fuzz_peer s;
	int fd;
	char msg[256];
	uint64_t deadline;
	bool phase2 = false;
	size_t head;

	if (size < 2)
		return 0;
	head = (size_t)data[0] << 8 | data[1];
	data += 2;
	size -= 2;
	if (!loop) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		tdr_log_init("fuzz-nbd-link", false, TDR_LOG_ERR);
		loop = tdr_loop_new();
		snprintf(sa.sun_path, sizeof(sa.sun_path), "/tmp/fuzz-nbd-link.%d", (int)getpid());
		unlink(sa.sun_path);
		lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (!loop || lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
		    listen(lfd, 4) < 0)
			__builtin_trap();
		snprintf(addr, sizeof(addr), "unix:%s", sa.sun_path);
	}
	memset(&h, 0, sizeof(h));
	cfg.addr = addr;
	if (replica_link_open(&h.l, loop, &cfg, &cbs, &h, msg, sizeof(msg)) < 0)
		__builtin_trap();
	/* connect() to a listening UNIX socket completes at once: accept it. */
	fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0 || fuzz_peer_start(&s, loop, fd, data, size, head) < 0)
		__builtin_trap();

	deadline = tdr_now_ns() + 10000000000ull;
	for (;;) {
		int n = tdr_loop_run_once(loop, s.limit < s.size ? 0 : 10);

		if (n < 0 || (!phase2 && tdr_now_ns() > deadline))
			__builtin_trap();
		if (s.limit < s.size) {
			/*
			 * The handshake part is out.  Send the rest once nothing
			 * moves any more (a loop turn with nothing to do): the link
			 * has failed, waits for more, or is connected with its
			 * commands sent.
			 */
			if (n == 0)
				fuzz_peer_send_all(&s);
			continue;
		}
		if (!phase2) {
			phase2 = true;
			deadline = tdr_now_ns() + 5000000000ull;
		}
		if (h.connected && (h.conn_err || h.broken) && all_done(&h))
			break;
		if (tdr_now_ns() > deadline) {
			/* Nothing failed yet: every command answered, or a hang. */
			if (h.connected && !h.conn_err && all_done(&h))
				break;
			__builtin_trap();
		}
	}
	if (h.connected && !h.conn_err && !h.broken) {
		/* A success: the size matched, the answers completed everything. */
		if (!replica_link_ready(h.l))
			__builtin_trap();
	}
	if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "connected %d (err %d), broken %d, commands done %d %d %d %d "
			"(err %d %d %d %d), sent %zu of %zu\n", h.connected, h.conn_err, h.broken,
			h.done[0], h.done[1], h.done[2], h.done[3], h.err[0], h.err[1], h.err[2],
			h.err[3], s.sent, s.size);
	replica_link_close(h.l);
	fuzz_peer_stop(&s);
	/* Let anything the close deferred run. */
	tdr_loop_run_once(loop, 0);
	return 0;
}
