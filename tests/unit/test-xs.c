/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The xenstore control protocol against an in-memory xenstored (wire
 * protocol over a UNIX socket, same event loop): request parsing and
 * validation, malformed values, unknown requests, bad and duplicate ids,
 * back-to-back requests, daemon restarts (no double execution), requests
 * during a failover, a frozen, restarted or absent xenstored, permissions
 * and the published keys.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fake-xenstored.h"
#include "tdr/log.h"
#include "tdr/loop.h"
#include "tdr/replica.h"
#include "tdr/xenstore.h"
#include "check-run.h"

#define DIR_ "/local/domain/0/backend/tapdisk-replica/7/51712"

/* ------------------------------------------------------------ fake replica */

struct fbe {
	struct tdr_loop *loop;
	struct replica_status st;
	unsigned nexec;
	enum replica_op ops[512];
	/* Checkpoints complete after ckpt_ms (0: at once). */
	unsigned ckpt_ms;
	struct tdr_timer ckpt_timer;
	replica_done_fn ckpt_done;
	void *ckpt_arg;
	/* A failover completes in the background after this long. */
	struct tdr_timer fo_timer;
	void (*obs)(void *);
	void *obs_arg;
	bool freed;
};

static void fbe_notify(struct fbe *b)
{
	if (b->obs)
		b->obs(b->obs_arg);
}

static int fbe_parse(void *arg, const char *line, struct replica_cmd *cmd, char *msg,
		     size_t msglen)
{
	(void)arg;
	return replica_parse(line, cmd, msg, msglen);
}

static void fbe_ckpt_fire(struct tdr_timer *t, void *arg)
{
	struct fbe *b = arg;
	replica_done_fn done = b->ckpt_done;

	(void)t;
	b->ckpt_done = NULL;
	b->st.stats.checkpoints++;
	done(b->ckpt_arg, 0, "");
}

static void fbe_fo_fire(struct tdr_timer *t, void *arg)
{
	struct fbe *b = arg;

	(void)t;
	b->st.state = REPLICA_STATE_DONE;
	b->st.progress_done = b->st.progress_total;
	fbe_notify(b);
}

static void fbe_execute(void *arg, const struct replica_cmd *cmd, replica_done_fn done,
			void *done_arg)
{
	struct fbe *b = arg;

	if (b->nexec < 512)
		b->ops[b->nexec] = cmd->op;
	b->nexec++;
	switch (cmd->op) {
	case REPLICA_OP_STATUS:
	case REPLICA_OP_GET_ERROR:
		done(done_arg, 0, cmd->op == REPLICA_OP_GET_ERROR ? "none" : "");
		return;
	default:
		break;
	}
	/* Like the replica filter, which refuses all but status and get-error
	 * during a failover with EBUSY (in its own words, e.g. "checkpoint
	 * refused: the secondary is in state failover"); this text is the
	 * fake's, to see that xs-ctl passes the backend's message through. */
	if (b->st.state == REPLICA_STATE_FAILOVER) {
		done(done_arg, -EBUSY, "refused: a failover is in progress; wait for state done");
		return;
	}
	switch (cmd->op) {
	case REPLICA_OP_START:
		if (cmd->mode != REPLICA_MODE_UNSET)
			b->st.mode = cmd->mode;
		b->st.state = REPLICA_STATE_RUNNING;
		fbe_notify(b);
		done(done_arg, 0, "");
		return;
	case REPLICA_OP_CHECKPOINT:
		if (b->ckpt_ms) {
			b->ckpt_done = done;
			b->ckpt_arg = done_arg;
			tdr_timer_arm(&b->ckpt_timer, (uint64_t)b->ckpt_ms * 1000000ull);
			return;
		}
		b->st.stats.checkpoints++;
		done(done_arg, 0, "");
		return;
	case REPLICA_OP_FAILOVER:
		b->st.state = REPLICA_STATE_FAILOVER;
		b->st.progress_total = 1 << 20;
		fbe_notify(b);
		tdr_timer_arm(&b->fo_timer, 300 * 1000000ull);
		done(done_arg, 0, "failover started");
		return;
	case REPLICA_OP_STOP:
		b->st.state = REPLICA_STATE_DONE;
		fbe_notify(b);
		done(done_arg, 0, "");
		return;
	case REPLICA_OP_RESYNC:
		if (b->st.mode != REPLICA_MODE_PRIMARY) {
			done(done_arg, -EOPNOTSUPP, "resync is an operation of a primary; this disk is a secondary");
			return;
		}
		done(done_arg, 0, "");
		return;
	default:
		done(done_arg, -EINVAL, "unexpected");
		return;
	}
}

static void fbe_status(void *arg, FILE *out)
{
	struct fbe *b = arg;

	replica_format_status(&b->st, out);
}

static void fbe_set_observer(void *arg, void (*changed)(void *), void *cb_arg)
{
	struct fbe *b = arg;

	b->obs = changed;
	b->obs_arg = cb_arg;
}

static void fbe_free(void *arg)
{
	struct fbe *b = arg;

	b->freed = true;
}

static const struct tdr_xs_backend fbe_ops = {
	.parse = fbe_parse,
	.execute = fbe_execute,
	.status = fbe_status,
	.set_observer = fbe_set_observer,
	.free = fbe_free,
};

/* ------------------------------------------------------------ fixture */

static struct tdr_loop *loop;
static struct fake_xs *fxs;
static char tmpdir[64], sock[128];
static struct fbe be;
static struct tdr_xs_ctl *ctl;

static void fbe_init(struct fbe *b)
{
	memset(b, 0, sizeof(*b));
	b->loop = loop;
	b->st.mode = REPLICA_MODE_SECONDARY;
	tdr_timer_init(&b->ckpt_timer, loop, fbe_ckpt_fire, b);
	tdr_timer_init(&b->fo_timer, loop, fbe_fo_fire, b);
}

static void ctl_start(void)
{
	struct tdr_xs_opts o = { .dir = DIR_, .xs_path = sock, .stats_ms = 50 };

	ck_assert_int_eq(tdr_xs_ctl_new(&ctl, loop, &o, &fbe_ops, &be), 0);
}

static void ctl_stop(void)
{
	tdr_xs_ctl_free(ctl);
	ctl = NULL;
}

static void setup(void)
{
	tdr_log_init("test-xs", false, TDR_LOG_ERR);
	loop = tdr_loop_new();
	ck_assert_ptr_nonnull(loop);
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/tdr-xs-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
	snprintf(sock, sizeof(sock), "%s/socket", tmpdir);
	fxs = fake_xs_new(loop, sock);
	ck_assert_ptr_nonnull(fxs);
	fbe_init(&be);
	ctl_start();
}

static void teardown(void)
{
	ctl_stop();
	tdr_timer_cancel(&be.ckpt_timer);
	tdr_timer_cancel(&be.fo_timer);
	fake_xs_free(fxs);
	unlink(sock);
	rmdir(tmpdir);
	tdr_loop_free(loop);
}

/* Runs the loop for ms milliseconds. */
static void spin(unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000ull;

	/* At least once: a process descheduled past end still turns the loop. */
	do
		tdr_loop_run_once(loop, 5);
	while (tdr_now_ns() < end);
}

static char *get(const char *rel)
{
	char path[512];

	snprintf(path, sizeof(path), DIR_ "/%s", rel);
	return fake_xs_read(fxs, path);
}

static bool is(const char *rel, const char *want)
{
	char *v = get(rel);
	bool ok = v && strcmp(v, want) == 0;

	free(v);
	return ok;
}

static bool has_prefix(const char *rel, const char *prefix)
{
	char *v = get(rel);
	bool ok = v && strncmp(v, prefix, strlen(prefix)) == 0;

	free(v);
	return ok;
}

/* Waits (running the loop) until rel exists; false after ms. */
static bool wait_exists(const char *rel, unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000ull;

	while (tdr_now_ns() < end) {
		char *v = get(rel);

		if (v) {
			free(v);
			return true;
		}
		tdr_loop_run_once(loop, 5);
	}
	return false;
}

static bool wait_value(const char *rel, const char *want, unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000ull;

	while (tdr_now_ns() < end) {
		if (is(rel, want))
			return true;
		tdr_loop_run_once(loop, 5);
	}
	return false;
}

static bool wait_ready(unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000ull;
	struct tdr_xs_ctl_info info;

	while (tdr_now_ns() < end) {
		tdr_xs_ctl_get_info(ctl, &info);
		if (info.ready)
			return true;
		tdr_loop_run_once(loop, 5);
	}
	return false;
}

static void req(const char *id, const char *line)
{
	char path[512];

	snprintf(path, sizeof(path), DIR_ "/request/%s", id);
	ck_assert_int_eq(fake_xs_write(fxs, path, line), 0);
}

/* Sends a request and returns its response (malloc'd). */
static char *call(const char *id, const char *line)
{
	char rel[128];

	req(id, line);
	snprintf(rel, sizeof(rel), "response/%s", id);
	ck_assert_msg(wait_exists(rel, 3000), "no response to request %s (%s)", id, line);
	spin(20);	/* the bookkeeping after the response */
	return get(rel);
}

#define ck_response(id, line, want)                                                        \
	do {                                                                                 \
		char *r_ = call(id, line);                                                   \
		ck_assert_msg(r_ && strncmp(r_, want, strlen(want)) == 0,                    \
			      "request %s '%s': response '%s', expected '%s...'", id, line,     \
			      r_ ? r_ : "(none)", want);                                     \
		free(r_);                                                                    \
	} while (0)

/* ------------------------------------------------------------ tests */

START_TEST(t_dir_checks)
{
	char buf[128];

	ck_assert_int_eq(tdr_xs_default_dir(buf, sizeof(buf), 5, 51712), 0);
	ck_assert_str_eq(buf, "/local/domain/0/backend/tapdisk-replica/5/51712");
	ck_assert_int_eq(tdr_xs_default_dir(buf, 10, 5, 51712), -ENAMETOOLONG);
	ck_assert_int_eq(tdr_xs_check_dir("/a/b"), 0);
	ck_assert_int_eq(tdr_xs_check_dir("a/b"), -EINVAL);
	ck_assert_int_eq(tdr_xs_check_dir("/a/b/"), -EINVAL);
	ck_assert_int_eq(tdr_xs_check_dir("/a//b"), -EINVAL);
	ck_assert_int_eq(tdr_xs_check_dir("/a b"), -EINVAL);
	ck_assert_int_eq(tdr_xs_check_dir("/"), -EINVAL);
	ck_assert_int_eq(tdr_xs_check_dir(""), -EINVAL);
}
END_TEST

START_TEST(t_setup_and_perms)
{
	char *p;

	ck_assert(wait_ready(2000));
	p = fake_xs_perms(fxs, DIR_);
	ck_assert_str_eq(p, "n0");
	free(p);
	p = fake_xs_perms(fxs, DIR_ "/request");
	ck_assert_str_eq(p, "n0");
	free(p);
	p = fake_xs_perms(fxs, DIR_ "/response");
	ck_assert_str_eq(p, "n0");
	free(p);
	/* Published at once: the state; within the period: the statistics. */
	ck_assert(wait_value("mode", "secondary", 1000));
	ck_assert(wait_value("state", "none", 1000));
	ck_assert(wait_value("error", "none", 1000));
	ck_assert(wait_value("stats/checkpoints", "0", 1000));
	ck_assert(wait_exists("progress_done", 1000));
}
END_TEST

START_TEST(t_checkpoint)
{
	ck_assert(wait_ready(2000));
	ck_response("1", "start mode=secondary addr=unix:/tmp/s.sock", "ok");
	ck_assert(wait_value("state", "running", 1000));
	ck_response("2", "checkpoint", "ok");
	ck_assert_uint_eq(be.nexec, 2);
	ck_assert(is("response/2", "ok"));
	ck_assert(wait_value("last-id", "2", 1000));
	ck_assert(is("executing", "2"));
	/* The request is removed once answered. */
	ck_assert_uint_eq(fake_xs_count_children(fxs, DIR_ "/request"), 0);
	ck_assert(wait_value("stats/checkpoints", "1", 1000));
	ck_response("3", "get-error", "ok none");
	ck_response("4", "status", "ok");
}
END_TEST

START_TEST(t_malformed_requests)
{
	static const struct {
		const char *line, *want;
	} bad[] = {
		{ "frobnicate", "error EINVAL " },
		{ "checkpoint now", "error EINVAL " },
		{ "start mode=tertiary", "error EINVAL " },
		{ "start timeout=99999999999", "error EINVAL " },
		{ "start frob=1", "error EINVAL " },
		{ "resync sideways", "error EINVAL " },
		{ "stop later", "error EINVAL " },
		{ "", "error EINVAL empty request" },
		{ "check\tpoint", "error EINVAL request has a non-printable byte 0x09" },
	};
	char id[16], big[2048];
	unsigned i;

	ck_assert(wait_ready(2000));
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(id, sizeof(id), "%u", i + 1);
		ck_response(id, bad[i].line, bad[i].want);
	}
	memset(big, 'a', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	ck_response("100", big, "error EINVAL request of 2047 bytes");
	/* A NUL inside the value. */
	ck_assert_int_eq(fake_xs_write_len(fxs, DIR_ "/request/101", "checkpoint\0x", 12), 0);
	ck_assert(wait_exists("response/101", 2000));
	ck_assert(has_prefix("response/101", "error EINVAL request has a non-printable byte"));
	/* Nothing reached the replica, and the daemon still serves. */
	ck_assert_uint_eq(be.nexec, 0);
	ck_assert(wait_value("last-id", "101", 1000));
	ck_response("102", "checkpoint", "ok");
	ck_assert_uint_eq(be.nexec, 1);
}
END_TEST

START_TEST(t_bad_ids)
{
	static const char *const ids[] = { "abc", "007", "0", "18446744073709551616", "-1x",
					   "1e3" };
	char rel[128];
	unsigned i;

	ck_assert(wait_ready(2000));
	for (i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
		req(ids[i], "checkpoint");
		snprintf(rel, sizeof(rel), "response/%s", ids[i]);
		ck_assert_msg(wait_exists(rel, 2000), "no response for id %s", ids[i]);
		ck_assert_msg(has_prefix(rel, "error EINVAL bad request id"), "id %s", ids[i]);
	}
	spin(50);
	ck_assert_uint_eq(be.nexec, 0);
	ck_assert_uint_eq(fake_xs_count_children(fxs, DIR_ "/request"), 0);
	/* Bad ids consume nothing: id 1 is still free. */
	ck_response("1", "checkpoint", "ok");
	ck_assert_uint_eq(be.nexec, 1);
	/* The largest id works. */
	ck_response("18446744073709551615", "checkpoint", "ok");
	ck_assert_uint_eq(be.nexec, 2);
}
END_TEST

START_TEST(t_duplicate_ids)
{
	ck_assert(wait_ready(2000));
	ck_response("5", "checkpoint", "ok");
	ck_assert_uint_eq(be.nexec, 1);
	ck_response("5", "checkpoint", "error EALREADY request id 5 was already used");
	ck_response("3", "checkpoint", "error EALREADY request id 3 was already used");
	ck_assert_uint_eq(be.nexec, 1);
	ck_response("6", "checkpoint", "ok");
	ck_assert_uint_eq(be.nexec, 2);
	ck_assert(wait_value("last-id", "6", 1000));
}
END_TEST

START_TEST(t_back_to_back)
{
	char id[16], rel[64];
	unsigned i;

	ck_assert(wait_ready(2000));
	be.ckpt_ms = 2;	/* each takes a little while: the rest queue up */
	/* Twenty requests written with no loop turn in between. */
	for (i = 10; i < 30; i++) {
		snprintf(id, sizeof(id), "%u", i);
		req(id, i % 5 == 0 ? "status" : "checkpoint");
	}
	ck_assert(wait_exists("response/29", 5000));
	spin(50);
	for (i = 10; i < 30; i++) {
		snprintf(rel, sizeof(rel), "response/%u", i);
		ck_assert_msg(is(rel, "ok"), "request %u not answered ok", i);
	}
	ck_assert_uint_eq(be.nexec, 20);
	for (i = 0; i < 20; i++)
		ck_assert_int_eq(be.ops[i], (i + 10) % 5 == 0 ? REPLICA_OP_STATUS
							      : REPLICA_OP_CHECKPOINT);
	ck_assert_uint_eq(be.st.stats.checkpoints, 16);
	ck_assert(is("last-id", "29"));
	ck_assert_uint_eq(fake_xs_count_children(fxs, DIR_ "/request"), 0);
}
END_TEST

START_TEST(t_response_pruning)
{
	char id[16];
	unsigned i;

	ck_assert(wait_ready(2000));
	for (i = 1; i <= 100; i++) {
		snprintf(id, sizeof(id), "%u", i);
		req(id, "status");
	}
	ck_assert(wait_exists("response/100", 5000));
	spin(50);
	ck_assert_uint_eq(be.nexec, 100);
	ck_assert_uint_le(fake_xs_count_children(fxs, DIR_ "/response"), 64);
	ck_assert(!get("response/1"));
	ck_assert(is("response/100", "ok"));
}
END_TEST

/* A new daemon over the same store executes only what is new. */
START_TEST(t_daemon_restart)
{
	unsigned n;

	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "ok");
	ck_response("2", "checkpoint", "ok");
	n = be.nexec;
	ctl_stop();
	/* Written while no daemon runs: kept, executed by the next one. */
	req("3", "checkpoint");
	req("4", "status");
	fbe_init(&be);
	ctl_start();
	ck_assert(wait_exists("response/4", 3000));
	spin(50);
	ck_assert(is("response/3", "ok"));
	ck_assert_uint_eq(be.nexec, 2);
	ck_assert(is("response/1", "ok"));
	ck_assert(is("last-id", "4"));
	/* Old ids are still refused by the new daemon. */
	ck_response("2", "checkpoint", "error EALREADY");
	ck_assert_uint_eq(be.nexec, 2);
	(void)n;
}
END_TEST

/* The daemon dies while a request executes: the next one never re-executes it. */
START_TEST(t_daemon_restart_while_executing)
{
	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "ok");
	be.ckpt_ms = 10000;	/* never completes before we "crash" */
	req("2", "checkpoint");
	spin(100);
	ck_assert(is("executing", "2"));
	ck_assert(!get("response/2"));
	ck_assert_uint_eq(be.nexec, 2);
	ctl_stop();
	/* The operation completes after the daemon has gone: ignored. */
	tdr_timer_cancel(&be.ckpt_timer);
	fbe_ckpt_fire(&be.ckpt_timer, &be);
	req("3", "checkpoint");
	fbe_init(&be);
	ctl_start();
	ck_assert(wait_exists("response/3", 3000));
	spin(50);
	ck_assert(has_prefix("response/2", "error EINTR the daemon restarted"));
	ck_assert(is("response/3", "ok"));
	ck_assert_uint_eq(be.nexec, 1);	/* only request 3 */
	ck_assert(is("last-id", "3"));
	ck_assert_uint_eq(fake_xs_count_children(fxs, DIR_ "/request"), 0);
}
END_TEST

/* Died after writing the response but before the bookkeeping. */
START_TEST(t_daemon_restart_after_response)
{
	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "ok");
	ctl_stop();
	/* What a daemon that died between the response and last-id leaves. */
	fake_xs_write(fxs, DIR_ "/executing", "2");
	fake_xs_write(fxs, DIR_ "/response/2", "ok");
	fake_xs_write(fxs, DIR_ "/request/2", "checkpoint");
	fbe_init(&be);
	ctl_start();
	ck_assert(wait_value("last-id", "2", 3000));
	spin(50);
	ck_assert_uint_eq(be.nexec, 0);
	ck_assert(is("response/2", "ok"));
	ck_assert(!get("request/2"));
}
END_TEST

START_TEST(t_requests_during_failover)
{
	ck_assert(wait_ready(2000));
	ck_response("1", "start mode=secondary", "ok");
	ck_response("2", "failover", "ok failover started");
	ck_assert(wait_value("state", "failover", 1000));
	/* Back to back while the failover runs. */
	req("3", "checkpoint");
	req("4", "failover");
	req("5", "stop");
	req("6", "status");
	ck_assert(wait_exists("response/6", 2000));
	spin(20);
	ck_assert(has_prefix("response/3", "error EBUSY refused: a failover is in progress"));
	ck_assert(has_prefix("response/4", "error EBUSY"));
	ck_assert(has_prefix("response/5", "error EBUSY"));
	ck_assert(is("response/6", "ok"));
	ck_assert(wait_value("state", "done", 2000));
	ck_assert(wait_value("progress_done", "1048576", 1000));
	ck_response("7", "resync full", "error ENOTSUP resync is an operation of a primary");
}
END_TEST

/*
 * Checks the loop keeps turning: a 1 ms timer counts its runs.  (Counting,
 * not timing: a gap limit failed on a loaded machine.)  A blocking wait
 * for the frozen xenstored, which this same loop serves, would never end.
 */
struct ticker {
	struct tdr_timer t;
	uint64_t n;
};

static void tick(struct tdr_timer *t, void *arg)
{
	struct ticker *k = arg;

	k->n++;
	tdr_timer_arm(t, 1000000);
}

START_TEST(t_xenstored_frozen)
{
	struct ticker k = { 0 };
	unsigned i;
	uint64_t n0;
	char *p;

	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "ok");
	tdr_timer_init(&k.t, loop, tick, &k);
	tdr_timer_arm(&k.t, 1000000);
	fake_xs_freeze(fxs, true);
	/* Changes keep coming (stats, state): they must coalesce, not block. */
	for (i = 0; i < 20; i++) {
		n0 = k.n;
		be.st.stats.svm_reqs += 1000;
		be.st.state = i % 2 ? REPLICA_STATE_RUNNING : REPLICA_STATE_BROKEN;
		fbe_notify(&be);
		spin(25);
		ck_assert_msg(k.n > n0, "the loop stood still after change %u", i);
	}
	/* A request written during the freeze (queued in xenstored). */
	req("2", "checkpoint");
	n0 = k.n;
	spin(200);
	ck_assert_uint_gt(k.n, n0);
	p = get("response/2");
	ck_assert_msg(!p, "answered while xenstored was frozen: %s", p);
	fake_xs_freeze(fxs, false);
	ck_assert(wait_exists("response/2", 3000));
	ck_assert(is("response/2", "ok"));
	ck_assert(wait_value("stats/svm_reqs", "20000", 1000));
	ck_assert(wait_value("state", "running", 1000));
	tdr_timer_cancel(&k.t);
}
END_TEST

START_TEST(t_xenstored_restart)
{
	struct tdr_xs_ctl_info info;
	char *p;

	ck_assert(wait_ready(2000));
	ck_response("1", "start mode=secondary", "ok");
	ck_response("2", "checkpoint", "ok");
	/* Killed: contents lost; restarted a little later. */
	fake_xs_stop(fxs, true);
	spin(100);
	tdr_xs_ctl_get_info(ctl, &info);
	ck_assert(!info.connected);
	ck_assert_int_eq(fake_xs_start(fxs), 0);
	ck_assert(wait_ready(3000));
	/* Republished: directory with permissions, state, statistics. */
	ck_assert(wait_value("state", "running", 2000));
	ck_assert(wait_value("stats/checkpoints", "1", 2000));
	p = fake_xs_perms(fxs, DIR_ "/request");
	ck_assert_str_eq(p, "n0");
	free(p);
	tdr_xs_ctl_get_info(ctl, &info);
	ck_assert_uint_eq(info.connects, 2);
	/* Requests are served again; the ids seen before are still used. */
	ck_response("3", "checkpoint", "ok");
	ck_response("2", "checkpoint", "error EALREADY");
	ck_assert_uint_eq(be.nexec, 3);
}
END_TEST

/* xenstored restarts while a request executes: the answer comes afterwards. */
START_TEST(t_xenstored_restart_while_executing)
{
	ck_assert(wait_ready(2000));
	be.ckpt_ms = 300;
	req("1", "checkpoint");
	spin(100);
	ck_assert_uint_eq(be.nexec, 1);
	fake_xs_stop(fxs, false);	/* keeps its contents (like a live update) */
	spin(400);			/* the checkpoint completes meanwhile */
	ck_assert_int_eq(fake_xs_start(fxs), 0);
	ck_assert(wait_exists("response/1", 3000));
	ck_assert(is("response/1", "ok"));
	ck_assert(wait_value("last-id", "1", 1000));
	ck_assert(!get("request/1"));
	ck_assert_uint_eq(be.nexec, 1);
}
END_TEST

START_TEST(t_xenstored_absent)
{
	struct tdr_xs_ctl_info info;

	ctl_stop();
	fake_xs_stop(fxs, true);
	ctl_start();
	spin(200);
	tdr_xs_ctl_get_info(ctl, &info);
	ck_assert(!info.connected);
	ck_assert_int_eq(fake_xs_start(fxs), 0);
	ck_assert(wait_ready(3000));
	ck_response("1", "checkpoint", "ok");
}
END_TEST

static void nodisk_execute(void *arg, const struct replica_cmd *cmd, replica_done_fn done,
			   void *done_arg)
{
	(void)arg;
	(void)cmd;
	done(done_arg, -ENODEV, "this disk (aio:/x) has no replica filter");
}

START_TEST(t_no_replica)
{
	static const struct tdr_xs_backend nodisk = { .parse = fbe_parse,
						      .execute = nodisk_execute };
	struct tdr_xs_opts o = { .dir = DIR_, .xs_path = sock };

	ctl_stop();
	ck_assert_int_eq(tdr_xs_ctl_new(&ctl, loop, &o, &nodisk, NULL), 0);
	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "error ENODEV this disk (aio:/x) has no replica filter");
	ck_response("2", "frob", "error EINVAL");
}
END_TEST

/* -------------------------------------------------- found by review */

/* Waits until be.nexec reaches n; false after ms. */
static bool wait_nexec(unsigned n, unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000ull;

	while (tdr_now_ns() < end && be.nexec < n)
		tdr_loop_run_once(loop, 5);
	return be.nexec >= n;
}

static bool wait_no_requests(unsigned ms)
{
	uint64_t end = tdr_now_ns() + (uint64_t)ms * 1000000ull;

	while (tdr_now_ns() < end && fake_xs_count_children(fxs, DIR_ "/request"))
		tdr_loop_run_once(loop, 5);
	return fake_xs_count_children(fxs, DIR_ "/request") == 0;
}

/*
 * A bad name longer than 23 characters is answered under its whole name
 * and removed (its answer once went under a name cut to 23 characters,
 * and the request stayed, answered again at every listing).
 */
START_TEST(t_long_bad_name)
{
	const char *name = "this-is-not-a-valid-request-id-but-a-long-one";
	char rel[128];

	ck_assert(wait_ready(2000));
	req(name, "checkpoint");
	snprintf(rel, sizeof(rel), "response/%s", name);
	ck_assert(wait_exists(rel, 2000));
	ck_assert(has_prefix(rel, "error EINVAL bad request id"));
	ck_assert(wait_no_requests(2000));
	ck_assert_uint_eq(fake_xs_count_children(fxs, DIR_ "/response"), 1);
	ck_assert_uint_eq(be.nexec, 0);
}
END_TEST

/*
 * More requests at once than the queue holds (4096), written while one
 * executes: every one is executed, in order (those past the queue were
 * once forgotten until something else listed the directory).  The
 * listing is then longer than one xenstore reply: read in parts.
 */
START_TEST(t_queue_overflow)
{
	const unsigned n = 4400;
	char id[32];

	ck_assert(wait_ready(2000));
	be.ckpt_ms = 500;
	req("1", "checkpoint");
	ck_assert(wait_value("executing", "1", 2000));
	for (unsigned i = 2; i <= n; i++) {
		snprintf(id, sizeof(id), "%u", i);
		req(id, "status");
		if (i % 256 == 0)
			tdr_loop_run_once(loop, 0);
	}
	ck_assert_msg(wait_nexec(n, 25000), "executed %u of %u", be.nexec, n);
	ck_assert(wait_no_requests(2000));
	snprintf(id, sizeof(id), "%u", n);
	ck_assert(wait_value("last-id", id, 2000));
}
END_TEST

/*
 * Requests queued while no daemon runs, more than one xenstore reply can
 * list (400 ids of 10 digits, 4,400 bytes): all executed at start (real
 * xenstored answers E2BIG to such a listing; the rest were once lost).
 */
START_TEST(t_big_queue_while_down)
{
	char id[32];

	ck_assert(wait_ready(2000));
	ctl_stop();
	for (unsigned i = 0; i < 400; i++) {
		snprintf(id, sizeof(id), "%u", 1000000000u + i);
		req(id, "status");
	}
	fbe_init(&be);
	ctl_start();
	ck_assert(wait_ready(3000));
	ck_assert_msg(wait_nexec(400, 10000), "executed %u of 400", be.nexec);
	ck_assert(wait_no_requests(2000));
	ck_assert(wait_value("last-id", "1000000399", 2000));
}
END_TEST

/*
 * xenstored restarted and lost everything: last-id comes back at once
 * (it stayed absent until the next request), and old ids are refused.
 */
START_TEST(t_last_id_after_store_lost)
{
	char *r;

	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "ok");
	ck_response("2", "checkpoint", "ok");
	fake_xs_stop(fxs, true);
	spin(100);
	ck_assert_int_eq(fake_xs_start(fxs), 0);
	ck_assert(wait_ready(3000));
	ck_assert(wait_value("last-id", "2", 2000));
	r = call("1", "checkpoint");
	ck_assert_ptr_nonnull(r);
	ck_assert_msg(strncmp(r, "error EALREADY", 14) == 0, "%s", r);
	free(r);
	ck_assert_uint_eq(be.nexec, 2);
}
END_TEST

/*
 * The connection drops just after xenstored stored our claim of request 2
 * (executing=2) and before its replies reached us: the request was not
 * executed, and is executed after the reconnection (it was once answered
 * EINTR "the daemon restarted", which it had not).
 */
START_TEST(t_claim_reply_lost)
{
	unsigned i;
	char *r;

	ck_assert(wait_ready(2000));
	ck_response("1", "checkpoint", "ok");
	req("2", "checkpoint");
	for (i = 0; i < 2000 && !is("executing", "2"); i++)
		tdr_loop_run_once(loop, 1);
	ck_assert(is("executing", "2"));
	fake_xs_stop(fxs, false);
	spin(50);
	ck_assert_int_eq(fake_xs_start(fxs), 0);
	ck_assert(wait_exists("response/2", 3000));
	r = get("response/2");
	ck_assert_str_eq(r, "ok");
	free(r);
	ck_assert_uint_eq(be.nexec, 2);
}
END_TEST

/*
 * Keys of ours that existed before, made by another domain (the directory
 * was once writable to it): they become dom0-only like the directory.
 */
START_TEST(t_perms_of_existing_keys)
{
	static const char *const keys[] = { "", "/last-id", "/stats", "/stats/checkpoints",
					    "/state", "/response/50" };
	char path[512];

	ck_assert(wait_ready(2000));
	ctl_stop();
	fake_xs_rm(fxs, DIR_);
	ck_assert_int_eq(fake_xs_write(fxs, DIR_ "/last-id", "40"), 0);
	ck_assert_int_eq(fake_xs_write(fxs, DIR_ "/stats/checkpoints", "0"), 0);
	ck_assert_int_eq(fake_xs_write(fxs, DIR_ "/state", "running"), 0);
	ck_assert_int_eq(fake_xs_write(fxs, DIR_ "/response/50", "ok"), 0);
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		snprintf(path, sizeof(path), DIR_ "%s", keys[i]);
		ck_assert_int_eq(fake_xs_set_perms(fxs, path, "b5"), 0);
	}
	fbe_init(&be);
	ctl_start();
	ck_assert(wait_ready(3000));
	spin(300);
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		char *perms;

		snprintf(path, sizeof(path), DIR_ "%s", keys[i]);
		perms = fake_xs_perms(fxs, path);
		ck_assert_msg(perms && strcmp(perms, "n0") == 0, "%s: %s", path,
			      perms ? perms : "(gone)");
		free(perms);
	}
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("xenstore");
	TCase *tc = tcase_create("protocol");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, t_dir_checks);
	tcase_add_test(tc, t_setup_and_perms);
	tcase_add_test(tc, t_checkpoint);
	tcase_add_test(tc, t_malformed_requests);
	tcase_add_test(tc, t_bad_ids);
	tcase_add_test(tc, t_duplicate_ids);
	tcase_add_test(tc, t_back_to_back);
	tcase_add_test(tc, t_response_pruning);
	tcase_add_test(tc, t_daemon_restart);
	tcase_add_test(tc, t_daemon_restart_while_executing);
	tcase_add_test(tc, t_daemon_restart_after_response);
	tcase_add_test(tc, t_requests_during_failover);
	tcase_add_test(tc, t_xenstored_frozen);
	tcase_add_test(tc, t_xenstored_restart);
	tcase_add_test(tc, t_xenstored_restart_while_executing);
	tcase_add_test(tc, t_xenstored_absent);
	tcase_add_test(tc, t_no_replica);
	suite_add_tcase(s, tc);
	tc = tcase_create("review");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, t_long_bad_name);
	tcase_add_test(tc, t_queue_overflow);
	tcase_add_test(tc, t_big_queue_while_down);
	tcase_add_test(tc, t_last_id_after_store_lost);
	tcase_add_test(tc, t_claim_reply_lost);
	tcase_add_test(tc, t_perms_of_existing_keys);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return check_run(suite(), CHECK_RUN_FORK);
}
