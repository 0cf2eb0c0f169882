/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The `serve` command: open one disk, serve it over NBD until SIGTERM or
 * SIGINT, then stop accepting, drain, flush and close.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "serve.h"
#include "tdr/ctl-server.h"
#include "tdr/image.h"
#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "tdr/nbd.h"
#ifdef HAVE_XENSTORE
#include "tdr/xenstore.h"
#endif

#define SERVE_IO_DEPTH 256

struct serve_ctx {
	const struct tdr_serve_opts *o;
	struct tdr_loop *loop;
	struct tdr_io_ctx *io;
	struct td_disk *disk;
	struct nbd_server *srv;
	int sfd;
	struct tdr_fd_watch sig_watch;
	bool sig_watching;
	bool stopping;
	int flush_err;
	struct td_request flush_req;
	struct td_quiesce quiesce;
	bool pid_written;
	struct ctl_server *ctl;
#ifdef HAVE_XENSTORE
	struct tdr_xs_ctl *xs;		/* xenstore control directory, or NULL */
#endif
	ctl_done_fn ctl_done;		/* a CLOSE over the control socket waits */
	void *ctl_done_arg;
};

static bool all_digits(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (!isdigit((unsigned char)*s))
			return false;
	return true;
}

int tdr_parse_hostport(const char *s, char *host, size_t hostlen, char *port, size_t portlen)
{
	const char *h = "", *p;
	size_t hl = 0;

	if (!s || !*s) {
		tdr_set_error("--tcp needs HOST:PORT; e.g. --tcp 127.0.0.1:10809");
		return -EINVAL;
	}
	if (s[0] == '[') {
		const char *end = strchr(s, ']');

		if (!end || end[1] != ':') {
			tdr_set_error("--tcp %s: expected [IPV6-ADDRESS]:PORT; e.g. --tcp [::1]:10809", s);
			return -EINVAL;
		}
		h = s + 1;
		hl = (size_t)(end - h);
		p = end + 2;
	} else if (all_digits(s)) {
		p = s;	/* just a port: loopback */
	} else {
		const char *colon = strrchr(s, ':');

		if (!colon) {
			tdr_set_error("--tcp %s: no port; use --tcp HOST:PORT, e.g. --tcp 127.0.0.1:10809", s);
			return -EINVAL;
		}
		if (memchr(s, ':', (size_t)(colon - s))) {
			tdr_set_error("--tcp %s: put an IPv6 address in brackets; e.g. --tcp [::1]:10809", s);
			return -EINVAL;
		}
		h = s;
		hl = (size_t)(colon - s);
		p = colon + 1;
	}
	if (!all_digits(p) || strlen(p) > 5 || atoi(p) > 65535) {
		tdr_set_error("--tcp %s: bad port '%s'; use a number from 0 to 65535", s, p);
		return -EINVAL;
	}
	if (hl >= hostlen || strlen(p) >= portlen) {
		tdr_set_error("--tcp %s: host name too long; use a shorter host name or an address", s);
		return -EINVAL;
	}
	memcpy(host, h, hl);
	host[hl] = '\0';
	strcpy(port, p);
	return 0;
}

static void on_flush_done(struct td_request *req, int err, void *arg)
{
	struct serve_ctx *ctx = arg;

	if (err) {
		ctx->flush_err = err;
		tdr_set_error("final flush of %s failed: %s; the last writes may not be durable, check the image's storage",
			      ctx->o->spec, strerror(-err));
	}
	if (ctx->ctl_done)
		ctx->ctl_done(ctx->ctl_done_arg, err, err ? tdr_last_error() : "");
	tdr_loop_stop(ctx->loop);
}

static void on_quiesced(struct td_disk *disk, void *arg)
{
	struct serve_ctx *ctx = arg;

	TDR_DEBUG("nothing in flight; flushing %s", ctx->o->spec);
	td_request_init(&ctx->flush_req, TD_OP_FLUSH, 0, 0, NULL, on_flush_done, ctx);
	td_disk_submit(disk, &ctx->flush_req);
}

static void on_server_done(void *arg)
{
	struct serve_ctx *ctx = arg;

	/* No client is left; the images' own work (a replica's export, a
	 * failover's copies) ends before the flush and the close. */
	TDR_DEBUG("all connections closed; quiescing %s", ctx->o->spec);
	td_disk_quiesce(ctx->disk, &ctx->quiesce, on_quiesced, ctx);
}

static void on_signal(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct serve_ctx *ctx = arg;
	struct signalfd_siginfo si;

	while (read(ctx->sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (ctx->stopping) {
			TDR_INFO("received %s again; still waiting for requests in flight",
				 strsignal((int)si.ssi_signo));
			continue;
		}
		ctx->stopping = true;
		TDR_INFO("received %s; stopping: no new connections, draining requests in flight",
			 strsignal((int)si.ssi_signo));
		/* Paused requests must drain too. */
		ctl_server_shutdown(ctx->ctl);
		nbd_server_shutdown(ctx->srv, on_server_done, ctx);
	}
}

/* tap-ctl close of minor 0: the same stop as SIGTERM, answered once flushed. */
static void on_ctl_close(void *arg, int minor, struct td_disk *disk, ctl_done_fn done,
			 void *done_arg)
{
	struct serve_ctx *ctx = arg;

	ctx->ctl_done = done;
	ctx->ctl_done_arg = done_arg;
	if (ctx->stopping)
		return;	/* a signal started the same stop: answer when it ends */
	ctx->stopping = true;
	TDR_INFO("closed over the control socket; stopping: no new connections, draining requests in flight");
	nbd_server_shutdown(ctx->srv, on_server_done, ctx);
}

static int setup_signals(struct serve_ctx *ctx)
{
	sigset_t set;
	int ret;

	/* A client that vanishes must not kill us. */
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		goto fail;
	ctx->sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (ctx->sfd < 0)
		goto fail;
	ret = tdr_loop_watch_fd(ctx->loop, &ctx->sig_watch, ctx->sfd, EPOLLIN, on_signal, ctx);
	if (ret < 0) {
		errno = -ret;
		goto fail;
	}
	ctx->sig_watching = true;
	return 0;
fail:
	ret = -errno;
	tdr_set_error("cannot set up signal handling: %s; check system limits", strerror(errno));
	return ret;
}

static int write_pid_file(struct serve_ctx *ctx)
{
	const char *path = ctx->o->pid_file;
	char buf[32];
	int fd, n, ret = 0;

	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		ret = -errno;
		tdr_set_error("pid file %s: %s; choose another --pid-file", path, strerror(errno));
		return ret;
	}
	n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
	if (write(fd, buf, (size_t)n) != n) {
		ret = errno ? -errno : -EIO;
		tdr_set_error("pid file %s: cannot write: %s; choose another --pid-file", path,
			      strerror(-ret));
		unlink(path);
	} else {
		ctx->pid_written = true;
	}
	close(fd);
	return ret;
}

int tdr_serve(const struct tdr_serve_opts *o)
{
	struct serve_ctx ctx = { .o = o, .sfd = -1 };
	char host[256], port[8], where[1024];
	unsigned flags = TD_OPEN_QUIET;
	int ret;

	if (o->tcp) {
		ret = tdr_parse_hostport(o->tcp, host, sizeof(host), port, sizeof(port));
		if (ret < 0)
			return ret;
	}

	ctx.loop = tdr_loop_new();
	if (!ctx.loop) {
		ret = -errno;
		tdr_set_error("cannot create the event loop: %s; check system limits", strerror(errno));
		goto out;
	}
	tdr_loop_set_poll_max(ctx.loop, o->poll_max_ns);
	/* Signals are blocked before anything slow happens, so a SIGTERM
	 * during start-up is not lost: it stops us once the loop runs. */
	ret = setup_signals(&ctx);
	if (ret < 0)
		goto out;
	ctx.io = tdr_io_ctx_new(ctx.loop, SERVE_IO_DEPTH);
	if (!ctx.io) {
		ret = -ENOMEM;
		tdr_set_error("cannot set up asynchronous I/O (io_setup); check /proc/sys/fs/aio-max-nr");
		goto out;
	}

	if (o->readonly)
		flags |= TD_OPEN_RDONLY;
	tdr_clear_error();
	ret = td_disk_open(&ctx.disk, o->spec, flags, ctx.loop, ctx.io);
	if (ret < 0) {
		if (!*tdr_last_error())
			tdr_set_error("%s: cannot open: %s; check the image spec", o->spec,
				      strerror(-ret));
		ctx.disk = NULL;
		goto out;
	}
	if (ctx.disk->size_secs == 0) {
		ret = -EINVAL;
		tdr_set_error("%s: the image is empty (0 bytes); nothing to serve, give an image with a size",
			      o->spec);
		goto out;
	}

	ctx.srv = nbd_server_new(ctx.loop);
	if (!ctx.srv) {
		ret = -ENOMEM;
		tdr_set_error("out of memory creating the NBD server; free some memory");
		goto out;
	}
	ret = nbd_server_add_export(ctx.srv, o->export_name ? o->export_name : "", o->spec,
				    ctx.disk, o->readonly);
	if (ret < 0)
		goto out;
	ret = nbd_server_set_tls(ctx.srv, &o->tls);
	if (ret < 0)
		goto out;
	if (o->socket_path) {
		ret = nbd_server_listen_unix(ctx.srv, o->socket_path);
		if (ret < 0)
			goto out;
	}
	if (o->tcp) {
		ret = nbd_server_listen_tcp(ctx.srv, host, port);
		if (ret < 0)
			goto out;
	}
	if (o->pid_file) {
		ret = write_pid_file(&ctx);
		if (ret < 0)
			goto out;
	}

	if (o->control_path) {
		struct ctl_hooks hooks = { .close = on_ctl_close, .arg = &ctx };

		ctx.ctl = ctl_server_new(ctx.loop, o->control_path);
		if (!ctx.ctl) {
			ret = -errno;
			goto out;
		}
		ctl_server_set_hooks(ctx.ctl, &hooks);
		ret = ctl_server_add_minor(ctx.ctl, 0, ctx.disk, o->spec);
		if (ret < 0) {
			tdr_set_error("out of memory setting up the control socket; free some memory");
			goto out;
		}
		TDR_INFO("control socket %s (minor 0)", ctl_server_path(ctx.ctl));
	}

	if (o->xs_dir) {
#ifdef HAVE_XENSTORE
		struct tdr_xs_opts xo = { .dir = o->xs_dir, .xs_path = o->xs_path };

		ret = tdr_xs_ctl_new_disk(&ctx.xs, ctx.loop, &xo, ctx.disk);
		if (ret < 0)
			goto out;
		TDR_INFO("xenstore control directory %s", o->xs_dir);
#else
		ret = -ENOTSUP;
		tdr_set_error("--xs-dir: built without xenstore support; install libxen-dev and rebuild");
		goto out;
#endif
	}

	nbd_server_describe(ctx.srv, where, sizeof(where));
	/* Scripts wait for this exact shape; keep it stable. */
	TDR_INFO("serving %s (%llu bytes) on %s", o->spec,
		 (unsigned long long)(ctx.disk->size_secs << TD_SECTOR_SHIFT), where);
	if (o->readonly)
		TDR_INFO("the export is read-only");

	ret = tdr_loop_run(ctx.loop);
	if (ret < 0) {
		tdr_set_error("event loop failed: %s; this is a bug, please report it", strerror(-ret));
		goto out;
	}
	ret = ctx.flush_err;
	if (!ret)
		TDR_INFO("stopped; %s flushed and closed", o->spec);
out:
	if (ctx.pid_written)
		unlink(o->pid_file);
	/* Before the disk closes: it may still hold paused requests. */
	td_disk_quiesce_cancel(&ctx.quiesce);
	ctl_server_free(ctx.ctl);
#ifdef HAVE_XENSTORE
	/* Before the disk: it observes the replica. */
	tdr_xs_ctl_free(ctx.xs);
#endif
	/* Removes the socket files; connections are all closed by now on a
	 * normal stop. */
	nbd_server_free(ctx.srv);
	if (ctx.disk)
		td_disk_close(ctx.disk);
	if (ctx.io)
		tdr_io_ctx_free(ctx.io);
	if (ctx.sig_watching)
		tdr_loop_unwatch_fd(&ctx.sig_watch);
	if (ctx.sfd >= 0)
		close(ctx.sfd);
	if (ctx.loop)
		tdr_loop_free(ctx.loop);
	return ret;
}
