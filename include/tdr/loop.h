/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The event loop: one per process, built on epoll.
 *
 * Watches, timers and deferred calls are embedded in the caller's own
 * structures, so nothing here allocates on the data path.  A watch may be
 * removed from inside any callback, including one for another fd of the same
 * epoll batch: the loop forgets the removed watch's pending events.
 */
#ifndef TDR_LOOP_H
#define TDR_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>

struct tdr_loop;
struct tdr_fd_watch;
struct tdr_timer;

typedef void (*tdr_fd_cb)(struct tdr_fd_watch *w, uint32_t events, void *arg);
typedef void (*tdr_timer_cb)(struct tdr_timer *t, void *arg);
typedef void (*tdr_defer_cb)(void *arg);

struct tdr_fd_watch {
	struct tdr_loop *loop;
	int fd;
	uint32_t events;	/* EPOLLIN, EPOLLOUT, ... */
	tdr_fd_cb cb;
	void *arg;
	bool active;
};

struct tdr_timer {
	struct tdr_loop *loop;
	uint64_t deadline_ns;	/* CLOCK_MONOTONIC */
	size_t heap_idx;	/* position in the loop's min-heap, or SIZE_MAX */
	tdr_timer_cb cb;
	void *arg;
};

/* A call made once, before the loop next waits for events. */
struct tdr_defer {
	struct tdr_defer *next;
	tdr_defer_cb cb;
	void *arg;
	bool queued;
};

/* Runs before every wait; the I/O backend uses one to submit its batch. */
struct tdr_prepare {
	struct tdr_prepare *next;
	tdr_defer_cb cb;
	void *arg;
};

/* Monotonic time in nanoseconds. */
uint64_t tdr_now_ns(void);

/* Returns a new loop, or NULL with errno set. */
struct tdr_loop *tdr_loop_new(void);
void tdr_loop_free(struct tdr_loop *loop);

int tdr_loop_watch_fd(struct tdr_loop *loop, struct tdr_fd_watch *w, int fd,
		      uint32_t events, tdr_fd_cb cb, void *arg);
int tdr_loop_update_fd(struct tdr_fd_watch *w, uint32_t events);
void tdr_loop_unwatch_fd(struct tdr_fd_watch *w);

void tdr_timer_init(struct tdr_timer *t, struct tdr_loop *loop, tdr_timer_cb cb, void *arg);
/* (Re)arms the timer to fire once, delay_ns from now. */
void tdr_timer_arm(struct tdr_timer *t, uint64_t delay_ns);
void tdr_timer_cancel(struct tdr_timer *t);
bool tdr_timer_armed(const struct tdr_timer *t);

void tdr_defer_init(struct tdr_defer *d, tdr_defer_cb cb, void *arg);
/* Queues d (no-op if already queued); it runs before the next wait. */
void tdr_loop_defer(struct tdr_loop *loop, struct tdr_defer *d);
void tdr_loop_cancel_defer(struct tdr_loop *loop, struct tdr_defer *d);

void tdr_loop_add_prepare(struct tdr_loop *loop, struct tdr_prepare *p, tdr_defer_cb cb, void *arg);
void tdr_loop_remove_prepare(struct tdr_loop *loop, struct tdr_prepare *p);

/*
 * Adaptive polling.  Before it sleeps in epoll_wait, the loop can look for
 * events without sleeping for a while: a process that waits for the next
 * NBD request or disk completion only a few microseconds at a time then
 * skips the wake-up of a sleeping thread (tens of microseconds on a
 * virtual CPU), so more of the client's requests reach the disk.  The
 * window adapts between 0 and max_ns: it doubles (from
 * TDR_LOOP_POLL_START_NS) after a sleep that ended within 4 x max_ns, and
 * halves after a longer one, closing below TDR_LOOP_POLL_START_NS, so an
 * idle loop soon spends no CPU time on it.
 * max_ns 0 (the default) never polls.
 */
#define TDR_LOOP_POLL_START_NS 4000ull
#define TDR_LOOP_POLL_MAX_US 10000ul	/* the largest max a user may set */

struct tdr_loop_poll_stats {
	uint64_t max_ns;	/* as set */
	uint64_t window_ns;	/* the current window */
	uint64_t polls;		/* waits that polled first */
	uint64_t hits;		/* ... and found an event while polling */
};

void tdr_loop_set_poll_max(struct tdr_loop *loop, uint64_t max_ns);
void tdr_loop_get_poll_stats(const struct tdr_loop *loop, struct tdr_loop_poll_stats *st);
/*
 * Parses a --poll-max-us argument: decimal microseconds from 0 to
 * TDR_LOOP_POLL_MAX_US.  Returns 0, or -EINVAL.
 */
int tdr_loop_parse_poll_us(const char *s, uint64_t *max_ns);
#define TDR_LOOP_POLL_ERROR "bad --poll-max-us '%s'; give microseconds from 0 (off) to 10000"

/*
 * Runs one iteration: deferred calls, prepare hooks, one epoll_wait of at most
 * timeout_ms (-1: until the next timer or event), the ready callbacks and the
 * expired timers.  Returns the number of callbacks run, or -errno.
 */
int tdr_loop_run_once(struct tdr_loop *loop, int timeout_ms);
/* Runs until tdr_loop_stop() is called; returns 0 or -errno. */
int tdr_loop_run(struct tdr_loop *loop);
void tdr_loop_stop(struct tdr_loop *loop);
bool tdr_loop_stopped(const struct tdr_loop *loop);

#endif
