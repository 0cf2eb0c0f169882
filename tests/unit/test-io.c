/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the libaio backend: data, concurrency, errors, fault
 * injection, and the journal with the power-cut model built on it.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tdr/io.h"
#include "check-run.h"
#include "powercut.h"

static struct tdr_loop *loop;
static struct tdr_io_ctx *ctx;
static char path[] = "/var/tmp/tdr-test-io-XXXXXX";
static int fd = -1;

static void setup(void)
{
	int tmp;

	unsetenv("TDR_FAULT_WRITES");
	loop = tdr_loop_new();
	ck_assert_ptr_nonnull(loop);
	ctx = tdr_io_ctx_new(loop, 32);
	ck_assert_ptr_nonnull(ctx);
	strcpy(path, "/var/tmp/tdr-test-io-XXXXXX");
	tmp = mkstemp(path);
	ck_assert_int_ge(tmp, 0);
	ck_assert_int_eq(ftruncate(tmp, 16 << 20), 0);
	close(tmp);
	fd = tdr_io_open(path, O_RDWR, 0, NULL);
	ck_assert_int_ge(fd, 0);
}

static void teardown(void)
{
	close(fd);
	unlink(path);
	tdr_io_ctx_free(ctx);
	tdr_loop_free(loop);
}

struct op {
	struct tdr_iocb io;
	ssize_t res;
	bool done;
	int seq;
};

static int completions;

static void op_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct op *op = arg;

	ck_assert_ptr_eq(&op->io, io);
	ck_assert(!op->done);	/* exactly once */
	op->res = res;
	op->done = true;
	op->seq = completions++;
}

static void wait_for(struct op *ops, int n)
{
	for (int guard = 0; guard < 100000; guard++) {
		int pending = 0;

		for (int i = 0; i < n; i++)
			pending += !ops[i].done;
		if (!pending)
			return;
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	}
	ck_abort_msg("requests never completed");
}

START_TEST(write_read_roundtrip)
{
	char *w = tdr_io_alloc(65536), *r = tdr_io_alloc(65536);
	struct op ops[2] = { 0 };

	for (int i = 0; i < 65536; i++)
		w[i] = (char)(i * 7 + 3);
	memset(r, 0, 65536);
	tdr_io_pwrite(ctx, &ops[0].io, fd, w, 65536, 1 << 20, op_done, &ops[0]);
	ck_assert_uint_eq(tdr_io_inflight(ctx), 1);
	wait_for(ops, 1);
	ck_assert_int_eq(ops[0].res, 65536);
	tdr_io_pread(ctx, &ops[1].io, fd, r, 65536, 1 << 20, op_done, &ops[1]);
	wait_for(ops + 1, 1);
	ck_assert_int_eq(ops[1].res, 65536);
	ck_assert_mem_eq(w, r, 65536);
	ck_assert_uint_eq(tdr_io_inflight(ctx), 0);
	ck_assert_uint_eq(tdr_io_writes_done(ctx), 1);
	free(w);
	free(r);
}
END_TEST

/* More requests than the kernel ring holds: the software queue takes the rest. */
START_TEST(many_in_flight)
{
	enum { N = 300, SZ = 4096 };
	char *buf = tdr_io_alloc((size_t)N * SZ), *back = tdr_io_alloc((size_t)N * SZ);
	struct op *ops = calloc(N, sizeof(*ops));

	for (int i = 0; i < N * SZ; i++)
		buf[i] = (char)(i / SZ + i);
	for (int i = 0; i < N; i++)
		tdr_io_pwrite(ctx, &ops[i].io, fd, buf + (size_t)i * SZ, SZ,
			      (uint64_t)(N - 1 - i) * SZ, op_done, &ops[i]);
	ck_assert_uint_eq(tdr_io_inflight(ctx), N);
	wait_for(ops, N);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(ops[i].res, SZ);
	memset(ops, 0, N * sizeof(*ops));
	for (int i = 0; i < N; i++)
		tdr_io_pread(ctx, &ops[i].io, fd, back + (size_t)(N - 1 - i) * SZ, SZ,
			     (uint64_t)i * SZ, op_done, &ops[i]);
	wait_for(ops, N);
	for (int i = 0; i < N; i++)
		ck_assert_mem_eq(back + (size_t)(N - 1 - i) * SZ, buf + (size_t)(N - 1 - i) * SZ, SZ);
	free(ops);
	free(buf);
	free(back);
}
END_TEST

START_TEST(vectored_and_dsync)
{
	char *a = tdr_io_alloc(4096), *b = tdr_io_alloc(4096), *r = tdr_io_alloc(8192);
	struct iovec iov[2] = { { a, 4096 }, { b, 4096 } };
	struct op ops[3] = { 0 };

	memset(a, 'a', 4096);
	memset(b, 'b', 4096);
	tdr_io_pwritev(ctx, &ops[0].io, fd, iov, 2, 8192, op_done, &ops[0]);
	tdr_io_pwrite_dsync(ctx, &ops[1].io, fd, a, 4096, 0, op_done, &ops[1]);
	tdr_io_fdsync(ctx, &ops[2].io, fd, op_done, &ops[2]);
	wait_for(ops, 3);
	ck_assert_int_eq(ops[0].res, 8192);
	ck_assert_int_eq(ops[1].res, 4096);
	ck_assert_int_eq(ops[2].res, 0);
	memset(ops, 0, sizeof(ops));
	iov[0].iov_base = r;
	iov[1].iov_base = r + 4096;
	tdr_io_preadv(ctx, &ops[0].io, fd, iov, 2, 8192, op_done, &ops[0]);
	wait_for(ops, 1);
	ck_assert_int_eq(ops[0].res, 8192);
	ck_assert_mem_eq(r, a, 4096);
	ck_assert_mem_eq(r + 4096, b, 4096);
	free(a);
	free(b);
	free(r);
}
END_TEST

/*
 * pc_seen_check: every version pc_for_each_cut builds holds, for each
 * journalled write, its data if the write had to survive, zeroes (the
 * file before) if it was not yet issued, and sector by sector its data or
 * zeroes if undecided; and at the last cut, B both present and absent.
 */
struct pc_seen {
	const struct pc_log *log;
	int fd;
	unsigned versions, with_b, without_b;
};

static void pc_seen_check(void *arg, const struct pc_cut *cut)
{
	struct pc_seen *seen = arg;
	const struct pc_log *log = seen->log;
	char got[4096];

	seen->versions++;
	for (size_t i = 0; i < log->n; i++) {
		const struct pc_io *p = &log->ios[i];

		if (p->sync)
			continue;
		ck_assert_int_eq(pread(seen->fd, got, p->len, (off_t)p->off), (ssize_t)p->len);
		for (size_t s = 0; s < p->len; s += 512) {
			bool data = !memcmp(got + s, p->data + s, 512);
			bool zero = got[s] == 0 && !memcmp(got + s, got + s + 1, 511);

			if (pc_durable(log, i, cut->at))
				ck_assert_msg(data, "cut %zu: entry %zu lost", cut->at, i);
			else if (pc_undecided(log, i, cut->at))
				ck_assert_msg(data || zero, "cut %zu: entry %zu garbled", cut->at, i);
			else
				ck_assert_msg(zero, "cut %zu: entry %zu before it was issued", cut->at, i);
		}
		if (i == 2 && cut->at == log->events) {
			seen->with_b += !memcmp(got, p->data, p->len);
			seen->without_b += got[0] == 0 && !memcmp(got, got + 1, p->len - 1);
		}
	}
}

/*
 * The journal reports every write and sync the kernel takes, with its
 * data, and no reads; the power-cut model built on it keeps a write that
 * completed before a sync was issued once that sync completed, and one
 * written with RWF_DSYNC once it completed; a write issued together with
 * a sync, or never synced, may or may not be there.
 */
START_TEST(journal_feeds_power_cut_model)
{
	char *a = tdr_io_alloc(4096), *b = tdr_io_alloc(4096), *c = tdr_io_alloc(4096);
	char *d = tdr_io_alloc(4096), *r = tdr_io_alloc(4096);
	char other[] = "/var/tmp/tdr-test-io-other-XXXXXX";
	struct iovec iov[2] = { { d, 1024 }, { d + 1024, 3072 } };
	struct pc_seen seen = { 0 };
	struct op ops[3] = { 0 };
	struct pc_log log;
	int ofd;

	memset(a, 'A', 4096);
	memset(b, 'B', 4096);
	memset(c, 'C', 4096);
	memset(d, 'D', 1024);
	memset(d + 1024, 'd', 3072);
	ofd = mkstemp(other);
	ck_assert_int_ge(ofd, 0);
	pc_start(&log, path, ctx);
	ck_assert_uint_eq(log.files[0].before_len, 16 << 20);
	tdr_io_pwrite(ctx, &ops[0].io, fd, a, 4096, 0, op_done, &ops[0]);		/* entry 0 */
	wait_for(ops, 1);
	memset(ops, 0, sizeof(ops));
	tdr_io_fdsync(ctx, &ops[0].io, fd, op_done, &ops[0]);				/* entry 1 */
	tdr_io_pwrite(ctx, &ops[1].io, fd, b, 4096, 8192, op_done, &ops[1]);		/* entry 2 */
	wait_for(ops, 2);
	memset(ops, 0, sizeof(ops));
	tdr_io_pwrite_dsync(ctx, &ops[0].io, fd, c, 4096, 16384, op_done, &ops[0]);	/* entry 3 */
	tdr_io_pwritev(ctx, &ops[1].io, fd, iov, 2, 24576, op_done, &ops[1]);	/* entry 4 */
	tdr_io_pread(ctx, &ops[2].io, fd, r, 4096, 0, op_done, &ops[2]);
	wait_for(ops, 3);
	memset(ops, 0, sizeof(ops));
	tdr_io_pwrite(ctx, &ops[0].io, ofd, a, 4096, 0, op_done, &ops[0]);		/* another file */
	wait_for(ops, 1);
	pc_stop(&log, ctx);
	memset(ops, 0, sizeof(ops));
	tdr_io_pwrite(ctx, &ops[0].io, fd, a, 4096, 32768, op_done, &ops[0]);	/* after the stop */
	wait_for(ops, 1);

	ck_assert_uint_eq(log.n, 5);
	ck_assert_uint_eq(log.others, 1);
	ck_assert_uint_eq(log.events, 10);
	ck_assert(!log.ios[0].sync && log.ios[1].sync && !log.ios[1].dsync && log.ios[3].dsync);
	ck_assert_uint_eq(log.ios[2].off, 8192);
	ck_assert_mem_eq(log.ios[2].data, b, 4096);
	ck_assert_uint_eq(log.ios[4].off, 24576);
	ck_assert_uint_eq(log.ios[4].len, 4096);
	ck_assert_mem_eq(log.ios[4].data, d, 4096);
	for (size_t i = 0; i < log.n; i++)
		ck_assert_uint_lt(log.ios[i].submit, log.ios[i].done);

	ck_assert(!pc_undecided(&log, 0, log.ios[0].submit));
	ck_assert(pc_undecided(&log, 0, log.ios[1].done));
	ck_assert(pc_durable(&log, 0, log.ios[1].done + 1));
	ck_assert(pc_undecided(&log, 2, log.events));
	ck_assert(!pc_durable(&log, 3, log.ios[3].done));
	ck_assert(pc_durable(&log, 3, log.ios[3].done + 1));
	ck_assert(pc_undecided(&log, 4, log.events));

	seen.log = &log;
	seen.fd = open(path, O_RDONLY);
	ck_assert_int_ge(seen.fd, 0);
	ck_assert_uint_eq(pc_for_each_cut(&log, pc_seen_check, &seen), seen.versions);
	ck_assert_uint_gt(seen.versions, log.events);
	ck_assert_uint_gt(seen.with_b, 0);
	ck_assert_uint_gt(seen.without_b, 0);
	close(seen.fd);
	pc_free(&log);
	close(ofd);
	unlink(other);
	free(a);
	free(b);
	free(c);
	free(d);
	free(r);
}
END_TEST

/* Logging two files: a sync covers its own file's writes only. */
START_TEST(journal_sync_covers_its_own_file)
{
	char *a = tdr_io_alloc(4096);
	char other[] = "/var/tmp/tdr-test-io-other-XXXXXX";
	const char *paths[2] = { path, other };
	struct op ops[3] = { 0 };
	struct pc_log log;
	int ofd = mkstemp(other);

	ck_assert_int_ge(ofd, 0);
	memset(a, 'A', 4096);
	pc_start_files(&log, paths, 2, ctx);
	tdr_io_pwrite(ctx, &ops[0].io, fd, a, 4096, 0, op_done, &ops[0]);
	tdr_io_pwrite(ctx, &ops[1].io, ofd, a, 4096, 0, op_done, &ops[1]);
	wait_for(ops, 2);
	memset(ops, 0, sizeof(ops));
	tdr_io_fdsync(ctx, &ops[0].io, fd, op_done, &ops[0]);
	wait_for(ops, 1);
	pc_stop(&log, ctx);
	ck_assert_uint_eq(log.n, 3);
	ck_assert_uint_eq(log.others, 0);
	ck_assert_uint_eq(log.ios[0].file, 0);
	ck_assert_uint_eq(log.ios[1].file, 1);
	ck_assert(log.ios[2].sync && log.ios[2].file == 0);
	ck_assert(pc_durable(&log, 0, log.events));
	ck_assert(pc_undecided(&log, 1, log.events));
	ck_assert_uint_eq(log.files[1].before_len, 0);
	pc_free(&log);
	close(ofd);
	unlink(other);
	free(a);
}
END_TEST

/* A read at the end of the file is short, reported as it is. */
START_TEST(short_read_at_eof)
{
	char *r = tdr_io_alloc(8192);
	struct op op = { 0 };

	tdr_io_pread(ctx, &op.io, fd, r, 8192, (16 << 20) - 4096, op_done, &op);
	wait_for(&op, 1);
	ck_assert_int_eq(op.res, 4096);
	free(r);
}
END_TEST

START_TEST(bad_fd_fails_alone)
{
	char *r = tdr_io_alloc(4096);
	struct op ops[3] = { 0 };

	tdr_io_pread(ctx, &ops[0].io, fd, r, 4096, 0, op_done, &ops[0]);
	tdr_io_pread(ctx, &ops[1].io, 9999, r, 4096, 0, op_done, &ops[1]);
	tdr_io_pread(ctx, &ops[2].io, fd, r, 4096, 4096, op_done, &ops[2]);
	wait_for(ops, 3);
	ck_assert_int_eq(ops[0].res, 4096);
	ck_assert_int_eq(ops[1].res, -EBADF);
	ck_assert_int_eq(ops[2].res, 4096);
	free(r);
}
END_TEST

START_TEST(fault_fail_after_n)
{
	char *w = tdr_io_alloc(4096), *r = tdr_io_alloc(4096);
	struct op ops[5] = { 0 };

	memset(w, 0x5a, 4096);
	tdr_io_set_fault(ctx, TDR_FAULT_FAIL, 2);
	for (int i = 0; i < 4; i++)
		tdr_io_pwrite(ctx, &ops[i].io, fd, w, 4096, (uint64_t)i * 4096, op_done, &ops[i]);
	tdr_io_pread(ctx, &ops[4].io, fd, r, 4096, 3 * 4096, op_done, &ops[4]);
	wait_for(ops, 5);
	ck_assert_int_eq(ops[0].res, 4096);
	ck_assert_int_eq(ops[1].res, 4096);
	ck_assert_int_eq(ops[2].res, -EIO);
	ck_assert_int_eq(ops[3].res, -EIO);
	ck_assert_int_eq(ops[4].res, 4096);	/* reads are not affected */
	ck_assert_uint_eq(tdr_io_writes_done(ctx), 2);
	/* The failed writes never reached the file. */
	for (int i = 0; i < 4096; i++)
		ck_assert_int_eq(r[i], 0);
	free(w);
	free(r);
}
END_TEST

START_TEST(fault_kill_after_n)
{
	pid_t pid = fork();
	int status;
	char got[3];

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		/* The child: set the fault through the environment, as tests of daemons do. */
		struct tdr_loop *l;
		struct tdr_io_ctx *c;
		struct op ops[3] = { 0 };
		char *w = tdr_io_alloc(4096);

		setenv("TDR_FAULT_WRITES", "2:kill", 1);
		l = tdr_loop_new();
		c = tdr_io_ctx_new(l, 8);
		for (int i = 0; i < 3; i++) {
			memset(w, 'A' + i, 4096);
			tdr_io_pwrite(c, &ops[i].io, fd, w, 4096, (uint64_t)i * 4096, op_done, &ops[i]);
			while (!ops[i].done)
				tdr_loop_run_once(l, 1000);
		}
		_exit(0);	/* not reached: the third write kills */
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert(WIFSIGNALED(status));
	ck_assert_int_eq(WTERMSIG(status), SIGKILL);
	int plain = open(path, O_RDONLY);	/* O_DIRECT refuses 1-byte reads */

	ck_assert_int_ge(plain, 0);
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(pread(plain, &got[i], 1, (off_t)i * 4096), 1);
	close(plain);
	ck_assert_int_eq(got[0], 'A');
	ck_assert_int_eq(got[1], 'B');
	ck_assert_int_eq(got[2], 0);
}
END_TEST

/*
 * An orphaned request frees its memory when it completes and never calls its
 * old owner back; orphans still in flight when the context is freed are freed
 * with it (the leak checker of the sanitizer build sees one left behind).
 */
START_TEST(orphans_free_themselves)
{
	struct op *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b));
	struct op *c = calloc(1, sizeof(*c));
	char *buf = tdr_io_alloc(4096);
	int before = completions;

	ck_assert(a && b && c && buf);
	memset(buf, 0x5a, 4096);
	tdr_io_pwrite(ctx, &a->io, fd, buf, 4096, 0, op_done, a);
	tdr_io_orphan(&a->io, a);
	for (int guard = 0; guard < 100000 && tdr_io_inflight(ctx); guard++)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_uint_eq(tdr_io_inflight(ctx), 0);
	ck_assert_int_eq(completions, before);	/* op_done never ran */

	/* One in the kernel and one still queued when the context goes away. */
	tdr_io_fdsync(ctx, &b->io, fd, op_done, b);
	tdr_io_flush_queue(ctx);
	tdr_io_orphan(&b->io, b);
	tdr_io_fdsync(ctx, &c->io, fd, op_done, c);
	tdr_io_orphan(&c->io, c);
	ck_assert_uint_eq(tdr_io_inflight(ctx), 2);
	tdr_io_ctx_free(ctx);
	ctx = tdr_io_ctx_new(loop, 32);	/* for the teardown */
	ck_assert_ptr_nonnull(ctx);
	ck_assert_int_eq(completions, before);
	free(buf);
}
END_TEST

START_TEST(open_falls_back_without_o_direct)
{
	char p[] = "/dev/shm/tdr-test-io-XXXXXX";
	int tmp = mkstemp(p), f;
	bool direct = true;
	char *w = tdr_io_alloc(4096), *r = tdr_io_alloc(4096);
	struct op ops[2] = { 0 };

	ck_assert_int_ge(tmp, 0);
	close(tmp);
	f = tdr_io_open(p, O_RDWR, 0, &direct);
	ck_assert_int_ge(f, 0);
	/* Whichever mode the filesystem allowed, I/O works through the backend. */
	memset(w, 0x33, 4096);
	tdr_io_pwrite(ctx, &ops[0].io, f, w, 4096, 0, op_done, &ops[0]);
	wait_for(ops, 1);
	tdr_io_pread(ctx, &ops[1].io, f, r, 4096, 0, op_done, &ops[1]);
	wait_for(ops + 1, 1);
	ck_assert_int_eq(ops[1].res, 4096);
	ck_assert_mem_eq(w, r, 4096);
	ck_assert_int_eq(fcntl(f, F_GETFL) & O_DIRECT ? 1 : 0, direct ? 1 : 0);
	close(f);
	unlink(p);
	ck_assert_int_eq(tdr_io_open("/nonexistent/x", O_RDWR, 0, NULL), -ENOENT);
	free(w);
	free(r);
}
END_TEST

/* The build's expectation: huge pages from 256 KiB up, except under ASan. */
#if defined(__SANITIZE_ADDRESS__)
#define EXPECT_HUGE false
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EXPECT_HUGE false
#endif
#endif
#ifndef EXPECT_HUGE
#define EXPECT_HUGE true
#endif

START_TEST(bufpool_reuses_by_size_class)
{
	struct tdr_bufpool pool;
	char *a, *b, *c;
	size_t sib = EXPECT_HUGE ? 1u << 20 : 0;

	tdr_bufpool_init(&pool, 4u << 20);
	a = tdr_bufpool_get(&pool, 1u << 20);
	ck_assert_ptr_nonnull(a);
	ck_assert_uint_eq((uintptr_t)a % TDR_IO_ALIGN, 0);
	memset(a, 0x5a, 1u << 20);	/* the whole length is usable (ASan checks) */
	/* A huge-page class keeps the other half of its 2 MiB region idle. */
	ck_assert_uint_eq(pool.idle_bytes, sib);
	tdr_bufpool_put(&pool, a, 1u << 20);
	ck_assert_uint_eq(pool.idle_bytes, sib + (1u << 20));

	ck_assert_uint_eq(tdr_bufpool_size(100), 4096);
	ck_assert_uint_eq(tdr_bufpool_size(1u << 20), 1u << 20);
	ck_assert_uint_eq(tdr_bufpool_size((1u << 19) + 512), 1u << 20);
	ck_assert_uint_eq(tdr_bufpool_size(TDR_BUFPOOL_MAX_CLASS + 4096),
			  TDR_BUFPOOL_MAX_CLASS + 4096);

	/* Any length of the same power-of-two class gets the idle buffer back. */
	b = tdr_bufpool_get(&pool, (1u << 19) + 512);
	ck_assert_ptr_eq(b, a);
	ck_assert_uint_eq(pool.idle_bytes, sib);
	ck_assert_uint_eq(pool.hits, 1);
	ck_assert_uint_eq(pool.misses, 1);

	/* Another class does not. */
	c = tdr_bufpool_get(&pool, 4096);
	ck_assert_ptr_nonnull(c);
	ck_assert_ptr_ne(c, b);
	ck_assert_uint_eq((uintptr_t)c % TDR_IO_ALIGN, 0);
	ck_assert_uint_eq(pool.misses, 2);
	tdr_bufpool_put(&pool, c, 4096);
	tdr_bufpool_put(&pool, b, (1u << 19) + 512);
	ck_assert_uint_eq(pool.idle_bytes, 4096 + sib + (1u << 20));
	tdr_bufpool_put(&pool, NULL, 4096);
	tdr_bufpool_fini(&pool);
	ck_assert_uint_eq(pool.idle_bytes, 0);
}
END_TEST

START_TEST(bufpool_bounds_idle_memory)
{
	struct tdr_bufpool pool;
	char *bufs[5];

	tdr_bufpool_init(&pool, 4u << 20);
	for (int i = 0; i < 5; i++) {
		bufs[i] = tdr_bufpool_get(&pool, 1u << 20);
		ck_assert_ptr_nonnull(bufs[i]);
	}
	/* Three regions of 2 MiB: the first two halves were handed out again. */
	ck_assert_uint_eq(pool.misses, EXPECT_HUGE ? 3 : 5);
	ck_assert_uint_eq(pool.hits, EXPECT_HUGE ? 2 : 0);
	ck_assert_uint_eq(pool.idle_bytes, EXPECT_HUGE ? 1u << 20 : 0);
	/* The fifth idle MiB would exceed max_idle: it is freed instead. */
	for (int i = 0; i < 5; i++)
		tdr_bufpool_put(&pool, bufs[i], 1u << 20);
	ck_assert_uint_eq(pool.idle_bytes, 4u << 20);

	/* Larger than the largest class: allocated and freed every time. */
	bufs[0] = tdr_bufpool_get(&pool, TDR_BUFPOOL_MAX_CLASS + 4096);
	ck_assert_ptr_nonnull(bufs[0]);
	memset(bufs[0], 0, TDR_BUFPOOL_MAX_CLASS + 4096);
	tdr_bufpool_put(&pool, bufs[0], TDR_BUFPOOL_MAX_CLASS + 4096);
	ck_assert_uint_eq(pool.idle_bytes, 4u << 20);
	tdr_bufpool_fini(&pool);	/* leak-checked under ASan */
}
END_TEST

/* Which classes are huge-page backed, how they are laid out, and release(). */
START_TEST(bufpool_huge_pages)
{
	struct tdr_bufpool pool;
	char *a, *b, *c, *d;

	ck_assert(tdr_bufpool_huge(1u << 20) == EXPECT_HUGE);
	ck_assert(tdr_bufpool_huge(256u << 10) == EXPECT_HUGE);
	ck_assert(tdr_bufpool_huge((128u << 10) + 1) == EXPECT_HUGE);
	ck_assert(!tdr_bufpool_huge(128u << 10));
	ck_assert(!tdr_bufpool_huge(4096));
	ck_assert(!tdr_bufpool_huge(1));
	ck_assert(tdr_bufpool_huge(TDR_BUFPOOL_MAX_CLASS) == EXPECT_HUGE);
	ck_assert(!tdr_bufpool_huge(TDR_BUFPOOL_MAX_CLASS + 1));

	tdr_bufpool_init(&pool, 8u << 20);
	a = tdr_bufpool_get(&pool, 1u << 20);
	b = tdr_bufpool_get(&pool, 1u << 20);
	c = tdr_bufpool_get(&pool, 3u << 20);	/* class 4 MiB */
	d = tdr_bufpool_get(&pool, 256u << 10);
	ck_assert(a && b && c && d);
	memset(a, 1, 1u << 20);
	memset(b, 2, 1u << 20);
	memset(c, 3, 4u << 20);
	memset(d, 4, 256u << 10);
	if (EXPECT_HUGE) {
		/* Two halves of one 2 MiB-aligned region, the second from the idle list. */
		ck_assert_uint_eq((uintptr_t)a % (2u << 20), 0);
		ck_assert_ptr_eq(b, a + (1u << 20));
		ck_assert_uint_eq(pool.misses, 3);
		ck_assert_uint_eq(pool.hits, 1);
		ck_assert_uint_eq((uintptr_t)c % (2u << 20), 0);
		/* 256 KiB: the region's seven other pieces wait idle. */
		ck_assert_uint_eq((uintptr_t)d % (2u << 20), 0);
		ck_assert_uint_eq(pool.idle_bytes, 7 * (256u << 10));
	} else {
		ck_assert_uint_eq(pool.misses, 4);
		ck_assert_uint_eq(pool.idle_bytes, 0);
	}
	/* Writing one buffer leaves its neighbour alone. */
	ck_assert_int_eq(a[(1u << 20) - 1], 1);
	ck_assert_int_eq(b[0], 2);
	tdr_bufpool_put(&pool, a, 1u << 20);
	tdr_bufpool_put(&pool, d, 256u << 10);
	tdr_bufpool_fini(&pool);
	ck_assert_uint_eq(pool.idle_bytes, 0);
	/* Still out when the pool went: released on their own. */
	ck_assert_int_eq(b[(1u << 20) - 1], 2);
	tdr_bufpool_release(b, 1u << 20);
	tdr_bufpool_release(c, 3u << 20);
	tdr_bufpool_release(NULL, 4096);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("io");
	TCase *tc = tcase_create("aio");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, write_read_roundtrip);
	tcase_add_test(tc, many_in_flight);
	tcase_add_test(tc, vectored_and_dsync);
	tcase_add_test(tc, journal_feeds_power_cut_model);
	tcase_add_test(tc, journal_sync_covers_its_own_file);
	tcase_add_test(tc, short_read_at_eof);
	tcase_add_test(tc, bad_fd_fails_alone);
	tcase_add_test(tc, fault_fail_after_n);
	tcase_add_test(tc, fault_kill_after_n);
	tcase_add_test(tc, orphans_free_themselves);
	tcase_add_test(tc, open_falls_back_without_o_direct);
	tcase_add_test(tc, bufpool_reuses_by_size_class);
	tcase_add_test(tc, bufpool_bounds_idle_memory);
	tcase_add_test(tc, bufpool_huge_pages);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_NOFORK);
}
