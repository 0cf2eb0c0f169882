/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * bench-buffers: O_DIRECT throughput of the project's own I/O layer (io.c,
 * libaio with an eventfd, one loop) from two kinds of buffers:
 *   malloc  tdr_io_alloc(): posix_memalign, 4 KiB pages;
 *   pool    tdr_bufpool_get(): from 256 KiB up, pieces of 2 MiB-aligned
 *           regions backed by transparent huge pages (what the daemon
 *           uses).  Below 256 KiB the pool takes malloc's buffers too,
 *           so smaller sizes compare malloc with itself (io.c lists what
 *           they measured with BUFPOOL_THP_SHIFT lowered, and why they
 *           were left out).
 * Sequential transfers of SIZE bytes at queue depth QD over FILE (wrapping
 * at its end), for SECONDS per round; the kinds alternate, and the order
 * alternates between rounds.  Prints each round, then the medians and the
 * pool / malloc ratio.
 *
 *   bench-buffers -f FILE [-w] [-s SIZE] [-q QD] [-t SECONDS] [-r ROUNDS]
 *                 defaults: reads, 1 MiB, QD 32, 3 s, 3 rounds
 *
 * -w overwrites FILE.  Not run by make check.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/loop.h"

#define BB_MAXQD    256
#define BB_MAXROUND 64

enum bb_kind { BB_MALLOC, BB_POOL, BB_NKIND };

static const char *const bb_name[BB_NKIND] = { "malloc (4 KiB pages)", "pool (huge pages)" };

struct bb_run {
	struct tdr_io_ctx *io;
	int fd;
	bool write;
	size_t size;
	uint64_t file_size, next_off, done, errors;
	uint64_t deadline;
	unsigned inflight;
};

struct bb_slot {
	struct tdr_iocb io;
	struct bb_run *run;
	char *buf;
};

static void bb_submit(struct bb_slot *s);

static void bb_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct bb_slot *s = arg;
	struct bb_run *r = s->run;

	(void)io;
	r->inflight--;
	if (res != (ssize_t)r->size)
		r->errors++;
	else
		r->done++;
	if (tdr_now_ns() < r->deadline && !r->errors)
		bb_submit(s);
}

static void bb_submit(struct bb_slot *s)
{
	struct bb_run *r = s->run;
	uint64_t off = r->next_off;

	r->next_off = off + r->size + r->size > r->file_size ? 0 : off + r->size;
	r->inflight++;
	if (r->write)
		tdr_io_pwrite(r->io, &s->io, r->fd, s->buf, r->size, off, bb_done, s);
	else
		tdr_io_pread(r->io, &s->io, r->fd, s->buf, r->size, off, bb_done, s);
}

static int bb_cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double bb_median(double *v, unsigned n)
{
	qsort(v, n, sizeof(*v), bb_cmp);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* One round of one kind: MB/s, or a negative value on failure. */
static double bb_round(struct tdr_loop *loop, struct bb_run *r, enum bb_kind kind, unsigned qd,
		       double secs)
{
	struct tdr_bufpool pool;
	struct bb_slot slots[BB_MAXQD];
	uint64_t t0;
	double mb_s = -1;
	unsigned i;

	/* Room for the idle pieces of the 2 MiB regions smaller buffers come from. */
	tdr_bufpool_init(&pool, (size_t)qd * r->size + (2u << 20));
	memset(slots, 0, sizeof(slots));
	for (i = 0; i < qd; i++) {
		slots[i].run = r;
		slots[i].buf = kind == BB_POOL ? tdr_bufpool_get(&pool, r->size) : tdr_io_alloc(r->size);
		if (!slots[i].buf) {
			fprintf(stderr, "bench-buffers: out of memory for %u buffers of %zu bytes\n", qd,
				r->size);
			goto out;
		}
		memset(slots[i].buf, 0x5a ^ (int)i, r->size);	/* fault every page in first */
	}
	r->done = r->errors = 0;
	r->next_off = 0;
	t0 = tdr_now_ns();
	r->deadline = t0 + (uint64_t)(secs * 1e9);
	for (i = 0; i < qd; i++)
		bb_submit(&slots[i]);
	while (r->inflight)
		if (tdr_loop_run_once(loop, -1) < 0)
			break;
	if (r->errors)
		fprintf(stderr, "bench-buffers: %llu transfers failed or came back short\n",
			(unsigned long long)r->errors);
	else
		mb_s = (double)r->done * (double)r->size / ((double)(tdr_now_ns() - t0) / 1e9) / 1e6;
out:
	for (i = 0; i < qd; i++) {
		if (kind == BB_POOL)
			tdr_bufpool_put(&pool, slots[i].buf, r->size);
		else
			free(slots[i].buf);
	}
	tdr_bufpool_fini(&pool);
	return mb_s;
}

static void bb_usage(void)
{
	fprintf(stderr, "usage: bench-buffers -f FILE [-w] [-s SIZE] [-q QD] [-t SECONDS] [-r ROUNDS]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct bb_run r = { .size = 1u << 20 };
	double res[BB_NKIND][BB_MAXROUND], secs = 3;
	const char *path = NULL;
	unsigned qd = 32, rounds = 3;
	struct tdr_loop *loop;
	struct stat st;
	bool direct;
	int c;

	while ((c = getopt(argc, argv, "f:ws:q:t:r:")) != -1) {
		switch (c) {
		case 'f': path = optarg; break;
		case 'w': r.write = true; break;
		case 's': r.size = strtoul(optarg, NULL, 0); break;
		case 'q': qd = (unsigned)strtoul(optarg, NULL, 0); break;
		case 't': secs = strtod(optarg, NULL); break;
		case 'r': rounds = (unsigned)strtoul(optarg, NULL, 0); break;
		default: bb_usage();
		}
	}
	if (!path || !qd || qd > BB_MAXQD || !rounds || rounds > BB_MAXROUND || secs <= 0 ||
	    !r.size || r.size % TDR_IO_ALIGN) {
		fprintf(stderr, "bench-buffers: need -f FILE; QD 1-%d, 1-%d rounds, SIZE a multiple of %d\n",
			BB_MAXQD, BB_MAXROUND, TDR_IO_ALIGN);
		bb_usage();
	}
	tdr_log_init("bench-buffers", false, TDR_LOG_WARN);
	r.fd = tdr_io_open(path, r.write ? O_RDWR : O_RDONLY, 0, &direct);
	if (r.fd < 0 || fstat(r.fd, &st) < 0) {
		fprintf(stderr, "bench-buffers: %s: %s\n", path, strerror(r.fd < 0 ? -r.fd : errno));
		return 1;
	}
	r.file_size = (uint64_t)st.st_size;
	if (!direct || r.file_size < 2 * r.size) {
		fprintf(stderr, "bench-buffers: %s: needs O_DIRECT and at least two transfers of data\n", path);
		return 1;
	}
	loop = tdr_loop_new();
	r.io = loop ? tdr_io_ctx_new(loop, qd) : NULL;
	if (!r.io) {
		fprintf(stderr, "bench-buffers: %s\n", tdr_last_error());
		return 1;
	}
	printf("bench-buffers: %s %zu-byte O_DIRECT %s at QD %u, %.1f s per round\n", path, r.size,
	       r.write ? "writes" : "reads", qd, secs);
	for (unsigned n = 0; n < rounds; n++) {
		for (unsigned k = 0; k < BB_NKIND; k++) {
			enum bb_kind kind = (enum bb_kind)(n % 2 ? BB_NKIND - 1 - k : k);

			res[kind][n] = bb_round(loop, &r, kind, qd, secs);
			if (res[kind][n] < 0)
				return 1;
			printf("  round %u  %-22s %9.1f MB/s\n", n + 1, bb_name[kind], res[kind][n]);
		}
	}
	printf("medians: malloc %.1f MB/s, pool %.1f MB/s, pool / malloc %.2fx\n",
	       bb_median(res[BB_MALLOC], rounds), bb_median(res[BB_POOL], rounds),
	       bb_median(res[BB_POOL], rounds) / bb_median(res[BB_MALLOC], rounds));
	tdr_io_ctx_free(r.io);
	tdr_loop_free(loop);
	close(r.fd);
	return 0;
}
