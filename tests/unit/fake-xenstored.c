/* SPDX-License-Identifier: BSD-3-Clause */
/* An in-memory xenstored for unit tests; see fake-xenstored.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <xen/io/xs_wire.h>

#include "fake-xenstored.h"

#define HDR sizeof(struct xsd_sockmsg)
#define MAX_CONNS 16

struct node {
	char *path;
	char *val;
	size_t len;
	char *perms;
	uint64_t gen;		/* changes when its children do (DIRECTORY_PART) */
};

struct watch {
	char *path;
	char *token;
};

struct fconn {
	struct fake_xs *f;
	int fd;
	struct tdr_fd_watch w;
	bool watching;
	char in[HDR + XENSTORE_PAYLOAD_MAX];
	size_t in_len;
	char *out;
	size_t out_len, out_cap;
	struct watch *watches;
	size_t nwatches;
};

struct fake_xs {
	struct tdr_loop *loop;
	char *sock_path;
	int lfd;
	struct tdr_fd_watch lw;
	bool lwatching;
	bool frozen;
	struct node *nodes;
	size_t nnodes;
	struct fconn *conns[MAX_CONNS];
	uint64_t msgs;
	uint64_t gen;
};

/* The parent of path has a child more or less: a new generation. */
static struct node *find(struct fake_xs *f, const char *path);
static void children_changed(struct fake_xs *f, const char *path)
{
	char *parent = strdup(path), *slash = strrchr(parent, '/');
	struct node *p;

	if (slash && slash != parent) {
		*slash = '\0';
		p = find(f, parent);
		if (p)
			p->gen = ++f->gen;
	}
	free(parent);
}

static void conn_update(struct fconn *c);
static void fconn_close(struct fconn *c);

/* ---------------------------------------------------------------- store */

static struct node *find(struct fake_xs *f, const char *path)
{
	size_t i;

	for (i = 0; i < f->nnodes; i++)
		if (strcmp(f->nodes[i].path, path) == 0)
			return &f->nodes[i];
	return NULL;
}

static bool under(const char *path, const char *dir)
{
	size_t l = strlen(dir);

	if (strcmp(dir, "/") == 0)
		return path[0] == '/' && path[1];
	return strncmp(path, dir, l) == 0 && path[l] == '/';
}

static void fire(struct fake_xs *f, const char *path, bool recursive)
{
	size_t i, j;

	for (i = 0; i < MAX_CONNS; i++) {
		struct fconn *c = f->conns[i];

		if (!c)
			continue;
		for (j = 0; j < c->nwatches; j++) {
			struct watch *w = &c->watches[j];
			struct xsd_sockmsg h = { .type = XS_WATCH_EVENT };
			size_t pl = strlen(path) + 1, tl = strlen(w->token) + 1;

			if (!(strcmp(w->path, path) == 0 || under(path, w->path) ||
			      (recursive && under(w->path, path))))
				continue;
			h.len = (uint32_t)(pl + tl);
			if (c->out_len + HDR + h.len > c->out_cap) {
				c->out_cap = (c->out_len + HDR + h.len) * 2;
				c->out = realloc(c->out, c->out_cap);
			}
			memcpy(c->out + c->out_len, &h, HDR);
			memcpy(c->out + c->out_len + HDR, path, pl);
			memcpy(c->out + c->out_len + HDR + pl, w->token, tl);
			c->out_len += HDR + h.len;
			conn_update(c);
		}
	}
}

static struct node *create(struct fake_xs *f, const char *path)
{
	struct node *n = find(f, path);
	char *parent, *slash;
	const char *perms = "n0";

	if (n)
		return n;
	/* Parents first, inheriting their permissions like xenstored. */
	parent = strdup(path);
	slash = strrchr(parent, '/');
	if (slash && slash != parent) {
		struct node *p;

		*slash = '\0';
		p = create(f, parent);
		perms = p->perms;
	}
	f->nodes = realloc(f->nodes, (f->nnodes + 1) * sizeof(*f->nodes));
	n = &f->nodes[f->nnodes++];
	n->path = strdup(path);
	n->val = strdup("");
	n->len = 0;
	n->perms = strdup(perms);
	n->gen = ++f->gen;
	free(parent);
	children_changed(f, path);
	return find(f, path);
}

static int store_write(struct fake_xs *f, const char *path, const char *val, size_t len)
{
	struct node *n;

	if (path[0] != '/')
		return -EINVAL;
	n = create(f, path);
	free(n->val);
	n->val = malloc(len + 1);
	memcpy(n->val, val, len);
	n->val[len] = '\0';
	n->len = len;
	fire(f, path, false);
	return 0;
}

static void free_node(struct node *n)
{
	free(n->path);
	free(n->val);
	free(n->perms);
}

static int store_rm(struct fake_xs *f, const char *path)
{
	size_t i = 0;
	bool found = false;

	while (i < f->nnodes) {
		if (strcmp(f->nodes[i].path, path) == 0 || under(f->nodes[i].path, path)) {
			free_node(&f->nodes[i]);
			f->nodes[i] = f->nodes[--f->nnodes];
			found = true;
		} else {
			i++;
		}
	}
	if (!found)
		return -ENOENT;
	children_changed(f, path);
	fire(f, path, true);
	return 0;
}

/* -------------------------------------------------------------- protocol */

static void reply(struct fconn *c, uint32_t type, uint32_t req_id, const void *data, size_t len)
{
	struct xsd_sockmsg h = { .type = type, .req_id = req_id, .len = (uint32_t)len };

	if (c->out_len + HDR + len > c->out_cap) {
		c->out_cap = (c->out_len + HDR + len) * 2;
		c->out = realloc(c->out, c->out_cap);
	}
	memcpy(c->out + c->out_len, &h, HDR);
	if (len)
		memcpy(c->out + c->out_len + HDR, data, len);
	c->out_len += HDR + len;
	conn_update(c);
}

static void reply_err(struct fconn *c, uint32_t req_id, int err)
{
	const char *name = "EIO";
	size_t i;

	for (i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
		if (xsd_errors[i].errnum == err)
			name = xsd_errors[i].errstring;
	reply(c, XS_ERROR, req_id, name, strlen(name) + 1);
}

static void reply_ok(struct fconn *c, uint32_t req_id, uint32_t type)
{
	reply(c, type, req_id, "OK", 3);
}

static void handle(struct fconn *c, const struct xsd_sockmsg *h, const char *p)
{
	struct fake_xs *f = c->f;
	size_t plen = strnlen(p, h->len);
	struct node *n;
	int err;

	f->msgs++;
	if (plen == h->len && h->type != XS_WRITE) {
		reply_err(c, h->req_id, EINVAL);
		return;
	}
	switch (h->type) {
	case XS_READ:
		n = find(f, p);
		if (!n)
			reply_err(c, h->req_id, ENOENT);
		else
			reply(c, XS_READ, h->req_id, n->val, n->len);
		return;
	case XS_WRITE:
		if (plen == h->len) {
			reply_err(c, h->req_id, EINVAL);
			return;
		}
		err = store_write(f, p, p + plen + 1, h->len - plen - 1);
		if (err)
			reply_err(c, h->req_id, -err);
		else
			reply_ok(c, h->req_id, XS_WRITE);
		return;
	case XS_MKDIR:
		if (!find(f, p)) {
			create(f, p);
			fire(f, p, false);
		}
		reply_ok(c, h->req_id, XS_MKDIR);
		return;
	case XS_RM:
		err = store_rm(f, p);
		if (err)
			reply_err(c, h->req_id, -err);
		else
			reply_ok(c, h->req_id, XS_RM);
		return;
	case XS_DIRECTORY:
	case XS_DIRECTORY_PART: {
		/* The whole list, then what one reply holds, as xenstored does. */
		char *all = NULL, *buf;
		size_t len = 0, i, off = 0, glen, room, take;

		if (!(n = find(f, p))) {
			reply_err(c, h->req_id, ENOENT);
			return;
		}
		for (i = 0; i < f->nnodes; i++) {
			const char *q = f->nodes[i].path;

			if (under(q, p) && !strchr(q + strlen(p) + 1, '/')) {
				size_t l = strlen(q + strlen(p) + 1) + 1;

				all = realloc(all, len + l);
				memcpy(all + len, q + strlen(p) + 1, l);
				len += l;
			}
		}
		if (h->type == XS_DIRECTORY) {
			if (len > XENSTORE_PAYLOAD_MAX)
				reply_err(c, h->req_id, E2BIG);
			else
				reply(c, XS_DIRECTORY, h->req_id, all, len);
			free(all);
			return;
		}
		if (plen + 1 < h->len)
			off = strtoull(p + plen + 1, NULL, 10);
		if (off > len) {
			free(all);
			reply_err(c, h->req_id, EINVAL);
			return;
		}
		buf = malloc(XENSTORE_PAYLOAD_MAX);
		glen = (size_t)snprintf(buf, 32, "%llu", (unsigned long long)n->gen) + 1;
		room = XENSTORE_PAYLOAD_MAX - glen - 1;	/* and the end marker */
		/* Whole names only. */
		for (take = 0; off + take < len;) {
			size_t l = strlen(all + off + take) + 1;

			if (take + l > room)
				break;
			take += l;
		}
		memcpy(buf + glen, all + off, take);
		if (off + take == len)
			buf[glen + take++] = '\0';	/* the list ends here */
		reply(c, XS_DIRECTORY_PART, h->req_id, buf, glen + take);
		free(buf);
		free(all);
		return;
	}
	case XS_SET_PERMS: {
		char perms[256] = "";
		size_t off = plen + 1;

		n = find(f, p);
		if (!n) {
			reply_err(c, h->req_id, ENOENT);
			return;
		}
		while (off < h->len) {
			size_t l = strnlen(p + off, h->len - off);

			if (*perms)
				strncat(perms, ",", sizeof(perms) - strlen(perms) - 1);
			strncat(perms, p + off, sizeof(perms) - strlen(perms) - 1);
			off += l + 1;
		}
		free(n->perms);
		n->perms = strdup(perms);
		fire(f, p, false);
		reply_ok(c, h->req_id, XS_SET_PERMS);
		return;
	}
	case XS_GET_PERMS:
		n = find(f, p);
		if (!n)
			reply_err(c, h->req_id, ENOENT);
		else
			reply(c, XS_GET_PERMS, h->req_id, n->perms, strlen(n->perms) + 1);
		return;
	case XS_WATCH: {
		const char *tok = p + plen + 1;
		struct watch *w;

		c->watches = realloc(c->watches, (c->nwatches + 1) * sizeof(*c->watches));
		w = &c->watches[c->nwatches++];
		w->path = strdup(p);
		w->token = strndup(tok, h->len - plen - 1);
		reply_ok(c, h->req_id, XS_WATCH);
		/* Like xenstored: every new watch fires once. */
		{
			struct xsd_sockmsg e = { .type = XS_WATCH_EVENT };
			size_t pl = strlen(w->path) + 1, tl = strlen(w->token) + 1;
			char buf[1024];

			memcpy(buf, w->path, pl);
			memcpy(buf + pl, w->token, tl);
			e.len = (uint32_t)(pl + tl);
			reply(c, XS_WATCH_EVENT, 0, buf, e.len);
		}
		return;
	}
	case XS_UNWATCH:
		reply_ok(c, h->req_id, XS_UNWATCH);
		return;
	case XS_TRANSACTION_START:
		/* No isolation: operations in a transaction apply at once
		 * (enough for xenstore-write's multi-key writes). */
		reply(c, XS_TRANSACTION_START, h->req_id, "1", 2);
		return;
	case XS_TRANSACTION_END:
		reply_ok(c, h->req_id, XS_TRANSACTION_END);
		return;
	default:
		reply_err(c, h->req_id, ENOSYS);
		return;
	}
}

/* ------------------------------------------------------------ connections */

static void on_conn(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct fconn *c = arg;

	if (events & EPOLLOUT) {
		ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);

		if (n > 0) {
			memmove(c->out, c->out + n, c->out_len - (size_t)n);
			c->out_len -= (size_t)n;
		}
		conn_update(c);
	}
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
		ssize_t n = read(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len);
		size_t off = 0;

		if (n <= 0) {
			if (n < 0 && errno == EAGAIN)
				return;
			fconn_close(c);
			return;
		}
		c->in_len += (size_t)n;
		while (c->in_len - off >= HDR) {
			struct xsd_sockmsg h;
			char payload[XENSTORE_PAYLOAD_MAX + 1];

			memcpy(&h, c->in + off, HDR);
			if (h.len > XENSTORE_PAYLOAD_MAX) {
				fconn_close(c);
				return;
			}
			if (c->in_len - off < HDR + h.len)
				break;
			memcpy(payload, c->in + off + HDR, h.len);
			payload[h.len] = '\0';
			off += HDR + h.len;
			handle(c, &h, payload);
		}
		memmove(c->in, c->in + off, c->in_len - off);
		c->in_len -= off;
	}
}

static void conn_update(struct fconn *c)
{
	uint32_t ev = 0;

	if (c->f->frozen) {
		ev = 0;
	} else {
		ev = EPOLLIN;
		if (c->out_len)
			ev |= EPOLLOUT;
	}
	if (c->watching)
		tdr_loop_update_fd(&c->w, ev);
}

static void fconn_close(struct fconn *c)
{
	size_t i;

	for (i = 0; i < MAX_CONNS; i++)
		if (c->f->conns[i] == c)
			c->f->conns[i] = NULL;
	if (c->watching)
		tdr_loop_unwatch_fd(&c->w);
	close(c->fd);
	for (i = 0; i < c->nwatches; i++) {
		free(c->watches[i].path);
		free(c->watches[i].token);
	}
	free(c->watches);
	free(c->out);
	free(c);
}

static void on_listen(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct fake_xs *f = arg;
	struct fconn *c;
	int fd, i;

	if (f->frozen)
		return;
	fd = accept4(f->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	for (i = 0; i < MAX_CONNS; i++)
		if (!f->conns[i])
			break;
	if (i == MAX_CONNS) {
		close(fd);
		return;
	}
	c = calloc(1, sizeof(*c));
	c->f = f;
	c->fd = fd;
	f->conns[i] = c;
	tdr_loop_watch_fd(f->loop, &c->w, fd, EPOLLIN, on_conn, c);
	c->watching = true;
}

int fake_xs_start(struct fake_xs *f)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	unlink(f->sock_path);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", f->sock_path);
	f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (f->lfd < 0)
		return -errno;
	if (bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(f->lfd, 16) < 0) {
		close(f->lfd);
		f->lfd = -1;
		return -errno;
	}
	tdr_loop_watch_fd(f->loop, &f->lw, f->lfd, EPOLLIN, on_listen, f);
	f->lwatching = true;
	return 0;
}

void fake_xs_stop(struct fake_xs *f, bool lose)
{
	size_t i;

	for (i = 0; i < MAX_CONNS; i++)
		if (f->conns[i])
			fconn_close(f->conns[i]);
	if (f->lwatching)
		tdr_loop_unwatch_fd(&f->lw);
	f->lwatching = false;
	if (f->lfd >= 0)
		close(f->lfd);
	f->lfd = -1;
	unlink(f->sock_path);
	if (lose) {
		for (i = 0; i < f->nnodes; i++)
			free_node(&f->nodes[i]);
		f->nnodes = 0;
	}
	f->frozen = false;
}

struct fake_xs *fake_xs_new(struct tdr_loop *loop, const char *sock_path)
{
	struct fake_xs *f = calloc(1, sizeof(*f));

	f->loop = loop;
	f->sock_path = strdup(sock_path);
	f->lfd = -1;
	if (fake_xs_start(f) < 0) {
		free(f->sock_path);
		free(f);
		return NULL;
	}
	return f;
}

void fake_xs_free(struct fake_xs *f)
{
	if (!f)
		return;
	fake_xs_stop(f, true);
	free(f->nodes);
	free(f->sock_path);
	free(f);
}

void fake_xs_freeze(struct fake_xs *f, bool frozen)
{
	size_t i;

	f->frozen = frozen;
	for (i = 0; i < MAX_CONNS; i++)
		if (f->conns[i])
			conn_update(f->conns[i]);
	if (f->lwatching)
		tdr_loop_update_fd(&f->lw, frozen ? 0 : EPOLLIN);
}

int fake_xs_write(struct fake_xs *f, const char *path, const char *val)
{
	return store_write(f, path, val, strlen(val));
}

int fake_xs_write_len(struct fake_xs *f, const char *path, const char *val, size_t len)
{
	return store_write(f, path, val, len);
}

int fake_xs_rm(struct fake_xs *f, const char *path)
{
	return store_rm(f, path);
}

char *fake_xs_read(struct fake_xs *f, const char *path)
{
	struct node *n = find(f, path);

	return n ? strdup(n->val) : NULL;
}

char *fake_xs_perms(struct fake_xs *f, const char *path)
{
	struct node *n = find(f, path);

	return n ? strdup(n->perms) : NULL;
}

int fake_xs_set_perms(struct fake_xs *f, const char *path, const char *perms)
{
	struct node *n = find(f, path);

	if (!n)
		return -ENOENT;
	free(n->perms);
	n->perms = strdup(perms);
	return 0;
}

size_t fake_xs_count_children(struct fake_xs *f, const char *path)
{
	size_t i, n = 0;

	for (i = 0; i < f->nnodes; i++)
		if (under(f->nodes[i].path, path) &&
		    !strchr(f->nodes[i].path + strlen(path) + 1, '/'))
			n++;
	return n;
}

unsigned fake_xs_connections(const struct fake_xs *f)
{
	unsigned i, n = 0;

	for (i = 0; i < MAX_CONNS; i++)
		n += f->conns[i] != NULL;
	return n;
}

uint64_t fake_xs_messages(const struct fake_xs *f)
{
	return f->msgs;
}
