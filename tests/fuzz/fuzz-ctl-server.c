/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: the control server fed a client's byte stream.
 *
 * The input is everything a tap-ctl (or tdr-ctl) client sends: fixed-size
 * control messages (include/tdr/ctl-message.h), any trailers, and whatever
 * garbage the fuzzer makes of them, written into one end of a socketpair
 * whose other end the server serves (ctl_server_add_connection()), then
 * closed for writing.  The server starts with two minors:
 *   0  "mem:", an in-memory disk (fuzz-mem.c) with a guest of its own
 *      that keeps 4 reads in flight, so that PAUSE, CLOSE and
 *      FORCE_SHUTDOWN meet requests to drain and to hold;
 *   1  "replica:mode=primary,addr=unix:NOWHERE|mem:", a primary in state
 *      none whose secondary does not exist, for the replica requests
 *      (start fails to connect, status, get-error, checkpoint, ...).
 * OPEN opens "mem:" images, alone or under a replica filter (with a
 * unix: address; nothing else, so that no input can open a real file or
 * reach the network); any other spec is refused by the open hook with a
 * message, as the daemon refuses a spec it cannot open.
 *
 * Besides what the sanitizers catch, the harness traps when:
 *   - a message the server sends is not a response, an ERROR carries no
 *     error number or no NUL-terminated text, a STATS reply announces
 *     nothing or more than 1 MiB, or its JSON is not one object (one
 *     minor) or array (all of them) from its first byte to its last;
 *   - the connection is still open 5 s (of loop time) after the input
 *     ended, a disk the input closed is not closed 5 s after that, or a
 *     reply was cut in the middle;
 *   - the open hook is asked for a minor that already has a disk, or the
 *     close hook for a disk it did not open or twice;
 *   - the guest's reads do not all come back within 5 s of the server's
 *     shutdown (which releases what a PAUSE held).
 *
 * Built by tests/fuzz/run-fuzz.sh, seeded from tests/fuzz/corpus-ctl
 * (tests/fuzz/make-corpus.py writes it).
 */
#include "config.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tdr/ctl-message.h"
#include "tdr/ctl-server.h"
#include "tdr/image.h"
#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "fuzz-mem.h"
#include "fuzz-peer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NMINORS   16		/* minors the open hook hands out: 0..15 */
#define GUEST_QD  4
#define STATS_MAX (1u << 20)
#define NOWHERE   "unix:/nonexistent/tdr-fuzz-secondary.sock"

/*
 * A guest on a minor: GUEST_QD reads, each sent again (from the loop, not
 * from inside its completion) when it returns.
 */
struct guest {
	struct td_disk *disk;
	struct tdr_loop *loop;
	struct tdr_defer kick;
	bool stopped;
	unsigned inflight;
	bool busy[GUEST_QD];
	struct td_request req[GUEST_QD];
	char buf[GUEST_QD][4096];
};

struct fminor {
	struct td_disk *disk;
	struct guest *guest;
	struct td_quiesce quiesce;
	struct tdr_defer fin;
	ctl_done_fn done;
	void *done_arg;
	bool closing;
};

struct harness {
	struct tdr_loop *loop;
	struct tdr_io_ctx *io;
	struct fminor m[NMINORS];
	/* The response stream, parsed as it comes. */
	unsigned char msg[TDR_CTL_MSG_SIZE];
	size_t msg_len;
	uint64_t skip;		/* JSON bytes of a STATS reply still to come */
	bool json_first;	/* the next JSON byte is the first */
	char json_open, json_close;	/* '{' '}' for a minor, '[' ']' for all */
};

static struct harness H;

static void guest_done(struct td_request *req, int err, void *arg)
{
	struct guest *g = arg;

	(void)err;
	g->inflight--;
	g->busy[req - g->req] = false;
	if (!g->stopped)
		tdr_loop_defer(g->loop, &g->kick);
}

static void guest_kick(void *arg)
{
	static uint64_t next;
	struct guest *g = arg;

	for (unsigned i = 0; i < GUEST_QD && !g->stopped; i++) {
		if (g->busy[i])
			continue;
		/* Sectors walk the disk: some reads fail, some finish at once. */
		td_request_init(&g->req[i], TD_OP_READ, next++ % (FUZZ_MEM_SIZE / 512 - 8), 8,
				g->buf[i], guest_done, g);
		g->busy[i] = true;
		g->inflight++;
		td_disk_submit(g->disk, &g->req[i]);
	}
}

static struct guest *guest_start(struct td_disk *disk)
{
	struct guest *g = calloc(1, sizeof(*g));

	if (!g)
		__builtin_trap();
	g->disk = disk;
	g->loop = H.loop;
	tdr_defer_init(&g->kick, guest_kick, g);
	guest_kick(g);
	return g;
}

static void guest_free(struct guest *g)
{
	if (!g)
		return;
	if (g->inflight)
		__builtin_trap();	/* a read never came back */
	tdr_loop_cancel_defer(g->loop, &g->kick);
	free(g);
}

/* ------------------------------------------------------------ the hooks */

static void fminor_finish(void *arg);

/* Only in-memory disks: "mem:" alone or under replica filters with unix: addresses. */
static bool spec_allowed(const char *spec)
{
	size_t n = strlen(spec);

	if (strcmp(spec, "mem:") == 0)
		return true;
	return strncmp(spec, "replica:", 8) == 0 && n > 5 && strcmp(spec + n - 5, "|mem:") == 0 &&
	       !strstr(spec, "tcp:") && !strstr(spec, "vhd:") && !strstr(spec, "aio:") &&
	       !strstr(spec, "mode=secondary");
}

static int hook_open(void *arg, int minor, const char *spec, unsigned flags,
		     struct td_disk **out, char *msg, size_t msglen)
{
	struct harness *h = arg;
	int ret;

	if (minor < 0 || minor >= NMINORS) {
		snprintf(msg, msglen, "minor %d out of the harness's range", minor);
		return -ERANGE;
	}
	if (h->m[minor].disk)
		__builtin_trap();	/* the server opened a minor it already has */
	if (!spec_allowed(spec)) {
		snprintf(msg, msglen, "%s: the fuzz harness opens only in-memory disks", spec);
		return -ENOENT;
	}
	ret = td_disk_open(out, spec, flags | TD_OPEN_QUIET, h->loop, h->io);
	if (ret < 0) {
		snprintf(msg, msglen, "%s: cannot open: %s", spec, tdr_last_error());
		return ret;
	}
	h->m[minor].disk = *out;
	tdr_defer_init(&h->m[minor].fin, fminor_finish, &h->m[minor]);
	return 0;
}

static void fminor_finish(void *arg)
{
	struct fminor *m = arg;
	ctl_done_fn done = m->done;
	void *done_arg = m->done_arg;

	td_disk_close(m->disk);
	m->disk = NULL;
	m->closing = false;
	guest_free(m->guest);
	m->guest = NULL;
	if (done)
		done(done_arg, 0, "");
}

static void fminor_quiesced(struct td_disk *disk, void *arg)
{
	struct fminor *m = arg;

	(void)disk;
	/* Not from inside the disk's own callback. */
	tdr_loop_defer(H.loop, &m->fin);
}

static void fminor_close(struct fminor *m, ctl_done_fn done, void *done_arg)
{
	m->closing = true;
	m->done = done;
	m->done_arg = done_arg;
	if (m->guest)
		m->guest->stopped = true;
	td_disk_quiesce(m->disk, &m->quiesce, fminor_quiesced, m);
}

static void hook_close(void *arg, int minor, struct td_disk *disk, ctl_done_fn done,
		       void *done_arg)
{
	struct harness *h = arg;
	struct fminor *m;

	if (minor < 0 || minor >= NMINORS || h->m[minor].disk != disk)
		__builtin_trap();	/* the server closed a disk it was not given */
	m = &h->m[minor];
	if (m->closing)
		__builtin_trap();	/* closed twice */
	fminor_close(m, done, done_arg);
}

/* ------------------------------------------------------------ the responses */

static void check_message(struct harness *h, const struct tdr_ctl_msg *m)
{
	if (!tdr_ctl_msg_is_response(m->type))
		__builtin_trap();
	switch (m->type) {
	case TAPDISK_MESSAGE_ERROR:
		if (m->u.response.error <= 0 || !m->u.response.message[0] ||
		    !tdr_ctl_string_ok(m->u.response.message, sizeof(m->u.response.message)))
			__builtin_trap();
		break;
	case TDR_MESSAGE_REPLICA_RSP:
		if (m->u.response.error < 0 ||
		    !tdr_ctl_string_ok(m->u.response.message, sizeof(m->u.response.message)))
			__builtin_trap();
		break;
	case TDR_MESSAGE_REPLICA_DATA:
		if (!tdr_ctl_string_ok(m->u.string.text, sizeof(m->u.string.text)))
			__builtin_trap();
		break;
	case TAPDISK_MESSAGE_LIST_RSP:
		if (!tdr_ctl_string_ok(m->u.list.path, sizeof(m->u.list.path)))
			__builtin_trap();
		break;
	case TAPDISK_MESSAGE_STATS_RSP:
		if (m->u.info.length == 0 || m->u.info.length > STATS_MAX)
			__builtin_trap();
		h->skip = m->u.info.length;
		h->json_first = true;
		h->json_open = m->cookie == TDR_CTL_COOKIE_NONE ? '[' : '{';
		h->json_close = m->cookie == TDR_CTL_COOKIE_NONE ? ']' : '}';
		break;
	}
}

static void on_data(void *arg, const unsigned char *buf, size_t n)
{
	struct harness *h = arg;

	while (n) {
		if (h->skip) {
			size_t k = n < h->skip ? n : (size_t)h->skip;

			if (h->json_first && buf[0] != h->json_open)
				__builtin_trap();
			h->json_first = false;
			h->skip -= k;
			if (!h->skip && buf[k - 1] != h->json_close)
				__builtin_trap();
			buf += k;
			n -= k;
			continue;
		}
		size_t k = TDR_CTL_MSG_SIZE - h->msg_len;

		if (k > n)
			k = n;
		memcpy(h->msg + h->msg_len, buf, k);
		h->msg_len += k;
		buf += k;
		n -= k;
		if (h->msg_len == TDR_CTL_MSG_SIZE) {
			struct tdr_ctl_msg m;

			memcpy(&m, h->msg, sizeof(m));
			h->msg_len = 0;
			check_message(h, &m);
		}
	}
}

/* ------------------------------------------------------------ one input */

static void run_until(bool (*cond)(struct ctl_server *, struct fuzz_peer *),
		      struct ctl_server *srv, struct fuzz_peer *p)
{
	uint64_t deadline = tdr_now_ns() + 5000000000ull;

	while (!cond(srv, p)) {
		if (tdr_now_ns() > deadline || tdr_loop_run_once(H.loop, 100) < 0)
			__builtin_trap();
	}
}

static bool input_out(struct ctl_server *srv, struct fuzz_peer *p)
{
	(void)srv;
	return p->sent == p->size || p->eof;
}

static bool conn_gone(struct ctl_server *srv, struct fuzz_peer *p)
{
	return !ctl_server_connections(srv) && p->eof;
}

/* No minor left closing; minors the input paused are paused for good. */
static bool settled(struct ctl_server *srv, struct fuzz_peer *p)
{
	(void)srv;
	(void)p;
	for (int i = 0; i < NMINORS; i++)
		if (H.m[i].closing)
			return false;
	return true;
}

static bool guests_idle(struct ctl_server *srv, struct fuzz_peer *p)
{
	(void)srv;
	(void)p;
	for (int i = 0; i < NMINORS; i++)
		if (H.m[i].guest && H.m[i].guest->inflight)
			return false;
	return true;
}

static void open_minor(struct ctl_server *srv, int minor, const char *spec, bool guest)
{
	char msg[256];
	struct td_disk *disk;

	if (hook_open(&H, minor, spec, 0, &disk, msg, sizeof(msg)) < 0 ||
	    ctl_server_add_minor(srv, minor, disk, spec) < 0)
		__builtin_trap();
	if (guest)
		H.m[minor].guest = guest_start(disk);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct ctl_hooks hooks = { .open = hook_open, .close = hook_close, .arg = &H };
	struct ctl_server *srv;
	struct fuzz_peer c;
	int sv[2];

	if (!H.loop) {
		tdr_log_init("fuzz-ctl-server", false, TDR_LOG_ERR);
		if (td_driver_register(&fuzz_mem_driver) < 0)
			__builtin_trap();
		H.loop = tdr_loop_new();
		H.io = H.loop ? tdr_io_ctx_new(H.loop, 64) : NULL;
		if (!H.io)
			__builtin_trap();
	}
	H.msg_len = 0;
	H.skip = 0;
	srv = ctl_server_new(H.loop, NULL);
	if (!srv)
		__builtin_trap();
	ctl_server_set_hooks(srv, &hooks);
	open_minor(srv, 0, "mem:", true);
	open_minor(srv, 1, "replica:mode=primary,addr=" NOWHERE "|mem:", false);

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		__builtin_trap();
	if (ctl_server_add_connection(srv, sv[0]) < 0 ||
	    fuzz_peer_start(&c, H.loop, sv[1], data, size, size) < 0)
		__builtin_trap();
	c.on_data = on_data;
	c.on_data_arg = &H;

	/* The input is sent; the server answers it and closes after the EOF. */
	run_until(input_out, srv, &c);
	run_until(conn_gone, srv, &c);
	run_until(settled, srv, &c);
	/* A reply cut in the middle is a server that stopped mid-message. */
	if (H.msg_len || H.skip)
		__builtin_trap();
	fuzz_peer_stop(&c);

	/* Tear down as the daemon does: the server first (held requests go back). */
	ctl_server_shutdown(srv);
	for (int i = 0; i < NMINORS; i++)
		if (H.m[i].guest)
			H.m[i].guest->stopped = true;
	run_until(guests_idle, srv, &c);
	for (int i = 0; i < NMINORS; i++) {
		if (!H.m[i].disk)
			continue;
		if (ctl_server_remove_minor(srv, i) < 0)
			__builtin_trap();
		fminor_close(&H.m[i], NULL, NULL);
	}
	run_until(settled, srv, &c);
	ctl_server_free(srv);
	return 0;
}
