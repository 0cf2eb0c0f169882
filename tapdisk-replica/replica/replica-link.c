/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The primary's NBD link to its secondary: the part common to both
 * clients (replica-link-int.h).  It keeps the requests in submission
 * order, each with its deadline, splits them into NBD commands, turns any
 * failure into a broken link and runs the owner's callbacks, always from
 * link_process(): never inside a client's callback, never inside a
 * submission.
 *
 * Bounded waits: requests are kept in submission order, all with the same
 * timeout, so one timer armed for the oldest deadline is enough.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "replica-link-int.h"
#include "tdr/log.h"

/* Zeroing carries no payload, but keep each command's length well inside 32 bits. */
#define MAX_ZERO_LEN (1u << 30)

static void link_process(struct replica_link *l);
static void link_on_fd(struct tdr_fd_watch *w, uint32_t events, void *arg);

const char *link_op_name(enum link_op op)
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
void link_fail(struct replica_link *l, int err, const char *fmt, ...)
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
	uint32_t ev;

	if (!l->watching)
		return;
	ev = l->ops->events(l);
	if (ev != l->watch_events) {
		if (tdr_loop_update_fd(&l->watch, ev) < 0)
			link_fail(l, -EIO, "cannot watch the link's socket");
		else
			l->watch_events = ev;
	}
}

void link_watch_fd(struct replica_link *l, int fd)
{
	int err = tdr_loop_watch_fd(l->loop, &l->watch, fd, 0, link_on_fd, l);

	if (err < 0) {
		link_fail(l, err, "cannot watch the link's socket: %s", strerror(-err));
		return;
	}
	l->watching = true;
	l->watch_events = 0;
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
void link_handshake_done(struct replica_link *l, const struct link_export_info *info)
{
	if (info->size != l->expect_size) {
		link_fail(l, -EINVAL,
			  "export '%s' has %" PRIu64 " bytes but the local disk has %" PRIu64 " bytes; the secondary disk must have exactly the primary's size",
			  l->export_name, info->size, l->expect_size);
		return;
	}
	if (info->read_only) {
		link_fail(l, -EROFS, "export '%s' is read-only; the secondary must accept writes",
			  l->export_name);
		return;
	}
	l->can_flush = info->can_flush;
	l->can_zero = info->can_zero;
	l->tls_negotiated = info->tls;
	l->max_payload = info->max_payload && info->max_payload < LINK_DEFAULT_MAX_PAYLOAD
				 ? info->max_payload : LINK_DEFAULT_MAX_PAYLOAD;
	l->state = LINK_READY;
	l->announce = true;	/* from link_process(), outside the client */
	tdr_loop_defer(l->loop, &l->defer);
	TDR_INFO("replica link: connected to %s export '%s' (%" PRIu64 " bytes%s%s%s, %s client)",
		 l->addr, l->export_name, info->size, l->can_flush ? ", flush" : "",
		 l->can_zero ? ", zero" : "", info->tls ? ", TLS" : "", l->ops->name);
}

static void link_on_fd(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct replica_link *l = arg;

	(void)w;
	if (!l->fail_err)
		l->ops->on_fd(l, events);
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

void link_piece_done(struct link_piece *p, int err)
{
	struct replica_link_req *lr = p->lr;
	struct replica_link *l = lr->link;

	if (err) {
		if (!l->cmd_err) {
			l->cmd_err = -err;
			snprintf(l->cmd_msg, sizeof(l->cmd_msg),
				 "the secondary failed a %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
				 link_op_name(p->op), p->len, p->off, strerror(err));
		}
		if (!lr->err)
			lr->err = -err;
		tdr_loop_defer(l->loop, &l->defer);
	}
	if (lr->pieces && --lr->pieces == 0)
		req_finish(l, lr, 0);
}

/* Stops talking to the server at once: a frozen peer cannot hold us up. */
static void link_abandon(struct replica_link *l, int err)
{
	struct tdr_list *pos, *tmp;

	if (l->watching) {
		tdr_loop_unwatch_fd(&l->watch);
		l->watching = false;
	}
	tdr_timer_cancel(&l->timer);
	l->ops->close(l);
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
	free(l->tls_psk);
	free(l->tls_certificates);
	free(l->tls_username);
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

/* Where the owner's callbacks run: never inside a client, never inside a submission. */
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
		if (was == LINK_READY && !l->announce) {
			TDR_WARN("replica link to %s: %s", l->addr, l->fail_msg);
			if (l->cbs.broken)
				l->cbs.broken(l->cbs_arg, l->fail_err, l->fail_msg);
		} else if (l->cbs.connected) {
			l->cbs.connected(l->cbs_arg, l->fail_err, l->fail_msg);
		}
		l->announce = false;
	}
	if (l->announce && !l->close_requested) {
		l->announce = false;
		if (l->cbs.connected)
			l->cbs.connected(l->cbs_arg, 0, "");
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

/* *dst = a copy of src, or NULL for NULL or "".  False when out of memory. */
static bool link_dup_opt(char **dst, const char *src)
{
	*dst = NULL;
	if (!src || !*src)
		return true;
	*dst = strdup(src);
	return *dst != NULL;
}

int replica_link_open(struct replica_link **out, struct tdr_loop *loop,
		      const struct replica_link_config *cfg, const struct replica_link_cbs *cbs,
		      void *arg, char *msg, size_t msglen)
{
	struct replica_link *l = NULL;
	struct sockaddr_storage ss;
	socklen_t sslen = 0;
	int err;

	*out = NULL;
	err = parse_addr(cfg->addr, &ss, &sslen, msg, msglen);
	if (err < 0)
		return err;
	if (strlen(cfg->addr) >= sizeof(l->addr) || strlen(cfg->export_name) >= sizeof(l->export_name)) {
		snprintf(msg, msglen, "address or export name too long");
		return -ENAMETOOLONG;
	}
	if (cfg->tls != NBD_TLS_OFF && cfg->client != REPLICA_LINK_LIBNBD) {
		snprintf(msg, msglen, "TLS needs client=libnbd: the native client has no TLS");
		return -EINVAL;
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
	l->max_payload = LINK_DEFAULT_MAX_PAYLOAD;
	l->no_zerocopy = cfg->no_zerocopy;
	l->cbs = *cbs;
	l->cbs_arg = arg;
	l->state = LINK_CONNECTING;
	tdr_list_init(&l->pending);
	tdr_list_init(&l->done);
	tdr_timer_init(&l->timer, loop, link_on_timer, l);
	tdr_defer_init(&l->defer, link_on_defer, l);
	l->tls = cfg->tls;
	l->tls_no_verify = cfg->tls_no_verify;
	if (!link_dup_opt(&l->tls_psk, cfg->tls_psk) ||
	    !link_dup_opt(&l->tls_certificates, cfg->tls_certificates) ||
	    !link_dup_opt(&l->tls_username, cfg->tls_username)) {
		link_free(l);
		snprintf(msg, msglen, "out of memory");
		return -ENOMEM;
	}

	l->ops = cfg->client == REPLICA_LINK_LIBNBD ? &link_libnbd_ops : &link_native_ops;
	l->connect_deadline_ns = tdr_now_ns() + l->timeout_ns;
	err = l->ops->open(l, (const struct sockaddr *)&ss, sslen, msg, msglen);
	if (err < 0) {
		l->ops->close(l);
		link_free(l);
		return err;
	}
	link_update_watch(l);
	link_arm_timer(l);
	*out = l;
	return 0;
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

bool replica_link_tls(const struct replica_link *l)
{
	return l->tls_negotiated;
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

	if (l->state != LINK_READY || l->fail_err || l->close_requested) {
		if (!lr->err)
			lr->err = l->fail_err ? l->fail_err : -ENOTCONN;
		return false;
	}
	p = malloc(sizeof(*p));
	if (!p) {
		/* Without memory the secondary misses this write: that is a broken link. */
		link_fail(l, -ENOMEM, "out of memory queuing a %s", link_op_name(op));
		lr->err = -ENOMEM;
		return false;
	}
	*p = (struct link_piece){ .lr = lr, .op = op, .off = off, .len = len, .buf = buf,
				  .no_hole = no_hole };
	lr->pieces++;
	if (!l->ops->queue(l, p)) {
		/* p is gone and will not complete; the client called link_fail(). */
		lr->pieces--;
		if (!lr->err)
			lr->err = l->fail_err ? l->fail_err : -EIO;
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
