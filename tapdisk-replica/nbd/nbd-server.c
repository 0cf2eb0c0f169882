/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The NBD server object: exports, UNIX and TCP listeners, the connection
 * list and shutdown.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "nbd-int.h"
#include "tdr/log.h"

#define NBD_MAX_CONNECTIONS	1024u
#define NBD_ACCEPT_BATCH	64
#define NBD_ACCEPT_RETRY_NS	(100ull * 1000 * 1000)
#define NBD_SHUTDOWN_GRACE_NS	(5ull * 1000 * 1000 * 1000)
#define NBD_MAX_TCP_LISTENERS	8
static void server_done_cb(void *arg)
{
	struct nbd_server *srv = arg;
	void (*done)(void *) = srv->done;

	srv->done = NULL;
	if (done)
		done(srv->done_arg);
}

static void shutdown_timeout_cb(struct tdr_timer *t, void *arg)
{
	struct nbd_server *srv = arg;
	struct tdr_list *pos, *tmp;

	/* Clients that do not read their replies, or still negotiate, do not
	 * hold us up forever; requests still in the disk are waited for all
	 * the same. */
	tdr_list_for_each_safe(pos, tmp, &srv->conns) {
		struct nbd_conn *c = tdr_list_entry(pos, struct nbd_conn, entry);

		if (!c->dead && c->phase != NBD_PH_TRANSMISSION)
			TDR_INFO("nbd: connection %u: still negotiating at the end of the shutdown grace period; closing it",
				 c->id);
		else if (!c->dead)
			TDR_WARN("nbd: connection %u: replies not taken within the shutdown grace period; closing it",
				 c->id);
		nbd_conn_kill(c, "shutdown grace period over");
	}
}

struct nbd_server *nbd_server_new(struct tdr_loop *loop)
{
	struct nbd_server *srv = calloc(1, sizeof(*srv));

	if (!srv)
		return NULL;
	srv->loop = loop;
	tdr_list_init(&srv->exports);
	tdr_list_init(&srv->listeners);
	tdr_list_init(&srv->conns);
	srv->max_inflight = NBD_DEFAULT_MAX_INFLIGHT;
	tdr_defer_init(&srv->done_defer, server_done_cb, srv);
	tdr_timer_init(&srv->shutdown_timer, loop, shutdown_timeout_cb, srv);
	return srv;
}

int nbd_server_set_tls(struct nbd_server *srv, const struct nbd_tls_config *cfg)
{
	struct nbd_tls *tls;
	int r = nbd_tls_new(&tls, cfg);

	if (r < 0)
		return r;
	nbd_tls_free(srv->tls);
	srv->tls = tls;
	return 0;
}

void nbd_server_set_max_inflight(struct nbd_server *srv, unsigned max)
{
	srv->max_inflight = max ? max : 1;
}

unsigned nbd_server_connections(const struct nbd_server *srv)
{
	return srv->nconns;
}

int nbd_server_add_export(struct nbd_server *srv, const char *name, const char *description,
			  struct td_disk *disk, bool readonly)
{
	struct nbd_export *e;
	struct tdr_list *pos;

	if (!name)
		name = "";
	if (strlen(name) > NBD_MAX_STRING) {
		tdr_set_error("export name too long (%zu bytes, at most %u); choose a shorter --export-name",
			      strlen(name), NBD_MAX_STRING);
		return -ENAMETOOLONG;
	}
	if (description && strlen(description) > NBD_MAX_STRING) {
		tdr_set_error("export description too long (at most %u bytes); shorten it",
			      NBD_MAX_STRING);
		return -EINVAL;
	}
	for (pos = srv->exports.next; pos != &srv->exports; pos = pos->next) {
		e = tdr_list_entry(pos, struct nbd_export, entry);
		if (!strcmp(e->name, name)) {
			tdr_set_error("export '%s' already exists; choose another export name", name);
			return -EEXIST;
		}
	}
	e = calloc(1, sizeof(*e));
	if (!e)
		goto nomem;
	e->name = strdup(name);
	if (!e->name)
		goto nomem;
	if (description) {
		e->description = strdup(description);
		if (!e->description)
			goto nomem;
	}
	e->disk = disk;
	e->readonly = readonly || (disk->flags & TD_OPEN_RDONLY);
	tdr_list_add_tail(&e->entry, &srv->exports);
	return 0;
nomem:
	if (e) {
		free(e->name);
		free(e->description);
		free(e);
	}
	tdr_set_error("out of memory adding export '%s'; free some memory", name);
	return -ENOMEM;
}

struct nbd_export *nbd_server_find_export(struct nbd_server *srv, const char *name, size_t len)
{
	struct tdr_list *pos;

	if (!srv)
		return NULL;
	for (pos = srv->exports.next; pos != &srv->exports; pos = pos->next) {
		struct nbd_export *e = tdr_list_entry(pos, struct nbd_export, entry);

		if (strlen(e->name) == len && (len == 0 || !memcmp(e->name, name, len)))
			return e;
	}
	/* "" is the default export: the first one, whatever its name. */
	if (len == 0)
		return tdr_list_first(&srv->exports, struct nbd_export, entry);
	return NULL;
}

void nbd_server_conn_gone(struct nbd_server *srv, struct nbd_conn *c)
{
	tdr_list_del(&c->entry);
	srv->nconns--;
	if (srv->shutting_down && srv->nconns == 0) {
		tdr_timer_cancel(&srv->shutdown_timer);
		tdr_loop_defer(srv->loop, &srv->done_defer);
	}
}

static int server_take_fd(struct nbd_server *srv, int fd)
{
	if (srv->shutting_down) {
		close(fd);
		return -ESHUTDOWN;
	}
	if (srv->nconns >= NBD_MAX_CONNECTIONS) {
		TDR_WARN("nbd: too many connections (%u); refusing a new one", srv->nconns);
		close(fd);
		return -EMFILE;
	}
	return nbd_conn_new(srv, fd) ? 0 : -ENOMEM;
}

int nbd_server_add_connection(struct nbd_server *srv, int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	return server_take_fd(srv, fd);
}

/* ------------------------------------------------------------------ */
/* Listeners */

static void listener_cb(struct tdr_fd_watch *w, uint32_t events, void *arg);

static void listener_set_watch(struct nbd_listener *l, bool on)
{
	if (on == l->watching)
		return;
	if (on) {
		if (tdr_loop_watch_fd(l->srv->loop, &l->watch, l->fd, EPOLLIN, listener_cb, l) == 0)
			l->watching = true;
	} else {
		tdr_loop_unwatch_fd(&l->watch);
		l->watching = false;
	}
}

static void listener_retry_cb(struct tdr_timer *t, void *arg)
{
	listener_set_watch(arg, true);
}

static void listener_cb(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct nbd_listener *l = arg;
	int i;

	for (i = 0; i < NBD_ACCEPT_BATCH; i++) {
		int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			/* Out of descriptors or memory: stop accepting
			 * for a moment instead of spinning. */
			TDR_WARN("nbd: %s: accept failed: %s; retrying shortly", l->desc,
				 strerror(errno));
			listener_set_watch(l, false);
			tdr_timer_arm(&l->retry, NBD_ACCEPT_RETRY_NS);
			break;
		}
		nbd_socket_tune(fd, l->tcp);
		server_take_fd(l->srv, fd);
	}
}

static struct nbd_listener *listener_new(struct nbd_server *srv, int fd, bool tcp)
{
	struct nbd_listener *l = calloc(1, sizeof(*l));

	if (!l)
		return NULL;
	l->srv = srv;
	l->fd = fd;
	l->tcp = tcp;
	tdr_list_init(&l->entry);
	tdr_timer_init(&l->retry, srv->loop, listener_retry_cb, l);
	return l;
}

static int listener_start(struct nbd_listener *l)
{
	int ret = tdr_loop_watch_fd(l->srv->loop, &l->watch, l->fd, EPOLLIN, listener_cb, l);

	if (ret < 0)
		return ret;
	l->watching = true;
	tdr_list_add_tail(&l->entry, &l->srv->listeners);
	return 0;
}

static void listener_free(struct nbd_listener *l)
{
	struct stat st;

	listener_set_watch(l, false);
	tdr_timer_cancel(&l->retry);
	if (l->fd >= 0)
		close(l->fd);
	/* Remove the socket file only if it is still the one we made. */
	if (l->unix_path && lstat(l->unix_path, &st) == 0 && st.st_dev == l->dev &&
	    st.st_ino == l->ino)
		unlink(l->unix_path);
	free(l->unix_path);
	tdr_list_del(&l->entry);
	free(l);
}

/* 0 if nobody accepts on path (stale), -EADDRINUSE if somebody does. */
static int unix_probe(const struct sockaddr_un *sa)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int ret, err;

	if (fd < 0)
		return -errno;
	ret = connect(fd, (const struct sockaddr *)sa, sizeof(*sa));
	err = errno;
	close(fd);
	if (ret == 0 || err == EAGAIN || err == EINPROGRESS)
		return -EADDRINUSE;	/* EAGAIN: alive, backlog full */
	if (err == ECONNREFUSED)
		return 0;
	return -err;
}

int nbd_server_listen_unix(struct nbd_server *srv, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct nbd_listener *l = NULL;
	struct stat st;
	mode_t old_mask;
	int fd = -1, ret, err;

	if (!path || !*path) {
		tdr_set_error("socket path is empty; give --socket PATH");
		return -EINVAL;
	}
	if (strlen(path) >= sizeof(sa.sun_path)) {
		tdr_set_error("socket %s: path too long (at most %zu bytes); choose a shorter --socket path",
			      path, sizeof(sa.sun_path) - 1);
		return -ENAMETOOLONG;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);

	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			tdr_set_error("socket %s: a file that is not a socket is in the way; remove it or choose another --socket",
				      path);
			return -EEXIST;
		}
		ret = unix_probe(&sa);
		if (ret == -EADDRINUSE) {
			tdr_set_error("socket %s: address in use; is another tapdisk-replica serving it? remove the file or choose another --socket",
				      path);
			return ret;
		}
		if (ret < 0) {
			tdr_set_error("socket %s: cannot check the existing socket: %s; remove it or choose another --socket",
				      path, strerror(-ret));
			return ret;
		}
		/* Stale: its server is gone. */
		TDR_DEBUG("nbd: replacing stale socket %s", path);
		if (unlink(path) < 0 && errno != ENOENT) {
			ret = -errno;
			tdr_set_error("socket %s: cannot remove the stale socket: %s; remove it by hand or choose another --socket",
				      path, strerror(errno));
			return ret;
		}
	}

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		ret = -errno;
		tdr_set_error("socket %s: cannot create a socket: %s; check system limits", path,
			      strerror(errno));
		return ret;
	}
	/* Mode 0600 from the start: no window where others could connect. */
	old_mask = umask(0177);
	ret = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	err = errno;
	umask(old_mask);
	if (ret < 0) {
		ret = -err;
		if (err == EADDRINUSE)
			tdr_set_error("socket %s: address in use; is another tapdisk-replica serving it? remove the file or choose another --socket",
				      path);
		else if (err == ENOENT || err == ENOTDIR)
			tdr_set_error("socket %s: the directory does not exist; create it or choose another --socket",
				      path);
		else if (err == EACCES || err == EPERM || err == EROFS)
			tdr_set_error("socket %s: permission denied; choose a --socket path in a directory you can write",
				      path);
		else
			tdr_set_error("socket %s: cannot bind: %s; choose another --socket", path,
				      strerror(err));
		goto fail;
	}
	if (listen(fd, SOMAXCONN) < 0) {
		ret = -errno;
		tdr_set_error("socket %s: cannot listen: %s; choose another --socket", path,
			      strerror(errno));
		unlink(path);
		goto fail;
	}
	l = listener_new(srv, fd, false);
	if (!l || !(l->unix_path = strdup(path)) || lstat(path, &st) < 0) {
		ret = -ENOMEM;
		tdr_set_error("socket %s: out of memory; free some memory", path);
		unlink(path);
		goto fail;
	}
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	snprintf(l->desc, sizeof(l->desc), "unix:%s", path);
	ret = listener_start(l);
	if (ret < 0) {
		tdr_set_error("socket %s: cannot watch it: %s; check system limits", path,
			      strerror(-ret));
		listener_free(l);	/* closes fd and removes the file */
		return ret;
	}
	return 0;
fail:
	if (l) {
		free(l->unix_path);
		free(l);
	}
	close(fd);
	return ret;
}

static void format_addr(const struct sockaddr *sa, char *buf, size_t len)
{
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;

	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
		port = ntohs(in->sin_port);
		snprintf(buf, len, "tcp:%s:%u", host, port);
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;

		inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
		port = ntohs(in6->sin6_port);
		snprintf(buf, len, "tcp:[%s]:%u", host, port);
	} else {
		snprintf(buf, len, "tcp:?");
	}
}

static void set_port(struct sockaddr *sa, uint16_t port_be)
{
	if (sa->sa_family == AF_INET)
		((struct sockaddr_in *)sa)->sin_port = port_be;
	else if (sa->sa_family == AF_INET6)
		((struct sockaddr_in6 *)sa)->sin6_port = port_be;
}

static uint16_t get_port(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return ((const struct sockaddr_in *)sa)->sin_port;
	if (sa->sa_family == AF_INET6)
		return ((const struct sockaddr_in6 *)sa)->sin6_port;
	return 0;
}

int nbd_server_listen_tcp(struct nbd_server *srv, const char *host, const char *port)
{
	struct nbd_listener *ls[NBD_MAX_TCP_LISTENERS];
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC };
	struct addrinfo *res = NULL, *ai;
	const char *h = (host && *host) ? host : NULL;
	const char *shown = h ? h : "localhost";
	uint16_t bound_port = 0;
	int n = 0, i, ret, last_err = 0;

	if (!port || !*port) {
		tdr_set_error("tcp %s: no port given; use --tcp HOST:PORT", shown);
		return -EINVAL;
	}
	/* No AI_PASSIVE: without a host, getaddrinfo gives loopback. */
	hints.ai_flags = AI_NUMERICSERV;
	ret = getaddrinfo(h, port, &hints, &res);
	if (ret) {
		tdr_set_error("tcp %s:%s: %s; give --tcp HOST:PORT with a valid host and numeric port",
			      shown, port, gai_strerror(ret));
		return -EINVAL;
	}
	for (ai = res; ai && n < NBD_MAX_TCP_LISTENERS; ai = ai->ai_next) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		int one = 1;
		int fd;

		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    ai->ai_protocol);
		if (fd < 0) {
			last_err = errno;
			continue;	/* e.g. no IPv6 in this kernel */
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (ai->ai_family == AF_INET6)
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		/* Port 0: every address gets the port the first one got. */
		if (bound_port && get_port(ai->ai_addr) == 0)
			set_port(ai->ai_addr, bound_port);
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
			last_err = errno;
			close(fd);
			if (last_err == EADDRINUSE)
				break;
			continue;	/* EADDRNOTAVAIL: e.g. ::1 not configured */
		}
		if (listen(fd, SOMAXCONN) < 0 ||
		    getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) {
			last_err = errno;
			close(fd);
			continue;
		}
		ls[n] = listener_new(srv, fd, true);
		if (!ls[n]) {
			close(fd);
			last_err = ENOMEM;
			break;
		}
		bound_port = get_port((struct sockaddr *)&ss);
		format_addr((struct sockaddr *)&ss, ls[n]->desc, sizeof(ls[n]->desc));
		n++;
	}
	freeaddrinfo(res);

	if (last_err == EADDRINUSE || last_err == ENOMEM || n == 0) {
		if (last_err == EADDRINUSE)
			tdr_set_error("tcp %s:%s: address in use; is another server listening there? stop it or choose another --tcp port",
				      shown, port);
		else if (last_err == EACCES)
			tdr_set_error("tcp %s:%s: permission denied; use a port above 1023 or run as root",
				      shown, port);
		else
			tdr_set_error("tcp %s:%s: cannot listen: %s; check the --tcp address",
				      shown, port, strerror(last_err ? last_err : EADDRNOTAVAIL));
		ret = -(last_err ? last_err : EADDRNOTAVAIL);
		goto fail;
	}
	for (i = 0; i < n; i++) {
		ret = listener_start(ls[i]);
		if (ret < 0) {
			tdr_set_error("tcp %s:%s: cannot watch the socket: %s; check system limits",
				      shown, port, strerror(-ret));
			goto fail;
		}
	}
	return 0;
fail:
	/* listener_free() unlinks from srv->listeners only those started. */
	for (i = 0; i < n; i++)
		listener_free(ls[i]);
	return ret;
}

void nbd_server_describe(struct nbd_server *srv, char *buf, size_t len)
{
	struct tdr_list *pos;
	size_t used = 0;

	if (!len)
		return;
	buf[0] = '\0';
	for (pos = srv->listeners.next; pos != &srv->listeners; pos = pos->next) {
		struct nbd_listener *l = tdr_list_entry(pos, struct nbd_listener, entry);
		int n = snprintf(buf + used, len - used, "%s%s", used ? " " : "", l->desc);

		if (n < 0 || (size_t)n >= len - used)
			break;
		used += (size_t)n;
	}
}

static void close_listeners(struct nbd_server *srv)
{
	while (!tdr_list_empty(&srv->listeners))
		listener_free(tdr_list_first(&srv->listeners, struct nbd_listener, entry));
}

void nbd_server_shutdown(struct nbd_server *srv, void (*done)(void *arg), void *arg)
{
	struct tdr_list *pos, *tmp;

	srv->done = done;
	srv->done_arg = arg;
	if (srv->shutting_down)
		return;
	srv->shutting_down = true;
	close_listeners(srv);
	tdr_list_for_each_safe(pos, tmp, &srv->conns)
		nbd_conn_shutdown(tdr_list_entry(pos, struct nbd_conn, entry));
	if (srv->nconns == 0)
		tdr_loop_defer(srv->loop, &srv->done_defer);
	else
		tdr_timer_arm(&srv->shutdown_timer, NBD_SHUTDOWN_GRACE_NS);
}

void nbd_server_free(struct nbd_server *srv)
{
	struct tdr_list *pos, *tmp;

	if (!srv)
		return;
	close_listeners(srv);
	srv->shutting_down = true;
	srv->done = NULL;
	tdr_list_for_each_safe(pos, tmp, &srv->conns) {
		struct nbd_conn *c = tdr_list_entry(pos, struct nbd_conn, entry);

		/* Keep c alive across the kill to detach it if requests are
		 * still in the disk: they free it when they complete. */
		nbd_conn_get(c);
		nbd_conn_kill(c, "server freed");
		tdr_list_del(&c->entry);
		tdr_list_init(&c->entry);
		c->srv = NULL;
		srv->nconns--;
		nbd_conn_put(c);
	}
	while (!tdr_list_empty(&srv->exports)) {
		struct nbd_export *e = tdr_list_first(&srv->exports, struct nbd_export, entry);

		tdr_list_del(&e->entry);
		free(e->name);
		free(e->description);
		free(e);
	}
	tdr_timer_cancel(&srv->shutdown_timer);
	tdr_loop_cancel_defer(srv->loop, &srv->done_defer);
	/* Every connection's TLS session is gone with its transport. */
	nbd_tls_free(srv->tls);
	free(srv);
}
