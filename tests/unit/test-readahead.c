/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the read-ahead for sequential streams (tdr/readahead.h),
 * through the aio driver: data read ahead is byte-exact, writes, discards
 * and write-zeroes are never hidden by chunks read before them, random
 * reads start nothing, the end of an odd-sized file reads right, and a
 * disk closed with chunks in flight frees everything.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/readahead.h"
#include "check-run.h"

#define MIB ((size_t)1 << 20)
#define KIB ((size_t)1 << 10)

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;
static char path[] = "/var/tmp/tdr-test-ra-XXXXXX";
static struct td_disk *disk;
static size_t file_size;

/* The byte the file holds at off before any test writes: never zero. */
static char pattern(uint64_t off)
{
	return (char)(((off >> 9) * 131 + (off & 511) * 7) % 255 + 1);
}

static void open_disk(size_t size)
{
	char spec[64];
	char *buf = malloc(MIB);
	int fd;

	strcpy(path, "/var/tmp/tdr-test-ra-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	for (size_t off = 0; off < size; off += MIB) {
		size_t n = size - off < MIB ? size - off : MIB;

		for (size_t i = 0; i < n; i++)
			buf[i] = pattern(off + i);
		ck_assert_int_eq(pwrite(fd, buf, n, (off_t)off), (ssize_t)n);
	}
	close(fd);
	free(buf);
	file_size = size;
	snprintf(spec, sizeof(spec), "aio:%s", path);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
}

static void setup(void)
{
	loop = tdr_loop_new();
	io = tdr_io_ctx_new(loop, 256);
	td_set_readahead(TD_READAHEAD_DEFAULT);
	disk = NULL;
}

static void teardown(void)
{
	td_disk_close(disk);
	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	unlink(path);
	td_set_readahead(TD_READAHEAD_DEFAULT);
}

struct op {
	struct td_request req;
	char *buf;
	bool done;
	int err;
};

static void op_done(struct td_request *req, int err, void *arg)
{
	struct op *o = arg;

	(void)req;
	o->done = true;
	o->err = err;
}

static void op_submit(struct op *o, enum td_op type, uint64_t off, size_t len)
{
	o->done = false;
	o->err = 1;
	td_request_init(&o->req, type, off >> 9, (uint32_t)(len >> 9), o->buf, op_done, o);
	td_disk_submit(disk, &o->req);
}

static void op_wait(struct op *o)
{
	while (!o->done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_int_eq(o->err, 0);
}

static int run(enum td_op type, uint64_t off, size_t len, char *buf)
{
	struct op o = { .buf = buf };

	op_submit(&o, type, off, len);
	while (!o.done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	return o.err;
}

static void check_pattern(const char *buf, uint64_t off, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != pattern(off + i))
			ck_abort_msg("byte %llu: read %d, expected %d",
				     (unsigned long long)(off + i), buf[i], pattern(off + i));
}

/* The aio driver's read-ahead counters, from its stats output (all 0 without one). */
struct ra_counts {
	unsigned long long streams, hits, misses, deep, reading;
	size_t memory;
};

static struct ra_counts ra_stats(void)
{
	struct ra_counts c = { 0 };
	char *text = NULL, *p;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	disk->top->drv->stats(disk->top, f);
	fclose(f);
	p = strstr(text, "readahead_");
	if (p)
		ck_assert_int_eq(sscanf(p, "readahead_streams=%llu readahead_hits=%llu readahead_misses=%llu readahead_deep=%llu readahead_chunks=%*u readahead_unused=%*u readahead_invalidated=%*u readahead_reading=%llu readahead_memory=%zu",
					&c.streams, &c.hits, &c.misses, &c.deep, &c.reading, &c.memory), 6);
	free(text);
	return c;
}

/* Runs the loop until no chunk is being read ahead. */
static void settle(void)
{
	while (ra_stats().reading)
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
}

/*
 * One reader, one request at a time: after the reads that start the
 * stream and those watched to judge the client, every read is read ahead.
 */
START_TEST(sequential_reads_are_read_ahead_byte_exact)
{
	char *buf = tdr_io_alloc(256 * KIB);
	struct ra_counts c;
	size_t n = 0;

	open_disk(32 * MIB);
	for (uint64_t off = 0; off < file_size; off += 256 * KIB, n++) {
		memset(buf, 0, 256 * KIB);
		ck_assert_int_eq(run(TD_OP_READ, off, 256 * KIB, buf), 0);
		check_pattern(buf, off, 256 * KIB);
	}
	c = ra_stats();
	ck_assert_uint_eq(c.streams, 1);
	ck_assert_uint_eq(c.hits, n - TDR_RA_TRIGGER - TDR_RA_PROBE);
	ck_assert_uint_eq(c.misses, 0);
	ck_assert_uint_gt(c.memory, 0);
	ck_assert_uint_le(c.memory, TDR_RA_SLOTS_PER_WINDOW * TD_READAHEAD_DEFAULT);
	free(buf);
}
END_TEST

/*
 * depth reads of 1 MiB in flight at once, two passes over the file (the
 * second starts a new stream at 0).  Returns the read-ahead's counters.
 */
static struct ra_counts read_deep(unsigned depth)
{
	struct op ops[32];
	bool active[32];
	struct ra_counts c;
	uint64_t next = 0, end;
	unsigned i, nactive = depth;

	ck_assert_uint_le(depth, 32);
	open_disk(64 * MIB);
	end = 2 * file_size;
	for (i = 0; i < depth; i++, next += MIB) {
		ops[i].buf = tdr_io_alloc(MIB);
		active[i] = true;
		op_submit(&ops[i], TD_OP_READ, next % file_size, MIB);
	}
	while (nactive) {
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
		for (i = 0; i < depth; i++) {
			if (!active[i] || !ops[i].done)
				continue;
			ck_assert_int_eq(ops[i].err, 0);
			check_pattern(ops[i].buf, ops[i].req.sec << 9, MIB);
			if (next < end) {
				memset(ops[i].buf, 0, MIB);
				op_submit(&ops[i], TD_OP_READ, next % file_size, MIB);
				next += MIB;
			} else {
				active[i] = false;
				nactive--;
			}
		}
	}
	c = ra_stats();
	ck_assert_uint_eq(c.streams, 2);
	for (i = 0; i < depth; i++)
		free(ops[i].buf);
	return c;
}

/*
 * fio's iodepth 32 of 1 MiB: the first 32 arrive together, so the client
 * is seen to keep 32 MiB in flight, more than the window: no read-ahead.
 */
START_TEST(deep_client_is_left_alone)
{
	struct ra_counts c = read_deep(32);

	ck_assert_uint_eq(c.hits, 0);
	ck_assert_uint_gt(c.deep, 0);
}
END_TEST

/* Four reads of 1 MiB in flight: 3 MiB at most, below the window: read ahead. */
START_TEST(shallow_client_is_read_ahead)
{
	struct ra_counts c = read_deep(4);

	ck_assert_uint_gt(c.hits, 0);
	ck_assert_uint_eq(c.deep, 0);
}
END_TEST

/*
 * A write into chunks read ahead (done, or still being read when the write
 * is queued): every later read sees the write, never the old chunk.
 */
START_TEST(writes_invalidate_chunks)
{
	char *buf = tdr_io_alloc(MIB), *w = tdr_io_alloc(64 * KIB);
	struct op wr = { .buf = w };
	struct ra_counts c;

	open_disk(32 * MIB);
	/* Start a stream; chunks up to 8 MiB ahead are asked for. */
	for (uint64_t off = 0; off < 3 * 64 * KIB; off += 64 * KIB) {
		ck_assert_int_eq(run(TD_OP_READ, off, 64 * KIB, buf), 0);
		check_pattern(buf, off, 64 * KIB);
	}
	/* Queued at once, while chunks ahead are in flight. */
	memset(w, 'W', 64 * KIB);
	op_submit(&wr, TD_OP_WRITE, 2 * MIB + 4 * KIB, 64 * KIB);
	op_wait(&wr);
	/* After every chunk has landed. */
	settle();
	memset(w, 'V', 64 * KIB);
	ck_assert_int_eq(run(TD_OP_WRITE, 5 * MIB - 32 * KIB, 64 * KIB, w), 0);

	/* Read on through both written ranges. */
	for (uint64_t off = 3 * 64 * KIB; off < 8 * MIB; off += 64 * KIB) {
		ck_assert_int_eq(run(TD_OP_READ, off, 64 * KIB, buf), 0);
		for (size_t i = 0; i < 64 * KIB; i++) {
			uint64_t o = off + i;
			char want = pattern(o);

			if (o >= 2 * MIB + 4 * KIB && o < 2 * MIB + 68 * KIB)
				want = 'W';
			else if (o >= 5 * MIB - 32 * KIB && o < 5 * MIB + 32 * KIB)
				want = 'V';
			if (buf[i] != want)
				ck_abort_msg("byte %llu: read %d, expected %d", (unsigned long long)o,
					     buf[i], want);
		}
	}
	c = ra_stats();
	ck_assert_uint_eq(c.streams, 1);
	ck_assert_uint_gt(c.hits, 0);
	free(buf);
	free(w);
}
END_TEST

/* Write-zeroes and TRIM (which leaves zeroes on a file) are writes too. */
START_TEST(zeroes_and_discard_invalidate_chunks)
{
	char *buf = tdr_io_alloc(MIB);
	static const char zero[64 * 1024];

	open_disk(16 * MIB);
	for (uint64_t off = 0; off < 3 * MIB; off += MIB)
		ck_assert_int_eq(run(TD_OP_READ, off, MIB, buf), 0);
	/* Let the chunks ahead land, then zero under them. */
	settle();
	ck_assert_int_eq(run(TD_OP_WRITE_ZEROES, 4 * MIB, 64 * KIB, NULL), 0);
	ck_assert_int_eq(run(TD_OP_DISCARD, 6 * MIB, 64 * KIB, NULL), 0);
	for (uint64_t off = 3 * MIB; off < 8 * MIB; off += MIB) {
		ck_assert_int_eq(run(TD_OP_READ, off, MIB, buf), 0);
		if (off == 4 * MIB || off == 6 * MIB) {
			ck_assert_mem_eq(buf, zero, 64 * KIB);
			check_pattern(buf + 64 * KIB, off + 64 * KIB, MIB - 64 * KIB);
		} else {
			check_pattern(buf, off, MIB);
		}
	}
	free(buf);
}
END_TEST

/* The last chunk of a file that is not a whole number of chunks. */
START_TEST(odd_sized_file_end)
{
	size_t size = 5 * MIB + 12 * KIB + 512;
	char *buf = tdr_io_alloc(MIB);
	struct ra_counts c;
	uint64_t off;

	open_disk(size);
	ck_assert_uint_eq(disk->size_secs, size / 512);
	for (off = 0; off + 128 * KIB <= size; off += 128 * KIB) {
		ck_assert_int_eq(run(TD_OP_READ, off, 128 * KIB, buf), 0);
		check_pattern(buf, off, 128 * KIB);
	}
	ck_assert_int_eq(run(TD_OP_READ, off, size - off, buf), 0);
	check_pattern(buf, off, size - off);
	ck_assert_int_eq(run(TD_OP_READ, size - 512, 1024, buf), -EINVAL);
	c = ra_stats();
	ck_assert_uint_eq(c.streams, 1);
	ck_assert_uint_gt(c.hits, 0);
	free(buf);
}
END_TEST

/* Random reads start no stream and take no memory. */
START_TEST(random_reads_start_nothing)
{
	char *buf = tdr_io_alloc(64 * KIB);
	struct ra_counts c;
	uint64_t x = 12345;

	open_disk(32 * MIB);
	for (int i = 0; i < 500; i++) {
		uint64_t off;

		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
		off = ((x >> 33) % (32 * MIB / (64 * KIB))) * 64 * KIB;
		ck_assert_int_eq(run(TD_OP_READ, off, 64 * KIB, buf), 0);
		check_pattern(buf, off, 64 * KIB);
	}
	c = ra_stats();
	ck_assert_uint_eq(c.streams, 0);
	ck_assert_uint_eq(c.hits, 0);
	ck_assert_uint_eq(c.memory, 0);
	free(buf);
}
END_TEST

/* A stream that stops: its buffers are given back. */
START_TEST(stream_end_frees_buffers)
{
	char *buf = tdr_io_alloc(64 * KIB);
	struct ra_counts c;

	open_disk(32 * MIB);
	for (uint64_t off = 0; off < MIB; off += 64 * KIB)
		ck_assert_int_eq(run(TD_OP_READ, off, 64 * KIB, buf), 0);
	settle();
	c = ra_stats();
	ck_assert_uint_gt(c.memory, 0);
	/* Far away: the stream ends. */
	ck_assert_int_eq(run(TD_OP_READ, 30 * MIB, 64 * KIB, buf), 0);
	check_pattern(buf, 30 * MIB, 64 * KIB);
	c = ra_stats();
	ck_assert_uint_eq(c.memory, 0);
	free(buf);
}
END_TEST

/* Closed right after a stream started: chunks in flight are waited for (ASan checks the rest). */
START_TEST(close_with_chunks_in_flight)
{
	char *buf = tdr_io_alloc(64 * KIB);

	open_disk(32 * MIB);
	for (uint64_t off = 0; off < 3 * 64 * KIB; off += 64 * KIB)
		ck_assert_int_eq(run(TD_OP_READ, off, 64 * KIB, buf), 0);
	td_disk_close(disk);
	disk = NULL;
	free(buf);
}
END_TEST

START_TEST(readahead_off)
{
	char *buf = tdr_io_alloc(MIB);
	struct ra_counts c;

	td_set_readahead(0);
	open_disk(8 * MIB);
	for (uint64_t off = 0; off < 8 * MIB; off += MIB) {
		ck_assert_int_eq(run(TD_OP_READ, off, MIB, buf), 0);
		check_pattern(buf, off, MIB);
	}
	c = ra_stats();
	ck_assert_uint_eq(c.streams, 0);
	ck_assert_uint_eq(c.memory, 0);
	free(buf);
}
END_TEST

START_TEST(parse_window)
{
	size_t w = 1;

	ck_assert_int_eq(tdr_ra_parse_window("8M", &w), 0);
	ck_assert_uint_eq(w, 8 * MIB);
	ck_assert_int_eq(tdr_ra_parse_window("16384", &w), 0);
	ck_assert_uint_eq(w, 16 * MIB);
	ck_assert_int_eq(tdr_ra_parse_window("2048k", &w), 0);
	ck_assert_uint_eq(w, 2 * MIB);
	ck_assert_int_eq(tdr_ra_parse_window("0", &w), 0);
	ck_assert_uint_eq(w, 0);
	ck_assert_int_eq(tdr_ra_parse_window("256M", &w), 0);
	ck_assert_uint_eq(w, 256 * MIB);
	w = 7;
	ck_assert_int_eq(tdr_ra_parse_window("257M", &w), -ERANGE);
	ck_assert_int_eq(tdr_ra_parse_window("1G", &w), -ERANGE);
	ck_assert_int_eq(tdr_ra_parse_window("1500K", &w), -EDOM);
	ck_assert_int_eq(tdr_ra_parse_window("-8M", &w), -EINVAL);
	ck_assert_int_eq(tdr_ra_parse_window("8MB", &w), -EINVAL);
	ck_assert_int_eq(tdr_ra_parse_window("", &w), -EINVAL);
	ck_assert_int_eq(tdr_ra_parse_window("lots", &w), -EINVAL);
	ck_assert_int_eq(tdr_ra_parse_window("99999999999999999999", &w), -EINVAL);
	ck_assert_uint_eq(w, 7);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("readahead");
	TCase *tc = tcase_create("aio");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, sequential_reads_are_read_ahead_byte_exact);
	tcase_add_test(tc, deep_client_is_left_alone);
	tcase_add_test(tc, shallow_client_is_read_ahead);
	tcase_add_test(tc, writes_invalidate_chunks);
	tcase_add_test(tc, zeroes_and_discard_invalidate_chunks);
	tcase_add_test(tc, odd_sized_file_end);
	tcase_add_test(tc, random_reads_start_nothing);
	tcase_add_test(tc, stream_end_frees_buffers);
	tcase_add_test(tc, close_with_chunks_in_flight);
	tcase_add_test(tc, readahead_off);
	tcase_add_test(tc, parse_window);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_NOFORK);
}
