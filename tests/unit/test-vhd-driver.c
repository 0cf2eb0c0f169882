/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Tests of the asynchronous "vhd" driver through td_disk: parallel random
 * I/O against a model, concurrent allocation of one block, three-deep chains
 * (writes land in the leaf only), block status, online make-empty and
 * commit, and crash safety with the I/O backend's fault injection.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/vhd.h"
#include "check-run.h"
#include "powercut.h"

#define MIB (1ull << 20)

static char dir[] = "/var/tmp/tdr-test-vhdd-XXXXXX";
static char pa[PATH_MAX], pb[PATH_MAX], pc[PATH_MAX];
static struct tdr_loop *loop;
static struct tdr_io_ctx *io;

static void register_vhd(void)
{
	if (!td_driver_find("vhd"))
		ck_assert_int_eq(td_driver_register(&td_drv_vhd), 0);
}

static void setup(void)
{
	strcpy(dir, "/var/tmp/tdr-test-vhdd-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(pa, sizeof(pa), "%s/a.vhd", dir);
	snprintf(pb, sizeof(pb), "%s/b.vhd", dir);
	snprintf(pc, sizeof(pc), "%s/c.vhd", dir);
	register_vhd();
	loop = tdr_loop_new();
	io = tdr_io_ctx_new(loop, 128);
	ck_assert_ptr_nonnull(io);
}

static void teardown(void)
{
	char cmd[PATH_MAX + 16];

	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	ck_assert_int_eq(system(cmd), 0);
}

static void fill_random(void *buf, size_t len, unsigned seed)
{
	unsigned char *b = buf;

	for (size_t i = 0; i < len; i++) {
		seed = seed * 1103515245u + 12345u;
		b[i] = (unsigned char)(seed >> 16);
	}
}

static char *abuf(size_t len)
{
	char *p = tdr_io_alloc(len ? len : 512);

	ck_assert_ptr_nonnull(p);
	return p;
}

struct waiter {
	int pending;
	int errors;
	int last_err;
};

static void req_done(struct td_request *req, int err, void *arg)
{
	struct waiter *w = arg;

	w->pending--;
	if (err) {
		w->errors++;
		w->last_err = err;
	}
}

static void wait_all(struct waiter *w)
{
	while (w->pending > 0)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
}

static int run_req(struct td_disk *disk, enum td_op op, uint64_t sec, uint32_t secs, char *buf,
		   struct td_request *out)
{
	struct td_request req;
	struct waiter w = { 1, 0, 0 };

	td_request_init(&req, op, sec, secs, buf, req_done, &w);
	td_disk_submit(disk, &req);
	wait_all(&w);
	if (out)
		*out = req;
	return w.last_err;
}

/* Writes len bytes of buf at byte off through disk and into model. */
static void write_model(struct td_disk *disk, char *model, uint64_t off, const char *buf, size_t len)
{
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, off / 512, (uint32_t)(len / 512), (char *)buf, NULL), 0);
	memcpy(model + off, buf, len);
}

static struct td_disk *open_disk(const char *path, unsigned flags)
{
	char spec[PATH_MAX + 8];
	struct td_disk *disk = NULL;
	int r;

	snprintf(spec, sizeof(spec), "vhd:%s", path);
	r = td_disk_open(&disk, spec, flags, loop, io);
	ck_assert_msg(r == 0, "open %s: %s", spec, tdr_last_error());
	return disk;
}

static void lib_check(const char *path)
{
	struct vhd_error err;

	ck_assert_msg(vhd_file_check(path, VHD_FILE_CHAIN, &err) == 0, "%s", err.msg);
}

static void lib_read_all(const char *path, char *buf, uint64_t size)
{
	struct vhd_error err;
	struct vhd_file *vf;

	ck_assert_msg(vhd_file_open(&vf, path, VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err) == 0, "%s",
		      err.msg);
	ck_assert_int_eq(vhd_file_read(vf, 0, (uint32_t)(size / 512), buf), 0);
	vhd_file_close(vf);
}

/* The file passes check and reads back exactly want (size bytes; back is scratch). */
static void expect_file(const char *path, char *back, const char *want, uint64_t size)
{
	lib_check(path);
	lib_read_all(path, back, size);
	ck_assert_msg(memcmp(back, want, size) == 0, "%s differs from the model", path);
}

static void read_all(struct td_disk *disk, char *buf, uint64_t size)
{
	/* in 1 MiB pieces, all in flight at once */
	struct td_request reqs[64];
	struct waiter w = { 0, 0, 0 };
	uint64_t n = size / MIB;

	ck_assert_uint_le(n, 64);
	for (uint64_t i = 0; i < n; i++) {
		td_request_init(&reqs[i], TD_OP_READ, i * (MIB / 512), MIB / 512, buf + i * MIB,
				req_done, &w);
		w.pending++;
		td_disk_submit(disk, &reqs[i]);
	}
	wait_all(&w);
	ck_assert_int_eq(w.errors, 0);
}

static uint64_t fsize(const char *p)
{
	struct stat st;

	ck_assert_int_eq(stat(p, &st), 0);
	return (uint64_t)st.st_size;
}

/* ------------------------------------------------------------------ */

/* Many writes in flight at once, disjoint, several per unallocated block. */
START_TEST(parallel_random_io)
{
	const uint64_t size = 24 * MIB, secs = size / 512;
	struct vhd_error err;
	char *model = calloc(1, size), *back = abuf(size), *data = abuf(size);
	struct td_request *reqs = calloc(512, sizeof(*reqs));
	struct td_disk *disk;
	struct waiter w = { 0, 0, 0 };
	unsigned round, nreq = 0;
	struct vhd_file *vf;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pa, 0);
	fill_random(data, size, 77);
	for (round = 0; round < 4; round++) {
		/* disjoint chunks of 64 sectors at random-ish places in a round */
		w.pending = 0;
		nreq = 0;
		for (uint64_t chunk = round; chunk < secs / 64; chunk += 4) {
			unsigned seed = (unsigned)(chunk * 31 + round * 7);
			uint32_t off = seed % 32, n = 1 + (seed * 13) % 32;
			uint64_t sec = chunk * 64 + off;

			if ((seed % 3) == 0)
				continue;
			fill_random(data + sec * 512, (size_t)n * 512, seed + round);
			memcpy(model + sec * 512, data + sec * 512, (size_t)n * 512);
			td_request_init(&reqs[nreq], TD_OP_WRITE, sec, n, data + sec * 512, req_done, &w);
			w.pending++;
			td_disk_submit(disk, &reqs[nreq++]);
		}
		wait_all(&w);
		ck_assert_int_eq(w.errors, 0);
	}
	/* a write across three blocks */
	fill_random(data + (2 * MIB - 4096), 4 * MIB + 8192, 5);
	memcpy(model + (2 * MIB - 4096), data + (2 * MIB - 4096), 4 * MIB + 8192);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, (2 * MIB - 4096) / 512, (4 * MIB + 8192) / 512,
				 data + (2 * MIB - 4096), NULL), 0);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	ck_assert_int_eq(run_req(disk, TD_OP_FLUSH, 0, 0, NULL, NULL), 0);
	td_disk_close(disk);

	expect_file(pa, back, model, size);
	ck_assert_int_eq(vhd_file_open(&vf, pa, VHD_FILE_RDONLY, &err), 0);
	ck_assert_uint_eq(vf->m.allocated, 12);
	vhd_file_close(vf);
	/* reopen and read through the driver */
	disk = open_disk(pa, TD_OPEN_RDONLY);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 0, 1, data, NULL), -EPERM);
	td_disk_close(disk);
	free(model);
	free(reqs);
	free(back);
	free(data);
}
END_TEST

/* Sixteen writes to one unallocated block at once allocate it once. */
/* The driver's stats line "key=N" of the top image. */
static unsigned long long image_stat(struct td_disk *disk, const char *key)
{
	char *text = NULL, *p;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);
	unsigned long long v = ~0ull;

	disk->top->drv->stats(disk->top, f);
	fclose(f);
	p = strstr(text, key);
	if (p)
		v = strtoull(p + strlen(key) + 1, NULL, 10);
	free(text);
	return v;
}

START_TEST(concurrent_alloc_same_block)
{
	const uint64_t size = 4 * MIB;
	struct vhd_error err;
	struct td_request reqs[16];
	struct waiter w = { 0, 0, 0 };
	char *data = abuf(16 * 8 * 512), *back = abuf(size), *model = calloc(1, size);
	struct td_disk *disk;
	struct vhd_file *vf;
	uint64_t before;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	before = fsize(pa);
	disk = open_disk(pa, 0);
	fill_random(data, 16 * 8 * 512, 3);
	for (int i = 0; i < 16; i++) {
		uint64_t sec = 4096 + (uint64_t)i * 100;

		memcpy(model + sec * 512, data + i * 8 * 512, 8 * 512);
		td_request_init(&reqs[i], TD_OP_WRITE, sec, 8, data + i * 8 * 512, req_done, &w);
		w.pending++;
		td_disk_submit(disk, &reqs[i]);
	}
	wait_all(&w);
	ck_assert_int_eq(w.errors, 0);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	/* One allocation; the 15 other writes joined it. */
	ck_assert_uint_eq(image_stat(disk, "    allocations"), 1);
	ck_assert_uint_eq(image_stat(disk, "joined_allocations"), 15);
	td_disk_close(disk);
	ck_assert_int_eq(vhd_file_open(&vf, pa, VHD_FILE_RDONLY, &err), 0);
	ck_assert_uint_eq(vf->m.allocated, 1);
	vhd_file_close(vf);
	/* The file grew by whole footer steps, never by a block per write. */
	ck_assert_uint_gt(fsize(pa), before);
	lib_check(pa);
	free(model);
	free(data);
	free(back);
}
END_TEST

static void sha_like(const char *path, unsigned long *sum, uint64_t *size)
{
	FILE *f = fopen(path, "rb");
	int c;
	unsigned long h = 5381;

	ck_assert_ptr_nonnull(f);
	*size = 0;
	while ((c = fgetc(f)) != EOF) {
		h = h * 33 + (unsigned)c;
		(*size)++;
	}
	fclose(f);
	*sum = h;
}

/* a <- b <- c like secondary <- hidden <- active */
static void build_chain(char *model, uint64_t size)
{
	struct vhd_error err;
	struct vhd_file *vf;
	const char *files[3] = { pa, pb, pc };
	char *data = malloc(256 * 512);

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	for (int level = 0; level < 3; level++) {
		if (level)
			ck_assert_int_eq(vhd_file_snapshot(files[level], files[level - 1], &err), 0);
		ck_assert_int_eq(vhd_file_open(&vf, files[level], VHD_FILE_CHAIN, &err), 0);
		for (unsigned i = 0; i < 30; i++) {
			unsigned seed = level * 1000 + i + 1;
			uint64_t sec = (seed * 2654435761u) % (size / 512 - 256);
			uint32_t n = 1 + seed % 256;

			fill_random(data, (size_t)n * 512, seed);
			memcpy(model + sec * 512, data, (size_t)n * 512);
			ck_assert_int_eq(vhd_file_write(vf, sec, n, data), 0);
		}
		vhd_file_close(vf);
	}
	free(data);
}

START_TEST(chain_three_deep)
{
	const uint64_t size = 8 * MIB;
	char *model = calloc(1, size), *back = abuf(size), *data = abuf(MIB);
	unsigned long ha, hb, ha2, hb2;
	uint64_t sa, sb, sa2, sb2;
	struct td_disk *disk;

	build_chain(model, size);
	sha_like(pa, &ha, &sa);
	sha_like(pb, &hb, &sb);
	disk = open_disk(pc, 0);
	ck_assert_ptr_nonnull(disk->top->parent);
	ck_assert_ptr_nonnull(disk->top->parent->parent);
	ck_assert_ptr_eq(disk->bottom, disk->top->parent->parent);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	/* writes land in the leaf */
	for (int i = 0; i < 8; i++) {
		uint64_t sec = (uint64_t)i * 2000 + 11;

		fill_random(data, 64 * 512, 900 + i);
		memcpy(model + sec * 512, data, 64 * 512);
		ck_assert_int_eq(run_req(disk, TD_OP_WRITE, sec, 64, data, NULL), 0);
	}
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	sha_like(pa, &ha2, &sa2);
	sha_like(pb, &hb2, &sb2);
	ck_assert_uint_eq(ha, ha2);
	ck_assert_uint_eq(hb, hb2);
	ck_assert_uint_eq(sa, sa2);
	ck_assert_uint_eq(sb, sb2);
	expect_file(pc, back, model, size);
	free(model);
	free(back);
	free(data);
}
END_TEST

START_TEST(block_status)
{
	const uint64_t size = 8 * MIB;
	struct vhd_error err;
	struct vhd_file *vf;
	char data[4096];
	struct td_disk *disk;
	struct td_request r;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_open(&vf, pa, 0, &err), 0);
	memset(data, 1, sizeof(data));
	ck_assert_int_eq(vhd_file_write(vf, 4096 + 8, 8, data), 0);	/* block 1 */
	vhd_file_close(vf);
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);
	ck_assert_int_eq(vhd_file_open(&vf, pb, 0, &err), 0);
	ck_assert_int_eq(vhd_file_write(vf, 3 * 4096, 4, data), 0);	/* block 3 */
	vhd_file_close(vf);

	disk = open_disk(pb, 0);
	/* blocks 0..2 unallocated in b: a's answer; block 0 is a hole in a */
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 0, 16384, NULL, &r), 0);
	ck_assert_uint_eq(r.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_uint_eq(r.bs_secs, 4096);
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 4096, 4096, NULL, &r), 0);
	ck_assert_uint_eq(r.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_uint_eq(r.bs_secs, 8);
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 4096 + 8, 100, NULL, &r), 0);
	ck_assert_uint_eq(r.bs_flags, 0);
	ck_assert_uint_eq(r.bs_secs, 8);
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 3 * 4096, 4096, NULL, &r), 0);
	ck_assert_uint_eq(r.bs_flags, 0);
	ck_assert_uint_eq(r.bs_secs, 4);
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 3 * 4096 + 4, 4092, NULL, &r), 0);
	ck_assert_uint_eq(r.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_uint_eq(r.bs_secs, 4092);
	td_disk_close(disk);
}
END_TEST

struct block_list {
	uint64_t sec[8], secs[8];
	unsigned n, stop_after;
};

static int list_block(void *arg, uint64_t sec, uint64_t secs)
{
	struct block_list *l = arg;

	ck_assert_uint_lt(l->n, 8);
	l->sec[l->n] = sec;
	l->secs[l->n] = secs;
	return ++l->n == l->stop_after ? -EINTR : 0;
}

/*
 * vhd_image_for_each_block lists the blocks of one image, not of its chain,
 * in order, the last one clipped at the end of the disk; fn's non-zero
 * return stops it; an image of another driver is refused.
 */
START_TEST(for_each_block)
{
	const uint64_t size = 5 * MIB;	/* blocks 0, 1 and a 1 MiB block 2 */
	struct block_list l = { .n = 0 };
	struct vhd_error err;
	struct vhd_file *vf;
	char *data = abuf(4096), spec[PATH_MAX + 8];
	struct td_disk *disk;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_open(&vf, pa, 0, &err), 0);
	memset(data, 1, 4096);
	ck_assert_int_eq(vhd_file_write(vf, 4096 + 8, 8, data), 0);	/* block 1 */
	vhd_file_close(vf);
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);

	disk = open_disk(pb, 0);
	ck_assert_int_eq(vhd_image_for_each_block(disk->top, list_block, &l), 0);
	ck_assert_uint_eq(l.n, 0);	/* block 1 is the parent's */
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 2 * 4096 + 16, 8, data, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 8, 8, data, NULL), 0);
	ck_assert_int_eq(vhd_image_for_each_block(disk->top, list_block, &l), 0);
	ck_assert_uint_eq(l.n, 2);
	ck_assert_uint_eq(l.sec[0], 0);
	ck_assert_uint_eq(l.secs[0], 4096);
	ck_assert_uint_eq(l.sec[1], 2 * 4096);
	ck_assert_uint_eq(l.secs[1], 2048);
	ck_assert_int_eq(vhd_image_for_each_block(disk->bottom, list_block, &(struct block_list){ .n = 0 }), 0);
	l.n = 0;
	l.stop_after = 1;
	ck_assert_int_eq(vhd_image_for_each_block(disk->top, list_block, &l), -EINTR);
	ck_assert_uint_eq(l.n, 1);
	td_disk_close(disk);

	snprintf(spec, sizeof(spec), "aio:%s", pa);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_int_eq(vhd_image_for_each_block(disk->top, list_block, &l), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "only dynamic and differencing"));
	td_disk_close(disk);
	free(data);
}
END_TEST

struct run_wait {
	struct block_list l;
	bool done;
	int err;
};

static int list_run(void *arg, uint64_t sec, uint64_t secs)
{
	return list_block(&((struct run_wait *)arg)->l, sec, secs);
}

static void runs_done(void *arg, int err)
{
	struct run_wait *w = arg;

	ck_assert(!w->done);
	w->done = true;
	w->err = err;
}

/* Lists img's runs into w (sorted by sector) and returns done's error. */
static int list_runs(struct td_image *img, struct run_wait *w)
{
	vhd_image_for_each_run(img, list_run, runs_done, w);
	for (int i = 0; i < 100000 && !w->done; i++)
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	ck_assert(w->done);
	for (unsigned i = 1; i < w->l.n; i++)
		for (unsigned j = i; j > 0 && w->l.sec[j - 1] > w->l.sec[j]; j--) {
			uint64_t t = w->l.sec[j];

			w->l.sec[j] = w->l.sec[j - 1];
			w->l.sec[j - 1] = t;
			t = w->l.secs[j];
			w->l.secs[j] = w->l.secs[j - 1];
			w->l.secs[j - 1] = t;
		}
	return w->err;
}

/*
 * vhd_image_for_each_run: a differencing image's runs are its bitmaps' set
 * bits, a dynamic image's its whole blocks; fn's error ends it; another
 * driver's image is refused at once.
 */
START_TEST(for_each_run)
{
	const uint64_t size = 5 * MIB;
	struct vhd_error err;
	char *data = abuf(64 * 512), spec[PATH_MAX + 8];
	struct td_disk *disk;
	struct run_wait w = { .l = { .n = 0 } };

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);
	memset(data, 7, 64 * 512);
	disk = open_disk(pb, 0);
	ck_assert_int_eq(list_runs(disk->top, &w), 0);
	ck_assert_uint_eq(w.l.n, 0);
	/* Two runs in block 0 (the second ends at the block's end), one in block 2. */
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 16, 8, data, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 4096 - 64, 64, data, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 2 * 4096 + 1000, 24, data, NULL), 0);
	memset(&w, 0, sizeof(w));
	ck_assert_int_eq(list_runs(disk->top, &w), 0);
	ck_assert_uint_eq(w.l.n, 3);
	ck_assert_uint_eq(w.l.sec[0], 16);
	ck_assert_uint_eq(w.l.secs[0], 8);
	ck_assert_uint_eq(w.l.sec[1], 4096 - 64);
	ck_assert_uint_eq(w.l.secs[1], 64);
	ck_assert_uint_eq(w.l.sec[2], 2 * 4096 + 1000);
	ck_assert_uint_eq(w.l.secs[2], 24);
	/* fn's error ends the listing and is done's. */
	memset(&w, 0, sizeof(w));
	w.l.stop_after = 1;
	ck_assert_int_eq(list_runs(disk->top, &w), -EINTR);
	/* The parent, dynamic: its whole allocated blocks (none here). */
	memset(&w, 0, sizeof(w));
	ck_assert_int_eq(list_runs(disk->bottom, &w), 0);
	ck_assert_uint_eq(w.l.n, 0);
	td_disk_close(disk);

	disk = open_disk(pa, 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 2 * 4096 + 8, 8, data, NULL), 0);
	memset(&w, 0, sizeof(w));
	ck_assert_int_eq(list_runs(disk->top, &w), 0);
	ck_assert_uint_eq(w.l.n, 1);
	ck_assert_uint_eq(w.l.sec[0], 2 * 4096);
	ck_assert_uint_eq(w.l.secs[0], 2048);
	td_disk_close(disk);

	snprintf(spec, sizeof(spec), "aio:%s", pa);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	memset(&w, 0, sizeof(w));
	vhd_image_for_each_run(disk->top, list_run, runs_done, &w);
	ck_assert(w.done);
	ck_assert_int_eq(w.err, -EINVAL);
	td_disk_close(disk);
	free(data);
}
END_TEST

static bool op_done;
static int op_err;
static uint64_t prog_calls, prog_last, prog_total;

static void on_done(void *arg, int err)
{
	(void)arg;
	op_done = true;
	op_err = err;
}

static void on_progress(void *arg, uint64_t done, uint64_t total)
{
	(void)arg;
	prog_calls++;
	prog_last = done;
	prog_total = total;
}

static void drain_cb(struct td_disk *disk, void *arg)
{
	(void)disk;
	*(bool *)arg = true;
}

static void drain(struct td_disk *disk)
{
	struct td_drain_waiter dw;
	bool drained = false;

	dw.cb = drain_cb;
	dw.arg = &drained;
	td_disk_drain(disk, &dw);
	while (!drained)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
}

/* Until the images' own work is done too (a footer moved ahead of need). */
static void settle(struct td_disk *disk)
{
	while (td_disk_busy(disk, NULL))
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
}

static void flag_done(struct td_request *req, int err, void *arg)
{
	ck_assert_int_eq(err, 0);
	*(bool *)arg = true;
}

struct reuse_ctx {
	struct td_disk *disk;
	struct td_request req;
	char *data;
	bool wdone;
	int err;
};

/* make-empty's done: the cleared BAT's sync cannot have completed yet. */
static void empty_then_write(void *arg, int err)
{
	struct reuse_ctx *c = arg;

	c->err = err;
	td_request_init(&c->req, TD_OP_WRITE, 4096, 2048, c->data, flag_done, &c->wdone);
	td_disk_submit(c->disk, &c->req);
}

/*
 * Right after make-empty the cleared BAT's sync is still in flight: a write
 * that allocates into the reused space waits for it, then lands there.
 */
START_TEST(make_empty_then_allocate_waits_for_sync)
{
	const uint64_t size = 8 * MIB;
	char *model = calloc(1, size), *back = abuf(size), *data = abuf(MIB), *base = calloc(1, size);
	struct td_disk *disk;
	uint64_t full;

	build_chain(model, size);
	lib_read_all(pb, base, size);
	disk = open_disk(pc, 0);
	fill_random(data, MIB, 5);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 0, 2048, data, NULL), 0);
	settle(disk);
	full = fsize(pc);
	fill_random(data, MIB, 6);
	struct reuse_ctx c = { .disk = disk, .data = data, .err = 1 };

	vhd_image_make_empty(disk->top, empty_then_write, &c);
	while (!c.wdone)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_int_eq(c.err, 0);
	ck_assert_uint_eq(image_stat(disk, "reuse_waits"), 1);
	memcpy(base + 4096 * 512, data, MIB);
	read_all(disk, back, size);
	ck_assert(memcmp(back, base, size) == 0);
	ck_assert_uint_eq(fsize(pc), full);
	td_disk_close(disk);
	expect_file(pc, back, base, size);
	free(model);
	free(back);
	free(data);
	free(base);
}
END_TEST

/* First touches of many blocks cost what they write, not whole blocks. */
START_TEST(first_touch_stays_sparse)
{
	const uint64_t size = 256 * MIB;
	char *data = abuf(4096);
	struct td_disk *disk;
	struct vhd_error err;
	struct stat st;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pa, 0);
	fill_random(data, 4096, 9);
	for (int b = 0; b < 64; b++)
		ck_assert_int_eq(run_req(disk, TD_OP_WRITE, (uint64_t)b * 4096 + 8, 8, data, NULL), 0);
	ck_assert_uint_eq(image_stat(disk, "    allocations"), 64);
	td_disk_close(disk);
	ck_assert_int_eq(stat(pa, &st), 0);
	/* 64 blocks of 2 MiB allocated; 64 x (4 KiB + bitmap) written: far below 128 MiB. */
	ck_assert_int_lt((long long)st.st_blocks * 512, 8 * (long long)MIB);
	lib_check(pa);
	free(data);
}
END_TEST

/*
 * A new block's bitmap is written with the padding page in front of it, so
 * that the write stays 4 KiB aligned: the padding must read as zeroes and
 * the block before it must keep its last sectors.
 */
START_TEST(bitmap_page_keeps_neighbours)
{
	const uint64_t size = 64 * MIB, bs = 2 * MIB;
	char *full = abuf(bs), *data = abuf(4096), *model = abuf(size), *back = abuf(size);
	char *page = abuf(4096);
	struct td_disk *disk;
	struct vhd_error err;
	struct vhd_file *vf;
	uint64_t prev_end = 0;
	int fd;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	memset(model, 0, size);
	disk = open_disk(pa, 0);
	fill_random(full, bs, 21);
	fill_random(data, 4096, 22);
	/* blocks 0, 3 and 5 in this order, each written in full or in part */
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 0, (uint32_t)(bs / 512), full, NULL), 0);
	memcpy(model, full, bs);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 3 * bs / 512 + 16, 8, data, NULL), 0);
	memcpy(model + 3 * bs + 16 * 512, data, 4096);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 5 * bs / 512, (uint32_t)(bs / 512), full, NULL), 0);
	memcpy(model + 5 * bs, full, bs);
	td_disk_close(disk);

	expect_file(pa, back, model, size);

	ck_assert_int_eq(vhd_file_open(&vf, pa, VHD_FILE_RDONLY, &err), 0);
	fd = open(pa, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	for (uint32_t b = 0; b < 6; b++) {
		uint64_t bm = (uint64_t)vf->m.bat[b] * 512;

		if (b != 0 && b != 3 && b != 5) {
			ck_assert_uint_eq(vf->m.bat[b], VHD_BAT_UNUSED);
			continue;
		}
		/* data 4 KiB aligned, bitmap just below it */
		ck_assert_uint_eq((bm + 512) % 4096, 0);
		if (prev_end) {
			/* the page under the bitmap is padding after the previous block */
			ck_assert_uint_ge(bm - 3584, prev_end);
			ck_assert_int_eq(pread(fd, page, 4096, (off_t)(bm - 3584)), 4096);
			for (int i = 0; i < 3584; i++)
				ck_assert_int_eq(page[i], 0);
		}
		prev_end = bm + 512 + bs;
	}
	close(fd);
	vhd_file_close(vf);
	free(full);
	free(data);
	free(model);
	free(back);
	free(page);
}
END_TEST

/*
 * Reads a dynamic VHD as qemu's vpc driver does: an allocated block's whole
 * data area, whatever its bitmap says; an unallocated block as zeroes.
 */
static void read_ignoring_bitmaps(const char *path, char *buf, uint64_t size)
{
	struct vhd_error err;
	struct vhd_file *vf;
	uint64_t bs;
	int fd;

	ck_assert_int_eq(vhd_file_open(&vf, path, VHD_FILE_RDONLY, &err), 0);
	ck_assert_int_eq(vf->m.footer.type, VHD_TYPE_DYNAMIC);
	bs = vf->m.header.block_size;
	fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	memset(buf, 0, size);
	for (uint32_t b = 0; b < vf->m.bat_entries && (uint64_t)b * bs < size; b++) {
		uint64_t off = ((uint64_t)vf->m.bat[b] + vf->m.bm_secs) * 512;

		if (vf->m.bat[b] == VHD_BAT_UNUSED)
			continue;
		ck_assert_int_eq(pread(fd, buf + (uint64_t)b * bs, bs, (off_t)off), (ssize_t)bs);
	}
	close(fd);
	vhd_file_close(vf);
}

/* The first byte where two buffers differ, or -1. */
static long long first_diff(const char *a, const char *b, uint64_t len)
{
	for (uint64_t i = 0; i < len; i++)
		if (a[i] != b[i])
			return (long long)i;
	return -1;
}

/* A bitmap-blind reader sees want, and the scrub finds nothing to zero. */
static void expect_bitmap_blind(const char *path, char *back, const char *want, uint64_t size)
{
	struct vhd_error err;
	struct vhd_scrub sc;
	struct vhd_file *vf;
	long long d;

	read_ignoring_bitmaps(path, back, size);
	d = first_diff(back, want, size);
	ck_assert_msg(d < 0, "bitmap-blind read differs at byte %lld", d);
	ck_assert_int_eq(vhd_file_open(&vf, path, VHD_FILE_RDONLY, &err), 0);
	ck_assert_int_eq(vhd_file_scrub(vf, false, &sc, NULL, NULL, &err), 0);
	ck_assert_uint_eq(sc.stale_sectors, 0);
	vhd_file_close(vf);
}

/* A closed file ends with its footer just past its last block. */
static void expect_trimmed(const char *path)
{
	struct vhd_error err;
	struct vhd_file *vf;
	uint64_t end;

	ck_assert_int_eq(vhd_file_open(&vf, path, VHD_FILE_RDONLY, &err), 0);
	end = (vf->m.data_end + 511) & ~511ull;
	ck_assert_uint_eq(vf->m.footer_off, end);
	ck_assert_uint_eq(fsize(path), end + 512);
	vhd_file_close(vf);
}

/*
 * Writes 4 KiB at 4 KiB into each of the first nblocks 2 MiB blocks of the
 * dynamic disk at path (size bytes), each with its own data; checks that
 * the footer moved at least min_moves times and, unless max_len is 0, that
 * the open file is at most max_len bytes long; then the closed file:
 * valid, trimmed, our read, and a bitmap-blind read.
 */
static void first_touches_then_check(const char *path, uint64_t size, unsigned nblocks,
				     unsigned min_moves, uint64_t max_len)
{
	const uint64_t bs = 2 * MIB;
	char *data = abuf(4096), *model = calloc(1, size), *back = abuf(size);
	struct td_disk *disk;

	ck_assert_ptr_nonnull(model);
	disk = open_disk(path, 0);
	for (unsigned b = 0; b < nblocks; b++) {
		fill_random(data, 4096, 100 + b);
		write_model(disk, model, b * bs + 4096, data, 4096);
	}
	settle(disk);
	ck_assert_uint_ge(image_stat(disk, "footer_writes"), min_moves);
	if (max_len)
		ck_assert_uint_le(fsize(path), max_len);
	td_disk_close(disk);
	lib_check(path);
	expect_trimmed(path);
	expect_file(path, back, model, size);
	expect_bitmap_blind(path, back, model, size);
	free(data);
	free(model);
	free(back);
}

/*
 * The footer moves when the file must grow, and later blocks are placed
 * where it was: its old copy must not be left in their data area (under
 * clear bits), where qemu's vpc driver would read it as the guest's data.
 * First touches of 100 blocks (about 200 MiB of file space, over the old
 * footer's place), 4 KiB each, then the file read bitmap-blind, and its
 * length trimmed back at close.
 */
START_TEST(moved_footer_leaves_no_trace)
{
	struct vhd_error err;

	ck_assert_int_eq(vhd_file_create(pa, 256 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	first_touches_then_check(pa, 256 * MIB, 100, 1, 0);
}
END_TEST

/*
 * The first allocation moves the footer past every block the disk can
 * hold, once: while open, the file is as long as the disk can get (holes),
 * and no later allocation moves it again.  A clean close trims the file
 * to its last block; a reopen moves the footer out again, and the next
 * close trims again.  A read-only open changes nothing.
 */
START_TEST(footer_at_limit_then_trimmed)
{
	const uint64_t size = 256 * MIB, bs = 2 * MIB;
	char *data = abuf(4096), *model = calloc(1, size), *back = abuf(size);
	struct vhd_error err;
	struct td_disk *disk;
	uint64_t len;

	ck_assert_ptr_nonnull(model);
	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	for (unsigned open_no = 0; open_no < 2; open_no++) {
		disk = open_disk(pa, 0);
		for (unsigned b = open_no * 40; b < open_no * 40 + 10; b++) {
			fill_random(data, 4096, 300 + b);
			write_model(disk, model, b * bs + 8192, data, 4096);
		}
		settle(disk);
		ck_assert_uint_eq(image_stat(disk, "footer_writes"), 1);
		/* 128 blocks of 2 MiB with their bitmaps, and little more. */
		ck_assert_uint_gt(fsize(pa), size);
		ck_assert_uint_lt(fsize(pa), size + 4 * MIB);
		td_disk_close(disk);
		expect_trimmed(pa);
		ck_assert_uint_lt(fsize(pa), (open_no * 40 + 11) * bs);
		expect_file(pa, back, model, size);
		expect_bitmap_blind(pa, back, model, size);
	}
	len = fsize(pa);
	disk = open_disk(pa, TD_OPEN_RDONLY);
	for (uint64_t off = 0; off < size; off += 16 * MIB)
		ck_assert_int_eq(run_req(disk, TD_OP_READ, off / 512, 16 * MIB / 512, back + off, NULL), 0);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	ck_assert_uint_eq(fsize(pa), len);
	free(data);
	free(model);
	free(back);
}
END_TEST

static void make_empty_now(struct td_disk *disk)
{
	drain(disk);
	op_done = false;
	vhd_image_make_empty(disk->top, on_done, NULL);
	while (!op_done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_int_eq(op_err, 0);
}

/* Fills blocks 0-2 of a fresh dynamic disk with data, then empties it. */
static struct td_disk *three_blocks_then_empty(void)
{
	const uint64_t bs = 2 * MIB;
	char *full = abuf(bs);
	struct td_disk *disk;
	struct vhd_error err;

	ck_assert_int_eq(vhd_file_create(pa, 16 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pa, 0);
	fill_random(full, bs, 31);
	for (unsigned b = 0; b < 3; b++)
		ck_assert_int_eq(run_req(disk, TD_OP_WRITE, b * bs / 512, (uint32_t)(bs / 512), full, NULL), 0);
	make_empty_now(disk);
	free(full);
	return disk;
}

/* 4 KiB at 8 KiB into blocks [from, to): new blocks, in the reused space. */
static void partial_writes(struct td_disk *disk, char *model, unsigned from, unsigned to)
{
	const uint64_t bs = 2 * MIB;
	char *data = abuf(4096);

	fill_random(data, 4096, 32 + from);
	for (unsigned b = from; b < to; b++)
		write_model(disk, model, b * bs + 8192, data, 4096);
	free(data);
}

/*
 * After an online make-empty of a dynamic disk, new blocks reuse the space
 * of the old ones: what a partial write leaves of the block must read as
 * zeroes for a bitmap-blind reader too, not as the old block's data.
 */
START_TEST(dynamic_reuse_hides_old_data)
{
	const uint64_t size = 16 * MIB, bs = 2 * MIB;
	char *data = abuf(4096), *model = calloc(1, size), *back = abuf(size);
	struct td_disk *disk;

	ck_assert_ptr_nonnull(model);
	disk = three_blocks_then_empty();
	partial_writes(disk, model, 5, 8);
	/* and a later write into one of them, through its bitmap */
	fill_random(data, 4096, 33);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, (6 * bs + MIB) / 512, 8, data, NULL), 0);
	memcpy(model + 6 * bs + MIB, data, 4096);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	lib_check(pa);
	expect_bitmap_blind(pa, back, model, size);
	free(data);
	free(model);
	free(back);
}
END_TEST

/*
 * The same across processes: a file emptied online keeps its length and
 * its old blocks' data.  Reopened and made empty again, with no block to
 * drop this time, its new blocks still land on the old data and must still
 * be zero-filled.
 */
START_TEST(dynamic_reuse_after_reopen)
{
	const uint64_t size = 16 * MIB;
	char *model = calloc(1, size), *back = abuf(size);
	struct td_disk *disk;

	ck_assert_ptr_nonnull(model);
	td_disk_close(three_blocks_then_empty());
	disk = open_disk(pa, 0);
	make_empty_now(disk);
	partial_writes(disk, model, 4, 7);
	td_disk_close(disk);
	lib_check(pa);
	expect_bitmap_blind(pa, back, model, size);
	free(model);
	free(back);
}
END_TEST

/*
 * A differencing disk pb over a dynamic pa whose first four blocks hold
 * 0x5A everywhere; model gets pa's content (size bytes).
 */
static void diff_over_pattern(char *model, uint64_t size)
{
	struct vhd_error err;
	struct vhd_file *vf;
	char *data = abuf(2 * MIB);

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_open(&vf, pa, 0, &err), 0);
	memset(data, 0x5A, 2 * MIB);
	for (uint64_t b = 0; b < 4; b++) {
		ck_assert_int_eq(vhd_file_write(vf, b * 2 * MIB / 512, (uint32_t)(2 * MIB / 512), data), 0);
		memcpy(model + b * 2 * MIB, data, 2 * MIB);
	}
	vhd_file_close(vf);
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);
	free(data);
}

/*
 * Checks that disk elided exactly elided zero writes and reads model
 * (size bytes), closes it, and checks its file: valid, the same content
 * through the library and, with blind, for a bitmap-blind reader.
 */
static void elided_then_close(struct td_disk *disk, const char *path, unsigned long long elided,
			      const char *model, char *back, uint64_t size, bool blind)
{
	ck_assert_uint_eq(image_stat(disk, "zero_writes_elided"), elided);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	expect_file(path, back, model, size);
	if (blind)
		expect_bitmap_blind(path, back, model, size);
}

/*
 * Zeroes written into a new block in never-written space are not written:
 * the file's hole reads as zeroes, and the block's bitmap bits (set) make
 * them hide the parent's data.  Pieces with any data, and writes into
 * blocks already allocated, are written as usual.
 */
START_TEST(zero_writes_into_fresh_blocks)
{
	const uint64_t size = 16 * MIB, bs = 2 * MIB;
	char *zero = abuf(64 * 1024), *mixed = abuf(64 * 1024);
	char *model = calloc(1, size), *back = abuf(size);
	struct td_disk *disk;
	struct vhd_error err;

	ck_assert_ptr_nonnull(model);
	memset(zero, 0, 64 * 1024);
	memset(mixed, 0, 64 * 1024);
	fill_random(mixed, 4096, 41);
	diff_over_pattern(model, size);
	disk = open_disk(pb, 0);
	write_model(disk, model, 1 * bs + 128 * 1024, zero, 64 * 1024);	/* elided */
	write_model(disk, model, 2 * bs + 64 * 1024, mixed, 64 * 1024);	/* written */
	write_model(disk, model, 1 * bs + 512 * 1024, zero, 64 * 1024);	/* allocated: written */
	write_model(disk, model, 5 * bs, zero, 64 * 1024);			/* elided, over zeroes */
	ck_assert_uint_eq(image_stat(disk, "allocated_blocks"), 3);
	elided_then_close(disk, pb, 2, model, back, size, false);

	/* A dynamic disk: the same, and bitmap-blind readers see zeroes too. */
	memset(model, 0, size);
	ck_assert_int_eq(vhd_file_create(pc, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pc, 0);
	write_model(disk, model, 3 * bs + 4096, zero, 64 * 1024);
	write_model(disk, model, 4 * bs + 4096, mixed, 64 * 1024);
	elided_then_close(disk, pc, 1, model, back, size, true);
	free(zero);
	free(mixed);
	free(model);
	free(back);
}
END_TEST

/*
 * After an online make-empty, new blocks land on old blocks' data: zeroes
 * written there must be written (an elided write would show the old data,
 * or for a bitmap-blind reader of a dynamic disk, too).
 */
START_TEST(zero_writes_into_reused_space)
{
	const uint64_t size = 16 * MIB, bs = 2 * MIB;
	char *zero = abuf(64 * 1024), *full = abuf(bs);
	char *model = calloc(1, size), *back = abuf(size);
	struct td_disk *disk;

	ck_assert_ptr_nonnull(model);
	memset(zero, 0, 64 * 1024);
	diff_over_pattern(model, size);
	disk = open_disk(pb, 0);
	fill_random(full, bs, 42);
	for (unsigned b = 4; b < 7; b++)
		ck_assert_int_eq(run_req(disk, TD_OP_WRITE, b * bs / 512, (uint32_t)(bs / 512), full, NULL), 0);
	make_empty_now(disk);
	/* Placed where block 4's random data is, over the parent's 0x5A. */
	write_model(disk, model, 2 * bs, zero, 64 * 1024);
	write_model(disk, model, 7 * bs + 8192, zero, 64 * 1024);
	elided_then_close(disk, pb, 0, model, back, size, false);

	/* A dynamic disk emptied online (pa anew). */
	memset(model, 0, size);
	ck_assert_int_eq(unlink(pb), 0);
	ck_assert_int_eq(unlink(pa), 0);
	disk = three_blocks_then_empty();
	write_model(disk, model, 5 * bs + 4096, zero, 64 * 1024);
	elided_then_close(disk, pa, 0, model, back, size, true);
	free(zero);
	free(full);
	free(model);
	free(back);
}
END_TEST

/*
 * A file whose length is not a multiple of 512 (the footer then sits at an
 * unaligned offset; the format allows it): when the footer moves, the old
 * one is zeroed with whole-sector direct writes, and allocation goes on.
 */
START_TEST(unaligned_footer_moves)
{
	char foot[512], pad[100];
	struct vhd_error err;
	struct stat st;
	int fd;

	ck_assert_int_eq(vhd_file_create(pa, 256 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(stat(pa, &st), 0);
	fd = open(pa, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, foot, sizeof(foot), st.st_size - 512), 512);
	memset(pad, 0, sizeof(pad));
	ck_assert_int_eq(pwrite(fd, pad, sizeof(pad), st.st_size - 512), (ssize_t)sizeof(pad));
	ck_assert_int_eq(pwrite(fd, foot, sizeof(foot), st.st_size - 512 + 100), 512);
	close(fd);
	lib_check(pa);
	first_touches_then_check(pa, 256 * MIB, 100, 1, 0);
}
END_TEST

struct empty_in_cb {
	struct td_disk *disk;
	bool read_done;
	int read_err;
};

/* The read's completion empties the disk, as a checkpoint's drain may. */
static void read_then_empty(struct td_request *req, int err, void *arg)
{
	struct empty_in_cb *c = arg;

	(void)req;
	c->read_done = true;
	c->read_err = err;
	op_done = false;
	vhd_image_make_empty(c->disk->top, on_done, NULL);
}

/*
 * A read of clear sectors in an allocated block whose bitmap is not cached
 * completes inside the bitmap load's completion, which still holds the
 * bitmap.  A make-empty started from that read's callback drops every
 * cached bitmap: it must leave that one to its holder (ASan reported a use
 * after free in bm_put before), and the disk must then read as zeroes.
 */
START_TEST(make_empty_inside_a_read_completion)
{
	const uint64_t size = 8 * MIB;
	char *data = abuf(4096), *back = abuf(size), *zero = calloc(1, size);
	struct empty_in_cb c = { 0 };
	struct td_request req;
	struct vhd_error err;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	c.disk = open_disk(pa, 0);
	fill_random(data, 4096, 41);
	ck_assert_int_eq(run_req(c.disk, TD_OP_WRITE, 0, 8, data, NULL), 0);
	td_disk_close(c.disk);
	/* Reopened: block 0 is allocated, its bitmap not cached. */
	c.disk = open_disk(pa, 0);
	memset(back, 0xa5, 4096);
	td_request_init(&req, TD_OP_READ, 8, 8, back, read_then_empty, &c);
	td_disk_submit(c.disk, &req);
	while (!c.read_done || !op_done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_int_eq(c.read_err, 0);
	ck_assert_int_eq(op_err, 0);
	ck_assert(memcmp(back, zero, 4096) == 0);
	read_all(c.disk, back, size);
	ck_assert(memcmp(back, zero, size) == 0);
	td_disk_close(c.disk);
	expect_file(pa, back, zero, size);
	free(data);
	free(back);
	free(zero);
}
END_TEST

START_TEST(online_make_empty)
{
	const uint64_t size = 8 * MIB;
	char *model = calloc(1, size), *back = abuf(size), *data = abuf(MIB), *base = calloc(1, size);
	struct td_disk *disk;
	uint64_t full;

	build_chain(model, size);
	/* c's parent view = content of b's chain */
	lib_read_all(pb, base, size);
	disk = open_disk(pc, 0);
	fill_random(data, MIB, 4);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 100, 2048, data, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 9000, 2048, data, NULL), 0);
	settle(disk);
	full = fsize(pc);
	op_done = false;
	vhd_image_make_empty(disk->top, on_done, NULL);
	ck_assert(!op_done);
	while (!op_done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_int_eq(op_err, 0);
	/* The file keeps its length: no truncate at a checkpoint, the space is reused. */
	ck_assert_uint_eq(fsize(pc), full);
	read_all(disk, back, size);
	ck_assert(memcmp(back, base, size) == 0);
	/* and usable again, in the space it had: the file does not grow */
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 100, 2048, data, NULL), 0);
	memcpy(base + 100 * 512, data, MIB);
	read_all(disk, back, size);
	ck_assert(memcmp(back, base, size) == 0);
	ck_assert_uint_eq(fsize(pc), full);
	td_disk_close(disk);
	expect_file(pc, back, base, size);
	free(model);
	free(back);
	free(data);
	free(base);
}
END_TEST

START_TEST(online_commit)
{
	const uint64_t size = 8 * MIB;
	char *model = calloc(1, size), *back = abuf(size), *data = abuf(MIB);
	struct td_disk *disk;

	build_chain(model, size);
	disk = open_disk(pc, 0);
	fill_random(data, MIB, 8);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 5000, 2048, data, NULL), 0);
	memcpy(model + 5000 * 512, data, MIB);
	drain(disk);
	op_done = false;
	prog_calls = 0;
	vhd_image_commit(disk->top, on_progress, on_done, NULL);
	while (!op_done)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1000), 0);
	ck_assert_int_eq(op_err, 0);
	ck_assert_uint_gt(prog_calls, 0);
	ck_assert_uint_eq(prog_last, prog_total);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	/* b alone (over a) now reads c's content */
	expect_file(pb, back, model, size);
	/* and after make-empty of c through the library, c still reads the same */
	{
		struct vhd_error err;
		struct vhd_file *vf;

		ck_assert_int_eq(vhd_file_open(&vf, pc, VHD_FILE_CHAIN, &err), 0);
		ck_assert_int_eq(vhd_file_make_empty(vf, &err), 0);
		vhd_file_close(vf);
	}
	lib_read_all(pc, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	free(model);
	free(back);
	free(data);
}
END_TEST

/* ------------------------------------------------------------------ crash safety */

#define CRASH_WRITES 12

/*
 * Set by the reused-space series: besides the acknowledged writes, the
 * whole disk must read as the plan's data or zeroes (nothing older, from
 * before the make-empty), and a sector under a clear bit may hold only
 * zeroes or the data of a write the cut left unacknowledged (what
 * bitmap-blind readers such as qemu see).
 */
static bool crash_strict;
/* Set by the reused-space series: the child empties the disk first, so it reuses the space. */
static bool crash_empty_first;
/* Set by the scratch series: the child runs the plan in scratch mode. */
static bool crash_scratch;

struct cw {
	uint64_t sec;
	uint32_t secs;
	unsigned seed;
	bool pair;	/* submitted together with the next one */
};

/* Allocations, same-block concurrent allocation, bitmap updates, a diff disk. */
static const struct cw crash_plan[CRASH_WRITES] = {
	{ 10, 8, 1, false },		/* alloc block 0 */
	{ 4096 + 5, 3, 2, true },	/* two at once into block 1 */
	{ 4096 + 700, 16, 3, false },
	{ 30, 8, 4, false },		/* bitmap update in block 0 */
	{ 8192 + 1, 1, 5, true },	/* blocks 2 and 3 at once */
	{ 12288 + 2, 2, 6, false },
	{ 4096 + 100, 100, 7, false },	/* bitmap update block 1 */
	{ 2000, 300, 8, false },
	{ 14000, 64, 9, true },		/* block 3 bitmap + block 0 at once */
	{ 500, 64, 10, false },
	{ 16000, 8, 11, false },
	{ 3, 1, 12, false },
};

/* The plan a series runs: crash_plan, or one made by a test (at most CRASH_MAX_WRITES). */
#define CRASH_MAX_WRITES 64
static const struct cw *plan = crash_plan;
static int plan_len = CRASH_WRITES;

/* Child: runs the plan with a fault after n writes; reports acks on fd. */
static void crash_child(const char *path, enum tdr_io_fault_mode mode, uint64_t n, int fd)
{
	struct tdr_loop *l = tdr_loop_new();
	struct tdr_io_ctx *c = tdr_io_ctx_new(l, 64);
	struct td_disk *disk = NULL;
	char spec[PATH_MAX + 8];
	char *buf = tdr_io_alloc(512 * 512);

	loop = l;
	io = c;
	snprintf(spec, sizeof(spec), "vhd:%s", path);
	if (td_disk_open(&disk, spec, 0, l, c) < 0)
		_exit(3);
	/* A new process reuses the emptied space once it has made the disk empty itself. */
	if (crash_empty_first)
		make_empty_now(disk);
	if (crash_scratch && vhd_image_set_scratch(disk->top, true) < 0)
		_exit(6);
	if (mode != TDR_FAULT_NONE)
		tdr_io_set_fault(c, mode, n);
	for (int i = 0; i < plan_len; i++) {
		struct td_request r[2];
		struct waiter w[2] = { { 1, 0, 0 }, { 1, 0, 0 } };
		int k = plan[i].pair ? 2 : 1;

		for (int j = 0; j < k; j++) {
			const struct cw *p = &plan[i + j];

			fill_random(buf + j * 256 * 512, (size_t)p->secs * 512, p->seed);
			td_request_init(&r[j], TD_OP_WRITE, p->sec, p->secs, buf + j * 256 * 512,
					req_done, &w[j]);
			td_disk_submit(disk, &r[j]);
		}
		for (int j = 0; j < k; j++) {
			unsigned char idx = (unsigned char)(i + j);

			wait_all(&w[j]);
			if (!w[j].errors && write(fd, &idx, 1) != 1)
				_exit(4);
		}
		i += k - 1;
	}
	if (mode == TDR_FAULT_NONE) {
		uint64_t total = tdr_io_writes_done(c);

		if (write(fd, "T", 1) != 1 || write(fd, &total, sizeof(total)) != sizeof(total))
			_exit(5);
	}
	td_disk_close(disk);
	_exit(0);
}


/* The plan's write covering sector sec, or -1 (the writes do not overlap). */
static int crash_cover(uint64_t sec)
{
	for (int i = 0; i < plan_len; i++)
		if (sec >= plan[i].sec && sec < plan[i].sec + plan[i].secs)
			return i;
	return -1;
}

/*
 * want holds the data of plan write *have (-1: none yet); fills it with
 * write w's unless it already does, so a scan of consecutive sectors
 * generates each write's data once.
 */
static const char *crash_want(int w, char *want, int *have)
{
	if (*have != w) {
		fill_random(want, (size_t)plan[w].secs * 512, plan[w].seed);
		*have = w;
	}
	return want;
}

/* got is sector sec's content: the plan's data there, or (unless acked) zeroes. */
static bool crash_sector_ok(uint64_t sec, const char *got, const bool *acked, char *want,
			    int *have)
{
	int w = crash_cover(sec);

	if (w < 0)
		return vhd_all_zero(got, 512);
	if (!memcmp(got, crash_want(w, want, have) + (sec - plan[w].sec) * 512, 512))
		return true;
	return !acked[w] && vhd_all_zero(got, 512);
}

/*
 * Every allocated block read raw, as a bitmap-blind reader (qemu) reads it,
 * and through its bitmap: sectors with set bits hold the plan's data (or
 * zeroes, for a write the cut left unacknowledged), sectors with clear
 * bits hold zeroes or the data of an unacknowledged write.  Unallocated
 * blocks read as zeroes, and the acknowledged writes are checked apart,
 * so nothing older can show anywhere.
 */
static bool nothing_old(struct vhd_file *vf, const bool *acked, char *msg, size_t msglen)
{
	char *want = malloc(512 * 512);
	int have = -1;
	bool ok = true;

	for (uint32_t b = 0; ok && b < vf->m.blocks; b++) {
		uint64_t base = (uint64_t)vf->m.bat[b] * 512;
		size_t bm_len = (size_t)vf->m.bm_secs * 512, len = (size_t)vf->m.spb * 512;
		uint8_t *map;
		char *raw;

		if (vf->m.bat[b] == VHD_BAT_UNUSED)
			continue;
		map = malloc(bm_len);
		raw = malloc(len);
		ck_assert_int_eq(pread(vf->fd, map, bm_len, (off_t)base), (ssize_t)bm_len);
		ck_assert_int_eq(pread(vf->fd, raw, len, (off_t)(base + bm_len)), (ssize_t)len);
		for (uint32_t i = 0; ok && i < vf->m.spb; i++) {
			const char *got = raw + (size_t)i * 512;
			uint64_t sec = (uint64_t)b * vf->m.spb + i;
			int w;

			if (vhd_bitmap_test(map, i)) {
				if (!crash_sector_ok(sec, got, acked, want, &have)) {
					snprintf(msg, msglen, "sector %llu reads neither its data nor zeroes",
						 (unsigned long long)sec);
					ok = false;
				}
				continue;
			}
			if (vhd_all_zero(got, 512))
				continue;
			/* Data under a clear bit: only a write the cut left unacknowledged. */
			w = crash_cover(sec);
			if (w < 0 || acked[w] || !crash_sector_ok(sec, got, acked, want, &have)) {
				snprintf(msg, msglen, "block %u sector %u: old data under a clear bit", b, i);
				ok = false;
			}
		}
		free(map);
		free(raw);
	}
	free(want);
	return ok;
}

static void verify_nothing_old(struct vhd_file *vf, const bool *acked)
{
	char msg[160];

	if (!nothing_old(vf, acked, msg, sizeof(msg)))
		ck_abort_msg("%s", msg);
}

static void verify_after_crash(const char *path, const bool *acked)
{
	struct vhd_error err;
	struct vhd_file *vf;
	char *buf = malloc(512 * 512), *want = malloc(512 * 512);

	ck_assert_msg(vhd_file_check(path, VHD_FILE_CHAIN, &err) == 0, "check after crash: %s",
		      err.msg);
	ck_assert_int_eq(vhd_file_open(&vf, path, VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err), 0);
	for (int i = 0; i < plan_len; i++) {
		const struct cw *p = &plan[i];

		if (!acked[i])
			continue;
		fill_random(want, (size_t)p->secs * 512, p->seed);
		ck_assert_int_eq(vhd_file_read(vf, p->sec, p->secs, buf), 0);
		ck_assert_msg(memcmp(buf, want, (size_t)p->secs * 512) == 0,
			      "acknowledged write %d lost", i);
	}
	if (crash_strict)
		verify_nothing_old(vf, acked);
	vhd_file_close(vf);
	free(buf);
	free(want);
}

static int run_crash(const char *path, enum tdr_io_fault_mode mode, uint64_t n, bool *acked,
		     uint64_t *total)
{
	int fds[2], status;
	pid_t pid;
	unsigned char c;

	ck_assert_int_eq(pipe(fds), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(fds[0]);
		crash_child(path, mode, n, fds[1]);
	}
	close(fds[1]);
	memset(acked, 0, CRASH_MAX_WRITES);
	while (read(fds[0], &c, 1) == 1) {
		if (c == 'T') {
			ck_assert_int_eq(read(fds[0], total, sizeof(*total)), (ssize_t)sizeof(*total));
			continue;
		}
		ck_assert_uint_lt(c, plan_len);
		acked[c] = true;
	}
	close(fds[0]);
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	return status;
}

static void crash_series(const char *path, const char *pristine, enum tdr_io_fault_mode mode)
{
	bool acked[CRASH_MAX_WRITES];
	uint64_t total = 0, n;
	char cmd[3 * PATH_MAX];
	int status;

	snprintf(cmd, sizeof(cmd), "cp --sparse=always '%s' '%s'", pristine, path);
	ck_assert_int_eq(system(cmd), 0);
	status = run_crash(path, TDR_FAULT_NONE, 0, acked, &total);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "clean run status %d", status);
	ck_assert_uint_gt(total, 20);
	for (int i = 0; i < plan_len; i++)
		ck_assert(acked[i]);
	verify_after_crash(path, acked);

	for (n = 0; n <= total; n++) {
		ck_assert_int_eq(system(cmd), 0);
		status = run_crash(path, mode, n, acked, &total);
		if (mode == TDR_FAULT_KILL && n < total)
			ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
				      "n=%llu: status %d", (unsigned long long)n, status);
		verify_after_crash(path, acked);
	}
}

START_TEST(crash_safety_dynamic)
{
	struct vhd_error err;
	char pristine[PATH_MAX];

	snprintf(pristine, sizeof(pristine), "%s/pristine.vhd", dir);
	ck_assert_int_eq(vhd_file_create(pristine, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	crash_series(pa, pristine, TDR_FAULT_KILL);
	crash_series(pa, pristine, TDR_FAULT_FAIL);
}
END_TEST

/*
 * dir/pristine.vhd, a dynamic disk whose four blocks hold old data (0xEE),
 * for an online make-empty to give back; returned open.  Written last
 * block first, so the file holds block 3 where block 0 will be placed
 * again: an old BAT entry that comes back then points at another
 * block's new data, which the checks see.
 */
static struct td_disk *reused_pristine(char *pristine, size_t len)
{
	struct vhd_error err;
	struct td_disk *disk;
	char *old = abuf(2 * MIB);

	snprintf(pristine, len, "%s/pristine.vhd", dir);
	ck_assert_int_eq(vhd_file_create(pristine, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pristine, 0);
	memset(old, 0xEE, 2 * MIB);
	for (unsigned b = 4; b-- > 0;)
		ck_assert_int_eq(run_req(disk, TD_OP_WRITE, b * 4096, 4096, old, NULL), 0);
	free(old);
	return disk;
}

/*
 * The same cuts in a file whose four blocks were filled and then emptied
 * online (the file keeps its length): every allocation lands in reused
 * space over old data, with zeroes written over what its writes do not
 * cover.  After every cut nothing of the old data may show, through the
 * bitmaps or under clear bits.
 */
START_TEST(crash_safety_reused_space)
{
	struct td_disk *disk;
	char pristine[PATH_MAX];
	struct stat st;

	disk = reused_pristine(pristine, sizeof(pristine));
	make_empty_now(disk);
	td_disk_close(disk);
	/* The cleared BAT's sync runs on after the close: let it finish, as a daemon's loop would. */
	while (tdr_io_inflight(io))
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	ck_assert_int_eq(stat(pristine, &st), 0);
	ck_assert_int_gt(st.st_size, 8 * MIB);	/* the old blocks are still in the file */
	crash_strict = true;
	crash_empty_first = true;
	crash_series(pa, pristine, TDR_FAULT_KILL);
	crash_series(pa, pristine, TDR_FAULT_FAIL);
	crash_strict = false;
	crash_empty_first = false;
}
END_TEST

/*
 * Ten 16 MiB blocks, two at a time, on a fresh dynamic disk of 160 MiB:
 * the first allocation moves the footer past every block the disk can
 * hold, and the first block goes past the old footer's place, so cuts
 * land in every step of the move (new footer written, synced) and of the
 * blocks after it.  Checked strictly: an old footer under a clear bit
 * would show.
 */
START_TEST(crash_safety_footer_moves)
{
	static struct cw many[10];
	const uint32_t bs = 16 * MIB;
	struct vhd_error err;
	char pristine[PATH_MAX];
	struct stat st;

	for (unsigned b = 0; b < 10; b++)
		many[b] = (struct cw){ (uint64_t)b * (bs / 512) + (b * 4099) % 30000, 8, 100 + b,
				       b % 2 == 0 };
	snprintf(pristine, sizeof(pristine), "%s/pristine.vhd", dir);
	ck_assert_int_eq(vhd_file_create(pristine, 10ull * bs, VHD_TYPE_DYNAMIC, bs, &err), 0);
	plan = many;
	plan_len = 10;
	crash_strict = true;
	crash_series(pa, pristine, TDR_FAULT_KILL);
	/* The last run went through: past the first footer move. */
	ck_assert_int_eq(stat(pa, &st), 0);
	ck_assert_int_gt(st.st_size, 128 * MIB);
}
END_TEST

/*
 * A pristine differencing disk (dir/NAME) over dir/base.vhd, an 8 MiB
 * parent with data in every block.  The crash series copies it over the
 * live child in the same directory, so both have the same parent.
 */
static void make_diff_pristine(char *pristine, size_t len, const char *name)
{
	struct vhd_error err;
	struct vhd_file *vf;
	char base[PATH_MAX], data[64 * 512];

	snprintf(base, sizeof(base), "%s/base.vhd", dir);
	snprintf(pristine, len, "%s/%s", dir, name);
	ck_assert_int_eq(vhd_file_create(base, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_open(&vf, base, 0, &err), 0);
	memset(data, 0x5A, sizeof(data));
	for (uint64_t s = 0; s < 16384; s += 1000)
		ck_assert_int_eq(vhd_file_write(vf, s, 64, data), 0);
	vhd_file_close(vf);
	ck_assert_int_eq(vhd_file_snapshot(pristine, base, &err), 0);
}

START_TEST(crash_safety_differencing)
{
	char pristine[PATH_MAX];

	make_diff_pristine(pristine, sizeof(pristine), "pristine.vhd");
	crash_series(pb, pristine, TDR_FAULT_KILL);
}
END_TEST

/*
 * Scratch mode skips only the syncs, not the order: a process killed
 * after any number of writes leaves a valid file with every acknowledged
 * write in it, for dynamic and differencing disks alike.
 */
START_TEST(crash_safety_scratch)
{
	struct vhd_error err;
	char pristine[PATH_MAX];

	crash_scratch = true;
	snprintf(pristine, sizeof(pristine), "%s/pristine-dyn.vhd", dir);
	ck_assert_int_eq(vhd_file_create(pristine, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	crash_series(pa, pristine, TDR_FAULT_KILL);

	make_diff_pristine(pristine, sizeof(pristine), "pristine-diff.vhd");
	crash_series(pb, pristine, TDR_FAULT_KILL);
}
END_TEST

/* ------------------------------------------------------------------ power cuts */

/*
 * A power cut (powercut.h) loses more than a killed process: whatever the
 * kernel took but no sync made durable may be on the disk or not, whole
 * or sector by sector.  The plan runs in this process with tdr_io's
 * journal on; the acknowledgements of the guest's writes and flushes are
 * marked in the same history.  Then the file is rebuilt as a cut after
 * every event could leave it, in every version, and each must pass check,
 * hold every write the guest was told is durable (a flush completed after
 * its acknowledgement, or it was FUA), and read every sector as it was
 * before the run or as a write of the plan left it: never zeroes over a
 * parent's data, never old data.
 */
struct pc_run {
	struct pc_log log;
	const char *path;
	size_t durable_at[CRASH_MAX_WRITES];	/* guest may count on it after this event */
	char *view;				/* the disk before the run, through the chain */
	/*
	 * empty_in_log: an online make-empty opens the history, and the
	 * plan starts as soon as it completes.  Its cleared BAT may be lost
	 * until a guest flush makes it durable: old_view, the disk before
	 * it, may show at cuts up to old_until, the first flush's event.
	 */
	bool empty_in_log;
	char *old_view;
	size_t old_until;
	uint64_t secs;
	bool dynamic;				/* also read raw, as bitmap-blind readers do */
	bool scratch;				/* the plan runs in scratch mode */
	bool expect_defects;			/* count defects instead of failing */
	size_t defects;
	char first_defect[1024];
	char *got, *want;			/* pc_check's buffers */
};

/* The power-cut plan's guest flushes (after a step) and FUA writes. */
static bool pc_flush_after[CRASH_MAX_WRITES], pc_fua[CRASH_MAX_WRITES];

struct pc_waiter {
	struct waiter w;
	struct pc_log *log;
	size_t at;
};

static void pc_req_done(struct td_request *req, int err, void *arg)
{
	struct pc_waiter *pw = arg;

	pw->at = pc_mark(pw->log);
	req_done(req, err, &pw->w);
}

static void pc_run_plan(struct pc_run *run, struct td_disk *disk)
{
	char *buf = abuf(2 * 256 * 512);

	for (int i = 0; i < plan_len; i++) {
		struct td_request r[2];
		struct pc_waiter w[2];
		int k = plan[i].pair ? 2 : 1;

		for (int j = 0; j < k; j++) {
			const struct cw *p = &plan[i + j];

			w[j] = (struct pc_waiter){ { 1, 0, 0 }, &run->log, PC_NEVER };
			fill_random(buf + j * 256 * 512, (size_t)p->secs * 512, p->seed);
			td_request_init(&r[j], TD_OP_WRITE, p->sec, p->secs, buf + j * 256 * 512,
					pc_req_done, &w[j]);
			r[j].flags = pc_fua[i + j] ? TD_REQ_FUA : 0;
			td_disk_submit(disk, &r[j]);
		}
		for (int j = 0; j < k; j++) {
			wait_all(&w[j].w);
			ck_assert_int_eq(w[j].w.errors, 0);
			run->durable_at[i + j] = pc_fua[i + j] ? w[j].at : PC_NEVER;
		}
		i += k - 1;
		if (pc_flush_after[i]) {
			struct td_request fl;
			struct pc_waiter fw = { { 1, 0, 0 }, &run->log, PC_NEVER };

			td_request_init(&fl, TD_OP_FLUSH, 0, 0, NULL, pc_req_done, &fw);
			td_disk_submit(disk, &fl);
			wait_all(&fw.w);
			ck_assert_int_eq(fw.w.errors, 0);
			for (int j = 0; j <= i; j++)
				if (run->durable_at[j] == PC_NEVER)
					run->durable_at[j] = fw.at;
			if (run->old_until == PC_NEVER)
				run->old_until = fw.at;
		}
	}
	free(buf);
}

/* A defect of one version: fatal, unless the run is one that expects them. */
static void pc_defect(struct pc_run *run, const struct pc_cut *cut, const char *what)
{
	char msg[sizeof(run->first_defect)];

	snprintf(msg, sizeof(msg), "cut after %zu events (%zu writes durable, %zu undecided), %s: %s",
		 cut->at, cut->durable, cut->undecided, cut->how, what);
	if (!run->expect_defects)
		ck_abort_msg("%s", msg);
	if (!run->defects++)
		memcpy(run->first_defect, msg, sizeof(msg));
}

static void pc_check(void *arg, const struct pc_cut *cut)
{
	struct pc_run *run = arg;
	char *got = run->got, *want = run->want, what[768];
	bool acked[CRASH_MAX_WRITES] = { false };
	struct vhd_error err;
	struct vhd_file *vf;
	bool old_ok = run->old_view && cut->at <= run->old_until;
	int have = -1;

	if (vhd_file_check(run->path, VHD_FILE_CHAIN, &err) < 0) {
		snprintf(what, sizeof(what), "check: %s", err.msg);
		pc_defect(run, cut, what);
		return;
	}
	ck_assert_int_eq(vhd_file_open(&vf, run->path, VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err), 0);
	ck_assert_int_eq(vhd_file_read(vf, 0, (uint32_t)run->secs, got), 0);
	for (int i = 0; i < plan_len; i++)
		acked[i] = run->durable_at[i] < cut->at;
	for (uint64_t sec = 0; sec < run->secs; sec++) {
		const char *s = got + sec * 512;
		int w = crash_cover(sec);
		bool mine = false;

		if (w >= 0) {
			mine = !memcmp(s, crash_want(w, want, &have) + (sec - plan[w].sec) * 512, 512);
			if (!mine && acked[w]) {
				snprintf(what, sizeof(what), "sector %llu lost durable write %d",
					 (unsigned long long)sec, w);
				pc_defect(run, cut, what);
				goto close;
			}
		}
		if (!mine && memcmp(s, run->view + sec * 512, 512) &&
		    !(old_ok && !memcmp(s, run->old_view + sec * 512, 512))) {
			snprintf(what, sizeof(what),
				 "sector %llu reads neither what it held nor what was written there",
				 (unsigned long long)sec);
			pc_defect(run, cut, what);
			goto close;
		}
	}
	if (run->dynamic && !old_ok && !nothing_old(vf, acked, what, sizeof(what)))
		pc_defect(run, cut, what);
close:
	vhd_file_close(vf);
}

/*
 * Runs the plan on a copy of pristine at path with the journal on, then
 * checks every cut.  empty_first: an online make-empty first (its sync
 * done before the journal starts), so allocations reuse space.
 */
static void powercut_series(struct pc_run *run, const char *pristine, bool empty_first)
{
	const char *path = run->path;
	char cmd[3 * PATH_MAX];
	struct vhd_error err;
	struct vhd_file *vf;
	struct td_disk *disk;
	size_t versions, syncs = 0;

	snprintf(cmd, sizeof(cmd), "cp --sparse=always '%s' '%s'", pristine, path);
	ck_assert_int_eq(system(cmd), 0);
	disk = open_disk(path, 0);
	if (empty_first && !run->empty_in_log)
		make_empty_now(disk);
	if (run->scratch)
		ck_assert_int_eq(vhd_image_set_scratch(disk->top, true), 0);
	while (tdr_io_inflight(io))
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	ck_assert_int_eq(vhd_file_open(&vf, path, VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err), 0);
	run->secs = vf->m.footer.current_size / 512;
	run->view = malloc(run->secs * 512);
	run->got = malloc(run->secs * 512);
	run->want = malloc(512 * 512);
	ck_assert_int_eq(vhd_file_read(vf, 0, (uint32_t)run->secs, run->view), 0);
	vhd_file_close(vf);

	run->old_until = PC_NEVER;
	pc_start(&run->log, path, io);
	if (run->empty_in_log) {
		run->old_view = run->view;
		run->view = calloc(1, run->secs * 512);	/* what an emptied dynamic disk reads */
		make_empty_now(disk);
	}
	pc_run_plan(run, disk);
	pc_stop(&run->log, io);
	td_disk_close(disk);
	while (tdr_io_inflight(io))
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	ck_assert_uint_eq(run->log.others, 0);
	for (size_t i = 0; i < run->log.n; i++)
		syncs += run->log.ios[i].sync;
	ck_assert_uint_gt(run->log.n - syncs, (size_t)plan_len);
	ck_assert_uint_gt(syncs, 0);

	versions = pc_for_each_cut(&run->log, pc_check, run);
	ck_assert_uint_gt(versions, run->log.events);
	pc_free(&run->log);
	free(run->view);
	free(run->old_view);
	free(run->got);
	free(run->want);
}

/* crash_plan with guest flushes after some steps and two FUA writes. */
static void powercut_plan(struct cw *p)
{
	memcpy(p, crash_plan, sizeof(crash_plan));
	memset(pc_flush_after, 0, sizeof(pc_flush_after));
	memset(pc_fua, 0, sizeof(pc_fua));
	pc_flush_after[2] = pc_flush_after[6] = pc_flush_after[10] = true;
	pc_fua[5] = pc_fua[9] = true;
	plan = p;
	plan_len = CRASH_WRITES;
}

START_TEST(power_cut_dynamic)
{
	struct pc_run run = { .path = pa, .dynamic = true };
	struct cw p[CRASH_WRITES];
	struct vhd_error err;
	char pristine[PATH_MAX];

	snprintf(pristine, sizeof(pristine), "%s/pristine.vhd", dir);
	ck_assert_int_eq(vhd_file_create(pristine, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	powercut_plan(p);
	powercut_series(&run, pristine, false);
}
END_TEST

START_TEST(power_cut_differencing)
{
	struct pc_run run = { .path = pb };
	struct cw p[CRASH_WRITES];
	char pristine[PATH_MAX];

	make_diff_pristine(pristine, sizeof(pristine), "pristine.vhd");
	powercut_plan(p);
	powercut_series(&run, pristine, false);
}
END_TEST

/* Every allocation lands in space an online make-empty gave back, over old data. */
START_TEST(power_cut_reused_space)
{
	struct pc_run run = { .path = pa, .dynamic = true };
	struct cw p[CRASH_WRITES];
	char pristine[PATH_MAX];

	td_disk_close(reused_pristine(pristine, sizeof(pristine)));
	powercut_plan(p);
	powercut_series(&run, pristine, true);
}
END_TEST

/*
 * The make-empty itself in the history, the plan right after it: its
 * cleared BAT's sync still runs when the first allocations into the
 * space it gave back arrive.  Until a guest flush, a cut may bring the
 * old data back, but never mixed with new data in the same space; after
 * it, never.
 */
START_TEST(power_cut_across_make_empty)
{
	struct pc_run run = { .path = pa, .dynamic = true, .empty_in_log = true };
	struct cw p[CRASH_WRITES];
	char pristine[PATH_MAX];

	td_disk_close(reused_pristine(pristine, sizeof(pristine)));
	powercut_plan(p);
	powercut_series(&run, pristine, true);
	ck_assert_uint_ne(run.old_until, PC_NEVER);
}
END_TEST

/*
 * The model has teeth: scratch mode gives up exactly what a power cut
 * needs (vhd.md), and the same series finds it.  In a differencing disk a
 * bit or BAT entry reaches the disk before the data under it, and the
 * parent's data reads as zeroes; in reused space a BAT entry reaches it
 * before the zeroes, and old data shows.
 */
START_TEST(power_cut_sees_scratch_mode)
{
	struct pc_run diff = { .path = pb, .scratch = true, .expect_defects = true };
	struct pc_run reused = { .path = pa, .dynamic = true, .scratch = true,
				 .expect_defects = true };
	struct cw p[CRASH_WRITES];
	char pristine[PATH_MAX];

	powercut_plan(p);
	make_diff_pristine(pristine, sizeof(pristine), "pristine-diff.vhd");
	powercut_series(&diff, pristine, false);
	ck_assert_uint_gt(diff.defects, 0);
	ck_assert_msg(strstr(diff.first_defect, "reads neither what it held nor what was written"),
		      "%s", diff.first_defect);

	td_disk_close(reused_pristine(pristine, sizeof(pristine)));
	powercut_series(&reused, pristine, true);
	ck_assert_uint_gt(reused.defects, 0);
	ck_assert_msg(strstr(reused.first_defect, "reads neither what it held nor what was written"),
		      "%s", reused.first_defect);
}
END_TEST

/* Writes 16 sectors at sec into disk and the model. */
static void model_write(struct td_disk *disk, char *model, uint64_t sec, unsigned seed)
{
	char *data = abuf(16 * 512);

	fill_random(data, 16 * 512, seed);
	write_model(disk, model, sec * 512, data, 16 * 512);
	free(data);
}

/*
 * Scratch mode (vhd_image_set_scratch): a differencing disk's allocations
 * and bitmap updates run without a single group sync, and read back
 * byte-exact over the parent's data; off again, they sync.  Refused for
 * an image that is not a VHD.
 */
START_TEST(scratch_mode_skips_ordering_syncs)
{
	const uint64_t size = 16 * MIB;
	char *model = calloc(1, size), *back = abuf(size), *data = malloc(64 * 512);
	char raw[PATH_MAX + 8];
	struct vhd_error err;
	struct vhd_file *vf;
	struct td_disk *disk, *aio;
	int fd;

	/* A parent with data in every block, a child over it. */
	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_open(&vf, pa, 0, &err), 0);
	for (uint64_t sec = 0; sec < size / 512; sec += 1500) {
		fill_random(data, 64 * 512, (unsigned)sec + 1);
		memcpy(model + sec * 512, data, 64 * 512);
		ck_assert_int_eq(vhd_file_write(vf, sec, 64, data), 0);
	}
	vhd_file_close(vf);
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);

	disk = open_disk(pb, 0);
	ck_assert_uint_eq(image_stat(disk, "scratch"), 0);
	ck_assert_int_eq(vhd_image_set_scratch(disk->top, true), 0);
	ck_assert_uint_eq(image_stat(disk, "scratch"), 1);
	for (unsigned b = 0; b < 4; b++) {
		model_write(disk, model, b * 4096 + 7, 100 + b);	/* allocates block b */
		model_write(disk, model, b * 4096 + 1490, 200 + b);	/* a bitmap update */
	}
	ck_assert_uint_eq(image_stat(disk, "allocations"), 4);
	ck_assert_uint_eq(image_stat(disk, "group_syncs"), 0);
	ck_assert_uint_eq(image_stat(disk, "group_syncs_skipped"), 8);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);

	/* Off: the same kinds of writes sync again. */
	ck_assert_int_eq(vhd_image_set_scratch(disk->top, false), 0);
	model_write(disk, model, 5 * 4096 + 7, 300);
	model_write(disk, model, 5 * 4096 + 1490, 301);
	ck_assert_uint_eq(image_stat(disk, "group_syncs_skipped"), 8);
	ck_assert_uint_ge(image_stat(disk, "group_syncs"), 2);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	expect_file(pb, back, model, size);

	/* Not a VHD: refused, with a reason. */
	snprintf(raw, sizeof(raw), "%s/raw.img", dir);
	fd = open(raw, O_CREAT | O_RDWR, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)MIB), 0);
	close(fd);
	snprintf(data, 64 * 512, "aio:%s", raw);
	ck_assert_int_eq(td_disk_open(&aio, data, 0, loop, io), 0);
	ck_assert_int_eq(vhd_image_set_scratch(aio->top, true), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "scratch mode"));
	td_disk_close(aio);
	free(model);
	free(back);
	free(data);
}
END_TEST

/* A file that fails validation is never written by the driver. */
START_TEST(bad_file_untouched)
{
	struct vhd_error err;
	struct td_disk *disk = NULL;
	char spec[PATH_MAX + 8];
	uint8_t hb[1024];
	unsigned long h1, h2;
	uint64_t s1, s2;
	int fd;

	ck_assert_int_eq(vhd_file_create(pa, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	fd = open(pa, O_RDWR);
	ck_assert_int_eq(pread(fd, hb, sizeof(hb), 512), (ssize_t)sizeof(hb));
	hb[40] ^= 1;	/* header checksum now wrong */
	ck_assert_int_eq(pwrite(fd, hb, sizeof(hb), 512), (ssize_t)sizeof(hb));
	close(fd);
	sha_like(pa, &h1, &s1);
	snprintf(spec, sizeof(spec), "vhd:%s", pa);
	ck_assert_int_lt(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), pa));
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "checksum"));
	sha_like(pa, &h2, &s2);
	ck_assert_uint_eq(h1, h2);
	ck_assert_uint_eq(s1, s2);

	/* a missing parent and a parent UUID mismatch are named */
	ck_assert_int_eq(vhd_file_create(pb, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_snapshot(pc, pb, &err), 0);
	ck_assert_int_eq(unlink(pb), 0);
	snprintf(spec, sizeof(spec), "vhd:%s", pc);
	ck_assert_int_lt(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "parent not found"));
	ck_assert_int_eq(vhd_file_create(pb, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_lt(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "UUID mismatch"));
}
END_TEST

/*
 * The file locks (tdr/filelock.h): a disk the driver serves, parents
 * included, cannot be rewritten by the library's writers (vhd-util modify,
 * coalesce, repair), only read; a file a writer holds cannot be served; two
 * disks may share a parent.  Nothing refused changes a byte.
 */
START_TEST(served_files_are_locked)
{
	struct vhd_error err;
	struct vhd_file *vf = NULL, *rd = NULL;
	struct td_disk *disk, *other;
	char spec[PATH_MAX + 8], *buf = abuf(64 * 1024);
	unsigned long h1, h2;
	uint64_t s1, s2;

	ck_assert_int_eq(vhd_file_create(pa, 8 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);
	ck_assert_int_eq(vhd_file_snapshot(pc, pa, &err), 0);
	disk = open_disk(pb, 0);
	fill_random(buf, 64 * 1024, 7);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 0, 128, buf, NULL), 0);

	/* the leaf and its parent: readers yes, writers no */
	sha_like(pb, &h1, &s1);
	ck_assert_int_eq(vhd_file_open(&vf, pb, 0, &err), -EBUSY);
	ck_assert_ptr_null(vf);
	ck_assert_int_eq(err.code, VHD_ERR_BUSY);
	ck_assert_str_eq(vhd_defect_name(err.code), "in-use");
	ck_assert_msg(strstr(err.msg, pb) && strstr(err.msg, "in use") && strstr(err.msg, "tdr-ctl list"),
		      "%s", err.msg);
	ck_assert_int_eq(vhd_file_open(&vf, pa, 0, &err), -EBUSY);
	ck_assert_int_lt(vhd_file_coalesce(pb, NULL, NULL, &err), 0);
	ck_assert_int_eq(err.code, VHD_ERR_BUSY);
	ck_assert_int_eq(vhd_file_repair(pb, &err), -EBUSY);
	ck_assert_int_eq(err.code, VHD_ERR_BUSY);
	ck_assert_int_eq(vhd_file_open(&rd, pb, VHD_FILE_RDONLY | VHD_FILE_CHAIN, &err), 0);
	vhd_file_close(rd);
	sha_like(pb, &h2, &s2);
	ck_assert_uint_eq(h1, h2);
	ck_assert_uint_eq(s1, s2);

	/* a second disk over the same parent */
	other = open_disk(pc, 0);
	td_disk_close(other);

	/* closed: the writer gets the file */
	td_disk_close(disk);
	ck_assert_msg(vhd_file_open(&vf, pb, 0, &err) == 0, "%s", err.msg);

	/* held by a writer: not served, not read */
	snprintf(spec, sizeof(spec), "vhd:%s", pb);
	disk = NULL;
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -EBUSY);
	ck_assert_ptr_null(disk);
	ck_assert_msg(strstr(tdr_last_error(), pb) && strstr(tdr_last_error(), "another program is changing it"),
		      "%s", tdr_last_error());
	snprintf(spec, sizeof(spec), "aio:%s", pb);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -EBUSY);
	ck_assert_int_eq(vhd_file_open(&rd, pb, VHD_FILE_RDONLY, &err), -EBUSY);
	ck_assert_int_eq(err.code, VHD_ERR_BUSY);
	ck_assert_msg(strstr(err.msg, "another program is changing it"), "%s", err.msg);
	ck_assert_int_eq(vhd_file_make_empty(vf, &err), 0);
	vhd_file_close(vf);

	/* a parent held by a writer: the child's chain says so, not "invalid" */
	ck_assert_msg(vhd_file_open(&vf, pa, 0, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(vhd_file_check(pb, VHD_FILE_CHAIN, &err), -EBUSY);
	ck_assert_int_eq(err.code, VHD_ERR_BUSY);
	ck_assert_msg(strstr(err.msg, pa) && strstr(err.msg, "another program is changing it"), "%s",
		      err.msg);
	vhd_file_close(vf);

	/* and the data written before is gone only by make-empty */
	disk = open_disk(pb, 0);
	memset(buf, 0xAA, 64 * 1024);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 0, 128, buf, NULL), 0);
	ck_assert(vhd_all_zero(buf, 64 * 1024));
	td_disk_close(disk);
	free(buf);
}
END_TEST

/* ------------------------------------------------------------------ */
/* A crash of the host after writes into fresh space (no sync since) */

enum hc_cat { HC_BAT, HC_BITMAP, HC_DATA };

/* Which kind of metadata or data the file's sector sec is, by vf's BAT. */
static enum hc_cat hc_category(const struct vhd_file *vf, uint64_t sec)
{
	uint64_t bat_lo = vf->m.header.table_offset / 512;
	uint64_t bat_hi = bat_lo + ((uint64_t)vf->m.bat_entries * 4 + 511) / 512;

	if (sec >= bat_lo && sec < bat_hi)
		return HC_BAT;
	for (uint32_t b = 0; b < vf->m.bat_entries; b++) {
		uint64_t bm = vf->m.bat[b];

		/* the bitmap, and the zeroed lead of its page, written with it */
		if (bm != VHD_BAT_UNUSED && sec >= (bm & ~7ull) && sec < bm + vf->m.bm_secs)
			return HC_BITMAP;
	}
	return HC_DATA;
}

/* Every sector of got is the one of before or the one of after. */
static void hc_expect_old_or_new(const char *what, const char *got, const char *before,
				 const char *after, uint64_t size)
{
	for (uint64_t off = 0; off < size; off += 512)
		ck_assert_msg(!memcmp(got + off, before + off, 512) ||
			      !memcmp(got + off, after + off, 512),
			      "%s: sector %llu is neither its content before the writes nor after",
			      what, (unsigned long long)(off / 512));
}

/*
 * A new block of a dynamic disk in never-written space writes its BAT
 * entry with its data and bitmap, not after a sync of them, and a write
 * into an allocated block sends its bitmap bits with its data
 * (alloc_needs_sync, bm_flush).  A crash of the host may then keep any of
 * those writes and lose the others.  This builds every such file: from
 * the file as it was at the last sync (F0) and as the writes left it (F1),
 * it takes each kind of sector (BAT, bitmaps, data) from one or the
 * other, in all 8 combinations, and then sector by sector at random.
 * Each must pass check and read, through the bitmaps and as a
 * bitmap-blind reader like qemu, every sector as before or after the
 * writes, never anything else.  No sync may run between F0 and F1, or
 * the model would lose writes a sync had made durable: asserted.
 */
START_TEST(host_crash_in_fresh_space)
{
	const uint64_t size = 64 * MIB, bs = 2 * MIB;
	char *before = calloc(1, size), *after = calloc(1, size), *back = abuf(size);
	char *data = abuf(64 * 1024), *f0, *f1, *mix;
	unsigned long long moves, syncs;
	struct vhd_error err;
	struct vhd_file *vf;
	struct td_disk *disk;
	uint64_t flen;
	int fd;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pa, 0);
	/* Blocks 0-3 allocated and durable: the flush is F0's sync. */
	for (unsigned b = 0; b < 4; b++) {
		fill_random(data, 8192, 500 + b);
		write_model(disk, before, b * bs + 64 * 1024, data, 8192);
	}
	ck_assert_int_eq(run_req(disk, TD_OP_FLUSH, 0, 0, NULL, NULL), 0);
	settle(disk);
	flen = fsize(pa);
	f0 = malloc(flen);
	f1 = malloc(flen);
	mix = malloc(flen);
	fd = open(pa, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, f0, flen, 0), (ssize_t)flen);
	close(fd);
	moves = image_stat(disk, "footer_writes");
	syncs = image_stat(disk, "group_syncs");

	/*
	 * Unsynced: twelve new blocks (4 KiB, 512 bytes at an odd sector,
	 * 64 KiB), bits set in allocated blocks, and overwrites of set bits.
	 */
	memcpy(after, before, size);
	for (unsigned b = 4; b < 16; b++) {
		uint64_t off = b * bs + (b % 3) * 4096 + (b % 2) * 512;
		size_t len = b % 3 == 2 ? 64 * 1024 : (b % 2 ? 512 : 4096);

		fill_random(data, len, 600 + b);
		write_model(disk, after, off, data, len);
	}
	for (unsigned b = 0; b < 4; b++) {
		fill_random(data, 4096, 700 + b);
		write_model(disk, after, b * bs + MIB, data, 4096);		/* clear bits */
		fill_random(data, 1024, 800 + b);
		write_model(disk, after, b * bs + 64 * 1024 + 1024, data, 1024);	/* set bits */
	}
	settle(disk);
	ck_assert_uint_eq(image_stat(disk, "footer_writes"), moves);
	ck_assert_uint_eq(image_stat(disk, "group_syncs"), syncs);
	ck_assert_uint_eq(image_stat(disk, "unsynced_allocations"), 16);
	/* F1: what the writes left, before a clean close trims the file. */
	ck_assert_uint_eq(fsize(pa), flen);
	fd = open(pa, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, f1, flen, 0), (ssize_t)flen);
	close(fd);
	td_disk_close(disk);
	expect_file(pa, back, after, size);

	ck_assert_int_eq(vhd_file_open(&vf, pa, VHD_FILE_RDONLY, &err), 0);
	for (unsigned mode = 0; mode < 8 + 6; mode++) {
		unsigned seed = mode;
		char what[64];

		for (uint64_t sec = 0; sec < flen / 512; sec++) {
			bool take_new;

			if (mode < 8)
				take_new = (mode >> hc_category(vf, sec)) & 1;
			else
				take_new = (rand_r(&seed) & 1) != 0;
			memcpy(mix + sec * 512, (take_new ? f1 : f0) + sec * 512, 512);
		}
		fd = open(pb, O_CREAT | O_TRUNC | O_WRONLY, 0600);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(pwrite(fd, mix, flen, 0), (ssize_t)flen);
		close(fd);
		snprintf(what, sizeof(what), mode < 8 ? "BAT %u, bitmaps %u, data %u" : "random mix %u",
			 mode < 8 ? mode & 1 : mode - 8, (mode >> 1) & 1, (mode >> 2) & 1);
		ck_assert_msg(vhd_file_check(pb, 0, &err) == 0, "%s: %s", what, err.msg);
		lib_read_all(pb, back, size);
		hc_expect_old_or_new(what, back, before, after, size);
		read_ignoring_bitmaps(pb, back, size);
		hc_expect_old_or_new(what, back, before, after, size);
	}
	vhd_file_close(vf);
	free(before);
	free(after);
	free(back);
	free(data);
	free(f0);
	free(f1);
	free(mix);
}
END_TEST

/* How many of block b's spb bitmap bits are set in the file at path. */
static uint32_t bits_set(const char *path, uint32_t b)
{
	struct vhd_error err;
	struct vhd_file *vf;
	uint8_t map[512];
	uint32_t n = 0;

	ck_assert_int_eq(vhd_file_open(&vf, path, VHD_FILE_RDONLY, &err), 0);
	ck_assert_int_eq(vhd_file_read_bitmap(vf, b, map), 0);
	for (uint32_t i = 0; i < vf->m.spb; i++)
		n += vhd_bitmap_test(map, i);
	vhd_file_close(vf);
	return n;
}

/*
 * A dynamic disk's new block goes down with every bit set, in fresh space
 * (the rest is a hole) and in space a make-empty gave back (the rest is
 * zero-filled): later first writes into the block need no bitmap write,
 * and every reader, bitmap-blind ones too, sees the guest's disk.  A
 * differencing disk's new block keeps exact bits.
 */
START_TEST(new_dynamic_block_has_every_bit)
{
	const uint64_t size = 16 * MIB, bs = 2 * MIB;
	char *data = abuf(4096), *model = calloc(1, size), *back = abuf(size);
	struct vhd_error err;
	struct td_disk *disk;

	ck_assert_ptr_nonnull(model);
	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pa, 0);
	fill_random(data, 4096, 41);
	write_model(disk, model, 8192, data, 4096);		/* block 0, fresh space */
	ck_assert_uint_eq(image_stat(disk, "bitmap_writes"), 0);
	fill_random(data, 4096, 42);
	write_model(disk, model, MIB, data, 4096);		/* block 0 again, no bitmap write */
	write_model(disk, model, 3 * bs + 4096, data, 4096);	/* block 3 */
	ck_assert_uint_eq(image_stat(disk, "    allocations"), 2);
	ck_assert_uint_eq(image_stat(disk, "bitmap_writes"), 0);
	read_all(disk, back, size);
	ck_assert(memcmp(back, model, size) == 0);
	td_disk_close(disk);
	ck_assert_uint_eq(bits_set(pa, 0), 4096);
	ck_assert_uint_eq(bits_set(pa, 3), 4096);
	expect_file(pa, back, model, size);
	expect_bitmap_blind(pa, back, model, size);

	/* Space given back by a make-empty: old data under the new block. */
	ck_assert_int_eq(unlink(pa), 0);
	disk = three_blocks_then_empty();
	memset(model, 0, size);
	partial_writes(disk, model, 0, 2);
	fill_random(data, 4096, 43);
	write_model(disk, model, 1 * bs + MIB, data, 4096);
	ck_assert_uint_eq(image_stat(disk, "bitmap_writes"), 0);
	td_disk_close(disk);
	ck_assert_uint_eq(bits_set(pa, 0), 4096);
	ck_assert_uint_eq(bits_set(pa, 1), 4096);
	expect_file(pa, back, model, size);
	expect_bitmap_blind(pa, back, model, size);

	/* A differencing child: only the written sectors' bits. */
	ck_assert_int_eq(vhd_file_snapshot(pb, pa, &err), 0);
	disk = open_disk(pb, 0);
	write_model(disk, model, 5 * bs + 4096, data, 4096);
	td_disk_close(disk);
	ck_assert_uint_eq(bits_set(pb, 5), 8);
	expect_file(pb, back, model, size);
	free(data);
	free(model);
	free(back);
}
END_TEST

/*
 * A dynamic disk's write over clear bits sends its bits with its data, so
 * a bitmap write may go out while other writes' data is still in flight,
 * and their bits, already on disk, must stay set in every later bitmap
 * write (bm->early).  Rounds of 96 one-sector writes in flight at once at
 * distinct clear sectors of two allocated blocks: after each round the
 * file on disk, not just the cache, must hold every bit.
 */
START_TEST(concurrent_bits_stay_written)
{
	const uint64_t size = 8 * MIB;
	char *model = calloc(1, size), *back = abuf(size), *data = abuf(96 * 512);
	struct td_request reqs[96];
	struct vhd_error err;
	struct vhd_file *vf;
	struct td_disk *disk;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	/*
	 * Blocks 0 and 1 allocated by the library, which sets only the bits
	 * it writes (the driver's new blocks have every bit set, and the
	 * writes below would need no bitmap write at all).
	 */
	ck_assert_int_eq(vhd_file_open(&vf, pa, 0, &err), 0);
	fill_random(data, 512, 1);
	ck_assert_int_eq(vhd_file_write(vf, 0, 1, data), 0);
	ck_assert_int_eq(vhd_file_write(vf, 4096, 1, data), 0);
	vhd_file_close(vf);
	memcpy(model, data, 512);
	memcpy(model + 2 * MIB, data, 512);
	disk = open_disk(pa, 0);
	for (unsigned round = 0; round < 8; round++) {
		struct waiter w = { 0, 0, 0 };

		for (unsigned i = 0; i < 96; i++) {
			uint64_t sec = (i % 2) * 4096 + 1 + round * 500 + (i / 2) * 9;

			fill_random(data + i * 512, 512, round * 100 + i);
			memcpy(model + sec * 512, data + i * 512, 512);
			td_request_init(&reqs[i], TD_OP_WRITE, sec, 1, data + i * 512, req_done, &w);
			w.pending++;
			td_disk_submit(disk, &reqs[i]);
		}
		wait_all(&w);
		ck_assert_int_eq(w.errors, 0);
		settle(disk);
		lib_read_all(pa, back, size);
		ck_assert_msg(memcmp(back, model, size) == 0, "round %u: the file lost a write", round);
	}
	ck_assert_uint_eq(image_stat(disk, "allocations"), 0);
	ck_assert_uint_gt(image_stat(disk, "bitmap_writes"), 0);
	td_disk_close(disk);
	expect_file(pa, back, model, size);
	free(model);
	free(back);
	free(data);
}
END_TEST

/*
 * A file system (here RLIMIT_FSIZE) that cannot hold a file as long as
 * the disk can get refuses the footer's move to the full length with
 * EFBIG: the footer then moves in 64 MiB steps, and writes go on.  A
 * 256 MiB disk in a 200 MiB limit: forty blocks written, the file stays
 * under the limit, valid and exact, and trimmed at close.
 */
START_TEST(footer_steps_when_file_size_limited)
{
	struct rlimit rl = { 200 * MIB, 200 * MIB };
	struct vhd_error err;

	ck_assert_int_eq(vhd_file_create(pa, 256 * MIB, VHD_TYPE_DYNAMIC, 0, &err), 0);
	signal(SIGXFSZ, SIG_IGN);
	ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
	/* Three footer writes at least: the refused one, then steps. */
	first_touches_then_check(pa, 256 * MIB, 40, 3, 200 * MIB);
}
END_TEST

/* ------------------------------------------------- found by review */

static int ack_fd = -1;

/* In the child: each acknowledged write's tag goes down the pipe. */
static void ack_to_pipe(struct td_request *req, int err, void *arg)
{
	unsigned char c = (unsigned char)(uintptr_t)arg;

	(void)req;
	if (!err && write(ack_fd, &c, 1) != 1)
		_exit(9);
}

/*
 * Differencing disk, block 0 allocated with only sectors 0-7 marked.
 * Two writes of the same 8 sectors (100..107) in flight at once; the
 * process is killed when it submits its 4th write (data, data, fdsync,
 * then the bitmap).  Whichever write was acknowledged must read back:
 * the second once completed on bits the first had set in memory only,
 * and read the parent's data after the kill.
 */
START_TEST(overlapping_write_waits_for_its_bits)
{
	const uint64_t size = 8 * MIB;
	char *model = calloc(1, size), *buf = abuf(16 * 512), *back = abuf(8 * 512);
	struct td_disk *disk;
	struct vhd_error err;
	struct vhd_file *vf;
	int fds[2], status;
	pid_t pid;
	unsigned char c, acked = 0;

	diff_over_pattern(model, size);
	disk = open_disk(pb, 0);
	fill_random(buf, 8 * 512, 99);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 0, 8, buf, NULL), 0);
	td_disk_close(disk);

	ck_assert_int_eq(pipe(fds), 0);
	pid = fork();
	if (pid == 0) {
		struct td_request r[2];
		int pending = 2;

		close(fds[0]);
		ack_fd = fds[1];
		loop = tdr_loop_new();
		io = tdr_io_ctx_new(loop, 64);
		disk = NULL;
		{
			char spec[PATH_MAX + 8];

			snprintf(spec, sizeof(spec), "vhd:%s", pb);
			if (td_disk_open(&disk, spec, 0, loop, io) < 0)
				_exit(3);
		}
		tdr_io_set_fault(io, TDR_FAULT_KILL, 3);
		fill_random(buf, 8 * 512, 1);
		fill_random(buf + 8 * 512, 8 * 512, 2);
		td_request_init(&r[0], TD_OP_WRITE, 100, 8, buf, ack_to_pipe, (void *)(uintptr_t)'1');
		td_request_init(&r[1], TD_OP_WRITE, 100, 8, buf + 8 * 512, ack_to_pipe,
				(void *)(uintptr_t)'2');
		td_disk_submit(disk, &r[0]);
		td_disk_submit(disk, &r[1]);
		(void)pending;
		for (;;)
			tdr_loop_run_once(loop, 1000);
	}
	close(fds[1]);
	while (read(fds[0], &c, 1) == 1)
		acked = c;
	close(fds[0]);
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert(WIFSIGNALED(status));
	if (!acked) {
		/* Killed before either completed: nothing was promised. */
		free(model);
		free(buf);
		free(back);
		lib_check(pb);
		return;
	}
	lib_check(pb);
	ck_assert_int_eq(vhd_file_open(&vf, pb, VHD_FILE_CHAIN | VHD_FILE_RDONLY, &err), 0);
	ck_assert_int_eq(vhd_file_read(vf, 100, 8, back), 0);
	vhd_file_close(vf);
	fill_random(buf, 8 * 512, acked == '1' ? 1 : 2);
	ck_assert_msg(memcmp(back, buf, 8 * 512) == 0,
		      "acknowledged write %c lost: sector 100 reads %s", acked,
		      memcmp(back, model + 100 * 512, 8 * 512) == 0 ? "the parent's data" : "something else");
	free(model);
	free(buf);
	free(back);
}
END_TEST

/*
 * A daemon killed with a disk open leaves the file as long as the disk can
 * get (valid).  After a reopen, a new block goes right after the data, not
 * past that footer (where the space never came back, and near 2 TiB the
 * file was full after 1,743 new blocks), and a clean close trims the file.
 */
START_TEST(reopen_after_kill_places_and_trims)
{
	const uint64_t size = 256 * MIB, bs = 2 * MIB;
	char *data = abuf(4096);
	struct td_disk *disk;
	struct vhd_error err;
	struct vhd_file *vf;
	uint64_t after_kill;
	int status;
	pid_t pid;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	pid = fork();
	if (pid == 0) {
		char spec[PATH_MAX + 8];

		loop = tdr_loop_new();
		io = tdr_io_ctx_new(loop, 64);
		snprintf(spec, sizeof(spec), "vhd:%s", pa);
		disk = NULL;
		if (td_disk_open(&disk, spec, 0, loop, io) < 0)
			_exit(3);
		fill_random(data, 4096, 1);
		if (run_req(disk, TD_OP_WRITE, 0, 8, data, NULL))
			_exit(4);
		settle(disk);
		kill(getpid(), SIGKILL);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert(WIFSIGNALED(status));
	after_kill = fsize(pa);
	ck_assert_uint_gt(after_kill, size / 2);	/* the footer at the disk's length */
	lib_check(pa);

	/* Reopened and closed with nothing written: trimmed to the data. */
	disk = open_disk(pa, 0);
	td_disk_close(disk);
	lib_check(pa);
	ck_assert_uint_lt(fsize(pa), 4 * MIB);

	/* reopen, one new block, close */
	disk = open_disk(pa, 0);
	fill_random(data, 4096, 2);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, bs / 512, 8, data, NULL), 0);
	settle(disk);
	td_disk_close(disk);
	ck_assert_int_eq(vhd_file_open(&vf, pa, VHD_FILE_RDONLY, &err), 0);
	ck_assert_uint_lt((uint64_t)vf->m.bat[1] * 512, 8 * MIB);
	{
		char *back = abuf(4096);

		ck_assert_int_eq(vhd_file_read(vf, bs / 512, 8, back), 0);
		ck_assert_mem_eq(back, data, 4096);
		fill_random(data, 4096, 1);
		ck_assert_int_eq(vhd_file_read(vf, 0, 8, back), 0);
		ck_assert_mem_eq(back, data, 4096);
		free(back);
	}
	vhd_file_close(vf);
	lib_check(pa);
	ck_assert_msg(fsize(pa) < 8 * MIB, "the file stays %llu bytes long for 2 blocks of data",
		      (unsigned long long)fsize(pa));
	free(data);
}
END_TEST

/*
 * A new block of a dynamic disk in fresh space writes its BAT sector with
 * its data and bitmap (bat_early).  If the bitmap's write fails after the
 * BAT sector's succeeded, the allocation fails, in memory; the sector on
 * disk still points at the block.  The next online make-empty must clear
 * it, or blocks placed in the space given back overlap it (the file then
 * failed validation).
 */
START_TEST(failed_early_alloc_cleared_by_make_empty)
{
	const uint64_t size = 1024 * MIB, bs = 2 * MIB;
	char *data = abuf(4096);
	struct td_disk *disk;
	struct vhd_error err;
	struct vhd_file *vf;
	int r;

	ck_assert_int_eq(vhd_file_create(pa, size, VHD_TYPE_DYNAMIC, 0, &err), 0);
	disk = open_disk(pa, 0);
	/* the footer's move first, so that the allocation below writes data, BAT, bitmap */
	fill_random(data, 4096, 1);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 7 * bs / 512, 8, data, NULL), 0);
	settle(disk);
	/* block 2: data (1), BAT sector (2) succeed, the bitmap (3) fails */
	tdr_io_set_fault(io, TDR_FAULT_FAIL, 2);
	fill_random(data, 4096, 2);
	r = run_req(disk, TD_OP_WRITE, 200 * bs / 512, 8, data, NULL);
	ck_assert_int_eq(r, -EIO);
	settle(disk);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);
	make_empty_now(disk);
	settle(disk);
	fill_random(data, 4096, 3);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 5 * bs / 512, 8, data, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 6 * bs / 512, 8, data, NULL), 0);
	settle(disk);
	td_disk_close(disk);
	r = vhd_file_open(&vf, pa, VHD_FILE_RDONLY, &err);
	ck_assert_msg(r == 0, "reopen after a clean close: %s", err.msg);
	ck_assert_uint_eq(vf->m.bat[200], VHD_BAT_UNUSED);
	ck_assert_uint_eq(vf->m.allocated, 2);
	vhd_file_close(vf);
	ck_assert_msg(vhd_file_check(pa, 0, &err) == 0, "check: %s", err.msg);
	free(data);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("vhd-driver");
	TCase *tc = tcase_create("driver");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, parallel_random_io);
	tcase_add_test(tc, new_dynamic_block_has_every_bit);
	tcase_add_test(tc, concurrent_bits_stay_written);
	tcase_add_test(tc, concurrent_alloc_same_block);
	tcase_add_test(tc, chain_three_deep);
	tcase_add_test(tc, block_status);
	tcase_add_test(tc, for_each_block);
	tcase_add_test(tc, for_each_run);
	tcase_add_test(tc, online_make_empty);
	tcase_add_test(tc, make_empty_inside_a_read_completion);
	tcase_add_test(tc, first_touch_stays_sparse);
	tcase_add_test(tc, bitmap_page_keeps_neighbours);
	tcase_add_test(tc, make_empty_then_allocate_waits_for_sync);
	tcase_add_test(tc, moved_footer_leaves_no_trace);
	tcase_add_test(tc, footer_at_limit_then_trimmed);
	tcase_add_test(tc, footer_steps_when_file_size_limited);
	tcase_add_test(tc, dynamic_reuse_hides_old_data);
	tcase_add_test(tc, dynamic_reuse_after_reopen);
	tcase_add_test(tc, zero_writes_into_fresh_blocks);
	tcase_add_test(tc, zero_writes_into_reused_space);
	tcase_add_test(tc, unaligned_footer_moves);
	tcase_add_test(tc, online_commit);
	tcase_add_test(tc, bad_file_untouched);
	tcase_add_test(tc, served_files_are_locked);
	tcase_add_test(tc, crash_safety_dynamic);
	tcase_add_test(tc, crash_safety_differencing);
	tcase_add_test(tc, crash_safety_reused_space);
	tcase_add_test(tc, crash_safety_footer_moves);
	tcase_add_test(tc, crash_safety_scratch);
	tcase_add_test(tc, scratch_mode_skips_ordering_syncs);
	tcase_add_test(tc, host_crash_in_fresh_space);
	suite_add_tcase(s, tc);

	tc = tcase_create("found-by-review");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, overlapping_write_waits_for_its_bits);
	tcase_add_test(tc, reopen_after_kill_places_and_trims);
	tcase_add_test(tc, failed_early_alloc_cleared_by_make_empty);
	suite_add_tcase(s, tc);

	/* CK_RUN_CASE=powercut runs these alone. */
	tc = tcase_create("powercut");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, power_cut_dynamic);
	tcase_add_test(tc, power_cut_differencing);
	tcase_add_test(tc, power_cut_reused_space);
	tcase_add_test(tc, power_cut_across_make_empty);
	tcase_add_test(tc, power_cut_sees_scratch_mode);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	tdr_log_init("test-vhd-driver", false, TDR_LOG_WARN);
	return check_run(suite(), CHECK_RUN_FORK);
}
