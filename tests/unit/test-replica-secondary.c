/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The replica driver in secondary mode, on a real VHD chain
 * (active over hidden over secondary), with byte-exact checks of the SVM's
 * view and of each layer: every scenario of the secondary issue, every
 * operation in every wrong state, injected failures, power cuts during a
 * failover, and a randomized test against an in-memory model.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/replica.h"
#include "tdr/vhd.h"
#include "check-run.h"
#include "powercut.h"

extern const struct td_driver td_drv_replica;

#define MIB (1u << 20)
#define DISK_SIZE (8 * MIB)
#define DISK_SECS (DISK_SIZE / 512)

static struct tdr_loop *loop;
static struct tdr_io_ctx *io;
static char dir[] = "/var/tmp/tdr-test-sec-XXXXXX";
static char p_sec[600], p_hidden[600], p_active[600], spec[700];
static struct td_disk *disk;
static struct td_image *rep, *active, *hidden, *secondary;
static struct td_disk *exp_disk;

/* ---------------------------------------------------------- helpers */

struct done {
	bool done;
	int err;
	char msg[300];
};

static void req_done(struct td_request *req, int err, void *arg)
{
	struct done *d = arg;

	d->done = true;
	d->err = err;
}

static void run_until(bool *flag)
{
	for (int i = 0; i < 200000 && !*flag; i++)
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	ck_assert_msg(*flag, "operation never completed");
}

/* Through a disk (SVM: disk; primary: exp_disk). */
static int dio(struct td_disk *d, enum td_op op, uint64_t sec, uint32_t secs, void *buf)
{
	struct td_request req;
	struct done dn = { 0 };

	td_request_init(&req, op, sec, secs, buf, req_done, &dn);
	td_disk_submit(d, &req);
	run_until(&dn.done);
	return dn.err;
}

/* Straight into one image of the chain (reads forward clear bits to its parents). */
static int iio(struct td_image *img, enum td_op op, uint64_t sec, uint32_t secs, void *buf)
{
	struct td_request req;
	struct done dn = { 0 };

	td_request_init(&req, op, sec, secs, buf, req_done, &dn);
	td_queue_request(img, &req);
	run_until(&dn.done);
	return dn.err;
}

static void op_done_cb(void *arg, int err, const char *msg)
{
	struct done *d = arg;

	d->done = true;
	d->err = err;
	snprintf(d->msg, sizeof(d->msg), "%s", msg);
}

static char last_msg[300];

static int op(const char *line)
{
	struct replica_cmd cmd;
	struct done dn = { 0 };
	char msg[256];
	int r = replica_parse(line, &cmd, msg, sizeof(msg));

	if (r < 0) {
		snprintf(last_msg, sizeof(last_msg), "%s", msg);
		return r;
	}
	replica_execute(rep, &cmd, op_done_cb, &dn);
	run_until(&dn.done);
	snprintf(last_msg, sizeof(last_msg), "%s", dn.msg);
	return dn.err;
}

static enum replica_state state(void)
{
	struct replica_status st;

	replica_get_status(rep, &st);
	return st.state;
}

static void wait_state_not(enum replica_state s)
{
	for (int i = 0; i < 200000 && state() == s; i++)
		tdr_loop_run_once(loop, 100);
	ck_assert_int_ne(state(), s);
}

/* Runs failover to its end; the state must then be want. */
static void failover_to(enum replica_state want)
{
	ck_assert_int_eq(op("failover"), 0);
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), want);
}

static void fill(char *buf, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (char)((i * 131 + seed * 7919 + (i >> 9) * 17) & 0xff);
}

static char *xalloc(size_t len)
{
	char *p = tdr_io_alloc(len);

	ck_assert_ptr_nonnull(p);
	return p;
}

/* The bytes of [sec, sec+secs) as an image of the chain sees them. */
static void expect_image(struct td_image *img, uint64_t sec, uint32_t secs, const char *want)
{
	char *got = xalloc((size_t)secs * 512);

	ck_assert_int_eq(iio(img, TD_OP_READ, sec, secs, got), 0);
	ck_assert_msg(memcmp(got, want, (size_t)secs * 512) == 0, "%s differs at sector %llu",
		      img->params, (unsigned long long)sec);
	free(got);
}

/* A statistic of img's driver (its "key=value" lines); fails the test if absent. */
static unsigned long long img_stat(struct td_image *img, const char *key)
{
	char *text = NULL, *p, pat[64];
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);
	unsigned long long v;

	ck_assert_ptr_nonnull(f);
	img->drv->stats(img, f);
	fclose(f);
	snprintf(pat, sizeof(pat), " %s=", key);
	p = strstr(text, pat);
	ck_assert_msg(p, "%s: no %s in its statistics", img->params, key);
	v = strtoull(p + strlen(pat), NULL, 10);
	free(text);
	return v;
}

/* Scratch mode of active and hidden (the secondary disk never has it). */
static void expect_scratch(unsigned on)
{
	ck_assert_uint_eq(img_stat(active, "scratch"), on);
	ck_assert_uint_eq(img_stat(hidden, "scratch"), on);
	ck_assert_uint_eq(img_stat(secondary, "scratch"), 0);
}

static void expect_disk(struct td_disk *d, uint64_t sec, uint32_t secs, const char *want)
{
	char *got = xalloc((size_t)secs * 512);

	ck_assert_int_eq(dio(d, TD_OP_READ, sec, secs, got), 0);
	ck_assert_msg(memcmp(got, want, (size_t)secs * 512) == 0, "%s differs at sector %llu",
		      d->spec, (unsigned long long)sec);
	free(got);
}

static void make_chain(uint64_t size)
{
	struct vhd_error e;

	snprintf(p_sec, sizeof(p_sec), "%s/secondary.vhd", dir);
	snprintf(p_hidden, sizeof(p_hidden), "%s/hidden.vhd", dir);
	snprintf(p_active, sizeof(p_active), "%s/active.vhd", dir);
	ck_assert_msg(vhd_file_create(p_sec, size, VHD_TYPE_DYNAMIC, 0, &e) == 0, "%s", e.msg);
	ck_assert_msg(vhd_file_snapshot(p_hidden, p_sec, &e) == 0, "%s", e.msg);
	ck_assert_msg(vhd_file_snapshot(p_active, p_hidden, &e) == 0, "%s", e.msg);
}

/* Opens the chain under "replica:mode=secondary" plus opts (",key=value..." or ""). */
static void open_disk_with(const char *opts)
{
	snprintf(spec, sizeof(spec), "replica:mode=secondary%s|vhd:%s", opts, p_active);
	ck_assert_msg(td_disk_open(&disk, spec, 0, loop, io) == 0, "%s", tdr_last_error());
	rep = disk->top;
	active = rep->parent;
	hidden = active->parent;
	secondary = hidden->parent;
	ck_assert_ptr_eq(secondary, disk->bottom);
	exp_disk = replica_export_disk(rep);
	ck_assert_ptr_nonnull(exp_disk);
	ck_assert_str_eq(replica_export_name(rep), "secondary");
}

static void open_disk(void)
{
	open_disk_with("");
}

static void setup(void)
{
	strcpy(dir, "/var/tmp/tdr-test-sec-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	loop = tdr_loop_new();
	io = tdr_io_ctx_new(loop, 128);
	td_driver_register(&td_drv_replica);
	make_chain(DISK_SIZE);
	open_disk();
}

static void teardown(void)
{
	char cmd[700];

	if (disk)
		td_disk_close(disk);
	tdr_io_ctx_free(io);
	tdr_loop_free(loop);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	ck_assert_int_eq(system(cmd), 0);
}

/* ------------------------------------------------------------ tests */

START_TEST(io_before_start)
{
	char *b = xalloc(MIB), *w = xalloc(MIB);

	ck_assert_int_eq(state(), REPLICA_STATE_NONE);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, 8, b), -EIO);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 8, b), -EIO);
	/* A flush (a close's) makes the secondary disk durable. */
	ck_assert_int_eq(dio(disk, TD_OP_FLUSH, 0, 0, NULL), 0);
	/* The initial sync: the primary's writes go straight to the secondary disk. */
	fill(w, MIB, 1);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 2048, MIB / 512, w), 0);
	expect_image(secondary, 2048, MIB / 512, w);
	expect_disk(exp_disk, 2048, MIB / 512, w);
	/* Nothing was copied into hidden. */
	struct replica_status st;

	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.cbw_count, 0);
	ck_assert_uint_eq(st.stats.export_reqs, 1);
	/* start; the SVM then sees the synced disk. */
	ck_assert_int_eq(op("start"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	expect_disk(disk, 2048, MIB / 512, w);
	free(b);
	free(w);
}
END_TEST

START_TEST(primary_write_svm_sees_old_data)
{
	char *old = xalloc(MIB), *neu = xalloc(MIB), *z = xalloc(MIB);

	fill(old, MIB, 2);
	fill(neu, MIB, 3);
	memset(z, 0, MIB);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 4096, MIB / 512, old), 0);
	ck_assert_int_eq(op("start"), 0);
	/* A primary write covering part of a synced range and part of a zero range. */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 4096 + 1024, MIB / 512, neu), 0);
	/* The SVM still sees the checkpoint's content... */
	expect_disk(disk, 4096, MIB / 512, old);
	expect_disk(disk, 4096 + 2048, 1024, z);
	/* ...which hidden holds, while the secondary disk has the new data. */
	expect_image(secondary, 4096 + 1024, MIB / 512, neu);
	expect_image(hidden, 4096, MIB / 512, old);
	expect_image(hidden, 4096 + 2048, 1024, z);
	struct replica_status st;

	replica_get_status(rep, &st);
	/* 1 MiB at 64 KiB chunks, aligned: 16 chunks copied once. */
	ck_assert_uint_eq(st.stats.cbw_count, 16);
	ck_assert_uint_eq(st.stats.cbw_bytes, MIB);
	/* A second write to the same chunks copies nothing more. */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 4096 + 1024, 8, neu), 0);
	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.cbw_count, 16);
	expect_disk(disk, 4096, MIB / 512, old);
	free(old);
	free(neu);
	free(z);
}
END_TEST

static void check_file_empty(const char *path)
{
	struct vhd_file *vf;
	struct vhd_error e;
	uint8_t map[512];

	ck_assert_msg(vhd_file_open(&vf, path, VHD_FILE_RDONLY, &e) == 0, "%s", e.msg);
	for (uint32_t b = 0; b < vf->m.header.max_bat_entries; b++)
		ck_assert_int_eq(vhd_file_read_bitmap(vf, b, map), -ENOENT);
	vhd_file_close(vf);
}

START_TEST(svm_write_then_read_then_checkpoint)
{
	char *a = xalloc(MIB), *b = xalloc(MIB), *c = xalloc(MIB);

	fill(a, MIB, 4);
	fill(b, MIB, 5);
	fill(c, MIB, 6);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, MIB / 512, a), 0);
	ck_assert_int_eq(op("start"), 0);
	/* SVM write then read: its own data, in active only. */
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 100, 200, b), 0);
	expect_disk(disk, 100, 200, b);
	expect_image(active, 100, 200, b);
	expect_image(secondary, 100, 200, a + 100 * 512);
	expect_image(hidden, 100, 200, a + 100 * 512);
	/* The primary writes elsewhere; the SVM does not see it yet. */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 1024, 512, c), 0);
	expect_disk(disk, 1024, 512, a + 1024 * 512);
	/* Checkpoint: the SVM sees the PVM's disk; its own writes are gone. */
	ck_assert_int_eq(op("checkpoint"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	expect_disk(disk, 1024, 512, c);
	expect_disk(disk, 100, 200, a + 100 * 512);
	/* Active and hidden were emptied: they read through to the secondary. */
	memcpy(a + 1024 * 512, c, 512 * 512);
	expect_image(active, 0, MIB / 512, a);
	check_file_empty(p_active);
	check_file_empty(p_hidden);
	struct replica_status st;

	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.checkpoints, 1);
	ck_assert_uint_gt(st.stats.ckpt_last_ns, 0);
	/* After the checkpoint the copy-before-write map starts over. */
	uint64_t before = st.stats.cbw_count;

	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 1024, 8, b), 0);
	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.cbw_count, before + 1);
	expect_disk(disk, 1024, 512, c);
	free(a);
	free(b);
	free(c);
}
END_TEST

/* An SVM write, then two primary writes (w: a MiB of buffer), one over it, one elsewhere. */
static void svm_and_pvm_write(char *w, unsigned seed)
{
	fill(w, MIB, seed);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 300, 700, w), 0);		/* SVM */
	fill(w, MIB, seed + 1);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 500, 1500, w), 0);	/* PVM, overlapping */
	fill(w, MIB, seed + 2);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 9000, 256, w), 0);	/* PVM, elsewhere */
}

START_TEST(failover_secondary_equals_svm_view)
{
	char *view = xalloc(DISK_SIZE), *w = xalloc(MIB), *got = xalloc(DISK_SIZE);

	fill(w, MIB, 7);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, MIB / 512, w), 0);
	expect_scratch(0);
	ck_assert_int_eq(op("start"), 0);
	/* Running: active and hidden allocate without ordering syncs. */
	expect_scratch(1);
	svm_and_pvm_write(w, 8);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, view), 0);
	ck_assert_uint_eq(img_stat(active, "group_syncs"), 0);
	ck_assert_uint_eq(img_stat(hidden, "group_syncs"), 0);
	ck_assert_uint_gt(img_stat(active, "group_syncs_skipped"), 0);
	ck_assert_uint_gt(img_stat(hidden, "group_syncs_skipped"), 0);
	/*
	 * The secondary disk is never in scratch mode, and while running its
	 * allocations sync even in never-written space (ordered mode), so
	 * that a checkpoint does not queue behind their write-back.
	 */
	ck_assert_uint_eq(img_stat(secondary, "scratch"), 0);
	ck_assert_uint_eq(img_stat(secondary, "ordered"), 1);
	ck_assert_uint_gt(img_stat(secondary, "group_syncs"), 0);

	ck_assert_int_eq(op("failover"), 0);
	ck_assert_uint_eq(img_stat(secondary, "ordered"), 0);
	/* From the failover on, active and hidden are the SVM's only copy. */
	expect_scratch(0);
	/* The SVM keeps writing while the commit runs. */
	fill(w, MIB, 11);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 12000, 64, w), 0);
	memcpy(view + 12000 * 512, w, 64 * 512);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 8, w), -EPERM);	/* refused now */
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	{
		struct replica_status st;

		/* The last phase held SVM writes, and says for how long. */
		replica_get_status(rep, &st);
		ck_assert_uint_gt(st.stats.fo_hold_ns, 0);
	}
	/* The secondary disk is exactly what the SVM saw, including the
	 * checkpoint-time content of what the primary overwrote. */
	ck_assert_int_eq(iio(secondary, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);
	/* And the driver serves the secondary disk directly. */
	fill(w, MIB, 12);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 2000, 16, w), 0);
	expect_image(secondary, 2000, 16, w);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, got), 0);
	memcpy(view + 2000 * 512, w, 16 * 512);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);
	struct replica_status st;

	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.progress_done, st.progress_total);
	ck_assert_uint_gt(st.progress_total, 0);
	free(view);
	free(w);
	free(got);
}
END_TEST

/*
 * A power cut of the secondary's host during a failover (powercut.h).
 * While running, active and hidden are in scratch mode and a power cut
 * may tear them (docs/replica.md).  The failover first flushes both; from
 * the moment both flushes have completed they are the SVM's only copy, and
 * a cut at any later event, in any version of the writes not yet durable,
 * must leave a chain that passes check and reads exactly the SVM's view:
 * the commit writes the secondary disk under them, and they are emptied
 * only once what it wrote is durable.
 */
struct fo_cuts {
	const char *view;	/* the SVM's view when the failover started */
	const char *final;	/* and when it ended (the SVM may write meanwhile) */
	const bool *loose;	/* per sector: written after the switch, may be either */
	const bool *flushed;	/* per sector: an SVM write a guest flush covered... */
	size_t flushed_at;	/* ...acknowledged by this event (PC_NEVER: none) */
	char *got;
	size_t from;		/* cuts from this event on must be exact */
	size_t done_at;		/* and after this one the secondary disk alone */
	size_t checked, checked_alone;
};

/*
 * path (with its parents, if chain) must pass check and read as the SVM's
 * view: the chain each sector as at the start or at the end (the SVM's
 * writes during the failover were not flushed by it, so a power cut may
 * lose them), the secondary disk alone exactly as at the end.
 */
static void fo_cut_expect(struct fo_cuts *fc, const struct pc_cut *cut, const char *path,
			  bool chain)
{
	unsigned flags = chain ? VHD_FILE_CHAIN : 0;
	struct vhd_error e;
	struct vhd_file *vf;

	if (vhd_file_check(path, flags, &e) < 0)
		ck_abort_msg("cut after %zu events, %s: check: %s", cut->at, cut->how, e.msg);
	ck_assert_int_eq(vhd_file_open(&vf, path, flags | VHD_FILE_RDONLY, &e), 0);
	ck_assert_int_eq(vhd_file_read(vf, 0, DISK_SECS, fc->got), 0);
	vhd_file_close(vf);
	if (memcmp(fc->got, fc->final, DISK_SIZE) == 0)
		return;
	for (size_t sec = 0; sec < DISK_SECS; sec++)
		if (memcmp(fc->got + sec * 512, fc->final + sec * 512, 512) &&
		    (!(chain || fc->loose[sec]) ||
		     (fc->flushed[sec] && cut->at > fc->flushed_at) ||
		     memcmp(fc->got + sec * 512, fc->view + sec * 512, 512)))
			ck_abort_msg("cut after %zu events (%zu durable, %zu undecided), %s: sector %zu of %s is not the SVM's",
				     cut->at, cut->durable, cut->undecided, cut->how, sec,
				     chain ? "the chain" : "the secondary disk");
}

static void fo_cut_check(void *arg, const struct pc_cut *cut)
{
	struct fo_cuts *fc = arg;

	if (cut->at < fc->from)
		return;
	fc->checked++;
	fo_cut_expect(fc, cut, p_active, true);
	if (cut->at <= fc->done_at)
		return;
	fc->checked_alone++;
	fo_cut_expect(fc, cut, p_sec, false);
}

/* The event at which the first sync of file issued after event after completed. */
static size_t first_sync_done(const struct pc_log *log, unsigned file, size_t after)
{
	for (size_t i = 0; i < log->n; i++) {
		const struct pc_io *p = &log->ios[i];

		if (p->sync && p->file == file && p->submit > after && p->done != PC_NEVER)
			return p->done;
	}
	ck_abort_msg("no sync of file %u after event %zu", file, after);
	return PC_NEVER;
}

/*
 * The SVM writes while the failover runs: over the secondary disk alone
 * (routed straight there), over active's data, over hidden's, and into
 * active's new block, until the failover is done.  After the first
 * write, a guest flush (fc->flushed, fc->flushed_at: from then on that
 * write must show on the chain too; a flush sent to active alone failed
 * this).  A write the last phase held and let go to the secondary
 * disk after the switch completes as an ordinary write there, not made
 * durable by the failover: its sectors go into loose.  Returns how many
 * were acknowledged before the switch.
 */
static unsigned fo_svm_writes(struct fo_cuts *fc, struct pc_log *log, char *w, char *final,
			      bool *loose, bool *flushed)
{
	static const uint64_t at[] = { 6000, 350, 1500, 12010 };
	unsigned before_switch = 0;

	for (unsigned i = 0; i < sizeof(at) / sizeof(at[0]); i++) {
		if (state() != REPLICA_STATE_FAILOVER)
			break;
		fill(w, 64 * 512, 30 + i);
		ck_assert_int_eq(dio(disk, TD_OP_WRITE, at[i], 64, w), 0);
		memcpy(final + at[i] * 512, w, 64 * 512);
		if (state() != REPLICA_STATE_FAILOVER) {
			for (unsigned k = 0; k < 64; k++)
				loose[at[i] + k] = true;
			continue;
		}
		before_switch++;
		if (i == 0) {
			ck_assert_int_eq(dio(disk, TD_OP_FLUSH, 0, 0, NULL), 0);
			fc->flushed_at = pc_mark(log);
			for (unsigned k = 0; k < 64; k++)
				flushed[at[i] + k] = true;
		}
	}
	return before_switch;
}

/*
 * from_start: the log begins before start, with active and hidden in
 * scratch mode, and cuts are checked from the failover's flushes of both
 * on.  Otherwise it begins at the failover (what came before counts as
 * durable), and every cut of the failover is checked.  svm_busy: the SVM
 * writes during the failover (fo_svm_writes).
 */
static void fo_power_cut(bool from_start, bool svm_busy)
{
	const char *paths[3] = { p_sec, p_hidden, p_active };
	struct fo_cuts fc = { .view = xalloc(DISK_SIZE), .got = xalloc(DISK_SIZE) };
	char *w = xalloc(MIB), *final = xalloc(DISK_SIZE);
	bool *loose = calloc(DISK_SECS, sizeof(bool)), *flushed = calloc(DISK_SECS, sizeof(bool));
	struct pc_log log;
	size_t fo_start, versions;

	fill(w, MIB, 21);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 2048, w), 0);	/* initial sync */
	ck_assert_int_eq(dio(exp_disk, TD_OP_FLUSH, 0, 0, NULL), 0);
	if (from_start)
		pc_start_files(&log, paths, 3, io);
	ck_assert_int_eq(op("start"), 0);
	svm_and_pvm_write(w, 22);
	fill(w, MIB, 25);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 12000, 64, w), 0);		/* SVM, new block */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, (char *)fc.view), 0);
	if (!from_start) {
		/* What the log does not hold counts as durable: drain first. */
		while (tdr_io_inflight(io))
			ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
		pc_start_files(&log, paths, 3, io);
	}
	memcpy(final, fc.view, DISK_SIZE);
	fc.final = final;
	fc.loose = loose;
	fc.flushed = flushed;
	fc.flushed_at = PC_NEVER;
	fo_start = pc_mark(&log);
	ck_assert_int_eq(op("failover"), 0);
	if (svm_busy) {
		ck_assert_uint_gt(fo_svm_writes(&fc, &log, w, final, loose, flushed), 0);
		ck_assert_uint_ne(fc.flushed_at, PC_NEVER);
	}
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	fc.done_at = pc_mark(&log);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, fc.got), 0);
	ck_assert(memcmp(fc.got, final, DISK_SIZE) == 0);
	pc_stop(&log, io);
	td_disk_close(disk);
	disk = NULL;
	ck_assert_uint_eq(log.others, 0);

	if (from_start) {
		fc.from = first_sync_done(&log, 1, fo_start);
		if (first_sync_done(&log, 2, fo_start) > fc.from)
			fc.from = first_sync_done(&log, 2, fo_start);
		fc.from++;
	}
	versions = pc_for_each_cut(&log, fo_cut_check, &fc);
	ck_assert_uint_gt(fc.checked, log.events - fc.from);
	ck_assert_uint_gt(fc.checked_alone, 0);
	ck_assert_uint_ge(versions, fc.checked);
	pc_free(&log);
	free((char *)fc.view);
	free(final);
	free(loose);
	free(flushed);
	free(fc.got);
	free(w);
}

START_TEST(power_cut_during_failover)
{
	fo_power_cut(false, false);
}
END_TEST

START_TEST(power_cut_scratch_then_failover)
{
	fo_power_cut(true, false);
}
END_TEST

/*
 * What the SVM wrote before the switch is in the secondary disk, durable,
 * once the failover is done; what it flushed is durable from the flush on.
 */
START_TEST(power_cut_failover_with_svm_writes)
{
	fo_power_cut(false, true);
}
END_TEST

/*
 * A failover with the SVM busy: the commit keeps at most 4 MiB of copies in
 * flight while SVM requests come (FO_SVM_BYTES), flushes the secondary disk
 * every 16 MiB it writes (FO_FLUSH_BYTES), and the SVM's reads and writes,
 * four at a time, stay byte-exact throughout; at the end the secondary disk
 * is the SVM's view.
 */
#define FO_BIG (64 * MIB)
#define FO_SLOTS 4

struct fo_slot {
	struct td_request req;
	struct done dn;
	char *buf;
	bool busy, is_read;
};

/*
 * A FO_BIG chain, started, with 24 MiB from the primary (copied into hidden
 * first) and 24 MiB by the SVM; view gets the SVM's view (FO_BIG bytes).
 */
static void big_chain_written(char *view)
{
	char *w = xalloc(MIB);

	td_disk_close(disk);
	disk = NULL;
	unlink(p_active);
	unlink(p_hidden);
	unlink(p_sec);
	make_chain(FO_BIG);
	open_disk();
	ck_assert_int_eq(op("start"), 0);
	for (unsigned i = 0; i < 24; i++) {
		fill(w, MIB, 100 + i);
		ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, (uint64_t)i * 2 * MIB / 512, MIB / 512, w), 0);
		fill(w, MIB, 200 + i);
		ck_assert_int_eq(dio(disk, TD_OP_WRITE, ((uint64_t)i * 2 + 1) * MIB / 512, MIB / 512, w), 0);
	}
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, FO_BIG / 512, view), 0);
	free(w);
}

START_TEST(failover_with_busy_svm)
{
	char *view = xalloc(FO_BIG), *got = xalloc(FO_BIG);
	struct fo_slot slots[FO_SLOTS];
	struct replica_status st;
	unsigned seed = 99;
	uint64_t svm_ops = 0;
	const uint64_t region = 4 * MIB / 512;	/* each slot has its own 4 MiB, at 40 MiB + i * 4 MiB */

	big_chain_written(view);

	memset(slots, 0, sizeof(slots));
	for (int i = 0; i < FO_SLOTS; i++)
		slots[i].buf = xalloc(64 * 1024);
	ck_assert_int_eq(op("failover"), 0);
	while (state() == REPLICA_STATE_FAILOVER || slots[0].busy || slots[1].busy ||
	       slots[2].busy || slots[3].busy) {
		for (int i = 0; i < FO_SLOTS; i++) {
			struct fo_slot *sl = &slots[i];
			uint64_t base = (40 * MIB / 512) + (uint64_t)i * region, sec;
			uint32_t secs = 8u << (rand_r(&seed) % 4);	/* 4 to 32 KiB */

			if (sl->busy && !sl->dn.done)
				continue;
			if (sl->busy) {
				ck_assert_int_eq(sl->dn.err, 0);
				if (sl->is_read)
					ck_assert_msg(memcmp(sl->buf, view + sl->req.sec * 512,
							     (size_t)sl->req.secs * 512) == 0,
						      "SVM read at %llu during the failover differs",
						      (unsigned long long)sl->req.sec);
				sl->busy = false;
				svm_ops++;
			}
			if (state() != REPLICA_STATE_FAILOVER)
				continue;
			sec = base + (uint64_t)(rand_r(&seed) % (region / secs)) * secs;
			sl->is_read = rand_r(&seed) % 2;
			memset(&sl->dn, 0, sizeof(sl->dn));
			if (!sl->is_read) {
				fill(sl->buf, (size_t)secs * 512, (unsigned)rand_r(&seed));
				memcpy(view + sec * 512, sl->buf, (size_t)secs * 512);
			}
			td_request_init(&sl->req, sl->is_read ? TD_OP_READ : TD_OP_WRITE, sec, secs,
					sl->buf, req_done, &sl->dn);
			sl->busy = true;
			td_disk_submit(disk, &sl->req);
		}
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	}
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	ck_assert_uint_gt(svm_ops, 0);
	replica_get_status(rep, &st);
	/*
	 * 48 MiB committed and more (the SVM rewrote chunks): with the SVM
	 * busy, at most 1 MiB of copies in flight and a flush per 1 MiB (33
	 * flushes here; the 8 MiB step of before gives at most 7).
	 */
	ck_assert_uint_ge(st.progress_total, 48 * MIB);
	ck_assert_uint_gt(st.stats.fo_svm_peak_bytes, 0);
	ck_assert_uint_le(st.stats.fo_svm_peak_bytes, 1 * MIB);
	ck_assert_uint_ge(st.stats.fo_flushes, 16);
	ck_assert_int_eq(iio(secondary, TD_OP_READ, 0, FO_BIG / 512, got), 0);
	ck_assert(memcmp(got, view, FO_BIG) == 0);
	for (int i = 0; i < FO_SLOTS; i++)
		free(slots[i].buf);
	free(view);
	free(got);
}
END_TEST

static int quiesced;

static void on_quiesced(struct td_disk *d, void *arg)
{
	quiesced++;
}

/* The stop before a close, as the daemon runs it; the images' own work must end. */
static void quiesce_disk(void)
{
	struct td_quiesce q = { 0 };

	quiesced = 0;
	td_disk_quiesce(disk, &q, on_quiesced, NULL);
	for (int i = 0; i < 200000 && !quiesced; i++)
		ck_assert_int_ge(tdr_loop_run_once(loop, 100), 0);
	ck_assert_int_eq(quiesced, 1);
	ck_assert_uint_eq(td_disk_busy(disk, NULL), 0);
}

/* vhd-util coalesce -n path: path's data into its parent. */
static void coalesce_offline(const char *path)
{
	struct vhd_error e = { 0 };

	ck_assert_msg(vhd_file_coalesce(path, NULL, NULL, &e) == 0, "%s", e.msg);
}

/* The VHD at path (with its parents), opened on its own, reads as want. */
static void expect_file_reads(const char *path, const char *want, size_t len)
{
	char sp[700];
	struct td_disk *d;

	snprintf(sp, sizeof(sp), "vhd:%s", path);
	ck_assert_msg(td_disk_open(&d, sp, 0, loop, io) == 0, "%s", tdr_last_error());
	expect_disk(d, 0, (uint32_t)(len / 512), want);
	td_disk_close(d);
}

/*
 * A disk closed in the middle of a failover: the commit stops, the close
 * waits for its copies in flight (under AddressSanitizer, in CI, a copy
 * completing into a closed image is an error), the failover fails with
 * ECANCELED, and nothing is lost: the chain still reads as the SVM's view,
 * and coalescing it offline as the error message says makes the secondary
 * disk that view.
 */
START_TEST(close_during_failover)
{
	char *view = xalloc(FO_BIG);
	struct replica_status st;
	struct td_image *who;

	big_chain_written(view);
	ck_assert_int_eq(op("failover"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER);
	/* The commit's copies are in flight; no SVM request is. */
	ck_assert_uint_eq(disk->inflight, 0);
	ck_assert_uint_gt(td_disk_busy(disk, &who), 0);
	ck_assert_ptr_eq(who, rep);

	quiesce_disk();
	ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER_FAILED);
	replica_get_status(rep, &st);
	ck_assert_uint_lt(st.progress_done, st.progress_total);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(strstr(last_msg, "ECANCELED") && strstr(last_msg, "interrupted") &&
		      strstr(last_msg, p_hidden) &&
		      strstr(last_msg, "vhd-util coalesce"), "%s", last_msg);
	ck_assert_int_eq(op("failover"), -ESHUTDOWN);
	ck_assert_msg(strstr(last_msg, "closing"), "%s", last_msg);
	ck_assert_int_eq(op("checkpoint"), -ESHUTDOWN);
	/* What an operator needs to see stays answered. */
	ck_assert_int_eq(op("status"), 0);
	td_disk_close(disk);
	disk = NULL;

	/* The chain on its own still reads as the SVM's view. */
	expect_file_reads(p_active, view, FO_BIG);
	coalesce_offline(p_active);
	coalesce_offline(p_hidden);
	expect_file_reads(p_sec, view, FO_BIG);
	free(view);
}
END_TEST

/*
 * The failover after a restart: the chain reopened in state none still holds
 * the SVM's view (active over hidden over the secondary disk), and neither
 * the SVM nor the commit may use it until an operation says what it is.  A
 * failover commits it online: every chunk of the blocks active and hidden
 * hold counts, the SVM writes meanwhile, and at the end the secondary disk
 * is the SVM's view.  "interrupted": the first failover was cut short by a
 * close; otherwise the disk was closed while replicating.
 */
static void failover_after_reopen(bool interrupted)
{
	char *view = xalloc(FO_BIG), *w = xalloc(MIB);
	struct replica_status st;

	big_chain_written(view);
	/* A primary write in a block the SVM never wrote: only hidden holds its original. */
	fill(w, MIB, 79);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 50 * MIB / 512, MIB / 512, w), 0);
	expect_disk(disk, 50 * MIB / 512, MIB / 512, view + 50 * MIB);
	if (interrupted) {
		ck_assert_int_eq(op("failover"), 0);
		quiesce_disk();
		ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER_FAILED);
		ck_assert_int_eq(op("get-error"), 0);
		ck_assert_msg(strstr(last_msg, "run failover again"), "%s", last_msg);
	} else {
		quiesce_disk();
		ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	}
	td_disk_close(disk);
	disk = NULL;

	open_disk();
	ck_assert_int_eq(state(), REPLICA_STATE_NONE);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, 8, w), -EIO);
	ck_assert_int_eq(op("failover"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER);
	replica_get_status(rep, &st);
	if (state() == REPLICA_STATE_FAILOVER)
		ck_assert_int_eq(op("failover"), -EBUSY);
	/*
	 * What their bitmaps hold: 24 MiB the SVM wrote into active, the
	 * originals of the 24 MiB the primary wrote in hidden
	 * (big_chain_written), and of the 1 MiB at 50 MiB.
	 */
	ck_assert_uint_eq(st.progress_total, 49 * MIB);
	/* The SVM writes during the commit: into a chunk held above and into one that is not. */
	fill(w, MIB, 77);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 1 * MIB / 512, MIB / 512, w), 0);
	memcpy(view + 1 * MIB, w, MIB);
	fill(w, MIB, 78);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 60 * MIB / 512, MIB / 512, w), 0);
	memcpy(view + 60 * MIB, w, MIB);
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	expect_disk(disk, 0, FO_BIG / 512, view);
	expect_image(secondary, 0, FO_BIG / 512, view);
	td_disk_close(disk);
	disk = NULL;
	expect_file_reads(p_sec, view, FO_BIG);
	free(view);
	free(w);
}

START_TEST(failover_resumes_after_interrupted_close)
{
	failover_after_reopen(true);
}
END_TEST

START_TEST(failover_after_restart_while_running)
{
	failover_after_reopen(false);
}
END_TEST

/*
 * The primary's writes in flight at the export when the disk closes: the
 * close waits for each (its copy into hidden, then its write); each
 * completes, and the SVM still sees the checkpoint's content.
 */
START_TEST(close_waits_for_export_writes)
{
	enum { N = 8 };
	char *old = xalloc(N * MIB), *w[N];
	struct td_request reqs[N];
	struct done dn[N];
	struct td_image *who;

	fill(old, N * MIB, 40);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, N * MIB / 512, old), 0);
	ck_assert_int_eq(op("start"), 0);
	memset(dn, 0, sizeof(dn));
	for (int i = 0; i < N; i++) {
		w[i] = xalloc(MIB);
		fill(w[i], MIB, 50 + i);
		td_request_init(&reqs[i], TD_OP_WRITE, (uint64_t)i * MIB / 512, MIB / 512, w[i],
				req_done, &dn[i]);
		td_disk_submit(exp_disk, &reqs[i]);
	}
	ck_assert_uint_eq(disk->inflight, 0);
	ck_assert_uint_ge(td_disk_busy(disk, &who), N);
	ck_assert_ptr_eq(who, rep);

	quiesce_disk();
	for (int i = 0; i < N; i++) {
		ck_assert(dn[i].done);
		ck_assert_int_eq(dn[i].err, 0);
		expect_image(secondary, (uint64_t)i * MIB / 512, MIB / 512, w[i]);
		free(w[i]);
	}
	expect_disk(disk, 0, N * MIB / 512, old);
	free(old);
}
END_TEST

START_TEST(stop_without_failover)
{
	char *w = xalloc(MIB), *z = xalloc(MIB);

	memset(z, 0, MIB);
	ck_assert_int_eq(op("start"), 0);
	fill(w, MIB, 13);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 64, w), 0);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 4096, 64, w), 0);
	expect_scratch(1);
	ck_assert_int_eq(op("stop"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_NONE);
	expect_scratch(0);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, 8, w), -EIO);
	/* The SVM's writes are gone; active and hidden are empty files again. */
	expect_image(active, 0, 64, z);
	expect_image(active, 4096, 64, w);
	check_file_empty(p_active);
	check_file_empty(p_hidden);
	/* And it can start again. */
	ck_assert_int_eq(op("start"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	expect_scratch(1);
	free(w);
	free(z);
}
END_TEST

struct wrong {
	const char *line;
	int err;
	const char *msg_part;
};

static void expect_refusals(const struct wrong *w, size_t n, enum replica_state s)
{
	for (size_t i = 0; i < n; i++) {
		ck_assert_msg(op(w[i].line) == w[i].err, "'%s' in %s: got %d (%s), want %d",
			      w[i].line, replica_state_name(s), op(w[i].line), last_msg, w[i].err);
		ck_assert_msg(strstr(last_msg, w[i].msg_part), "'%s': message '%s' lacks '%s'",
			      w[i].line, last_msg, w[i].msg_part);
		ck_assert_int_eq(state(), s);
	}
}

START_TEST(operations_in_wrong_states)
{
	static const struct wrong in_none[] = {
		{ "checkpoint", -EINVAL, "state none; start it first" },
		{ "stop", -EINVAL, "stop refused" },
		{ "failover", -EINVAL, "it never started" },
		{ "stop failover", -EINVAL, "it never started" },
		{ "resync", -EOPNOTSUPP, "operation of a primary" },
		{ "start addr=tcp:h:1", -EINVAL, "takes no addr" },
	};
	static const struct wrong in_running[] = {
		{ "start", -EBUSY, "already in state running" },
		{ "resync full", -EOPNOTSUPP, "operation of a primary" },
		{ "start mode=primary", -EINVAL, "cannot change mode" },
	};
	static const struct wrong in_done[] = {
		{ "start", -EINVAL, "failover is done" },
		{ "checkpoint", -EINVAL, "state done" },
		{ "stop", -EINVAL, "state done" },
		{ "failover", -EINVAL, "failover is already done" },
	};
	static const struct wrong bad_syntax[] = {
		{ "", -EINVAL, "empty request" },
		{ "checkpoint now", -EINVAL, "takes no arguments" },
		{ "stop later", -EINVAL, "takes no argument but 'failover'" },
		{ "resync sometimes", -EINVAL, "'full' or 'incremental'" },
		{ "resync full now", -EINVAL, "'full' or 'incremental', got 'now'" },
		{ "stop failover please", -EINVAL, "but 'failover', got 'please'" },
		{ "start addr=tcp:[]:10809", -EINVAL, "port 1-65535" },
		{ "start mode=tertiary", -EINVAL, "expected mode=primary or mode=secondary" },
		{ "start addr=tcp:host:70000", -EINVAL, "port 1-65535" },
		{ "start timeout=0", -EINVAL, "milliseconds" },
		{ "start bogus=1", -EINVAL, "unknown option 'bogus'" },
		{ "start oops", -EINVAL, "not key=value" },
		{ "launch", -EINVAL, "unknown request 'launch'" },
	};
	char msg[64];

	expect_refusals(in_none, sizeof(in_none) / sizeof(in_none[0]), REPLICA_STATE_NONE);
	expect_refusals(bad_syntax, sizeof(bad_syntax) / sizeof(bad_syntax[0]), REPLICA_STATE_NONE);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_str_eq(last_msg, "none");
	ck_assert_int_eq(op("start"), 0);
	expect_refusals(in_running, sizeof(in_running) / sizeof(in_running[0]), REPLICA_STATE_RUNNING);
	expect_refusals(bad_syntax, sizeof(bad_syntax) / sizeof(bad_syntax[0]), REPLICA_STATE_RUNNING);
	ck_assert_int_eq(op("failover"), 0);
	/* During the failover (it has barely started): everything is refused busy. */
	if (state() == REPLICA_STATE_FAILOVER) {
		ck_assert_int_eq(op("checkpoint"), -EBUSY);
		ck_assert_int_eq(op("start"), -EBUSY);
		ck_assert_int_eq(op("stop"), -EBUSY);
		ck_assert_int_eq(op("failover"), -EBUSY);
	}
	wait_state_not(REPLICA_STATE_FAILOVER);
	expect_refusals(in_done, sizeof(in_done) / sizeof(in_done[0]), REPLICA_STATE_DONE);
	/* A promoted secondary may become a primary; the syntax is checked first. */
	ck_assert_int_eq(replica_parse("start mode=primary addr=unix:/nonexistent/x", &(struct replica_cmd){0},
				       msg, sizeof(msg)), 0);
}
END_TEST

START_TEST(failover_refuses_in_flight_state_cleanly)
{
	/* Requests during the failover's commit: SVM I/O goes on, the primary is refused. */
	char *w = xalloc(MIB), *r = xalloc(MIB);

	ck_assert_int_eq(op("start"), 0);
	fill(w, MIB, 14);
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(dio(disk, TD_OP_WRITE, (uint64_t)i * 2048, 128, w), 0);
	ck_assert_int_eq(op("failover"), 0);
	ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, 128, r), 0);
	ck_assert(memcmp(r, w, 128 * 512) == 0);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 8, w), -EPERM);
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	for (int i = 0; i < 8; i++)
		expect_image(secondary, (uint64_t)i * 2048, 128, w);
	free(w);
	free(r);
}
END_TEST

START_TEST(primary_write_past_the_end)
{
	char *w = xalloc(MIB);
	struct replica_status st;

	fill(w, MIB, 23);
	ck_assert_int_eq(op("start"), 0);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, DISK_SECS - 1, 2, w), -ENOSPC);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE_ZEROES, DISK_SECS, 1, NULL), -ENOSPC);
	ck_assert_int_eq(dio(exp_disk, TD_OP_READ, DISK_SECS - 1, 2, w), -EINVAL);
	/* Refused before the driver: no copy, no state change, nothing written. */
	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.cbw_count, 0);
	ck_assert_uint_eq(st.stats.export_reqs, 0);
	ck_assert_int_eq(st.state, REPLICA_STATE_RUNNING);
	ck_assert_int_eq(st.error, 0);
	/* The last sector itself is fine. */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, DISK_SECS - 1, 1, w), 0);
	expect_image(secondary, DISK_SECS - 1, 1, w);
	free(w);
}
END_TEST

START_TEST(cbw_failure_reported)
{
	char *old = xalloc(MIB), *neu = xalloc(MIB);

	fill(old, MIB, 15);
	fill(neu, MIB, 16);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 256, old), 0);
	ck_assert_int_eq(op("start"), 0);
	/* Every write fails from now: the copy into hidden is the first. */
	tdr_io_set_fault(io, TDR_FAULT_FAIL, 0);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 256, neu), -EIO);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(strstr(last_msg, "EIO copy-before-write into hidden"), "%s", last_msg);
	/* The refused write never reached the secondary disk; the SVM's view holds. */
	expect_image(secondary, 0, 256, old);
	expect_disk(disk, 0, 256, old);
	ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	/* The chunk was not marked copied: the next write copies it and succeeds. */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 256, neu), 0);
	expect_disk(disk, 0, 256, old);
	expect_image(secondary, 0, 256, neu);
	free(old);
	free(neu);
}
END_TEST

/*
 * Only hidden fails: the primary's write into the secondary disk, which runs
 * in parallel with the copy, succeeds and must be undone, so that the SVM
 * keeps its view and the secondary disk its old content.
 */
START_TEST(cbw_failure_undoes_the_write)
{
	char *old = xalloc(MIB), *neu = xalloc(MIB);

	fill(old, MIB, 25);
	fill(neu, MIB, 26);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 0, 512, old), 0);
	ck_assert_int_eq(op("start"), 0);
	tdr_io_set_fault(io, TDR_FAULT_FAIL, 0);
	ck_assert_int_eq(tdr_io_set_fault_file(io, p_hidden), 0);
	/* two chunks (64 KiB each), both copies fail */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 64, 128, neu), -EIO);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(strstr(last_msg, "EIO copy-before-write into hidden"), "%s", last_msg);
	ck_assert_msg(!strstr(last_msg, "restoring"), "%s", last_msg);
	/* The write was undone: both chunks hold their old content. */
	expect_image(secondary, 0, 512, old);
	expect_disk(disk, 0, 512, old);
	ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	/* Retried, it copies and lands; the SVM still sees the old data. */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 64, 128, neu), 0);
	expect_disk(disk, 0, 512, old);
	expect_image(secondary, 64, 128, neu);
	expect_image(secondary, 0, 64, old);
	expect_image(secondary, 192, 320, old + 192 * 512);
	free(old);
	free(neu);
}
END_TEST

START_TEST(make_empty_failure_reported)
{
	char *w = xalloc(MIB);

	ck_assert_int_eq(op("start"), 0);
	fill(w, MIB, 17);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 256, w), 0);
	tdr_io_set_fault(io, TDR_FAULT_FAIL, 0);
	ck_assert_int_eq(op("checkpoint"), -EIO);
	ck_assert_msg(strstr(last_msg, "make-empty of"), "%s", last_msg);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(strstr(last_msg, "EIO make-empty of"), "%s", last_msg);
	/* Requests held during the checkpoint were released. */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, 8, w), 0);
	/* A later checkpoint succeeds. */
	ck_assert_int_eq(op("checkpoint"), 0);
	free(w);
}
END_TEST

START_TEST(commit_failure_then_routing_then_retry)
{
	char *view = xalloc(DISK_SIZE), *w = xalloc(MIB), *got = xalloc(DISK_SIZE);
	char *orig = xalloc(MIB);

	fill(orig, MIB, 18);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 8192, 2048, orig), 0);
	ck_assert_int_eq(op("start"), 0);
	fill(w, MIB, 19);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 128, w), 0);		/* chunk 0 in active */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 8192, 128, w), 0);	/* chunk 64 in hidden */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, view), 0);

	tdr_io_set_fault(io, TDR_FAULT_FAIL, 0);
	failover_to(REPLICA_STATE_FAILOVER_FAILED);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(strstr(last_msg, "EIO failover commit"), "%s", last_msg);
	/* Nothing lost: the SVM still sees its view. */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);

	/* Routing: a chunk active holds -> active; one hidden holds -> active; elsewhere -> secondary. */
	char *a = xalloc(MIB), *b = xalloc(MIB), *c = xalloc(MIB);

	fill(a, MIB, 20);
	fill(b, MIB, 21);
	fill(c, MIB, 22);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 8, 8, a), 0);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 8200, 8, b), 0);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 4000, 8, c), 0);
	memcpy(view + 8 * 512, a, 8 * 512);
	memcpy(view + 8200 * 512, b, 8 * 512);
	memcpy(view + 4000 * 512, c, 8 * 512);
	expect_image(secondary, 4000, 8, c);			/* elsewhere: the secondary disk */
	char *sec_before = xalloc(8 * 512);

	ck_assert_int_eq(iio(secondary, TD_OP_READ, 8200, 8, sec_before), 0);
	ck_assert(memcmp(sec_before, b, 8 * 512) != 0);	/* hidden's range: not the secondary */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);

	/* Retry: done, and the secondary disk is the view. */
	failover_to(REPLICA_STATE_DONE);
	ck_assert_int_eq(iio(secondary, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);
	free(view);
	free(w);
	free(got);
	free(orig);
	free(a);
	free(b);
	free(c);
	free(sec_before);
}
END_TEST

/*
 * Failover leaves scratch mode by flushing active and hidden; when that
 * flush fails, the failover fails (nothing lost, the SVM keeps its view)
 * and a retry completes it.
 */
START_TEST(failover_chain_flush_failure)
{
	char *view = xalloc(DISK_SIZE), *w = xalloc(MIB);

	ck_assert_int_eq(op("start"), 0);
	fill(w, MIB, 23);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 128, w), 0);		/* active */
	fill(w, MIB, 24);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 8192, 128, w), 0);	/* hidden */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, view), 0);

	/* Only active's file fails, and nothing but its flush writes to it. */
	tdr_io_set_fault(io, TDR_FAULT_FAIL, 0);
	ck_assert_int_eq(tdr_io_set_fault_file(io, p_active), 0);
	failover_to(REPLICA_STATE_FAILOVER_FAILED);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);
	expect_scratch(0);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(strstr(last_msg, "EIO failover commit"), "%s", last_msg);
	expect_disk(disk, 0, DISK_SECS, view);		/* nothing lost */

	failover_to(REPLICA_STATE_DONE);
	expect_image(secondary, 0, DISK_SECS, view);
	free(view);
	free(w);
}
END_TEST

/* scratch=off in the spec: active and hidden sync as any VHD; a bad value is refused. */
START_TEST(scratch_off_option)
{
	char *w = xalloc(MIB), bad[700];
	struct td_disk *d = NULL;

	td_disk_close(disk);
	disk = NULL;
	snprintf(bad, sizeof(bad), "replica:mode=secondary,scratch=maybe|vhd:%s", p_active);
	ck_assert_int_lt(td_disk_open(&d, bad, 0, loop, io), 0);
	ck_assert_msg(strstr(tdr_last_error(), "scratch=maybe: expected scratch=on or scratch=off"),
		      "%s", tdr_last_error());
	open_disk_with(",scratch=off");

	ck_assert_int_eq(op("start"), 0);
	expect_scratch(0);
	fill(w, MIB, 25);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 4096, 128, w), 0);	/* a copy into hidden */
	ck_assert_uint_gt(img_stat(hidden, "group_syncs"), 0);
	ck_assert_uint_eq(img_stat(hidden, "group_syncs_skipped"), 0);
	expect_image(secondary, 4096, 128, w);
	/* The primary's flush makes the copies into hidden durable too. */
	uint64_t hf = hidden->stats.flush_reqs, sf = secondary->stats.flush_reqs;

	ck_assert_int_eq(dio(exp_disk, TD_OP_FLUSH, 0, 0, NULL), 0);
	ck_assert_uint_eq(hidden->stats.flush_reqs, hf + 1);
	ck_assert_uint_eq(secondary->stats.flush_reqs, sf + 1);
	/* No background flush either: 4 MiB more, one flush (the primary's). */
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 8192 + (uint64_t)i * 2048, MIB / 512, w), 0);
	ck_assert_uint_eq(secondary->stats.flush_reqs, sf + 1);
	free(w);
}
END_TEST

/*
 * In scratch mode the primary's flush reaches the secondary disk only:
 * hidden's copies need no durability (a crashed host's secondary is
 * rebuilt), and their write-back would lengthen the primary's checkpoint.
 * Once failover has turned scratch mode off, hidden is flushed again.
 */
START_TEST(scratch_primary_flush_skips_hidden)
{
	char *w = xalloc(MIB);
	struct replica_status st;
	uint64_t hf, sf;

	ck_assert_int_eq(op("start"), 0);
	expect_scratch(1);
	fill(w, MIB, 26);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 4096, 128, w), 0);
	hf = hidden->stats.flush_reqs;
	sf = secondary->stats.flush_reqs;
	ck_assert_int_eq(dio(exp_disk, TD_OP_FLUSH, 0, 0, NULL), 0);
	ck_assert_uint_eq(hidden->stats.flush_reqs, hf);
	ck_assert_uint_eq(secondary->stats.flush_reqs, sf + 1);
	expect_image(secondary, 4096, 128, w);
	/*
	 * Every 2 MiB the primary writes, the secondary disk is flushed in the
	 * background (what the skipped syncs used to write back on the way):
	 * 1 MiB more gives none, 2 MiB one, which the close would wait for.
	 */
	fill(w, MIB, 27);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 8192, MIB / 512, w), 0);
	ck_assert_uint_eq(secondary->stats.flush_reqs, sf + 1);
	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.run_flushes, 0);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 12288, MIB / 512, w), 0);
	ck_assert_uint_eq(secondary->stats.flush_reqs, sf + 2);
	ck_assert_uint_eq(hidden->stats.flush_reqs, hf);
	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.run_flushes, 1);
	{
		struct td_image *who;

		ck_assert_uint_eq(disk->inflight, 0);
		ck_assert_uint_ge(td_disk_busy(disk, &who), 1);
		ck_assert_ptr_eq(who, rep);
	}
	sf = secondary->stats.flush_reqs;
	/* Stopped (scratch mode off): the flush covers hidden again. */
	ck_assert_int_eq(op("stop"), 0);
	expect_scratch(0);
	ck_assert_int_eq(dio(exp_disk, TD_OP_FLUSH, 0, 0, NULL), 0);
	ck_assert_uint_eq(hidden->stats.flush_reqs, hf + 1);
	ck_assert_uint_eq(secondary->stats.flush_reqs, sf + 1);
	free(w);
}
END_TEST

START_TEST(bad_chains)
{
	struct td_disk *d = NULL;
	struct vhd_error e;
	char s[1300], p1[700], p2[700], p3[700];

	/* Too short: active directly over a dynamic VHD. */
	snprintf(p1, sizeof(p1), "%s/lone.vhd", dir);
	snprintf(p2, sizeof(p2), "%s/child.vhd", dir);
	ck_assert_int_eq(vhd_file_create(p1, DISK_SIZE, VHD_TYPE_DYNAMIC, 0, &e), 0);
	ck_assert_int_eq(vhd_file_snapshot(p2, p1, &e), 0);
	snprintf(s, sizeof(s), "replica:mode=secondary|vhd:%s", p2);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_msg(strstr(tdr_last_error(), "too short"), "%s", tdr_last_error());
	/* Active not a VHD. */
	snprintf(p3, sizeof(p3), "%s/raw.img", dir);
	FILE *f = fopen(p3, "w");

	ck_assert_int_eq(ftruncate(fileno(f), DISK_SIZE), 0);
	fclose(f);
	snprintf(s, sizeof(s), "replica:mode=secondary|aio:%s", p3);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_msg(strstr(tdr_last_error(), "too short"), "%s", tdr_last_error());
	/* Fixed hidden: cannot be emptied. */
	snprintf(p1, sizeof(p1), "%s/fixed-base.vhd", dir);
	snprintf(p2, sizeof(p2), "%s/fixed-hidden.vhd", dir);
	snprintf(p3, sizeof(p3), "%s/fixed-active.vhd", dir);
	ck_assert_int_eq(vhd_file_create(p1, DISK_SIZE, VHD_TYPE_FIXED, 0, &e), 0);
	ck_assert_int_eq(vhd_file_create(p2, DISK_SIZE, VHD_TYPE_FIXED, 0, &e), 0);
	/* A fixed disk has no parent: chain of two, with a fixed bottom: too short again. */
	ck_assert_int_eq(vhd_file_snapshot(p3, p2, &e), 0);
	snprintf(s, sizeof(s), "replica:mode=secondary|vhd:%s", p3);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	/* Options. */
	snprintf(s, sizeof(s), "replica:mode=secondary,cbw=1000|vhd:%s", p_active);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_msg(strstr(tdr_last_error(), "power of two"), "%s", tdr_last_error());
	snprintf(s, sizeof(s), "replica:|vhd:%s", p_active);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_msg(strstr(tdr_last_error(), "no mode"), "%s", tdr_last_error());
	snprintf(s, sizeof(s), "replica:mode=secondary,colour=red|vhd:%s", p_active);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_msg(strstr(tdr_last_error(), "unknown option 'colour'"), "%s", tdr_last_error());
	ck_assert_ptr_null(d);
}
END_TEST

/* Rewrites both footers of a VHD with another virtual size (and a valid checksum). */
static void set_vhd_size(const char *path, uint64_t size)
{
	unsigned char buf[512];
	struct vhd_footer f;
	FILE *fp = fopen(path, "r+b");
	long end;

	ck_assert_ptr_nonnull(fp);
	ck_assert_int_eq(fseek(fp, -512, SEEK_END), 0);
	end = ftell(fp);
	ck_assert_int_eq(fread(buf, 1, 512, fp), 512);
	vhd_footer_decode(&f, buf);
	f.current_size = size;
	f.checksum = vhd_footer_checksum(&f);
	vhd_footer_encode(&f, buf);
	ck_assert_int_eq(fseek(fp, end, SEEK_SET), 0);
	ck_assert_int_eq(fwrite(buf, 1, 512, fp), 512);
	ck_assert_int_eq(fseek(fp, 0, SEEK_SET), 0);
	ck_assert_int_eq(fwrite(buf, 1, 512, fp), 512);
	fclose(fp);
}

START_TEST(mismatched_sizes)
{
	struct td_disk *d = NULL;
	char s[1300];

	/* hidden 8 MiB over a 4 MiB secondary: a VHD parent may be smaller, a replica chain may not. */
	td_disk_close(disk);
	disk = NULL;
	set_vhd_size(p_sec, DISK_SIZE / 2);
	snprintf(s, sizeof(s), "replica:mode=secondary|vhd:%s", p_active);
	ck_assert_int_eq(td_disk_open(&d, s, 0, loop, io), -EINVAL);
	ck_assert_msg(strstr(tdr_last_error(), "virtual sizes differ: active 8388608, hidden 8388608, secondary 4194304"),
		      "%s", tdr_last_error());
	ck_assert_ptr_null(d);
}
END_TEST

/* ----------------------------------------------------- model test */

struct mreq {
	struct td_request req;
	struct done dn;
	char *buf;
	bool check;		/* an SVM read to compare */
	char *want;		/* the view when it was submitted (a copy) */
};

/*
 * Submits into x an SVM write of [sec, sec + secs) with random data, which
 * the view takes at once, or an SVM read, which must return the view as it
 * is now.
 */
static void model_svm_submit(struct mreq *x, bool write, uint64_t sec, uint32_t secs, char *view,
			     unsigned *seed)
{
	size_t len = (size_t)secs * 512;

	memset(x, 0, sizeof(*x));
	x->buf = xalloc(len);
	if (write) {
		fill(x->buf, len, (unsigned)rand_r(seed));
		memcpy(view + sec * 512, x->buf, len);
		td_request_init(&x->req, TD_OP_WRITE, sec, secs, x->buf, req_done, &x->dn);
	} else {
		x->check = true;
		x->want = xalloc(len);
		memcpy(x->want, view + sec * 512, len);
		td_request_init(&x->req, TD_OP_READ, sec, secs, x->buf, req_done, &x->dn);
	}
	td_disk_submit(disk, &x->req);
}

/* Waits for a batch: every request succeeds, every read equals its model. */
static void model_finish_batch(struct mreq *m, int n, const char *what, int idx)
{
	for (int i = 0; i < n; i++) {
		run_until(&m[i].dn.done);
		ck_assert_int_eq(m[i].dn.err, 0);
		if (m[i].check)
			ck_assert_msg(memcmp(m[i].buf, m[i].want, (size_t)m[i].req.secs * 512) == 0,
				      "seed %u, %s %d: SVM read at %llu differs from the model",
				      model_seed(), what, idx, (unsigned long long)m[i].req.sec);
		free(m[i].want);
		free(m[i].buf);
	}
}

START_TEST(randomized_model)
{
	enum { ROUNDS = 400, BATCH = 6, MAXSECS = 512 };
	char *sec_model = xalloc(DISK_SIZE), *view = xalloc(DISK_SIZE), *got = xalloc(DISK_SIZE);
	unsigned seed = model_seed();
	int checkpoints = 0, inflight_checkpoints = 0, reads = 0, pwrites = 0, swrites = 0;
	int drained = 0;	/* requests still in flight when a checkpoint began */
	int fo_requests = 0;	/* SVM requests submitted while the commit ran */

	memset(sec_model, 0, DISK_SIZE);
	/* Initial sync. */
	for (int i = 0; i < 8; i++) {
		uint64_t sec = (uint64_t)(rand_r(&seed) % (DISK_SECS - MAXSECS));
		uint32_t n = 1 + (uint32_t)(rand_r(&seed) % MAXSECS);
		char *b = xalloc((size_t)n * 512);

		fill(b, (size_t)n * 512, (unsigned)rand_r(&seed));
		ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, sec, n, b), 0);
		memcpy(sec_model + sec * 512, b, (size_t)n * 512);
		free(b);
	}
	ck_assert_int_eq(op("start"), 0);
	memcpy(view, sec_model, DISK_SIZE);

	for (int round = 0; round < ROUNDS; round++) {
		struct mreq m[BATCH];
		int n = 0;
		/* SVM writes and SVM reads in one batch must not overlap each other. */
		uint64_t busy_lo[BATCH], busy_hi[BATCH];
		int nbusy = 0;

		for (int i = 0; i < BATCH; i++) {
			int kind = rand_r(&seed) % 10;
			uint64_t sec = (uint64_t)(rand_r(&seed) % (DISK_SECS - MAXSECS));
			uint32_t secs = 1 + (uint32_t)(rand_r(&seed) % MAXSECS);
			struct mreq *x = &m[n];
			bool clash = false;

			if (kind < 4) {
				/* Primary write: changes the secondary disk only. */
				memset(x, 0, sizeof(*x));
				x->buf = xalloc((size_t)secs * 512);
				fill(x->buf, (size_t)secs * 512, (unsigned)rand_r(&seed));
				memcpy(sec_model + sec * 512, x->buf, (size_t)secs * 512);
				td_request_init(&x->req, TD_OP_WRITE, sec, secs, x->buf, req_done, &x->dn);
				td_disk_submit(exp_disk, &x->req);
				pwrites++;
				n++;
				continue;
			}
			for (int k = 0; k < nbusy; k++)
				if (sec < busy_hi[k] && busy_lo[k] < sec + secs)
					clash = true;
			if (clash)
				continue;
			busy_lo[nbusy] = sec;
			busy_hi[nbusy++] = sec + secs;
			model_svm_submit(x, kind < 7, sec, secs, view, &seed);
			if (kind < 7)
				swrites++;
			else
				reads++;
			n++;
		}
		/*
		 * A checkpoint with the batch in flight: it drains what was
		 * submitted before it, so the reads see the view they were
		 * submitted against, the SVM's writes are dropped with active,
		 * and the primary's are in what the SVM sees next.
		 */
		if (n && rand_r(&seed) % 25 == 0) {
			for (int i = 0; i < n; i++)
				drained += !m[i].dn.done;
			ck_assert_int_eq(op("checkpoint"), 0);
			memcpy(view, sec_model, DISK_SIZE);
			checkpoints++;
			inflight_checkpoints++;
		}
		model_finish_batch(m, n, "round", round);
		if (rand_r(&seed) % 25 == 0) {
			ck_assert_int_eq(op("checkpoint"), 0);
			memcpy(view, sec_model, DISK_SIZE);
			checkpoints++;
		}
	}
	/* The whole view, then failover with SVM writes racing the commit. */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);
	ck_assert_int_eq(op("failover"), 0);
	/*
	 * Batches of concurrent SVM reads and writes while the commit runs
	 * (and a few after it, in done): what the SVM writes during the
	 * commit must reach the secondary disk, what it reads is its view.
	 */
	for (int b = 0; b < 400 && (b < 8 || state() == REPLICA_STATE_FAILOVER); b++) {
		struct mreq m[BATCH];
		bool during = state() == REPLICA_STATE_FAILOVER;

		for (int i = 0; i < BATCH; i++) {
			uint32_t secs = 1 + (uint32_t)(rand_r(&seed) % MAXSECS);
			/* Disjoint slots: requests of one batch never overlap. */
			uint64_t slot = DISK_SECS / BATCH;
			uint64_t sec = i * slot + (uint64_t)(rand_r(&seed) % (slot - secs));

			model_svm_submit(&m[i], rand_r(&seed) % 2, sec, secs, view, &seed);
			fo_requests += during;
		}
		model_finish_batch(m, BATCH, "failover batch", b);
	}
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	ck_assert_int_eq(iio(secondary, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert(memcmp(got, view, DISK_SIZE) == 0);
	ck_assert_int_gt(checkpoints, 5);
	ck_assert_int_gt(inflight_checkpoints, 2);
	ck_assert_int_gt(drained, 0);
	ck_assert_int_gt(fo_requests, 0);
	ck_assert_int_gt(reads, 200);
	ck_assert_int_gt(pwrites, 500);
	ck_assert_int_gt(swrites, 200);
	free(sec_model);
	free(view);
	free(got);
}
END_TEST

/* ------------------------------------------------------------ races */

/*
 * A gate on one image's writes: while it is up, writes queued to that
 * image (those starting at gate_sec only, unless UINT64_MAX) are held
 * until gate_release() passes them on; later ones go through once
 * gate_open is set.  With gate_flushes, its flushes are held too, to the
 * release.  A disk gives requests in flight no order, so a gate only
 * picks one of the completion orders a real disk may produce.
 */
#define GATE_MAX 16
static struct td_driver gate_drv;
static const struct td_driver *gate_orig;
static struct td_image *gate_img;
static struct td_request *gate_held[GATE_MAX];
static int gate_n, gate_passed;
static uint64_t gate_sec;
static bool gate_open, gate_flushes;

static void gate_hold(struct td_request *req)
{
	ck_assert_int_lt(gate_n, GATE_MAX);
	gate_held[gate_n++] = req;
}

static void gate_flush(struct td_image *img, struct td_request *req)
{
	if (gate_flushes) {
		gate_hold(req);
		return;
	}
	gate_orig->queue_flush(img, req);
}

static void gate_write(struct td_image *img, struct td_request *req)
{
	if (!gate_open && (gate_sec == UINT64_MAX || req->sec == gate_sec)) {
		gate_hold(req);
		return;
	}
	if (gate_sec == UINT64_MAX || req->sec == gate_sec)
		gate_passed++;
	gate_orig->queue_write(img, req);
}

static void gate_install(struct td_image *img, uint64_t sec)
{
	gate_orig = img->drv;
	gate_drv = *img->drv;
	gate_drv.queue_write = gate_write;
	gate_drv.queue_flush = gate_flush;
	gate_img = img;
	gate_n = gate_passed = 0;
	gate_sec = sec;
	gate_open = gate_flushes = false;
	img->drv = &gate_drv;
}

/* Passes the held writes on, in order, and takes the gate down. */
static void gate_release(void)
{
	int n = gate_n;

	gate_img->drv = gate_orig;
	gate_n = 0;
	for (int i = 0; i < n; i++) {
		if (gate_held[i]->op == TD_OP_FLUSH)
			gate_orig->queue_flush(gate_img, gate_held[i]);
		else
			gate_orig->queue_write(gate_img, gate_held[i]);
	}
}

static void run_until_held(int n)
{
	for (int i = 0; i < 20000 && gate_n < n; i++)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1), 0);
	ck_assert_int_eq(gate_n, n);
}

/* Until a write at sec is among the held requests. */
static void run_until_copy_held(uint64_t sec)
{
	for (int i = 0; i < 20000; i++) {
		for (int k = 0; k < gate_n; k++)
			if (gate_held[k]->op == TD_OP_WRITE && gate_held[k]->sec == sec)
				return;
		ck_assert_int_ge(tdr_loop_run_once(loop, 1), 0);
	}
	ck_abort_msg("no write at sector %llu was held", (unsigned long long)sec);
}

static void spin(int n)
{
	for (int i = 0; i < n; i++)
		ck_assert_int_ge(tdr_loop_run_once(loop, 1), 0);
}

/* The secondary disk, all of it, must read as want. */
static void expect_secondary_is(const char *want)
{
	char *got = xalloc(DISK_SIZE);

	ck_assert_int_eq(iio(secondary, TD_OP_READ, 0, DISK_SECS, got), 0);
	for (uint64_t sct = 0; sct < DISK_SECS; sct++)
		ck_assert_msg(!memcmp(got + sct * 512, want + sct * 512, 512),
			      "the secondary disk differs from the SVM's view at sector %llu",
			      (unsigned long long)sct);
	free(got);
}

/*
 * Failover asked with an SVM write in flight while a primary write's copy
 * into hidden is slow: the SVM write completes while the failover waits
 * for the primary's write.  The commit must still start from everything
 * active and hidden hold, not from the chunks of that SVM write alone
 * (which once switched to done without the rest).
 */
START_TEST(failover_svm_write_completes_while_primary_drains)
{
	char *d = xalloc(MIB), *w = xalloc(MIB), *p = xalloc(MIB), *view = xalloc(DISK_SIZE);
	char *got = xalloc(DISK_SIZE);
	struct td_request preq, wreq;
	struct done pd = { 0 }, wd = { 0 };

	ck_assert_int_eq(op("start"), 0);
	fill(d, MIB, 40);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 128, d), 0);	/* chunk 0 in active */
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, view), 0);

	/* A primary write to chunk 100, its copy into hidden held. */
	gate_install(hidden, UINT64_MAX);
	fill(p, MIB, 41);
	td_request_init(&preq, TD_OP_WRITE, 12800, 8, p, req_done, &pd);
	td_disk_submit(exp_disk, &preq);
	run_until_held(1);

	fill(w, MIB, 42);
	td_request_init(&wreq, TD_OP_WRITE, 1280, 8, w, req_done, &wd);
	td_disk_submit(disk, &wreq);
	memcpy(view + 1280 * 512, w, 8 * 512);
	ck_assert_int_eq(op("failover"), 0);
	run_until(&wd.done);
	ck_assert_int_eq(wd.err, 0);
	spin(2000);
	/* Still waiting for the primary's write: nothing committed yet. */
	ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER);
	ck_assert(!pd.done);
	gate_release();
	run_until(&pd.done);
	ck_assert_int_eq(pd.err, 0);
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	expect_secondary_is(view);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, got), 0);
	ck_assert_msg(memcmp(got, view, DISK_SIZE) == 0, "after the failover the SVM reads other bytes");
	free(d);
	free(w);
	free(p);
	free(view);
	free(got);
}
END_TEST

/*
 * A retry from failover-failed with an SVM write in flight (the SVM keeps
 * running in failover-failed): the write's completion must not end the
 * retry with the last attempt's error before it began.
 */
START_TEST(failover_retry_with_svm_write_in_flight)
{
	char *w = xalloc(MIB), *view = xalloc(DISK_SIZE);
	struct td_request wreq;
	struct done wd = { 0 };

	ck_assert_int_eq(op("start"), 0);
	fill(w, MIB, 50);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 0, 128, w), 0);		/* active */
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 8192, 128, w), 0);	/* hidden */
	tdr_io_set_fault(io, TDR_FAULT_FAIL, 0);
	failover_to(REPLICA_STATE_FAILOVER_FAILED);
	tdr_io_set_fault(io, TDR_FAULT_NONE, 0);

	fill(w, MIB, 51);
	td_request_init(&wreq, TD_OP_WRITE, 16, 8, w, req_done, &wd);
	td_disk_submit(disk, &wreq);
	ck_assert_int_eq(op("failover"), 0);
	run_until(&wd.done);
	ck_assert_int_eq(wd.err, 0);
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(op("get-error"), 0);
	ck_assert_msg(state() == REPLICA_STATE_DONE, "the retry ended in %s: %s",
		      replica_state_name(state()), last_msg);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 0, DISK_SECS, view), 0);
	expect_secondary_is(view);
	free(w);
	free(view);
}
END_TEST

/*
 * The commit's copy of a chunk is writing into the secondary disk (held)
 * when the SVM rewrites the chunk.  The chunk must be copied again, but
 * only after the first copy landed: two copies in flight could land in
 * either order, and the older last would put the old data back.  The
 * secondary disk's flushes are held too: the last phase, which holds SVM
 * writes, begins after one, and the SVM's write must go in first.
 */
START_TEST(failover_copies_of_a_chunk_never_overlap)
{
	char *a = xalloc(MIB), *w = xalloc(MIB), *got = xalloc(MIB);
	struct td_request wreq;
	struct done wd = { 0 };

	ck_assert_int_eq(op("start"), 0);
	fill(a, MIB, 60);
	ck_assert_int_eq(dio(disk, TD_OP_WRITE, 5120, 128, a), 0);	/* chunk 40 in active */
	gate_install(secondary, 5120);
	gate_flushes = true;
	ck_assert_int_eq(op("failover"), 0);
	run_until_copy_held(5120);
	gate_open = true;
	fill(w, MIB, 61);
	td_request_init(&wreq, TD_OP_WRITE, 5120, 128, w, req_done, &wd);
	td_disk_submit(disk, &wreq);
	run_until(&wd.done);
	ck_assert_int_eq(wd.err, 0);
	spin(2000);
	ck_assert_msg(gate_passed == 0, "a second copy of the chunk was written while the first was in flight");
	ck_assert_int_eq(state(), REPLICA_STATE_FAILOVER);
	gate_release();
	wait_state_not(REPLICA_STATE_FAILOVER);
	ck_assert_int_eq(state(), REPLICA_STATE_DONE);
	ck_assert_int_eq(iio(secondary, TD_OP_READ, 5120, 128, got), 0);
	ck_assert_msg(memcmp(got, w, 128 * 512) == 0, "the secondary disk holds %s",
		      memcmp(got, a, 128 * 512) == 0 ? "the chunk from before the SVM's write" : "other data");
	ck_assert_int_eq(dio(disk, TD_OP_READ, 5120, 128, got), 0);
	ck_assert_msg(memcmp(got, w, 128 * 512) == 0, "the SVM lost its write");
	free(a);
	free(w);
	free(got);
}
END_TEST

/*
 * A primary write that arrives while start empties active and hidden
 * waits for running and is copied before it lands: the SVM's view of the
 * range stays the secondary disk's at start until the next checkpoint.
 */
START_TEST(start_holds_primary_writes)
{
	char *old = xalloc(MIB), *neu = xalloc(MIB), *r1 = xalloc(MIB), *r2 = xalloc(MIB);
	struct td_request preq, rreq;
	struct done pd = { 0 }, sd = { 0 }, rd = { 0 };
	struct replica_status st;
	struct replica_cmd cmd;
	char msg[256];

	fill(old, MIB, 70);
	fill(neu, MIB, 71);
	ck_assert_int_eq(dio(exp_disk, TD_OP_WRITE, 2048, 8, old), 0);	/* initial sync */
	ck_assert_int_eq(replica_parse("start", &cmd, msg, sizeof(msg)), 0);
	replica_execute(rep, &cmd, op_done_cb, &sd);
	gate_install(secondary, 2048);
	td_request_init(&preq, TD_OP_WRITE, 2048, 8, neu, req_done, &pd);
	td_disk_submit(exp_disk, &preq);
	run_until(&sd.done);
	ck_assert_int_eq(sd.err, 0);
	ck_assert_int_eq(state(), REPLICA_STATE_RUNNING);
	run_until_held(1);
	/* The SVM reads the range while the primary's write is in flight. */
	td_request_init(&rreq, TD_OP_READ, 2048, 8, r1, req_done, &rd);
	td_disk_submit(disk, &rreq);
	spin(200);
	gate_release();
	run_until(&pd.done);
	ck_assert_int_eq(pd.err, 0);
	run_until(&rd.done);
	ck_assert_int_eq(rd.err, 0);
	ck_assert_int_eq(dio(disk, TD_OP_READ, 2048, 8, r2), 0);
	ck_assert_msg(memcmp(r1, old, 8 * 512) == 0, "the SVM's first read is not the disk at start");
	ck_assert_msg(memcmp(r2, old, 8 * 512) == 0, "the SVM's view changed without a checkpoint");
	expect_image(secondary, 2048, 8, neu);
	replica_get_status(rep, &st);
	ck_assert_uint_eq(st.stats.cbw_count, 1);
	free(old);
	free(neu);
	free(r1);
	free(r2);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("replica-secondary");
	TCase *tc = tcase_create("secondary");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, io_before_start);
	tcase_add_test(tc, failover_with_busy_svm);
	tcase_add_test(tc, close_during_failover);
	tcase_add_test(tc, close_waits_for_export_writes);
	tcase_add_test(tc, primary_write_svm_sees_old_data);
	tcase_add_test(tc, svm_write_then_read_then_checkpoint);
	tcase_add_test(tc, failover_secondary_equals_svm_view);
	tcase_add_test(tc, power_cut_during_failover);
	tcase_add_test(tc, power_cut_scratch_then_failover);
	tcase_add_test(tc, power_cut_failover_with_svm_writes);
	tcase_add_test(tc, stop_without_failover);
	tcase_add_test(tc, operations_in_wrong_states);
	tcase_add_test(tc, failover_refuses_in_flight_state_cleanly);
	tcase_add_test(tc, primary_write_past_the_end);
	tcase_add_test(tc, cbw_failure_reported);
	tcase_add_test(tc, cbw_failure_undoes_the_write);
	tcase_add_test(tc, make_empty_failure_reported);
	tcase_add_test(tc, commit_failure_then_routing_then_retry);
	tcase_add_test(tc, failover_chain_flush_failure);
	tcase_add_test(tc, failover_resumes_after_interrupted_close);
	tcase_add_test(tc, failover_after_restart_while_running);
	tcase_add_test(tc, scratch_off_option);
	tcase_add_test(tc, scratch_primary_flush_skips_hidden);
	tcase_add_test(tc, bad_chains);
	tcase_add_test(tc, mismatched_sizes);
	suite_add_tcase(s, tc);
	/* Its own case, so that CK_RUN_CASE=model runs it alone (tests/unit/soak-model). */
	tc = tcase_create("model");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, randomized_model);
	suite_add_tcase(s, tc);
	tc = tcase_create("races");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, failover_svm_write_completes_while_primary_drains);
	tcase_add_test(tc, failover_retry_with_svm_write_in_flight);
	tcase_add_test(tc, failover_copies_of_a_chunk_never_overlap);
	tcase_add_test(tc, start_holds_primary_writes);
	suite_add_tcase(s, tc);
	return check_run(s, CHECK_RUN_NOFORK);
}
