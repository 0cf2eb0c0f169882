/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The replica driver in secondary mode.
 *
 * The SVM's disk is a chain: active (VHD differencing) over hidden (VHD
 * differencing) over the secondary disk.  Two doors lead into it:
 *
 *   - the SVM's own requests enter the filter and go down the chain from
 *     active (writes land in active);
 *   - the primary's writes enter the export (an image of our own, served
 *     over NBD) and land in the secondary disk; while running, each first
 *     copies the original content of the chunks it touches into hidden
 *     (copy-before-write, once per chunk between checkpoints), so the SVM
 *     keeps seeing the disk as it was at the last checkpoint.
 *
 * Ordering.  A primary write holds an exclusive range lock on its chunks
 * from its copy-before-write until its write to the secondary disk is done;
 * SVM reads hold a shared lock on their range.  So an SVM read never
 * overlaps a primary write in flight (it waits for the copy and the write),
 * and overlapping primary writes run in arrival order.  SVM writes touch
 * only active and need no lock.
 *
 * Checkpoint: hold new requests at both doors, wait for those in flight,
 * empty active and hidden, clear the copy-before-write map, release.
 *
 * Scratch mode.  While running, active and hidden hold nothing that must
 * survive a crash of this host: they are emptied at every checkpoint, and
 * a secondary whose host crashed is rebuilt from the primary.  So their
 * allocations skip the syncs that order data before metadata on stable
 * storage (vhd_image_set_scratch): the copy into hidden, which the
 * primary's write waits for, no longer waits for a disk flush.  Failover
 * turns the mode off and flushes both (the failover ends only after
 * that): from then on they are the only copy of the SVM's disk.  The
 * secondary disk never uses it.  The syncs it skips also spread the
 * disk's write-back over the allocations; without them the primary's
 * checkpoint flush had it all to write (a barrier of 12.8 -> 79.7 ms,
 * docs/benchmarks.md), so the secondary disk is now flushed in the
 * background every RUN_FLUSH_BYTES (back to 14 ms), and the primary's
 * flush skips hidden.  The spec's scratch=off keeps every sync.
 *
 * Failover: the SVM's view differs from the secondary disk only in the
 * chunks that active or hidden hold, which we track (svm_written, cbw).
 * We copy the view of those chunks (a read through active) into the
 * secondary disk in the background; SVM writes meanwhile still go to
 * active and mark their chunks for another copy when they complete.  When
 * nothing is left, new SVM writes are held for the moment it takes to let
 * the last ones finish and copy them; then the driver serves the secondary
 * disk directly (done).  Active and hidden are left intact until then, so
 * a failed copy loses nothing (failover-failed).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "replica-int.h"
#include "tdr/log.h"
#include "tdr/nbd.h"
#include "tdr/vhd.h"

/*
 * The commit's copies in flight: at most FO_MAX_BYTES of them, and at most
 * FO_MAX_COPIES.  A budget in bytes because the size of a copy is set by
 * the data: a run of dirty chunks, up to 2 MiB, often 1 MiB or less (what
 * the primary and the SVM wrote between two checkpoints).  A cap of sixteen
 * copies kept only 16 MiB in the disk when they were 1 MiB each; the byte
 * budget made such a commit 13% faster (docs/benchmarks.md).
 */
#define FO_MAX_BYTES    (32ull << 20)
#define FO_MAX_COPIES   64u
/*
 * While the SVM does I/O, the commit keeps at most FO_SVM_BYTES of copies in
 * flight, in copies of at most that size (at least one chunk).  On a disk
 * with a volatile cache (a virtual disk cached by its host) every flush
 * stops every request until the host has written back what came since the
 * last one, about 1.3 ms per MiB here; a flush after 4 MiB of 2 MiB copies
 * stopped the SVM for 8-9 ms, one after 1 MiB for 3-4 ms
 * (docs/benchmarks.md, twelfth session).  The commit goes slower while the
 * SVM is busy; the SVM keeps going.  A budget in bytes, not copies, so
 * that the chunks the SVM dirties again at random, 64 KiB each, still go
 * many at a time and the commit converges.  After FO_SVM_QUIET_NS without
 * an SVM request, the commit goes back to full speed.
 */
#define FO_SVM_BYTES    (1ull << 20)
#define FO_SVM_QUIET_NS (20 * 1000 * 1000ull)
/*
 * The commit flushes the secondary disk every FO_FLUSH_BYTES it writes, in
 * the background, copies going on: on a disk with a volatile cache (here, a
 * virtual disk cached by its host) a flush stalls every request until the
 * cache is written back, so many small flushes stop the SVM for a few ms
 * each where the one before the last phase, with the whole commit behind
 * it, stopped it for 60-110 ms (docs/benchmarks.md, bench-secondary).
 */
#define FO_FLUSH_BYTES  (16ull << 20)
/*
 * While the SVM does I/O (fo_svm_busy), every FO_SVM_FLUSH_BYTES instead,
 * so that no flush has more than a few MiB to write back (see
 * FO_SVM_BYTES): at 16 MiB the SVM stopped for 12-16 ms per flush, at 8 MiB
 * for about 10 ms, at 1 MiB with 1 MiB copies for 3-4 ms.  With the SVM
 * idle the commit keeps the larger step, which costs it less.
 */
#define FO_SVM_FLUSH_BYTES (1ull << 20)
/*
 * While running in scratch mode, the secondary disk is flushed in the
 * background every RUN_FLUSH_BYTES the primary writes, so that the
 * primary's checkpoint flush finds less to write back (scratch mode
 * skipped the syncs that used to do this as a side effect).
 */
#define RUN_FLUSH_BYTES (2ull << 20)
#define FO_RUN_CHUNKS   32	/* chunks merged into one failover copy (2 MiB at 64 KiB) */
/*
 * Idle copy buffers kept for reuse (copy-before-write and failover): the
 * failover's 2 MiB buffers would otherwise be mapped, faulted in and
 * unmapped by glibc for every copy.
 */
#define SEC_BUFS_IDLE   ((size_t)FO_MAX_BYTES + (4u << 20))
/*
 * The last phase holds SVM writes while it copies what is left: enter it
 * when that is at most FO_FINAL_BYTES (at least one chunk), or once the
 * engine has copied twice the initial set, whichever comes first, so that
 * an SVM rewriting its hot spots cannot keep the failover going.  The
 * held writes wait for those copies and a flush: with 2 MiB left (and
 * 8 MiB flush steps before) they waited 21-23 ms, with 512 KiB (and 1 MiB
 * steps) about 6 ms (docs/benchmarks.md).
 */
#define FO_FINAL_BYTES  (512u << 10)

/* What a held request was, to send it the right way on release. */
enum sec_door {
	DOOR_SVM = 1,
	DOOR_EXPORT,
};

struct sec {
	struct replica *r;
	struct td_image *active, *hidden, *secondary;

	/* The export: an image of ours whose requests go to sec_export_queue(). */
	struct td_image export_img;
	struct td_disk *export_disk;
	struct nbd_server *srv;
	bool scratch;			/* active and hidden are in scratch mode */
	bool closing;			/* quiesced: no new work of ours */
	bool srv_stopped;		/* the export's connections are all closed */

	struct replica_rlock lock;
	struct replica_chunkset cbw;		/* chunks copied into hidden */
	struct replica_chunkset svm_written;	/* chunks the SVM wrote into active */
	struct replica_chunkset fo_dirty;	/* failover: chunks still to copy */
	uint32_t chunk_secs;
	struct tdr_bufpool bufs;	/* copy buffers, reused (SEC_BUFS_IDLE) */

	uint64_t svm_inflight, svm_writes_inflight, export_inflight;
	uint64_t svm_last_ns;		/* when the SVM last sent a request */
	unsigned adopting;		/* failover in state none: listing active (1), then hidden (2) */

	/* Checkpoint/stop: hold everything.  Failover's last phase: hold SVM writes. */
	bool hold_all, hold_writes;
	struct tdr_list held;
	void (*drained)(struct sec *s);	/* called once nothing we wait for is in flight */
	struct tdr_defer drain_defer;	/* ... from the event loop (sec_check_drained) */

	uint64_t op_start_ns;
	bool stop_after_empty;		/* the emptying belongs to a stop, not a checkpoint */
	int empty_pending, empty_err;
	const char *empty_what;

	/* Failover. */
	bool fo_draining;		/* failover asked, the primary's writes still finishing */
	unsigned fo_copies;
	struct sec_copy *fo_inflight;	/* those copies, linked by next */
	uint64_t fo_bytes_inflight;	/* of those copies */
	uint64_t fo_copied;		/* bytes copied, re-copies included */
	bool fo_flushing;		/* the last flush before the switch is in flight */
	uint64_t fo_cursor;
	int fo_err;
	bool fo_final;
	bool fo_preflushing, fo_preflushed;
	uint64_t fo_hold_start_ns;	/* when the last phase began holding SVM writes */
	struct td_request fo_flush;	/* the flush before, then the one ending, the last phase */
	struct td_request fo_bgflush;	/* every FO_FLUSH_BYTES */
	bool fo_bgflushing;
	struct td_request fo_chainflush[2];	/* active and hidden, leaving scratch mode */
	unsigned fo_chainflushing;
	uint64_t fo_unflushed;		/* bytes written since the last flush began */

	/* Running: the background flush of the secondary disk (RUN_FLUSH_BYTES). */
	struct td_request run_flush;
	bool run_flushing;
	uint64_t run_unflushed;
};

/* Per request that we pass down and must see complete. */
struct sec_fwd {
	struct td_request child;
	struct td_request *req;
	struct sec *s;
	enum sec_door door;
	bool modifies;
	bool locked;
	struct replica_range range;
	/* Copy-before-write (see cbw_reads_done). */
	struct sec_copy *copies;	/* one per chunk copied for this write */
	int copies_pending;		/* reads of the originals */
	int writes_pending;		/* hidden copies + the write itself, or undos */
	int copy_err, child_err, undo_err;
};

struct sec_copy {
	struct td_request rd, wr;
	char *buf;		/* from sec.bufs */
	size_t buf_len;
	struct sec *s;
	struct sec_fwd *f;	/* copy-before-write: the write waiting for it */
	struct sec_copy *next;	/* in f->copies, or in sec.fo_inflight */
	int err;		/* its copy into hidden failed */
	uint64_t first_chunk, nchunks;
};

static bool op_modifies(enum td_op op)
{
	return op == TD_OP_WRITE || op == TD_OP_DISCARD || op == TD_OP_WRITE_ZEROES;
}

static void sec_check_drained(struct sec *s);
static void export_flush_hidden_done(struct td_request *child, int err, void *arg);
static void sec_dispatch_svm(struct sec *s, struct td_request *req);
static void sec_dispatch_export(struct sec *s, struct td_request *req);
static void fo_pump(struct sec *s);

/* ----------------------------------------------------------- plumbing */

static struct sec_fwd *fwd_new(struct sec *s, struct td_request *req, enum sec_door door,
			       td_request_cb_t cb)
{
	struct sec_fwd *f = calloc(1, sizeof(*f));

	if (!f)
		return NULL;
	td_request_init(&f->child, req->op, req->sec, req->secs, req->buf, cb, f);
	f->child.flags = req->flags;
	f->req = req;
	f->s = s;
	f->door = door;
	f->modifies = op_modifies(req->op);
	return f;
}

/* Completes the original request of f and frees f. */
static void fwd_finish(struct sec_fwd *f, int err)
{
	struct td_request *req = f->req;

	if (req->op == TD_OP_BLOCK_STATUS) {
		req->bs_secs = f->child.bs_secs;
		req->bs_flags = f->child.bs_flags;
	}
	free(f);
	td_complete_request(req, err);
}

static void hold(struct sec *s, struct td_request *req, enum sec_door door)
{
	req->drv_u64 = door;
	tdr_list_add_tail(&req->entry, &s->held);
}

static void release_held(struct sec *s)
{
	struct tdr_list list, *pos, *tmp;

	/* Move them out first: a released request may be held again. */
	tdr_list_init(&list);
	tdr_list_for_each_safe(pos, tmp, &s->held) {
		tdr_list_del(pos);
		tdr_list_add_tail(pos, &list);
	}
	tdr_list_for_each_safe(pos, tmp, &list) {
		struct td_request *req = tdr_list_entry(pos, struct td_request, entry);

		tdr_list_del(pos);
		if (req->drv_u64 == DOOR_SVM)
			sec_dispatch_svm(s, req);
		else
			sec_dispatch_export(s, req);
	}
}

/* -------------------------------------------------------- SVM door */

/* Whether active or hidden holds (part of) the chunk: the SVM's view of it differs from the secondary disk's. */
static bool chunk_upper(const struct sec *s, uint64_t c)
{
	return replica_chunkset_test(&s->svm_written, c) || replica_chunkset_test(&s->cbw, c);
}

static void svm_done(struct td_request *child, int err, void *arg)
{
	struct sec_fwd *f = arg;
	struct sec *s = f->s;
	uint64_t sec = f->req->sec, secs = f->req->secs;
	bool modifies = f->modifies;

	if (f->locked)
		replica_rlock_release(&s->lock, &f->range);
	if (modifies && s->r->state == REPLICA_STATE_FAILOVER && secs) {
		/*
		 * Marked at completion: a failover copy that read the chunk
		 * before this write landed must copy it again.  Only chunks
		 * active holds: the others went to the secondary disk itself.
		 */
		for (uint64_t c = sec / s->chunk_secs; c <= (sec + secs - 1) / s->chunk_secs; c++)
			if (chunk_upper(s, c))
				replica_chunkset_set(&s->fo_dirty, c);
	}
	fwd_finish(f, err);
	s->svm_inflight--;
	if (modifies)
		s->svm_writes_inflight--;
	sec_check_drained(s);
	if (modifies && s->r->state == REPLICA_STATE_FAILOVER)
		fo_pump(s);
}

static void svm_read_granted(struct replica_range *rr, void *arg)
{
	struct sec_fwd *f = arg;

	td_queue_request(f->s->r->local, &f->child);
}

/*
 * Failover and failover-failed: a write goes where its chunk lives, into
 * active if active or hidden holds the chunk, else straight into the
 * secondary disk, where the SVM's view of that chunk already is (so it
 * needs no copy later).
 */
static void svm_write_routed(struct sec *s, struct sec_fwd *f)
{
	struct td_request *child = &f->child;
	uint64_t end = child->sec + child->secs;

	td_request_split_begin(child);
	for (uint64_t sec = child->sec; sec < end;) {
		bool upper = chunk_upper(s, sec / s->chunk_secs);
		uint64_t run_end = sec;

		while (run_end < end) {
			uint64_t rc = run_end / s->chunk_secs;

			if (chunk_upper(s, rc) != upper)
				break;
			run_end = (rc + 1) * s->chunk_secs;
		}
		if (run_end > end)
			run_end = end;
		struct td_request *sub = td_request_sub(child, sec, (uint32_t)(run_end - sec));

		if (sub)
			td_queue_request(upper ? s->active : s->secondary, sub);
		sec = run_end;
	}
	td_request_split_end(child);
}

/*
 * Failover and failover-failed: the SVM's writes land in active or in the
 * secondary disk (svm_write_routed), so its FLUSH goes to both.  Sent to
 * active alone (r->local), it left a write routed to the secondary disk
 * unsynced, and a power cut could lose a write the guest had been told
 * is durable (power_cut_failover_with_svm_writes found it).  Hidden gets
 * no SVM writes; the failover flushed it when it started.
 */
static void svm_flush_routed(struct sec *s, struct sec_fwd *f)
{
	struct td_request *child = &f->child;
	struct td_request *to_active, *to_secondary;

	td_request_split_begin(child);
	to_active = td_request_sub(child, 0, 0);
	if (to_active)
		td_queue_request(s->active, to_active);
	to_secondary = td_request_sub(child, 0, 0);
	if (to_secondary)
		td_queue_request(s->secondary, to_secondary);
	td_request_split_end(child);
}

static void sec_dispatch_svm(struct sec *s, struct td_request *req)
{
	struct replica *r = s->r;
	struct sec_fwd *f;
	bool modifies = op_modifies(req->op);

	if (r->state == REPLICA_STATE_NONE && req->op != TD_OP_FLUSH) {
		td_complete_request(req, -EIO);
		return;
	}
	if (s->hold_all || (s->hold_writes && modifies)) {
		hold(s, req, DOOR_SVM);
		return;
	}
	f = fwd_new(s, req, DOOR_SVM, svm_done);
	if (!f) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	s->svm_inflight++;
	if (modifies) {
		s->svm_writes_inflight++;
		/* What active holds (failover routes per chunk, see svm_write_routed). */
		if (r->state == REPLICA_STATE_RUNNING)
			replica_chunkset_set_range(&s->svm_written, req->sec, req->secs);
	}

	switch (r->state) {
	case REPLICA_STATE_NONE:
		/*
		 * No SVM yet, only a flush gets here (the one of a close or
		 * SIGTERM): it makes the secondary disk durable, what the
		 * initial sync wrote.
		 */
		td_queue_request(s->secondary, &f->child);
		return;
	case REPLICA_STATE_RUNNING:
		if (!modifies && req->op != TD_OP_FLUSH) {
			/* Reads wait for primary writes in flight on their range. */
			f->locked = true;
			replica_rlock_acquire(&s->lock, &f->range, req->sec, req->sec + req->secs,
					      false, svm_read_granted, f);
			return;
		}
		break;
	case REPLICA_STATE_FAILOVER:
	case REPLICA_STATE_FAILOVER_FAILED:
		if (modifies) {
			svm_write_routed(s, f);
			return;
		}
		if (req->op == TD_OP_FLUSH) {
			svm_flush_routed(s, f);
			return;
		}
		break;
	default:
		break;
	}
	td_queue_request(r->local, &f->child);
}

static void sec_queue_svm(struct replica *r, struct td_request *req)
{
	struct sec *s = r->mode_priv;

	if (r->state == REPLICA_STATE_FAILOVER)
		s->svm_last_ns = tdr_now_ns();
	sec_dispatch_svm(s, req);
}

/* ----------------------------------------------------- export door */

static void run_flushed(struct td_request *req, int err, void *arg)
{
	struct sec *s = arg;

	s->run_flushing = false;
	/* Nothing waits for it; the primary's own flush will report a failing disk. */
	if (err)
		TDR_WARN("replica secondary: background flush of %s failed: %s",
			 s->secondary->params, strerror(-err));
}

static void run_bgflush(struct sec *s, uint64_t bytes)
{
	s->run_unflushed += bytes;
	if (s->run_flushing || s->closing || !s->scratch || s->run_unflushed < RUN_FLUSH_BYTES)
		return;
	s->run_flushing = true;
	s->run_unflushed = 0;
	s->r->stats.run_flushes++;
	td_request_init(&s->run_flush, TD_OP_FLUSH, 0, 0, NULL, run_flushed, s);
	td_queue_request(s->secondary, &s->run_flush);
}

static void export_write_done(struct td_request *child, int err, void *arg)
{
	struct sec_fwd *f = arg;
	struct sec *s = f->s;

	if (f->locked)
		replica_rlock_release(&s->lock, &f->range);
	if (!err && f->modifies && s->r->state == REPLICA_STATE_RUNNING)
		run_bgflush(s, (uint64_t)f->req->secs << TD_SECTOR_SHIFT);
	fwd_finish(f, err);
	s->export_inflight--;
	sec_check_drained(s);
}

/*
 * Copy-before-write, for a primary write that holds its chunks exclusively
 * (so no SVM read and no other primary write sees the steps in between):
 *   1. the original content of every chunk not yet copied is read from the
 *      secondary disk;
 *   2. the copies into hidden and the primary's write into the secondary
 *      disk then go in parallel (the originals are in memory), so a write
 *      costs the slower of the two, not their sum;
 *   3. if a copy into hidden failed, the originals of those chunks are
 *      written back into the secondary disk before the primary hears of the
 *      error: the SVM's view is what it was, and get-error says what
 *      happened.
 */
static void cbw_free_all(struct sec_fwd *f)
{
	while (f->copies) {
		struct sec_copy *c = f->copies;

		f->copies = c->next;
		tdr_bufpool_put(&f->s->bufs, c->buf, c->buf_len);
		free(c);
	}
}

static void cbw_finish(struct sec_fwd *f)
{
	struct sec *s = f->s;
	int err = f->copy_err ? f->copy_err : f->child_err;

	if (f->copy_err)
		replica_set_error(s->r, f->copy_err,
				  "copy-before-write into hidden (%s) failed: %s; the primary's write at sector %llu was refused%s",
				  s->hidden->params, strerror(-f->copy_err),
				  (unsigned long long)f->req->sec,
				  f->undo_err ? " and restoring the secondary disk failed too: the SVM may read the primary's data there" :
				  "");
	cbw_free_all(f);
	export_write_done(&f->child, err, f);
}

static void cbw_undone(struct td_request *wr, int err, void *arg)
{
	struct sec_copy *c = arg;
	struct sec_fwd *f = c->f;

	(void)wr;
	if (err && !f->undo_err)
		f->undo_err = err;
	if (--f->writes_pending == 0)
		cbw_finish(f);
}

/* The copies and the write are done: undo the write where a copy failed. */
static void cbw_all_written(struct sec_fwd *f)
{
	struct sec *s = f->s;

	if (!f->copy_err) {
		cbw_finish(f);
		return;
	}
	f->writes_pending = 1;
	for (struct sec_copy *c = f->copies; c; c = c->next) {
		if (!c->err)
			continue;
		f->writes_pending++;
		td_request_init(&c->wr, TD_OP_WRITE, c->rd.sec, c->rd.secs, c->buf, cbw_undone, c);
		td_queue_request(s->secondary, &c->wr);
	}
	if (--f->writes_pending == 0)
		cbw_finish(f);
}

static void cbw_child_done(struct td_request *child, int err, void *arg)
{
	struct sec_fwd *f = arg;

	(void)child;
	f->child_err = err;
	if (--f->writes_pending == 0)
		cbw_all_written(f);
}

static void cbw_wrote(struct td_request *wr, int err, void *arg)
{
	struct sec_copy *c = arg;
	struct sec *s = c->s;
	struct sec_fwd *f = c->f;

	if (err) {
		c->err = err;
		if (!f->copy_err)
			f->copy_err = err;
	} else {
		/* Only now may later writes to the chunk skip the copy. */
		replica_chunkset_set(&s->cbw, c->first_chunk);
		s->r->stats.cbw_count++;
		s->r->stats.cbw_bytes += (uint64_t)wr->secs << TD_SECTOR_SHIFT;
	}
	if (--f->writes_pending == 0)
		cbw_all_written(f);
}

/* Every original is read (or a read failed): write them and the write itself. */
static void cbw_reads_done(struct sec_fwd *f)
{
	struct sec *s = f->s;

	if (f->copy_err) {
		/* Nothing was written anywhere. */
		cbw_finish(f);
		return;
	}
	if (!f->copies) {
		td_queue_request(s->secondary, &f->child);
		return;
	}
	f->writes_pending = 2;
	for (struct sec_copy *c = f->copies; c; c = c->next) {
		f->writes_pending++;
		td_request_init(&c->wr, TD_OP_WRITE, c->rd.sec, c->rd.secs, c->buf, cbw_wrote, c);
		td_queue_request(s->hidden, &c->wr);
	}
	f->child.cb = cbw_child_done;
	td_queue_request(s->secondary, &f->child);
	if (--f->writes_pending == 0)
		cbw_all_written(f);
}

static void cbw_read(struct td_request *rd, int err, void *arg)
{
	struct sec_copy *c = arg;
	struct sec_fwd *f = c->f;

	(void)rd;
	if (err && !f->copy_err)
		f->copy_err = err;
	if (--f->copies_pending == 0)
		cbw_reads_done(f);
}

/*
 * A copy of chunks [first, first + n), clipped at the end of the disk, with
 * its buffer from the pool; NULL when out of memory.  Copy-before-write and
 * the failover's commit both copy whole chunks this way.
 */
static struct sec_copy *sec_copy_new(struct sec *s, uint64_t first, uint64_t n)
{
	uint64_t sec = first * s->chunk_secs, secs = n * s->chunk_secs;
	struct sec_copy *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	if (sec + secs > s->secondary->size_secs)
		secs = s->secondary->size_secs - sec;
	c->buf_len = (size_t)secs << TD_SECTOR_SHIFT;
	c->buf = tdr_bufpool_get(&s->bufs, c->buf_len);
	if (!c->buf) {
		free(c);
		return NULL;
	}
	c->s = s;
	c->first_chunk = first;
	c->nchunks = n;
	return c;
}

/* The sectors a copy covers. */
static uint64_t sec_copy_sec(const struct sec_copy *c)
{
	return c->first_chunk * c->s->chunk_secs;
}

static uint32_t sec_copy_secs(const struct sec_copy *c)
{
	return (uint32_t)(c->buf_len >> TD_SECTOR_SHIFT);
}

/* Reads the original of chunk before f's write may go on. */
static void cbw_copy(struct sec *s, struct sec_fwd *f, uint64_t chunk)
{
	struct sec_copy *c = sec_copy_new(s, chunk, 1);

	if (!c) {
		if (!f->copy_err)
			f->copy_err = -ENOMEM;
		return;
	}
	c->f = f;
	c->next = f->copies;
	f->copies = c;
	f->copies_pending++;
	td_request_init(&c->rd, TD_OP_READ, sec_copy_sec(c), sec_copy_secs(c), c->buf, cbw_read, c);
	td_queue_request(s->secondary, &c->rd);
}

static void export_granted(struct replica_range *rr, void *arg)
{
	struct sec_fwd *f = arg;
	struct sec *s = f->s;
	uint64_t first = f->req->sec / s->chunk_secs;
	uint64_t last = (f->req->sec + f->req->secs - 1) / s->chunk_secs;

	/* Guard: the write may not start while copies are being issued. */
	f->copies_pending = 1;
	for (uint64_t c = first; c <= last && !f->copy_err; c++)
		if (!replica_chunkset_test(&s->cbw, c))
			cbw_copy(s, f, c);
	if (--f->copies_pending == 0)
		cbw_reads_done(f);
}

static void sec_dispatch_export(struct sec *s, struct td_request *req)
{
	struct replica *r = s->r;
	struct sec_fwd *f;

	switch (r->state) {
	case REPLICA_STATE_NONE:
		/*
		 * Before start: the initial sync fills the secondary disk
		 * directly.  While start empties active and hidden, its
		 * writes wait: one landing after the switch to running would
		 * change the SVM's view with nothing copied into hidden.
		 */
		if (s->hold_all) {
			hold(s, req, DOOR_EXPORT);
			return;
		}
		break;
	case REPLICA_STATE_RUNNING:
		if (s->hold_all) {
			hold(s, req, DOOR_EXPORT);
			return;
		}
		break;
	default:
		if (op_modifies(req->op)) {
			TDR_WARN("replica secondary: refusing a write from the primary in state %s",
				 replica_state_name(r->state));
			td_complete_request(req, -EPERM);
			return;
		}
		break;
	}

	f = fwd_new(s, req, DOOR_EXPORT, export_write_done);
	if (!f) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	s->export_inflight++;
	if (op_modifies(req->op)) {
		r->stats.export_reqs++;
		r->stats.export_bytes += (uint64_t)req->secs << TD_SECTOR_SHIFT;
	}
	if (r->state == REPLICA_STATE_RUNNING && op_modifies(req->op)) {
		uint64_t start = req->sec / s->chunk_secs * s->chunk_secs;
		uint64_t end = (req->sec + req->secs + s->chunk_secs - 1) / s->chunk_secs * s->chunk_secs;

		f->locked = true;
		replica_rlock_acquire(&s->lock, &f->range, start, end, true, export_granted, f);
		return;
	}
	if (req->op == TD_OP_FLUSH && !s->scratch) {
		/* The primary's flush covers what it wrote and what we copied for it. */
		f->child.cb = export_flush_hidden_done;
		td_queue_request(s->hidden, &f->child);
		return;
	}
	td_queue_request(s->secondary, &f->child);
}

static void export_queue(struct td_image *img, struct td_request *req)
{
	sec_dispatch_export(img->priv, req);
}

static int export_open(struct td_image *img, const char *params, unsigned flags)
{
	return -EINVAL;	/* never opened from a spec */
}

static void export_close(struct td_image *img)
{
}

static const struct td_driver sec_export_drv = {
	.name = "replica-export",
	.open = export_open,
	.close = export_close,
	.queue_read = export_queue,
	.queue_write = export_queue,
	.queue_flush = export_queue,
	.queue_discard = export_queue,
	.queue_block_status = export_queue,
};

/* A FLUSH from the primary: hidden first, then the secondary disk. */
static void export_flush_hidden_done(struct td_request *child, int err, void *arg)
{
	struct sec_fwd *f = arg;

	if (err) {
		export_write_done(child, err, f);
		return;
	}
	f->child.cb = export_write_done;
	td_queue_request(f->s->secondary, &f->child);
}

/* ------------------------------------------------------ drain, empty */

static bool sec_is_drained(const struct sec *s)
{
	if (s->hold_all && (s->svm_inflight || s->export_inflight))
		return false;
	if (s->hold_writes && !s->hold_all && s->svm_writes_inflight)
		return false;
	return true;
}

static void sec_drained_deferred(void *arg)
{
	struct sec *s = arg;
	void (*cb)(struct sec *) = s->drained;

	/* Not drained any more: the completion that drains it checks again. */
	if (!cb || !sec_is_drained(s))
		return;
	s->drained = NULL;
	cb(s);
}

/*
 * Nothing we wait for is in flight: run what waits for that, but from the
 * event loop, never inside the completion that got us here.  The drivers
 * below may still be unwinding it (a VHD bitmap load completes every read
 * that waited for it, holding the bitmap until the last one), and what
 * waits may be a make-empty that frees their state: run inline, a
 * checkpoint with reads in flight freed a bitmap still in use.
 */
static void sec_check_drained(struct sec *s)
{
	if (!s->drained || !sec_is_drained(s))
		return;
	tdr_loop_defer(s->r->img->loop, &s->drain_defer);
}

/*
 * Operations call this, not completions: when nothing is in flight, cb
 * runs at once (a status read right after the operation sees its effect);
 * otherwise the last completion schedules it (sec_check_drained).
 */
static void wait_drained(struct sec *s, void (*cb)(struct sec *))
{
	if (sec_is_drained(s)) {
		cb(s);
		return;
	}
	s->drained = cb;
}

static void record_checkpoint_time(struct sec *s)
{
	struct replica_stats *st = &s->r->stats;
	uint64_t ns = tdr_now_ns() - s->op_start_ns;

	st->checkpoints++;
	st->ckpt_last_ns = ns;
	st->ckpt_total_ns += ns;
	if (ns > st->ckpt_max_ns)
		st->ckpt_max_ns = ns;
}

/*
 * While running, the secondary disk's allocations sync (ordered mode, if
 * it is a VHD): without those syncs the file system's write-back of the
 * primary's new blocks piled up for the background flush, and a
 * checkpoint's make-empty of active and hidden queued behind it (p99 of
 * 64 MiB written 18-32 ms against 0.8-0.9 ms; docs/benchmarks.md).  Not
 * started or failing over, nothing waits on a checkpoint: new blocks go
 * the fast way.
 */
static void sec_set_running_io(struct sec *s, bool running)
{
	(void)vhd_image_set_ordered(s->secondary, running);
}

static void sec_set_scratch(struct sec *s, bool on)
{
	/* Cannot fail: sec_init checked that both are dynamic or differencing VHDs. */
	(void)vhd_image_set_scratch(s->active, on);
	(void)vhd_image_set_scratch(s->hidden, on);
	s->scratch = on;
}

static void empty_finished(struct sec *s)
{
	struct replica *r = s->r;
	int err = s->empty_err;

	replica_chunkset_clear_all(&s->cbw);
	replica_chunkset_clear_all(&s->svm_written);
	s->hold_all = false;
	if (err) {
		replica_set_error(r, err, "make-empty of %s failed: %s; the SVM's disk may be inconsistent until the next checkpoint",
				  s->empty_what, strerror(-err));
	}
	if (s->stop_after_empty) {
		sec_set_scratch(s, false);
		sec_set_running_io(s, false);
		replica_set_state(r, REPLICA_STATE_NONE);
	} else if (r->state == REPLICA_STATE_NONE) {
		/* start */
		if (!err) {
			sec_set_scratch(s, !r->opts.scratch_off);
			sec_set_running_io(s, true);
			replica_set_state(r, REPLICA_STATE_RUNNING);
		}
	} else {
		record_checkpoint_time(s);
		replica_notify(r);
	}
	release_held(s);
	if (err)
		replica_op_done(r, err, "make-empty of %s failed: %s", s->empty_what, strerror(-err));
	else
		replica_op_done(r, 0, "%s", "");
}

static void empty_done(struct sec *s, int err, const char *what)
{
	if (err && !s->empty_err) {
		s->empty_err = err;
		s->empty_what = what;
	}
	if (--s->empty_pending == 0)
		empty_finished(s);
}

static void empty_active_done(void *arg, int err)
{
	struct sec *s = arg;

	empty_done(s, err, s->active->params);
}

static void empty_hidden_done(void *arg, int err)
{
	struct sec *s = arg;

	empty_done(s, err, s->hidden->params);
}

/* Nothing in flight at either door: empty active and hidden together. */
static void empty_both(struct sec *s)
{
	s->empty_err = 0;
	s->empty_what = "";
	s->empty_pending = 2;
	vhd_image_make_empty(s->active, empty_active_done, s);
	vhd_image_make_empty(s->hidden, empty_hidden_done, s);
}

/* ---------------------------------------------------------- failover */

static void fo_release_done(struct sec *s)
{
	struct replica *r = s->r;

	if (s->fo_final)
		r->stats.fo_hold_ns = tdr_now_ns() - s->fo_hold_start_ns;
	s->hold_writes = false;
	s->fo_final = false;
	s->fo_flushing = false;
	release_held(s);
	replica_notify(r);
}

/*
 * The secondary disk is flushed before the switch: the failover is done
 * only when what it committed is durable, and no request of ours is left
 * in flight for whoever closes the disk afterwards.
 */
static void fo_flushed(struct td_request *req, int err, void *arg)
{
	struct sec *s = arg;
	struct replica *r = s->r;

	if (err) {
		s->fo_err = err;
		replica_set_state(r, REPLICA_STATE_FAILOVER_FAILED);
		replica_set_error(r, err, "failover: flushing the secondary disk %s failed: %s; nothing is lost, retry with failover",
				  s->secondary->params, strerror(-err));
		fo_release_done(s);
		return;
	}
	r->local = s->secondary;
	r->progress_done = r->progress_total;
	replica_set_state(r, REPLICA_STATE_DONE);
	TDR_INFO("replica secondary: failover done; serving %s directly", s->secondary->params);
	tdr_bufpool_fini(&s->bufs);	/* no more copies */
	/*
	 * Active and hidden stay as they are: reads issued before the switch
	 * may still be in flight through them, and nothing reads them later.
	 */
	fo_release_done(s);
}

/* Nothing left to copy and no SVM write in flight: make it durable, then switch. */
static void fo_switch_done(struct sec *s)
{
	s->fo_flushing = true;
	td_request_init(&s->fo_flush, TD_OP_FLUSH, 0, 0, NULL, fo_flushed, s);
	td_queue_request(s->secondary, &s->fo_flush);
}

/*
 * The end of the copy in flight that covers chunk c, or 0 for none.  Two
 * copies of one chunk must never be in flight together: the older one,
 * which read the chunk before an SVM write to it, could land last and
 * put the old data back.  A chunk an SVM write marks again while its
 * copy runs waits for that copy (fo_copy_next).
 */
static uint64_t fo_copying(const struct sec *s, uint64_t c)
{
	for (const struct sec_copy *k = s->fo_inflight; k; k = k->next)
		if (c >= k->first_chunk && c < k->first_chunk + k->nchunks)
			return k->first_chunk + k->nchunks;
	return 0;
}

static void fo_unlink(struct sec *s, struct sec_copy *c)
{
	struct sec_copy **pp = &s->fo_inflight;

	while (*pp && *pp != c)
		pp = &(*pp)->next;
	if (*pp)
		*pp = c->next;
}

static void fo_copy_wrote(struct td_request *wr, int err, void *arg)
{
	struct sec_copy *c = arg;
	struct sec *s = c->s;
	struct replica *r = s->r;

	fo_unlink(s, c);
	if (err) {
		if (!s->fo_err)
			s->fo_err = err;
		/* Not copied: it must be copied by a retry. */
		for (uint64_t i = 0; i < c->nchunks; i++)
			replica_chunkset_set(&s->fo_dirty, c->first_chunk + i);
	} else {
		uint64_t bytes = (uint64_t)c->wr.secs << TD_SECTOR_SHIFT;

		s->fo_copied += bytes;
		s->fo_unflushed += bytes;
		r->progress_done += bytes;
		if (r->progress_done > r->progress_total)
			r->progress_done = r->progress_total;
		replica_notify(r);
	}
	tdr_bufpool_put(&s->bufs, c->buf, c->buf_len);
	s->fo_bytes_inflight -= c->buf_len;
	free(c);
	s->fo_copies--;
	fo_pump(s);
}

static void fo_copy_read(struct td_request *rd, int err, void *arg)
{
	struct sec_copy *c = arg;

	if (err) {
		fo_copy_wrote(&c->wr, err, c);
		return;
	}
	td_request_init(&c->wr, TD_OP_WRITE, rd->sec, rd->secs, c->buf, fo_copy_wrote, c);
	td_queue_request(c->s->secondary, &c->wr);
}

/* How many whole chunks fit in bytes, at least one. */
static uint64_t chunks_in(const struct sec *s, uint64_t bytes)
{
	uint64_t n = bytes / ((uint64_t)s->chunk_secs << TD_SECTOR_SHIFT);

	return n ? n : 1;
}

/* The SVM sent a request lately (the last phase, which holds its writes, does not count). */
static bool fo_svm_busy(const struct sec *s)
{
	return !s->fo_final &&
	       (s->svm_inflight || tdr_now_ns() - s->svm_last_ns < FO_SVM_QUIET_NS);
}

/*
 * How many chunks the next copy may take (at most FO_RUN_CHUNKS), 0 for
 * none now.  The SVM comes first (FO_SVM_BYTES); the last phase, which
 * holds SVM writes, goes full speed.
 */
static uint64_t fo_copy_budget(const struct sec *s)
{
	uint64_t chunk = (uint64_t)s->chunk_secs << TD_SECTOR_SHIFT;
	bool busy = fo_svm_busy(s);
	uint64_t budget = busy ? FO_SVM_BYTES : FO_MAX_BYTES;
	uint64_t run = busy ? chunks_in(s, FO_SVM_BYTES) : FO_RUN_CHUNKS;

	if (run > FO_RUN_CHUNKS)
		run = FO_RUN_CHUNKS;
	if (s->fo_copies >= FO_MAX_COPIES)
		return 0;
	if (!s->fo_copies)
		return run;
	if (s->fo_bytes_inflight + chunk > budget)
		return 0;
	budget = (budget - s->fo_bytes_inflight) / chunk;
	return budget < run ? budget : run;
}

/* The first chunk from `from` on that is dirty and not being copied. */
static bool fo_next_idle(const struct sec *s, uint64_t from, uint64_t *first)
{
	uint64_t end;

	while (replica_chunkset_next(&s->fo_dirty, from, first)) {
		end = fo_copying(s, *first);
		if (!end)
			return true;
		from = end;
	}
	return false;
}

/* Takes the next run of dirty chunks and copies the SVM's view of it. */
static bool fo_copy_next(struct sec *s, uint64_t max_chunks)
{
	uint64_t first, n = 1;
	struct sec_copy *c;

	if (!fo_next_idle(s, s->fo_cursor, &first) && !fo_next_idle(s, 0, &first))
		return false;
	while (n < max_chunks && replica_chunkset_test(&s->fo_dirty, first + n) &&
	       !fo_copying(s, first + n))
		n++;
	if (!(c = sec_copy_new(s, first, n))) {
		if (!s->fo_err)
			s->fo_err = -ENOMEM;
		return false;
	}
	for (uint64_t i = 0; i < n; i++)
		replica_chunkset_clear(&s->fo_dirty, first + i);
	s->fo_cursor = first + n;
	c->next = s->fo_inflight;
	s->fo_inflight = c;
	s->fo_copies++;
	s->fo_bytes_inflight += c->buf_len;
	if (fo_svm_busy(s) && s->fo_bytes_inflight > s->r->stats.fo_svm_peak_bytes)
		s->r->stats.fo_svm_peak_bytes = s->fo_bytes_inflight;
	/* A read through active is the SVM's view: active over hidden over secondary. */
	td_request_init(&c->rd, TD_OP_READ, sec_copy_sec(c), sec_copy_secs(c), c->buf, fo_copy_read, c);
	td_queue_request(s->active, &c->rd);
	return true;
}

static void fo_preflushed(struct td_request *req, int err, void *arg)
{
	struct sec *s = arg;

	s->fo_preflushing = false;
	if (err && !s->fo_err)
		s->fo_err = err;
	s->fo_preflushed = true;
	fo_pump(s);
}

/*
 * Before the last phase holds SVM writes, flush what the commit wrote so
 * far, while the SVM runs: the flush that ends the last phase then covers
 * only its few chunks, not the whole commit (measured with SVM I/O going
 * on: 120-270 ms for the whole commit, all of it a stall for SVM writes;
 * under 3 ms after this flush).
 */
static void fo_preflush(struct sec *s)
{
	if (s->fo_preflushing)
		return;
	s->fo_preflushing = true;
	s->fo_unflushed = 0;
	td_request_init(&s->fo_flush, TD_OP_FLUSH, 0, 0, NULL, fo_preflushed, s);
	td_queue_request(s->secondary, &s->fo_flush);
}

static void fo_bgflushed(struct td_request *req, int err, void *arg)
{
	struct sec *s = arg;

	s->fo_bgflushing = false;
	if (err && !s->fo_err)
		s->fo_err = err;
	fo_pump(s);
}

static void fo_chainflushed(struct td_request *req, int err, void *arg)
{
	struct sec *s = arg;

	s->fo_chainflushing--;
	if (err) {
		TDR_ERR("replica secondary: failover: flushing %s failed: %s",
			req == &s->fo_chainflush[0] ? s->active->params : s->hidden->params,
			strerror(-err));
		if (!s->fo_err)
			s->fo_err = err;
	}
	fo_pump(s);
}

/*
 * Out of scratch mode (fo_begin), what active and hidden hold is made
 * durable: the SVM's view must survive a crash of the host from now on.
 * The commit runs meanwhile (it only reads them); the failover ends after
 * this.
 */
static void fo_chainflush(struct sec *s)
{
	struct td_image *imgs[2] = { s->active, s->hidden };

	s->fo_chainflushing = 2;
	for (int i = 0; i < 2; i++) {
		td_request_init(&s->fo_chainflush[i], TD_OP_FLUSH, 0, 0, NULL, fo_chainflushed, s);
		td_queue_request(imgs[i], &s->fo_chainflush[i]);
	}
}

static void fo_bgflush(struct sec *s)
{
	if (s->fo_bgflushing || s->fo_preflushing || s->fo_final ||
	    s->fo_unflushed < (fo_svm_busy(s) ? FO_SVM_FLUSH_BYTES : FO_FLUSH_BYTES))
		return;
	s->fo_bgflushing = true;
	s->fo_unflushed = 0;
	s->r->stats.fo_flushes++;
	td_request_init(&s->fo_bgflush, TD_OP_FLUSH, 0, 0, NULL, fo_bgflushed, s);
	td_queue_request(s->secondary, &s->fo_bgflush);
}

static void fo_pump(struct sec *s)
{
	struct replica *r = s->r;

	/*
	 * Not before fo_begin: an SVM write completing while the primary's
	 * writes drain would find fo_dirty holding its own chunks only (and,
	 * in a retry, the last attempt's fo_err and fo_preflushed), and the
	 * failover would switch to done without the rest of active and
	 * hidden.
	 */
	if (r->state != REPLICA_STATE_FAILOVER || s->fo_draining)
		return;
	if (s->closing && !s->fo_err)
		s->fo_err = -ECANCELED;
	if (!s->fo_final && !s->fo_err &&
	    (replica_chunkset_count(&s->fo_dirty) <= chunks_in(s, FO_FINAL_BYTES) ||
	     s->fo_copied > 2 * r->progress_total)) {
		if (!s->fo_preflushed) {
			fo_preflush(s);
		} else {
			/* The last phase: SVM writes wait (reads go on) while the rest is copied. */
			s->fo_final = true;
			s->hold_writes = true;
			s->fo_hold_start_ns = tdr_now_ns();
		}
	}
	for (uint64_t n; !s->fo_err && (n = fo_copy_budget(s)) && fo_copy_next(s, n);)
		;
	fo_bgflush(s);
	if (s->fo_copies || s->fo_preflushing || s->fo_bgflushing || s->fo_chainflushing)
		return;
	if (s->fo_err) {
		replica_set_state(r, REPLICA_STATE_FAILOVER_FAILED);
		if (s->fo_err == -ECANCELED && s->closing)
			/* Short: the two paths must fit in REPLICA_MSG_MAX. */
			replica_set_error(r, s->fo_err, "failover interrupted by a close; nothing is lost: reopen the disk and run failover again (it resumes online), or commit offline with vhd-util coalesce -n %s, then -n %s",
					  s->active->params, s->hidden->params);
		else
			replica_set_error(r, s->fo_err, "failover commit into %s failed: %s; the SVM keeps running on active/hidden, nothing is lost; retry with failover",
					  s->secondary->params, strerror(-s->fo_err));
		fo_release_done(s);
		return;
	}
	/* SVM writes still in flight mark their chunks when they complete, and pump again. */
	if (!s->fo_final || s->fo_flushing || s->svm_writes_inflight ||
	    replica_chunkset_count(&s->fo_dirty))
		return;
	fo_switch_done(s);
}

static void fo_snapshot(struct sec *s)
{
	uint64_t c = 0;

	replica_chunkset_clear_all(&s->fo_dirty);
	for (uint64_t from = 0; replica_chunkset_next(&s->svm_written, from, &c); from = c + 1)
		replica_chunkset_set(&s->fo_dirty, c);
	for (uint64_t from = 0; replica_chunkset_next(&s->cbw, from, &c); from = c + 1)
		replica_chunkset_set(&s->fo_dirty, c);
}

/* The primary's writes in flight are done: what hidden holds is final. */
static void fo_begin(struct sec *s)
{
	struct replica *r = s->r;

	s->fo_draining = false;
	/* Before any SVM request is let go: from now on they write in safe mode. */
	sec_set_scratch(s, false);
	sec_set_running_io(s, false);
	s->hold_all = false;
	fo_snapshot(s);
	s->fo_err = 0;
	s->fo_cursor = 0;
	s->fo_final = false;
	s->fo_preflushed = false;
	s->fo_copied = 0;
	s->fo_unflushed = 0;
	/* Start gently: the SVM is running, whether or not it sent a request yet. */
	s->svm_last_ns = tdr_now_ns();
	r->stats.fo_flushes = 0;
	r->stats.fo_svm_peak_bytes = 0;
	r->progress_done = 0;
	r->progress_total = replica_chunkset_count(&s->fo_dirty) * ((uint64_t)s->chunk_secs << TD_SECTOR_SHIFT);
	replica_notify(r);
	TDR_INFO("replica secondary: failover: committing %llu bytes of active/hidden into %s",
		 (unsigned long long)r->progress_total, s->secondary->params);
	release_held(s);
	fo_chainflush(s);
	fo_pump(s);
}

/* ---------------------------------------------------------- operations */

static void sec_start(struct replica *r, const struct replica_cmd *cmd)
{
	struct sec *s = r->mode_priv;

	switch (r->state) {
	case REPLICA_STATE_NONE:
		break;
	case REPLICA_STATE_DONE:
		replica_op_done(r, -EINVAL, "start refused: failover is done and this disk serves the secondary disk directly; use 'start mode=primary addr=...' to protect it again");
		return;
	default:
		replica_op_done(r, -EBUSY, "start refused: the secondary is already in state %s",
				replica_state_name(r->state));
		return;
	}
	if (cmd->addr[0] || cmd->has_export || cmd->timeout_ms || cmd->sync) {
		replica_op_done(r, -EINVAL, "start refused: a secondary takes no addr/export/timeout/sync at start; they belong in its spec");
		return;
	}
	/* A clean slate: the SVM starts from the PVM's disk, the secondary disk. */
	s->op_start_ns = tdr_now_ns();
	s->stop_after_empty = false;
	s->hold_all = true;
	wait_drained(s, empty_both);
}

static void sec_checkpoint(struct replica *r)
{
	struct sec *s = r->mode_priv;

	if (r->state != REPLICA_STATE_RUNNING) {
		replica_op_done(r, r->state == REPLICA_STATE_FAILOVER ? -EBUSY : -EINVAL,
				"checkpoint refused: the secondary is in state %s%s",
				replica_state_name(r->state),
				r->state == REPLICA_STATE_NONE ? "; start it first" : "");
		return;
	}
	s->op_start_ns = tdr_now_ns();
	s->stop_after_empty = false;
	s->hold_all = true;
	wait_drained(s, empty_both);
}

static int fo_adopt_run(void *arg, uint64_t sec, uint64_t secs)
{
	struct sec *s = arg;

	replica_chunkset_set_range(&s->svm_written, sec, secs);
	return 0;
}

/* The failover proper, from running, failover-failed or an adopted chain. */
static void fo_start(struct sec *s)
{
	replica_set_state(s->r, REPLICA_STATE_FAILOVER);
	replica_op_done(s->r, 0, "%s", "");
	/* Let the primary's writes in flight finish (new ones are refused now). */
	s->fo_draining = true;
	s->hold_all = true;
	wait_drained(s, fo_begin);
}

static void fo_adopted(void *arg, int err)
{
	struct sec *s = arg;
	struct replica *r = s->r;
	uint64_t n;

	if (!err && s->adopting == 1) {
		/* Active's runs are in; now hidden's. */
		s->adopting = 2;
		vhd_image_for_each_run(s->hidden, fo_adopt_run, fo_adopted, s);
		return;
	}
	s->adopting = 0;
	n = replica_chunkset_count(&s->svm_written);
	if (err) {
		replica_chunkset_clear_all(&s->svm_written);
		replica_op_done(r, err, "failover refused: cannot list what active and hidden hold: %s",
				err == -EINVAL ? tdr_last_error() : strerror(-err));
	} else if (s->closing) {
		replica_chunkset_clear_all(&s->svm_written);
		replica_op_done(r, -ESHUTDOWN, "failover refused: the disk is closing");
	} else if (!n) {
		replica_op_done(r, -EINVAL, "failover refused: the secondary is in state none; nothing to fail over, it never started and active and hidden are empty");
	} else {
		TDR_INFO("replica secondary: failover in state none: committing what active and hidden hold (%llu chunks), as a failover interrupted by a restart would have",
			 (unsigned long long)n);
		fo_start(s);
	}
}

/*
 * A failover asked in state none: the chain was opened with what active and
 * hidden held, after a restart that cut a failover (or replication) short;
 * this process never tracked it.  Their bitmaps say which sectors they hold
 * (read in the background: SVM I/O is refused in state none, so nothing
 * writes to them meanwhile); every chunk those touch counts as held, so the
 * SVM's writes to it go to active and the commit copies it.  Whatever the
 * rest of such a chunk, the copy is the SVM's view of it: correct, at the
 * cost of copying a little more than was written.
 */
static void fo_adopt_chain(struct sec *s)
{
	replica_chunkset_clear_all(&s->svm_written);
	replica_chunkset_clear_all(&s->cbw);
	s->adopting = 1;
	vhd_image_for_each_run(s->active, fo_adopt_run, fo_adopted, s);
}

static void sec_stop(struct replica *r, bool failover)
{
	struct sec *s = r->mode_priv;

	if (!failover) {
		if (r->state != REPLICA_STATE_RUNNING) {
			replica_op_done(r, r->state == REPLICA_STATE_FAILOVER ? -EBUSY : -EINVAL,
					"stop refused: the secondary is in state %s%s",
					replica_state_name(r->state),
					r->state == REPLICA_STATE_FAILOVER_FAILED ?
					"; retry with failover" : "");
			return;
		}
		/* Like a checkpoint, then no SVM: the secondary disk is the PVM's. */
		s->op_start_ns = tdr_now_ns();
		s->stop_after_empty = true;
		s->hold_all = true;
		wait_drained(s, empty_both);
		return;
	}
	if (r->state == REPLICA_STATE_NONE) {
		fo_adopt_chain(s);
		return;
	}
	if (r->state != REPLICA_STATE_RUNNING && r->state != REPLICA_STATE_FAILOVER_FAILED) {
		replica_op_done(r, r->state == REPLICA_STATE_FAILOVER ? -EBUSY : -EINVAL,
				"failover refused: the secondary is in state %s%s",
				replica_state_name(r->state),
				r->state == REPLICA_STATE_DONE ? "; failover is already done" : "");
		return;
	}
	fo_start(s);
}

static void sec_srv_stopped(void *arg)
{
	struct sec *s = arg;

	s->srv_stopped = true;
}

/*
 * Closing (or becoming a primary): the export stops taking the primary's
 * requests, and a failover in progress stops copying and fails (active
 * and hidden keep the SVM's view).  A checkpoint in progress finishes.
 */
static void sec_quiesce(struct replica *r)
{
	struct sec *s = r->mode_priv;

	if (!s || s->closing)
		return;
	s->closing = true;
	if (s->srv)
		nbd_server_shutdown(s->srv, sec_srv_stopped, s);
	else
		s->srv_stopped = true;
	fo_pump(s);
}

static uint64_t sec_busy(struct replica *r)
{
	struct sec *s = r->mode_priv;

	if (!s)
		return 0;
	/* The export's requests, held ones included, and our own. */
	return (s->srv && !s->srv_stopped) + s->export_disk->inflight + (s->drained != NULL) +
	       s->fo_copies + s->fo_preflushing + s->fo_bgflushing + s->fo_chainflushing +
	       s->fo_flushing + s->run_flushing + (s->adopting != 0) +
	       (uint64_t)(s->empty_pending > 0 ? s->empty_pending : 0);
}

static void sec_debug(struct replica *r, FILE *out)
{
	struct sec *s = r->mode_priv;

	fprintf(out, "    secondary: active=%s hidden=%s secondary=%s chunk=%u cbw=%llu svm_written=%llu fo_dirty=%llu in_flight svm=%llu export=%llu\n",
		s->active->params, s->hidden->params, s->secondary->params, s->chunk_secs * 512,
		(unsigned long long)replica_chunkset_count(&s->cbw),
		(unsigned long long)replica_chunkset_count(&s->svm_written),
		(unsigned long long)replica_chunkset_count(&s->fo_dirty),
		(unsigned long long)s->svm_inflight, (unsigned long long)s->export_inflight);
}

/* -------------------------------------------------------- init, fini */

/* active and hidden must be VHDs that make-empty can drop: dynamic or differencing. */
static int check_emptiable(struct td_image *img, const char *role)
{
	struct vhd_file *vf = NULL;
	struct vhd_error verr;
	uint32_t type;
	int err;

	if (strcmp(img->drv->name, "vhd") != 0) {
		tdr_set_error("replica secondary: %s %s:%s is not a VHD; %s must be a VHD differencing disk (vhd-util snapshot) so that it can be emptied at checkpoints",
			      role, img->drv->name, img->params, role);
		return -EINVAL;
	}
	memset(&verr, 0, sizeof(verr));
	err = vhd_file_open(&vf, img->params, VHD_FILE_RDONLY, &verr);
	if (err < 0) {
		tdr_set_error("replica secondary: %s %s: cannot read its VHD metadata: %s",
			      role, img->params, strerror(-err));
		return err;
	}
	type = vf->m.footer.type;
	vhd_file_close(vf);
	if (type != VHD_TYPE_DYNAMIC && type != VHD_TYPE_DIFF) {
		tdr_set_error("replica secondary: %s %s is a fixed VHD and cannot be emptied; make it a differencing disk (vhd-util snapshot)",
			      role, img->params);
		return -EINVAL;
	}
	return 0;
}

static int start_export_server(struct sec *s)
{
	struct replica *r = s->r;
	const char *addr = r->opts.addr;
	char host[REPLICA_ADDR_MAX];
	const char *port;
	int err;

	if (!addr[0])
		return 0;
	s->srv = nbd_server_new(r->img->loop);
	if (!s->srv)
		return -ENOMEM;
	err = nbd_server_add_export(s->srv, r->opts.export_name,
				    "tapdisk-replica secondary disk (writes from the primary)",
				    s->export_disk, false);
	if (err < 0)
		return err;
	if (r->opts.tls != NBD_TLS_OFF) {
		/* The same options as a primary's link, seen from the server's side. */
		struct nbd_tls_config tls = {
			.mode = r->opts.tls,
			.psk_file = r->opts.tls_psk,
			.certificates = r->opts.tls_certificates,
			.verify_peer = r->opts.tls_certificates[0] && !r->opts.tls_no_verify,
		};

		err = nbd_server_set_tls(s->srv, &tls);
		if (err < 0)
			return err;
	}
	if (strncmp(addr, "unix:", 5) == 0)
		return nbd_server_listen_unix(s->srv, addr + 5);
	/* tcp:HOST:PORT, HOST may be an IPv6 literal in brackets */
	snprintf(host, sizeof(host), "%s", addr + 4);
	char *colon = strrchr(host, ':');

	*colon = '\0';
	port = colon + 1;
	if (host[0] == '[' && host[strlen(host) - 1] == ']') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
	}
	return nbd_server_listen_tcp(s->srv, host, port);
}

static void sec_fini(struct replica *r)
{
	struct sec *s = r->mode_priv;

	if (!s)
		return;
	tdr_loop_cancel_defer(r->img->loop, &s->drain_defer);
	if (s->srv)
		nbd_server_free(s->srv);
	td_disk_close(s->export_disk);
	replica_chunkset_free(&s->cbw);
	replica_chunkset_free(&s->svm_written);
	replica_chunkset_free(&s->fo_dirty);
	tdr_bufpool_fini(&s->bufs);
	free(s);
	r->mode_priv = NULL;
}

static int sec_init(struct replica *r)
{
	struct td_image *img = r->img;
	struct sec *s;
	int err;

	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	r->mode_priv = s;
	s->r = r;
	s->chunk_secs = r->opts.cbw_secs;
	tdr_bufpool_init(&s->bufs, SEC_BUFS_IDLE);
	replica_rlock_init(&s->lock);
	tdr_list_init(&s->held);
	tdr_defer_init(&s->drain_defer, sec_drained_deferred, s);

	s->active = img->parent;
	s->hidden = s->active ? s->active->parent : NULL;
	s->secondary = s->hidden ? s->hidden->parent : NULL;
	if (!s->hidden || !s->secondary) {
		tdr_set_error("replica secondary: the chain under the filter is too short (%s%s%s); it must be active over hidden over the secondary disk (vhd-util snapshot twice)",
			      s->active ? s->active->params : "nothing",
			      s->hidden ? " over " : "", s->hidden ? s->hidden->params : "");
		err = -EINVAL;
		goto fail;
	}
	if ((err = check_emptiable(s->active, "active")) < 0 ||
	    (err = check_emptiable(s->hidden, "hidden")) < 0)
		goto fail;
	if (s->active->size_secs != s->hidden->size_secs ||
	    s->hidden->size_secs != s->secondary->size_secs) {
		tdr_set_error("replica secondary: virtual sizes differ: active %llu, hidden %llu, secondary %llu bytes; all three must be equal",
			      (unsigned long long)s->active->size_secs << TD_SECTOR_SHIFT,
			      (unsigned long long)s->hidden->size_secs << TD_SECTOR_SHIFT,
			      (unsigned long long)s->secondary->size_secs << TD_SECTOR_SHIFT);
		err = -EINVAL;
		goto fail;
	}
	if ((err = replica_chunkset_init(&s->cbw, s->secondary->size_secs, s->chunk_secs)) < 0 ||
	    (err = replica_chunkset_init(&s->svm_written, s->secondary->size_secs, s->chunk_secs)) < 0 ||
	    (err = replica_chunkset_init(&s->fo_dirty, s->secondary->size_secs, s->chunk_secs)) < 0)
		goto fail;

	s->export_img.drv = &sec_export_drv;
	s->export_img.params = s->secondary->params;
	s->export_img.size_secs = s->secondary->size_secs;
	s->export_img.loop = img->loop;
	s->export_img.io = img->io;
	s->export_img.priv = s;
	err = td_disk_wrap(&s->export_disk, &s->export_img, r->opts.export_name);
	if (err < 0)
		goto fail;
	err = start_export_server(s);
	if (err < 0) {
		if (!*tdr_last_error())
			tdr_set_error("replica secondary: cannot serve the export at %s: %s",
				      r->opts.addr, strerror(-err));
		goto fail;
	}
	return 0;

fail:
	sec_fini(r);
	return err;
}

struct td_disk *replica_export_disk(struct td_image *img)
{
	struct replica *r = img->priv;

	if (r->opts.mode != REPLICA_MODE_SECONDARY || !r->mode_priv)
		return NULL;
	return ((struct sec *)r->mode_priv)->export_disk;
}

const char *replica_export_name(struct td_image *img)
{
	struct replica *r = img->priv;

	return r->opts.export_name;
}

const struct replica_mode_ops replica_secondary_ops = {
	.name = "secondary",
	.init = sec_init,
	.fini = sec_fini,
	.queue_read = sec_queue_svm,
	.queue_write = sec_queue_svm,
	.queue_other = sec_queue_svm,
	.start = sec_start,
	.checkpoint = sec_checkpoint,
	.stop = sec_stop,
	.quiesce = sec_quiesce,
	.busy = sec_busy,
	.debug = sec_debug,
};
