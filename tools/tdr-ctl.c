/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * tdr-ctl: talks to tapdisk-replica daemons over their control sockets,
 * with blktap3 tap-ctl's commands and options where they apply, plus the
 * replica operations.  See docs/man/tdr-ctl.8.
 *
 * Exit status: 0 on success; the daemon's errno value when it refused a
 * request; 64 for usage errors; 69 when the daemon could not be reached
 * (no such daemon, broken connection); 75 when -t ran out.  Every failure prints one line on
 * stderr:
 * "tdr-ctl: <what failed>: <why>".
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <glob.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/ctl-message.h"

#define PROG "tdr-ctl"
/*
 * Exit statuses: a refusal by the daemon exits with its errno value (1 to
 * 133), so that the two fixed ones must lie elsewhere: sysexits.h's
 * EX_USAGE and EX_UNAVAILABLE (errno 64 and 69, ENONET and ESRMNT, are
 * never a daemon's answer).
 */
#define EXIT_USAGE 64
#define EXIT_NO_DAEMON 69
/* -t SECS ran out: the daemon goes on with the request (EX_TEMPFAIL). */
#define EXIT_WAITED 75
/* Quick requests; pause, close and replica operations wait as long as they take. */
#define QUICK_TIMEOUT_MS 10000

struct target {
	long pid;		/* -1: unknown (-s without -p) */
	int minor;		/* -1: none */
	const char *socket;	/* -s, or NULL */
	char path[PATH_MAX];
	int timeout_ms;		/* -t, -1: none */
};

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs(PROG ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("; see " PROG " --help\n", stderr);
	return EXIT_USAGE;
}

/*
 * One line on stderr; returns the exit status for err: a positive errno
 * value (the daemon's answer), or 0: the daemon could not be reached or
 * did not answer (EXIT_NO_DAEMON).
 */
static int failure(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int failure(int err, const char *fmt, ...)
{
	va_list ap;

	fputs(PROG ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return err > 0 && err < 256 ? err : EXIT_NO_DAEMON;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: " PROG " COMMAND [OPTIONS]\n"
		"\n"
		"Commands (the blktap3 tap-ctl subset that applies, plus replica):\n"
		"  list    [-p PID] [-m MINOR] [-t TYPE] [-f FILE]\n"
		"  pause   -p PID -m MINOR [-t SECS]\n"
		"  unpause -p PID -m MINOR [-a TYPE:/PATH] [-t SECS]\n"
		"  stats   -p PID -m MINOR [-t SECS]\n"
		"  open    -p PID -m MINOR -a TYPE:/PATH [-R] [-D] [-t SECS]\n"
		"  close   -p PID -m MINOR [-f] [-t SECS]\n"
		"  attach  -p PID -m MINOR [-t SECS]\n"
		"  detach  -p PID -m MINOR [-t SECS]\n"
		"  replica -p PID -m MINOR [-t SECS] OPERATION [ARGS...]\n"
		"          start [mode=primary|secondary] [addr=ADDR] [export=NAME] [timeout=MS] [sync=both|local]\n"
		"          checkpoint | stop [failover] | failover | resync [full|incremental]\n"
		"          get-error | status [KEY...]\n"
		"\n"
		"Every command also takes -s SOCKET to name a control socket instead of -p PID.\n"
		"-t SECS: stop waiting for the daemon's answer after SECS seconds (not list).\n"
		"Daemons are found as DIR/ctlPID with DIR $TDR_CONTROL_DIR or " BLKTAP_CONTROL_DIR ".\n"
		"Exit status: 0 success, the daemon's errno value when it refused the\n"
		"request, 64 usage error, 69 daemon not reachable, 75 -t ran out.\n");
}

static int parse_int(const char *opt, const char *s, long min, long max, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		return usage_error("bad %s '%s': expected a number from %ld to %ld", opt, s, min, max);
	*out = v;
	return 0;
}

/* Common options: -p PID, -m MINOR, -s SOCKET, -t SECS.  Returns 0 or an exit status. */
static int common_opt(int c, struct target *t)
{
	long v;
	int r;

	switch (c) {
	case 'p':
		r = parse_int("-p PID", optarg, 1, INT_MAX, &v);
		if (!r)
			t->pid = v;
		return r;
	case 'm':
		r = parse_int("-m MINOR", optarg, 0, TDR_CTL_COOKIE_NONE - 1, &v);
		if (!r)
			t->minor = (int)v;
		return r;
	case 's':
		t->socket = optarg;
		return 0;
	case 't':
		r = parse_int("-t SECS", optarg, 1, INT_MAX / 1000, &v);
		if (!r)
			t->timeout_ms = (int)(v * 1000);
		return r;
	case ':':
		return usage_error("option -%c needs an argument", optopt);
	default:
		return usage_error("unknown option '-%c'", optopt);
	}
}

static int need_target(const struct target *t, bool need_minor)
{
	if (!t->socket && t->pid < 0)
		return usage_error("which daemon? give -p PID (or -s SOCKET)");
	if (need_minor && t->minor < 0)
		return usage_error("which disk? give -m MINOR");
	return 0;
}

/* Connects to the target's socket: fd, or -1 after printing why. */
static int connect_target(struct target *t, int *status)
{
	int fd;

	if (t->socket)
		snprintf(t->path, sizeof(t->path), "%s", t->socket);
	else if (tdr_ctl_socket_path(t->path, sizeof(t->path), tdr_ctl_dir(), t->pid) < 0) {
		*status = failure(0, "control socket path for process %ld is too long", t->pid);
		return -1;
	}
	fd = tdr_ctl_connect(t->path);
	if (fd < 0) {
		if (t->socket)
			*status = failure(0, "cannot connect to %s: %s", t->path, strerror(-fd));
		else
			*status = failure(0, "cannot connect to process %ld (%s): %s; is it running? see " PROG " list",
					  t->pid, t->path, strerror(-fd));
	}
	return fd;
}

static const char *who(const struct target *t, char *buf, size_t len)
{
	if (t->pid > 0)
		snprintf(buf, len, "process %ld", t->pid);
	else
		snprintf(buf, len, "%s", t->path);
	return buf;
}

/*
 * Sends req and reads one response into rsp.  expect: the success type.
 * Returns 0, or an exit status after printing "<what>: <why>".
 */
/* A failed wait for an answer: EXIT_WAITED when the -t (or built-in) limit ran out. */
static int recv_failure(struct target *t, const char *what, int r, int timeout_ms)
{
	char w[PATH_MAX + 32];

	if (r == -ETIMEDOUT && timeout_ms >= 0) {
		failure(0, "%s: no answer from %s within %d s; a request it took goes on: see " PROG " list",
			what, who(t, w, sizeof(w)), timeout_ms / 1000);
		return EXIT_WAITED;
	}
	return failure(0, "%s: no answer from %s: %s", what, who(t, w, sizeof(w)),
		       r == -EPIPE ? "connection closed" : strerror(-r));
}

static int transact(struct target *t, int fd, struct tdr_ctl_msg *req, struct tdr_ctl_msg *rsp,
		    unsigned expect, const char *what, int timeout_ms)
{
	char w[PATH_MAX + 32];
	int r;

	r = tdr_ctl_send(fd, req, timeout_ms);
	if (r < 0)
		return failure(0, "%s: cannot send to %s: %s", what, who(t, w, sizeof(w)), strerror(-r));
	r = tdr_ctl_recv(fd, rsp, timeout_ms);
	if (r < 0)
		return recv_failure(t, what, r, timeout_ms);
	if (rsp->type == expect)
		return 0;
	if (rsp->type == TAPDISK_MESSAGE_ERROR) {
		rsp->u.response.message[sizeof(rsp->u.response.message) - 1] = '\0';
		return failure(rsp->u.response.error, "%s: %s", what,
			       rsp->u.response.message[0] ? rsp->u.response.message :
			       strerror(rsp->u.response.error));
	}
	return failure(EPROTO, "%s: unexpected answer '%s' (type %u) from %s", what,
		       tdr_ctl_msg_name(rsp->type), rsp->type, who(t, w, sizeof(w)));
}

/* ------------------------------------------------------------ list */

struct entry {
	long pid;
	int minor, state;
	char *args;		/* "type:path" or NULL */
};

static int list_daemon(struct target *t, struct entry **v, size_t *n, size_t *cap, bool quiet)
{
	struct tdr_ctl_msg req, rsp;
	size_t first = *n;
	int fd, status = 0;
	long pid = t->pid;

	fd = quiet ? tdr_ctl_connect(t->path) : connect_target(t, &status);
	if (fd < 0)
		return quiet ? 0 : status;
	tdr_ctl_msg_init(&req, TAPDISK_MESSAGE_PID, TDR_CTL_COOKIE_NONE);
	status = transact(t, fd, &req, &rsp, TAPDISK_MESSAGE_PID_RSP, "list", QUICK_TIMEOUT_MS);
	if (status)
		goto out;
	pid = rsp.u.tapdisk_pid;
	tdr_ctl_msg_init(&req, TAPDISK_MESSAGE_LIST, TDR_CTL_COOKIE_NONE);
	status = transact(t, fd, &req, &rsp, TAPDISK_MESSAGE_LIST_RSP, "list", QUICK_TIMEOUT_MS);
	while (!status && rsp.u.list.count > 0) {
		if (*n == *cap) {
			size_t nc = *cap ? *cap * 2 : 16;
			struct entry *nv = realloc(*v, nc * sizeof(**v));

			if (!nv) {
				status = failure(ENOMEM, "list: out of memory");
				goto out;
			}
			*v = nv;
			*cap = nc;
		}
		rsp.u.list.path[sizeof(rsp.u.list.path) - 1] = '\0';
		(*v)[*n] = (struct entry){ .pid = pid, .minor = rsp.u.list.minor,
					   .state = rsp.u.list.state,
					   .args = rsp.u.list.path[0] ? strdup(rsp.u.list.path) : NULL };
		(*n)++;
		status = tdr_ctl_recv(fd, &rsp, QUICK_TIMEOUT_MS);
		if (status < 0) {
			status = recv_failure(t, "list", status, QUICK_TIMEOUT_MS);
			goto out;
		}
		if (rsp.type != TAPDISK_MESSAGE_LIST_RSP) {
			status = failure(EPROTO, "list: unexpected '%s' from %s", tdr_ctl_msg_name(rsp.type),
					 t->path);
			goto out;
		}
	}
	if (!status && *n == first) {
		/* A daemon without disks still shows up, as in tap-ctl. */
		if (*n == *cap) {
			struct entry *nv = realloc(*v, (*cap + 16) * sizeof(**v));

			if (!nv) {
				status = failure(ENOMEM, "list: out of memory");
				goto out;
			}
			*v = nv;
			*cap += 16;
		}
		(*v)[(*n)++] = (struct entry){ .pid = pid, .minor = -1, .state = -1 };
	} else if (!status) {
		/* The daemon sends minors in descending order (tap-ctl prepends them). */
		for (size_t i = first, j = *n - 1; i < j; i++, j--) {
			struct entry tmp = (*v)[i];

			(*v)[i] = (*v)[j];
			(*v)[j] = tmp;
		}
	}
out:
	close(fd);
	return status;
}

static void split_args(const char *args, char *type, size_t tlen, const char **path)
{
	const char *colon = args ? strchr(args, ':') : NULL;

	if (!colon) {
		type[0] = '\0';
		*path = NULL;
		return;
	}
	snprintf(type, tlen, "%.*s", (int)(colon - args), args);
	*path = colon + 1;
}

static int cmd_list(int argc, char **argv, struct target *t)
{
	const char *type = NULL, *file = NULL;
	struct entry *v = NULL;
	size_t n = 0, cap = 0;
	bool tty = isatty(STDOUT_FILENO);
	int c, status = 0;

	while ((c = getopt(argc, argv, ":p:m:t:f:s:h")) != -1) {
		if (c == 't')
			type = optarg;
		else if (c == 'f')
			file = optarg;
		else if (c == 'h') {
			printf("usage: " PROG " list [-p PID] [-m MINOR] [-t TYPE] [-f FILE] [-s SOCKET]\n");
			return 0;
		} else if ((status = common_opt(c, t)))
			return status;
	}
	if (optind < argc)
		return usage_error("unexpected argument '%s'", argv[optind]);

	if (t->socket || t->pid > 0) {
		status = list_daemon(t, &v, &n, &cap, false);
	} else {
		char pattern[PATH_MAX];
		glob_t g;

		snprintf(pattern, sizeof(pattern), "%s/" BLKTAP_CONTROL_SOCKET "*", tdr_ctl_dir());
		if (glob(pattern, 0, NULL, &g) == 0) {
			/*
			 * One daemon that does not answer (exiting, at its
			 * connection limit, hung) is reported; the others are
			 * listed all the same, and the exit status says so.
			 */
			for (size_t i = 0; i < g.gl_pathc; i++) {
				const char *base = strrchr(g.gl_pathv[i], '/') + 1;
				char *end;
				long pid = strtol(base + strlen(BLKTAP_CONTROL_SOCKET), &end, 10);

				if (*end || pid <= 0)
					continue;
				t->pid = pid;
				snprintf(t->path, sizeof(t->path), "%s", g.gl_pathv[i]);
				/* Stale sockets of dead daemons are skipped, as tap-ctl does. */
				int st = list_daemon(t, &v, &n, &cap, true);

				if (st && !status)
					status = st;
			}
			globfree(&g);
		}
	}

	for (size_t i = 0; i < n; i++) {
		struct entry *e = &v[i];
		char etype[64], pid_s[24] = "-", minor_s[16] = "-", state_s[16] = "-";
		const char *epath;

		split_args(e->args, etype, sizeof(etype), &epath);
		if (t->minor >= 0 && e->minor != t->minor)
			continue;
		if (type && (!epath || strcmp(etype, type)))
			continue;
		if (file && (!epath || strcmp(epath, file)))
			continue;
		if (tty) {
			snprintf(pid_s, sizeof(pid_s), "%ld", e->pid);
			if (e->minor != -1)
				snprintf(minor_s, sizeof(minor_s), "%d", e->minor);
			if (e->state != -1)
				snprintf(state_s, sizeof(state_s), "%#x", (unsigned)e->state);
			printf("%8s %4s %4s %10s %s\n", pid_s, minor_s, state_s, epath ? etype : "-",
			       epath ? epath : "-");
			continue;
		}
		printf("pid=%ld", e->pid);
		if (e->minor != -1)
			printf(" minor=%d", e->minor);
		if (e->state != -1)
			printf(" state=%#x", (unsigned)e->state);
		if (epath)
			printf(" args=%s:%s", etype, epath);
		putchar('\n');
	}
	for (size_t i = 0; i < n; i++)
		free(v[i].args);
	free(v);
	return status;
}

/* ------------------------------------------------------------ simple requests */

static int simple(struct target *t, unsigned type, unsigned expect, const char *what,
		  struct tdr_ctl_msg *req, int timeout_ms, struct tdr_ctl_msg *out)
{
	struct tdr_ctl_msg rsp;
	int fd, status = 0;

	fd = connect_target(t, &status);
	if (fd < 0)
		return status;
	req->type = (uint16_t)type;
	req->cookie = (uint16_t)t->minor;
	status = transact(t, fd, req, &rsp, expect, what, timeout_ms);
	if (!status && out)
		*out = rsp;
	close(fd);
	return status;
}

static int cmd_simple(int argc, char **argv, struct target *t, const char *name)
{
	struct tdr_ctl_msg req;
	const char *args = NULL;
	bool rdonly = false, nodirect = false, force = false;
	char what[64], optstr[32];
	int c, status, timeout;
	unsigned type, expect;

	tdr_ctl_msg_init(&req, 0, 0);
	if (!strcmp(name, "open"))
		snprintf(optstr, sizeof(optstr), ":p:m:s:t:a:RDh");
	else if (!strcmp(name, "unpause"))
		snprintf(optstr, sizeof(optstr), ":p:m:s:t:a:h");
	else if (!strcmp(name, "close"))
		snprintf(optstr, sizeof(optstr), ":p:m:s:t:fh");
	else
		snprintf(optstr, sizeof(optstr), ":p:m:s:t:h");
	while ((c = getopt(argc, argv, optstr)) != -1) {
		switch (c) {
		case 'a':
			args = optarg;
			break;
		case 'R':
			rdonly = true;
			break;
		case 'D':
			nodirect = true;
			break;
		case 'f':
			force = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			if ((status = common_opt(c, t)))
				return status;
		}
	}
	if (optind < argc)
		return usage_error("unexpected argument '%s'", argv[optind]);
	if ((status = need_target(t, true)))
		return status;

	timeout = t->timeout_ms;
	if (!strcmp(name, "pause")) {
		type = TAPDISK_MESSAGE_PAUSE;
		expect = TAPDISK_MESSAGE_PAUSE_RSP;
	} else if (!strcmp(name, "unpause")) {
		type = TAPDISK_MESSAGE_RESUME;
		expect = TAPDISK_MESSAGE_RESUME_RSP;
		if (args && tdr_ctl_set_string(req.u.params.path, sizeof(req.u.params.path), args) < 0)
			return usage_error("-a %s: longer than %d bytes", args,
					   TAPDISK_MESSAGE_MAX_PATH_LENGTH - 1);
	} else if (!strcmp(name, "open")) {
		type = TAPDISK_MESSAGE_OPEN;
		expect = TAPDISK_MESSAGE_OPEN_RSP;
		if (!args)
			return usage_error("open needs -a TYPE:/PATH (e.g. -a aio:/srv/disk.img)");
		if (tdr_ctl_set_string(req.u.params.path, sizeof(req.u.params.path), args) < 0)
			return usage_error("-a %s: longer than %d bytes", args,
					   TAPDISK_MESSAGE_MAX_PATH_LENGTH - 1);
		req.u.params.devnum = (uint32_t)t->minor;
		req.u.params.prt_devnum = (uint32_t)-1;
		req.u.params.flags = (rdonly ? TAPDISK_MESSAGE_FLAG_RDONLY : 0) |
				     (nodirect ? TAPDISK_MESSAGE_FLAG_NO_O_DIRECT : 0);
		if (timeout < 0)
			timeout = QUICK_TIMEOUT_MS * 6;
	} else if (!strcmp(name, "close")) {
		type = force ? TAPDISK_MESSAGE_FORCE_SHUTDOWN : TAPDISK_MESSAGE_CLOSE;
		expect = TAPDISK_MESSAGE_CLOSE_RSP;
	} else if (!strcmp(name, "attach")) {
		type = TAPDISK_MESSAGE_ATTACH;
		expect = TAPDISK_MESSAGE_ATTACH_RSP;
		if (timeout < 0)
			timeout = QUICK_TIMEOUT_MS;
	} else {
		type = TAPDISK_MESSAGE_DETACH;
		expect = TAPDISK_MESSAGE_DETACH_RSP;
		if (timeout < 0)
			timeout = QUICK_TIMEOUT_MS;
	}
	snprintf(what, sizeof(what), "%s of minor %d", name, t->minor);
	return simple(t, type, expect, what, &req, timeout, NULL);
}

static int cmd_stats(int argc, char **argv, struct target *t)
{
	struct tdr_ctl_msg req, rsp;
	char what[64], *buf;
	int c, fd, timeout, status = 0;
	size_t len;

	while ((c = getopt(argc, argv, ":p:m:s:t:h")) != -1) {
		if (c == 'h') {
			printf("usage: " PROG " stats -p PID -m MINOR [-s SOCKET] [-t SECS]\n");
			return 0;
		}
		if ((status = common_opt(c, t)))
			return status;
	}
	if (optind < argc)
		return usage_error("unexpected argument '%s'", argv[optind]);
	if ((status = need_target(t, true)))
		return status;
	fd = connect_target(t, &status);
	if (fd < 0)
		return status;
	snprintf(what, sizeof(what), "stats of minor %d", t->minor);
	tdr_ctl_msg_init(&req, TAPDISK_MESSAGE_STATS, (unsigned)t->minor);
	timeout = t->timeout_ms >= 0 ? t->timeout_ms : QUICK_TIMEOUT_MS;
	status = transact(t, fd, &req, &rsp, TAPDISK_MESSAGE_STATS_RSP, what, timeout);
	if (status)
		goto out;
	len = rsp.u.info.length;
	if (len > (64u << 20)) {
		status = failure(EPROTO, "%s: implausible length %zu", what, len);
		goto out;
	}
	buf = malloc(len + 1);
	if (!buf) {
		status = failure(ENOMEM, "%s: out of memory", what);
		goto out;
	}
	status = tdr_ctl_recv_raw(fd, buf, len, timeout);
	if (status < 0) {
		free(buf);
		status = status == -ETIMEDOUT ? recv_failure(t, what, status, timeout) :
			 failure(0, "%s: statistics cut short: %s", what, strerror(-status));
		goto out;
	}
	fwrite(buf, 1, len, stdout);
	putchar('\n');
	free(buf);
out:
	close(fd);
	return status;
}

/* ------------------------------------------------------------ replica */

/* Whether line "key=value" has one of the keys; marks it in found. */
static bool key_wanted(const char *line, size_t len, char **keys, int nkeys, bool *found)
{
	const char *eq = memchr(line, '=', len);
	size_t klen = eq ? (size_t)(eq - line) : len;

	if (!nkeys)
		return true;
	for (int i = 0; i < nkeys; i++)
		if (strlen(keys[i]) == klen && !strncmp(keys[i], line, klen)) {
			found[i] = true;
			return true;
		}
	return false;
}

static int cmd_replica(int argc, char **argv, struct target *t)
{
	struct tdr_ctl_msg req, rsp;
	char line[TAPDISK_MESSAGE_STRING_LENGTH], what[96];
	char *out = NULL, **keys = NULL;
	bool *found = NULL;
	size_t len = 0, off = 0, olen = 0;
	int c, fd, i, nkeys = 0, status = 0;
	bool is_status;

	/* "+": options stop at the operation, whose words may look like anything. */
	while ((c = getopt(argc, argv, "+:p:m:s:t:h")) != -1) {
		if (c == 'h') {
			usage(stdout);
			return 0;
		}
		if ((status = common_opt(c, t)))
			return status;
	}
	if (optind >= argc)
		return usage_error("replica needs an operation: start, checkpoint, stop, failover, resync, get-error or status");
	if ((status = need_target(t, true)))
		return status;
	is_status = !strcmp(argv[optind], "status");
	if (is_status) {
		/* status KEY...: the daemon sends every key; we show the ones asked for. */
		keys = argv + optind + 1;
		nkeys = argc - optind - 1;
		snprintf(line, sizeof(line), "status");
	} else {
		line[0] = '\0';
		for (i = optind; i < argc; i++) {
			size_t n = strlen(argv[i]);

			if (len + n + 2 > sizeof(line))
				return usage_error("replica request longer than %d bytes",
						   TAPDISK_MESSAGE_STRING_LENGTH - 1);
			if (len)
				line[len++] = ' ';
			memcpy(line + len, argv[i], n + 1);
			len += n;
		}
	}
	snprintf(what, sizeof(what), "replica %s on minor %d", argv[optind], t->minor);
	fd = connect_target(t, &status);
	if (fd < 0)
		return status;
	tdr_ctl_msg_init(&req, TDR_MESSAGE_REPLICA, (unsigned)t->minor);
	tdr_ctl_set_string(req.u.string.text, sizeof(req.u.string.text), line);
	status = tdr_ctl_send(fd, &req, t->timeout_ms);
	if (status < 0) {
		status = failure(0, "%s: cannot send: %s", what, strerror(-status));
		goto out;
	}
	for (;;) {
		status = tdr_ctl_recv(fd, &rsp, t->timeout_ms);
		if (status < 0) {
			status = recv_failure(t, what, status, t->timeout_ms);
			goto out;
		}
		if (rsp.type == TDR_MESSAGE_REPLICA_DATA) {
			size_t n = strnlen(rsp.u.string.text, sizeof(rsp.u.string.text));
			char *p = realloc(out, olen + n + 1);

			if (!p) {
				status = failure(ENOMEM, "%s: out of memory", what);
				goto out;
			}
			out = p;
			memcpy(out + olen, rsp.u.string.text, n);
			olen += n;
			out[olen] = '\0';
			continue;
		}
		break;
	}
	if (rsp.type == TAPDISK_MESSAGE_ERROR || rsp.type == TDR_MESSAGE_REPLICA_RSP) {
		rsp.u.response.message[sizeof(rsp.u.response.message) - 1] = '\0';
		if (rsp.u.response.error) {
			status = failure(rsp.u.response.error, "%s: %s", what,
					 rsp.u.response.message[0] ? rsp.u.response.message :
					 strerror(rsp.u.response.error));
			goto out;
		}
	} else {
		status = failure(EPROTO, "%s: unexpected answer '%s' (type %u)", what,
				 tdr_ctl_msg_name(rsp.type), rsp.type);
		goto out;
	}
	/* Lines of output (status), filtered by the keys asked for. */
	found = calloc(nkeys ? (size_t)nkeys : 1, sizeof(*found));
	if (!found) {
		status = failure(ENOMEM, "%s: out of memory", what);
		goto out;
	}
	while (off < olen) {
		char *nl = memchr(out + off, '\n', olen - off);
		size_t n = nl ? (size_t)(nl - (out + off)) : olen - off;

		if (key_wanted(out + off, n, keys, nkeys, found))
			printf("%.*s\n", (int)n, out + off);
		off += n + (nl ? 1 : 0);
	}
	if (rsp.u.response.message[0])
		printf("%s\n", rsp.u.response.message);
	status = 0;
	/* A misspelt key would read as an empty value: said, and a failure. */
	for (i = 0; i < nkeys && !status; i++)
		if (!found[i])
			status = failure(EINVAL, "%s: no key '%s'; " PROG " replica status alone lists them",
					 what, keys[i]);
out:
	free(found);
	free(out);
	close(fd);
	return status;
}

int main(int argc, char **argv)
{
	struct target t = { .pid = -1, .minor = -1, .timeout_ms = -1 };
	const char *cmd;

	if (argc < 2)
		return usage_error("no command given");
	cmd = argv[1];
	if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(cmd, "--version")) {
		printf(PROG " %s\n", PACKAGE_VERSION);
		return 0;
	}
	/* Subcommand options start after the command, as in tap-ctl. */
	argc--;
	argv++;
	optind = 1;
	opterr = 0;
	if (!strcmp(cmd, "list"))
		return cmd_list(argc, argv, &t);
	if (!strcmp(cmd, "stats"))
		return cmd_stats(argc, argv, &t);
	if (!strcmp(cmd, "replica"))
		return cmd_replica(argc, argv, &t);
	if (!strcmp(cmd, "pause") || !strcmp(cmd, "unpause") || !strcmp(cmd, "open") ||
	    !strcmp(cmd, "close") || !strcmp(cmd, "attach") || !strcmp(cmd, "detach"))
		return cmd_simple(argc, argv, &t, cmd);
	return usage_error("unknown command '%s'", cmd);
}
