/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The primary's NBD link to its secondary, on libnbd's asynchronous API.
 *
 * libnbd runs its state machine only when we call it: after every command
 * we queue (it sends what the socket takes) and when the loop reports the
 * socket readable or writable (nbd_aio_notify_read/write).  Its completion
 * callbacks run inside those calls with the handle locked, so they only
 * move our request to the "done" list; the owner's callbacks run afterwards,
 * from link_process(), where calling libnbd (or closing the link) is safe.
 *
 * Bounded waits: requests are kept in submission order, all with the same
 * timeout, so one timer armed for the oldest deadline is enough.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <libnbd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "replica-link.h"
#include "tdr/log.h"

/* Without the server's block size constraints, 32 MiB is what the NBD protocol promises. */
#define DEFAULT_MAX_PAYLOAD (32u << 20)
/* Zeroing carries no payload, but keep each command's length well inside 32 bits. */
#define MAX_ZERO_LEN (1u << 30)

enum link_state {
	LINK_CONNECTING,
	LINK_READY,
	LINK_DEAD,
};

enum link_op {
	LOP_WRITE,
	LOP_ZERO,
	LOP_FLUSH,
};

/* Per NBD command: which link request it belongs to, for the error message. */
struct link_piece {
	struct replica_link_req *lr;
	enum link_op op;
	uint64_t off, len;
};

struct replica_link {
	struct tdr_loop *loop;
	struct nbd_handle *h;
	enum link_state state;
	char addr[256];
	char export_name[256];
	uint64_t timeout_ns;
	uint64_t expect_size;
	uint64_t connect_deadline_ns;
	uint64_t max_payload;
	bool can_flush, can_zero;

	struct replica_link_cbs cbs;
	void *cbs_arg;

	struct tdr_fd_watch watch;
	bool watching;
	uint32_t watch_events;
	struct tdr_timer timer;
	struct tdr_defer defer;

	struct tdr_list pending;	/* submission order: the head is the oldest */
	struct tdr_list done;		/* completed, owner not told yet */
	unsigned npending;

	/* The first failure; the link is abandoned at the next link_process(). */
	int fail_err;
	char fail_msg[512];
	/*
	 * The first error a command reported.  It yields to a connection error
	 * seen in the same notify call: when the connection dies libnbd fails
	 * every command with ENOTCONN, which says less than why it died.
	 */
	int cmd_err;
	char cmd_msg[512];

	bool processing;		/* inside link_process(): defer frees */
	bool close_requested;

	struct replica_link_stats stats;
};

static void link_process(struct replica_link *l);

static const char *op_name(enum link_op op)
{
	switch (op) {
	case LOP_WRITE:
		return "write";
	case LOP_ZERO:
		return "write-zeroes";
	case LOP_FLUSH:
		return "flush";
	}
	return "request";
}

/* Records the first failure and makes sure link_process() runs soon. */
static void link_fail(struct replica_link *l, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void link_fail(struct replica_link *l, int err, const char *fmt, ...)
{
	va_list ap;

	if (!l->fail_err) {
		l->fail_err = err < 0 ? err : -EIO;
		va_start(ap, fmt);
		vsnprintf(l->fail_msg, sizeof(l->fail_msg), fmt, ap);
		va_end(ap);
	}
	tdr_loop_defer(l->loop, &l->defer);
}

/* libnbd's error for the call that just failed, as -errno (never 0). */
static int nbd_err(void)
{
	int e = nbd_get_errno();

	return e > 0 ? -e : -EIO;
}

static const char *nbd_msg(void)
{
	const char *m = nbd_get_error();

	return m ? m : "unknown libnbd error";
}

/* -------------------------------------------------------- addresses */

/*
 * Only numeric addresses: getaddrinfo() on a name may block the loop for
 * seconds.  "localhost" is the one name we know without asking.
 */
static int parse_addr(const char *addr, struct sockaddr_storage *ss, socklen_t *len,
		      char *msg, size_t msglen)
{
	memset(ss, 0, sizeof(*ss));
	if (strncmp(addr, "unix:", 5) == 0) {
		struct sockaddr_un *sun = (struct sockaddr_un *)ss;
		const char *path = addr + 5;

		if (!*path || strlen(path) >= sizeof(sun->sun_path)) {
			snprintf(msg, msglen, "addr=%s: a UNIX socket path must have 1 to %zu bytes",
				 addr, sizeof(sun->sun_path) - 1);
			return -EINVAL;
		}
		sun->sun_family = AF_UNIX;
		memcpy(sun->sun_path, path, strlen(path) + 1);
		*len = (socklen_t)sizeof(*sun);
		return 0;
	}
	if (strncmp(addr, "tcp:", 4) == 0) {
		char host[128];
		const char *h = addr + 4, *colon = strrchr(h, ':');
		char *end;
		unsigned long port;
		size_t hl;

		if (!colon || colon == h)
			goto bad_tcp;
		hl = (size_t)(colon - h);
		if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
			h++;
			hl -= 2;
		}
		if (hl == 0 || hl >= sizeof(host))
			goto bad_tcp;
		memcpy(host, h, hl);
		host[hl] = '\0';
		errno = 0;
		port = strtoul(colon + 1, &end, 10);
		if (errno || *end || !colon[1] || port == 0 || port > 65535)
			goto bad_tcp;
		if (strcmp(host, "localhost") == 0)
			strcpy(host, "127.0.0.1");
		{
			struct sockaddr_in *sin = (struct sockaddr_in *)ss;
			struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

			if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
				sin->sin_family = AF_INET;
				sin->sin_port = htons((uint16_t)port);
				*len = (socklen_t)sizeof(*sin);
				return 0;
			}
			if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
				sin6->sin6_family = AF_INET6;
				sin6->sin6_port = htons((uint16_t)port);
				*len = (socklen_t)sizeof(*sin6);
				return 0;
			}
		}
		snprintf(msg, msglen, "addr=%s: '%s' is not a numeric IPv4 or IPv6 address; give the secondary's address, not a host name (a name lookup would stall the disk)",
			 addr, host);
		return -EINVAL;
bad_tcp:
		snprintf(msg, msglen, "addr=%s: expected tcp:HOST:PORT with a numeric HOST and a port from 1 to 65535",
			 addr);
		return -EINVAL;
	}
	snprintf(msg, msglen, "addr=%s: expected tcp:HOST:PORT or unix:PATH", addr);
	return -EINVAL;
}

/* ------------------------------------------------------ event plumbing */

static void link_update_watch(struct replica_link *l)
{
	uint32_t ev = 0;
	int dir;

	if (!l->h || !l->watching)
		return;
	dir = nbd_aio_get_direction(l->h);
	if (dir & LIBNBD_AIO_DIRECTION_READ)
		ev |= EPOLLIN;
	if (dir & LIBNBD_AIO_DIRECTION_WRITE)
		ev |= EPOLLOUT;
	if (ev != l->watch_events) {
		if (tdr_loop_update_fd(&l->watch, ev) < 0)
			link_fail(l, -EIO, "cannot watch the link's socket");
		else
			l->watch_events = ev;
	}
}

static void link_arm_timer(struct replica_link *l)
{
	uint64_t deadline = 0, now = tdr_now_ns();
	struct replica_link_req *head;

	if (l->state == LINK_CONNECTING)
		deadline = l->connect_deadline_ns;
	else if (l->state == LINK_READY && (head = tdr_list_first(&l->pending, struct replica_link_req, entry)))
		deadline = head->deadline_ns;
	if (!deadline) {
		tdr_timer_cancel(&l->timer);
		return;
	}
	tdr_timer_arm(&l->timer, deadline > now ? deadline - now : 0);
}

/* The handshake finished: check that this export can be our secondary. */
static void link_check_ready(struct replica_link *l)
{
	int64_t size, max;

	size = nbd_get_size(l->h);
	if (size < 0) {
		link_fail(l, nbd_err(), "cannot read the export's size: %s", nbd_msg());
		return;
	}
	if ((uint64_t)size != l->expect_size) {
		link_fail(l, -EINVAL,
			  "export '%s' has %" PRId64 " bytes but the local disk has %" PRIu64 " bytes; the secondary disk must have exactly the primary's size",
			  l->export_name, size, l->expect_size);
		return;
	}
	if (nbd_is_read_only(l->h) == 1) {
		link_fail(l, -EROFS, "export '%s' is read-only; the secondary must accept writes",
			  l->export_name);
		return;
	}
	l->can_flush = nbd_can_flush(l->h) == 1;
	l->can_zero = nbd_can_zero(l->h) == 1;
	max = nbd_get_block_size(l->h, LIBNBD_SIZE_MAXIMUM);
	l->max_payload = max > 0 && (uint64_t)max < DEFAULT_MAX_PAYLOAD ? (uint64_t)max
								  : DEFAULT_MAX_PAYLOAD;
	l->state = LINK_READY;
	TDR_INFO("replica link: connected to %s export '%s' (%" PRId64 " bytes%s%s)", l->addr,
		 l->export_name, size, l->can_flush ? ", flush" : "", l->can_zero ? ", zero" : "");
	if (l->cbs.connected)
		l->cbs.connected(l->cbs_arg, 0, "");
}

static void link_on_fd(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct replica_link *l = arg;
	int dir, r = 0;

	(void)w;
	if (!l->h || l->fail_err)
		goto out;
	dir = nbd_aio_get_direction(l->h);
	/* Both ready: reading first, as libnbd advises (a reply may change what to write). */
	if ((dir & LIBNBD_AIO_DIRECTION_READ) && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		r = nbd_aio_notify_read(l->h);
	else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)))
		r = nbd_aio_notify_write(l->h);
	if (r == -1 || nbd_aio_is_dead(l->h) == 1 || nbd_aio_is_closed(l->h) == 1) {
		/* libnbd gives no errno for a server breaking the protocol. */
		int err = r == -1 ? (nbd_get_errno() > 0 ? -nbd_get_errno() : -EPROTO) : -ECONNRESET;
		const char *m = r == -1 ? nbd_msg() : "the connection was closed";

		if (l->state == LINK_CONNECTING)
			link_fail(l, err, "NBD handshake failed: %s", m);
		else
			link_fail(l, err, "connection lost: %s", m);
		goto out;
	}
	if (l->state == LINK_CONNECTING && nbd_aio_is_ready(l->h) == 1)
		link_check_ready(l);
out:
	link_process(l);
}

static void link_on_timer(struct tdr_timer *t, void *arg)
{
	struct replica_link *l = arg;
	uint64_t now = tdr_now_ns();
	struct replica_link_req *head;

	(void)t;
	if (l->state == LINK_CONNECTING && now >= l->connect_deadline_ns) {
		link_fail(l, -ETIMEDOUT, "no NBD handshake within %" PRIu64 " ms",
			  l->timeout_ns / 1000000);
	} else if (l->state == LINK_READY &&
		   (head = tdr_list_first(&l->pending, struct replica_link_req, entry)) &&
		   now >= head->deadline_ns) {
		link_fail(l, -ETIMEDOUT, "the secondary did not answer within %" PRIu64 " ms (%u request%s pending)",
			  l->timeout_ns / 1000000, l->npending, l->npending == 1 ? "" : "s");
	}
	link_process(l);
}

static void link_on_defer(void *arg)
{
	link_process(arg);
}

/* ------------------------------------------------------ completion */

static void req_finish(struct replica_link *l, struct replica_link_req *lr, int err)
{
	if (lr->queued_done)
		return;
	if (err && !lr->err)
		lr->err = err;
	lr->queued_done = true;
	tdr_list_del(&lr->entry);
	l->npending--;
	tdr_list_add_tail(&lr->entry, &l->done);
}

/* libnbd's completion callback: runs with the handle locked, so only bookkeeping. */
static int piece_done(void *user_data, int *error)
{
	struct link_piece *p = user_data;
	struct replica_link_req *lr = p->lr;
	struct replica_link *l = lr->link;

	if (*error) {
		int err = -*error;

		if (!l->cmd_err) {
			l->cmd_err = err;
			snprintf(l->cmd_msg, sizeof(l->cmd_msg),
				 "the secondary failed a %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
				 op_name(p->op), p->len, p->off, strerror(*error));
		}
		if (!lr->err)
			lr->err = err;
		tdr_loop_defer(l->loop, &l->defer);
	}
	if (lr->pieces && --lr->pieces == 0)
		req_finish(l, lr, 0);
	return 1;	/* retire the command: we never ask for it again */
}

/*
 * Stops talking to the server at once.  nbd_close() frees the commands
 * (their completion callbacks do not run; the free callbacks do) and
 * closes the socket without sending anything, so a frozen peer cannot
 * hold us up.
 */
static void link_abandon(struct replica_link *l, int err)
{
	struct tdr_list *pos, *tmp;

	if (l->watching) {
		tdr_loop_unwatch_fd(&l->watch);
		l->watching = false;
	}
	tdr_timer_cancel(&l->timer);
	if (l->h) {
		nbd_close(l->h);
		l->h = NULL;
	}
	l->state = LINK_DEAD;
	tdr_list_for_each_safe(pos, tmp, &l->pending) {
		struct replica_link_req *lr = tdr_list_entry(pos, struct replica_link_req, entry);

		lr->pieces = 0;
		req_finish(l, lr, err);
	}
}

static void link_free(struct replica_link *l)
{
	tdr_loop_cancel_defer(l->loop, &l->defer);
	tdr_timer_cancel(&l->timer);
	free(l);
}

static void link_run_done(struct replica_link *l)
{
	struct replica_link_req *lr;

	while ((lr = tdr_list_first(&l->done, struct replica_link_req, entry))) {
		tdr_list_del(&lr->entry);
		lr->done(lr, lr->err);
	}
}

/* Where the owner's callbacks run: never inside libnbd, never inside a submission. */
static void link_process(struct replica_link *l)
{
	if (l->processing)
		return;
	l->processing = true;
	if (l->cmd_err && !l->fail_err)
		link_fail(l, l->cmd_err, "%s", l->cmd_msg);
	if (l->fail_err && l->state != LINK_DEAD && !l->close_requested) {
		enum link_state was = l->state;

		link_abandon(l, l->fail_err);
		if (was == LINK_READY) {
			TDR_WARN("replica link to %s: %s", l->addr, l->fail_msg);
			if (l->cbs.broken)
				l->cbs.broken(l->cbs_arg, l->fail_err, l->fail_msg);
		} else if (l->cbs.connected) {
			l->cbs.connected(l->cbs_arg, l->fail_err, l->fail_msg);
		}
	}
	link_run_done(l);
	if (l->close_requested) {
		link_abandon(l, -ECANCELED);
		link_run_done(l);
		link_free(l);
		return;
	}
	l->processing = false;
	link_update_watch(l);
	link_arm_timer(l);
}

/* ------------------------------------------------------ public */

int replica_link_open(struct replica_link **out, struct tdr_loop *loop,
		      const struct replica_link_config *cfg, const struct replica_link_cbs *cbs,
		      void *arg, char *msg, size_t msglen)
{
	struct replica_link *l = NULL;
	struct sockaddr_storage ss;
	socklen_t sslen = 0;
	int err, fd;

	*out = NULL;
	err = parse_addr(cfg->addr, &ss, &sslen, msg, msglen);
	if (err < 0)
		return err;
	if (strlen(cfg->addr) >= sizeof(l->addr) || strlen(cfg->export_name) >= sizeof(l->export_name)) {
		snprintf(msg, msglen, "address or export name too long");
		return -ENAMETOOLONG;
	}
	l = calloc(1, sizeof(*l));
	if (!l) {
		snprintf(msg, msglen, "out of memory");
		return -ENOMEM;
	}
	l->loop = loop;
	strcpy(l->addr, cfg->addr);
	strcpy(l->export_name, cfg->export_name);
	l->timeout_ns = (uint64_t)cfg->timeout_ms * 1000000u;
	l->expect_size = cfg->expect_size;
	l->max_payload = DEFAULT_MAX_PAYLOAD;
	l->cbs = *cbs;
	l->cbs_arg = arg;
	l->state = LINK_CONNECTING;
	tdr_list_init(&l->pending);
	tdr_list_init(&l->done);
	tdr_timer_init(&l->timer, loop, link_on_timer, l);
	tdr_defer_init(&l->defer, link_on_defer, l);

	l->h = nbd_create();
	if (!l->h) {
		err = nbd_err();
		snprintf(msg, msglen, "cannot create an NBD handle: %s", nbd_msg());
		goto fail;
	}
	if (nbd_set_export_name(l->h, cfg->export_name) == -1 ||
	    nbd_set_request_structured_replies(l->h, true) == -1 ||
	    nbd_set_request_block_size(l->h, true) == -1) {
		err = nbd_err();
		snprintf(msg, msglen, "cannot configure the NBD handle: %s", nbd_msg());
		goto fail;
	}
	l->connect_deadline_ns = tdr_now_ns() + l->timeout_ns;
	if (nbd_aio_connect(l->h, (struct sockaddr *)&ss, sslen) == -1) {
		/* An immediate refusal: report it from the loop, like any other. */
		link_fail(l, nbd_err(), "cannot connect: %s", nbd_msg());
		*out = l;
		return 0;
	}
	fd = nbd_aio_get_fd(l->h);
	if (fd < 0) {
		link_fail(l, nbd_err(), "no socket after connecting: %s", nbd_msg());
		*out = l;
		return 0;
	}
	err = tdr_loop_watch_fd(loop, &l->watch, fd, 0, link_on_fd, l);
	if (err < 0) {
		snprintf(msg, msglen, "cannot watch the link's socket: %s", strerror(-err));
		goto fail;
	}
	l->watching = true;
	l->watch_events = 0;
	link_update_watch(l);
	link_arm_timer(l);
	*out = l;
	return 0;

fail:
	if (l->h)
		nbd_close(l->h);
	link_free(l);
	return err;
}

void replica_link_close(struct replica_link *l)
{
	if (!l)
		return;
	l->close_requested = true;
	if (l->processing)
		return;		/* link_process() finishes the job */
	l->processing = true;
	link_abandon(l, -ECANCELED);
	link_run_done(l);
	link_free(l);
}

bool replica_link_ready(const struct replica_link *l)
{
	return l && l->state == LINK_READY && !l->fail_err && !l->close_requested;
}

unsigned replica_link_inflight(const struct replica_link *l)
{
	return l ? l->npending : 0;
}

const struct replica_link_stats *replica_link_get_stats(const struct replica_link *l)
{
	return &l->stats;
}

bool replica_link_can_flush(const struct replica_link *l)
{
	return l->can_flush;
}

bool replica_link_can_zero(const struct replica_link *l)
{
	return l->can_zero;
}

static void req_begin(struct replica_link *l, struct replica_link_req *lr,
		      replica_link_done_fn done, void *arg)
{
	memset(lr, 0, sizeof(*lr));
	lr->link = l;
	lr->done = done;
	lr->arg = arg;
	lr->deadline_ns = tdr_now_ns() + l->timeout_ns;
	/* Held until req_end: a piece completing early must not finish lr. */
	lr->pieces = 1;
	tdr_list_add_tail(&lr->entry, &l->pending);
	l->npending++;
}

/* After queuing pieces: finish a request that got none, kick the loop. */
static void req_end(struct replica_link *l, struct replica_link_req *lr)
{
	if (lr->pieces && --lr->pieces == 0)
		req_finish(l, lr, 0);
	if (!tdr_list_empty(&l->done) || l->fail_err)
		tdr_loop_defer(l->loop, &l->defer);
	if (!l->processing) {
		link_update_watch(l);
		if (l->npending == 1)
			link_arm_timer(l);
	}
}

/* Queues one NBD command of lr; false if the link cannot take it. */
static bool issue_piece(struct replica_link *l, struct replica_link_req *lr, enum link_op op,
			const void *buf, uint64_t len, uint64_t off, bool no_hole)
{
	struct link_piece *p;
	int64_t cookie;

	if (l->state != LINK_READY || l->fail_err || l->close_requested) {
		if (!lr->err)
			lr->err = l->fail_err ? l->fail_err : -ENOTCONN;
		return false;
	}
	p = malloc(sizeof(*p));
	if (!p) {
		/* Without memory the secondary misses this write: that is a broken link. */
		link_fail(l, -ENOMEM, "out of memory queuing a %s", op_name(op));
		lr->err = -ENOMEM;
		return false;
	}
	p->lr = lr;
	p->op = op;
	p->off = off;
	p->len = len;
	lr->pieces++;
	nbd_completion_callback cb = { .callback = piece_done, .user_data = p, .free = free };

	switch (op) {
	case LOP_WRITE:
		cookie = nbd_aio_pwrite(l->h, buf, len, off, cb, 0);
		break;
	case LOP_ZERO:
		cookie = nbd_aio_zero(l->h, len, off, cb, no_hole ? LIBNBD_CMD_FLAG_NO_HOLE : 0);
		break;
	default:
		cookie = nbd_aio_flush(l->h, cb, 0);
		break;
	}
	if (cookie == -1) {
		/* The free callback has run; the completion callback has not. */
		int err = nbd_err();

		lr->pieces--;
		link_fail(l, err, "cannot queue a %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
			  op_name(op), len, off, nbd_msg());
		if (!lr->err)
			lr->err = err;
		return false;
	}
	return true;
}

void replica_link_pwrite(struct replica_link *l, struct replica_link_req *lr, const void *buf,
			 uint64_t len, uint64_t off, replica_link_done_fn done, void *arg)
{
	req_begin(l, lr, done, arg);
	for (uint64_t pos = 0; pos < len;) {
		uint64_t n = len - pos < l->max_payload ? len - pos : l->max_payload;

		if (!issue_piece(l, lr, LOP_WRITE, (const char *)buf + pos, n, off + pos, false))
			break;
		l->stats.write_cmds++;
		l->stats.write_bytes += n;
		pos += n;
	}
	req_end(l, lr);
}

void replica_link_zero(struct replica_link *l, struct replica_link_req *lr, uint64_t len,
		       uint64_t off, bool no_hole, replica_link_done_fn done, void *arg)
{
	req_begin(l, lr, done, arg);
	for (uint64_t pos = 0; pos < len;) {
		uint64_t n = len - pos < MAX_ZERO_LEN ? len - pos : MAX_ZERO_LEN;

		if (!issue_piece(l, lr, LOP_ZERO, NULL, n, off + pos, no_hole))
			break;
		l->stats.zero_cmds++;
		l->stats.zero_bytes += n;
		pos += n;
	}
	req_end(l, lr);
}

void replica_link_flush(struct replica_link *l, struct replica_link_req *lr,
			replica_link_done_fn done, void *arg)
{
	req_begin(l, lr, done, arg);
	if (l->state == LINK_READY && l->can_flush) {
		if (issue_piece(l, lr, LOP_FLUSH, NULL, 0, 0, false))
			l->stats.flush_cmds++;
	} else if (l->state != LINK_READY || l->fail_err) {
		lr->err = l->fail_err ? l->fail_err : -ENOTCONN;
	}
	req_end(l, lr);
}
