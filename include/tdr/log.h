/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Logging and the "last error" buffer.
 *
 * Every user-visible failure is reported as one line that names the problem
 * and says what to do.  Deep code (a driver's open, a parser) records that
 * line with tdr_set_error() and returns a negative errno; the command-line
 * front end prints tdr_last_error().  The process is single-threaded (one
 * event loop), so a static buffer is enough.
 */
#ifndef TDR_LOG_H
#define TDR_LOG_H

#include <stdarg.h>
#include <stdbool.h>

enum tdr_log_level {
	TDR_LOG_ERR = 0,
	TDR_LOG_WARN = 1,
	TDR_LOG_INFO = 2,
	TDR_LOG_DEBUG = 3,
};

/* ident: program name in messages; use_syslog: log to syslog instead of stderr. */
void tdr_log_init(const char *ident, bool use_syslog, enum tdr_log_level level);
void tdr_log_set_level(enum tdr_log_level level);
enum tdr_log_level tdr_log_get_level(void);
/* Parses "err", "warn", "info", "debug"; returns -EINVAL on anything else. */
int tdr_log_parse_level(const char *s, enum tdr_log_level *out);

void tdr_log(enum tdr_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void tdr_vlog(enum tdr_log_level level, const char *fmt, va_list ap);

#define TDR_ERR(...)   tdr_log(TDR_LOG_ERR, __VA_ARGS__)
#define TDR_WARN(...)  tdr_log(TDR_LOG_WARN, __VA_ARGS__)
#define TDR_INFO(...)  tdr_log(TDR_LOG_INFO, __VA_ARGS__)
#define TDR_DEBUG(...) tdr_log(TDR_LOG_DEBUG, __VA_ARGS__)

/* Record the one-line description of the most recent failure. */
void tdr_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The recorded line, or "" if none. */
const char *tdr_last_error(void);
void tdr_clear_error(void);

/* "EIO" for -EIO or EIO; "E<number>" for values without a name. */
const char *tdr_errno_name(int err);

#endif
