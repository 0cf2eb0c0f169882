/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the event loop: timers, fd watches, deferred calls, hooks. */
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/loop.h"
#include "check-run.h"

static struct tdr_loop *loop;

static void setup(void)
{
	loop = tdr_loop_new();
	ck_assert_ptr_nonnull(loop);
}

static void teardown(void)
{
	tdr_loop_free(loop);
}

/* ------------------------------------------------------------ timers */

static int fired[8], nfired;

static void record_timer(struct tdr_timer *t, void *arg)
{
	fired[nfired++] = (int)(long)arg;
}

START_TEST(timers_fire_in_deadline_order)
{
	struct tdr_timer t[4];
	const int delays_ms[4] = { 30, 10, 20, 5 };

	nfired = 0;
	for (int i = 0; i < 4; i++) {
		tdr_timer_init(&t[i], loop, record_timer, (void *)(long)i);
		tdr_timer_arm(&t[i], (uint64_t)delays_ms[i] * 1000000);
		ck_assert(tdr_timer_armed(&t[i]));
	}
	while (nfired < 4)
		ck_assert_int_ge(tdr_loop_run_once(loop, -1), 0);
	ck_assert_int_eq(fired[0], 3);
	ck_assert_int_eq(fired[1], 1);
	ck_assert_int_eq(fired[2], 2);
	ck_assert_int_eq(fired[3], 0);
	for (int i = 0; i < 4; i++)
		ck_assert(!tdr_timer_armed(&t[i]));
}
END_TEST

START_TEST(timer_cancel_and_rearm)
{
	struct tdr_timer a, b, c;

	nfired = 0;
	tdr_timer_init(&a, loop, record_timer, (void *)1L);
	tdr_timer_init(&b, loop, record_timer, (void *)2L);
	tdr_timer_init(&c, loop, record_timer, (void *)3L);
	tdr_timer_arm(&a, 1000000);
	tdr_timer_arm(&b, 2000000);
	tdr_timer_arm(&c, 3000000);
	tdr_timer_cancel(&a);
	ck_assert(!tdr_timer_armed(&a));
	tdr_timer_cancel(&a);	/* twice is harmless */
	/* Re-arming moves the deadline: b now fires after c. */
	tdr_timer_arm(&b, 20000000);
	while (nfired < 2)
		tdr_loop_run_once(loop, -1);
	ck_assert_int_eq(fired[0], 3);
	ck_assert_int_eq(fired[1], 2);
	/* Nothing else is pending: a zero-timeout turn runs no callback. */
	ck_assert_int_eq(tdr_loop_run_once(loop, 0), 0);
	ck_assert_int_eq(nfired, 2);
}
END_TEST

/* A timer heap with many entries stays ordered through random removals. */
START_TEST(timer_heap_many)
{
	enum { N = 200 };
	struct tdr_timer *t = calloc(N, sizeof(*t));
	uint64_t last = 0;
	int count = 0;

	ck_assert_ptr_nonnull(t);
	srand(42);
	for (int i = 0; i < N; i++) {
		tdr_timer_init(&t[i], loop, record_timer, NULL);
		tdr_timer_arm(&t[i], (uint64_t)(rand() % 1000) * 1000000 + 1000000000);
	}
	for (int i = 0; i < N; i += 3)
		tdr_timer_cancel(&t[i]);
	/* Pop through the public API: cancel the earliest repeatedly. */
	for (;;) {
		struct tdr_timer *min = NULL;

		for (int i = 0; i < N; i++)
			if (tdr_timer_armed(&t[i]) && (!min || t[i].deadline_ns < min->deadline_ns))
				min = &t[i];
		if (!min)
			break;
		ck_assert_uint_ge(min->deadline_ns, last);
		last = min->deadline_ns;
		tdr_timer_cancel(min);
		count++;
	}
	ck_assert_int_eq(count, N - (N + 2) / 3);
	free(t);
}
END_TEST

/* --------------------------------------------------------------- fds */

struct pipe_ctx {
	int fds[2];
	struct tdr_fd_watch w;
	int calls;
	uint32_t last_events;
	struct pipe_ctx *victim;	/* unwatched from this one's callback */
};

static void pipe_cb(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct pipe_ctx *p = arg;
	char buf[16];

	p->calls++;
	p->last_events = events;
	if (read(p->fds[0], buf, sizeof(buf)) < 0)
		ck_abort_msg("read failed");
	if (p->victim) {
		tdr_loop_unwatch_fd(&p->victim->w);
		/* Poison it: the loop must not touch it again in this batch. */
		memset(&p->victim->w, 0xa5, sizeof(p->victim->w));
		p->victim->w.active = false;
	}
}

START_TEST(fd_watch_readable)
{
	struct pipe_ctx p = { 0 };

	ck_assert_int_eq(pipe(p.fds), 0);
	ck_assert_int_eq(tdr_loop_watch_fd(loop, &p.w, p.fds[0], EPOLLIN, pipe_cb, &p), 0);
	ck_assert_int_eq(tdr_loop_run_once(loop, 0), 0);
	ck_assert_int_eq(p.calls, 0);
	ck_assert_int_eq(write(p.fds[1], "x", 1), 1);
	ck_assert_int_eq(tdr_loop_run_once(loop, 1000), 1);
	ck_assert_int_eq(p.calls, 1);
	ck_assert(p.last_events & EPOLLIN);
	/* Updating to the same mask is a no-op; to EPOLLOUT on a read end: no event. */
	ck_assert_int_eq(tdr_loop_update_fd(&p.w, EPOLLIN), 0);
	tdr_loop_unwatch_fd(&p.w);
	ck_assert_int_eq(tdr_loop_update_fd(&p.w, EPOLLIN), -EINVAL);
	ck_assert_int_eq(write(p.fds[1], "y", 1), 1);
	ck_assert_int_eq(tdr_loop_run_once(loop, 0), 0);
	ck_assert_int_eq(p.calls, 1);
	close(p.fds[0]);
	close(p.fds[1]);
}
END_TEST

START_TEST(fd_watch_bad_fd)
{
	struct tdr_fd_watch w;

	ck_assert_int_eq(tdr_loop_watch_fd(loop, &w, 12345, EPOLLIN, pipe_cb, NULL), -EBADF);
	ck_assert(!w.active);
}
END_TEST

/* Unwatching another fd from a callback of the same batch drops its event. */
START_TEST(fd_unwatch_within_batch)
{
	struct pipe_ctx a = { 0 }, b = { 0 };

	ck_assert_int_eq(pipe(a.fds), 0);
	ck_assert_int_eq(pipe(b.fds), 0);
	a.victim = &b;
	b.victim = &a;
	ck_assert_int_eq(tdr_loop_watch_fd(loop, &a.w, a.fds[0], EPOLLIN, pipe_cb, &a), 0);
	ck_assert_int_eq(tdr_loop_watch_fd(loop, &b.w, b.fds[0], EPOLLIN, pipe_cb, &b), 0);
	ck_assert_int_eq(write(a.fds[1], "x", 1), 1);
	ck_assert_int_eq(write(b.fds[1], "x", 1), 1);
	ck_assert_int_eq(tdr_loop_run_once(loop, 1000), 1);
	ck_assert_int_eq(a.calls + b.calls, 1);
	close(a.fds[0]);
	close(a.fds[1]);
	close(b.fds[0]);
	close(b.fds[1]);
}
END_TEST

/* ----------------------------------------------------- defer, prepare */

static int order[16], norder;

static void record_defer(void *arg)
{
	order[norder++] = (int)(long)arg;
}

static struct tdr_defer chained;

static void defer_requeue(void *arg)
{
	order[norder++] = 100;
	tdr_defer_init(&chained, record_defer, (void *)101L);
	tdr_loop_defer(loop, &chained);
}

START_TEST(defer_fifo_once)
{
	struct tdr_defer d1, d2, d3, d4;

	norder = 0;
	tdr_defer_init(&d1, record_defer, (void *)1L);
	tdr_defer_init(&d2, record_defer, (void *)2L);
	tdr_defer_init(&d3, record_defer, (void *)3L);
	tdr_defer_init(&d4, defer_requeue, NULL);
	tdr_loop_defer(loop, &d1);
	tdr_loop_defer(loop, &d2);
	tdr_loop_defer(loop, &d1);	/* already queued: runs once */
	tdr_loop_defer(loop, &d3);
	tdr_loop_cancel_defer(loop, &d2);
	tdr_loop_defer(loop, &d4);
	/* Deferred calls run without waiting, even with an infinite timeout. */
	ck_assert_int_eq(tdr_loop_run_once(loop, -1), 4);
	ck_assert_int_eq(norder, 4);
	ck_assert_int_eq(order[0], 1);
	ck_assert_int_eq(order[1], 3);
	ck_assert_int_eq(order[2], 100);
	ck_assert_int_eq(order[3], 101);
}
END_TEST

/* A deferred call that cancels a later one of the same batch. */
static struct tdr_defer victim, after;

static void cancel_victim(void *arg)
{
	order[norder++] = 1;
	tdr_loop_cancel_defer(loop, &victim);
}

START_TEST(defer_cancel_within_batch)
{
	struct tdr_defer first;

	norder = 0;
	tdr_defer_init(&first, cancel_victim, NULL);
	tdr_defer_init(&victim, record_defer, (void *)2L);
	tdr_defer_init(&after, record_defer, (void *)3L);
	tdr_loop_defer(loop, &first);
	tdr_loop_defer(loop, &victim);
	tdr_loop_defer(loop, &after);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(norder, 2);
	ck_assert_int_eq(order[0], 1);
	ck_assert_int_eq(order[1], 3);
	ck_assert(!victim.queued);
	ck_assert(!after.queued);
	/* Both can be queued again. */
	tdr_loop_defer(loop, &victim);
	tdr_loop_defer(loop, &after);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(norder, 4);
	ck_assert_int_eq(order[2], 2);
	ck_assert_int_eq(order[3], 3);
}
END_TEST

static int prepares;

static void count_prepare(void *arg)
{
	prepares++;
}

START_TEST(prepare_runs_every_turn)
{
	struct tdr_prepare p;

	prepares = 0;
	tdr_loop_add_prepare(loop, &p, count_prepare, NULL);
	tdr_loop_run_once(loop, 0);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(prepares, 2);
	tdr_loop_remove_prepare(loop, &p);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(prepares, 2);
}
END_TEST

static void stop_timer(struct tdr_timer *t, void *arg)
{
	tdr_loop_stop(loop);
}

START_TEST(run_until_stop)
{
	struct tdr_timer t;

	tdr_timer_init(&t, loop, stop_timer, NULL);
	tdr_timer_arm(&t, 5000000);
	ck_assert(!tdr_loop_stopped(loop));
	ck_assert_int_eq(tdr_loop_run(loop), 0);
	ck_assert(tdr_loop_stopped(loop));
}
END_TEST

/* ----------------------------------------------------------- polling */

START_TEST(poll_parse)
{
	uint64_t ns = 42;

	ck_assert_int_eq(tdr_loop_parse_poll_us("0", &ns), 0);
	ck_assert_uint_eq(ns, 0);
	ck_assert_int_eq(tdr_loop_parse_poll_us("200", &ns), 0);
	ck_assert_uint_eq(ns, 200000);
	ck_assert_int_eq(tdr_loop_parse_poll_us("10000", &ns), 0);
	ck_assert_uint_eq(ns, 10000000);
	ns = 42;
	ck_assert_int_eq(tdr_loop_parse_poll_us("10001", &ns), -EINVAL);
	ck_assert_int_eq(tdr_loop_parse_poll_us("", &ns), -EINVAL);
	ck_assert_int_eq(tdr_loop_parse_poll_us("-1", &ns), -EINVAL);
	ck_assert_int_eq(tdr_loop_parse_poll_us(" 5", &ns), -EINVAL);
	ck_assert_int_eq(tdr_loop_parse_poll_us("5us", &ns), -EINVAL);
	ck_assert_int_eq(tdr_loop_parse_poll_us("99999999999999999999999", &ns), -EINVAL);
	ck_assert_uint_eq(ns, 42);
}
END_TEST

static void run_timer_wait(uint64_t delay_ns)
{
	struct tdr_timer t;

	nfired = 0;
	tdr_timer_init(&t, loop, record_timer, (void *)0L);
	tdr_timer_arm(&t, delay_ns);
	while (!nfired)
		ck_assert_int_ge(tdr_loop_run_once(loop, -1), 0);
}

/* The loop's window and counters are exactly these. */
static void expect_poll(uint64_t window_ns, uint64_t polls, uint64_t hits)
{
	struct tdr_loop_poll_stats st;

	tdr_loop_get_poll_stats(loop, &st);
	ck_assert_uint_eq(st.window_ns, window_ns);
	ck_assert_uint_eq(st.polls, polls);
	ck_assert_uint_eq(st.hits, hits);
}

/*
 * The window's rules, not its timing: a timer cannot fire early, so a wait
 * for one of 1 ms sleeps longer than any window below it, and one of 30 ms
 * longer than 4 x a 1 ms maximum.  (A wait of 1 ms counts as within a 1 s
 * maximum unless the machine stalls for seconds.)
 */
START_TEST(poll_window_adapts)
{
	struct tdr_loop_poll_stats st;
	struct pipe_ctx p = { 0 };

	tdr_loop_get_poll_stats(loop, &st);
	ck_assert_uint_eq(st.max_ns, 0);
	/* Off by default: waits never poll. */
	run_timer_wait(1000000);
	expect_poll(0, 0, 0);

	tdr_loop_set_poll_max(loop, 1000000000);
	tdr_loop_get_poll_stats(loop, &st);
	ck_assert_uint_eq(st.max_ns, 1000000000);
	/* A short sleep opens the window... */
	run_timer_wait(1000000);
	expect_poll(TDR_LOOP_POLL_START_NS, 0, 0);
	/* ... and each one longer than the window doubles it, after a poll that found nothing. */
	run_timer_wait(1000000);
	expect_poll(2 * TDR_LOOP_POLL_START_NS, 1, 0);

	/* An event already there is found by the poll and dispatched; the window stays. */
	ck_assert_int_eq(pipe(p.fds), 0);
	ck_assert_int_eq(tdr_loop_watch_fd(loop, &p.w, p.fds[0], EPOLLIN, pipe_cb, &p), 0);
	ck_assert_int_eq(write(p.fds[1], "x", 1), 1);
	ck_assert_int_eq(tdr_loop_run_once(loop, -1), 1);
	ck_assert_int_eq(p.calls, 1);
	expect_poll(2 * TDR_LOOP_POLL_START_NS, 2, 1);
	tdr_loop_unwatch_fd(&p.w);
	close(p.fds[0]);
	close(p.fds[1]);

	/* run_once(0) never sleeps, so it never polls either. */
	ck_assert_int_eq(tdr_loop_run_once(loop, 0), 0);
	expect_poll(2 * TDR_LOOP_POLL_START_NS, 2, 1);

	/* A sleep longer than 4 x the maximum halves the window: the loop goes idle. */
	tdr_loop_set_poll_max(loop, 1000000);
	run_timer_wait(30000000);
	expect_poll(TDR_LOOP_POLL_START_NS, 3, 1);
	/* ... and closes it once below the starting size. */
	run_timer_wait(30000000);
	expect_poll(0, 4, 1);

	/* A lower maximum takes the window down with it. */
	tdr_loop_set_poll_max(loop, 1000000000);
	run_timer_wait(1000000);
	run_timer_wait(1000000);
	expect_poll(2 * TDR_LOOP_POLL_START_NS, 5, 1);
	tdr_loop_set_poll_max(loop, 5000);
	expect_poll(5000, 5, 1);

	/* Off again: the window closes and waits no longer poll. */
	tdr_loop_set_poll_max(loop, 0);
	run_timer_wait(1000000);
	expect_poll(0, 5, 1);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("loop");
	TCase *tc = tcase_create("core");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, timers_fire_in_deadline_order);
	tcase_add_test(tc, timer_cancel_and_rearm);
	tcase_add_test(tc, timer_heap_many);
	tcase_add_test(tc, fd_watch_readable);
	tcase_add_test(tc, fd_watch_bad_fd);
	tcase_add_test(tc, fd_unwatch_within_batch);
	tcase_add_test(tc, defer_fifo_once);
	tcase_add_test(tc, defer_cancel_within_batch);
	tcase_add_test(tc, prepare_runs_every_turn);
	tcase_add_test(tc, run_until_stop);
	tcase_add_test(tc, poll_parse);
	tcase_add_test(tc, poll_window_adapts);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_FORK);
}
