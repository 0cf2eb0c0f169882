/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Unit tests of the request and driver model: spec parsing, chain opening
 * (parents, loops, validation), request splitting and forwarding, range
 * checks, drain, write-zeroes emulation.  Uses two test drivers: "tmem", an
 * in-memory image described by a small text file (so chains have real paths),
 * and "tfilter", a pass-through filter.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "check-run.h"

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;
static char dir[] = "/tmp/tdr-test-req-XXXXXX";

/* ------------------------------------------------------- driver tmem */

/*
 * Descriptor file lines: "size N" (sectors), "parent PATH", "alloc A B"
 * (sectors A..B-1 hold data: byte = fill ^ sector), "fill X", "badparent".
 */
struct tmem {
	uint64_t size;
	char parent[256];
	unsigned char fill;
	bool badparent;
	bool *alloc;
	unsigned char *data;
};

static int tmem_open_count;
static bool tmem_hold;
static struct tdr_list held = TDR_LIST_INIT(held);

static int tmem_open(struct td_image *img, const char *params, unsigned flags)
{
	struct tmem *m = img->priv;
	FILE *f = fopen(params, "r");
	char line[512];

	if (!f) {
		tdr_set_error("%s: no such file", params);
		return -errno;
	}
	m->size = 16;
	while (fgets(line, sizeof(line), f)) {
		unsigned long long a;
		unsigned x;

		if (sscanf(line, "size %llu", &a) == 1)
			m->size = a;
		else if (sscanf(line, "parent %255s", m->parent) == 1)
			;
		else if (sscanf(line, "fill %x", &x) == 1)
			m->fill = (unsigned char)x;
		else if (strncmp(line, "badparent", 9) == 0)
			m->badparent = true;
	}
	m->alloc = calloc(m->size, sizeof(bool));
	m->data = calloc(m->size, TD_SECTOR_SIZE);
	rewind(f);
	while (fgets(line, sizeof(line), f)) {
		unsigned long long a, b;

		if (sscanf(line, "alloc %llu %llu", &a, &b) == 2)
			for (unsigned long long s = a; s < b && s < m->size; s++) {
				m->alloc[s] = true;
				memset(m->data + s * TD_SECTOR_SIZE, m->fill ^ (unsigned char)s,
				       TD_SECTOR_SIZE);
			}
	}
	fclose(f);
	img->size_secs = m->size;
	tmem_open_count++;
	return 0;
}

static void tmem_close(struct td_image *img)
{
	struct tmem *m = img->priv;

	free(m->alloc);
	free(m->data);
	tmem_open_count--;
}

static void tmem_finish(struct td_request *req, int err)
{
	if (tmem_hold) {
		req->drv_u64 = (uint64_t)(unsigned)err;
		tdr_list_add_tail(&req->entry, &held);
		return;
	}
	td_complete_request(req, err);
}

static void tmem_release_all(void)
{
	struct tdr_list *pos, *tmp;

	tdr_list_for_each_safe(pos, tmp, &held) {
		struct td_request *req = tdr_list_entry(pos, struct td_request, entry);

		tdr_list_del(&req->entry);
		td_complete_request(req, (int)(unsigned)req->drv_u64);
	}
}

/* Serves allocated runs itself and forwards the others: the tapdisk pattern. */
static void tmem_queue_read(struct td_image *img, struct td_request *req)
{
	struct tmem *m = img->priv;
	uint64_t s = req->sec, end = req->sec + req->secs;

	td_request_split_begin(req);
	while (s < end) {
		bool a = m->alloc[s];
		uint64_t e = s;
		struct td_request *sub;

		while (e < end && m->alloc[e] == a)
			e++;
		sub = td_request_sub(req, s, (uint32_t)(e - s));
		if (sub) {
			if (a) {
				memcpy(sub->buf, m->data + s * TD_SECTOR_SIZE,
				       (size_t)(e - s) * TD_SECTOR_SIZE);
				tmem_finish(sub, 0);
			} else {
				td_forward_request(img, sub);
			}
		}
		s = e;
	}
	td_request_split_end(req);
}

static void tmem_queue_write(struct td_image *img, struct td_request *req)
{
	struct tmem *m = img->priv;

	memcpy(m->data + req->sec * TD_SECTOR_SIZE, req->buf, (size_t)req->secs * TD_SECTOR_SIZE);
	for (uint64_t s = req->sec; s < req->sec + req->secs; s++)
		m->alloc[s] = true;
	tmem_finish(req, 0);
}

static void tmem_queue_block_status(struct td_image *img, struct td_request *req)
{
	struct tmem *m = img->priv;
	uint64_t e = req->sec;

	while (e < req->sec + req->secs && m->alloc[e] == m->alloc[req->sec])
		e++;
	if (!m->alloc[req->sec]) {
		/* Ask the parent about exactly the unallocated run. */
		struct td_request *sub;

		td_request_split_begin(req);
		sub = td_request_sub(req, req->sec, (uint32_t)(e - req->sec));
		if (sub)
			td_forward_request(img, sub);
		td_request_split_end(req);
		return;
	}
	req->bs_secs = (uint32_t)(e - req->sec);
	req->bs_flags = 0;
	td_complete_request(req, 0);
}

static int tmem_get_parent_id(struct td_image *img, struct td_parent_id *id)
{
	struct tmem *m = img->priv;

	if (!m->parent[0])
		return TD_NO_PARENT;
	strcpy(id->drv, "tmem");
	snprintf(id->path, sizeof(id->path), "%s", m->parent);
	return 0;
}

static int tmem_validate_parent(struct td_image *img, struct td_image *parent)
{
	struct tmem *m = img->priv;

	if (m->badparent) {
		tdr_set_error("%s: parent %s has the wrong UUID", img->params, parent->params);
		return -EINVAL;
	}
	return 0;
}

static const struct td_driver tmem_drv = {
	.name = "tmem",
	.priv_size = sizeof(struct tmem),
	.open = tmem_open,
	.close = tmem_close,
	.queue_read = tmem_queue_read,
	.queue_write = tmem_queue_write,
	.queue_block_status = tmem_queue_block_status,
	.get_parent_id = tmem_get_parent_id,
	.validate_parent = tmem_validate_parent,
};

/* ----------------------------------------------------- driver tfilter */

static int tfilter_forwarded;
/* Work of the filter's own in flight (a replica's copy, say), and quiesce() calls. */
static uint64_t tfilter_own;
static int tfilter_quiesced;

static int tfilter_open(struct td_image *img, const char *params, unsigned flags)
{
	if (!img->parent) {
		tdr_set_error("tfilter: no image below");
		return -EINVAL;
	}
	img->size_secs = img->parent->size_secs;
	return 0;
}

static void tfilter_close(struct td_image *img)
{
}

static void tfilter_queue(struct td_image *img, struct td_request *req)
{
	tfilter_forwarded++;
	td_forward_request(img, req);
}

static void tfilter_quiesce(struct td_image *img)
{
	tfilter_quiesced++;
}

static uint64_t tfilter_busy(struct td_image *img)
{
	return tfilter_own;
}

static const struct td_driver tfilter_drv = {
	.name = "tfilter",
	.is_filter = true,
	.open = tfilter_open,
	.close = tfilter_close,
	.queue_read = tfilter_queue,
	.queue_write = tfilter_queue,
	.quiesce = tfilter_quiesce,
	.busy = tfilter_busy,
};

/* ------------------------------------------------------------ helpers */

static char *mkdesc(const char *name, const char *content)
{
	static char paths[8][512];
	static int next;
	char *p = paths[next++ % 8];
	FILE *f;

	snprintf(p, 512, "%s/%s", dir, name);
	f = fopen(p, "w");
	ck_assert_ptr_nonnull(f);
	fputs(content, f);
	fclose(f);
	return p;
}

struct done {
	bool done;
	int err;
	int calls;
};

static void req_done(struct td_request *req, int err, void *arg)
{
	struct done *d = arg;

	d->done = true;
	d->err = err;
	d->calls++;
}

static int run_req(struct td_disk *disk, enum td_op op, uint64_t sec, uint32_t secs, char *buf,
		   unsigned flags, struct td_request *out)
{
	struct td_request req;
	struct done d = { 0 };

	td_request_init(&req, op, sec, secs, buf, req_done, &d);
	req.flags = flags;
	td_disk_submit(disk, &req);
	for (int i = 0; i < 1000 && !d.done; i++)
		tdr_loop_run_once(loop, 100);
	ck_assert(d.done);
	ck_assert_int_eq(d.calls, 1);
	if (out)
		*out = req;
	return d.err;
}

static void setup(void)
{
	strcpy(dir, "/tmp/tdr-test-req-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	loop = tdr_loop_new();
	io = tdr_io_ctx_new(loop, 64);
	ck_assert_ptr_nonnull(io);
	td_driver_register(&tmem_drv);
	td_driver_register(&tfilter_drv);
	tmem_hold = false;
	tmem_open_count = 0;
	tfilter_forwarded = 0;
	tfilter_own = 0;
	tfilter_quiesced = 0;
}

static void teardown(void)
{
	char cmd[600];

	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	ck_assert_int_eq(system(cmd), 0);
}

/* -------------------------------------------------------------- tests */

START_TEST(spec_entry_split)
{
	char type[8];
	const char *params;

	ck_assert_int_eq(td_spec_split_entry("aio:/x/y", type, sizeof(type), &params), 0);
	ck_assert_str_eq(type, "aio");
	ck_assert_str_eq(params, "/x/y");
	ck_assert_int_eq(td_spec_split_entry("vhd:", type, sizeof(type), &params), 0);
	ck_assert_str_eq(params, "");
	ck_assert_int_eq(td_spec_split_entry("/x/y", type, sizeof(type), &params), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "is not a disk spec; write TYPE:PARAMS"));
	ck_assert_int_eq(td_spec_split_entry(":/x", type, sizeof(type), &params), -EINVAL);
	ck_assert_int_eq(td_spec_split_entry("waytoolongtype:/x", type, sizeof(type), &params), -EINVAL);
}
END_TEST

struct kv {
	char out[256];
	int stop_at;
	int n;
};

static int collect(const char *key, const char *value, void *arg)
{
	struct kv *kv = arg;

	if (++kv->n == kv->stop_at)
		return -E2BIG;
	strcat(kv->out, key);
	strcat(kv->out, "=");
	strcat(kv->out, value);
	strcat(kv->out, ";");
	return 0;
}

START_TEST(option_parsing)
{
	struct kv kv = { "", 0, 0 };

	ck_assert_int_eq(td_parse_options("mode=secondary,bare,,x=1=2", collect, &kv), 0);
	ck_assert_str_eq(kv.out, "mode=secondary;bare=;x=1=2;");
	memset(&kv, 0, sizeof(kv));
	kv.stop_at = 2;
	ck_assert_int_eq(td_parse_options("a=1,b=2,c=3", collect, &kv), -E2BIG);
	ck_assert_str_eq(kv.out, "a=1;");
	ck_assert_int_eq(td_parse_options("", collect, &kv), 0);
	ck_assert_int_eq(td_parse_options(NULL, collect, &kv), 0);
}
END_TEST

START_TEST(open_errors)
{
	struct td_disk *disk = (void *)1;
	char spec[1024], *empty;

	ck_assert_int_eq(td_disk_open(&disk, "nope:/x", 0, loop, io), -EINVAL);
	ck_assert_ptr_null(disk);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "unknown image type 'nope'"));
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "aio"));
	ck_assert_int_eq(td_disk_open(&disk, "", 0, loop, io), -EINVAL);
	ck_assert_int_eq(td_disk_open(&disk, "aio:/a|aio:/b", 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "not a filter"));
	ck_assert_int_eq(td_disk_open(&disk, "tfilter:", 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "needs an image below it"));
	snprintf(spec, sizeof(spec), "aio:%s/missing.img", dir);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -ENOENT);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "no such file"));
	snprintf(spec, sizeof(spec), "aio:%s", dir);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -EISDIR);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "is a directory"));
	empty = mkdesc("empty.img", "");
	snprintf(spec, sizeof(spec), "aio:%s", empty);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "empty"));
	ck_assert_int_eq(tmem_open_count, 0);
}
END_TEST

/* Three layers: every sector reads its newest version; writes land in the leaf. */
START_TEST(chain_reads_newest_version)
{
	char d1[600], d2[600], spec[700];
	char *bottom = mkdesc("bottom", "size 16\nfill 10\nalloc 0 16\n");
	struct td_disk *disk;
	char *buf = malloc(16 * TD_SECTOR_SIZE);
	struct tmem *leaf, *mid, *bot;

	snprintf(d1, sizeof(d1), "size 16\nfill 20\nalloc 2 8\nparent %s\n", bottom);
	char *middle = mkdesc("middle", d1);

	snprintf(d2, sizeof(d2), "size 16\nfill 30\nalloc 0 4\nalloc 10 11\nparent %s\n", middle);
	char *top = mkdesc("top", d2);

	snprintf(spec, sizeof(spec), "tmem:%s", top);
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_int_eq(tmem_open_count, 3);
	ck_assert_uint_eq(disk->size_secs, 16);
	ck_assert_ptr_eq(disk->top->parent->parent, disk->bottom);
	ck_assert_ptr_eq(disk->bottom->child->child, disk->top);

	ck_assert_int_eq(run_req(disk, TD_OP_READ, 0, 16, buf, 0, NULL), 0);
	for (unsigned s = 0; s < 16; s++) {
		unsigned char fill = (s < 4 || s == 10) ? 0x30 : (s < 8 ? 0x20 : 0x10);

		for (unsigned b = 0; b < TD_SECTOR_SIZE; b++)
			ck_assert_msg((unsigned char)buf[s * TD_SECTOR_SIZE + b] == (fill ^ s),
				      "sector %u byte %u", s, b);
	}
	/* top serves 0-3 and 10, forwards 4-9 and 11-15; middle serves 4-7. */
	ck_assert_uint_eq(disk->top->stats.forwarded, 2);
	ck_assert_uint_eq(disk->top->parent->stats.forwarded, 2);

	memset(buf, 0xee, 4 * TD_SECTOR_SIZE);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 5, 4, buf, 0, NULL), 0);
	leaf = disk->top->priv;
	mid = disk->top->parent->priv;
	bot = disk->bottom->priv;
	for (unsigned s = 5; s < 9; s++) {
		ck_assert(leaf->alloc[s]);
		ck_assert_int_eq(leaf->data[s * TD_SECTOR_SIZE], 0xee);
	}
	ck_assert_int_eq(mid->data[5 * TD_SECTOR_SIZE], 0x20 ^ 5);
	ck_assert_int_eq(bot->data[5 * TD_SECTOR_SIZE], 0x10 ^ 5);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 4, 6, buf, 0, NULL), 0);
	ck_assert_int_eq((unsigned char)buf[0], 0x20 ^ 4);
	for (unsigned s = 1; s < 5; s++)
		ck_assert_int_eq((unsigned char)buf[s * TD_SECTOR_SIZE + 100], 0xee);
	ck_assert_int_eq((unsigned char)buf[5 * TD_SECTOR_SIZE], 0x10 ^ 9);

	td_disk_close(disk);
	ck_assert_int_eq(tmem_open_count, 0);
	free(buf);
}
END_TEST

START_TEST(chain_loop_detected)
{
	char d[600], spec[700];
	char *a = mkdesc("a", "size 16\n");	/* rewritten below */
	char apath[512];

	strcpy(apath, a);
	snprintf(d, sizeof(d), "size 16\nparent %s\n", apath);
	char *b = mkdesc("b", d);

	snprintf(d, sizeof(d), "size 16\nparent %s\n", b);
	mkdesc("a", d);
	snprintf(spec, sizeof(spec), "tmem:%s", apath);
	struct td_disk *disk = NULL;

	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -ELOOP);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "loops"));
	ck_assert_int_eq(tmem_open_count, 0);
}
END_TEST

START_TEST(chain_missing_and_bad_parent)
{
	char d[600], spec[700];
	struct td_disk *disk = NULL;

	snprintf(d, sizeof(d), "size 16\nparent %s/gone\n", dir);
	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("orphan", d));
	ck_assert_int_lt(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "gone"));
	ck_assert_int_eq(tmem_open_count, 0);

	char *p = mkdesc("p", "size 16\n");

	snprintf(d, sizeof(d), "size 16\nbadparent\nparent %s\n", p);
	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("c", d));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), -EINVAL);
	ck_assert_ptr_nonnull(strstr(tdr_last_error(), "wrong UUID"));
	ck_assert_int_eq(tmem_open_count, 0);
}
END_TEST

START_TEST(range_and_permission_checks)
{
	char spec[700];
	struct td_disk *disk;
	char buf[2 * TD_SECTOR_SIZE];

	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("r", "size 16\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 15, 2, buf, 0, NULL), -EINVAL);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 15, 2, buf, 0, NULL), -ENOSPC);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE_ZEROES, UINT64_MAX - 1, 2, NULL, 0, NULL), -ENOSPC);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 17, 0, buf, 0, NULL), -EINVAL);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 16, 0, buf, 0, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 14, 2, buf, 0, NULL), 0);
	ck_assert_uint_eq(disk->inflight, 0);
	td_disk_close(disk);

	ck_assert_int_eq(td_disk_open(&disk, spec, TD_OPEN_RDONLY, loop, io), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE, 0, 1, buf, 0, NULL), -EPERM);
	ck_assert_int_eq(run_req(disk, TD_OP_DISCARD, 0, 1, NULL, 0, NULL), -EPERM);
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 0, 1, buf, 0, NULL), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_FLUSH, 0, 0, NULL, 0, NULL), 0);
	td_disk_close(disk);
}
END_TEST

START_TEST(filter_stack)
{
	char spec[700];
	struct td_disk *disk;
	char *buf = malloc(4 * TD_SECTOR_SIZE);

	snprintf(spec, sizeof(spec), "tfilter:opt=1|tmem:%s",
		 mkdesc("f", "size 8\nfill 40\nalloc 0 8\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_str_eq(disk->top->drv->name, "tfilter");
	ck_assert_str_eq(disk->top->params, "opt=1");
	ck_assert_uint_eq(disk->size_secs, 8);
	ck_assert_ptr_eq(td_disk_find_image(disk, "tmem"), disk->bottom);
	ck_assert_ptr_null(td_disk_find_image(disk, "vhd"));
	ck_assert_int_eq(run_req(disk, TD_OP_READ, 2, 4, buf, 0, NULL), 0);
	ck_assert_int_eq((unsigned char)buf[0], 0x40 ^ 2);
	ck_assert_int_eq((unsigned char)buf[3 * TD_SECTOR_SIZE], 0x40 ^ 5);
	ck_assert_int_eq(tfilter_forwarded, 1);
	/* A filter without its own flush/status handlers passes them down. */
	struct td_request out;

	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 0, 8, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_secs, 8);
	ck_assert_uint_eq(out.bs_flags, 0);
	ck_assert_int_eq(run_req(disk, TD_OP_FLUSH, 0, 0, NULL, 0, NULL), 0);
	td_disk_close(disk);
	free(buf);
}
END_TEST

START_TEST(block_status_through_chain)
{
	char d[600], spec[700];
	struct td_disk *disk;
	struct td_request out;
	char *bottom = mkdesc("bsb", "size 32\nalloc 8 12\n");

	snprintf(d, sizeof(d), "size 32\nalloc 0 4\nparent %s\n", bottom);
	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("bst", d));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 0, 32, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_secs, 4);
	ck_assert_uint_eq(out.bs_flags, 0);
	/* 4..7: unallocated in both: a zero hole below the bottom. */
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 4, 28, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_secs, 4);
	ck_assert_uint_eq(out.bs_flags, TD_BS_HOLE | TD_BS_ZERO);
	ck_assert_int_eq(run_req(disk, TD_OP_BLOCK_STATUS, 8, 24, NULL, 0, &out), 0);
	ck_assert_uint_eq(out.bs_secs, 4);
	ck_assert_uint_eq(out.bs_flags, 0);
	td_disk_close(disk);
}
END_TEST

static int drained;

static void on_drained(struct td_disk *disk, void *arg)
{
	drained++;
	ck_assert_uint_eq(disk->inflight, 0);
}

START_TEST(drain_waits_for_in_flight)
{
	char spec[700];
	struct td_disk *disk;
	struct td_request reqs[3];
	struct done d[3] = { 0 };
	struct td_drain_waiter w = { .cb = on_drained };
	char buf[3][TD_SECTOR_SIZE];

	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("d", "size 16\nalloc 0 16\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	drained = 0;

	/* Nothing in flight: the waiter runs on the next loop turn, not inside the call. */
	td_disk_drain(disk, &w);
	ck_assert_int_eq(drained, 0);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(drained, 1);

	tmem_hold = true;
	for (int i = 0; i < 3; i++) {
		td_request_init(&reqs[i], i == 1 ? TD_OP_WRITE : TD_OP_READ, (uint64_t)i, 1, buf[i],
				req_done, &d[i]);
		td_disk_submit(disk, &reqs[i]);
	}
	ck_assert_uint_eq(disk->inflight, 3);
	td_disk_drain(disk, &w);
	for (int i = 0; i < 5; i++)
		tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(drained, 1);
	tmem_hold = false;
	tmem_release_all();
	/* Not inside the completion that drained it: on the next loop turn. */
	ck_assert_int_eq(drained, 1);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(drained, 2);
	for (int i = 0; i < 3; i++) {
		ck_assert(d[i].done);
		ck_assert_int_eq(d[i].err, 0);
	}
	td_disk_close(disk);
}
END_TEST

static void on_drained_close(struct td_disk *disk, void *arg)
{
	drained++;
	*(struct td_disk **)arg = NULL;
	td_disk_close(disk);
}

/*
 * A waiter may close the disk (the caller's last step before exit), and a
 * disk closed with a waiter scheduled never calls it (ASan checks both).
 */
START_TEST(drain_waiter_closes_the_disk)
{
	char spec[700];
	struct td_disk *disk;
	struct td_request req;
	struct done d = { 0 };
	struct td_drain_waiter w = { .cb = on_drained_close };
	char buf[TD_SECTOR_SIZE];

	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("d", "size 16\nalloc 0 16\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	drained = 0;
	tmem_hold = true;
	td_request_init(&req, TD_OP_READ, 0, 1, buf, req_done, &d);
	td_disk_submit(disk, &req);
	w.arg = &disk;
	td_disk_drain(disk, &w);
	tmem_hold = false;
	tmem_release_all();
	ck_assert(d.done);
	ck_assert_int_eq(drained, 0);
	tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(drained, 1);
	ck_assert_ptr_null(disk);

	/* Scheduled (nothing in flight), then the disk closes first. */
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	td_disk_drain(disk, &w);
	td_disk_close(disk);
	for (int i = 0; i < 3; i++)
		tdr_loop_run_once(loop, 0);
	ck_assert_int_eq(drained, 1);
}
END_TEST

static int quiesced;

static void on_quiesced(struct td_disk *disk, void *arg)
{
	quiesced++;
	ck_assert_ptr_eq(arg, &quiesced);
	ck_assert_uint_eq(td_disk_busy(disk, NULL), 0);
}

static void spin(int turns)
{
	for (int i = 0; i < turns; i++)
		tdr_loop_run_once(loop, 2);
}

/* A close waits for the images' own work too, not only for guest requests. */
START_TEST(quiesce_waits_for_images_own_work)
{
	char spec[700];
	struct td_disk *disk;
	struct td_request req;
	struct done d = { 0 };
	struct td_quiesce q = { 0 };
	struct td_image *who;
	char buf[TD_SECTOR_SIZE];

	snprintf(spec, sizeof(spec), "tfilter:|tmem:%s", mkdesc("q", "size 16\nalloc 0 16\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	quiesced = 0;
	ck_assert_uint_eq(td_disk_busy(disk, &who), 0);
	ck_assert_ptr_null(who);

	/* A guest request held in tmem, and two pieces of the filter's own work. */
	tmem_hold = true;
	td_request_init(&req, TD_OP_READ, 3, 1, buf, req_done, &d);
	td_disk_submit(disk, &req);
	tfilter_own = 2;
	ck_assert_uint_eq(td_disk_busy(disk, &who), 3);
	ck_assert_ptr_eq(who, disk->top);

	td_disk_quiesce(disk, &q, on_quiesced, &quiesced);
	ck_assert_int_eq(tfilter_quiesced, 1);
	spin(5);
	ck_assert_int_eq(quiesced, 0);
	tmem_hold = false;
	tmem_release_all();
	ck_assert(d.done);
	ck_assert_uint_eq(disk->inflight, 0);
	spin(5);
	ck_assert_int_eq(quiesced, 0);	/* the filter still works */
	tfilter_own = 1;
	spin(5);
	ck_assert_int_eq(quiesced, 0);
	tfilter_own = 0;
	spin(5);
	ck_assert_int_eq(quiesced, 1);

	/* Again: the images are told once; the callback never runs inside the call. */
	td_disk_quiesce(disk, &q, on_quiesced, &quiesced);
	ck_assert_int_eq(quiesced, 1);
	spin(2);
	ck_assert_int_eq(quiesced, 2);
	ck_assert_int_eq(tfilter_quiesced, 1);

	/* Cancelled: no callback, even once idle. */
	tfilter_own = 1;
	td_disk_quiesce(disk, &q, on_quiesced, &quiesced);
	spin(2);
	td_disk_quiesce_cancel(&q);
	tfilter_own = 0;
	spin(5);
	ck_assert_int_eq(quiesced, 2);
	td_disk_close(disk);
}
END_TEST

/* A close that waits too long says so, naming the busy image, and says it again. */
START_TEST(quiesce_warns_when_stuck)
{
	char spec[700], log[4096] = "", path[] = "/tmp/tdr-test-log.XXXXXX";
	struct td_disk *disk;
	struct td_quiesce q = { .warn_every_ns = 20 * 1000 * 1000ull };
	const char *p;
	int fd, saved, warnings = 0;
	ssize_t n;

	snprintf(spec, sizeof(spec), "tfilter:|tmem:%s", mkdesc("w", "size 16\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	quiesced = 0;
	tfilter_own = 1;
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	fflush(stderr);
	saved = dup(STDERR_FILENO);
	ck_assert_int_ge(saved, 0);
	ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
	td_disk_quiesce(disk, &q, on_quiesced, &quiesced);
	/* Until the second warning (every 20 ms), or 10 s, which would be a failure. */
	for (uint64_t end = tdr_now_ns() + 10000 * 1000 * 1000ull; tdr_now_ns() < end; ) {
		tdr_loop_run_once(loop, 2);
		fflush(stderr);
		n = pread(fd, log, sizeof(log) - 1, 0);
		ck_assert_int_ge(n, 0);
		log[n] = '\0';
		warnings = 0;
		for (p = log; (p = strstr(p, " s for 1 requests in flight (tfilter:")); p++)
			warnings++;
		if (warnings >= 2)
			break;
	}
	ck_assert_int_ge(dup2(saved, STDERR_FILENO), 0);
	close(saved);
	close(fd);
	unlink(path);
	ck_assert_msg(warnings >= 2, "%d warnings in:\n%s", warnings, log);
	ck_assert_int_eq(quiesced, 0);
	ck_assert_msg(strstr(log, "the storage below may be stuck"), "%s", log);
	ck_assert_msg(strstr(log, ": closing: still waiting after "), "%s", log);
	/* The work ends: the close goes on. */
	tfilter_own = 0;
	spin(5);
	ck_assert_int_eq(quiesced, 1);
	td_disk_close(disk);
}
END_TEST

START_TEST(write_zeroes_emulated)
{
	char spec[700];
	struct td_disk *disk;
	struct tmem *m;

	snprintf(spec, sizeof(spec), "tmem:%s", mkdesc("z", "size 4096\nfill 77\nalloc 0 4096\n"));
	ck_assert_int_eq(td_disk_open(&disk, spec, 0, loop, io), 0);
	m = disk->top->priv;
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE_ZEROES, 10, 3000, NULL, TD_REQ_FAST_ZERO, NULL),
			 -ENOTSUP);
	ck_assert_int_eq(m->data[10 * TD_SECTOR_SIZE], 0x77 ^ 10);
	ck_assert_int_eq(run_req(disk, TD_OP_WRITE_ZEROES, 10, 3000, NULL, 0, NULL), 0);
	for (size_t b = 10 * TD_SECTOR_SIZE; b < 3010 * TD_SECTOR_SIZE; b++)
		ck_assert_msg(m->data[b] == 0, "byte %zu", b);
	ck_assert_int_eq(m->data[9 * TD_SECTOR_SIZE], 0x77 ^ 9);
	ck_assert_int_eq(m->data[3010 * TD_SECTOR_SIZE], (0x77 ^ 3010) & 0xff);
	/* 3000 sectors in 1 MiB pieces: two writes. */
	ck_assert_uint_eq(disk->top->stats.wr_reqs, 2);
	/* TRIM on a driver that cannot: a successful no-op. */
	ck_assert_int_eq(run_req(disk, TD_OP_DISCARD, 0, 8, NULL, 0, NULL), 0);
	ck_assert_int_eq(m->data[0], 0x77);
	td_disk_close(disk);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("request");
	TCase *tc = tcase_create("model");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, spec_entry_split);
	tcase_add_test(tc, option_parsing);
	tcase_add_test(tc, open_errors);
	tcase_add_test(tc, chain_reads_newest_version);
	tcase_add_test(tc, chain_loop_detected);
	tcase_add_test(tc, chain_missing_and_bad_parent);
	tcase_add_test(tc, range_and_permission_checks);
	tcase_add_test(tc, filter_stack);
	tcase_add_test(tc, block_status_through_chain);
	tcase_add_test(tc, drain_waits_for_in_flight);
	tcase_add_test(tc, drain_waiter_closes_the_disk);
	tcase_add_test(tc, quiesce_waits_for_images_own_work);
	tcase_add_test(tc, quiesce_warns_when_stuck);
	tcase_add_test(tc, write_zeroes_emulated);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_NOFORK);
}
