/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Benchmark of the replica driver in secondary mode, in-process (no NBD in
 * the way, so the figures are the driver's own):
 *
 *   1. copy-before-write cost: 4 KiB random first-touch primary writes into
 *      the export at queue depth 32, replication running vs not (ratio);
 *      then (information) as many more after a checkpoint, when hidden's
 *      blocks reuse the space its make-empty gave back, and both rows
 *      timed to the end of a flush of the export (made durable);
 *   2. checkpoint latency with 0, 64 MiB and 1 GiB written since the last
 *      one (half by the SVM into active, half by the primary, copied into
 *      hidden), on 64 GiB and 1 TiB virtual disks: p50, p99, max;
 *   3. failover commit rate (durable: it ends with a flush) against the
 *      disk's sequential write bandwidth (1 MiB O_DIRECT writes at QD 8 to
 *      a raw file in the same directory), as written and as made durable
 *      (timed to the end of a flush: on a disk with a volatile cache the
 *      writes alone measure the cache), and against copies between two
 *      raw files there, sequential and scattered (the commit reads every
 *      byte it writes, from and to wherever the guest put it);
 *   4. SVM I/O during the failover: 4 KiB random reads and writes at QD 8
 *      on a region the SVM wrote before, running from 0.2 s before the
 *      failover begins to its end: the longest gap between two
 *      completions (and apart, the longest after the failover's first
 *      0.2 s) and the rate, against the same workload without one;
 *      measured twice: right after the setup's writes (the host's cache
 *      holds them, and the failover's first flush writes them back), and
 *      with that cache written back first (sync(2) after the setup and
 *      before the failover), which leaves what the failover itself does;
 *   1b. (only with -o cbw-allocated) the same writes on a secondary disk
 *      that holds data where they land: not started, running, and running
 *      after a checkpoint (hidden's blocks in reused space);
 *   5. (only with -o make-empty; tests/bench/vhd runs it) the VHD driver's
 *      online make-empty of a 1 TiB *dynamic* VHD with 64 MiB allocated
 *      (32 blocks at 32 GiB strides), the operation a checkpoint runs on
 *      active and hidden, here on the kind of file the VHD benchmark names.
 *
 * Usage: bench-secondary [-d DIR] [-q] [-o cbw,cbw-allocated,checkpoint,failover,commit,make-empty]
 *   -q: one repetition; -o: only these parts (default: all but make-empty);
 *   commit: 3. alone (failover includes it)
 * Machines are noisy: every figure is a median of repetitions or says so.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/replica.h"
#include "tdr/vhd.h"

#define KIB 1024ull
#define MIB (1024ull * KIB)
#define GIB (1024ull * MIB)

/*
 * Random first-touch writes over 64 GiB allocate a 2 MiB VHD block each in
 * the secondary disk (and, running, in hidden): a few thousand are enough
 * for a steady rate, and keep the files' clean-up bearable on filesystems
 * mounted with online discard.
 */
#define CBW_WRITES 8000

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;

/*
 * The bench's own buffers come from the same pool code as the daemon's
 * (huge pages from 256 KiB up), so that the peers (the disk's write rate,
 * the plain copy) move data from buffers as good as the commit's.  No
 * buffer goes back to it: each is released with tdr_bufpool_release(),
 * and the pool keeps only the unused pieces of the huge-page regions.
 */
static struct tdr_bufpool bench_bufs;

static void die(const char *what);

static void *bench_buf(size_t len)
{
	void *b = tdr_bufpool_get(&bench_bufs, len);

	if (!b)
		die("out of memory");
	return b;
}
static const char *dir = "/var/tmp";
/* -c: the replica's cbw= (copy-before-write chunk), NULL: its default. */
static const char *cbw_opt;
static char p_sec[512], p_hid[512], p_act[512];
static struct td_disk *disk, *exp_disk;
static struct td_image *rep;
static unsigned seed = 1;

static double now_s(void)
{
	return (double)tdr_now_ns() / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double p)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	int i = (int)(p * (n - 1) + 0.5);

	return v[i];
}

static void die(const char *what)
{
	fprintf(stderr, "bench-secondary: %s: %s\n", what, tdr_last_error());
	exit(1);
}

static void make_chain(uint64_t size)
{
	struct vhd_error e;
	char spec[700];

	snprintf(p_sec, sizeof(p_sec), "%s/bench-sec.vhd", dir);
	snprintf(p_hid, sizeof(p_hid), "%s/bench-hidden.vhd", dir);
	snprintf(p_act, sizeof(p_act), "%s/bench-active.vhd", dir);
	unlink(p_sec);
	unlink(p_hid);
	unlink(p_act);
	if (vhd_file_create(p_sec, size, VHD_TYPE_DYNAMIC, 0, &e) ||
	    vhd_file_snapshot(p_hid, p_sec, &e) || vhd_file_snapshot(p_act, p_hid, &e)) {
		fprintf(stderr, "bench-secondary: %s\n", e.msg);
		exit(1);
	}
	if (cbw_opt)
		snprintf(spec, sizeof(spec), "replica:mode=secondary,cbw=%s|vhd:%s", cbw_opt, p_act);
	else
		snprintf(spec, sizeof(spec), "replica:mode=secondary|vhd:%s", p_act);
	if (td_disk_open(&disk, spec, 0, loop, io) < 0)
		die("open");
	rep = disk->top;
	exp_disk = replica_export_disk(rep);
}

/*
 * Files are renamed aside and deleted only at the very end: on a filesystem
 * mounted with online discard, unlinking a large fragmented sparse file
 * blocks for a long time, and must not run between measurements.
 */
static int trash_n;

static void trash(const char *path)
{
	char to[600];

	snprintf(to, sizeof(to), "%s/bench-trash-%d", dir, trash_n++);
	if (rename(path, to) < 0)
		unlink(path);
}

static void empty_trash(void)
{
	char path[600];

	for (int i = 0; i < trash_n; i++) {
		snprintf(path, sizeof(path), "%s/bench-trash-%d", dir, i);
		unlink(path);
	}
}

static void close_chain(void)
{
	td_disk_close(disk);
	disk = NULL;
	trash(p_sec);
	trash(p_hid);
	trash(p_act);
}

struct opdone {
	bool done;
	int err;
};

static void op_cb(void *arg, int err, const char *msg)
{
	struct opdone *d = arg;

	d->done = true;
	d->err = err;
	if (err)
		fprintf(stderr, "bench-secondary: operation failed: %s\n", msg);
}

/* Runs a request line; returns its latency in seconds (until done). */
static double run_op(const char *line)
{
	struct replica_cmd cmd;
	struct opdone d = { 0 };
	char msg[256];
	double t0;

	if (replica_parse(line, &cmd, msg, sizeof(msg)) < 0) {
		fprintf(stderr, "bench-secondary: %s\n", msg);
		exit(1);
	}
	t0 = now_s();
	replica_execute(rep, &cmd, op_cb, &d);
	while (!d.done)
		tdr_loop_run_once(loop, -1);
	if (d.err)
		exit(1);
	return now_s() - t0;
}

static enum replica_state state(void)
{
	struct replica_status st;

	replica_get_status(rep, &st);
	return st.state;
}

/* ------------------------------------------------ a QD-N request pump */

struct pump;

struct slot {
	struct td_request req;
	char *buf;
	struct pump *p;
	bool busy;
};

struct pump {
	struct td_disk *d;
	struct td_disk *d2;	/* writes go here when set (SVM reads + SVM writes) */
	struct slot *slots;
	int qd;
	uint32_t secs;
	uint64_t range_secs;
	uint64_t issued, done, limit;
	bool sequential, mixed, stop;
	uint64_t next_sec;
	double last_done, max_gap;
	double late_from, max_gap_late;	/* gaps that begin at or after late_from (0: none) */
	int errors;
};

static void pump_issue(struct pump *p, struct slot *s);

static void pump_done(struct td_request *req, int err, void *arg)
{
	struct slot *s = arg;
	struct pump *p = s->p;
	double t = now_s();

	if (err)
		p->errors++;
	if (p->last_done > 0 && t - p->last_done > p->max_gap)
		p->max_gap = t - p->last_done;
	if (p->late_from > 0 && p->last_done >= p->late_from && t - p->last_done > p->max_gap_late)
		p->max_gap_late = t - p->last_done;
	p->last_done = t;
	p->done++;
	s->busy = false;
	if (!p->stop && (!p->limit || p->issued < p->limit))
		pump_issue(p, s);
}

static void pump_issue(struct pump *p, struct slot *s)
{
	uint64_t sec;
	enum td_op op = TD_OP_WRITE;

	if (p->sequential) {
		sec = p->next_sec;
		p->next_sec += p->secs;
		if (p->next_sec + p->secs > p->range_secs)
			p->next_sec = 0;
	} else {
		sec = ((uint64_t)rand_r(&seed) << 31 | (uint64_t)rand_r(&seed)) %
		      (p->range_secs / p->secs) * p->secs;
	}
	if (p->mixed && rand_r(&seed) % 2)
		op = TD_OP_READ;
	s->busy = true;
	p->issued++;
	td_request_init(&s->req, op, sec, p->secs, s->buf, pump_done, s);
	td_disk_submit(op == TD_OP_READ || !p->d2 ? p->d : p->d2, &s->req);
}

static void pump_init(struct pump *p, struct td_disk *d, int qd, uint32_t bytes, uint64_t range)
{
	memset(p, 0, sizeof(*p));
	p->d = d;
	p->qd = qd;
	p->secs = bytes / 512;
	p->range_secs = range / 512;
	p->slots = calloc((size_t)qd, sizeof(*p->slots));
	for (int i = 0; i < qd; i++) {
		p->slots[i].buf = bench_buf(bytes);
		memset(p->slots[i].buf, 0x5a ^ i, bytes);
		p->slots[i].p = p;
	}
}

static void pump_start(struct pump *p)
{
	for (int i = 0; i < p->qd; i++)
		pump_issue(p, &p->slots[i]);
}

static void pump_wait(struct pump *p)
{
	for (;;) {
		bool busy = false;

		for (int i = 0; i < p->qd; i++)
			busy |= p->slots[i].busy;
		if (!busy)
			break;
		tdr_loop_run_once(loop, -1);
	}
}

static void pump_free(struct pump *p)
{
	for (int i = 0; i < p->qd; i++)
		tdr_bufpool_release(p->slots[i].buf, p->secs * 512u);
	free(p->slots);
}

/* N requests at QD qd; returns IOPS. */
static double pump_run(struct td_disk *d, int qd, uint32_t bytes, uint64_t range, uint64_t n,
		       bool sequential)
{
	struct pump p;
	double t0, t;

	pump_init(&p, d, qd, bytes, range);
	p.limit = n;
	p.sequential = sequential;
	t0 = now_s();
	pump_start(&p);
	pump_wait(&p);
	t = now_s() - t0;
	if (p.errors)
		fprintf(stderr, "bench-secondary: %d requests failed\n", p.errors);
	pump_free(&p);
	return (double)n / t;
}

/* ---------------------------------------------------------- benches */

static double flush_wait(struct td_disk *d);

/*
 * IOPS of n writes done at iops, timed to the end of a flush of the export
 * that follows them: what the writes cost once the disk holds them.  Not
 * started, the flush writes back every block the plain writes left in a
 * volatile disk cache; running, the secondary disk's allocations synced
 * (ordered mode) and little is left.  Running in scratch mode, the export's
 * flush skips hidden, which no crash needs.
 */
static double durable_iops(double iops, uint64_t n)
{
	return (double)n / ((double)n / iops + flush_wait(exp_disk));
}

/* The copy-before-write rows' medians made durable (pct sorts the arrays). */
static void print_durable_row(double *doff, double *don, int reps)
{
	double mdoff = pct(doff, reps, 0.5), mdon = pct(don, reps, 0.5);

	printf("| the same writes made durable (each row timed to the end of a flush of the export) | not started: %.0f IOPS | running: %.0f IOPS | ratio %.3f (information) |\n",
	       mdoff, mdon, mdon / mdoff);
}

static void bench_cbw(int reps)
{
	double off[8], on[8], again[8], doff[8], don[8], paired[8];

	for (int r = 0; r < reps; r++) {
		make_chain(64 * GIB);
		off[r] = pump_run(exp_disk, 32, 4096, 64 * GIB, CBW_WRITES, false);
		doff[r] = durable_iops(off[r], CBW_WRITES);
		close_chain();
		make_chain(64 * GIB);
		run_op("start");
		on[r] = pump_run(exp_disk, 32, 4096, 64 * GIB, CBW_WRITES, false);
		don[r] = durable_iops(on[r], CBW_WRITES);
		/*
		 * Information: after a checkpoint, hidden's new blocks reuse the
		 * space its make-empty gave back, where the zeroes a thin
		 * secondary's chunks copy must be written (docs/vhd.md).
		 */
		run_op("checkpoint");
		again[r] = pump_run(exp_disk, 32, 4096, 64 * GIB, CBW_WRITES, false);
		close_chain();
		paired[r] = on[r] / off[r];
		printf("bench-secondary: repetition %d: not started %.0f, running %.0f (ratio %.3f), after a checkpoint %.0f IOPS; made durable: not started %.0f, running %.0f IOPS\n",
		       r + 1, off[r], on[r], paired[r], again[r], doff[r], don[r]);
	}
	double moff = pct(off, reps, 0.5), mon = pct(on, reps, 0.5), mag = pct(again, reps, 0.5);

	/* Three decimals: a 0.398 must not print as a met 0.40. */
	printf("| copy-before-write: 4 KiB random first-touch writes, QD 32, 64 GiB disk | not started: %.0f IOPS | running: %.0f IOPS | ratio %.3f, median of the per-repetition ratios %.3f (target >= 0.40) | after a checkpoint: %.0f IOPS, ratio %.3f (information) |\n",
	       moff, mon, mon / moff, pct(paired, reps, 0.5), mag, mag / moff);
	print_durable_row(doff, don, reps);
}

/*
 * The same writes where the secondary disk already holds data (an initial
 * sync filled it: the usual case once replication runs).  Replication not
 * started, each write overwrites allocated sectors in place; running, each
 * first touch of a chunk still reads 64 KiB and writes them into hidden,
 * so this ratio is the copy's cost undiluted by the secondary's own
 * allocations.  Then once more after a checkpoint: hidden's new blocks go
 * into the space the checkpoint's make-empty gave back.  Information: the
 * issue's target row is the fresh disk's above.
 */
#define CBW_FILLED (4 * GIB)

static void bench_cbw_allocated(int reps)
{
	double off[8], on[8], again[8], doff[8], don[8];

	for (int r = 0; r < reps; r++) {
		make_chain(64 * GIB);
		pump_run(exp_disk, 16, MIB, CBW_FILLED, CBW_FILLED / MIB, true);
		sync();
		off[r] = pump_run(exp_disk, 32, 4096, CBW_FILLED, CBW_WRITES, false);
		doff[r] = durable_iops(off[r], CBW_WRITES);
		sync();
		run_op("start");
		on[r] = pump_run(exp_disk, 32, 4096, CBW_FILLED, CBW_WRITES, false);
		don[r] = durable_iops(on[r], CBW_WRITES);
		run_op("checkpoint");
		sync();
		again[r] = pump_run(exp_disk, 32, 4096, CBW_FILLED, CBW_WRITES, false);
		close_chain();
		printf("bench-secondary: repetition %d: not started %.0f, running %.0f, after a checkpoint %.0f IOPS; made durable: not started %.0f, running %.0f IOPS\n",
		       r + 1, off[r], on[r], again[r], doff[r], don[r]);
	}
	double moff = pct(off, reps, 0.5), mon = pct(on, reps, 0.5), mag = pct(again, reps, 0.5);

	printf("| copy-before-write, secondary allocated: 4 KiB random writes, QD 32, 4 GiB written before | not started: %.0f IOPS | running: %.0f IOPS, ratio %.2f | after a checkpoint: %.0f IOPS, ratio %.2f | (information) |\n",
	       moff, mon, mon / moff, mag, mag / moff);
	print_durable_row(doff, don, reps);
}

/* Writes bytes: half SVM (active), half primary (hidden via copy-before-write). */
static void write_since_checkpoint(uint64_t bytes, uint64_t size)
{
	if (!bytes)
		return;
	/* 1 MiB at random 1 MiB-aligned places. */
	uint64_t n = bytes / MIB / 2;

	pump_run(disk, 16, MIB, size, n, false);
	pump_run(exp_disk, 16, MIB, size, n, false);
}

static void bench_checkpoint(int reps)
{
	const uint64_t sizes[] = { 64 * GIB, 1024 * GIB };
	const uint64_t written[] = { 0, 64 * MIB, 1 * GIB };

	for (size_t si = 0; si < 2; si++) {
		make_chain(sizes[si]);
		run_op("start");
		for (size_t wi = 0; wi < 3; wi++) {
			int n = written[wi] >= GIB ? (reps > 3 ? 5 : 2) : reps * 7;
			double lat[64];

			for (int r = 0; r < n; r++) {
				write_since_checkpoint(written[wi], sizes[si]);
				lat[r] = run_op("checkpoint") * 1000.0;
			}
			printf("| checkpoint, %4llu GiB disk, %4llu MiB written | p50 %.2f ms | p99 %.2f ms | max %.2f ms | (%d runs) |\n",
			       (unsigned long long)(sizes[si] / GIB),
			       (unsigned long long)(written[wi] / MIB), pct(lat, n, 0.5),
			       pct(lat, n, 0.99), pct(lat, n, 1.0), n);
		}
		close_chain();
	}
}

/* A new sparse raw file of size bytes in the bench directory, opened with "aio". */
static struct td_disk *open_scratch_raw(char *path, size_t len, const char *name, uint64_t size)
{
	char spec[700];
	struct td_disk *raw;
	int fd;

	snprintf(path, len, "%s/%s", dir, name);
	fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
		perror(path);
		exit(1);
	}
	close(fd);
	snprintf(spec, sizeof(spec), "aio:%s", path);
	if (td_disk_open(&raw, spec, 0, loop, io) < 0)
		die("open raw");
	return raw;
}

static void flush_done(struct td_request *req, int err, void *arg)
{
	bool *done = arg;

	if (err)
		fprintf(stderr, "bench-secondary: flush failed: %s\n", strerror(-err));
	*done = true;
}

/* Flushes d (the disk's write cache too: fdatasync); returns the seconds it took. */
static double flush_wait(struct td_disk *d)
{
	struct td_request req;
	bool done = false;
	double t0 = now_s();

	td_request_init(&req, TD_OP_FLUSH, 0, 0, NULL, flush_done, &done);
	td_disk_submit(d, &req);
	while (!done)
		tdr_loop_run_once(loop, 10);
	return now_s() - t0;
}

/*
 * The disk's sequential write bandwidth: 1 GiB in 1 MiB O_DIRECT writes at
 * QD 8 into a fresh raw file.  *durable gets the same writes with the
 * flush that makes them durable, timed to its end: the commit ends with
 * such a flush (and flushes in the background as it goes), and on a disk
 * with a volatile cache (this VM's virtual disk, cached by its host) the
 * writes alone measure that cache, not the disk.
 */
static double raw_bandwidth(double *durable)
{
	char path[600];
	struct td_disk *raw = open_scratch_raw(path, sizeof(path), "bench-raw.img", 2 * GIB);
	double iops, t;

	sync();		/* the flush then writes back these writes alone */
	iops = pump_run(raw, 8, MIB, 2 * GIB, 1024, true);
	t = 1024 / iops + flush_wait(raw);
	*durable = GIB / t;
	td_disk_close(raw);
	trash(path);
	return iops * MIB;
}

/*
 * The disk's copy bandwidth, the peer for the commit, which reads every byte
 * it writes: 1 GiB copied from one raw file into a fresh one in the same
 * directory, each piece a read then a write, O_DIRECT and libaio through
 * the aio driver, the source synced first (and timed again to the end of
 * a flush of the destination, as the commit is).  Two patterns:
 *   - sequential: 2 MiB pieces, 16 in flight, in order;
 *   - scattered: 1 MiB pieces, 32 in flight (the commit's 32 MiB budget),
 *     each read from and written to a random place of the two files (two
 *     random permutations of the 1,024 places).  This is what the commit
 *     must do with data a guest wrote in 1 MiB pieces at random places:
 *     it visits them in the virtual disk's order, which is no order at
 *     all in the files that hold them (active's and hidden's blocks were
 *     allocated in the order the pieces were written) nor, for blocks the
 *     primary allocated, in the secondary disk.
 */
#define COPY_BYTES (1 * GIB)

struct copy_slot {
	struct td_request req;
	char *buf;
	uint64_t piece;
	bool writing;
	struct copy_run *c;
};

struct copy_run {
	struct td_disk *src, *dst;
	uint32_t chunk;
	const uint32_t *src_at, *dst_at;	/* piece -> place; NULL: in order */
	uint64_t next, done;
	int active, errors;
};

static uint64_t copy_sec(const struct copy_run *c, const uint32_t *at, uint64_t piece)
{
	return (at ? at[piece] : piece) * (uint64_t)(c->chunk / 512);
}

static void copy_step(struct td_request *req, int err, void *arg);

/* The slot's next piece: its read, or the slot retires when none is left. */
static void copy_next(struct copy_slot *sl)
{
	struct copy_run *c = sl->c;

	if (c->next >= COPY_BYTES / c->chunk) {
		c->active--;
		return;
	}
	sl->piece = c->next++;
	sl->writing = false;
	td_request_init(&sl->req, TD_OP_READ, copy_sec(c, c->src_at, sl->piece), c->chunk / 512,
			sl->buf, copy_step, sl);
	td_disk_submit(c->src, &sl->req);
}

static void copy_step(struct td_request *req, int err, void *arg)
{
	struct copy_slot *sl = arg;
	struct copy_run *c = sl->c;

	if (err)
		c->errors++;
	if (!sl->writing && !err) {
		sl->writing = true;
		td_request_init(&sl->req, TD_OP_WRITE, copy_sec(c, c->dst_at, sl->piece),
				c->chunk / 512, sl->buf, copy_step, sl);
		td_disk_submit(c->dst, &sl->req);
		return;
	}
	c->done += c->chunk;
	copy_next(sl);
}

/* A random permutation of 0..n-1 (Fisher-Yates). */
static uint32_t *copy_shuffle(uint32_t n, unsigned *rs)
{
	uint32_t *a = malloc(n * sizeof(*a));

	if (!a)
		die("out of memory");
	for (uint32_t i = 0; i < n; i++)
		a[i] = i;
	for (uint32_t i = n - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(((uint64_t)rand_r(rs) << 31 | (uint64_t)rand_r(rs)) % (i + 1));
		uint32_t t = a[i];

		a[i] = a[j];
		a[j] = t;
	}
	return a;
}

#define COPY_QD_MAX 32

/* *durable: the same copy timed to the end of a flush of the destination. */
static double raw_copy_bandwidth(bool scattered, double *durable)
{
	char spath[600], dpath[600];
	struct td_disk *src = open_scratch_raw(spath, sizeof(spath), "bench-copy-src.img", COPY_BYTES);
	struct td_disk *dst;
	struct copy_slot slots[COPY_QD_MAX];
	struct copy_run c = { 0 };
	int qd = scattered ? 32 : 16;
	unsigned rs = 7;
	double t0, t;

	pump_run(src, 8, MIB, COPY_BYTES, COPY_BYTES / MIB, true);
	sync();		/* the copy starts with the source on the disk, as the commit's does */
	dst = open_scratch_raw(dpath, sizeof(dpath), "bench-copy-dst.img", COPY_BYTES);
	c.src = src;
	c.dst = dst;
	c.chunk = scattered ? MIB : 2 * MIB;
	if (scattered) {
		c.src_at = copy_shuffle(COPY_BYTES / MIB, &rs);
		c.dst_at = copy_shuffle(COPY_BYTES / MIB, &rs);
	}
	t0 = now_s();
	for (int i = 0; i < qd; i++) {
		slots[i].buf = bench_buf(c.chunk);
		slots[i].c = &c;
		c.active++;
		copy_next(&slots[i]);
	}
	while (c.active)
		tdr_loop_run_once(loop, -1);
	t = now_s() - t0;
	if (c.errors)
		die("raw copy");
	*durable = (double)c.done / (t + flush_wait(dst));
	for (int i = 0; i < qd; i++)
		tdr_bufpool_release(slots[i].buf, c.chunk);
	free((void *)c.src_at);
	free((void *)c.dst_at);
	td_disk_close(src);
	td_disk_close(dst);
	trash(spath);
	trash(dpath);
	return (double)c.done / t;
}

/* Failover with nothing else running: the copy engine alone. */
static double failover_alone(void)
{
	struct replica_status st;
	double t0, t;

	make_chain(64 * GIB);
	run_op("start");
	write_since_checkpoint(1 * GIB, 64 * GIB);
	sync();		/* as for the peers: the commit's flushes write back its own writes */
	t0 = now_s();
	run_op("failover");
	while (state() == REPLICA_STATE_FAILOVER)
		tdr_loop_run_once(loop, -1);
	t = now_s() - t0;
	replica_get_status(rep, &st);
	close_chain();
	return (double)st.progress_total / t;
}

/*
 * The SVM's own workload during a failover: 4 KiB random reads and writes at
 * QD 8 on a region it wrote before (allocated in active), so that what is
 * measured is what the failover does to SVM I/O, not the cost of allocating
 * VHD blocks.  The same workload without a failover, for the same time, is
 * the baseline.
 */
#define SVM_REGION (256 * MIB)

static void svm_prefill(void)
{
	pump_run(disk, 8, MIB, SVM_REGION, SVM_REGION / MIB, true);
}

static void svm_pump_for(struct pump *p, double seconds)
{
	double t0 = now_s();

	pump_init(p, disk, 8, 4096, SVM_REGION);
	p->mixed = true;
	pump_start(p);
	while (now_s() - t0 < seconds)
		tdr_loop_run_once(loop, 10);
	p->stop = true;
	pump_wait(p);
}

/*
 * The peer for the SVM's longest gap: the same SVM workload while one plain
 * flush runs on a raw file that just had 1 GiB written to it (what the
 * failover writes), no replica involved.  On a virtual disk whose host
 * caches writes, a flush stops every request on the device until the host
 * has written its cache back; no failover that makes its commit durable
 * can stall the SVM for less.
 */
static double flush_stall(void)
{
	char path[600];
	struct td_disk *raw = open_scratch_raw(path, sizeof(path), "bench-flush.img", GIB);
	struct pump p;
	double t;

	pump_run(raw, 8, MIB, GIB, GIB / MIB, true);
	pump_init(&p, disk, 8, 4096, SVM_REGION);
	p.mixed = true;
	pump_start(&p);
	t = now_s();
	while (now_s() - t < 0.2)
		tdr_loop_run_once(loop, 10);
	flush_wait(raw);
	t = now_s();
	while (now_s() - t < 0.2)
		tdr_loop_run_once(loop, 10);
	p.stop = true;
	pump_wait(&p);
	pump_free(&p);
	td_disk_close(raw);
	trash(path);
	return p.max_gap * 1000.0;
}

/*
 * One failover with the SVM's workload running since SVM_LEAD_S before it
 * (until 2026-11-24 the workload began after the failover's start, and a
 * stop there did not count); clean: sync(2) after the setup and before it.
 */
struct fo_run {
	double rate, gap, gap_late, svm_iops, base_gap, base_iops, hold, flushes;
};

/*
 * The SVM's workload runs for this long before the failover begins, so
 * that a stop at its very start counts (a gap is measured between two
 * completions).  Gaps that begin this long after the start are also
 * reported apart: the first flush of the failover writes back whatever
 * the SVM left in the host's cache, the rest is the commit's doing.
 */
#define SVM_LEAD_S 0.2

static void failover_with_svm(bool clean, struct fo_run *out)
{
	struct replica_status st;
	struct pump p;
	double t0, t;
	uint64_t done0;

	make_chain(64 * GIB);
	run_op("start");
	svm_prefill();
	write_since_checkpoint(1 * GIB, 64 * GIB);
	if (clean)
		sync();
	/* Baseline: the SVM workload alone, 2 s. */
	svm_pump_for(&p, 2.0);
	out->base_gap = p.max_gap * 1000.0;
	out->base_iops = (double)p.done / 2.0;
	pump_free(&p);
	if (clean)
		sync();

	pump_init(&p, disk, 8, 4096, SVM_REGION);
	p.mixed = true;
	pump_start(&p);
	t0 = now_s();
	while (now_s() - t0 < SVM_LEAD_S)
		tdr_loop_run_once(loop, 10);
	done0 = p.done;
	t0 = now_s();
	p.late_from = t0 + SVM_LEAD_S;
	run_op("failover");
	while (state() == REPLICA_STATE_FAILOVER)
		tdr_loop_run_once(loop, -1);
	t = now_s() - t0;
	p.stop = true;
	pump_wait(&p);
	replica_get_status(rep, &st);
	if (state() != REPLICA_STATE_DONE) {
		fprintf(stderr, "bench-secondary: failover ended in state %s\n",
			replica_state_name(state()));
		exit(1);
	}
	out->rate = (double)st.progress_total / t;
	out->gap = p.max_gap * 1000.0;
	out->gap_late = p.max_gap_late * 1000.0;
	out->svm_iops = (double)(p.done - done0) / t;
	out->hold = (double)st.stats.fo_hold_ns / 1e6;
	out->flushes = (double)st.stats.fo_flushes;
	pump_free(&p);
}

static void print_svm_row(const char *what, struct fo_run *runs, int reps)
{
	double gap[8], late[8], iops[8], base_gap[8], base_iops[8], hold[8], fl[8];

	for (int r = 0; r < reps; r++) {
		gap[r] = runs[r].gap;
		late[r] = runs[r].gap_late;
		iops[r] = runs[r].svm_iops;
		base_gap[r] = runs[r].base_gap;
		base_iops[r] = runs[r].base_iops;
		hold[r] = runs[r].hold;
		fl[r] = runs[r].flushes;
	}
	printf("| SVM 4 KiB random read/write QD 8 on its own 256 MiB, %s | during failover: %.0f IOPS, longest gap median %.2f ms, worst %.2f ms (target <= 10 ms); after its first %.1f s: median %.2f ms, worst %.2f ms; writes held median %.2f ms, max %.2f ms; %.0f background flushes | without failover: %.0f IOPS, longest gap median %.2f ms, worst %.2f ms |\n",
	       what, pct(iops, reps, 0.5), pct(gap, reps, 0.5), pct(gap, reps, 1.0),
	       SVM_LEAD_S, pct(late, reps, 0.5), pct(late, reps, 1.0),
	       pct(hold, reps, 0.5), pct(hold, reps, 1.0), pct(fl, reps, 0.5),
	       pct(base_iops, reps, 0.5), pct(base_gap, reps, 0.5), pct(base_gap, reps, 1.0));
}

/* with_svm false (-o commit): the lone commit and its peers only. */
static void bench_failover(int reps, bool with_svm)
{
	struct fo_run dirty[8], clean[8];
	double rate[8], bw[8], dbw[8], stall[8], alone[8], copy[8], scat[8], dcopy[8], dscat[8];

	for (int r = 0; r < reps && with_svm; r++) {
		bw[r] = raw_bandwidth(&dbw[r]);
		failover_with_svm(false, &dirty[r]);
		rate[r] = dirty[r].rate;
		stall[r] = flush_stall();
		close_chain();
		failover_with_svm(true, &clean[r]);
		close_chain();
	}

	for (int r = 0; r < reps; r++) {
		if (!with_svm)
			bw[r] = raw_bandwidth(&dbw[r]);
		alone[r] = failover_alone();
		copy[r] = raw_copy_bandwidth(false, &dcopy[r]);
		scat[r] = raw_copy_bandwidth(true, &dscat[r]);
	}
	printf("bench-secondary: lone commit / durable sequential write, per repetition:");
	for (int r = 0; r < reps; r++)
		printf(" %.2f", alone[r] / dbw[r]);
	printf("\n");
	double ma = pct(alone, reps, 0.5), mdbw = pct(dbw, reps, 0.5), mbw = pct(bw, reps, 0.5);
	double mrate = with_svm ? pct(rate, reps, 0.5) : 0;
	double mcopy = pct(copy, reps, 0.5), mdcopy = pct(dcopy, reps, 0.5);
	double mscat = pct(scat, reps, 0.5), mdscat = pct(dscat, reps, 0.5);

	printf("| failover commit of 1 GiB (64 GiB disk), nothing else running | commit %.0f MiB/s | disk sequential write %.0f MiB/s | ratio %.2f (target >= 0.70) |\n",
	       ma / MIB, mbw / MIB, ma / mbw);
	printf("| the same commit against the same writes made durable (timed to the end of a flush, as the commit is) | commit %.0f MiB/s | durable sequential write %.0f MiB/s | ratio %.2f |\n",
	       ma / MIB, mdbw / MIB, ma / mdbw);
	printf("| the same commit against a plain copy of 1 GiB between raw files (2 MiB, 16 in flight) | commit %.0f MiB/s | copy %.0f MiB/s, %.0f MiB/s durable | ratio %.2f, %.2f durable |\n",
	       ma / MIB, mcopy / MIB, mdcopy / MIB, ma / mcopy, ma / mdcopy);
	printf("| the same commit against a scattered copy of 1 GiB between raw files (1 MiB pieces at random places of both, 32 in flight) | commit %.0f MiB/s | scattered copy %.0f MiB/s, %.0f MiB/s durable | ratio %.2f, %.2f durable |\n",
	       ma / MIB, mscat / MIB, mdscat / MIB, ma / mscat, ma / mdscat);
	if (!with_svm)
		return;
	printf("| failover commit of 1.25 GiB (64 GiB disk) with SVM I/O running | commit %.0f MiB/s | disk sequential write %.0f MiB/s, %.0f MiB/s durable | ratio %.2f, %.2f durable |\n",
	       mrate / MIB, mbw / MIB, mdbw / MIB, mrate / mbw, mrate / mdbw);
	print_svm_row("right after the setup's writes", dirty, reps);
	print_svm_row("host cache written back first", clean, reps);
	printf("| peer: the same SVM workload during one plain flush after 1 GiB written to a raw file | longest gap median %.2f ms, max %.2f ms | |\n",
	       pct(stall, reps, 0.5), pct(stall, reps, 1.0));
}

/* ------------------------------------------------------- make-empty */

struct mz_wait {
	int left;
	int err;
};

static void mz_req_done(struct td_request *req, int err, void *arg)
{
	struct mz_wait *w = arg;

	if (err && !w->err)
		w->err = err;
	w->left--;
}

static void mz_done(void *arg, int err)
{
	struct mz_wait *w = arg;

	w->err = err;
	w->left = 0;
}

#define MZ_BLOCKS 32

/*
 * Writes MZ_BLOCKS whole 2 MiB blocks at 32 GiB strides, all filled with
 * byte c, or reads them and checks that every byte is c.  Returns 0, a
 * request's error, or -EIO for a byte that differs.
 */
static int mz_blocks(struct td_disk *d, enum td_op op, char **bufs, int c)
{
	struct td_request req[MZ_BLOCKS];
	struct mz_wait w = { .left = MZ_BLOCKS };

	for (int i = 0; i < MZ_BLOCKS; i++) {
		memset(bufs[i], op == TD_OP_WRITE ? c : ~c, 2 * MIB);
		td_request_init(&req[i], op, (uint64_t)i * 32 * GIB / 512, 2 * MIB / 512, bufs[i],
				mz_req_done, &w);
		td_disk_submit(d, &req[i]);
	}
	while (w.left)
		tdr_loop_run_once(loop, -1);
	if (w.err || op == TD_OP_WRITE)
		return w.err;
	for (int i = 0; i < MZ_BLOCKS; i++)
		for (uint64_t j = 0; j < 2 * MIB; j++)
			if ((unsigned char)bufs[i][j] != (unsigned char)c)
				return -EIO;
	return 0;
}

static void bench_make_empty(int reps)
{
	char path[600], spec[700];
	struct vhd_error e;
	struct td_disk *d;
	char *bufs[MZ_BLOCKS];
	int n = reps * 7;
	double lat[64];

	snprintf(path, sizeof(path), "%s/bench-mz.vhd", dir);
	unlink(path);
	if (vhd_file_create(path, 1024 * GIB, VHD_TYPE_DYNAMIC, 0, &e)) {
		fprintf(stderr, "bench-secondary: %s\n", e.msg);
		exit(1);
	}
	snprintf(spec, sizeof(spec), "vhd:%s", path);
	if (td_disk_open(&d, spec, 0, loop, io) < 0)
		die("open");
	for (int i = 0; i < MZ_BLOCKS; i++)
		if (!(bufs[i] = tdr_io_alloc(2 * MIB)))
			die("out of memory");
	for (int r = 0; r < n; r++) {
		struct mz_wait w = { .left = 1 };
		double t0;

		if (mz_blocks(d, TD_OP_WRITE, bufs, 0x40 + r) ||
		    mz_blocks(d, TD_OP_READ, bufs, 0x40 + r)) {
			fprintf(stderr, "bench-secondary: make-empty: writing 64 MiB failed or read back wrong\n");
			exit(1);
		}
		t0 = now_s();
		vhd_image_make_empty(d->top, mz_done, &w);
		while (w.left)
			tdr_loop_run_once(loop, -1);
		lat[r] = (now_s() - t0) * 1000.0;
		if (w.err) {
			fprintf(stderr, "bench-secondary: make-empty failed: %s\n", strerror(-w.err));
			exit(1);
		}
		if (mz_blocks(d, TD_OP_READ, bufs, 0)) {
			fprintf(stderr, "bench-secondary: make-empty: the dropped blocks do not read as zeroes\n");
			exit(1);
		}
	}
	/* With 21 runs or fewer, p99 is the maximum. */
	printf("| make-empty (driver, online), 1 TiB dynamic VHD, 64 MiB allocated | p50 %.2f ms | p99 %.2f ms | max %.2f ms | (%d runs) |\n",
	       pct(lat, n, 0.5), pct(lat, n, 0.99), pct(lat, n, 1.0), n);
	for (int i = 0; i < MZ_BLOCKS; i++)
		free(bufs[i]);
	td_disk_close(d);
	trash(path);
}

/* Whether the comma-separated list names part (whole words only). */
static bool has_part(const char *list, const char *part)
{
	size_t n = strlen(part);

	for (const char *p = list; p; p = strchr(p, ',')) {
		if (*p == ',')
			p++;
		if (!strncmp(p, part, n) && (p[n] == ',' || !p[n]))
			return true;
	}
	return false;
}

int main(int argc, char **argv)
{
	int reps = 3, c;
	const char *only = "cbw,checkpoint,failover";

	/* Room for the pieces of the 2 MiB regions that 1 MiB buffers come from. */
	tdr_bufpool_init(&bench_bufs, 64u << 20);

	while ((c = getopt(argc, argv, "d:qo:c:")) != -1) {
		switch (c) {
		case 'c':
			cbw_opt = optarg;
			break;
		case 'd':
			dir = optarg;
			break;
		case 'q':
			reps = 1;
			break;
		case 'o':
			only = optarg;
			break;
		default:
			fprintf(stderr, "usage: bench-secondary [-d DIR] [-q] [-c CBW_BYTES] [-o cbw,cbw-allocated,checkpoint,failover,commit,make-empty]\n");
			return 2;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	tdr_log_init("bench-secondary", false, TDR_LOG_ERR);
	loop = tdr_loop_new();
	io = tdr_io_ctx_new(loop, 512);
	if (!loop || !io)
		die("setup");
	printf("bench-secondary: %s, %d repetition(s) per figure, medians\n", dir, reps);
	if (has_part(only, "cbw"))
		bench_cbw(reps);
	if (has_part(only, "cbw-allocated"))
		bench_cbw_allocated(reps);
	if (has_part(only, "checkpoint"))
		bench_checkpoint(reps);
	if (has_part(only, "failover"))
		bench_failover(reps, true);
	else if (has_part(only, "commit"))
		bench_failover(reps, false);
	if (has_part(only, "make-empty"))
		bench_make_empty(reps);
	printf("bench-secondary: deleting the files\n");
	empty_trash();
	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	return 0;
}
