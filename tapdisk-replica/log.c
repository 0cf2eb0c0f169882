/* SPDX-License-Identifier: BSD-3-Clause */
/* Logging to stderr or syslog, and the one-line "last error" buffer. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>
#include <time.h>

#include "tdr/log.h"

static const char *log_ident = "tapdisk-replica";
static bool log_syslog;
static enum tdr_log_level log_level = TDR_LOG_WARN;
static char last_error[1024];

static const char *const level_names[] = { "err", "warn", "info", "debug" };

void tdr_log_init(const char *ident, bool use_syslog, enum tdr_log_level level)
{
	if (ident)
		log_ident = ident;
	log_syslog = use_syslog;
	log_level = level;
	if (use_syslog)
		openlog(log_ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

void tdr_log_set_level(enum tdr_log_level level)
{
	log_level = level;
}

enum tdr_log_level tdr_log_get_level(void)
{
	return log_level;
}

int tdr_log_parse_level(const char *s, enum tdr_log_level *out)
{
	for (unsigned i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
		if (s && strcmp(s, level_names[i]) == 0) {
			*out = (enum tdr_log_level)i;
			return 0;
		}
	}
	return -EINVAL;
}

void tdr_vlog(enum tdr_log_level level, const char *fmt, va_list ap)
{
	static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };

	if (level > log_level)
		return;
	if (log_syslog) {
		vsyslog(prio[level], fmt, ap);
		return;
	}
	/* One fprintf per line so concurrent processes don't interleave mid-line. */
	char line[2048];
	vsnprintf(line, sizeof(line), fmt, ap);
	fprintf(stderr, "%s: %s%s\n", log_ident,
		level <= TDR_LOG_WARN ? (level == TDR_LOG_ERR ? "error: " : "warning: ") : "",
		line);
}

void tdr_log(enum tdr_log_level level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	tdr_vlog(level, fmt, ap);
	va_end(ap);
}

void tdr_set_error(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
}

const char *tdr_last_error(void)
{
	return last_error;
}

void tdr_clear_error(void)
{
	last_error[0] = '\0';
}

const char *tdr_errno_name(int err)
{
	static char other[16];
	static const struct {
		int e;
		const char *name;
	} names[] = {
		{ EPERM, "EPERM" }, { ENOENT, "ENOENT" }, { EIO, "EIO" }, { E2BIG, "E2BIG" },
		{ EBADF, "EBADF" }, { EAGAIN, "EAGAIN" }, { ENOMEM, "ENOMEM" },
		{ EACCES, "EACCES" }, { EBUSY, "EBUSY" }, { EEXIST, "EEXIST" },
		{ ENODEV, "ENODEV" }, { EISDIR, "EISDIR" }, { EINVAL, "EINVAL" },
		{ ENOSPC, "ENOSPC" }, { EROFS, "EROFS" }, { ERANGE, "ERANGE" },
		{ ENAMETOOLONG, "ENAMETOOLONG" }, { ENOSYS, "ENOSYS" }, { ELOOP, "ELOOP" },
		{ ENODATA, "ENODATA" }, { EOVERFLOW, "EOVERFLOW" }, { EPROTO, "EPROTO" },
		{ ENOTSUP, "ENOTSUP" }, { ECONNREFUSED, "ECONNREFUSED" },
		{ ECONNRESET, "ECONNRESET" }, { ETIMEDOUT, "ETIMEDOUT" },
		{ EHOSTUNREACH, "EHOSTUNREACH" }, { ENOTCONN, "ENOTCONN" },
		{ ESHUTDOWN, "ESHUTDOWN" }, { EALREADY, "EALREADY" }, { EINPROGRESS, "EINPROGRESS" },
		{ ECANCELED, "ECANCELED" }, { EPIPE, "EPIPE" }, { ESRCH, "ESRCH" },
		{ ENXIO, "ENXIO" }, { EFBIG, "EFBIG" }, { EMSGSIZE, "EMSGSIZE" },
	};

	if (err < 0)
		err = -err;
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (names[i].e == err)
			return names[i].name;
	snprintf(other, sizeof(other), "E%d", err);
	return other;
}
