/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Driver "vhd": fixed, dynamic and differencing VHD files, asynchronous.
 *
 * The whole file is validated at open (vhd_meta_load) before anything may be
 * written.  The BAT lives in memory; bitmaps of allocated blocks are cached.
 * Requests run in parallel; nothing serialises them except where the format
 * needs it:
 *   - one allocation per block: writes to a block being allocated join it;
 *   - one bitmap write at a time per block (later bits wait for the next);
 *   - one write at a time per BAT sector (entries of several allocations in
 *     the same sector go in the next write);
 *   - one footer write at a time.
 * Allocation is crash-safe (see vhd-file.c for the same order):
 *   1. file space is assigned in memory at once (next_free), so allocations
 *      of different blocks proceed in parallel;
 *   2. if the block does not fit under the footer, the footer moves
 *      past every block the file can hold (footer_kick; the file stays
 *      sparse, and a clean close trims it) and is made
 *      durable, so the file always ends with a footer and most
 *      allocations need no footer write at all; no block is ever placed
 *      over a footer, so the old one stays in padding;
 *   3. bitmap and data of the new block are written;
 *   4. fdsync (group commit: one sync answers every allocation whose
 *      writes completed before it was issued);
 *   5. the BAT sector pointing at the block is written, and only then are
 *      the writes acknowledged.
 *   A dynamic disk's new block in never-written space skips 4 and writes
 *   5 with 3 (alloc_needs_sync).
 * A crash at any point leaves a valid file, with at most leaked space.
 * For an allocated block of a differencing disk, a write whose sectors were
 * not yet marked waits for its data, then fdsync, then the bitmap write: a
 * bit never exposes data that is not on disk (dynamic disks skip the fdsync,
 * see bm_flush).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/filelock.h"
#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/vhd.h"

/*
 * Bitmaps kept when unused: 32768 cover 64 GiB of allocated 2 MiB blocks,
 * in about 26 MiB (a 512-byte map and its struct each; the aligned buffer
 * for I/O is there only while the bitmap is read or written).  A write
 * into a block whose bitmap was evicted reads it first: with 4096, 4 KiB
 * random writes over a fresh 64 GiB disk read a bitmap for two writes in
 * three, and ran 10% slower.
 */
#define BM_CACHE_MAX 32768u
#define BM_HASH 8192u

struct vhd_state;

/* One request (or piece of one) at the file. */
struct vhd_op {
	struct tdr_iocb iocb;
	struct vhd_state *s;
	struct td_request *req;
	struct tdr_list entry;
	uint32_t block, in, n;	/* the piece's block and sectors in it */
	struct vhd_bm *bm;
	/*
	 * A dynamic disk's write over clear bits sends its data and its
	 * bitmap bits together (op_with_bitmap): the parts still out, and the
	 * first error.  0 for every other op.
	 */
	unsigned parts;
	int err;
};

/*
 * Group commit: a waiter whose writes have completed asks for a sync and is
 * answered by the next fdsync issued after it asked; everyone who asked
 * while one sync was in flight shares the following one.
 */
struct vhd_sync_waiter {
	struct tdr_list entry;
	void (*cb)(struct vhd_sync_waiter *w, int err);
};

/* The cached bitmap of an allocated block. */
struct vhd_bm {
	struct vhd_state *s;
	uint32_t block;
	uint8_t *map;		/* bits set only once their data is written */
	/*
	 * Bits that a completed write (or the load, or the block's
	 * allocation) put in the file.  map may be ahead of it: a write
	 * finds its bits there set by another write whose bitmap write is
	 * not out yet, and must not count on them (write_io_done).
	 */
	uint8_t *disk;
	uint8_t *wbuf;		/* aligned: being read into or written, else NULL */
	bool loaded, loading, writing;
	bool orphan;		/* dropped while held (bm_drop_all): the last bm_put frees it */
	bool sync_done;
	bool fua;
	unsigned refs;
	struct tdr_list waiters;	/* ops waiting for the load */
	struct tdr_list pending;	/* ops whose bits go in the next write */
	struct tdr_list inflight;	/* ops whose bits are being written */
	struct tdr_list early;		/* ops whose bits are written, data not yet */
	struct tdr_list lru;
	struct tdr_iocb iocb;
	struct vhd_sync_waiter sync;
	struct vhd_bm *hnext;
	int err;
};

enum alloc_state { AL_FOOTER, AL_WRITING, AL_SYNC, AL_BAT };

/* A block being allocated. */
struct vhd_alloc {
	struct vhd_state *s;
	uint32_t block;
	uint64_t off, end;	/* bytes: bitmap start, end of data */
	uint64_t lead;		/* bytes of padding written in front of the bitmap */
	uint8_t *map;
	uint8_t *wbuf;		/* lead zeroes + bitmap, as written */
	enum alloc_state state;
	int pending, err;
	bool fua;
	bool bat_early;		/* BAT sector written with the data (alloc_needs_sync) */
	struct tdr_list batch;	/* ops written by this allocation */
	struct tdr_list later;	/* ops that came after the writes started */
	struct tdr_list entry;	/* footer or BAT sector wait list */
	struct tdr_iocb iocb;
	struct vhd_sync_waiter sync;
	struct vhd_alloc *hnext;
};

struct bat_sec {
	struct vhd_state *s;
	uint32_t idx;
	bool busy;
	bool fua;
	struct tdr_list waiting;
	struct tdr_list inflight;
	struct tdr_iocb iocb;
	uint8_t *buf;
};

struct vhd_state {
	struct td_image *img;
	int fd;
	bool direct;
	struct vhd_meta m;	/* m.bat: the live BAT (what reads see) */
	uint32_t *bat_disk;	/* what is on disk or being written */
	size_t bat_disk_len;	/* its bytes (vhd_big_alloc) */
	struct bat_sec *bsec;
	uint32_t nbsec;
	uint64_t size_secs;
	uint32_t bm_bytes;

	uint64_t next_free;	/* bytes */
	uint64_t place_floor;	/* from place_floor to next_free: padding, unused */
	uint64_t assigned_end;	/* end of the last assigned block */
	uint64_t footer_off;	/* where the footer is (written) */
	/*
	 * Where moves left the footers before footer_off that may still lie
	 * ahead of next_free (ascending): no block is placed over them.
	 */
	uint64_t *old_footers;
	unsigned n_old_footers, cap_old_footers;
	bool footer_busy;
	uint64_t footer_target;
	bool footer_near;	/* the file cannot be that long (EFBIG): steps instead */
	struct tdr_list footer_waiters;
	struct vhd_footer_mv *fmv;
	uint8_t *zero_block;	/* ZERO_BUF bytes of zeroes, allocated when first needed */

	struct vhd_bm *bm_hash[BM_HASH];
	struct vhd_alloc *al_hash[BM_HASH];
	struct tdr_list lru;
	unsigned bm_count;

	/*
	 * After an online make-empty the cleared BAT is on disk but its sync
	 * runs in the background, so that a checkpoint never waits for a
	 * disk flush.  Until every such sync is done, an allocation must not
	 * overwrite space below reuse_end (blocks the old BAT may still point
	 * at after a crash): it waits in reuse_waiters.
	 */
	struct tdr_list reuse_syncs;	/* struct vhd_reuse_sync in flight */

	/* Group commit (struct vhd_sync_waiter). */
	bool scratch;			/* vhd_image_set_scratch(): no ordering syncs */
	bool ordered;			/* vhd_image_set_ordered(): every allocation syncs */
	struct tdr_iocb gsync_iocb;
	bool gsync_inflight;
	struct tdr_list gsync_next;	/* answered by the next sync */
	struct tdr_list gsync_covered;	/* answered by the one in flight */
	/*
	 * The allocated blocks, in allocation order, so that make-empty costs
	 * what was written since the last one, not a scan of the whole BAT.
	 * alloc_list_lost: an append failed (no memory); scan the BAT instead.
	 */
	uint32_t *alloc_list;
	uint32_t nalloc_list, alloc_list_cap;
	bool alloc_list_lost;
	uint64_t reuse_end;
	struct tdr_list reuse_waiters;	/* struct vhd_alloc */

	unsigned ops_live;
	unsigned jobs_live;		/* make-empty and commit runs */
	struct {
		uint64_t allocs, bm_writes, bm_loads, bm_hits, bat_writes, footer_writes;
		uint64_t joined_allocs, evictions, reuse_waits;
		uint64_t gsyncs, gsyncs_skipped;	/* group syncs issued, not needed (scratch) */
		uint64_t zero_elided;	/* zero pieces of new blocks not written (alloc_write) */
		uint64_t fresh_unsynced;	/* allocations that needed no sync (alloc_needs_sync) */
	} st;
};

struct vhd_reuse_sync {
	struct tdr_iocb iocb;
	struct vhd_state *s;
	struct tdr_list entry;
};

static void vhd_write_seg(struct vhd_state *s, struct td_request *req);
static void vhd_read_seg(struct vhd_state *s, struct td_request *req);

static inline bool is_dynamic(const struct vhd_state *s)
{
	return vhd_meta_dynamic(&s->m);
}

static inline bool is_diff(const struct vhd_state *s)
{
	return s->m.footer.type == VHD_TYPE_DIFF;
}

/* img is an image of this driver, dynamic or differencing (the online operations' only kind). */
static inline bool img_is_dynamic_vhd(const struct td_image *img)
{
	return img->drv == &td_drv_vhd && is_dynamic(img->priv);
}

/* Sectors of block b: spb, less for a last block cut by the disk's end. */
static inline uint32_t block_secs(const struct vhd_state *s, uint32_t b)
{
	uint64_t base = (uint64_t)b * s->m.spb;

	return s->size_secs - base < s->m.spb ? (uint32_t)(s->size_secs - base) : s->m.spb;
}

/* The next block goes at the first good place at or after from (bytes). */
static void set_next_free(struct vhd_state *s, uint64_t from)
{
	s->place_floor = from;
	s->next_free = vhd_block_place(from, s->m.bm_secs);
}

static inline uint64_t data_off(const struct vhd_state *s, uint32_t bat_entry, uint32_t in)
{
	return ((uint64_t)bat_entry + s->m.bm_secs + in) << VHD_SECTOR_SHIFT;
}

static struct vhd_op *op_new(struct vhd_state *s, struct td_request *req)
{
	struct vhd_op *op = calloc(1, sizeof(*op));

	if (!op)
		return NULL;
	op->s = s;
	op->req = req;
	op->block = (uint32_t)(is_dynamic(s) ? req->sec / s->m.spb : 0);
	op->in = (uint32_t)(is_dynamic(s) ? req->sec % s->m.spb : 0);
	op->n = req->secs;
	tdr_list_init(&op->entry);
	s->ops_live++;
	return op;
}

static void op_finish(struct vhd_op *op, int err)
{
	struct td_request *req = op->req;

	op->s->ops_live--;
	free(op);
	td_complete_request(req, err);
}

/* ------------------------------------------------------------------ */
/* Forwarding, with a parent that may be smaller */

static void fill_zero(struct td_request *req)
{
	if (req->op == TD_OP_READ) {
		memset(req->buf, 0, (size_t)req->secs << TD_SECTOR_SHIFT);
	} else {
		req->bs_secs = req->secs;
		req->bs_flags = TD_BS_HOLE | TD_BS_ZERO;
	}
	td_complete_request(req, 0);
}

/* A read or block status for sectors this image does not hold. */
static void serve_below(struct vhd_state *s, struct td_request *req)
{
	struct td_image *img = s->img;
	uint64_t psecs;
	struct td_request *sub;

	if (!is_diff(s) || !img->parent) {
		fill_zero(req);
		return;
	}
	psecs = img->parent->size_secs;
	if (req->sec + req->secs <= psecs) {
		td_forward_request(img, req);
		return;
	}
	if (req->sec >= psecs) {
		fill_zero(req);
		return;
	}
	td_request_split_begin(req);
	sub = td_request_sub(req, req->sec, (uint32_t)(psecs - req->sec));
	if (sub)
		td_forward_request(img, sub);
	if (req->op == TD_OP_READ) {
		sub = td_request_sub(req, psecs, (uint32_t)(req->sec + req->secs - psecs));
		if (sub)
			fill_zero(sub);
	}
	td_request_split_end(req);
}

/* ------------------------------------------------------------------ */
/* Bitmap cache */

static struct vhd_bm *bm_find(struct vhd_state *s, uint32_t block)
{
	struct vhd_bm *bm;

	for (bm = s->bm_hash[block % BM_HASH]; bm; bm = bm->hnext)
		if (bm->block == block)
			return bm;
	return NULL;
}

static void bm_unhash(struct vhd_state *s, struct vhd_bm *bm)
{
	struct vhd_bm **pp = &s->bm_hash[bm->block % BM_HASH];

	while (*pp != bm)
		pp = &(*pp)->hnext;
	*pp = bm->hnext;
}

static void bm_free(struct vhd_bm *bm)
{
	free(bm->wbuf);
	free(bm);
}

static void bm_evict_some(struct vhd_state *s)
{
	while (s->bm_count > BM_CACHE_MAX && !tdr_list_empty(&s->lru)) {
		struct vhd_bm *bm = tdr_list_entry(s->lru.next, struct vhd_bm, lru);

		tdr_list_del(&bm->lru);
		bm_unhash(s, bm);
		bm_free(bm);
		s->bm_count--;
		s->st.evictions++;
	}
}

/* A cached bitmap: a copy of map, or zeroes until loaded. */
static struct vhd_bm *bm_new(struct vhd_state *s, uint32_t block, const uint8_t *map)
{
	/* The maps right behind the struct: one allocation per cached bitmap. */
	struct vhd_bm *bm = calloc(1, sizeof(*bm) + 2 * (size_t)s->bm_bytes);

	if (!bm)
		return NULL;
	bm->s = s;
	bm->block = block;
	bm->map = (uint8_t *)(bm + 1);
	bm->disk = bm->map + s->bm_bytes;
	if (map) {
		memcpy(bm->map, map, s->bm_bytes);
		memcpy(bm->disk, map, s->bm_bytes);
	}
	tdr_list_init(&bm->waiters);
	tdr_list_init(&bm->pending);
	tdr_list_init(&bm->inflight);
	tdr_list_init(&bm->early);
	tdr_list_init(&bm->lru);
	bm->hnext = s->bm_hash[block % BM_HASH];
	s->bm_hash[block % BM_HASH] = bm;
	s->bm_count++;
	return bm;
}

static void bm_get(struct vhd_bm *bm)
{
	if (bm->refs++ == 0)
		tdr_list_del(&bm->lru);
}

static void bm_put(struct vhd_bm *bm)
{
	struct vhd_state *s = bm->s;

	if (--bm->refs == 0) {
		if (bm->orphan) {
			bm_free(bm);
			return;
		}
		if (!bm->loaded) {
			/* a failed load: forget it so the next user retries */
			bm_unhash(s, bm);
			bm_free(bm);
			s->bm_count--;
			return;
		}
		tdr_list_add_tail(&bm->lru, &s->lru);
		bm_evict_some(s);
	}
}

static void op_with_bitmap(struct vhd_op *op, int err);

static void bm_load_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_bm *bm = arg;
	struct tdr_list *pos, *tmp;
	int err = res < 0 ? (int)res : (res != (ssize_t)bm->s->bm_bytes ? -EIO : 0);

	bm->loading = false;
	if (!err) {
		memcpy(bm->map, bm->wbuf, bm->s->bm_bytes);
		memcpy(bm->disk, bm->wbuf, bm->s->bm_bytes);
		bm->loaded = true;
	}
	free(bm->wbuf);
	bm->wbuf = NULL;
	bm_get(bm);	/* the waiters may drop the last reference */
	tdr_list_for_each_safe(pos, tmp, &bm->waiters) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		tdr_list_del(&op->entry);
		op_with_bitmap(op, err);
	}
	bm_put(bm);
}

/* Gets the bitmap of op's (allocated) block, then calls op_with_bitmap. */
static void op_need_bitmap(struct vhd_op *op)
{
	struct vhd_state *s = op->s;
	struct vhd_bm *bm = bm_find(s, op->block);

	if (!bm) {
		bm = bm_new(s, op->block, NULL);
		if (!bm) {
			op_finish(op, -ENOMEM);
			return;
		}
	}
	bm_get(bm);
	op->bm = bm;
	if (bm->loaded) {
		s->st.bm_hits++;
		op_with_bitmap(op, 0);
		return;
	}
	tdr_list_add_tail(&op->entry, &bm->waiters);
	if (!bm->loading) {
		if (!bm->wbuf && !(bm->wbuf = tdr_io_alloc(s->bm_bytes))) {
			bm_load_done(&bm->iocb, -ENOMEM, bm);
			return;
		}
		bm->loading = true;
		s->st.bm_loads++;
		tdr_io_pread(s->img->io, &bm->iocb, s->fd, bm->wbuf, s->bm_bytes,
			     (uint64_t)s->m.bat[op->block] << VHD_SECTOR_SHIFT, bm_load_done, bm);
	}
}

/* ------------------------------------------------------------------ */
/* Reads */

static void read_io_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_op *op = arg;
	size_t len = (size_t)op->req->secs << TD_SECTOR_SHIFT;

	op_finish(op, res < 0 ? (int)res : ((size_t)res != len ? -EIO : 0));
}

static void read_file(struct vhd_state *s, struct td_request *req, uint64_t off)
{
	struct vhd_op *op = op_new(s, req);

	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	tdr_io_pread(s->img->io, &op->iocb, s->fd, req->buf, (size_t)req->secs << TD_SECTOR_SHIFT,
		     off, read_io_done, op);
}

static void read_runs(struct vhd_op *op)
{
	struct vhd_state *s = op->s;
	struct td_request *req = op->req;
	const uint8_t *map = op->bm->map;
	uint32_t entry = s->m.bat[op->block];
	uint32_t i = 0;
	bool set;
	uint32_t run = vhd_bitmap_run(map, op->in, op->n, &set);

	if (run == op->n) {
		/* the common case: one run, no split */
		op->s->ops_live--;
		bm_put(op->bm);
		free(op);
		if (set)
			read_file(s, req, data_off(s, entry, (uint32_t)(req->sec % s->m.spb)));
		else
			serve_below(s, req);
		return;
	}
	td_request_split_begin(req);
	while (i < op->n) {
		struct td_request *sub;

		run = vhd_bitmap_run(map, op->in + i, op->n - i, &set);
		sub = td_request_sub(req, req->sec + i, run);
		if (!sub)
			break;
		if (set)
			read_file(s, sub, data_off(s, entry, op->in + i));
		else
			serve_below(s, sub);
		i += run;
	}
	bm_put(op->bm);
	s->ops_live--;
	free(op);
	td_request_split_end(req);
}

/*
 * Where the footer goes when the file must grow: past the end of every
 * block the file can ever hold (footer_limit), in one move, as holes.
 * Every later allocation fits under it and needs no footer write of its
 * own.  A move ends in a sync, and a sync writes back everything written
 * since the last one: on this class of machine, moves that followed the
 * file's growth (64 MiB to 1 GiB steps, then doubling steps) held 1 MiB
 * writes into a fresh disk to a third of what the same writes got with
 * one move, because each sync stalled the writes around it for as long as
 * the data before it took to write back.  While the disk is open its file
 * is as long as the disk can ever get; a clean close trims it back to its
 * last block (vhd_trim), so a file at rest is as long as its data.  After
 * a crash of the daemon the long file is valid, and the next close trims
 * it.
 */
#define FOOTER_STEP_MIN (64ull << 20)

/*
 * Past the end of every block the file can ever hold: each block with its
 * bitmap and a page of padding, and some pages more for footers that
 * moves leave behind (alloc_start places blocks past them).
 */
static uint64_t footer_limit(const struct vhd_state *s)
{
	uint64_t per = s->m.header.block_size + s->bm_bytes + VHD_PAGE_SIZE;

	return ((s->m.meta_end + VHD_PAGE_SIZE - 1) & ~(VHD_PAGE_SIZE - 1)) +
	       (uint64_t)s->m.blocks * per + 64 * 2 * VHD_PAGE_SIZE;
}

/*
 * The bytes a footer may cover: two sectors from the one it starts in (a
 * file whose length is not a multiple of 512 has its footer across two).
 */
#define FOOTER_SPAN (2 * VHD_SECTOR_SIZE)

/*
 * A footer move's buffers and iocb, in one allocation that a close can
 * orphan (tdr_io_orphan): a move started ahead of need may still be in
 * flight after the last request completed, when a disk is closed.  Both
 * buffers are TDR_IO_ALIGN-aligned for direct I/O.
 */
struct vhd_footer_mv {
	uint8_t footer[TDR_IO_ALIGN];		/* the footer, VHD_FOOTER_SIZE bytes */
	struct tdr_iocb iocb;
};
_Static_assert(VHD_FOOTER_SIZE <= TDR_IO_ALIGN, "the footer fits its aligned slot");

/* The zero buffer of alloc_zero_gaps: longer runs go in several writes. */
#define ZERO_BUF (1u << 20)

/* ------------------------------------------------------------------ */
/* Group commit */

static void gsync_issue(struct vhd_state *s);

static void gsync_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_state *s = arg;
	struct tdr_list done, *pos, *tmp;

	s->gsync_inflight = false;
	tdr_list_init(&done);
	tdr_list_for_each_safe(pos, tmp, &s->gsync_covered) {
		tdr_list_del(pos);
		tdr_list_add_tail(pos, &done);
	}
	if (!tdr_list_empty(&s->gsync_next))
		gsync_issue(s);
	tdr_list_for_each_safe(pos, tmp, &done) {
		struct vhd_sync_waiter *w = tdr_list_entry(pos, struct vhd_sync_waiter, entry);

		tdr_list_del(pos);
		w->cb(w, res < 0 ? (int)res : 0);
	}
}

static void gsync_issue(struct vhd_state *s)
{
	struct tdr_list *pos, *tmp;

	tdr_list_for_each_safe(pos, tmp, &s->gsync_next) {
		tdr_list_del(pos);
		tdr_list_add_tail(pos, &s->gsync_covered);
	}
	s->gsync_inflight = true;
	s->st.gsyncs++;
	tdr_io_fdsync(s->img->io, &s->gsync_iocb, s->fd, gsync_done, s);
}

/*
 * Calls w->cb once everything written before this call is durable; in
 * scratch mode at once: the writes it follows have completed, which is
 * all that a crash of the process (not of the host) needs.
 */
static void gsync_request(struct vhd_state *s, struct vhd_sync_waiter *w,
			  void (*cb)(struct vhd_sync_waiter *w, int err))
{
	w->cb = cb;
	if (s->scratch) {
		s->st.gsyncs_skipped++;
		cb(w, 0);
		return;
	}
	tdr_list_add_tail(&w->entry, &s->gsync_next);
	if (!s->gsync_inflight)
		gsync_issue(s);
}

/* ------------------------------------------------------------------ */
/* Footer extension */

static void footer_kick(struct vhd_state *s);
static void alloc_write(struct vhd_alloc *a);
static void alloc_fail(struct vhd_alloc *a, int err);

static void footer_release(struct vhd_state *s, int err)
{
	struct tdr_list *pos, *tmp;

	s->footer_busy = false;
	tdr_list_for_each_safe(pos, tmp, &s->footer_waiters) {
		struct vhd_alloc *a = tdr_list_entry(pos, struct vhd_alloc, entry);

		if (err) {
			tdr_list_del(&a->entry);
			alloc_fail(a, err);
		} else if (a->end <= s->footer_off) {
			tdr_list_del(&a->entry);
			alloc_write(a);
		}
	}
	footer_kick(s);
}

static void footer_synced(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_state *s = arg;

	/*
	 * The new length and footer are durable: blocks may now lie past the
	 * old footer, whose BAT entries would otherwise point past the end of
	 * the file after a crash.  The old footer stays where it was, in the
	 * padding between two blocks (alloc_start places no block over a
	 * footer), where no reader looks.
	 */
	if (res >= 0 && s->n_old_footers == s->cap_old_footers) {
		unsigned cap = s->cap_old_footers ? 2 * s->cap_old_footers : 4;
		uint64_t *of = realloc(s->old_footers, cap * sizeof(*of));

		if (of) {
			s->old_footers = of;
			s->cap_old_footers = cap;
		} else {
			res = -ENOMEM;
		}
	}
	if (res >= 0) {
		s->old_footers[s->n_old_footers++] = s->footer_off;
		s->footer_off = s->footer_target;
	}
	footer_release(s, res < 0 ? (int)res : 0);
}

/* The new footer must be durable before a block lies past the old one. */
static void footer_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_state *s = arg;

	if (res >= 0 && res != VHD_FOOTER_SIZE)
		res = -EIO;
	if (res == -EFBIG && !s->footer_near) {
		/*
		 * The file system (or RLIMIT_FSIZE) cannot hold a file as long
		 * as the disk can get: move the footer in steps instead.
		 */
		TDR_INFO("%s: the file cannot grow to %llu bytes; its footer moves in %llu MiB steps",
			 s->img->params, (unsigned long long)s->footer_target + VHD_FOOTER_SIZE,
			 (unsigned long long)(FOOTER_STEP_MIN >> 20));
		s->footer_near = true;
		s->footer_busy = false;
		footer_kick(s);
		return;
	}
	if (res < 0) {
		footer_release(s, (int)res);
		return;
	}
	tdr_io_fdsync(s->img->io, &s->fmv->iocb, s->fd, footer_synced, s);
}

/* Starts a footer move when allocations wait for one or will soon. */
static void footer_kick(struct vhd_state *s)
{
	uint64_t target;

	if (s->footer_busy)
		return;
	if (tdr_list_empty(&s->footer_waiters) && s->footer_off >= s->assigned_end + FOOTER_STEP_MIN)
		return;
	target = footer_limit(s) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
	/* Never short of the blocks assigned: a safety net, not the plan. */
	if (target < s->assigned_end || s->footer_near)
		target = (s->assigned_end + 2 * FOOTER_STEP_MIN) & ~(FOOTER_STEP_MIN - 1);
	if (target <= s->footer_off && tdr_list_empty(&s->footer_waiters))
		return;	/* already as far as the file can grow */
	s->footer_busy = true;
	s->footer_target = target;
	s->st.footer_writes++;
	tdr_io_pwrite(s->img->io, &s->fmv->iocb, s->fd, s->fmv->footer, VHD_FOOTER_SIZE,
		      s->footer_target, footer_done, s);
}

/* ------------------------------------------------------------------ */
/* BAT sectors */

static void bat_kick(struct vhd_state *s, uint32_t idx);
static void alloc_done(struct vhd_alloc *a, int err);
static void alloc_piece_done(struct vhd_alloc *a, ssize_t res, size_t len);

/* a's BAT sector is written (or failed): the last step, or one piece of several. */
static void alloc_bat_written(struct vhd_alloc *a, int err)
{
	if (a->bat_early)
		alloc_piece_done(a, err ? (ssize_t)err : (ssize_t)VHD_SECTOR_SIZE, VHD_SECTOR_SIZE);
	else
		alloc_done(a, err);
}

static void bat_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct bat_sec *bs = arg;
	struct tdr_list *pos, *tmp, done;
	int err = res < 0 ? (int)res : (res != VHD_SECTOR_SIZE ? -EIO : 0);

	tdr_list_init(&done);
	tdr_list_for_each_safe(pos, tmp, &bs->inflight) {
		struct vhd_alloc *a = tdr_list_entry(pos, struct vhd_alloc, entry);

		tdr_list_del(&a->entry);
		tdr_list_add_tail(&a->entry, &done);
	}
	bs->busy = false;
	tdr_list_for_each_safe(pos, tmp, &done) {
		struct vhd_alloc *a = tdr_list_entry(pos, struct vhd_alloc, entry);

		tdr_list_del(&a->entry);
		alloc_bat_written(a, err);
	}
	bat_kick(bs->s, bs->idx);
}

static void bat_kick(struct vhd_state *s, uint32_t idx)
{
	struct bat_sec *bs = &s->bsec[idx];
	struct tdr_list *pos, *tmp;

	if (bs->busy || tdr_list_empty(&bs->waiting))
		return;
	if (!bs->buf && !(bs->buf = tdr_io_alloc(VHD_SECTOR_SIZE))) {
		tdr_list_for_each_safe(pos, tmp, &bs->waiting) {
			struct vhd_alloc *a = tdr_list_entry(pos, struct vhd_alloc, entry);

			tdr_list_del(&a->entry);
			alloc_bat_written(a, -ENOMEM);
		}
		return;
	}
	bs->busy = true;
	bs->fua = false;
	tdr_list_for_each_safe(pos, tmp, &bs->waiting) {
		struct vhd_alloc *a = tdr_list_entry(pos, struct vhd_alloc, entry);

		tdr_list_del(&a->entry);
		tdr_list_add_tail(&a->entry, &bs->inflight);
		bs->fua |= a->fua;
	}
	vhd_bat_sector(s->bat_disk, s->m.bat_entries, idx, bs->buf);
	s->st.bat_writes++;
	if (bs->fua)
		tdr_io_pwrite_dsync(s->img->io, &bs->iocb, s->fd, bs->buf, VHD_SECTOR_SIZE,
				    s->m.header.table_offset + (uint64_t)idx * VHD_SECTOR_SIZE,
				    bat_done, bs);
	else
		tdr_io_pwrite(s->img->io, &bs->iocb, s->fd, bs->buf, VHD_SECTOR_SIZE,
			      s->m.header.table_offset + (uint64_t)idx * VHD_SECTOR_SIZE,
			      bat_done, bs);
}

/* ------------------------------------------------------------------ */
/* Allocation */

static struct vhd_alloc *alloc_find(struct vhd_state *s, uint32_t block)
{
	struct vhd_alloc *a;

	for (a = s->al_hash[block % BM_HASH]; a; a = a->hnext)
		if (a->block == block)
			return a;
	return NULL;
}

static void alloc_unhash(struct vhd_alloc *a)
{
	struct vhd_alloc **pp = &a->s->al_hash[a->block % BM_HASH];

	while (*pp != a)
		pp = &(*pp)->hnext;
	*pp = a->hnext;
}

/* Completes the batch, re-dispatches the latecomers, frees a. */
static void alloc_finish(struct vhd_alloc *a, int err)
{
	struct vhd_state *s = a->s;
	struct tdr_list *pos, *tmp, later;

	alloc_unhash(a);
	tdr_list_init(&later);
	tdr_list_for_each_safe(pos, tmp, &a->later) {
		tdr_list_del(pos);
		tdr_list_add_tail(pos, &later);
	}
	tdr_list_for_each_safe(pos, tmp, &a->batch) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		tdr_list_del(&op->entry);
		op_finish(op, err);
	}
	free(a->map);
	free(a->wbuf);
	free(a);
	tdr_list_for_each_safe(pos, tmp, &later) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);
		struct td_request *req = op->req;

		tdr_list_del(&op->entry);
		s->ops_live--;
		free(op);
		vhd_write_seg(s, req);
	}
}

static void alloc_list_add(struct vhd_state *s, uint32_t block)
{
	if (s->nalloc_list == s->alloc_list_cap) {
		uint32_t cap = s->alloc_list_cap ? s->alloc_list_cap * 2 : 64;
		uint32_t *l = realloc(s->alloc_list, (size_t)cap * sizeof(*l));

		if (!l) {
			s->alloc_list_lost = true;
			return;
		}
		s->alloc_list = l;
		s->alloc_list_cap = cap;
	}
	s->alloc_list[s->nalloc_list++] = block;
}

static void alloc_fail(struct vhd_alloc *a, int err)
{
	TDR_ERR("%s: allocating block %u failed: %s", a->s->img->params, a->block, strerror(-err));
	alloc_finish(a, err);
}

static void alloc_done(struct vhd_alloc *a, int err)
{
	struct vhd_state *s = a->s;
	struct vhd_bm *bm;

	if (err) {
		s->bat_disk[a->block] = VHD_BAT_UNUSED;
		/*
		 * Its BAT sector may have gone down with the data (bat_early)
		 * and still point at the block: the next make-empty must
		 * rewrite that sector too, or the entry would survive into
		 * space handed out again.
		 */
		if (a->bat_early)
			alloc_list_add(s, a->block);
		alloc_fail(a, err);
		return;
	}
	s->m.bat[a->block] = s->bat_disk[a->block];
	s->m.allocated++;
	alloc_list_add(s, a->block);
	if (a->end > s->m.data_end)
		s->m.data_end = a->end;
	/* The bitmap just written becomes the cached one. */
	bm = bm_find(s, a->block);
	if (!bm && (bm = bm_new(s, a->block, a->map))) {
		bm->loaded = true;
		tdr_list_add_tail(&bm->lru, &s->lru);
		bm_evict_some(s);
	}
	alloc_finish(a, 0);
}

/* Points a's BAT entry at its block and queues the entry's sector for writing. */
static void alloc_queue_bat(struct vhd_alloc *a)
{
	struct vhd_state *s = a->s;
	uint32_t idx = a->block / (VHD_SECTOR_SIZE / 4);

	a->state = AL_BAT;
	s->bat_disk[a->block] = (uint32_t)(a->off >> VHD_SECTOR_SHIFT);
	tdr_list_add_tail(&a->entry, &s->bsec[idx].waiting);
	bat_kick(s, idx);
}

static void alloc_synced(struct vhd_sync_waiter *w, int err)
{
	struct vhd_alloc *a = tdr_container_of(w, struct vhd_alloc, sync);

	if (err) {
		alloc_fail(a, err);
		return;
	}
	alloc_queue_bat(a);
}

/*
 * Whether the block's data and bitmap must be durable before its BAT entry
 * is written.  The order exists so that a crash of the host never leaves a
 * BAT entry pointing at space whose content the disk never had.  A new
 * block of a dynamic disk in space that was never written (above
 * reuse_end: a hole of the file; old footers lie between blocks, never
 * in one) cannot: until its writes land, the
 * block reads as zeroes through a zero bitmap, or under bits set over
 * zeroes, for us and for bitmap-blind readers alike, which is what the
 * unallocated block read as.  Such a BAT entry is as safe as the bitmap
 * bits that dynamic disks already write without a barrier (bm_flush).
 * Written in completion order all the same, so a crash of the process
 * keeps every acknowledged write.  Not in a differencing disk (bits set
 * over zeroes would hide the parent), not in reused space (old data), and
 * not for a FUA write (its data must be durable when it completes).
 */
static bool alloc_needs_sync(const struct vhd_alloc *a)
{
	return a->s->ordered || is_diff(a->s) || a->off < a->s->reuse_end || a->fua;
}

static void alloc_piece_done(struct vhd_alloc *a, ssize_t res, size_t len)
{
	if (res < 0 && !a->err)
		a->err = (int)res;
	else if (res >= 0 && (size_t)res != len && !a->err)
		a->err = -EIO;
	if (--a->pending)
		return;
	if (a->bat_early) {
		/* The BAT sector went with the data: undone in memory on error. */
		alloc_done(a, a->err);
		return;
	}
	if (a->err) {
		alloc_fail(a, a->err);
		return;
	}
	a->state = AL_SYNC;
	gsync_request(a->s, &a->sync, alloc_synced);
}

static void alloc_map_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_alloc *a = arg;

	alloc_piece_done(a, res, a->lead + a->s->bm_bytes);
}

static void alloc_data_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_op *op = arg;

	alloc_piece_done(alloc_find(op->s, op->block), res, (size_t)op->n << TD_SECTOR_SHIFT);
}

/* A run of zeroes written by an allocation. */
struct vhd_zero_run {
	struct tdr_iocb iocb;
	struct vhd_alloc *a;
	size_t len;
};

static void alloc_zero_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_zero_run *z = arg;
	struct vhd_alloc *a = z->a;
	size_t len = z->len;

	free(z);
	alloc_piece_done(a, res, len);
}

/*
 * A dynamic disk's block placed in space that an online make-empty gave
 * back: the sectors its batch does not write still hold an old block's
 * data.  We never read them (their bits are clear), but qemu's vpc driver
 * reads an allocated block's whole data area, bitmap or not, and would
 * show the old data in the guest's disk.  Write zeroes there, as part of
 * the allocation (durable before the BAT entry).  Differencing disks need
 * none of this: there a clear bit means "the parent's", for every reader.
 */
static void alloc_zero_gaps(struct vhd_alloc *a)
{
	struct vhd_state *s = a->s;
	uint32_t spb = s->m.spb, i = 0, run, max = ZERO_BUF >> TD_SECTOR_SHIFT;
	bool set;

	if (!s->zero_block) {
		s->zero_block = tdr_io_alloc(ZERO_BUF);
		if (!s->zero_block) {
			a->err = a->err ? a->err : -ENOMEM;
			return;
		}
		memset(s->zero_block, 0, ZERO_BUF);
	}
	for (; i < spb; i += run) {
		struct vhd_zero_run *z;

		run = vhd_bitmap_run(a->map, i, spb - i < max ? spb - i : max, &set);
		if (set)
			continue;
		z = malloc(sizeof(*z));
		if (!z) {
			a->err = a->err ? a->err : -ENOMEM;
			return;
		}
		z->a = a;
		z->len = (size_t)run << TD_SECTOR_SHIFT;
		a->pending++;
		tdr_io_pwrite(s->img->io, &z->iocb, s->fd, s->zero_block, z->len,
			      a->off + s->bm_bytes + ((uint64_t)i << TD_SECTOR_SHIFT),
			      alloc_zero_done, z);
	}
}

/*
 * A piece of zeroes in a new block needs no data write when the block's
 * space has never been written: above reuse_end, everything past the
 * metadata is a hole of the file (old footers lie between blocks, never
 * in one), and a hole reads as zeroes for every reader,
 * ours and bitmap-blind ones alike.  Its bitmap bits still go down with
 * the block's bitmap, so it reads as zeroes here, not as the parent's.
 * The first touch of a chunk of a thin secondary disk copies zeroes into
 * hidden this way; so does a guest zeroing fresh space.  Space that an
 * online make-empty gave back may hold an old block's data: written.
 */
static bool alloc_piece_elidable(const struct vhd_alloc *a, const struct vhd_op *op)
{
	return a->off >= a->s->reuse_end &&
	       vhd_all_zero(op->req->buf, (size_t)op->n << TD_SECTOR_SHIFT);
}

/* Footer is past the block: write the bitmap and every batched piece. */
static void alloc_write(struct vhd_alloc *a)
{
	struct vhd_state *s = a->s;
	struct tdr_list *pos, *tmp;

	a->state = AL_WRITING;
	a->pending = 1;
	tdr_list_for_each_safe(pos, tmp, &a->batch) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		vhd_bitmap_set_range(a->map, op->in, op->n);
		a->fua |= (op->req->flags & TD_REQ_FUA) != 0;
		a->pending++;
	}
	tdr_list_for_each_safe(pos, tmp, &a->batch) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		if (alloc_piece_elidable(a, op)) {
			s->st.zero_elided++;
			a->pending--;	/* never 0 here: the bitmap's write is counted */
			continue;
		}
		tdr_io_pwrite(s->img->io, &op->iocb, s->fd, op->req->buf,
			      (size_t)op->n << TD_SECTOR_SHIFT,
			      a->off + s->bm_bytes + ((uint64_t)op->in << TD_SECTOR_SHIFT),
			      alloc_data_done, op);
	}
	if (!is_diff(s) && a->off < s->reuse_end)
		alloc_zero_gaps(a);
	/*
	 * A dynamic disk's new block reads as zeroes wherever the batch does
	 * not write: a hole of the file in never-written space, the zeroes
	 * just queued in space a make-empty gave back.  So every bit of its
	 * bitmap goes down set ("this sector's data is in the block"), which
	 * is true for every reader, and a later first write of a sector of
	 * the block needs no bitmap write: one write instead of two, the
	 * whole cost of random first touches after the block's first
	 * (docs/vhd.md).  What it costs: block status reports the block as
	 * data, all of it.  Differencing disks keep exact bits: there a
	 * clear bit means "the parent's".
	 */
	if (!is_diff(s))
		vhd_bitmap_set_range(a->map, 0, s->m.spb);
	if (!alloc_needs_sync(a)) {
		/*
		 * The BAT entry may land before the data and the bitmap: in
		 * never-written space of a dynamic disk the block reads as
		 * zeroes until they do (alloc_needs_sync).  So it is written
		 * with them, not after them, and the write completes when
		 * all three have.
		 */
		a->bat_early = true;
		a->pending++;
		s->st.fresh_unsynced++;
		alloc_queue_bat(a);
	}
	memcpy(a->wbuf + a->lead, a->map, s->bm_bytes);
	tdr_io_pwrite(s->img->io, &a->iocb, s->fd, a->wbuf, a->lead + s->bm_bytes, a->off - a->lead,
		      alloc_map_done, a);
}

/* The block's space is ours to write: make sure a footer follows it, then write. */
static void alloc_place(struct vhd_alloc *a)
{
	struct vhd_state *s = a->s;

	if (s->footer_off >= a->end) {
		alloc_write(a);
		/*
		 * At the end of the file, ahead of the next allocations when
		 * little room is left; not for blocks placed in space that a
		 * make-empty gave back, which must not make the file grow.
		 */
		if (a->end >= s->assigned_end)
			footer_kick(s);
		return;
	}
	tdr_list_add_tail(&a->entry, &s->footer_waiters);
	footer_kick(s);
}

static void alloc_start(struct vhd_state *s, struct vhd_op *op)
{
	struct vhd_alloc *a = calloc(1, sizeof(*a));
	uint64_t bs = s->m.header.block_size;
	uint64_t page = s->next_free & ~(VHD_PAGE_SIZE - 1);

	if (!a) {
		op_finish(op, -ENOMEM);
		return;
	}
	/*
	 * No block covers the footer's sectors, or those of a footer that a
	 * move leaves behind: a block that would is placed past them, from
	 * the next page.  So an old footer never needs zeroing (and that
	 * zeroing no sync before the blocks over it): it stays in padding no
	 * reader looks at, not in a block's data area, where a reader that
	 * ignores a dynamic disk's bitmap (qemu's vpc) would show
	 * "conectix..." in the guest's disk.
	 */
	for (unsigned i = 0; i <= s->n_old_footers; i++) {
		uint64_t fs = (i < s->n_old_footers ? s->old_footers[i] : s->footer_off) &
			      ~(uint64_t)(VHD_SECTOR_SIZE - 1);

		if ((page >= s->place_floor ? page : s->next_free) < fs + FOOTER_SPAN &&
		    s->next_free + s->bm_bytes + bs > fs) {
			set_next_free(s, (fs + FOOTER_SPAN + VHD_PAGE_SIZE - 1) & ~(VHD_PAGE_SIZE - 1));
			page = s->next_free & ~(VHD_PAGE_SIZE - 1);
		}
	}
	/* Those now below the block are behind us. */
	while (s->n_old_footers && s->old_footers[0] + FOOTER_SPAN <= s->place_floor) {
		memmove(s->old_footers, s->old_footers + 1, --s->n_old_footers * sizeof(*s->old_footers));
	}
	a->off = s->next_free;
	/*
	 * The bitmap sits just below the 4 KiB-aligned data, so alone it is a
	 * 512-byte write into a hole: ext4 runs such an unaligned, allocating
	 * direct write synchronously, after waiting for every direct I/O in
	 * flight on the file, which serialises all allocations.  Writing the
	 * whole page (zeroes, then the bitmap) keeps it aligned.  The lead is
	 * padding in front of the block, unless the page begins below
	 * place_floor (the first block after the metadata): then the bitmap
	 * goes alone.
	 */
	a->lead = page >= s->place_floor ? a->off - page : 0;
	if (!(a->map = malloc(s->bm_bytes)) ||
	    !(a->wbuf = tdr_io_alloc(a->lead + s->bm_bytes))) {
		free(a->map);
		free(a);
		op_finish(op, -ENOMEM);
		return;
	}
	memset(a->map, 0, s->bm_bytes);
	memset(a->wbuf, 0, a->lead);
	a->s = s;
	a->block = op->block;
	a->end = a->off + s->bm_bytes + bs;
	tdr_list_init(&a->batch);
	tdr_list_init(&a->later);
	tdr_list_init(&a->entry);
	if ((a->off >> VHD_SECTOR_SHIFT) >= VHD_BAT_UNUSED - 1) {
		free(a->map);
		free(a->wbuf);
		free(a);
		TDR_ERR("%s: the file is full (VHD files cannot exceed 2 TiB)", s->img->params);
		op_finish(op, -ENOSPC);
		return;
	}
	set_next_free(s, a->end);
	if (a->end > s->assigned_end)
		s->assigned_end = a->end;
	a->hnext = s->al_hash[a->block % BM_HASH];
	s->al_hash[a->block % BM_HASH] = a;
	tdr_list_add_tail(&op->entry, &a->batch);
	s->st.allocs++;
	a->state = AL_FOOTER;
	if (!tdr_list_empty(&s->reuse_syncs) && a->off < s->reuse_end) {
		s->st.reuse_waits++;
		tdr_list_add_tail(&a->entry, &s->reuse_waiters);
		return;
	}
	alloc_place(a);
}

/* ------------------------------------------------------------------ */
/* Writes to allocated blocks */

static void bm_flush(struct vhd_bm *bm);
static bool op_part_done(struct vhd_op *op, int err);

/* Sets in map the bits of every op on the list. */
static void bits_of_ops(uint8_t *map, const struct tdr_list *ops)
{
	const struct tdr_list *pos;

	tdr_list_for_each(pos, ops) {
		const struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		vhd_bitmap_set_range(map, op->in, op->n);
	}
}

static void bm_write_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_bm *bm = arg;
	struct tdr_list *pos, *tmp;
	int err = res < 0 ? (int)res : (res != (ssize_t)bm->s->bm_bytes ? -EIO : 0);

	bm->writing = false;
	if (!err && bm->wbuf)
		memcpy(bm->disk, bm->wbuf, bm->s->bm_bytes);
	bm_get(bm);
	tdr_list_for_each_safe(pos, tmp, &bm->inflight) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		tdr_list_del(&op->entry);
		if (op->parts) {
			if (op_part_done(op, err))
				continue;
			/* Its data is still out: later bitmap writes keep its bits. */
			tdr_list_add_tail(&op->entry, &bm->early);
			continue;
		}
		bm_put(bm);
		op_finish(op, err);
	}
	bm_flush(bm);
	if (!bm->writing) {
		/* Idle: the aligned buffer goes until the next read or write. */
		free(bm->wbuf);
		bm->wbuf = NULL;
	}
	bm_put(bm);
}

static void bm_sync_done(struct tdr_iocb *io, ssize_t res, void *arg);

static void bm_synced(struct vhd_sync_waiter *w, int err)
{
	struct vhd_bm *bm = tdr_container_of(w, struct vhd_bm, sync);

	bm_sync_done(&bm->iocb, err, bm);
}

static void bm_sync_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_bm *bm = arg;
	struct vhd_state *s = bm->s;

	if (res < 0) {
		bm_write_done(io, res, arg);
		return;
	}
	/*
	 * The bits whose data is written, and those of the writes whose data
	 * is still out (sent together, op_with_bitmap): a bit once written
	 * must never be written clear again while its write is live.
	 */
	memcpy(bm->wbuf, bm->map, s->bm_bytes);
	bits_of_ops(bm->wbuf, &bm->inflight);
	bits_of_ops(bm->wbuf, &bm->early);
	s->st.bm_writes++;
	if (bm->fua)
		tdr_io_pwrite_dsync(s->img->io, &bm->iocb, s->fd, bm->wbuf, s->bm_bytes,
				    (uint64_t)s->m.bat[bm->block] << VHD_SECTOR_SHIFT, bm_write_done, bm);
	else
		tdr_io_pwrite(s->img->io, &bm->iocb, s->fd, bm->wbuf, s->bm_bytes,
			      (uint64_t)s->m.bat[bm->block] << VHD_SECTOR_SHIFT, bm_write_done, bm);
}

/* Writes the bits of every pending op: fdsync (their data), then the bitmap. */
static void bm_flush(struct vhd_bm *bm)
{
	struct vhd_state *s = bm->s;
	struct tdr_list *pos, *tmp;

	if (bm->writing || tdr_list_empty(&bm->pending))
		return;
	bm->writing = true;
	bm->fua = false;
	tdr_list_for_each_safe(pos, tmp, &bm->pending) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		tdr_list_del(&op->entry);
		tdr_list_add_tail(&op->entry, &bm->inflight);
		bm->fua |= (op->req->flags & TD_REQ_FUA) != 0;
	}
	/* Fails this batch only: nothing is left pending to retry at once. */
	if (!bm->wbuf && !(bm->wbuf = tdr_io_alloc(s->bm_bytes))) {
		bm_write_done(&bm->iocb, -ENOMEM, bm);
		return;
	}
	tdr_list_for_each(pos, &bm->inflight) {
		struct vhd_op *op = tdr_list_entry(pos, struct vhd_op, entry);

		if (!op->parts)	/* data written: reads may use the bits */
			vhd_bitmap_set_range(bm->map, op->in, op->n);
	}
	/*
	 * In a differencing disk a bit durable before its data would expose
	 * garbage instead of the parent's sectors.  In a dynamic disk the data
	 * area under a clear bit holds zeroes (a new block lands in a hole,
	 * never over an old footer, or, in space an online make-empty gave
	 * back, is zero-filled by its allocation), so a bit durable before
	 * its data exposes the zeroes it replaces: no barrier needed.
	 */
	if (is_diff(s))
		gsync_request(s, &bm->sync, bm_synced);
	else
		bm_sync_done(&bm->iocb, 0, bm);
}

/*
 * One part of a write sent with its bitmap bits is done: true when the
 * op is finished (and freed).
 */
static bool op_part_done(struct vhd_op *op, int err)
{
	struct vhd_bm *bm = op->bm;

	if (err && !op->err)
		op->err = err;
	if (--op->parts)
		return false;
	if (!tdr_list_empty(&op->entry))
		tdr_list_del(&op->entry);	/* off bm->early */
	bm_put(bm);
	op_finish(op, op->err);
	return true;
}

static void write_io_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_op *op = arg;
	struct vhd_bm *bm = op->bm;
	bool set;

	if (op->parts) {
		bool ok = res >= 0 && (size_t)res == (size_t)op->n << TD_SECTOR_SHIFT;

		/* Reads may use the bits now; on disk they may be already. */
		if (ok)
			vhd_bitmap_set_range(bm->map, op->in, op->n);
		op_part_done(op, ok ? 0 : (res < 0 ? (int)res : -EIO));
		return;
	}
	if (res < 0 || (size_t)res != (size_t)op->n << TD_SECTOR_SHIFT) {
		bm_put(bm);
		op_finish(op, res < 0 ? (int)res : -EIO);
		return;
	}
	/* Only bits in the file spare the write a bitmap write of its own. */
	if (vhd_bitmap_run(bm->disk, op->in, op->n, &set) == op->n && set) {
		bm_put(bm);
		op_finish(op, 0);
		return;
	}
	tdr_list_add_tail(&op->entry, &bm->pending);
	bm_flush(bm);
}

/* ------------------------------------------------------------------ */
/* The bitmap is there: finish the op by kind */

static void op_with_bitmap(struct vhd_op *op, int err)
{
	struct vhd_state *s = op->s;
	struct td_request *req = op->req;

	if (err) {
		bm_put(op->bm);
		op_finish(op, err);
		return;
	}
	switch (req->op) {
	case TD_OP_READ:
		read_runs(op);
		return;
	case TD_OP_WRITE: {
		bool set;

		/*
		 * A dynamic disk's sectors under clear bits hold zeroes, so
		 * bits durable before their data expose the zeroes they
		 * replace (bm_flush): data and bits go out together, and the
		 * write completes when both have.  Not in a differencing disk:
		 * there the bits must follow the data.
		 */
		if (!is_diff(s) &&
		    !(vhd_bitmap_run(op->bm->disk, op->in, op->n, &set) == op->n && set)) {
			op->parts = 2;
			tdr_list_add_tail(&op->entry, &op->bm->pending);
		}
		if (req->flags & TD_REQ_FUA)
			tdr_io_pwrite_dsync(s->img->io, &op->iocb, s->fd, req->buf,
					    (size_t)op->n << TD_SECTOR_SHIFT,
					    data_off(s, s->m.bat[op->block], op->in), write_io_done, op);
		else
			tdr_io_pwrite(s->img->io, &op->iocb, s->fd, req->buf,
				      (size_t)op->n << TD_SECTOR_SHIFT,
				      data_off(s, s->m.bat[op->block], op->in), write_io_done, op);
		if (op->parts)
			bm_flush(op->bm);
		return;
	}
	case TD_OP_BLOCK_STATUS: {
		bool set;
		uint32_t run = vhd_bitmap_run(op->bm->map, op->in, op->n, &set);

		bm_put(op->bm);
		s->ops_live--;
		free(op);
		if (set) {
			req->bs_secs = run;
			req->bs_flags = 0;
			td_complete_request(req, 0);
		} else if (run == req->secs) {
			serve_below(s, req);
		} else {
			struct td_request *sub;

			td_request_split_begin(req);
			sub = td_request_sub(req, req->sec, run);
			if (sub)
				serve_below(s, sub);
			td_request_split_end(req);
		}
		return;
	}
	default:
		bm_put(op->bm);
		op_finish(op, -EINVAL);
		return;
	}
}

/* ------------------------------------------------------------------ */
/* Per-block segments */

/*
 * A read or a block-status query of one block: both need the block's
 * bitmap (the op's continuation branches on the request's op).
 */
static void vhd_read_seg(struct vhd_state *s, struct td_request *req)
{
	uint32_t b = (uint32_t)(req->sec / s->m.spb);
	struct vhd_op *op;

	if (s->m.bat[b] == VHD_BAT_UNUSED) {
		serve_below(s, req);
		return;
	}
	op = op_new(s, req);
	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	op_need_bitmap(op);
}

static void vhd_write_seg(struct vhd_state *s, struct td_request *req)
{
	uint32_t b = (uint32_t)(req->sec / s->m.spb);
	struct vhd_op *op = op_new(s, req);
	struct vhd_alloc *a;

	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	if (s->m.bat[b] != VHD_BAT_UNUSED) {
		op_need_bitmap(op);
		return;
	}
	a = alloc_find(s, b);
	if (!a) {
		alloc_start(s, op);
		return;
	}
	s->st.joined_allocs++;
	if (a->state == AL_FOOTER)
		tdr_list_add_tail(&op->entry, &a->batch);
	else
		tdr_list_add_tail(&op->entry, &a->later);
}

/* Runs fn on req, or on per-block pieces of it. */
static void by_block(struct vhd_state *s, struct td_request *req,
		     void (*fn)(struct vhd_state *, struct td_request *))
{
	uint64_t first = req->sec / s->m.spb, last = (req->sec + req->secs - 1) / s->m.spb;
	uint64_t sec = req->sec, end = req->sec + req->secs;

	if (first == last) {
		fn(s, req);
		return;
	}
	td_request_split_begin(req);
	while (sec < end) {
		uint64_t bend = (sec / s->m.spb + 1) * s->m.spb;
		uint32_t n = (uint32_t)((bend < end ? bend : end) - sec);
		struct td_request *sub = td_request_sub(req, sec, n);

		if (!sub)
			break;
		fn(s, sub);
		sec += n;
	}
	td_request_split_end(req);
}

static void fixed_rw_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_op *op = arg;

	op_finish(op, res < 0 ? (int)res :
		  ((size_t)res != (size_t)op->n << TD_SECTOR_SHIFT ? -EIO : 0));
}

static void fixed_rw(struct vhd_state *s, struct td_request *req)
{
	struct vhd_op *op = op_new(s, req);
	size_t len = (size_t)req->secs << TD_SECTOR_SHIFT;
	uint64_t off = req->sec << TD_SECTOR_SHIFT;

	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	if (req->op == TD_OP_READ)
		tdr_io_pread(s->img->io, &op->iocb, s->fd, req->buf, len, off, fixed_rw_done, op);
	else if (req->flags & TD_REQ_FUA)
		tdr_io_pwrite_dsync(s->img->io, &op->iocb, s->fd, req->buf, len, off,
				    fixed_rw_done, op);
	else
		tdr_io_pwrite(s->img->io, &op->iocb, s->fd, req->buf, len, off, fixed_rw_done, op);
}

static void vhd_queue_read(struct td_image *img, struct td_request *req)
{
	struct vhd_state *s = img->priv;

	if (!req->secs) {
		td_complete_request(req, 0);
		return;
	}
	if (!is_dynamic(s))
		fixed_rw(s, req);
	else
		by_block(s, req, vhd_read_seg);
}

static void vhd_queue_write(struct td_image *img, struct td_request *req)
{
	struct vhd_state *s = img->priv;

	if (img->flags & TD_OPEN_RDONLY) {
		td_complete_request(req, -EPERM);
		return;
	}
	if (!req->secs) {
		td_complete_request(req, 0);
		return;
	}
	if (!is_dynamic(s))
		fixed_rw(s, req);
	else
		by_block(s, req, vhd_write_seg);
}

static void flush_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_op *op = arg;

	op_finish(op, res < 0 ? (int)res : 0);
}

static void vhd_queue_flush(struct td_image *img, struct td_request *req)
{
	struct vhd_state *s = img->priv;
	struct vhd_op *op;

	if (img->flags & TD_OPEN_RDONLY) {
		td_complete_request(req, 0);
		return;
	}
	op = op_new(s, req);
	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	tdr_io_fdsync(img->io, &op->iocb, s->fd, flush_done, op);
}

static void vhd_queue_block_status(struct td_image *img, struct td_request *req)
{
	struct vhd_state *s = img->priv;
	uint64_t bend, run_end, b;

	if (!is_dynamic(s) || !req->secs) {
		req->bs_secs = req->secs;
		req->bs_flags = 0;
		td_complete_request(req, 0);
		return;
	}
	b = req->sec / s->m.spb;
	bend = (b + 1) * s->m.spb;
	if (s->m.bat[b] != VHD_BAT_UNUSED) {
		if (req->sec + req->secs <= bend) {
			vhd_read_seg(s, req);
		} else {
			struct td_request *sub;

			td_request_split_begin(req);
			sub = td_request_sub(req, req->sec, (uint32_t)(bend - req->sec));
			if (sub)
				vhd_read_seg(s, sub);
			td_request_split_end(req);
		}
		return;
	}
	/* A run of unallocated blocks. */
	run_end = bend;
	while (run_end < req->sec + req->secs && s->m.bat[run_end / s->m.spb] == VHD_BAT_UNUSED)
		run_end += s->m.spb;
	if (run_end >= req->sec + req->secs) {
		serve_below(s, req);
	} else {
		struct td_request *sub;

		td_request_split_begin(req);
		sub = td_request_sub(req, req->sec, (uint32_t)(run_end - req->sec));
		if (sub)
			serve_below(s, sub);
		td_request_split_end(req);
	}
}

/* ------------------------------------------------------------------ */
/* Open / close */

/* Forgets every cached bitmap (close, make-empty). */
static void bm_drop_all(struct vhd_state *s)
{
	for (unsigned i = 0; i < BM_HASH; i++) {
		while (s->bm_hash[i]) {
			struct vhd_bm *bm = s->bm_hash[i];

			s->bm_hash[i] = bm->hnext;
			/*
			 * Held further up the stack: bm_load_done keeps its
			 * bitmap while it completes the reads that waited,
			 * and a read's callback may start a make-empty.
			 */
			if (bm->refs) {
				bm->orphan = true;
				continue;
			}
			bm_free(bm);
		}
	}
	s->bm_count = 0;
	tdr_list_init(&s->lru);
}

static void vhd_free_state(struct vhd_state *s)
{
	struct tdr_list *pos, *tmp;

	/* A sync still in flight frees itself when it completes. */
	if (s->reuse_syncs.next)
		tdr_list_for_each_safe(pos, tmp, &s->reuse_syncs) {
			struct vhd_reuse_sync *rs = tdr_list_entry(pos, struct vhd_reuse_sync, entry);

			tdr_list_del(pos);
			tdr_io_orphan(&rs->iocb, rs);
		}
	bm_drop_all(s);
	if (s->bsec)
		for (uint32_t i = 0; i < s->nbsec; i++)
			free(s->bsec[i].buf);
	free(s->bsec);
	s->bsec = NULL;
	vhd_big_free(s->bat_disk, s->bat_disk_len);
	s->bat_disk = NULL;
	s->bat_disk_len = 0;
	free(s->alloc_list);
	free(s->old_footers);
	s->old_footers = NULL;
	s->n_old_footers = s->cap_old_footers = 0;
	s->alloc_list = NULL;
	s->nalloc_list = s->alloc_list_cap = 0;
	/* A move in flight frees it when its current I/O completes. */
	if (s->fmv && s->footer_busy)
		tdr_io_orphan(&s->fmv->iocb, s->fmv);
	else
		free(s->fmv);
	s->fmv = NULL;
	s->footer_busy = false;
	free(s->zero_block);
	s->zero_block = NULL;
	vhd_meta_free(&s->m);
	if (s->fd >= 0)
		close(s->fd);
	s->fd = -1;
}

static int vhd_open(struct td_image *img, const char *params, unsigned flags)
{
	struct vhd_state *s = img->priv;
	struct vhd_error err;
	struct vhd_src src;
	struct stat st;
	uint64_t data_end;
	int mfd, r;

	s->img = img;
	s->fd = -1;
	tdr_list_init(&s->lru);
	tdr_list_init(&s->footer_waiters);
	tdr_list_init(&s->reuse_syncs);
	tdr_list_init(&s->reuse_waiters);
	tdr_list_init(&s->gsync_next);
	tdr_list_init(&s->gsync_covered);
	if (!*params) {
		tdr_set_error("vhd: no file name; use vhd:/path/to/disk.vhd");
		return -EINVAL;
	}
	/* Validate everything through a plain fd before any write is possible. */
	mfd = open(params, O_RDONLY | O_CLOEXEC);
	if (mfd < 0) {
		r = -errno;
		if (r == -ENOENT)
			tdr_set_error("%s: no such file; create it with vhd-util create -n %s -s SIZE_MB",
				      params, params);
		else
			tdr_set_error("%s: cannot open: %s", params, strerror(-r));
		return r;
	}
	if (fstat(mfd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(mfd);
		tdr_set_error("%s: not a regular file; a VHD is a file", params);
		return -EINVAL;
	}
	/* Held until the serving fd has its own: no tool rewrites the file in between. */
	r = td_image_lock_file(mfd, params);
	if (r < 0) {
		close(mfd);
		return r;
	}
	src.pread = vhd_src_fd_pread;
	src.ctx = (void *)(intptr_t)mfd;
	src.size = (uint64_t)st.st_size;
	src.name = params;
	r = vhd_meta_load(&s->m, &src, 0, &err);
	if (r < 0) {
		close(mfd);
		tdr_set_error("%s", err.msg);
		vhd_meta_free(&s->m);
		return r;
	}

	if (flags & TD_OPEN_NO_O_DIRECT) {
		r = open(params, ((flags & TD_OPEN_RDONLY) ? O_RDONLY : O_RDWR) | O_CLOEXEC);
		if (r < 0)
			r = -errno;
	} else {
		r = tdr_io_open(params, (flags & TD_OPEN_RDONLY) ? O_RDONLY : O_RDWR, 0, &s->direct);
	}
	if (r < 0) {
		close(mfd);
		tdr_set_error("%s: cannot open for %s: %s%s", params,
			      (flags & TD_OPEN_RDONLY) ? "reading" : "writing", strerror(-r),
			      (r == -EACCES || r == -EROFS) ? "; check its permissions or use --read-only" : "");
		vhd_free_state(s);
		return r;
	}
	s->fd = r;
	r = tdr_file_lock(s->fd, TDR_LOCK_SHARED);
	close(mfd);
	if (r < 0) {
		/* Cannot be -EBUSY: mfd's shared lock kept writers out. */
		tdr_set_error("%s: cannot lock: %s", params, strerror(-r));
		vhd_free_state(s);
		return r;
	}
	s->size_secs = s->m.footer.current_size >> VHD_SECTOR_SHIFT;
	img->size_secs = s->size_secs;
	img->info_discard = false;
	if (!is_dynamic(s))
		return 0;

	s->bm_bytes = s->m.bm_secs * VHD_SECTOR_SIZE;
	s->nbsec = (uint32_t)(((uint64_t)s->m.bat_entries * 4 + VHD_SECTOR_SIZE - 1) / VHD_SECTOR_SIZE);
	/* 2 MiB for 1 TiB: mapped up front, not faulted in page by page by the copy below. */
	s->bat_disk_len = (size_t)s->m.bat_entries * sizeof(uint32_t);
	s->bat_disk = vhd_big_alloc(s->bat_disk_len);
	s->bsec = calloc(s->nbsec ? s->nbsec : 1, sizeof(*s->bsec));
	s->fmv = tdr_io_alloc(sizeof(*s->fmv));
	if (!s->bat_disk || !s->bsec || !s->fmv) {
		vhd_free_state(s);
		tdr_set_error("%s: out of memory", params);
		return -ENOMEM;
	}
	memset(s->fmv, 0, sizeof(*s->fmv));
	memcpy(s->bat_disk, s->m.bat, (size_t)s->m.bat_entries * sizeof(uint32_t));
	/* The one full scan: at open. */
	for (uint32_t b = 0; b < s->m.bat_entries; b++)
		if (s->m.bat[b] != VHD_BAT_UNUSED)
			alloc_list_add(s, b);
	for (uint32_t i = 0; i < s->nbsec; i++) {
		s->bsec[i].s = s;
		s->bsec[i].idx = i;
		tdr_list_init(&s->bsec[i].waiting);
		tdr_list_init(&s->bsec[i].inflight);
	}
	vhd_footer_encode(&s->m.footer, s->fmv->footer);
	s->footer_off = s->m.footer_off;
	data_end = s->m.data_end > s->m.meta_end ? s->m.data_end : s->m.meta_end;
	if (is_dynamic(s) && !(flags & TD_OPEN_RDONLY) && s->footer_off > data_end) {
		/*
		 * A file longer than its data: a daemon died before the trim
		 * at close, with the footer moved to the disk's full length.
		 * New blocks go from the data's end again, not past the
		 * footer (the space would never come back, and near 2 TiB the
		 * file would be full), and the close trims it.  The space up
		 * to the footer is treated as given back: allocations the
		 * crash cut short may have left data there that no BAT entry
		 * points at (zero-filled, and synced before their BAT, as
		 * after an online make-empty).
		 */
		s->reuse_end = s->footer_off;
		s->assigned_end = data_end;
		set_next_free(s, data_end);
	} else {
		s->assigned_end = s->footer_off;
		set_next_free(s, data_end > s->footer_off ? data_end : s->footer_off);
	}
	return 0;
}

/*
 * Requests, metadata writes and syncs still in flight.  A background
 * sync after make-empty (reuse_syncs) is counted too: it would free
 * itself, but a close that waits for it leaves nothing running.
 */
static uint64_t vhd_busy(struct td_image *img)
{
	struct vhd_state *s = img->priv;
	uint64_t n = (uint64_t)s->ops_live + s->jobs_live + s->gsync_inflight + s->footer_busy;
	struct tdr_list *pos;

	if (s->reuse_syncs.next)
		for (pos = s->reuse_syncs.next; pos != &s->reuse_syncs; pos = pos->next)
			n++;
	return n;
}

/*
 * At a clean close, gives the file back the length of its data: the
 * footer, written just past the last block, made durable, then the holes
 * after it cut off (vhd_file_end_at).  Blocking calls, at close only.  A
 * crash anywhere in between leaves a valid file: until the truncate is
 * durable the old footer is still the last 512 bytes.  Called on an idle
 * disk (vhd_close); nothing happens unless it is writable and its footer
 * lies past its blocks.
 */
static void vhd_trim(struct vhd_state *s)
{
	uint64_t end = s->assigned_end > s->m.data_end ? s->assigned_end : s->m.data_end;
	int r;

	if (!is_dynamic(s) || (s->img->flags & TD_OPEN_RDONLY))
		return;
	if (end < s->m.meta_end)
		end = s->m.meta_end;
	end = (end + VHD_SECTOR_SIZE - 1) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
	if (s->footer_off <= end)
		return;
	r = vhd_file_end_at(s->fd, s->fmv->footer, end);
	if (r)
		TDR_WARN("%s: cannot trim the file to its data (%s); it stays valid, only longer",
			 s->img->params, strerror(-r));
}

static void vhd_close(struct td_image *img)
{
	struct vhd_state *s = img->priv;
	/* A footer move ahead of need is safe to leave behind (vhd_free_state). */
	uint64_t busy = vhd_busy(img) - s->footer_busy;

	if (busy)
		TDR_WARN("%s: closed with %llu requests or metadata writes in flight",
			 img->params, (unsigned long long)busy);
	else if (!s->footer_busy)
		vhd_trim(s);
	vhd_free_state(s);
}

static int vhd_get_parent_id(struct td_image *img, struct td_parent_id *id)
{
	struct vhd_state *s = img->priv;
	struct vhd_error err;
	int r;

	if (!is_diff(s))
		return TD_NO_PARENT;
	r = vhd_resolve_parent(&s->m, img->params, id->path, sizeof(id->path), &err);
	if (r < 0) {
		tdr_set_error("%s", err.msg);
		return r;
	}
	/* A raw parent (vhd-util snapshot -m) is served by the aio driver. */
	snprintf(id->drv, sizeof(id->drv), "%s", vhd_meta_parent_raw(&s->m) ? "aio" : "vhd");
	return 0;
}

/*
 * A raw parent, served by aio: the library's rules (vhd_raw_probe: whole
 * sectors, no VHD), so that the daemon serves no chain that vhd-util check
 * refuses, then its size and timestamp.  Read once, at open, through a
 * descriptor of its own: aio's is O_DIRECT, which the probe's unaligned
 * 512-byte reads would fail on.
 */
static int validate_raw_parent(struct vhd_state *s, struct td_image *img,
			       struct td_image *parent, int64_t mtime, struct vhd_error *err)
{
	uint64_t size;
	int fd, r;

	if (strcmp(parent->drv->name, "aio") != 0)
		return vhd_fail(err, VHD_ERR_PARENT_UUID,
				"%s: made over a raw parent, but %s is served by driver %s", img->params,
				parent->params, parent->drv->name);
	fd = open(parent->params, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot open: %s", parent->params,
				strerror(errno));
	r = vhd_raw_probe(fd, parent->params, &size, err);
	close(fd);
	if (r < 0)
		return r;
	return vhd_check_raw_parent(&s->m, img->params, size, parent->params, mtime, 0, err);
}

static int vhd_validate_parent(struct td_image *img, struct td_image *parent)
{
	struct vhd_state *s = img->priv, *ps;
	struct vhd_error err;
	struct stat st;
	int r;

	if (stat(parent->params, &st) < 0)
		st.st_mtime = 0;
	if (vhd_meta_parent_raw(&s->m)) {
		r = validate_raw_parent(s, img, parent, (int64_t)st.st_mtime, &err);
	} else if (parent->drv != &td_drv_vhd) {
		tdr_set_error("%s: parent %s is not a VHD image (driver %s)", img->params,
			      parent->params, parent->drv->name);
		return -EINVAL;
	} else {
		ps = parent->priv;
		r = vhd_check_parent(&s->m, img->params, &ps->m, parent->params,
				     (int64_t)st.st_mtime, 0, &err);
	}
	if (r < 0) {
		tdr_set_error("%s", err.msg);
		return r;
	}
	if (err.code != VHD_OK)
		TDR_WARN("%s", err.msg);
	return 0;
}

static void vhd_debug(struct td_image *img, FILE *out)
{
	struct vhd_state *s = img->priv;
	char uuid[37];

	vhd_uuid_format(s->m.footer.uuid, uuid);
	fprintf(out, "    vhd: %s %s size=%llu uuid=%s fd=%d %s in_flight=%u\n",
		img->params, vhd_type_name(s->m.footer.type),
		(unsigned long long)s->m.footer.current_size, uuid, s->fd,
		s->direct ? "O_DIRECT" : "buffered", s->ops_live);
	if (is_dynamic(s))
		fprintf(out, "    vhd: block_size=%u blocks=%u allocated=%u next_free=%llu footer=%llu cached_bitmaps=%u\n",
			s->m.header.block_size, s->m.blocks, s->m.allocated,
			(unsigned long long)s->next_free, (unsigned long long)s->footer_off,
			s->bm_count);
}

static void vhd_stats(struct td_image *img, FILE *out)
{
	struct vhd_state *s = img->priv;

	fprintf(out, "    allocated_blocks=%u\n    allocations=%llu\n    joined_allocations=%llu\n"
		"    bitmap_loads=%llu\n    bitmap_hits=%llu\n    bitmap_writes=%llu\n"
		"    bitmap_evictions=%llu\n    bat_writes=%llu\n    footer_writes=%llu\n"
		"    reuse_waits=%llu\n    group_syncs=%llu\n    group_syncs_skipped=%llu\n"
		"    zero_writes_elided=%llu\n    unsynced_allocations=%llu\n    scratch=%d\n"
		"    ordered=%d\n",
		s->m.allocated, (unsigned long long)s->st.allocs,
		(unsigned long long)s->st.joined_allocs, (unsigned long long)s->st.bm_loads,
		(unsigned long long)s->st.bm_hits, (unsigned long long)s->st.bm_writes,
		(unsigned long long)s->st.evictions, (unsigned long long)s->st.bat_writes,
		(unsigned long long)s->st.footer_writes, (unsigned long long)s->st.reuse_waits,
		(unsigned long long)s->st.gsyncs, (unsigned long long)s->st.gsyncs_skipped,
		(unsigned long long)s->st.zero_elided, (unsigned long long)s->st.fresh_unsynced,
		s->scratch, s->ordered);
}

const struct td_driver td_drv_vhd = {
	.name = "vhd",
	.priv_size = sizeof(struct vhd_state),
	.open = vhd_open,
	.close = vhd_close,
	.queue_read = vhd_queue_read,
	.queue_write = vhd_queue_write,
	.queue_flush = vhd_queue_flush,
	.queue_block_status = vhd_queue_block_status,
	.get_parent_id = vhd_get_parent_id,
	.validate_parent = vhd_validate_parent,
	.busy = vhd_busy,
	.debug = vhd_debug,
	.stats = vhd_stats,
};

/* ------------------------------------------------------------------ */
/* Online make-empty */

struct mk_empty {
	struct vhd_state *s;
	void (*done)(void *arg, int err);
	void *arg;
	struct tdr_iocb *iocbs;
	uint8_t **bufs;
	uint32_t *dirty;
	uint32_t nbufs;
	int pending, err;
	uint64_t end;
	struct tdr_defer defer;
	int defer_err;
	bool counted;		/* in s->jobs_live (the image is a VHD) */
};

static void mk_free(struct mk_empty *mk)
{
	for (uint32_t i = 0; i < mk->nbufs; i++)
		free(mk->bufs[i]);
	free(mk->bufs);
	free(mk->dirty);
	free(mk->iocbs);
	free(mk);
}

static void mk_finish(struct mk_empty *mk, int err)
{
	void (*done)(void *, int) = mk->done;
	void *arg = mk->arg;

	if (mk->counted) {
		mk->s->jobs_live--;
		if (err)
			TDR_ERR("%s: make-empty failed: %s", mk->s->img->params, strerror(-err));
	}
	mk_free(mk);
	done(arg, err);
}

static void mk_deferred_finish(void *arg)
{
	struct mk_empty *mk = arg;

	mk_finish(mk, mk->defer_err);
}

/* done always runs from the loop, never inside vhd_image_make_empty(). */
static void mk_finish_later(struct mk_empty *mk, int err)
{
	mk->defer_err = err;
	tdr_defer_init(&mk->defer, mk_deferred_finish, mk);
	tdr_loop_defer(mk->s->img->loop, &mk->defer);
}

static void reuse_synced(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct vhd_reuse_sync *rs = arg;
	struct vhd_state *s = rs->s;
	struct tdr_list *pos, *tmp;

	tdr_list_del(&rs->entry);
	free(rs);
	if (!tdr_list_empty(&s->reuse_syncs))
		return;
	tdr_list_for_each_safe(pos, tmp, &s->reuse_waiters) {
		struct vhd_alloc *a = tdr_list_entry(pos, struct vhd_alloc, entry);

		tdr_list_del(&a->entry);
		if (res < 0)
			alloc_fail(a, (int)res);
		else
			alloc_place(a);
	}
}

static void mk_bat_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct mk_empty *mk = arg;
	struct vhd_state *s = mk->s;
	struct vhd_reuse_sync *rs;

	if (res < 0 && !mk->err)
		mk->err = (int)res;
	if (--mk->pending)
		return;
	if (mk->err) {
		mk_finish_later(mk, mk->err);
		return;
	}
	/*
	 * The cleared BAT is written: the file is empty.  Its length and its
	 * footer stay as they are, and allocations start again at the
	 * beginning of the data area, reusing the space below the footer
	 * (they write no footer while they fit under it).  No ftruncate:
	 * freeing extents is a synchronous system call that can block the
	 * event loop for seconds on a filesystem mounted with online discard,
	 * and make-empty runs at every checkpoint.  The offline tool
	 * (vhd-util modify -z) does truncate, to give the space back.
	 */
	if (mk->nbufs) {
		rs = calloc(1, sizeof(*rs));
		if (!rs) {
			mk_finish_later(mk, -ENOMEM);
			return;
		}
		rs->s = s;
		tdr_list_add_tail(&rs->entry, &s->reuse_syncs);
		tdr_io_fdsync(s->img->io, &rs->iocb, s->fd, reuse_synced, rs);
	}
	/*
	 * Everything below assigned_end may hold old data, whether or not this
	 * make-empty dropped a block (the file may have been emptied by an
	 * earlier process and kept its length): a dynamic disk's new blocks
	 * there are zero-filled (alloc_zero_gaps).
	 */
	if (s->assigned_end > s->reuse_end)
		s->reuse_end = s->assigned_end;
	s->m.data_end = s->m.meta_end;
	s->m.allocated = 0;
	set_next_free(s, mk->end);
	mk_finish_later(mk, 0);
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

int vhd_image_set_scratch(struct td_image *img, bool on)
{
	struct vhd_state *s = img->priv;

	if (!img_is_dynamic_vhd(img)) {
		tdr_set_error("%s: only dynamic and differencing VHDs have a scratch mode", img->params);
		return -EINVAL;
	}
	if (s->scratch != on)
		TDR_INFO("%s: scratch mode %s", img->params,
			 on ? "on: no ordering syncs, not safe across a host crash" : "off");
	s->scratch = on;
	return 0;
}

int vhd_image_set_ordered(struct td_image *img, bool on)
{
	struct vhd_state *s = img->priv;

	if (!img_is_dynamic_vhd(img))
		return -ENOTSUP;
	s->ordered = on;
	return 0;
}

int vhd_image_for_each_block(struct td_image *img,
			     int (*fn)(void *arg, uint64_t sec, uint64_t secs), void *arg)
{
	struct vhd_state *s = img->priv;

	if (!img_is_dynamic_vhd(img)) {
		tdr_set_error("%s: only dynamic and differencing VHDs have blocks to list", img->params);
		return -EINVAL;
	}
	/* Validation keeps the BAT at least m.blocks long. */
	for (uint32_t b = 0; b < s->m.blocks; b++) {
		int r;

		if (s->m.bat[b] != VHD_BAT_UNUSED &&
		    (r = fn(arg, (uint64_t)b * s->m.spb, block_secs(s, b))) != 0)
			return r;
	}
	return 0;
}

/* ------------------------------------------------------------------ */
/* Runs of present sectors (vhd_image_for_each_run) */

#define RUNS_DEPTH 16u	/* bitmap reads in flight */

struct runs;

struct runs_slot {
	struct runs *r;
	struct tdr_iocb iocb;
	uint32_t block;		/* UINT32_MAX: idle */
	uint8_t *map;
};

struct runs {
	struct td_image *img;
	struct vhd_state *s;
	int (*fn)(void *arg, uint64_t sec, uint64_t secs);
	void (*done)(void *arg, int err);
	void *arg;
	uint32_t next;
	unsigned inflight;
	bool pumping;		/* runs_pump is on the stack */
	int err;
	struct tdr_defer defer;
	struct runs_slot slot[RUNS_DEPTH];
};

static void runs_finish(struct runs *r)
{
	void (*done)(void *, int) = r->done;
	void *arg = r->arg;
	int err = r->err;

	r->s->jobs_live--;
	for (unsigned i = 0; i < RUNS_DEPTH; i++)
		free(r->slot[i].map);
	free(r);
	done(arg, err);
}

static void runs_pump(struct runs *r);

/* One block's bitmap is in: its runs of set bits go to fn, in order. */
static void runs_map_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct runs_slot *sl = arg;
	struct runs *r = sl->r;
	struct vhd_state *s = r->s;
	uint64_t base = (uint64_t)sl->block * s->m.spb;
	uint32_t n = block_secs(s, sl->block);

	r->inflight--;
	if (res < 0 || (size_t)res != s->bm_bytes) {
		if (!r->err)
			r->err = res < 0 ? (int)res : -EIO;
	}
	for (uint32_t i = 0; i < n && !r->err;) {
		bool set;
		uint32_t run = vhd_bitmap_run(sl->map, i, n - i, &set);

		if (set)
			r->err = r->fn(r->arg, base + i, run);
		i += run;
	}
	sl->block = UINT32_MAX;
	runs_pump(r);
}

static void runs_pump(struct runs *r)
{
	struct vhd_state *s = r->s;

	if (r->pumping)
		return;
	r->pumping = true;
	for (unsigned i = 0; i < RUNS_DEPTH && !r->err; i++) {
		struct runs_slot *sl = &r->slot[i];

		if (sl->block != UINT32_MAX)
			continue;
		while (r->next < s->m.blocks && s->m.bat[r->next] == VHD_BAT_UNUSED)
			r->next++;
		if (r->next >= s->m.blocks)
			break;
		sl->block = r->next++;
		r->inflight++;
		tdr_io_pread(r->img->io, &sl->iocb, s->fd, sl->map, s->bm_bytes,
			     (uint64_t)s->m.bat[sl->block] << VHD_SECTOR_SHIFT, runs_map_done, sl);
	}
	r->pumping = false;
	if (!r->inflight)
		runs_finish(r);
}

static void runs_deferred(void *arg)
{
	struct runs *r = arg;

	if (r->err || !is_diff(r->s)) {
		/* A dynamic disk's bitmaps need not say anything: whole blocks. */
		if (!r->err)
			r->err = vhd_image_for_each_block(r->img, r->fn, r->arg);
		runs_finish(r);
		return;
	}
	runs_pump(r);
}

void vhd_image_for_each_run(struct td_image *img,
			    int (*fn)(void *arg, uint64_t sec, uint64_t secs),
			    void (*done)(void *arg, int err), void *arg)
{
	struct vhd_state *s = img->priv;
	struct runs *r;

	if (!img_is_dynamic_vhd(img)) {
		tdr_set_error("%s: only dynamic and differencing VHDs have runs to list", img->params);
		done(arg, -EINVAL);
		return;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		done(arg, -ENOMEM);
		return;
	}
	r->img = img;
	r->s = s;
	r->fn = fn;
	r->done = done;
	r->arg = arg;
	s->jobs_live++;
	for (unsigned i = 0; i < RUNS_DEPTH; i++) {
		r->slot[i].r = r;
		r->slot[i].block = UINT32_MAX;
		if (is_diff(s) && !(r->slot[i].map = tdr_io_alloc(s->bm_bytes)))
			r->err = -ENOMEM;
	}
	/* From the loop, like every other completion of this driver. */
	tdr_defer_init(&r->defer, runs_deferred, r);
	tdr_loop_defer(img->loop, &r->defer);
}

void vhd_image_make_empty(struct td_image *img, void (*done)(void *arg, int err), void *arg)
{
	struct vhd_state *s = img->priv;
	struct mk_empty *mk = calloc(1, sizeof(*mk));
	uint32_t b, last = UINT32_MAX, n = 0;
	uint32_t *dirty = NULL;
	int r = 0;

	if (!mk) {
		TDR_ERR("%s: make-empty: out of memory", img->params);
		done(arg, -ENOMEM);
		return;
	}
	mk->s = s;
	mk->done = done;
	mk->arg = arg;
	mk->counted = img->drv == &td_drv_vhd;
	if (mk->counted)
		s->jobs_live++;
	if (!img_is_dynamic_vhd(img)) {
		tdr_set_error("%s: only dynamic and differencing VHDs can be made empty", img->params);
		r = -EINVAL;
		goto fail;
	}
	if (img->flags & TD_OPEN_RDONLY) {
		tdr_set_error("%s: opened read-only; cannot make it empty", img->params);
		r = -EPERM;
		goto fail;
	}
	if (s->ops_live) {
		tdr_set_error("%s: make-empty with %u requests in flight", img->params, s->ops_live);
		r = -EBUSY;
		goto fail;
	}
	/* Cost: the blocks allocated since the last make-empty, and their BAT sectors. */
	dirty = malloc(sizeof(*dirty) * (s->nbsec ? s->nbsec : 1));
	if (!dirty) {
		r = -ENOMEM;
		goto fail;
	}
	if (s->alloc_list_lost) {
		/* The list is incomplete: the whole BAT, once. */
		s->nalloc_list = 0;
		for (b = 0; b < s->m.bat_entries; b++)
			if (s->m.bat[b] != VHD_BAT_UNUSED)
				alloc_list_add(s, b);
	}
	/* In BAT order, so that each changed BAT sector is written once. */
	if (s->nalloc_list)
		qsort(s->alloc_list, s->nalloc_list, sizeof(*s->alloc_list), cmp_u32);
	for (uint32_t i = 0; i < s->nalloc_list; i++) {
		b = s->alloc_list[i];
		s->m.bat[b] = VHD_BAT_UNUSED;
		s->bat_disk[b] = VHD_BAT_UNUSED;
		if (b / (VHD_SECTOR_SIZE / 4) != last) {
			last = b / (VHD_SECTOR_SIZE / 4);
			dirty[n++] = last;
		}
	}
	s->nalloc_list = 0;
	s->alloc_list_lost = false;
	/* Every cached bitmap is gone with its block. */
	bm_drop_all(s);
	if (s->m.batmap_len) {
		/* Only blktap's own files have one: rare, small, synchronous. */
		int bfd = open(img->params, O_RDWR | O_CLOEXEC);

		r = bfd < 0 ? -errno : vhd_meta_clear_batmap(bfd, &s->m);
		if (bfd >= 0)
			close(bfd);
		if (r < 0)
			goto fail;
	}
	mk->end = (s->m.meta_end + VHD_SECTOR_SIZE - 1) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
	mk->iocbs = calloc(n ? n : 1, sizeof(*mk->iocbs));
	mk->bufs = calloc(n ? n : 1, sizeof(*mk->bufs));
	if (!mk->iocbs || !mk->bufs) {
		r = -ENOMEM;
		goto fail;
	}
	for (uint32_t i = 0; i < n; i++) {
		mk->bufs[i] = tdr_io_alloc(VHD_SECTOR_SIZE);
		if (!mk->bufs[i]) {
			r = -ENOMEM;
			goto fail;
		}
		mk->nbufs++;
		vhd_bat_sector(s->bat_disk, s->m.bat_entries, dirty[i], mk->bufs[i]);
	}
	mk->dirty = dirty;
	dirty = NULL;
	mk->pending = 1;
	for (uint32_t i = 0; i < n; i++) {
		mk->pending++;
		tdr_io_pwrite(img->io, &mk->iocbs[i], s->fd, mk->bufs[i], VHD_SECTOR_SIZE,
			      s->m.header.table_offset + (uint64_t)mk->dirty[i] * VHD_SECTOR_SIZE,
			      mk_bat_done, mk);
	}
	mk_bat_done(NULL, 0, mk);
	return;

fail:
	free(dirty);
	mk_finish_later(mk, r);
}

/* ------------------------------------------------------------------ */
/* Online commit into the parent */

struct commit {
	struct td_image *img;
	struct vhd_state *s;
	void (*progress)(void *arg, uint64_t done, uint64_t total);
	void (*done)(void *arg, int err);
	void *arg;
	uint32_t block;		/* next block to look at */
	uint64_t blocks_done, total;
	uint8_t *map;
	char *buf;
	struct tdr_iocb iocb;
	struct td_request *reqs;
	unsigned nreqs, pending;
	int err;
	struct tdr_defer defer;
	struct td_request flush;
	bool counted;		/* in s->jobs_live (the image is a VHD) */
};

static void commit_next(struct commit *c);

static void commit_finish(struct commit *c, int err)
{
	void (*done)(void *, int) = c->done;
	void *arg = c->arg;

	if (err)
		TDR_ERR("%s: commit into %s failed: %s", c->img->params,
			c->img->parent ? c->img->parent->params : "(none)", strerror(-err));
	if (c->counted)
		c->s->jobs_live--;
	free(c->map);
	free(c->buf);
	free(c->reqs);
	free(c);
	done(arg, err);
}

static void commit_deferred(void *arg)
{
	struct commit *c = arg;

	if (c->err)
		commit_finish(c, c->err);
	else
		commit_next(c);
}

static void commit_flush_done(struct td_request *req, int err, void *arg)
{
	commit_finish(arg, err);
}

static void commit_write_done(struct td_request *req, int err, void *arg)
{
	struct commit *c = arg;

	if (err && !c->err)
		c->err = err;
	if (--c->pending)
		return;
	if (c->err) {
		commit_finish(c, c->err);
		return;
	}
	c->blocks_done++;
	if (c->progress)
		c->progress(c->arg, c->blocks_done, c->total);
	c->block++;
	/* Next block from the loop: keeps the stack flat with synchronous parents. */
	tdr_loop_defer(c->img->loop, &c->defer);
}

static void commit_data_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct commit *c = arg;
	struct vhd_state *s = c->s;
	uint64_t base = (uint64_t)c->block * s->m.spb;
	uint32_t n = block_secs(s, c->block);
	uint32_t i = 0;

	if (res < 0 || (size_t)res != (size_t)n << TD_SECTOR_SHIFT) {
		commit_finish(c, res < 0 ? (int)res : -EIO);
		return;
	}
	c->nreqs = 0;
	c->pending = 1;
	while (i < n) {
		bool set;
		uint32_t run = vhd_bitmap_run(c->map, i, n - i, &set);

		if (set) {
			struct td_request *req = &c->reqs[c->nreqs++];

			if (base + i + run > c->img->parent->size_secs) {
				c->err = -ENOSPC;
				break;
			}
			td_request_init(req, TD_OP_WRITE, base + i, run,
					c->buf + ((size_t)i << TD_SECTOR_SHIFT), commit_write_done, c);
			c->pending++;
			td_queue_request(c->img->parent, req);
		}
		i += run;
	}
	commit_write_done(NULL, 0, c);
}

static void commit_map_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct commit *c = arg;
	struct vhd_state *s = c->s;
	uint32_t n = block_secs(s, c->block);

	if (res < 0 || (size_t)res != s->bm_bytes) {
		commit_finish(c, res < 0 ? (int)res : -EIO);
		return;
	}
	tdr_io_pread(c->img->io, &c->iocb, s->fd, c->buf, (size_t)n << TD_SECTOR_SHIFT,
		     data_off(s, s->m.bat[c->block], 0), commit_data_done, c);
}

static void commit_next(struct commit *c)
{
	struct vhd_state *s = c->s;

	while (c->block < s->m.blocks && s->m.bat[c->block] == VHD_BAT_UNUSED)
		c->block++;
	if (c->block >= s->m.blocks) {
		td_request_init(&c->flush, TD_OP_FLUSH, 0, 0, NULL, commit_flush_done, c);
		td_queue_request(c->img->parent, &c->flush);
		return;
	}
	tdr_io_pread(c->img->io, &c->iocb, s->fd, c->map, s->bm_bytes,
		     (uint64_t)s->m.bat[c->block] << VHD_SECTOR_SHIFT, commit_map_done, c);
}

void vhd_image_commit(struct td_image *child,
		      void (*progress)(void *arg, uint64_t done, uint64_t total),
		      void (*done)(void *arg, int err), void *arg)
{
	struct vhd_state *s = child->priv;
	struct commit *c = calloc(1, sizeof(*c));

	if (!c) {
		TDR_ERR("%s: commit: out of memory", child->params);
		done(arg, -ENOMEM);
		return;
	}
	c->img = child;
	c->s = s;
	c->progress = progress;
	c->done = done;
	c->arg = arg;
	c->counted = child->drv == &td_drv_vhd;
	if (c->counted)
		s->jobs_live++;
	tdr_defer_init(&c->defer, commit_deferred, c);
	if (!img_is_dynamic_vhd(child) || !child->parent) {
		tdr_set_error("%s: commit needs a dynamic or differencing VHD with a parent",
			      child->params);
		c->err = -EINVAL;
	} else {
		c->map = tdr_io_alloc(s->bm_bytes);
		c->buf = tdr_io_alloc(s->m.header.block_size);
		c->reqs = calloc(s->m.spb / 2 + 1, sizeof(*c->reqs));
		if (!c->map || !c->buf || !c->reqs)
			c->err = -ENOMEM;
		c->total = s->m.allocated;
	}
	tdr_loop_defer(child->loop, &c->defer);
}
