/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests of the raw "aio" driver through td_disk: data, FUA, flush, TRIM, zeroes, status. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "check-run.h"

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;
static char path[] = "/var/tmp/tdr-test-aio-XXXXXX";
static char spec[64];
static struct td_disk *disk;

#define MIB (1u << 20)

static void setup(void)
{
	int fd;

	strcpy(path, "/var/tmp/tdr-test-aio-XXXXXX");
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, 8 * MIB), 0);
	close(fd);
	snprintf(spec, sizeof(spec), "aio:%s", path);
	loop = tdr_loop_new();
	io = tdr_io_ctx_new(loop, 64);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_uint_eq(disk->size_secs, 8 * MIB / 512);
}

static void teardown(void)
{
	td_disk_close(disk);
	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	unlink(path);
}

struct done {
	bool done;
	int err;
};

static void req_done(struct td_request *req, int err, void *arg)
{
	struct done *d = arg;

	d->done = true;
	d->err = err;
}

static int run_req(enum td_op op, uint64_t sec, uint32_t secs, char *buf, unsigned flags,
		   struct td_request *out)
{
	struct td_request req;
	struct done d = { 0 };

	td_request_init(&req, op, sec, secs, buf, req_done, &d);
	req.flags = flags;
	td_disk_submit(disk, &req);
	while (!d.done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	if (out)
		*out = req;
	return d.err;
}

static void file_read(off_t off, void *buf, size_t len)
{
	int fd = open(path, O_RDONLY);

	ck_assert_int_eq(pread(fd, buf, len, off), (ssize_t)len);
	close(fd);
}

START_TEST(read_write_byte_exact)
{
	char *w = tdr_io_alloc(MIB), *r = tdr_io_alloc(MIB), *f = malloc(MIB);

	for (unsigned i = 0; i < MIB; i++)
		w[i] = (char)(i * 31 + (i >> 9));
	ck_assert_int_eq(run_req(TD_OP_WRITE, 3, MIB / 512, w, 0, NULL), 0);
	ck_assert_int_eq(run_req(TD_OP_WRITE, 4096, 8, w, TD_REQ_FUA, NULL), 0);
	ck_assert_int_eq(run_req(TD_OP_FLUSH, 0, 0, NULL, 0, NULL), 0);
	ck_assert_int_eq(run_req(TD_OP_READ, 3, MIB / 512, r, 0, NULL), 0);
	ck_assert_mem_eq(r, w, MIB);
	file_read(3 * 512, f, MIB);
	ck_assert_mem_eq(f, w, MIB);
	file_read(4096 * 512, f, 4096);
	ck_assert_mem_eq(f, w, 4096);
	ck_assert_uint_eq(disk->top->stats.wr_reqs, 2);
	ck_assert_uint_eq(disk->top->stats.rd_secs, MIB / 512);
	free(w);
	free(r);
	free(f);
}
END_TEST

/* The last sector of the image, and one past it. */
START_TEST(edges)
{
	char *b = tdr_io_alloc(1024);

	memset(b, 'z', 1024);
	ck_assert_int_eq(run_req(TD_OP_WRITE, disk->size_secs - 1, 1, b, 0, NULL), 0);
	ck_assert_int_eq(run_req(TD_OP_WRITE, disk->size_secs - 1, 2, b, 0, NULL), -ENOSPC);
	memset(b, 0, 1024);
	ck_assert_int_eq(run_req(TD_OP_READ, disk->size_secs - 1, 1, b, 0, NULL), 0);
	ck_assert_int_eq(b[0], 'z');
	ck_assert_int_eq(b[511], 'z');
	free(b);
}
END_TEST

START_TEST(trim_and_zeroes)
{
	char *w = tdr_io_alloc(MIB), *r = tdr_io_alloc(MIB);
	struct td_request out;

	memset(w, 0xff, MIB);
	ck_assert_int_eq(run_req(TD_OP_WRITE, 0, MIB / 512, w, 0, NULL), 0);
	ck_assert_int_eq(run_req(TD_OP_WRITE, 2048, MIB / 512, w, 0, NULL), 0);

	/* Zeroes that may punch a hole, and zeroes that must stay allocated. */
	struct stat st0, st1, st2;

	ck_assert_int_eq(stat(path, &st0), 0);
	ck_assert_int_eq(run_req(TD_OP_WRITE_ZEROES, 0, 256, NULL, 0, NULL), 0);
	ck_assert_int_eq(stat(path, &st1), 0);
	ck_assert_int_eq(run_req(TD_OP_WRITE_ZEROES, 2048, 256, NULL, TD_REQ_NO_HOLE, NULL), 0);
	ck_assert_int_eq(stat(path, &st2), 0);
	/* 128 KiB punched out; the NO_HOLE range keeps its blocks. */
	ck_assert_int_eq(st0.st_blocks - st1.st_blocks, 256);
	ck_assert_int_eq(st2.st_blocks, st1.st_blocks);
	ck_assert_int_eq(run_req(TD_OP_READ, 0, MIB / 512, r, 0, NULL), 0);
	for (unsigned i = 0; i < MIB; i++)
		ck_assert_int_eq((unsigned char)r[i], i < 128 * 1024 ? 0 : 0xff);
	ck_assert_int_eq(run_req(TD_OP_READ, 2048, MIB / 512, r, 0, NULL), 0);
	for (unsigned i = 0; i < MIB; i++)
		ck_assert_int_eq((unsigned char)r[i], i < 128 * 1024 ? 0 : 0xff);

	/* The punched range reads as a hole, up to the data after it. */
	ck_assert_int_eq(run_req(TD_OP_BLOCK_STATUS, 0, 2048, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_uint_eq(out.bs_secs, 256);
	ck_assert_int_eq(run_req(TD_OP_BLOCK_STATUS, 256, 1792, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_flags, 0);
	ck_assert_uint_eq(out.bs_secs, 1792);

	/* TRIM punches a hole too. */
	ck_assert_int_eq(run_req(TD_OP_DISCARD, 512, 512, NULL, 0, NULL), 0);
	ck_assert_int_eq(run_req(TD_OP_BLOCK_STATUS, 512, 1024, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_uint_eq(out.bs_secs, 512);
	ck_assert_int_eq(run_req(TD_OP_BLOCK_STATUS, 1024, 1024, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_flags, 0);
	ck_assert_uint_eq(out.bs_secs, 1024);
	free(w);
	free(r);
}
END_TEST

START_TEST(sparse_file_status)
{
	struct td_request out;

	/* A fresh sparse file is one hole up to the end. */
	ck_assert_int_eq(run_req(TD_OP_BLOCK_STATUS, 100, 1000, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_uint_eq(out.bs_secs, 1000);
}
END_TEST

START_TEST(read_only_open)
{
	struct td_disk *ro;
	char b[512];

	ck_assert_int_eq(td_disk_open(&ro, spec, TD_OPEN_RDONLY, loop, io), 0);
	ck_assert_int_eq(chmod(path, 0400), 0);
	struct td_disk *save = disk;

	disk = ro;
	ck_assert_int_eq(run_req(TD_OP_WRITE, 0, 1, b, 0, NULL), -EPERM);
	ck_assert_int_eq(run_req(TD_OP_READ, 0, 1, b, 0, NULL), 0);
	disk = save;
	td_disk_close(ro);
}
END_TEST

START_TEST(bad_files)
{
	struct td_disk *d = NULL;
	char s[128];
	int fd;

	ck_assert_int_eq(td_disk_open(&d, "aio:", 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "no file name"));
	ck_assert_int_eq(td_disk_open(&d, "aio:/dev/null", 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "not a regular file or block device"));
	fd = open(path, O_WRONLY | O_TRUNC);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "abc", 3), 3);
	close(fd);
	snprintf(s, sizeof(s), "aio:%s", path);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "empty (3 bytes)"));
	ck_assert_ptr_null(d);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("drv-aio");
	TCase *tc = tcase_create("raw");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, read_write_byte_exact);
	tcase_add_test(tc, edges);
	tcase_add_test(tc, trim_and_zeroes);
	tcase_add_test(tc, sparse_file_status);
	tcase_add_test(tc, read_only_open);
	tcase_add_test(tc, bad_files);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_NOFORK);
}
