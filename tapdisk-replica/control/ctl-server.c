/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The control server (include/tdr/ctl-server.h): the socket, connections,
 * message framing and the blktap requests.  JSON statistics are in
 * ctl-stats.c, the replica requests in ctl-replica.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl-int.h"
#include "tdr/log.h"

#define CTL_MAX_CONNS      64
#define CTL_BACKLOG        32
/* Like blktap's TD_CTL_RECV_TIMEOUT / TD_CTL_SEND_TIMEOUT. */
#define CTL_IO_TIMEOUT_NS  (10ull * 1000000000ull)
/* How often a pause or close looks whether the disk has drained. */
#define CTL_DRAIN_POLL_NS  (1ull * 1000000ull)
#define CTL_ACCEPT_RETRY_NS (100ull * 1000000ull)
/* Stop reading requests while this much output waits for the client. */
#define CTL_OUT_HIGH       (256u << 10)

/* ------------------------------------------------------------ hold filter */

/*
 * While a minor is paused or closing, this filter sits on top of its disk
 * and queues every request that enters (they are already counted in flight
 * by td_disk_submit).  Releasing re-queues them at the real top in arrival
 * order, exactly where td_disk_submit would have put them.
 */
static void hold_queue(struct td_image *img, struct td_request *req)
{
	struct ctl_minor *m = img->priv;

	tdr_list_add_tail(&req->entry, &m->held);
	m->nheld++;
}

static int hold_open(struct td_image *img, const char *params, unsigned flags)
{
	/* Never opened from a spec: the server inserts it itself. */
	tdr_set_error("ctl-hold is internal to the control server and cannot be named in a spec");
	return -EINVAL;
}

static void hold_close(struct td_image *img)
{
}

const struct td_driver ctl_hold_driver = {
	.name = "ctl-hold",
	.is_filter = true,
	.open = hold_open,
	.close = hold_close,
	.queue_read = hold_queue,
	.queue_write = hold_queue,
	.queue_flush = hold_queue,
	.queue_discard = hold_queue,
	.queue_block_status = hold_queue,
};

static void hold_insert(struct ctl_minor *m)
{
	struct td_disk *disk = m->disk;
	struct td_image *h = &m->hold;

	if (!disk || m->holding)
		return;
	memset(h, 0, sizeof(*h));
	h->drv = &ctl_hold_driver;
	h->params = m->hold_name;
	h->flags = disk->flags;
	h->size_secs = disk->size_secs;
	h->info_discard = disk->top->info_discard;
	h->parent = disk->top;
	h->disk = disk;
	h->loop = disk->loop;
	h->io = disk->io;
	h->priv = m;
	disk->top->child = h;
	disk->top = h;
	m->holding = true;
}

/* Takes the filter out; the held requests go down (err 0) or fail (err < 0). */
static void hold_release(struct ctl_minor *m, int err)
{
	struct td_disk *disk = m->disk;
	struct tdr_list list, *pos, *tmp;

	if (!m->holding)
		return;
	disk->top = m->hold.parent;
	disk->top->child = NULL;
	m->holding = false;

	/* Detach the queue first: completions may submit new requests. */
	tdr_list_init(&list);
	if (!tdr_list_empty(&m->held)) {
		list.next = m->held.next;
		list.prev = m->held.prev;
		list.next->prev = &list;
		list.prev->next = &list;
		tdr_list_init(&m->held);
	}
	m->nheld = 0;
	tdr_list_for_each_safe(pos, tmp, &list) {
		struct td_request *req = tdr_list_entry(pos, struct td_request, entry);

		tdr_list_del(&req->entry);
		if (err)
			td_complete_request(req, err);
		else
			td_queue_request(disk->top, req);
	}
}

/* ------------------------------------------------------------ minors */

struct ctl_minor *ctl_minor_find(const struct ctl_server *srv, unsigned minor)
{
	struct tdr_list *pos;

	for (pos = srv->minors.next; pos != &srv->minors; pos = pos->next) {
		struct ctl_minor *m = tdr_list_entry(pos, struct ctl_minor, entry);

		if (m->minor == (int)minor)
			return m;
	}
	return NULL;
}

static void on_drain_timer(struct tdr_timer *t, void *arg);

static struct ctl_minor *minor_new(struct ctl_server *srv, int minor)
{
	struct ctl_minor *m = calloc(1, sizeof(*m));
	struct tdr_list *pos;

	if (!m)
		return NULL;
	m->srv = srv;
	m->minor = minor;
	m->state = CTL_MINOR_RUNNING;
	tdr_list_init(&m->held);
	tdr_list_init(&m->waiters);
	tdr_timer_init(&m->drain_timer, srv->loop, on_drain_timer, m);
	snprintf(m->hold_name, sizeof(m->hold_name), "minor %d", minor);
	/* Sorted by minor, so that LIST is stable. */
	for (pos = srv->minors.next; pos != &srv->minors; pos = pos->next)
		if (tdr_list_entry(pos, struct ctl_minor, entry)->minor > minor)
			break;
	tdr_list_add_tail(&m->entry, pos);
	return m;
}

static int minor_set_params(struct ctl_minor *m, const char *params)
{
	char *p = strdup(params ? params : "");

	if (!p)
		return -ENOMEM;
	free(m->params);
	m->params = p;
	return 0;
}

static void conn_wait_done(struct ctl_conn *c);

/* Answers every waiter of type (0: all) with an error. */
static void minor_fail_waiters(struct ctl_minor *m, unsigned type, int err, const char *why)
{
	struct tdr_list *pos, *tmp;

	tdr_list_for_each_safe(pos, tmp, &m->waiters) {
		struct ctl_conn *c = tdr_list_entry(pos, struct ctl_conn, wait_entry);
		struct tdr_ctl_msg rsp;

		if (type && c->req.type != type)
			continue;
		tdr_ctl_msg_error(&rsp, TAPDISK_MESSAGE_ERROR, c->req.cookie, err, "%s", why);
		ctl_conn_queue(c, &rsp, NULL, 0);
		conn_wait_done(c);
	}
}

/* Frees a minor; the disk is the caller's business. */
static void minor_free(struct ctl_minor *m)
{
	char why[96];

	snprintf(why, sizeof(why), "minor %d was removed from the control server", m->minor);
	minor_fail_waiters(m, 0, ENODEV, why);
	if (m->disk)
		hold_release(m, 0);
	if (m->close_ticket)
		m->close_ticket->m = NULL;
	tdr_timer_cancel(&m->drain_timer);
	tdr_list_del(&m->entry);
	free(m->params);
	free(m);
}

int ctl_minor_state_bits(const struct ctl_minor *m)
{
	switch (m->state) {
	case CTL_MINOR_PAUSING:
		return TDR_CTL_STATE_PAUSE_REQUESTED;
	case CTL_MINOR_PAUSED:
		return TDR_CTL_STATE_PAUSED;
	case CTL_MINOR_CLOSING:
		return TDR_CTL_STATE_SHUTDOWN_REQUESTED;
	case CTL_MINOR_RUNNING:
		break;
	}
	return m->disk ? 0 : TDR_CTL_STATE_CLOSED;
}

/* ------------------------------------------------------------ connections */

static void on_conn_event(struct tdr_fd_watch *w, uint32_t events, void *arg);
static void on_conn_timer(struct tdr_timer *t, void *arg);
static void on_conn_kick(void *arg);
static void conn_read(struct ctl_conn *c);

static void conn_destroy(struct ctl_conn *c)
{
	struct ctl_server *srv = c->srv;

	if (c->waiting_on)
		tdr_list_del(&c->wait_entry);
	if (c->rop)
		c->rop->conn = NULL;
	tdr_loop_unwatch_fd(&c->watch);
	tdr_timer_cancel(&c->timer);
	tdr_loop_cancel_defer(srv->loop, &c->kick);
	close(c->fd);
	tdr_list_del(&c->entry);
	srv->nconns--;
	free(c->out);
	free(c);
}

int ctl_conn_queue(struct ctl_conn *c, const struct tdr_ctl_msg *msg, const void *extra,
		   size_t extra_len)
{
	size_t need = c->out_len - c->out_off + sizeof(*msg) + extra_len;

	if (c->out_off) {
		memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
		c->out_len -= c->out_off;
		c->out_off = 0;
	}
	if (need > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		char *p;

		while (cap < need)
			cap *= 2;
		p = realloc(c->out, cap);
		if (!p) {
			/* A reply we cannot send breaks the framing: drop the client. */
			TDR_WARN("control: out of memory for a %s response; closing the connection",
				 tdr_ctl_msg_name(msg->type));
			c->dead = true;
			return -ENOMEM;
		}
		c->out = p;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, msg, sizeof(*msg));
	c->out_len += sizeof(*msg);
	if (extra_len) {
		memcpy(c->out + c->out_len, extra, extra_len);
		c->out_len += extra_len;
	}
	return 0;
}

void ctl_conn_error(struct ctl_conn *c, int err, const char *fmt, ...)
{
	struct tdr_ctl_msg rsp;
	va_list ap;

	tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_ERROR, c->req.cookie);
	rsp.u.response.error = err < 0 ? -err : err;
	va_start(ap, fmt);
	vsnprintf(rsp.u.response.message, sizeof(rsp.u.response.message), fmt, ap);
	va_end(ap);
	TDR_DEBUG("control: %s (cookie %u) refused: %s", tdr_ctl_msg_name(c->req.type),
		  c->req.cookie, rsp.u.response.message);
	ctl_conn_queue(c, &rsp, NULL, 0);
}

static void conn_flush(struct ctl_conn *c)
{
	while (!c->dead && c->out_off < c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n > 0) {
			c->out_off += (size_t)n;
			c->progress = true;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		/* The client went away; nobody is left to answer. */
		c->dead = true;
	}
	if (c->out_off == c->out_len)
		c->out_off = c->out_len = 0;
}

static bool conn_out_pending(const struct ctl_conn *c)
{
	return c->out_off < c->out_len;
}

/* Re-arms the watch and the timeout for the connection's state; may free it. */
static void conn_update(struct ctl_conn *c)
{
	uint32_t ev = 0;
	bool timed;

	if (c->dead || (c->closing && !conn_out_pending(c) && !c->busy)) {
		conn_destroy(c);
		return;
	}
	if (!c->busy && !c->closing && c->out_len - c->out_off < CTL_OUT_HIGH)
		ev |= EPOLLIN;
	if (conn_out_pending(c))
		ev |= EPOLLOUT;
	if (ev != c->watch.events && tdr_loop_update_fd(&c->watch, ev) < 0) {
		conn_destroy(c);
		return;
	}
	/* Only a client that is mid-message or not reading is on the clock. */
	timed = c->in_len || c->skip || conn_out_pending(c);
	if (!timed)
		tdr_timer_cancel(&c->timer);
	else if (c->progress || !tdr_timer_armed(&c->timer))
		tdr_timer_arm(&c->timer, CTL_IO_TIMEOUT_NS);
	c->progress = false;
}

static void on_conn_kick(void *arg)
{
	struct ctl_conn *c = arg;

	conn_flush(c);
	if (!c->busy && !c->closing)
		conn_read(c);
	conn_update(c);
}

void ctl_conn_kick(struct ctl_conn *c)
{
	/* Deferred: completions run deep inside other code (disk callbacks). */
	tdr_loop_defer(c->srv->loop, &c->kick);
}

static void conn_wait_done(struct ctl_conn *c)
{
	if (c->waiting_on) {
		tdr_list_del(&c->wait_entry);
		c->waiting_on = NULL;
	}
	c->busy = false;
	ctl_conn_kick(c);
}

static void conn_wait_on(struct ctl_conn *c, struct ctl_minor *m)
{
	tdr_list_add_tail(&c->wait_entry, &m->waiters);
	c->waiting_on = m;
	c->busy = true;
}

static void on_conn_timer(struct tdr_timer *t, void *arg)
{
	struct ctl_conn *c = arg;

	if (conn_out_pending(c)) {
		TDR_WARN("control: a client has not read its response for %llu s; closing the connection",
			 CTL_IO_TIMEOUT_NS / 1000000000ull);
		conn_destroy(c);
		return;
	}
	TDR_WARN("control: incomplete %s message (%zu of %zu bytes) for %llu s; closing the connection",
		 c->skip ? "trailer of a" : "", c->skip ? c->skip : c->in_len, TDR_CTL_MSG_SIZE,
		 CTL_IO_TIMEOUT_NS / 1000000000ull);
	ctl_conn_error(c, ETIMEDOUT,
		       "incomplete message: %zu of %zu bytes arrived in %llu s; is the client built for another version of tapdisk-message.h?",
		       c->in_len, TDR_CTL_MSG_SIZE, CTL_IO_TIMEOUT_NS / 1000000000ull);
	c->in_len = 0;
	c->skip = 0;
	c->closing = true;
	conn_flush(c);
	conn_update(c);
}

static bool needs_trailer(const struct tdr_ctl_msg *m)
{
	return (m->type == TAPDISK_MESSAGE_OPEN || m->type == TAPDISK_MESSAGE_RESUME) &&
	       (m->u.params.flags & TAPDISK_MESSAGE_FLAG_ADD_LOG);
}

/* Reads and serves messages until the socket is empty or a request waits. */
static void conn_read(struct ctl_conn *c)
{
	char scratch[TAPDISK_MESSAGE_MAX_PATH_LENGTH];

	while (!c->dead && !c->busy && !c->closing &&
	       c->out_len - c->out_off < CTL_OUT_HIGH) {
		ssize_t n;

		if (c->skip)
			n = recv(c->fd, scratch, c->skip < sizeof(scratch) ? c->skip : sizeof(scratch),
				 MSG_DONTWAIT);
		else
			n = recv(c->fd, (char *)&c->req + c->in_len, TDR_CTL_MSG_SIZE - c->in_len,
				 MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				c->dead = true;
			return;
		}
		if (n == 0) {
			if (c->in_len || c->skip) {
				ctl_conn_error(c, EPROTO,
					       "truncated message: the client closed its end after %zu of %zu bytes",
					       c->skip ? TDR_CTL_MSG_SIZE : c->in_len, TDR_CTL_MSG_SIZE);
				TDR_WARN("control: truncated message (%zu of %zu bytes)",
					 c->skip ? TDR_CTL_MSG_SIZE : c->in_len, TDR_CTL_MSG_SIZE);
			}
			c->in_len = 0;
			c->skip = 0;
			c->closing = true;
			conn_flush(c);
			return;
		}
		c->progress = true;
		if (c->skip) {
			c->skip -= (size_t)n;
			if (c->skip)
				continue;
		} else {
			c->in_len += (size_t)n;
			if (c->in_len < TDR_CTL_MSG_SIZE)
				continue;
			c->in_len = 0;
			if (needs_trailer(&c->req)) {
				/* tap-ctl -C: a log path follows; we have no log layer. */
				c->skip = TAPDISK_MESSAGE_MAX_PATH_LENGTH;
				continue;
			}
		}
		ctl_dispatch(c);
		conn_flush(c);
	}
}

static void on_conn_event(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct ctl_conn *c = arg;

	if (events & EPOLLOUT)
		conn_flush(c);
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
		if (!c->busy && !c->closing)
			conn_read(c);
		else if (events & (EPOLLHUP | EPOLLERR))
			/* Gone while we worked for it: its answer has nowhere to go. */
			c->dead = true;
	}
	conn_update(c);
}

int ctl_server_add_connection(struct ctl_server *srv, int fd)
{
	struct ctl_conn *c;
	int fl, err;

	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return -ENOMEM;
	}
	c->srv = srv;
	c->fd = fd;
	tdr_timer_init(&c->timer, srv->loop, on_conn_timer, c);
	tdr_defer_init(&c->kick, on_conn_kick, c);
	err = tdr_loop_watch_fd(srv->loop, &c->watch, fd, EPOLLIN, on_conn_event, c);
	if (err < 0) {
		close(fd);
		free(c);
		return err;
	}
	tdr_list_add_tail(&c->entry, &srv->conns);
	srv->nconns++;
	return 0;
}

unsigned ctl_server_connections(const struct ctl_server *srv)
{
	return srv->nconns;
}

/* ------------------------------------------------------------ listening */

static void on_accept(struct tdr_fd_watch *w, uint32_t events, void *arg);

static void on_accept_retry(struct tdr_timer *t, void *arg)
{
	struct ctl_server *srv = arg;

	if (!srv->shut && srv->lfd >= 0 && !srv->lwatch.active)
		tdr_loop_watch_fd(srv->loop, &srv->lwatch, srv->lfd, EPOLLIN, on_accept, srv);
}

static void on_accept(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct ctl_server *srv = arg;

	for (int i = 0; i < 16; i++) {
		int fd = accept4(srv->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				/* Level-triggered: pause accepting instead of spinning. */
				TDR_WARN("control: cannot accept a connection: %s; retrying shortly",
					 strerror(errno));
				tdr_loop_unwatch_fd(&srv->lwatch);
				tdr_timer_arm(&srv->accept_retry, CTL_ACCEPT_RETRY_NS);
			}
			return;
		}
		if (srv->nconns >= CTL_MAX_CONNS) {
			struct tdr_ctl_msg rsp;

			tdr_ctl_msg_error(&rsp, TAPDISK_MESSAGE_ERROR, TDR_CTL_COOKIE_NONE, EBUSY,
					  "too many control connections (%d); retry later", CTL_MAX_CONNS);
			/* Best effort: a fresh socket's buffer takes one message. */
			if (send(fd, &rsp, sizeof(rsp), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
				TDR_DEBUG("control: could not tell a client we are full: %s",
					  strerror(errno));
			close(fd);
			continue;
		}
		if (ctl_server_add_connection(srv, fd) < 0)
			TDR_WARN("control: cannot serve a new connection: out of resources");
	}
}

/* mkdir -p for the socket's parent directory. */
static int make_parent_dir(const char *path)
{
	char dir[PATH_MAX];
	char *slash;
	int ret = 0;

	if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	for (char *p = dir + 1; ; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char saved = *p;

		*p = '\0';
		if (mkdir(dir, 0755) < 0 && errno != EEXIST)
			ret = -errno;
		*p = saved;
		if (ret < 0 || saved == '\0')
			break;
	}
	return ret;
}

static int listen_unix(struct ctl_server *srv, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	mode_t old;
	int fd = -1, ret;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		tdr_set_error("control socket %s: path too long (at most %zu bytes); choose a shorter --control path",
			      path, sizeof(sa.sun_path) - 1);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	ret = make_parent_dir(path);
	if (ret < 0) {
		tdr_set_error("control socket %s: cannot create its directory: %s; create it or choose another --control path",
			      path, strerror(-ret));
		return ret;
	}
	if (lstat(path, &st) == 0) {
		int probe;

		if (!S_ISSOCK(st.st_mode)) {
			tdr_set_error("control socket %s: a file that is not a socket is in the way; remove it or choose another --control path",
				      path);
			return -EEXIST;
		}
		probe = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (probe < 0) {
			ret = -errno;
			tdr_set_error("control socket %s: cannot create a socket: %s; check system limits",
				      path, strerror(errno));
			return ret;
		}
		ret = connect(probe, (struct sockaddr *)&sa, sizeof(sa));
		if (ret == 0 || errno == EAGAIN || errno == EINPROGRESS) {
			close(probe);
			tdr_set_error("control socket %s is in use by a running daemon; stop it or choose another --control path",
				      path);
			return -EADDRINUSE;
		}
		close(probe);
		/* Nobody accepts: left over from a daemon that died. */
		if (unlink(path) < 0 && errno != ENOENT) {
			ret = -errno;
			tdr_set_error("control socket %s: cannot remove the stale socket: %s; remove it by hand",
				      path, strerror(errno));
			return ret;
		}
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	/* Mode 0600 from the start: no window where others could connect. */
	old = umask(0177);
	ret = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (ret < 0)
		goto fail;
	if (listen(fd, CTL_BACKLOG) < 0 || stat(path, &st) < 0)
		goto fail_unlink;
	srv->sock_dev = st.st_dev;
	srv->sock_ino = st.st_ino;
	ret = tdr_loop_watch_fd(srv->loop, &srv->lwatch, fd, EPOLLIN, on_accept, srv);
	if (ret < 0) {
		errno = -ret;
		goto fail_unlink;
	}
	srv->lfd = fd;
	return 0;

fail_unlink:
	ret = -errno;
	unlink(path);
	goto out;
fail:
	ret = -errno;
out:
	tdr_set_error("control socket %s: %s; check the directory's permissions or choose another --control path",
		      path, strerror(-ret));
	if (fd >= 0)
		close(fd);
	return ret;
}

struct ctl_server *ctl_server_new(struct tdr_loop *loop, const char *path)
{
	struct ctl_server *srv = calloc(1, sizeof(*srv));
	struct stat st;
	int ret;

	if (!srv) {
		tdr_set_error("out of memory creating the control server; free some memory");
		errno = ENOMEM;
		return NULL;
	}
	srv->loop = loop;
	srv->lfd = -1;
	tdr_list_init(&srv->minors);
	tdr_list_init(&srv->conns);
	tdr_list_init(&srv->rops);
	tdr_timer_init(&srv->accept_retry, loop, on_accept_retry, srv);
	if (!path)
		return srv;
	if (!*path) {
		ret = -EINVAL;
		tdr_set_error("empty control socket path; give a path such as " BLKTAP_CONTROL_DIR);
		goto fail;
	}
	if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
		ret = asprintf(&srv->path, "%s/" BLKTAP_CONTROL_SOCKET "%ld", path, (long)getpid());
	else
		ret = (srv->path = strdup(path)) ? 0 : -1;
	if (ret < 0) {
		srv->path = NULL;
		ret = -ENOMEM;
		tdr_set_error("out of memory creating the control server; free some memory");
		goto fail;
	}
	ret = listen_unix(srv, srv->path);
	if (ret < 0)
		goto fail;
	return srv;
fail:
	free(srv->path);
	free(srv);
	errno = -ret;
	return NULL;
}

void ctl_server_set_hooks(struct ctl_server *srv, const struct ctl_hooks *hooks)
{
	srv->hooks = *hooks;
}

const char *ctl_server_path(const struct ctl_server *srv)
{
	return srv->path ? srv->path : "";
}

static void stop_listening(struct ctl_server *srv)
{
	struct stat st;

	tdr_timer_cancel(&srv->accept_retry);
	if (srv->lfd < 0)
		return;
	tdr_loop_unwatch_fd(&srv->lwatch);
	close(srv->lfd);
	srv->lfd = -1;
	/* Only our own socket: another daemon may have replaced it since. */
	if (srv->path && lstat(srv->path, &st) == 0 && st.st_dev == srv->sock_dev &&
	    st.st_ino == srv->sock_ino)
		unlink(srv->path);
}

void ctl_server_shutdown(struct ctl_server *srv)
{
	struct tdr_list *pos;

	if (!srv)
		return;
	srv->shut = true;
	stop_listening(srv);
	for (pos = srv->minors.next; pos != &srv->minors; pos = pos->next) {
		struct ctl_minor *m = tdr_list_entry(pos, struct ctl_minor, entry);

		minor_fail_waiters(m, TAPDISK_MESSAGE_PAUSE, ESHUTDOWN,
				   "the daemon is shutting down; pause abandoned");
		if (m->state != CTL_MINOR_CLOSING) {
			tdr_timer_cancel(&m->drain_timer);
			hold_release(m, 0);
			m->state = CTL_MINOR_RUNNING;
		}
	}
}

void ctl_server_free(struct ctl_server *srv)
{
	struct tdr_list *pos, *tmp;

	if (!srv)
		return;
	stop_listening(srv);
	tdr_list_for_each_safe(pos, tmp, &srv->rops) {
		struct ctl_rop *r = tdr_list_entry(pos, struct ctl_rop, entry);

		/* Its completion may still come: let it free itself then. */
		tdr_list_del(&r->entry);
		r->srv = NULL;
		r->m = NULL;
		r->conn = NULL;
	}
	tdr_list_for_each_safe(pos, tmp, &srv->conns) {
		struct ctl_conn *c = tdr_list_entry(pos, struct ctl_conn, entry);

		c->rop = NULL;
		conn_flush(c);
		conn_destroy(c);
	}
	tdr_list_for_each_safe(pos, tmp, &srv->minors)
		minor_free(tdr_list_entry(pos, struct ctl_minor, entry));
	free(srv->path);
	free(srv);
}

/* ------------------------------------------------------------ minors API */

int ctl_server_add_minor(struct ctl_server *srv, int minor, struct td_disk *disk, const char *params)
{
	struct ctl_minor *m;

	if (minor < 0 || minor >= (int)TDR_CTL_COOKIE_NONE || !disk)
		return -EINVAL;
	if (ctl_minor_find(srv, (unsigned)minor))
		return -EEXIST;
	m = minor_new(srv, minor);
	if (!m)
		return -ENOMEM;
	if (minor_set_params(m, params) < 0) {
		minor_free(m);
		return -ENOMEM;
	}
	m->disk = disk;
	return 0;
}

int ctl_server_remove_minor(struct ctl_server *srv, int minor)
{
	struct ctl_minor *m = minor >= 0 ? ctl_minor_find(srv, (unsigned)minor) : NULL;

	struct tdr_list *pos;

	if (!m)
		return -ENOENT;
	/* A replica operation still running loses its minor: it answers without status. */
	for (pos = srv->rops.next; pos != &srv->rops; pos = pos->next) {
		struct ctl_rop *r = tdr_list_entry(pos, struct ctl_rop, entry);

		if (r->m == m)
			r->m = NULL;
	}
	minor_free(m);
	return 0;
}

bool ctl_server_minor_paused(const struct ctl_server *srv, int minor)
{
	const struct ctl_minor *m = minor >= 0 ? ctl_minor_find(srv, (unsigned)minor) : NULL;

	return m && m->state == CTL_MINOR_PAUSED;
}

/* ------------------------------------------------------------ requests */

static void respond(struct ctl_conn *c, unsigned type)
{
	struct tdr_ctl_msg rsp;

	tdr_ctl_msg_init(&rsp, type, c->req.cookie);
	ctl_conn_queue(c, &rsp, NULL, 0);
}

static struct ctl_minor *need_minor(struct ctl_conn *c)
{
	struct ctl_minor *m = ctl_minor_find(c->srv, c->req.cookie);

	if (!m)
		ctl_conn_error(c, ENODEV, "no minor %u in this daemon (pid %ld); see tap-ctl list",
			       c->req.cookie, (long)getpid());
	return m;
}

static void do_pid(struct ctl_conn *c)
{
	struct tdr_ctl_msg rsp;

	tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_PID_RSP, c->req.cookie);
	rsp.u.tapdisk_pid = getpid();
	ctl_conn_queue(c, &rsp, NULL, 0);
}

static void do_list(struct ctl_conn *c)
{
	struct ctl_server *srv = c->srv;
	struct tdr_ctl_msg rsp;
	struct tdr_list *pos;
	int count = 0;

	for (pos = srv->minors.next; pos != &srv->minors; pos = pos->next)
		count++;
	for (pos = srv->minors.prev; pos != &srv->minors; pos = pos->prev) {
		struct ctl_minor *m = tdr_list_entry(pos, struct ctl_minor, entry);

		tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_LIST_RSP, c->req.cookie);
		rsp.u.list.count = count--;
		rsp.u.list.minor = m->minor;
		rsp.u.list.state = ctl_minor_state_bits(m);
		if (m->disk)
			snprintf(rsp.u.list.path, sizeof(rsp.u.list.path), "%s", m->params);
		if (ctl_conn_queue(c, &rsp, NULL, 0) < 0)
			return;
	}
	tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_LIST_RSP, c->req.cookie);
	rsp.u.list.count = 0;
	rsp.u.list.minor = -1;
	ctl_conn_queue(c, &rsp, NULL, 0);
}

static void do_attach(struct ctl_conn *c)
{
	unsigned minor = c->req.cookie;

	if (minor == TDR_CTL_COOKIE_NONE) {
		ctl_conn_error(c, EINVAL, "attach needs a minor (0 to %u)", TDR_CTL_COOKIE_NONE - 1);
		return;
	}
	if (ctl_minor_find(c->srv, minor)) {
		ctl_conn_error(c, EEXIST, "minor %u is already attached", minor);
		return;
	}
	if (!minor_new(c->srv, (int)minor)) {
		ctl_conn_error(c, ENOMEM, "out of memory attaching minor %u", minor);
		return;
	}
	TDR_INFO("control: minor %u attached", minor);
	respond(c, TAPDISK_MESSAGE_ATTACH_RSP);
}

static void do_detach(struct ctl_conn *c)
{
	struct ctl_minor *m = need_minor(c);

	if (!m)
		return;
	if (m->disk) {
		ctl_conn_error(c, EBUSY, "minor %d has an image open (%s); close it first",
			       m->minor, m->params);
		return;
	}
	TDR_INFO("control: minor %d detached", m->minor);
	minor_free(m);
	respond(c, TAPDISK_MESSAGE_DETACH_RSP);
}

static const char *unsupported_flag(uint32_t flags)
{
	static const struct {
		uint32_t bit;
		const char *what;
	} names[] = {
		{ TAPDISK_MESSAGE_FLAG_SHARED, "shared images" },
		{ TAPDISK_MESSAGE_FLAG_ADD_CACHE, "read caches (-e)" },
		{ TAPDISK_MESSAGE_FLAG_VHD_INDEX, "VHD indexes" },
		{ TAPDISK_MESSAGE_FLAG_ADD_LOG, "log layers (-C/-c)" },
		{ TAPDISK_MESSAGE_FLAG_ADD_LCACHE, "local caches (-r)" },
		{ TAPDISK_MESSAGE_FLAG_REUSE_PRT, "reused parents (-e)" },
		{ TAPDISK_MESSAGE_FLAG_SECONDARY, "secondary images (-2); use a replica: spec" },
		{ TAPDISK_MESSAGE_FLAG_STANDBY, "standby mode (-s)" },
		{ TAPDISK_MESSAGE_FLAG_OPEN_ENCRYPTED, "encrypted images (-E)" },
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (flags & names[i].bit)
			return names[i].what;
	return flags & ~(uint32_t)(TAPDISK_MESSAGE_FLAG_RDONLY | TAPDISK_MESSAGE_FLAG_NO_O_DIRECT) ?
	       "unknown flags" : NULL;
}

static void do_open(struct ctl_conn *c)
{
	struct ctl_server *srv = c->srv;
	const struct tdr_ctl_params *p = &c->req.u.params;
	unsigned minor = c->req.cookie, flags = 0;
	struct ctl_minor *m;
	struct td_disk *disk = NULL;
	struct tdr_ctl_msg rsp;
	char msg[TAPDISK_MESSAGE_STRING_LENGTH] = "";
	const char *bad;
	bool created = false;
	int ret;

	if (minor == TDR_CTL_COOKIE_NONE) {
		ctl_conn_error(c, EINVAL, "open needs a minor (0 to %u)", TDR_CTL_COOKIE_NONE - 1);
		return;
	}
	if (!tdr_ctl_string_ok(p->path, sizeof(p->path))) {
		ctl_conn_error(c, EINVAL, "open: params.path is not NUL-terminated within %d bytes",
			       TAPDISK_MESSAGE_MAX_PATH_LENGTH);
		return;
	}
	if (!p->path[0] || !strchr(p->path, ':')) {
		ctl_conn_error(c, EINVAL, "open: expected TYPE:/PATH (e.g. aio:/srv/disk.img), got '%s'",
			       p->path);
		return;
	}
	bad = unsupported_flag(p->flags);
	if (bad) {
		ctl_conn_error(c, EOPNOTSUPP, "open: %s are not supported (flags 0x%x)", bad, p->flags);
		/* tap-ctl -E sends a key of its own framing next: do not parse it as requests. */
		if (p->flags & TAPDISK_MESSAGE_FLAG_OPEN_ENCRYPTED)
			c->closing = true;
		return;
	}
	if (!srv->hooks.open) {
		ctl_conn_error(c, EOPNOTSUPP,
			       "this daemon serves a fixed disk (tapdisk-replica serve); start tapdisk-replica daemon to open disks");
		return;
	}
	m = ctl_minor_find(srv, minor);
	if (m && (m->disk || m->state == CTL_MINOR_CLOSING)) {
		ctl_conn_error(c, EALREADY, "minor %u already has an image open (%s)", minor,
			       m->params ? m->params : "");
		return;
	}
	if (!m) {
		m = minor_new(srv, (int)minor);
		if (!m) {
			ctl_conn_error(c, ENOMEM, "out of memory opening minor %u", minor);
			return;
		}
		created = true;
	}
	if (minor_set_params(m, p->path) < 0) {
		ctl_conn_error(c, ENOMEM, "out of memory opening minor %u", minor);
		goto fail;
	}
	if (p->flags & TAPDISK_MESSAGE_FLAG_RDONLY)
		flags |= TD_OPEN_RDONLY;
	if (p->flags & TAPDISK_MESSAGE_FLAG_NO_O_DIRECT)
		flags |= TD_OPEN_NO_O_DIRECT;
	ret = srv->hooks.open(srv->hooks.arg, (int)minor, p->path, flags, &disk, msg, sizeof(msg));
	if (ret < 0 || !disk) {
		ctl_conn_error(c, ret < 0 ? ret : -EIO, "%s", msg[0] ? msg : strerror(ret < 0 ? -ret : EIO));
		goto fail;
	}
	m->disk = disk;
	m->rdonly = flags & TD_OPEN_RDONLY;
	/* A minor paused before it had an image stays paused. */
	if (m->state == CTL_MINOR_PAUSED)
		hold_insert(m);
	TDR_INFO("control: minor %u opened %s (%llu bytes%s)", minor, p->path,
		 (unsigned long long)(disk->size_secs << TD_SECTOR_SHIFT),
		 m->rdonly ? ", read-only" : "");
	tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_OPEN_RSP, c->req.cookie);
	rsp.u.image.sectors = disk->size_secs;
	rsp.u.image.sector_size = TD_SECTOR_SIZE;
	rsp.u.image.info = m->rdonly ? TDR_CTL_INFO_READONLY : 0;
	ctl_conn_queue(c, &rsp, NULL, 0);
	return;
fail:
	if (created) {
		minor_free(m);
	} else {
		/* An attached minor keeps no trace of the image that failed. */
		free(m->params);
		m->params = NULL;
	}
}

static void do_disk_info(struct ctl_conn *c)
{
	struct ctl_minor *m = need_minor(c);
	struct tdr_ctl_msg rsp;

	if (!m)
		return;
	if (!m->disk) {
		ctl_conn_error(c, ENODEV, "minor %d has no image open", m->minor);
		return;
	}
	tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_DISK_INFO_RSP, c->req.cookie);
	rsp.u.image.sectors = m->disk->size_secs;
	rsp.u.image.sector_size = TD_SECTOR_SIZE;
	rsp.u.image.info = (m->disk->flags & TD_OPEN_RDONLY) ? TDR_CTL_INFO_READONLY : 0;
	ctl_conn_queue(c, &rsp, NULL, 0);
}

static void do_pause(struct ctl_conn *c)
{
	struct ctl_minor *m = need_minor(c);

	if (!m)
		return;
	switch (m->state) {
	case CTL_MINOR_PAUSED:
		respond(c, TAPDISK_MESSAGE_PAUSE_RSP);
		return;
	case CTL_MINOR_CLOSING:
		ctl_conn_error(c, EBUSY, "minor %d is closing", m->minor);
		return;
	case CTL_MINOR_PAUSING:
		conn_wait_on(c, m);
		return;
	case CTL_MINOR_RUNNING:
		break;
	}
	if (!m->disk) {
		m->state = CTL_MINOR_PAUSED;
		respond(c, TAPDISK_MESSAGE_PAUSE_RSP);
		return;
	}
	TDR_INFO("control: pausing minor %d (%llu requests in flight)", m->minor,
		 (unsigned long long)m->disk->inflight);
	hold_insert(m);
	m->state = CTL_MINOR_PAUSING;
	conn_wait_on(c, m);
	tdr_timer_arm(&m->drain_timer, 0);
}

static void do_resume(struct ctl_conn *c)
{
	const struct tdr_ctl_params *p = &c->req.u.params;
	struct ctl_minor *m = need_minor(c);

	if (!m)
		return;
	if (!tdr_ctl_string_ok(p->path, sizeof(p->path))) {
		ctl_conn_error(c, EINVAL, "resume: params.path is not NUL-terminated within %d bytes",
			       TAPDISK_MESSAGE_MAX_PATH_LENGTH);
		return;
	}
	if (p->flags & (TAPDISK_MESSAGE_FLAG_SECONDARY | TAPDISK_MESSAGE_FLAG_ADD_LOG)) {
		ctl_conn_error(c, EOPNOTSUPP, "resume: %s are not supported",
			       (p->flags & TAPDISK_MESSAGE_FLAG_ADD_LOG) ? "log layers (-c)" :
			       "secondary images (-2)");
		return;
	}
	if (p->path[0] && (!m->params || strcmp(p->path, m->params) != 0)) {
		ctl_conn_error(c, EOPNOTSUPP,
			       "resume with another image (%s instead of %s) is not supported; close the minor and open the new image",
			       p->path, m->params ? m->params : "none");
		return;
	}
	switch (m->state) {
	case CTL_MINOR_RUNNING:
		ctl_conn_error(c, EINVAL, "minor %d is not paused", m->minor);
		return;
	case CTL_MINOR_PAUSING:
		ctl_conn_error(c, EBUSY, "minor %d is still pausing; retry when the pause completes",
			       m->minor);
		return;
	case CTL_MINOR_CLOSING:
		ctl_conn_error(c, EBUSY, "minor %d is closing", m->minor);
		return;
	case CTL_MINOR_PAUSED:
		break;
	}
	TDR_INFO("control: resuming minor %d (%llu requests held)", m->minor,
		 (unsigned long long)m->nheld);
	m->state = CTL_MINOR_RUNNING;
	if (m->disk)
		hold_release(m, 0);
	respond(c, TAPDISK_MESSAGE_RESUME_RSP);
}

static void on_close_done(void *arg, int err, const char *msg)
{
	struct ctl_close_ticket *t = arg;
	struct ctl_minor *m = t->m;
	struct tdr_list *pos, *tmp;

	free(t);
	if (!m)
		return;
	m->close_ticket = NULL;
	TDR_INFO("control: minor %d closed%s%s", m->minor, err ? ": " : "", err ? msg : "");
	tdr_list_for_each_safe(pos, tmp, &m->waiters) {
		struct ctl_conn *c = tdr_list_entry(pos, struct ctl_conn, wait_entry);
		struct tdr_ctl_msg rsp;

		if (err)
			tdr_ctl_msg_error(&rsp, TAPDISK_MESSAGE_ERROR, c->req.cookie, err, "close: %s",
					  msg && *msg ? msg : strerror(err < 0 ? -err : err));
		else
			tdr_ctl_msg_init(&rsp, TAPDISK_MESSAGE_CLOSE_RSP, c->req.cookie);
		ctl_conn_queue(c, &rsp, NULL, 0);
		conn_wait_done(c);
	}
	/* The hook has released the disk either way. */
	m->disk = NULL;
	minor_free(m);
}

static void close_drained(struct ctl_minor *m)
{
	struct ctl_server *srv = m->srv;
	struct ctl_close_ticket *t;
	struct td_disk *disk = m->disk;

	t = calloc(1, sizeof(*t));
	if (!t) {
		/* Try again shortly rather than close under a client's feet. */
		tdr_timer_arm(&m->drain_timer, CTL_ACCEPT_RETRY_NS);
		return;
	}
	/* Whatever arrived during the close has no disk to go to. */
	hold_release(m, -EIO);
	t->m = m;
	m->close_ticket = t;
	srv->hooks.close(srv->hooks.arg, m->minor, disk, on_close_done, t);
}

static void on_drain_timer(struct tdr_timer *timer, void *arg)
{
	struct ctl_minor *m = arg;
	struct tdr_list *pos, *tmp;

	if (m->disk->inflight > m->nheld) {
		tdr_timer_arm(&m->drain_timer, CTL_DRAIN_POLL_NS);
		return;
	}
	/*
	 * Nothing in flight below us: every pause waiter is served; if a
	 * close came meanwhile, the minor is not going to stay paused, and
	 * saying "paused" would send the toolstack on to an unpause that
	 * fails.
	 */
	tdr_list_for_each_safe(pos, tmp, &m->waiters) {
		struct ctl_conn *c = tdr_list_entry(pos, struct ctl_conn, wait_entry);

		if (c->req.type != TAPDISK_MESSAGE_PAUSE)
			continue;
		if (m->state == CTL_MINOR_CLOSING)
			ctl_conn_error(c, ESHUTDOWN, "minor %d is being closed; it will not stay paused",
				       m->minor);
		else
			respond(c, TAPDISK_MESSAGE_PAUSE_RSP);
		conn_wait_done(c);
	}
	if (m->state == CTL_MINOR_PAUSING) {
		m->state = CTL_MINOR_PAUSED;
		TDR_INFO("control: minor %d paused", m->minor);
	} else if (m->state == CTL_MINOR_CLOSING) {
		close_drained(m);
	}
}

static void do_close(struct ctl_conn *c, bool force)
{
	struct ctl_minor *m = need_minor(c);

	if (!m)
		return;
	if (m->rops) {
		ctl_conn_error(c, EBUSY, "a replica operation on minor %d is in progress; retry when it completes",
			       m->minor);
		return;
	}
	if (!m->disk) {
		TDR_INFO("control: minor %d closed (no image was open)", m->minor);
		minor_free(m);
		respond(c, TAPDISK_MESSAGE_CLOSE_RSP);
		return;
	}
	if (m->state == CTL_MINOR_CLOSING) {
		conn_wait_on(c, m);
		if (force) {
			/* A forced close joining a plain one: held requests fail now. */
			hold_release(m, -EIO);
			hold_insert(m);
		}
		return;
	}
	if (!c->srv->hooks.close) {
		ctl_conn_error(c, EOPNOTSUPP, "this daemon cannot close minor %d", m->minor);
		return;
	}
	TDR_INFO("control: closing minor %d (%s)%s", m->minor, m->params, force ? ", forced" : "");
	hold_insert(m);
	m->state = CTL_MINOR_CLOSING;
	conn_wait_on(c, m);
	if (force) {
		/* Held requests fail now instead of waiting for the drain. */
		hold_release(m, -EIO);
		hold_insert(m);
	}
	tdr_timer_arm(&m->drain_timer, 0);
}

void ctl_dispatch(struct ctl_conn *c)
{
	unsigned type = c->req.type;

	TDR_DEBUG("control: received %s (cookie %u)", tdr_ctl_msg_name(type), c->req.cookie);
	if (c->srv->shut && type != TAPDISK_MESSAGE_PID && type != TAPDISK_MESSAGE_LIST &&
	    type != TAPDISK_MESSAGE_STATS) {
		ctl_conn_error(c, ESHUTDOWN, "the daemon is shutting down");
		return;
	}
	switch (type) {
	case TAPDISK_MESSAGE_PID:
		do_pid(c);
		return;
	case TAPDISK_MESSAGE_LIST:
		do_list(c);
		return;
	case TAPDISK_MESSAGE_STATS:
		ctl_do_stats(c);
		return;
	case TAPDISK_MESSAGE_ATTACH:
		do_attach(c);
		return;
	case TAPDISK_MESSAGE_DETACH:
		do_detach(c);
		return;
	case TAPDISK_MESSAGE_OPEN:
		do_open(c);
		return;
	case TAPDISK_MESSAGE_PAUSE:
		do_pause(c);
		return;
	case TAPDISK_MESSAGE_RESUME:
		do_resume(c);
		return;
	case TAPDISK_MESSAGE_CLOSE:
		do_close(c, false);
		return;
	case TAPDISK_MESSAGE_FORCE_SHUTDOWN:
		do_close(c, true);
		return;
	case TAPDISK_MESSAGE_DISK_INFO:
		do_disk_info(c);
		return;
	case TDR_MESSAGE_REPLICA:
		ctl_do_replica(c);
		return;
	case TAPDISK_MESSAGE_EXIT:
	case TAPDISK_MESSAGE_LIST_MINORS:
		/* blktap's tapdisk has no handler for these either. */
		ctl_conn_error(c, EINVAL, "unsupported message '%s' (type %u), as in blktap's tapdisk",
			       tdr_ctl_msg_name(type), type);
		return;
	case TAPDISK_MESSAGE_XENBLKIF_CONNECT:
	case TAPDISK_MESSAGE_XENBLKIF_DISCONNECT:
		ctl_conn_error(c, EOPNOTSUPP,
			       "'%s': tapdisk-replica has no Xen shared ring; guests reach the disk through its NBD export",
			       tdr_ctl_msg_name(type));
		return;
	case TAPDISK_MESSAGE_COMMIT:
	case TAPDISK_MESSAGE_QUERY_COMMIT_JOB:
	case TAPDISK_MESSAGE_CANCEL_COMMIT_JOB:
		ctl_conn_error(c, EOPNOTSUPP, "'%s' is not supported by tapdisk-replica",
			       tdr_ctl_msg_name(type));
		return;
	}
	if (tdr_ctl_msg_is_response(type))
		ctl_conn_error(c, EINVAL, "message type %u ('%s') is a response, not a request",
			       type, tdr_ctl_msg_name(type));
	else
		ctl_conn_error(c, EINVAL,
			       "unknown message type %u (0x%x); expected a tapdisk control request (%d..%d) or a replica request (0x%x)",
			       type, type, TAPDISK_MESSAGE_PID, TAPDISK_MESSAGE_CANCEL_COMMIT_JOB,
			       TDR_MESSAGE_REPLICA);
}
