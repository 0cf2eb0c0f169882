/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The `daemon` command: a tapdisk-replica process with no disk at start,
 * managed over its control socket like blktap's tapdisk.  Each OPEN opens a
 * disk and serves it as an NBD export on its own UNIX socket,
 * <nbd-dir>/nbd<pid>.<minor>; CLOSE stops that export, flushes and closes
 * the disk.  SIGTERM/SIGINT close every disk the same way, then exit.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/ctl-server.h"
#include "tdr/image.h"
#include "tdr/io.h"
#include "tdr/list.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "tdr/nbd.h"
#include "tdr/readahead.h"

#define DAEMON_IO_DEPTH 256
#define DEFAULT_NBD_DIR "/var/run/tapdisk-replica"

struct daemon;

/* One opened minor: its disk and its NBD server. */
struct dminor {
	struct tdr_list entry;
	struct daemon *d;
	int minor;
	struct td_disk *disk;
	struct nbd_server *nbd;
	char *sock;
	struct td_request flush;
	struct td_quiesce quiesce;
	struct tdr_defer fin;		/* the disk is closed outside its own callback */
	int flush_err;
	ctl_done_fn done;		/* NULL when closing for the daemon's exit */
	void *done_arg;
	bool closing;
};

struct daemon {
	const char *prog;
	const char *nbd_dir;
	bool control_is_dir;	/* the control path is the default directory, not --control's */
	struct tdr_loop *loop;
	uint64_t poll_max_ns;	/* --poll-max-us */
	struct tdr_io_ctx *io;
	struct ctl_server *ctl;
	struct tdr_list minors;
	int sfd;
	struct tdr_fd_watch sig_watch;
	bool sig_watching;
	bool stopping;
	int exit_err;
};

static void dminor_free(struct dminor *m)
{
	tdr_loop_cancel_defer(m->d->loop, &m->fin);
	td_disk_quiesce_cancel(&m->quiesce);
	tdr_list_del(&m->entry);
	/* Removes the export's socket file. */
	nbd_server_free(m->nbd);
	if (m->disk)
		td_disk_close(m->disk);
	free(m->sock);
	free(m);
}

static void maybe_exit(struct daemon *d)
{
	if (d->stopping && tdr_list_empty(&d->minors))
		tdr_loop_stop(d->loop);
}

static void dminor_finish(void *arg)
{
	struct dminor *m = arg;
	struct daemon *d = m->d;
	ctl_done_fn done = m->done;
	void *done_arg = m->done_arg;
	int err = m->flush_err;
	char msg[256] = "";

	if (err) {
		snprintf(msg, sizeof(msg), "final flush of minor %d failed: %s; the last writes may not be durable",
			 m->minor, strerror(-err));
		TDR_ERR("%s", msg);
		d->exit_err = err;
	}
	TDR_INFO("minor %d: flushed and closed", m->minor);
	/* Closing for our exit: the control server must forget the disk first. */
	if (!done)
		ctl_server_remove_minor(d->ctl, m->minor);
	dminor_free(m);
	if (done)
		done(done_arg, err, msg);
	maybe_exit(d);
}

static void on_flushed(struct td_request *req, int err, void *arg)
{
	struct dminor *m = arg;

	/* td_disk_submit still touches the disk after this callback returns. */
	m->flush_err = err;
	tdr_loop_defer(m->d->loop, &m->fin);
}

static void on_quiesced(struct td_disk *disk, void *arg)
{
	struct dminor *m = arg;

	td_request_init(&m->flush, TD_OP_FLUSH, 0, 0, NULL, on_flushed, m);
	td_disk_submit(disk, &m->flush);
}

static void on_nbd_stopped(void *arg)
{
	struct dminor *m = arg;

	/* Every connection is gone; the images' own work ends next. */
	td_disk_quiesce(m->disk, &m->quiesce, on_quiesced, m);
}

static void dminor_close(struct dminor *m, ctl_done_fn done, void *done_arg)
{
	if (m->closing)
		return;
	m->closing = true;
	m->done = done;
	m->done_arg = done_arg;
	nbd_server_shutdown(m->nbd, on_nbd_stopped, m);
}

static struct dminor *dminor_find(struct daemon *d, int minor)
{
	struct tdr_list *pos;

	for (pos = d->minors.next; pos != &d->minors; pos = pos->next) {
		struct dminor *m = tdr_list_entry(pos, struct dminor, entry);

		if (m->minor == minor)
			return m;
	}
	return NULL;
}

static int hook_open(void *arg, int minor, const char *spec, unsigned flags, struct td_disk **out,
		     char *msg, size_t msglen)
{
	struct daemon *d = arg;
	struct dminor *m;
	int ret;

	if (d->stopping) {
		snprintf(msg, msglen, "the daemon is shutting down");
		return -ESHUTDOWN;
	}
	m = calloc(1, sizeof(*m));
	if (!m || asprintf(&m->sock, "%s/nbd%ld.%d", d->nbd_dir, (long)getpid(), minor) < 0) {
		free(m);
		snprintf(msg, msglen, "out of memory opening minor %d", minor);
		return -ENOMEM;
	}
	m->d = d;
	m->minor = minor;
	tdr_defer_init(&m->fin, dminor_finish, m);
	tdr_list_add_tail(&m->entry, &d->minors);
	tdr_clear_error();
	ret = td_disk_open(&m->disk, spec, flags | TD_OPEN_QUIET, d->loop, d->io);
	if (ret < 0) {
		m->disk = NULL;
		if (!*tdr_last_error())
			tdr_set_error("%s: cannot open: %s", spec, strerror(-ret));
		goto fail;
	}
	m->nbd = nbd_server_new(d->loop);
	if (!m->nbd) {
		ret = -ENOMEM;
		tdr_set_error("out of memory creating the NBD server of minor %d", minor);
		goto fail;
	}
	ret = nbd_server_add_export(m->nbd, "", spec, m->disk, flags & TD_OPEN_RDONLY);
	if (ret < 0)
		goto fail;
	ret = nbd_server_listen_unix(m->nbd, m->sock);
	if (ret < 0)
		goto fail;
	TDR_INFO("minor %d: serving %s (%llu bytes%s) on unix:%s", minor, spec,
		 (unsigned long long)(m->disk->size_secs << TD_SECTOR_SHIFT),
		 (flags & TD_OPEN_RDONLY) ? ", read-only" : "", m->sock);
	*out = m->disk;
	return 0;
fail:
	snprintf(msg, msglen, "%s", tdr_last_error());
	dminor_free(m);
	return ret;
}

static void hook_close(void *arg, int minor, struct td_disk *disk, ctl_done_fn done, void *done_arg)
{
	struct daemon *d = arg;
	struct dminor *m = dminor_find(d, minor);

	if (!m || m->disk != disk) {
		done(done_arg, -ENODEV, "no such disk in this daemon");
		return;
	}
	if (m->closing) {
		/*
		 * Closing for the daemon's exit (SIGTERM) already: the client
		 * gets that close's own outcome, not a refusal of a close
		 * that is happening anyway.
		 */
		if (!m->done) {
			m->done = done;
			m->done_arg = done_arg;
			return;
		}
		done(done_arg, -EBUSY, "already closing");
		return;
	}
	TDR_INFO("minor %d: closing", minor);
	dminor_close(m, done, done_arg);
}

static void on_signal(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct daemon *d = arg;
	struct signalfd_siginfo si;
	struct tdr_list *pos, *tmp;

	while (read(d->sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (d->stopping)
			continue;
		d->stopping = true;
		TDR_INFO("received %s; closing every disk", strsignal((int)si.ssi_signo));
		ctl_server_shutdown(d->ctl);
		tdr_list_for_each_safe(pos, tmp, &d->minors)
			dminor_close(tdr_list_entry(pos, struct dminor, entry), NULL, NULL);
		maybe_exit(d);
	}
}

static int setup(struct daemon *d, const char *control)
{
	sigset_t set;
	struct ctl_hooks hooks = { .open = hook_open, .close = hook_close, .arg = d };
	int ret;

	d->loop = tdr_loop_new();
	if (!d->loop) {
		tdr_set_error("cannot create the event loop: %s; check system limits", strerror(errno));
		return -ENOMEM;
	}
	tdr_loop_set_poll_max(d->loop, d->poll_max_ns);
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0 ||
	    (d->sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
		ret = -errno;
		tdr_set_error("cannot set up signal handling: %s; check system limits", strerror(errno));
		return ret;
	}
	ret = tdr_loop_watch_fd(d->loop, &d->sig_watch, d->sfd, EPOLLIN, on_signal, d);
	if (ret < 0) {
		tdr_set_error("cannot watch signals: %s", strerror(-ret));
		return ret;
	}
	d->sig_watching = true;
	d->io = tdr_io_ctx_new(d->loop, DAEMON_IO_DEPTH);
	if (!d->io) {
		tdr_set_error("cannot set up asynchronous I/O (io_setup); check /proc/sys/fs/aio-max-nr");
		return -ENOMEM;
	}
	if (mkdir(d->nbd_dir, 0700) < 0 && errno != EEXIST) {
		ret = -errno;
		tdr_set_error("NBD socket directory %s: %s; create it or choose another --nbd-dir",
			      d->nbd_dir, strerror(errno));
		return ret;
	}
	/* The default place is a directory, as tap-ctl expects: make it, or
	 * the socket would take the directory's name. */
	if (d->control_is_dir) {
		struct stat st;

		if (mkdir(control, 0700) < 0 && errno != EEXIST) {
			ret = -errno;
			tdr_set_error("control directory %s: %s; create it, set TDR_CONTROL_DIR or give --control PATH",
				      control, strerror(errno));
			return ret;
		}
		if (stat(control, &st) < 0 || !S_ISDIR(st.st_mode)) {
			tdr_set_error("control directory %s: not a directory (a socket of an older daemon?); remove it, set TDR_CONTROL_DIR or give --control PATH",
				      control);
			return -ENOTDIR;
		}
	}
	d->ctl = ctl_server_new(d->loop, control);
	if (!d->ctl)
		return -errno;
	ctl_server_set_hooks(d->ctl, &hooks);
	return 0;
}

static int run(struct daemon *d, const char *control)
{
	struct tdr_list *pos, *tmp;
	int ret;

	ret = setup(d, control);
	if (ret < 0)
		goto out;
	/* Scripts wait for "serving". */
	TDR_INFO("serving: control socket %s; disks opened over it are exported as %s/nbd%ld.MINOR",
		 ctl_server_path(d->ctl), d->nbd_dir, (long)getpid());
	ret = tdr_loop_run(d->loop);
	if (ret < 0) {
		tdr_set_error("event loop failed: %s; this is a bug, please report it", strerror(-ret));
		goto out;
	}
	ret = d->exit_err;
	if (!ret)
		TDR_INFO("stopped; every disk flushed and closed");
out:
	ctl_server_free(d->ctl);
	tdr_list_for_each_safe(pos, tmp, &d->minors)
		dminor_free(tdr_list_entry(pos, struct dminor, entry));
	if (d->io)
		tdr_io_ctx_free(d->io);
	if (d->sig_watching)
		tdr_loop_unwatch_fd(&d->sig_watch);
	if (d->sfd >= 0)
		close(d->sfd);
	if (d->loop)
		tdr_loop_free(d->loop);
	return ret;
}

static int usage_error(const char *prog, const char *fmt, const char *arg)
{
	fprintf(stderr, "%s: ", prog);
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "; see %s daemon --help\n", prog);
	return 2;
}

int tdr_daemon_main(int argc, char **argv, const char *prog)
{
	static const struct option longopts[] = {
		{ "control", required_argument, NULL, 'c' },
		{ "nbd-dir", required_argument, NULL, 'n' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "syslog", no_argument, NULL, 'S' },
		{ "readahead", required_argument, NULL, 'A' },
		{ "poll-max-us", required_argument, NULL, 'O' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct daemon d = { .prog = prog, .nbd_dir = DEFAULT_NBD_DIR, .sfd = -1, .control_is_dir = true };
	const char *control = getenv("TDR_CONTROL_DIR");
	enum tdr_log_level level = TDR_LOG_INFO;
	bool use_syslog = false;
	int c, ret;

	if (!control || !*control)
		control = BLKTAP_CONTROL_DIR;
	tdr_list_init(&d.minors);
	opterr = 0;
	optind = 1;
	while ((c = getopt_long(argc, argv, ":c:n:l:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'c':
			control = optarg;
			d.control_is_dir = false;
			break;
		case 'n':
			d.nbd_dir = optarg;
			break;
		case 'l':
			if (tdr_log_parse_level(optarg, &level) < 0)
				return usage_error(prog, "bad --log-level '%s'; use err, warn, info or debug",
						   optarg);
			break;
		case 'S':
			use_syslog = true;
			break;
		case 'A': {
			size_t window;

			if (tdr_ra_parse_window(optarg, &window) < 0)
				return usage_error(prog, TDR_RA_WINDOW_ERROR, optarg);
			td_set_readahead(window);
			break;
		}
		case 'O':
			if (tdr_loop_parse_poll_us(optarg, &d.poll_max_ns) < 0)
				return usage_error(prog, TDR_LOOP_POLL_ERROR, optarg);
			break;
		case 'h':
			printf("Usage: %s daemon [--control PATH] [--nbd-dir DIR] [--log-level LEVEL] [--syslog]\n"
			       "       [--readahead SIZE] [--poll-max-us N]\n"
			       "\n"
			       "Starts with no disk; tap-ctl or tdr-ctl open disks over the control socket\n"
			       "(default: a socket ctlPID in $TDR_CONTROL_DIR or " BLKTAP_CONTROL_DIR ").\n"
			       "Each disk is served over NBD on DIR/nbdPID.MINOR (default DIR "
			       DEFAULT_NBD_DIR ").\n"
			       "--readahead: read-ahead for sequential reads of raw (aio) images, whole\n"
			       "MiB, default 8M, 0 turns it off.\n"
			       "--poll-max-us: before sleeping, look for requests and completions for up\n"
			       "to N microseconds (adaptive; 0, the default: never).\n"
			       "SIGTERM or SIGINT closes every disk (drain, flush) and exits.\n", prog);
			return 0;
		case ':':
			return usage_error(prog, "option %s needs an argument", argv[optind - 1]);
		default:
			return usage_error(prog, "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc)
		return usage_error(prog, "unexpected argument '%s' (daemon takes no disk)", argv[optind]);
	tdr_log_init(prog, use_syslog, level);
	ret = run(&d, control);
	if (ret < 0) {
		fprintf(stderr, "%s: %s\n", prog, *tdr_last_error() ? tdr_last_error() : strerror(-ret));
		return 1;
	}
	return 0;
}
