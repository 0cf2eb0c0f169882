/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The "replica" filter driver: what both modes share.  Options from the
 * spec, the request-line parser every control interface uses, the
 * operation dispatch (one operation at a time), state, last error,
 * progress and the observer that xenstore publishing hangs on.  The modes
 * live in replica-primary.c and replica-secondary.c.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "replica-int.h"
#include "tdr/log.h"

#define DEFAULT_EXPORT     "secondary"
#define DEFAULT_TIMEOUT_MS 5000u
#define DEFAULT_CBW_SECS   128u		/* 64 KiB */
#define MAX_TIMEOUT_MS     3600000u

static const char *const state_names[] = {
	[REPLICA_STATE_NONE] = "none",
	[REPLICA_STATE_RUNNING] = "running",
	[REPLICA_STATE_FAILOVER] = "failover",
	[REPLICA_STATE_FAILOVER_FAILED] = "failover-failed",
	[REPLICA_STATE_DONE] = "done",
	[REPLICA_STATE_BROKEN] = "broken",
	[REPLICA_STATE_RESYNC] = "resync",
};

const char *replica_state_name(enum replica_state s)
{
	if ((unsigned)s < sizeof(state_names) / sizeof(state_names[0]) && state_names[s])
		return state_names[s];
	return "unknown";
}

const char *replica_mode_name(enum replica_mode m)
{
	switch (m) {
	case REPLICA_MODE_PRIMARY:
		return "primary";
	case REPLICA_MODE_SECONDARY:
		return "secondary";
	default:
		return "unset";
	}
}

/* ------------------------------------------------------------ parsing */

static int parse_mode(const char *v, enum replica_mode *m)
{
	if (strcmp(v, "primary") == 0)
		*m = REPLICA_MODE_PRIMARY;
	else if (strcmp(v, "secondary") == 0)
		*m = REPLICA_MODE_SECONDARY;
	else
		return -EINVAL;
	return 0;
}

static int parse_u32(const char *v, uint32_t min, uint32_t max, uint32_t *out)
{
	char *end;
	unsigned long long n;

	if (!*v || *v == '-' || *v == '+')
		return -EINVAL;
	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno || *end || n < min || n > max)
		return -ERANGE;
	*out = (uint32_t)n;
	return 0;
}

/* tcp:HOST:PORT or unix:/PATH */
static int check_addr(const char *v)
{
	const char *colon;
	uint32_t port;

	if (strncmp(v, "unix:", 5) == 0)
		return v[5] ? 0 : -EINVAL;
	if (strncmp(v, "tcp:", 4) != 0)
		return -EINVAL;
	colon = strrchr(v + 4, ':');
	if (!colon || colon == v + 4)
		return -EINVAL;
	/* "[]" is no host either (getaddrinfo would take it for loopback). */
	if (colon - (v + 4) == 2 && v[4] == '[' && v[5] == ']')
		return -EINVAL;
	return parse_u32(colon + 1, 1, 65535, &port);
}

static int copy_value(char *dst, size_t len, const char *v)
{
	if (strlen(v) >= len)
		return -ENAMETOOLONG;
	strcpy(dst, v);
	return 0;
}

/* key=on|off into *off (true for off). */
static int parse_off(const char *key, const char *val, bool *off, char *msg, size_t msglen)
{
	if (strcmp(val, "on") == 0 || strcmp(val, "off") == 0) {
		*off = strcmp(val, "off") == 0;
		return 0;
	}
	snprintf(msg, msglen, "%s=%s: expected %s=on or %s=off", key, val, key, key);
	return -EINVAL;
}

/* tls=, tls-psk=, tls-certificates=, tls-username=, tls-verify= (the spec only). */
static int apply_tls_option(const char *key, const char *val, struct replica_opts *spec,
			    char *msg, size_t msglen)
{
	char *dst = NULL;
	size_t len = 0;

	if (strcmp(key, "tls") == 0) {
		if (nbd_tls_parse_mode(val, &spec->tls) < 0) {
			snprintf(msg, msglen, "tls=%s: not a TLS mode; use tls=require (or tls=on, tls=off)", val);
			return -EINVAL;
		}
		return 0;
	}
	if (strcmp(key, "tls-verify") == 0)
		return parse_off(key, val, &spec->tls_no_verify, msg, msglen);
	if (strcmp(key, "tls-psk") == 0) {
		dst = spec->tls_psk;
		len = sizeof(spec->tls_psk);
	} else if (strcmp(key, "tls-certificates") == 0) {
		dst = spec->tls_certificates;
		len = sizeof(spec->tls_certificates);
	} else if (strcmp(key, "tls-username") == 0) {
		dst = spec->tls_username;
		len = sizeof(spec->tls_username);
	} else {
		snprintf(msg, msglen, "unknown option '%s'; the TLS options are tls, tls-psk, tls-certificates, tls-username, tls-verify",
			 key);
		return -EINVAL;
	}
	if (copy_value(dst, len, val) < 0) {
		snprintf(msg, msglen, "%s=: longer than %zu bytes", key, len - 1);
		return -ENAMETOOLONG;
	}
	return 0;
}

/*
 * The TLS options together, once the whole spec is read: nothing given
 * is silently ignored, and a missing key file is found now, not at the
 * first connection.
 */
static int check_tls_options(struct replica_opts *o, char *msg, size_t msglen)
{
	bool files = o->tls_psk[0] || o->tls_certificates[0];

	if (o->tls == NBD_TLS_OFF) {
		if (files || o->tls_username[0] || o->tls_no_verify) {
			snprintf(msg, msglen, "%s given but tls=off; add tls=require to use TLS",
				 o->tls_psk[0] ? "tls-psk=" : o->tls_certificates[0] ? "tls-certificates=" :
				 o->tls_username[0] ? "tls-username=" : "tls-verify=");
			return -EINVAL;
		}
		return 0;
	}
	if (o->tls_psk[0] && o->tls_certificates[0]) {
		snprintf(msg, msglen, "tls-psk= and tls-certificates= both given; keep tls-psk= for a pre-shared key or tls-certificates= for X.509");
		return -EINVAL;
	}
	if (o->tls_psk[0]) {
		int err = nbd_tls_check_psk_file(o->tls_psk);

		if (err < 0) {
			snprintf(msg, msglen, "%s", tdr_last_error());
			return err;
		}
	}
	if (o->tls_certificates[0] && access(o->tls_certificates, R_OK | X_OK) < 0) {
		int err = -errno;

		snprintf(msg, msglen, "tls-certificates=%.120s: cannot open the directory: %s; give a directory holding ca-cert.pem, client-cert.pem, client-key.pem",
			 o->tls_certificates, strerror(-err));
		return err;
	}
	if (o->client_given && !o->client_libnbd) {
		snprintf(msg, msglen, "tls=%s needs client=libnbd, the native client has no TLS; drop client=native",
			 o->tls == NBD_TLS_ON ? "on" : "require");
		return -EINVAL;
	}
	/* TLS comes with libnbd's client. */
	o->client_libnbd = true;
	return 0;
}

/* One key=value of a start request or of the spec's options. */
static int apply_option(const char *key, const char *val, enum replica_mode *mode, char *addr,
			char *export_name, bool *has_export, uint32_t *timeout_ms,
			enum replica_sync *sync, struct replica_opts *spec, char *msg, size_t msglen)
{
	uint32_t n;

	/*
	 * An empty value is a mistake (an unset shell variable, say), not a
	 * default: tls-psk= would silently leave the link without its key.
	 * export= alone may be empty: the server's default export.
	 */
	if (!*val && strcmp(key, "export") != 0) {
		snprintf(msg, msglen, "%s= needs a value; leave the option out for its default", key);
		return -EINVAL;
	}
	if (strcmp(key, "mode") == 0) {
		if (parse_mode(val, mode) < 0) {
			snprintf(msg, msglen, "mode=%s: expected mode=primary or mode=secondary", val);
			return -EINVAL;
		}
	} else if (strcmp(key, "addr") == 0) {
		if (check_addr(val) < 0 || copy_value(addr, REPLICA_ADDR_MAX, val) < 0) {
			snprintf(msg, msglen, "addr=%s: expected tcp:HOST:PORT (port 1-65535) or unix:/PATH",
				 val);
			return -EINVAL;
		}
	} else if (strcmp(key, "export") == 0) {
		if (copy_value(export_name, REPLICA_NAME_MAX, val) < 0) {
			snprintf(msg, msglen, "export=: name longer than %d bytes", REPLICA_NAME_MAX - 1);
			return -EINVAL;
		}
		*has_export = true;
	} else if (strcmp(key, "timeout") == 0) {
		if (parse_u32(val, 1, MAX_TIMEOUT_MS, timeout_ms) < 0) {
			snprintf(msg, msglen, "timeout=%s: expected milliseconds from 1 to %u", val,
				 MAX_TIMEOUT_MS);
			return -EINVAL;
		}
	} else if (strcmp(key, "sync") == 0) {
		if (strcmp(val, "both") == 0) {
			*sync = REPLICA_SYNC_BOTH;
		} else if (strcmp(val, "local") == 0) {
			*sync = REPLICA_SYNC_LOCAL;
		} else {
			snprintf(msg, msglen, "sync=%s: expected sync=both or sync=local", val);
			return -EINVAL;
		}
	} else if (spec && strcmp(key, "cbw") == 0) {
		if (parse_u32(val, 512, 64u << 20, &n) < 0 || (n & (n - 1)) || n % 512) {
			snprintf(msg, msglen, "cbw=%s: expected a power of two of bytes from 512 to 64 MiB",
				 val);
			return -EINVAL;
		}
		spec->cbw_secs = n / 512;
	} else if (spec && strcmp(key, "scratch") == 0) {
		return parse_off(key, val, &spec->scratch_off, msg, msglen);
	} else if (spec && strcmp(key, "client") == 0) {
		spec->client_given = true;
		if (strcmp(val, "native") == 0) {
			spec->client_libnbd = false;
		} else if (strcmp(val, "libnbd") == 0) {
			spec->client_libnbd = true;
		} else {
			snprintf(msg, msglen, "client=%s: expected client=native or client=libnbd", val);
			return -EINVAL;
		}
	} else if (spec && strcmp(key, "zerocopy") == 0) {
		return parse_off(key, val, &spec->no_zerocopy, msg, msglen);
	} else if (spec && strncmp(key, "tls", 3) == 0 && (!key[3] || key[3] == '-')) {
		return apply_tls_option(key, val, spec, msg, msglen);
	} else {
		snprintf(msg, msglen, "unknown option '%s' (known: mode, addr, export, timeout, sync%s)",
			 key, spec ? ", cbw, scratch, client, zerocopy, tls, tls-psk, tls-certificates, tls-username, tls-verify" : "");
		return -EINVAL;
	}
	return 0;
}

#define MAX_WORDS 16

int replica_parse(const char *line, struct replica_cmd *cmd, char *msg, size_t msglen)
{
	char buf[1024], *words[MAX_WORDS], *save = NULL;
	int n = 0, r = -EINVAL;

	memset(cmd, 0, sizeof(*cmd));
	if (!line || strlen(line) >= sizeof(buf)) {
		snprintf(msg, msglen, "request missing or longer than %zu bytes", sizeof(buf) - 1);
		return -EINVAL;
	}
	strcpy(buf, line);
	for (char *w = strtok_r(buf, " \t\r\n", &save); w; w = strtok_r(NULL, " \t\r\n", &save)) {
		if (n == MAX_WORDS) {
			snprintf(msg, msglen, "too many words in request (at most %d)", MAX_WORDS);
			return -E2BIG;
		}
		words[n++] = w;
	}
	if (n == 0) {
		snprintf(msg, msglen, "empty request; expected one of start, checkpoint, stop, failover, resync, get-error, status");
		return -EINVAL;
	}
	msg[0] = '\0';
	if (strcmp(words[0], "start") == 0) {
		cmd->op = REPLICA_OP_START;
		for (int i = 1; i < n; i++) {
			char *eq = strchr(words[i], '=');

			if (!eq || eq == words[i] || !eq[1]) {
				snprintf(msg, msglen, "start: '%s' is not key=value", words[i]);
				return -EINVAL;
			}
			*eq = '\0';
			r = apply_option(words[i], eq + 1, &cmd->mode, cmd->addr, cmd->export_name,
					 &cmd->has_export, &cmd->timeout_ms, &cmd->sync, NULL, msg, msglen);
			if (r < 0)
				return r;
		}
		return 0;
	}
	if (strcmp(words[0], "stop") == 0) {
		cmd->op = REPLICA_OP_STOP;
		if (n == 2 && strcmp(words[1], "failover") == 0) {
			cmd->failover = true;
			return 0;
		}
		if (n == 1)
			return 0;
		snprintf(msg, msglen, "stop takes no argument but 'failover', got '%s'",
			 words[n > 2 && strcmp(words[1], "failover") == 0 ? 2 : 1]);
		return -EINVAL;
	}
	if (strcmp(words[0], "resync") == 0) {
		cmd->op = REPLICA_OP_RESYNC;
		if (n == 1 || (n == 2 && strcmp(words[1], "incremental") == 0))
			return 0;
		if (n == 2 && strcmp(words[1], "full") == 0) {
			cmd->full = true;
			return 0;
		}
		snprintf(msg, msglen, "resync takes 'full' or 'incremental', got '%s'",
			 words[n > 2 && (strcmp(words[1], "full") == 0 ||
					 strcmp(words[1], "incremental") == 0) ? 2 : 1]);
		return -EINVAL;
	}

	static const struct {
		const char *word;
		enum replica_op op;
	} bare[] = {
		{ "checkpoint", REPLICA_OP_CHECKPOINT },
		{ "failover", REPLICA_OP_FAILOVER },
		{ "get-error", REPLICA_OP_GET_ERROR },
		{ "status", REPLICA_OP_STATUS },
	};

	for (size_t i = 0; i < sizeof(bare) / sizeof(bare[0]); i++) {
		if (strcmp(words[0], bare[i].word) == 0) {
			if (n > 1) {
				snprintf(msg, msglen, "%s takes no arguments, got '%s'", words[0], words[1]);
				return -EINVAL;
			}
			cmd->op = bare[i].op;
			return 0;
		}
	}
	snprintf(msg, msglen, "unknown request '%.64s'; expected one of start, checkpoint, stop, failover, resync, get-error, status",
		 words[0]);
	return -EINVAL;
}

/* ------------------------------------------------------ state, events */

static void replica_notify_now(void *arg)
{
	struct replica *r = arg;

	if (r->observer)
		r->observer(r->observer_arg);
}

void replica_notify(struct replica *r)
{
	/* Deferred: observers must never run inside a request's completion. */
	if (r->observer)
		tdr_loop_defer(r->img->loop, &r->notify);
}

void replica_set_state(struct replica *r, enum replica_state s)
{
	if (r->state == s)
		return;
	TDR_INFO("replica %s: %s -> %s", replica_mode_name(r->opts.mode),
		 replica_state_name(r->state), replica_state_name(s));
	r->state = s;
	replica_notify(r);
}

void replica_set_error(struct replica *r, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(r->error_msg, sizeof(r->error_msg), fmt, ap);
	va_end(ap);
	r->error = err;
	TDR_ERR("replica: %s", r->error_msg);
	replica_notify(r);
}

void replica_set_progress(struct replica *r, uint64_t done, uint64_t total)
{
	r->progress_done = done;
	r->progress_total = total;
	replica_notify(r);
}

void replica_op_done(struct replica *r, int err, const char *fmt, ...)
{
	char msg[REPLICA_MSG_MAX];
	replica_done_fn done = r->op_done;
	void *arg = r->op_arg;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	r->op_busy = false;
	r->op_done = NULL;
	r->op_arg = NULL;
	if (err && msg[0])
		TDR_WARN("replica: %s", msg);
	if (done)
		done(arg, err, msg);
}

void replica_set_observer(struct td_image *img, void (*changed)(void *arg), void *arg)
{
	struct replica *r = img->priv;

	r->observer = changed;
	r->observer_arg = arg;
}

struct td_image *replica_find(struct td_disk *disk)
{
	return disk ? td_disk_find_image(disk, "replica") : NULL;
}

void replica_get_status(struct td_image *img, struct replica_status *st)
{
	struct replica *r = img->priv;

	memset(st, 0, sizeof(*st));
	st->mode = r->opts.mode;
	st->state = r->state;
	st->error = r->error;
	snprintf(st->error_msg, sizeof(st->error_msg), "%s", r->error_msg);
	st->progress_done = r->progress_done;
	st->progress_total = r->progress_total;
	st->stats = r->stats;
	if (r->ops->live_stats)
		r->ops->live_stats(r, &st->stats);
}

#define STAT_FIELD(k) { #k, offsetof(struct replica_stats, k) }

const struct replica_stat_field replica_stat_fields[] = {
	STAT_FIELD(svm_reqs), STAT_FIELD(svm_bytes),
	STAT_FIELD(export_reqs), STAT_FIELD(export_bytes),
	STAT_FIELD(cbw_count), STAT_FIELD(cbw_bytes),
	STAT_FIELD(fwd_reqs), STAT_FIELD(fwd_bytes), STAT_FIELD(fwd_spliced_bytes),
	STAT_FIELD(checkpoints), STAT_FIELD(ckpt_last_ns), STAT_FIELD(ckpt_max_ns),
	STAT_FIELD(ckpt_total_ns),
	STAT_FIELD(dirty_bytes), STAT_FIELD(link_errors), STAT_FIELD(fo_hold_ns),
	STAT_FIELD(fo_flushes), STAT_FIELD(fo_svm_peak_bytes), STAT_FIELD(run_flushes),
	STAT_FIELD(link_tls),
};

const size_t replica_n_stat_fields = sizeof(replica_stat_fields) / sizeof(replica_stat_fields[0]);

_Static_assert(sizeof(replica_stat_fields) / sizeof(replica_stat_fields[0]) ==
	       sizeof(struct replica_stats) / sizeof(uint64_t),
	       "every counter of struct replica_stats has a name");

void replica_format_status(const struct replica_status *st, FILE *out)
{
	const struct replica_stats *s = &st->stats;

	fprintf(out, "mode=%s\nstate=%s\n", replica_mode_name(st->mode),
		replica_state_name(st->state));
	fprintf(out, "error=%s\nerror_msg=%s\n", st->error ? tdr_errno_name(st->error) : "none",
		st->error_msg);
	fprintf(out, "progress_done=%llu\nprogress_total=%llu\n",
		(unsigned long long)st->progress_done, (unsigned long long)st->progress_total);
	for (size_t i = 0; i < replica_n_stat_fields; i++)
		fprintf(out, "%s=%llu\n", replica_stat_fields[i].name,
			(unsigned long long)replica_stat_value(s, &replica_stat_fields[i]));
}

/* --------------------------------------------------------- operations */

static const struct replica_mode_ops *mode_ops(enum replica_mode m)
{
	return m == REPLICA_MODE_PRIMARY ? &replica_primary_ops : &replica_secondary_ops;
}

static const char *op_name(enum replica_op op)
{
	switch (op) {
	case REPLICA_OP_START: return "start";
	case REPLICA_OP_CHECKPOINT: return "checkpoint";
	case REPLICA_OP_STOP: return "stop";
	case REPLICA_OP_FAILOVER: return "failover";
	case REPLICA_OP_RESYNC: return "resync";
	case REPLICA_OP_GET_ERROR: return "get-error";
	case REPLICA_OP_STATUS: return "status";
	}
	return "?";
}

/*
 * A start may switch modes: only a secondary whose failover is done may
 * become a primary (its secondary disk is then the local image), and a
 * primary that never started may be reconfigured.
 */
static int switch_mode_check(struct replica *r, enum replica_mode m, char *msg, size_t msglen)
{
	if (!(r->state == REPLICA_STATE_DONE ||
	      (r->state == REPLICA_STATE_NONE && r->opts.mode == REPLICA_MODE_PRIMARY))) {
		snprintf(msg, msglen, "start mode=%s refused: a %s in state %s cannot change mode; only a secondary whose failover is done can become a primary",
			 replica_mode_name(m), replica_mode_name(r->opts.mode),
			 replica_state_name(r->state));
		return -EINVAL;
	}
	return 0;
}

/* The three fields that make a mode: what a mode's init and fini work on. */
static void set_mode(struct replica *r, const struct replica_mode_ops *ops, void *priv,
		     enum replica_mode m)
{
	r->ops = ops;
	r->mode_priv = priv;
	r->opts.mode = m;
}

/*
 * The old mode is idle (see switch_poll): replace it.  The new mode is set
 * up first and the old one freed only once that worked: a secondary on a
 * chain that is not one (or an export address in use) leaves the disk the
 * primary it was, not a mode with no state that the next request crashes.
 */
static int switch_mode(struct replica *r, enum replica_mode m, char *msg, size_t msglen)
{
	const struct replica_mode_ops *ops = mode_ops(m), *old_ops = r->ops;
	enum replica_mode old_mode = r->opts.mode;
	void *old_priv = r->mode_priv, *new_priv;
	int err;

	set_mode(r, ops, NULL, m);
	tdr_clear_error();
	err = ops->init(r);
	if (err < 0) {
		snprintf(msg, msglen, "start mode=%s: %s; still a %s", replica_mode_name(m),
			 tdr_last_error(), replica_mode_name(old_mode));
		set_mode(r, old_ops, old_priv, old_mode);
		return err;
	}
	new_priv = r->mode_priv;
	set_mode(r, old_ops, old_priv, old_mode);
	old_ops->fini(r);
	set_mode(r, ops, new_priv, m);
	r->state = REPLICA_STATE_NONE;
	replica_notify(r);
	return 0;
}

/*
 * The old mode's requests into the images (a secondary's export still
 * serving reads after its failover) must end before its state is freed:
 * it is told to stop, then polled, as a closing disk is.
 */
#define SWITCH_POLL_NS (1000 * 1000ull)

static void switch_poll(struct tdr_timer *t, void *arg)
{
	struct replica *r = arg;
	char msg[REPLICA_MSG_MAX + 32];
	int err;

	if (r->ops->busy && r->ops->busy(r)) {
		tdr_timer_arm(t, SWITCH_POLL_NS);
		return;
	}
	r->switching = false;
	err = switch_mode(r, r->switch_cmd.mode, msg, sizeof(msg));
	if (err < 0) {
		replica_op_done(r, err, "%s", msg);
		return;
	}
	r->ops->start(r, &r->switch_cmd);
}

/* The disk closes first: the start waiting for the old mode never runs. */
static void switch_cancel(struct replica *r, const char *why)
{
	if (!r->switching)
		return;
	tdr_timer_cancel(&r->switch_timer);
	r->switching = false;
	replica_op_done(r, -ESHUTDOWN, "start refused: %s", why);
}

void replica_execute(struct td_image *img, const struct replica_cmd *cmd,
		     replica_done_fn done, void *arg)
{
	struct replica *r = img->priv;
	char msg[REPLICA_MSG_MAX + 32];
	int err;

	switch (cmd->op) {
	case REPLICA_OP_GET_ERROR:
		if (r->error)
			snprintf(msg, sizeof(msg), "%s %s", tdr_errno_name(r->error), r->error_msg);
		else
			snprintf(msg, sizeof(msg), "none");
		done(arg, 0, msg);
		return;
	case REPLICA_OP_STATUS:
		done(arg, 0, "");
		return;
	default:
		break;
	}
	if (r->closing) {
		done(arg, -ESHUTDOWN, "refused: the disk is closing");
		return;
	}
	if (r->op_busy) {
		done(arg, -EBUSY, "refused: another operation is in progress; retry when it completes");
		return;
	}
	r->op_busy = true;
	r->op_done = done;
	r->op_arg = arg;
	TDR_INFO("replica %s: %s requested in state %s", replica_mode_name(r->opts.mode),
		 op_name(cmd->op), replica_state_name(r->state));

	switch (cmd->op) {
	case REPLICA_OP_START:
		if (cmd->mode != REPLICA_MODE_UNSET && cmd->mode != r->opts.mode) {
			err = switch_mode_check(r, cmd->mode, msg, sizeof(msg));
			if (err < 0) {
				replica_op_done(r, err, "%s", msg);
				return;
			}
			/* What the new mode's start refuses, refused before anything changes. */
			if (cmd->mode == REPLICA_MODE_SECONDARY &&
			    (cmd->addr[0] || cmd->has_export || cmd->timeout_ms || cmd->sync)) {
				replica_op_done(r, -EINVAL, "start refused: a secondary takes no addr/export/timeout/sync at start; they belong in its spec");
				return;
			}
			r->switch_cmd = *cmd;
			r->switching = true;
			if (r->ops->quiesce)
				r->ops->quiesce(r);
			tdr_timer_arm(&r->switch_timer, 0);
			return;
		}
		r->ops->start(r, cmd);
		return;
	case REPLICA_OP_CHECKPOINT:
		r->ops->checkpoint(r);
		return;
	case REPLICA_OP_STOP:
		r->ops->stop(r, cmd->failover);
		return;
	case REPLICA_OP_FAILOVER:
		r->ops->stop(r, true);
		return;
	case REPLICA_OP_RESYNC:
		if (!r->ops->resync) {
			replica_op_done(r, -EOPNOTSUPP, "resync is an operation of a primary; this disk is a %s",
					replica_mode_name(r->opts.mode));
			return;
		}
		r->ops->resync(r, cmd->full);
		return;
	default:
		replica_op_done(r, -EINVAL, "unknown operation %d", (int)cmd->op);
		return;
	}
}

/* ------------------------------------------------------------- driver */

struct opt_ctx {
	struct replica_opts *o;
	bool has_export;
	char msg[REPLICA_MSG_MAX];
};

static int spec_option(const char *key, const char *value, void *arg)
{
	struct opt_ctx *c = arg;

	return apply_option(key, value, &c->o->mode, c->o->addr, c->o->export_name, &c->has_export,
			    &c->o->timeout_ms, &c->o->sync, c->o, c->msg, sizeof(c->msg));
}

static int replica_open(struct td_image *img, const char *params, unsigned flags)
{
	struct replica *r = img->priv;
	struct opt_ctx c = { .o = &r->opts };
	int err;

	r->img = img;
	r->local = img->parent;
	r->opts.timeout_ms = DEFAULT_TIMEOUT_MS;
	r->opts.cbw_secs = DEFAULT_CBW_SECS;
	r->opts.sync = REPLICA_SYNC_BOTH;
	strcpy(r->opts.export_name, DEFAULT_EXPORT);
	tdr_defer_init(&r->notify, replica_notify_now, r);
	tdr_timer_init(&r->switch_timer, img->loop, switch_poll, r);

	err = td_parse_options(params, spec_option, &c);
	if (err) {
		tdr_set_error("replica:%s: %s", params, c.msg[0] ? c.msg : strerror(-err));
		return err < 0 ? err : -EINVAL;
	}
	if (r->opts.mode == REPLICA_MODE_UNSET) {
		tdr_set_error("replica:%s: no mode; add mode=primary or mode=secondary", params);
		return -EINVAL;
	}
	err = check_tls_options(&r->opts, c.msg, sizeof(c.msg));
	if (err < 0) {
		tdr_set_error("replica:%s: %s", params, c.msg);
		return err;
	}

	if (flags & TD_OPEN_RDONLY) {
		tdr_set_error("replica:%s: a replicated disk cannot be opened read-only", params);
		return -EINVAL;
	}
	img->size_secs = img->parent->size_secs;
	img->info_discard = img->parent->info_discard;
	r->ops = mode_ops(r->opts.mode);
	r->state = REPLICA_STATE_NONE;
	err = r->ops->init(r);
	if (err < 0)
		return err;
	return 0;
}

static void replica_close(struct td_image *img)
{
	struct replica *r = img->priv;

	switch_cancel(r, "the disk closed first");
	if (r->ops)
		r->ops->fini(r);
	/*
	 * An operation the mode abandoned (a start still connecting when
	 * SIGTERM closed the disk) is answered, or its client waits forever.
	 */
	if (r->op_busy)
		replica_op_done(r, -ESHUTDOWN, "the disk closed before the operation completed; its outcome is unknown: check the state once the disk is open again");
	tdr_loop_cancel_defer(img->loop, &r->notify);
}

static void replica_quiesce(struct td_image *img)
{
	struct replica *r = img->priv;

	r->closing = true;
	switch_cancel(r, "the disk is closing");
	if (r->ops->quiesce)
		r->ops->quiesce(r);
}

/* A mode switch in progress counts: its start has yet to run. */
static uint64_t replica_busy(struct td_image *img)
{
	struct replica *r = img->priv;

	return (r->ops->busy ? r->ops->busy(r) : 0) + r->switching;
}

static void replica_queue_read(struct td_image *img, struct td_request *req)
{
	struct replica *r = img->priv;

	r->stats.svm_reqs++;
	r->stats.svm_bytes += (uint64_t)req->secs << TD_SECTOR_SHIFT;
	r->ops->queue_read(r, req);
}

static void replica_queue_write(struct td_image *img, struct td_request *req)
{
	struct replica *r = img->priv;

	r->stats.svm_reqs++;
	r->stats.svm_bytes += (uint64_t)req->secs << TD_SECTOR_SHIFT;
	r->ops->queue_write(r, req);
}

static void replica_queue_other(struct td_image *img, struct td_request *req)
{
	struct replica *r = img->priv;

	if (r->ops->queue_other)
		r->ops->queue_other(r, req);
	else
		td_queue_request(r->local, req);
}

static void replica_debug(struct td_image *img, FILE *out)
{
	struct replica *r = img->priv;
	struct replica_status st;

	fprintf(out, "    replica: mode=%s state=%s local=%s:%s\n", replica_mode_name(r->opts.mode),
		replica_state_name(r->state), r->local->drv->name, r->local->params);
	if (r->ops->debug)
		r->ops->debug(r, out);
	replica_get_status(img, &st);
	replica_format_status(&st, out);
}

const struct td_driver td_drv_replica = {
	.name = "replica",
	.priv_size = sizeof(struct replica),
	.is_filter = true,
	.open = replica_open,
	.close = replica_close,
	.queue_read = replica_queue_read,
	.queue_write = replica_queue_write,
	.queue_flush = replica_queue_other,
	.queue_discard = replica_queue_other,
	.queue_block_status = replica_queue_other,
	.quiesce = replica_quiesce,
	.busy = replica_busy,
	.debug = replica_debug,
};
