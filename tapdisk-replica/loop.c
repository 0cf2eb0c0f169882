/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The event loop: epoll for file descriptors, a binary min-heap for timers,
 * a FIFO of deferred calls and a list of prepare hooks.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tdr/loop.h"

#define LOOP_MAX_EVENTS 64

struct tdr_loop {
	int epfd;
	bool stop;

	/* The batch being dispatched; unwatch clears entries pointing at a dead watch. */
	struct epoll_event events[LOOP_MAX_EVENTS];
	int nevents;
	int cur;

	struct tdr_timer **heap;
	size_t nheap, heap_cap;

	struct tdr_defer *defer_head, *defer_tail;
	struct tdr_prepare *prepares;

	struct tdr_loop_poll_stats poll;
};

uint64_t tdr_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct tdr_loop *tdr_loop_new(void)
{
	struct tdr_loop *loop = calloc(1, sizeof(*loop));

	if (!loop)
		return NULL;
	loop->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (loop->epfd < 0) {
		int err = errno;

		free(loop);
		errno = err;
		return NULL;
	}
	return loop;
}

void tdr_loop_free(struct tdr_loop *loop)
{
	if (!loop)
		return;
	close(loop->epfd);
	free(loop->heap);
	free(loop);
}

/* ---------------------------------------------------------------- fds */

int tdr_loop_watch_fd(struct tdr_loop *loop, struct tdr_fd_watch *w, int fd,
		      uint32_t events, tdr_fd_cb cb, void *arg)
{
	struct epoll_event ev = { .events = events, .data.ptr = w };

	w->active = false;
	w->loop = loop;
	w->fd = fd;
	w->events = events;
	w->cb = cb;
	w->arg = arg;
	if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
		return -errno;
	w->active = true;
	return 0;
}

int tdr_loop_update_fd(struct tdr_fd_watch *w, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = w };

	if (!w->active)
		return -EINVAL;
	if (events == w->events)
		return 0;
	if (epoll_ctl(w->loop->epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0)
		return -errno;
	w->events = events;
	return 0;
}

void tdr_loop_unwatch_fd(struct tdr_fd_watch *w)
{
	struct tdr_loop *loop = w->loop;

	if (!w->active)
		return;
	epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->fd, NULL);
	w->active = false;
	/* The caller may free w next: forget its events still in this batch. */
	for (int i = loop->cur; i < loop->nevents; i++)
		if (loop->events[i].data.ptr == w)
			loop->events[i].data.ptr = NULL;
}

/* ------------------------------------------------------------- timers */

static void heap_swap(struct tdr_loop *loop, size_t a, size_t b)
{
	struct tdr_timer *t = loop->heap[a];

	loop->heap[a] = loop->heap[b];
	loop->heap[b] = t;
	loop->heap[a]->heap_idx = a;
	loop->heap[b]->heap_idx = b;
}

static void heap_up(struct tdr_loop *loop, size_t i)
{
	while (i > 0) {
		size_t p = (i - 1) / 2;

		if (loop->heap[p]->deadline_ns <= loop->heap[i]->deadline_ns)
			break;
		heap_swap(loop, i, p);
		i = p;
	}
}

static void heap_down(struct tdr_loop *loop, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;

		if (l < loop->nheap && loop->heap[l]->deadline_ns < loop->heap[m]->deadline_ns)
			m = l;
		if (r < loop->nheap && loop->heap[r]->deadline_ns < loop->heap[m]->deadline_ns)
			m = r;
		if (m == i)
			break;
		heap_swap(loop, i, m);
		i = m;
	}
}

static void heap_remove(struct tdr_loop *loop, struct tdr_timer *t)
{
	size_t i = t->heap_idx;

	loop->nheap--;
	if (i != loop->nheap) {
		loop->heap[i] = loop->heap[loop->nheap];
		loop->heap[i]->heap_idx = i;
		heap_up(loop, i);
		heap_down(loop, loop->heap[i]->heap_idx);
	}
	t->heap_idx = SIZE_MAX;
}

void tdr_timer_init(struct tdr_timer *t, struct tdr_loop *loop, tdr_timer_cb cb, void *arg)
{
	t->loop = loop;
	t->cb = cb;
	t->arg = arg;
	t->deadline_ns = 0;
	t->heap_idx = SIZE_MAX;
}

bool tdr_timer_armed(const struct tdr_timer *t)
{
	return t->heap_idx != SIZE_MAX;
}

void tdr_timer_cancel(struct tdr_timer *t)
{
	if (tdr_timer_armed(t))
		heap_remove(t->loop, t);
}

void tdr_timer_arm(struct tdr_timer *t, uint64_t delay_ns)
{
	struct tdr_loop *loop = t->loop;

	tdr_timer_cancel(t);
	if (loop->nheap == loop->heap_cap) {
		size_t cap = loop->heap_cap ? loop->heap_cap * 2 : 16;
		struct tdr_timer **h = realloc(loop->heap, cap * sizeof(*h));

		/*
		 * A timer that silently never fires would hang whoever armed
		 * it; with no memory for a few pointers there is nothing
		 * better left to do than stop.
		 */
		if (!h)
			abort();
		loop->heap = h;
		loop->heap_cap = cap;
	}
	t->deadline_ns = tdr_now_ns() + delay_ns;
	t->heap_idx = loop->nheap;
	loop->heap[loop->nheap++] = t;
	heap_up(loop, t->heap_idx);
}

static int run_timers(struct tdr_loop *loop)
{
	uint64_t now = tdr_now_ns();
	int n = 0;

	while (loop->nheap && loop->heap[0]->deadline_ns <= now) {
		struct tdr_timer *t = loop->heap[0];

		heap_remove(loop, t);
		t->cb(t, t->arg);
		n++;
	}
	return n;
}

/* ------------------------------------------------- deferred and prepare */

void tdr_defer_init(struct tdr_defer *d, tdr_defer_cb cb, void *arg)
{
	d->next = NULL;
	d->cb = cb;
	d->arg = arg;
	d->queued = false;
}

void tdr_loop_defer(struct tdr_loop *loop, struct tdr_defer *d)
{
	if (d->queued)
		return;
	d->queued = true;
	d->next = NULL;
	if (loop->defer_tail)
		loop->defer_tail->next = d;
	else
		loop->defer_head = d;
	loop->defer_tail = d;
}

void tdr_loop_cancel_defer(struct tdr_loop *loop, struct tdr_defer *d)
{
	struct tdr_defer **pp, *prev = NULL;

	if (!d->queued)
		return;
	for (pp = &loop->defer_head; *pp; prev = *pp, pp = &(*pp)->next) {
		if (*pp == d) {
			*pp = d->next;
			if (loop->defer_tail == d)
				loop->defer_tail = prev;
			break;
		}
	}
	d->queued = false;
	d->next = NULL;
}

static int run_deferred(struct tdr_loop *loop)
{
	int n = 0;

	/*
	 * Deferred calls may queue more deferred calls; run them too, but
	 * bound the rounds so a callback that re-queues itself cannot starve
	 * fd events.
	 */
	for (int round = 0; round < 16 && loop->defer_head; round++) {
		unsigned count = 0;

		for (struct tdr_defer *d = loop->defer_head; d; d = d->next)
			count++;
		/*
		 * Pop one at a time instead of detaching the batch: a callback
		 * may cancel (and free) a later entry, and that must take it
		 * off the list we are walking.
		 */
		while (count-- && loop->defer_head) {
			struct tdr_defer *d = loop->defer_head;

			loop->defer_head = d->next;
			if (!loop->defer_head)
				loop->defer_tail = NULL;
			d->queued = false;
			d->next = NULL;
			d->cb(d->arg);
			n++;
		}
	}
	return n;
}

void tdr_loop_add_prepare(struct tdr_loop *loop, struct tdr_prepare *p, tdr_defer_cb cb, void *arg)
{
	p->cb = cb;
	p->arg = arg;
	p->next = loop->prepares;
	loop->prepares = p;
}

void tdr_loop_remove_prepare(struct tdr_loop *loop, struct tdr_prepare *p)
{
	for (struct tdr_prepare **pp = &loop->prepares; *pp; pp = &(*pp)->next) {
		if (*pp == p) {
			*pp = p->next;
			return;
		}
	}
}

/* -------------------------------------------------------------- poll */

void tdr_loop_set_poll_max(struct tdr_loop *loop, uint64_t max_ns)
{
	loop->poll.max_ns = max_ns;
	if (loop->poll.window_ns > max_ns)
		loop->poll.window_ns = max_ns;
}

void tdr_loop_get_poll_stats(const struct tdr_loop *loop, struct tdr_loop_poll_stats *st)
{
	*st = loop->poll;
}

int tdr_loop_parse_poll_us(const char *s, uint64_t *max_ns)
{
	unsigned long us;
	char *end;

	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	us = strtoul(s, &end, 10);
	if (*end || errno || us > TDR_LOOP_POLL_MAX_US)
		return -EINVAL;
	*max_ns = (uint64_t)us * 1000;
	return 0;
}

/*
 * Looks for events without sleeping until one comes, the window closes or
 * the first timer is due.  Returns epoll_wait's answer (0: none came).
 */
static int poll_events(struct tdr_loop *loop, uint64_t start)
{
	uint64_t end = start + loop->poll.window_ns;
	int nfds;

	if (loop->nheap && loop->heap[0]->deadline_ns < end)
		end = loop->heap[0]->deadline_ns;
	loop->poll.polls++;
	do {
		nfds = epoll_wait(loop->epfd, loop->events, LOOP_MAX_EVENTS, 0);
	} while (nfds == 0 && tdr_now_ns() < end);
	if (nfds > 0)
		loop->poll.hits++;
	return nfds;
}

/*
 * After a sleep of slept_ns (from the start of the poll).  The sleep
 * includes the wake-up itself, which on a virtual CPU can take longer than
 * the wait for the event did, so a sleep up to POLL_IDLE_FACTOR times the
 * maximum still says "busy": a window that long might have caught the
 * event, so it grows toward the maximum.  A longer sleep means the loop
 * is going idle, where polling only burns CPU time: the window halves,
 * and closes once below its starting size.
 */
#define POLL_IDLE_FACTOR 4

static void poll_adapt(struct tdr_loop *loop, uint64_t slept_ns)
{
	struct tdr_loop_poll_stats *p = &loop->poll;

	if (slept_ns > POLL_IDLE_FACTOR * p->max_ns) {
		p->window_ns /= 2;
		if (p->window_ns < TDR_LOOP_POLL_START_NS)
			p->window_ns = 0;
	} else if (slept_ns > p->window_ns) {
		p->window_ns = p->window_ns ? p->window_ns * 2 : TDR_LOOP_POLL_START_NS;
		if (p->window_ns > p->max_ns)
			p->window_ns = p->max_ns;
	}
}

/* One wait of at most timeout_ms (-1: no limit), polling first if enabled. */
static int wait_events(struct tdr_loop *loop, int timeout_ms)
{
	uint64_t start = 0;
	int nfds;

	if (!loop->poll.max_ns || timeout_ms == 0)
		return epoll_wait(loop->epfd, loop->events, LOOP_MAX_EVENTS, timeout_ms);
	start = tdr_now_ns();
	if (loop->poll.window_ns) {
		nfds = poll_events(loop, start);
		if (nfds != 0)
			return nfds;
		if (timeout_ms > 0) {
			/* The window is at most 10 ms: take what it used off the wait. */
			uint64_t used_ms = (tdr_now_ns() - start) / 1000000;

			timeout_ms = used_ms >= (uint64_t)timeout_ms ? 0 : timeout_ms - (int)used_ms;
		}
	}
	nfds = epoll_wait(loop->epfd, loop->events, LOOP_MAX_EVENTS, timeout_ms);
	if (nfds >= 0)
		poll_adapt(loop, tdr_now_ns() - start);
	return nfds;
}

/* --------------------------------------------------------------- run */

int tdr_loop_run_once(struct tdr_loop *loop, int timeout_ms)
{
	int n = run_deferred(loop);
	int nfds;

	for (struct tdr_prepare *p = loop->prepares; p; p = p->next)
		p->cb(p->arg);

	/* Work queued by the prepare hooks or deferred calls: don't sleep. */
	if (loop->defer_head || n)
		timeout_ms = 0;
	if (loop->nheap) {
		uint64_t now = tdr_now_ns(), dl = loop->heap[0]->deadline_ns;
		int tms = dl <= now ? 0 : (int)((dl - now + 999999) / 1000000);

		if (timeout_ms < 0 || tms < timeout_ms)
			timeout_ms = tms;
	}

	nfds = wait_events(loop, timeout_ms);
	if (nfds < 0) {
		if (errno != EINTR)
			return -errno;
		nfds = 0;
	}
	loop->nevents = nfds;
	for (loop->cur = 0; loop->cur < loop->nevents; ) {
		struct epoll_event *ev = &loop->events[loop->cur++];
		struct tdr_fd_watch *w = ev->data.ptr;

		if (!w)
			continue;
		w->cb(w, ev->events, w->arg);
		n++;
	}
	loop->nevents = loop->cur = 0;
	n += run_timers(loop);
	return n;
}

int tdr_loop_run(struct tdr_loop *loop)
{
	loop->stop = false;
	while (!loop->stop) {
		int r = tdr_loop_run_once(loop, -1);

		if (r < 0)
			return r;
	}
	return 0;
}

void tdr_loop_stop(struct tdr_loop *loop)
{
	loop->stop = true;
}

bool tdr_loop_stopped(const struct tdr_loop *loop)
{
	return loop->stop;
}
