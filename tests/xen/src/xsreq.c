/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * xsreq: the toolstack's side of the xenstore control protocol, for the
 * real-Xen tests and the control benchmark.  Uses libxenstore over one
 * connection, as a toolstack would (process starts cost ~50 ms in an
 * emulated dom0, so loops stay inside one process).
 *
 *   xsreq call DIR ID LINE [TIMEOUT_MS]
 *       writes DIR/request/ID = LINE, waits for DIR/response/ID, prints it;
 *       exit 0 when a response came, 2 on timeout
 *   xsreq wait KEY VALUE [TIMEOUT_MS]
 *       waits until KEY reads VALUE; exit 0, or 2 (printing the last value)
 *   xsreq echo DIR N
 *       a minimal responder for N requests under DIR (the floor of any
 *       daemon's round trip, for comparison)
 *   xsreq bench DIR FIRST_ID N [LINE]
 *       N round trips of LINE (default "checkpoint": request written ->
 *       response visible) interleaved with N bare write + watch-event round
 *       trips on a scratch key; prints p50/p99/max of both and the overhead
 */
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xenstore.h>

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* Waits for an event on path (or anything, if path is NULL); false on timeout. */
static bool wait_event(struct xs_handle *h, const char *path, double deadline)
{
	struct pollfd p = { .fd = xs_fileno(h), .events = POLLIN };

	for (;;) {
		unsigned int n;
		char **ev;
		double left = deadline - now_ms();

		/* Events already read by libxenstore's thread first. */
		while ((ev = xs_check_watch(h)) != NULL) {
			bool match = !path || strcmp(ev[XS_WATCH_PATH], path) == 0;

			free(ev);
			if (match)
				return true;
		}
		if (left <= 0)
			return false;
		if (poll(&p, 1, (int)(left + 1)) < 0 && errno != EINTR)
			return false;
		(void)n;
	}
}

static char *read_key(struct xs_handle *h, const char *path)
{
	unsigned int len;

	return xs_read(h, XBT_NULL, path, &len);
}

/* Writes the request and waits for its response; NULL on timeout. */
static char *call(struct xs_handle *h, const char *dir, const char *id, const char *line,
		  double timeout_ms, double *rtt_ms)
{
	char req[512], resp[512];
	double t0, deadline;
	char *v;

	snprintf(req, sizeof(req), "%s/request/%s", dir, id);
	snprintf(resp, sizeof(resp), "%s/response/%s", dir, id);
	t0 = now_ms();
	deadline = t0 + timeout_ms;
	if (!xs_write(h, XBT_NULL, req, line, strlen(line))) {
		perror("xs_write");
		return NULL;
	}
	for (;;) {
		double t;

		if (!wait_event(h, resp, deadline)) {
			/* Maybe it came before the watch saw it. */
			return read_key(h, resp);
		}
		/* Visible from the moment its watch event arrives; reading the
		 * value is the toolstack's next step, not part of the trip. */
		t = now_ms() - t0;
		v = read_key(h, resp);
		if (v) {
			if (rtt_ms)
				*rtt_ms = t;
			return v;
		}
	}
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double pct(const double *v, int n, double p)
{
	int i = (int)(p * (n - 1) + 0.5);

	return v[i < n ? i : n - 1];
}

static int bench(struct xs_handle *h, const char *dir, unsigned long long first, int n,
		 const char *line)
{
	char resp_dir[512], id[32], v[32];
	double *ours = calloc((size_t)n, sizeof(double)), *bare = calloc((size_t)n, sizeof(double));
	const char *bare_key = "/tdr-bench/bare";
	int i;

	if (!ours || !bare)
		return 1;
	snprintf(resp_dir, sizeof(resp_dir), "%s/response", dir);
	if (!xs_watch(h, resp_dir, "resp") || !xs_watch(h, bare_key, "bare")) {
		perror("xs_watch");
		return 1;
	}
	/* The initial events of the new watches. */
	wait_event(h, NULL, now_ms() + 200);
	wait_event(h, NULL, now_ms() + 200);
	for (i = 0; i < n; i++) {
		double t0, t;
		char *r;

		snprintf(v, sizeof(v), "%d", i);
		t0 = now_ms();
		if (!xs_write(h, XBT_NULL, bare_key, v, strlen(v)) ||
		    !wait_event(h, bare_key, t0 + 5000)) {
			fprintf(stderr, "bare round trip %d failed\n", i);
			return 1;
		}
		bare[i] = now_ms() - t0;

		snprintf(id, sizeof(id), "%llu", first + (unsigned long long)i);
		r = call(h, dir, id, line, 5000, &t);
		if (!r || strncmp(r, "ok", 2) != 0) {
			fprintf(stderr, "request %s '%s' failed: %s\n", id, line, r ? r : "timeout");
			return 1;
		}
		free(r);
		ours[i] = t;
	}
	qsort(ours, (size_t)n, sizeof(double), cmp_d);
	qsort(bare, (size_t)n, sizeof(double), cmp_d);
	printf("BENCH control %s round trips: %d; ours p50 %.3f ms p99 %.3f ms max %.3f ms; bare write+watch p50 %.3f ms p99 %.3f ms max %.3f ms; overhead p50 %.3f ms p99 %.3f ms\n",
	       line, n, pct(ours, n, 0.5), pct(ours, n, 0.99), ours[n - 1], pct(bare, n, 0.5),
	       pct(bare, n, 0.99), bare[n - 1], pct(ours, n, 0.5) - pct(bare, n, 0.5),
	       pct(ours, n, 0.99) - pct(bare, n, 0.99));
	free(ours);
	free(bare);
	return 0;
}

/*
 * The least a responder can do (the floor of any daemon's round trip): on
 * each event under DIR/request, read request/ID, write response/ID = "ok",
 * remove the request.  libxenstore, one connection, nothing else.
 */
static int echo(struct xs_handle *h, const char *dir, int n)
{
	char req_dir[512], path[1100], rpath[1100];
	int done = 0;

	snprintf(req_dir, sizeof(req_dir), "%s/request", dir);
	xs_mkdir(h, XBT_NULL, req_dir);
	if (!xs_watch(h, req_dir, "echo")) {
		perror("xs_watch");
		return 1;
	}
	while (done < n) {
		unsigned int num, len;
		char **ev = xs_read_watch(h, &num), *v;
		const char *id;

		if (!ev)
			return 1;
		if (strncmp(ev[XS_WATCH_PATH], req_dir, strlen(req_dir)) != 0 ||
		    ev[XS_WATCH_PATH][strlen(req_dir)] != '/') {
			free(ev);
			continue;
		}
		id = ev[XS_WATCH_PATH] + strlen(req_dir) + 1;
		snprintf(path, sizeof(path), "%s/%s", req_dir, id);
		v = xs_read(h, XBT_NULL, path, &len);
		if (v) {
			snprintf(rpath, sizeof(rpath), "%s/response/%s", dir, id);
			xs_write(h, XBT_NULL, rpath, "ok", 2);
			xs_rm(h, XBT_NULL, path);
			free(v);
			done++;
		}
		free(ev);
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct xs_handle *h;
	int ret = 1;

	if (argc < 2) {
		fprintf(stderr, "usage: xsreq call DIR ID LINE [TIMEOUT_MS] | wait KEY VALUE [TIMEOUT_MS] | bench DIR FIRST_ID N [LINE]\n");
		return 1;
	}
	h = xs_open(0);
	if (!h) {
		perror("xs_open");
		return 1;
	}
	if (strcmp(argv[1], "call") == 0 && argc >= 5) {
		char resp_dir[512], *r;
		double timeout = argc > 5 ? atof(argv[5]) : 10000;

		snprintf(resp_dir, sizeof(resp_dir), "%s/response", argv[2]);
		if (!xs_watch(h, resp_dir, "resp")) {
			perror("xs_watch");
			goto out;
		}
		r = call(h, argv[2], argv[3], argv[4], timeout, NULL);
		if (r) {
			printf("%s\n", r);
			free(r);
			ret = 0;
		} else {
			printf("(no response after %.0f ms)\n", timeout);
			ret = 2;
		}
	} else if (strcmp(argv[1], "wait") == 0 && argc >= 4) {
		double deadline = now_ms() + (argc > 4 ? atof(argv[4]) : 10000);
		char *v = NULL;

		if (!xs_watch(h, argv[2], "w")) {
			perror("xs_watch");
			goto out;
		}
		ret = 2;
		for (;;) {
			free(v);
			v = read_key(h, argv[2]);
			if (v && strcmp(v, argv[3]) == 0) {
				ret = 0;
				break;
			}
			if (!wait_event(h, argv[2], deadline))
				break;
		}
		if (ret)
			printf("%s is '%s', not '%s'\n", argv[2], v ? v : "(absent)", argv[3]);
		free(v);
	} else if (strcmp(argv[1], "echo") == 0 && argc >= 4) {
		ret = echo(h, argv[2], atoi(argv[3]));
	} else if (strcmp(argv[1], "bench") == 0 && argc >= 5) {
		ret = bench(h, argv[2], strtoull(argv[3], NULL, 10), atoi(argv[4]),
			    argc > 5 ? argv[5] : "checkpoint");
	} else {
		fprintf(stderr, "xsreq: bad arguments\n");
	}
out:
	xs_close(h);
	return ret;
}
