/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * A non-blocking xenstore wire-protocol client on the event loop; see
 * xs-conn.h for why we do not use libxenstore here.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <xen/io/xs_wire.h>

#include "tdr/list.h"
#include "tdr/log.h"
#include "xs-conn.h"

#define XS_HDR sizeof(struct xsd_sockmsg)
/* Past this much unsent data something is badly wrong (xenstored frozen for
 * a long time and a caller that does not coalesce): refuse rather than grow. */
#define XS_OUT_MAX (256u * 1024u)
#define XS_RETRY_MIN_NS (20ull * 1000000ull)
#define XS_RETRY_MAX_NS (500ull * 1000000ull)

struct xs_pending {
	struct tdr_list entry;
	uint32_t req_id;
	xs_reply_fn fn;
	void *arg;
};

struct xs_conn {
	struct tdr_loop *loop;
	char *path;
	const struct xs_conn_ops *ops;
	void *arg;

	int fd;
	bool is_dev;
	bool connected;
	struct tdr_fd_watch watch;
	bool watching;
	uint32_t watch_events;

	struct tdr_timer retry;
	uint64_t backoff_ns;
	int last_connect_err;	/* to log a failure once, not at every retry */

	/* A write error found while sending: handled from the loop, not inside
	 * the caller's xs_conn_send(). */
	struct tdr_defer fail_defer;
	int fail_err;

	char *out;
	size_t out_off, out_len, out_cap;

	char in[XS_HDR + XENSTORE_PAYLOAD_MAX];
	size_t in_len;
	char payload[XENSTORE_PAYLOAD_MAX + 1];

	struct tdr_list pending;
	uint32_t next_id;
};

int xs_errno_from_name(const char *name)
{
	size_t i;

	for (i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
		if (strcmp(name, xsd_errors[i].errstring) == 0)
			return -xsd_errors[i].errnum;
	return -EIO;
}

static const char *default_path(void)
{
	const char *p = getenv("XENSTORED_PATH");

	if (p && *p)
		return p;
	if (access("/run/xenstored/socket", F_OK) == 0)
		return "/run/xenstored/socket";
	if (access("/var/run/xenstored/socket", F_OK) == 0)
		return "/var/run/xenstored/socket";
	return "/dev/xen/xenbus";
}

bool xs_conn_connected(const struct xs_conn *c)
{
	return c->connected;
}

const char *xs_conn_path(const struct xs_conn *c)
{
	return c->path;
}

size_t xs_conn_queued(const struct xs_conn *c)
{
	return c->out_len - c->out_off;
}

static void set_events(struct xs_conn *c, uint32_t ev)
{
	if (c->watching && ev != c->watch_events && tdr_loop_update_fd(&c->watch, ev) == 0)
		c->watch_events = ev;
}

static void disconnect(struct xs_conn *c, int err)
{
	struct tdr_list dead;
	struct tdr_list *pos, *tmp;
	bool was_connected = c->connected;

	if (c->watching) {
		tdr_loop_unwatch_fd(&c->watch);
		c->watching = false;
	}
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
	c->connected = false;
	c->out_off = c->out_len = 0;
	c->in_len = 0;
	tdr_loop_cancel_defer(c->loop, &c->fail_defer);

	/* Callbacks may send (and get -ENOTCONN): take the list first. */
	tdr_list_init(&dead);
	if (!tdr_list_empty(&c->pending)) {
		dead = c->pending;
		dead.next->prev = &dead;
		dead.prev->next = &dead;
		tdr_list_init(&c->pending);
	}
	tdr_list_for_each_safe(pos, tmp, &dead) {
		struct xs_pending *p = tdr_list_entry(pos, struct xs_pending, entry);

		tdr_list_del(&p->entry);
		if (p->fn)
			p->fn(p->arg, -ECONNRESET, "", 0);
		free(p);
	}
	if (was_connected) {
		TDR_WARN("xenstore: lost the connection to %s (%s); reconnecting", c->path,
			 strerror(-err));
		if (c->ops->disconnected)
			c->ops->disconnected(c->arg, err);
	}
	c->backoff_ns = XS_RETRY_MIN_NS;
	tdr_timer_arm(&c->retry, c->backoff_ns);
}

void xs_conn_reset(struct xs_conn *c, int err)
{
	disconnect(c, err);
}

static void on_fail_defer(void *arg)
{
	struct xs_conn *c = arg;

	disconnect(c, c->fail_err);
}

static void flush_out(struct xs_conn *c)
{
	ssize_t n;

	while (c->out_off < c->out_len) {
		if (c->is_dev)
			n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
		else
			n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0) {
			c->out_off += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			/* xenstored is slow or frozen: wait for room, never block. */
			set_events(c, EPOLLIN | EPOLLOUT);
			return;
		}
		c->fail_err = n < 0 ? -errno : -EIO;
		tdr_loop_defer(c->loop, &c->fail_defer);
		return;
	}
	c->out_off = c->out_len = 0;
	set_events(c, EPOLLIN);
}

static void dispatch(struct xs_conn *c, const struct xsd_sockmsg *hdr, const char *data)
{
	struct tdr_list *pos, *tmp;

	if (hdr->type == XS_WATCH_EVENT) {
		const char *path = data;
		size_t plen = strnlen(data, hdr->len);
		const char *token = plen < hdr->len ? data + plen + 1 : "";

		if (plen < hdr->len && c->ops->watch_event)
			c->ops->watch_event(c->arg, path, token);
		return;
	}
	/* xenstored answers in order, so this is the first entry. */
	tdr_list_for_each_safe(pos, tmp, &c->pending) {
		struct xs_pending *p = tdr_list_entry(pos, struct xs_pending, entry);

		if (p->req_id != hdr->req_id)
			continue;
		tdr_list_del(&p->entry);
		if (p->fn) {
			if (hdr->type == XS_ERROR)
				p->fn(p->arg, xs_errno_from_name(data), "", 0);
			else
				p->fn(p->arg, 0, data, hdr->len);
		}
		free(p);
		return;
	}
	TDR_DEBUG("xenstore: reply %u of type %u matches no request; ignored", hdr->req_id,
		  hdr->type);
}

static void on_readable(struct xs_conn *c)
{
	for (;;) {
		ssize_t n = read(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len);
		size_t off = 0;

		if (n == 0) {
			disconnect(c, -ECONNRESET);
			return;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return;
			disconnect(c, -errno);
			return;
		}
		c->in_len += (size_t)n;
		while (c->in_len - off >= XS_HDR) {
			struct xsd_sockmsg hdr;

			memcpy(&hdr, c->in + off, XS_HDR);
			if (hdr.len > XENSTORE_PAYLOAD_MAX) {
				TDR_WARN("xenstore: message of %u bytes from %s (the limit is %d); reconnecting",
					 hdr.len, c->path, XENSTORE_PAYLOAD_MAX);
				disconnect(c, -EPROTO);
				return;
			}
			if (c->in_len - off < XS_HDR + hdr.len)
				break;
			memcpy(c->payload, c->in + off + XS_HDR, hdr.len);
			c->payload[hdr.len] = '\0';
			off += XS_HDR + hdr.len;
			dispatch(c, &hdr, c->payload);
			/* A callback may have dropped the connection. */
			if (c->fd < 0)
				return;
		}
		memmove(c->in, c->in + off, c->in_len - off);
		c->in_len -= off;
	}
}

static void on_io(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct xs_conn *c = arg;

	if (events & EPOLLOUT)
		flush_out(c);
	if (c->fd >= 0 && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		on_readable(c);
}

static int try_connect(struct xs_conn *c)
{
	struct stat st;
	int fd = -1, ret;

	c->is_dev = stat(c->path, &st) == 0 && S_ISCHR(st.st_mode);
	if (c->is_dev) {
		fd = open(c->path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			return -errno;
	} else {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		if (strlen(c->path) >= sizeof(sa.sun_path))
			return -ENAMETOOLONG;
		strcpy(sa.sun_path, c->path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return -errno;
		/* A UNIX connect completes at once or fails (EAGAIN: backlog full). */
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			ret = -errno;
			close(fd);
			return ret;
		}
	}
	ret = tdr_loop_watch_fd(c->loop, &c->watch, fd, EPOLLIN, on_io, c);
	if (ret < 0) {
		close(fd);
		return ret;
	}
	c->fd = fd;
	c->watching = true;
	c->watch_events = EPOLLIN;
	c->connected = true;
	return 0;
}

static void on_retry(struct tdr_timer *t, void *arg)
{
	struct xs_conn *c = arg;
	int err = try_connect(c);

	if (err < 0) {
		if (err != c->last_connect_err)
			TDR_WARN("xenstore: cannot connect to %s: %s; retrying", c->path,
				 strerror(-err));
		c->last_connect_err = err;
		c->backoff_ns = c->backoff_ns * 2 > XS_RETRY_MAX_NS ? XS_RETRY_MAX_NS
								    : c->backoff_ns * 2;
		tdr_timer_arm(&c->retry, c->backoff_ns);
		return;
	}
	if (c->last_connect_err)
		TDR_INFO("xenstore: connected to %s", c->path);
	else
		TDR_DEBUG("xenstore: connected to %s", c->path);
	c->last_connect_err = 0;
	if (c->ops->connected)
		c->ops->connected(c->arg);
}

struct xs_conn *xs_conn_new(struct tdr_loop *loop, const char *path,
			    const struct xs_conn_ops *ops, void *arg)
{
	struct xs_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->path = strdup(path ? path : default_path());
	if (!c->path) {
		free(c);
		errno = ENOMEM;
		return NULL;
	}
	c->loop = loop;
	c->ops = ops;
	c->arg = arg;
	c->fd = -1;
	c->next_id = 1;
	c->backoff_ns = XS_RETRY_MIN_NS;
	tdr_list_init(&c->pending);
	tdr_timer_init(&c->retry, loop, on_retry, c);
	tdr_defer_init(&c->fail_defer, on_fail_defer, c);
	/* From the loop, so that the caller has its pointer before any callback. */
	tdr_timer_arm(&c->retry, 0);
	return c;
}

void xs_conn_free(struct xs_conn *c)
{
	struct tdr_list *pos, *tmp;

	if (!c)
		return;
	tdr_timer_cancel(&c->retry);
	tdr_loop_cancel_defer(c->loop, &c->fail_defer);
	if (c->watching)
		tdr_loop_unwatch_fd(&c->watch);
	if (c->fd >= 0)
		close(c->fd);
	/* The owner is going away: its callbacks are not called. */
	tdr_list_for_each_safe(pos, tmp, &c->pending) {
		tdr_list_del(pos);
		free(tdr_list_entry(pos, struct xs_pending, entry));
	}
	free(c->out);
	free(c->path);
	free(c);
}

int xs_conn_send(struct xs_conn *c, uint32_t type, const void *const *parts,
		 const size_t *lens, unsigned nparts, xs_reply_fn fn, void *arg)
{
	struct xsd_sockmsg hdr = { .type = type };
	struct xs_pending *p;
	size_t total = 0, need;
	unsigned i;

	if (!c->connected || c->fail_defer.queued)
		return -ENOTCONN;
	for (i = 0; i < nparts; i++)
		total += lens[i];
	if (total > XENSTORE_PAYLOAD_MAX)
		return -EMSGSIZE;
	need = XS_HDR + total;
	if (c->out_len - c->out_off + need > XS_OUT_MAX)
		return -ENOBUFS;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	if (c->out_off && c->out_off == c->out_len)
		c->out_off = c->out_len = 0;
	if (c->out_len + need > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;
		char *nb;

		if (c->out_off) {
			memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
			c->out_len -= c->out_off;
			c->out_off = 0;
		}
		while (cap < c->out_len + need)
			cap *= 2;
		if (cap != c->out_cap) {
			nb = realloc(c->out, cap);
			if (!nb) {
				free(p);
				return -ENOMEM;
			}
			c->out = nb;
			c->out_cap = cap;
		}
	}
	/* req_id 0 is never used: some xenstoreds send events with it. */
	hdr.req_id = c->next_id++;
	if (c->next_id == 0)
		c->next_id = 1;
	hdr.len = (uint32_t)total;
	memcpy(c->out + c->out_len, &hdr, XS_HDR);
	c->out_len += XS_HDR;
	for (i = 0; i < nparts; i++) {
		memcpy(c->out + c->out_len, parts[i], lens[i]);
		c->out_len += lens[i];
	}
	p->req_id = hdr.req_id;
	p->fn = fn;
	p->arg = arg;
	tdr_list_add_tail(&p->entry, &c->pending);
	/* Written at once: a frozen xenstored leaves it queued here. */
	if (c->watch_events == EPOLLIN)
		flush_out(c);
	return 0;
}

static int send_path(struct xs_conn *c, uint32_t type, const char *path, xs_reply_fn fn,
		     void *arg)
{
	const void *parts[] = { path };
	size_t lens[] = { strlen(path) + 1 };

	return xs_conn_send(c, type, parts, lens, 1, fn, arg);
}

int xs_conn_read(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg)
{
	return send_path(c, XS_READ, path, fn, arg);
}

int xs_conn_mkdir(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg)
{
	return send_path(c, XS_MKDIR, path, fn, arg);
}

int xs_conn_rm(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg)
{
	return send_path(c, XS_RM, path, fn, arg);
}

int xs_conn_directory(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg)
{
	return send_path(c, XS_DIRECTORY, path, fn, arg);
}

int xs_conn_directory_part(struct xs_conn *c, const char *path, size_t offset, xs_reply_fn fn,
			   void *arg)
{
	char offs[24];
	const void *parts[] = { path, offs };
	size_t lens[2];

	snprintf(offs, sizeof(offs), "%zu", offset);
	lens[0] = strlen(path) + 1;
	lens[1] = strlen(offs) + 1;
	return xs_conn_send(c, XS_DIRECTORY_PART, parts, lens, 2, fn, arg);
}

int xs_conn_write(struct xs_conn *c, const char *path, const char *val, xs_reply_fn fn,
		  void *arg)
{
	/* XS_WRITE: the path with its NUL, then the value without one. */
	const void *parts[] = { path, val };
	size_t lens[] = { strlen(path) + 1, strlen(val) };

	return xs_conn_send(c, XS_WRITE, parts, lens, 2, fn, arg);
}

int xs_conn_set_perms(struct xs_conn *c, const char *path, const char *perms, xs_reply_fn fn,
		      void *arg)
{
	const void *parts[] = { path, perms };
	size_t lens[] = { strlen(path) + 1, strlen(perms) + 1 };

	return xs_conn_send(c, XS_SET_PERMS, parts, lens, 2, fn, arg);
}

int xs_conn_watch(struct xs_conn *c, const char *path, const char *token, xs_reply_fn fn,
		  void *arg)
{
	const void *parts[] = { path, token };
	size_t lens[] = { strlen(path) + 1, strlen(token) + 1 };

	return xs_conn_send(c, XS_WATCH, parts, lens, 2, fn, arg);
}
