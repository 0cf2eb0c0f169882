/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The replica driver's primary mode: guest writes go to the local image
 * and, at the same time, over the link to the secondary's NBD export.
 *
 * The rule everything here serves: a broken link never fails or stalls
 * guest I/O for longer than the link's timeout.  When the link breaks
 * (error, timeout, peer gone) the guest goes on with the local image and
 * every range written from then on - and every write that was in flight to
 * the secondary - is recorded in the dirty set, so an incremental resync
 * can bring the secondary back.
 *
 * States: none -> (start) running; running -> broken (link lost, or a
 * local write failed after the secondary took it); broken/none/done ->
 * (resync) resync -> running; any -> (stop, failover) done.  A start from
 * broken or done only connects: the secondary lacks changes, so the state
 * stays broken until a resync.
 *
 * Ordering.  Overlapping writes are serialized with the range lock: a
 * write holds its range exclusively until both halves are done, so the
 * secondary applies overlapping writes in the primary's order (an NBD
 * server may execute requests in flight in any order).  Resync copies
 * take the same lock, so a guest write and the copy of the same range
 * never cross.
 *
 * The checkpoint barrier: every write sent to the secondary gets a
 * sequence number; the barrier waits (on the loop) until no write older
 * than the barrier is outstanding, then sends NBD FLUSH.  Younger writes
 * neither join nor delay it.
 *
 * What a broken link may have lost: an acknowledged write is only durable
 * on the secondary after the next FLUSH, and a secondary that crashed (or
 * a machine that rebooted) may have dropped it.  So every range sent is
 * also recorded in the "unflushed" set; a successful checkpoint forgets
 * what its FLUSH covered, and when the link goes away the unflushed set
 * joins the dirty set.  Two generations: at the FLUSH, the current set
 * becomes the one the FLUSH covers, and the writes still in flight (not
 * covered) start the next.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "replica-int.h"
#include "replica-link.h"
#include "tdr/log.h"

#define DIRTY_CHUNK_SECS 128u		/* 64 KiB: the dirty set's granularity */
#define COPY_SECS        2048u		/* 1 MiB per resync copy */
#define HOLE_MAX_SECS    (128u << 11)	/* 128 MiB per resync zeroing */
#define SCAN_SECS        (1u << 21)	/* 1 GiB per block-status query */
#define RESYNC_DEPTH     32u		/* resync copies in flight */
/*
 * sync=local: writes in flight to the secondary that the guest does not
 * wait for are bounded in bytes (REPLICA_LOCAL_AHEAD_BYTES, the copies'
 * memory) and in requests (REPLICA_LOCAL_AHEAD_REQS): libnbd looks up each
 * reply in a list of the commands in flight, so 4,096 small writes in
 * flight made every reply a long walk (4 KiB writes into a fast secondary
 * fell from 20,000 to 7,500 IOPS).
 */

struct primary;

/* One guest write, write-zeroes or discard. */
struct pwrite {
	struct primary *p;
	struct td_request *req;		/* the guest's; gone once guest_done (sync=local) */
	uint64_t sec;			/* the range, which outlives req */
	uint32_t secs;
	struct td_request lreq;		/* our half on the local image */
	struct replica_link_req lr;	/* our half on the secondary */
	struct replica_range range;
	struct tdr_list entry;		/* primary.rinflight, by seq */
	uint64_t seq;
	enum td_op op;			/* what both halves do */
	unsigned flags;
	char *copy;			/* what the secondary gets, if not req->buf */
	uint64_t copy_len;
	bool copy_zeroes;		/* copy is calloc()ed zeroes, not from local_bufs */
	int local_err;
	bool granted, local_done, remote_active, wait_remote, guest_done;
	bool remote_after_local;	/* FAST_ZERO: the secondary only if the local one worked */
};

/* One resync copy: a data range copied, or a hole zeroed. */
struct rjob {
	struct primary *p;		/* NULL: orphaned at close, frees itself */
	struct replica_range range;
	struct td_request lreq;		/* local read or block-status re-check */
	struct replica_link_req lr;
	char *buf;			/* from primary.rs_bufs, bytes(COPY_SECS) class */
	size_t buf_len;
	uint64_t sec;
	uint32_t secs;
	bool hole;
	bool local_busy;
};

struct resync {
	bool active, full, scan_done, aborting, finished;
	uint64_t cursor;		/* scan: next sector; dirty pass: next chunk */
	/* The scan's current run of one allocation status. */
	uint64_t run_sec, run_end;
	bool run_hole;
	bool bs_busy;
	struct td_request bs_req;
	unsigned jobs;
	unsigned local_reads;		/* jobs with their local read or re-check in flight */
	bool pumping, repump;
	uint64_t done_bytes, total_bytes;
	uint64_t t0_ns;
};

enum pending_op {
	PENDING_NONE,
	PENDING_START,
	PENDING_RESYNC,
	PENDING_CHECKPOINT,
};

struct primary {
	struct replica *r;
	struct td_image *local;
	uint64_t size_secs;
	bool closing;

	struct replica_link *link;
	bool link_up;

	struct replica_rlock lock;
	struct replica_chunkset dirty;
	/* The secondary's content is unknown outside the dirty set too (a full resync did not finish). */
	bool need_full;
	/* Sent since the last FLUSH: [uf_cur] is filling, the other is being flushed. */
	struct replica_chunkset unflushed[2];
	unsigned uf_cur;

	uint64_t next_seq;
	struct tdr_list rinflight;	/* writes with the secondary's half outstanding, by seq */
	uint64_t copy_bytes;		/* sync=local copies in flight */
	unsigned ahead_reqs;		/* forwarded with !wait_remote (sync=local) */
	/*
	 * Resync copy buffers, reused: a fresh 1 MiB buffer per copy costs an
	 * mmap, 256 page faults and an munmap (glibc maps allocations that
	 * large), which held a resync into tmpfs at 0.4x nbdcopy.  Emptied
	 * when a resync ends.
	 */
	struct tdr_bufpool rs_bufs;
	/* sync=local copies, reused for the same reason: 1 MiB writes at
	 * sync=local ran at half the speed of sync=both on malloc/free.  At
	 * most REPLICA_LOCAL_AHEAD_BYTES idle; emptied at close. */
	struct tdr_bufpool local_bufs;

	enum pending_op pending;
	bool pending_full;		/* resync full requested */
	enum replica_state start_from;
	/* The options before a pending start changed them: a start that fails,
	 * now or when its connection does, leaves them as they were. */
	struct replica_opts start_saved;

	/* checkpoint */
	uint64_t barrier_seq;
	bool flush_sent;
	uint64_t ckpt_t0;
	struct replica_link_req ckpt_lr;

	struct resync rs;
};

static void rs_pump(struct primary *p);
static void rs_abort(struct primary *p);

static uint64_t bytes(uint64_t secs)
{
	return secs << TD_SECTOR_SHIFT;
}

static bool replicating(const struct primary *p)
{
	return p->link_up &&
	       (p->r->state == REPLICA_STATE_RUNNING || p->r->state == REPLICA_STATE_RESYNC);
}

static void update_dirty_stats(struct primary *p)
{
	p->r->stats.dirty_bytes = replica_chunkset_count(&p->dirty) * bytes(DIRTY_CHUNK_SECS);
}

static void mark_unflushed(struct primary *p, uint64_t sec, uint64_t secs)
{
	replica_chunkset_set_range(&p->unflushed[p->uf_cur], sec, secs);
}

/* The link went away: what the secondary may not have kept must be copied again. */
static void unflushed_to_dirty(struct primary *p)
{
	for (unsigned g = 0; g < 2; g++) {
		struct replica_chunkset *cs = &p->unflushed[g];
		uint64_t c = 0;

		while (replica_chunkset_count(cs) && replica_chunkset_next(cs, c, &c))
			replica_chunkset_set(&p->dirty, c++);
		replica_chunkset_clear_all(cs);
	}
	update_dirty_stats(p);
}

static void mark_dirty(struct primary *p, uint64_t sec, uint64_t secs)
{
	replica_chunkset_set_range(&p->dirty, sec, secs);
	update_dirty_stats(p);
}

/* The secondary no longer matches: stop replicating, keep tracking. */
static void primary_break(struct primary *p, int err, const char *msg)
{
	struct replica *r = p->r;

	replica_set_error(r, err, "%s", msg);
	if (r->state == REPLICA_STATE_RUNNING || r->state == REPLICA_STATE_RESYNC)
		replica_set_state(r, REPLICA_STATE_BROKEN);
	if (p->rs.active)
		rs_abort(p);
	if (p->pending == PENDING_CHECKPOINT && !p->flush_sent) {
		p->pending = PENDING_NONE;
		replica_op_done(r, err, "checkpoint failed: %s", msg);
	}
}

/* ------------------------------------------------------------- link */

static void close_link(struct primary *p)
{
	struct replica_link *l = p->link;

	p->link = NULL;
	p->link_up = false;
	p->r->stats.link_tls = 0;
	if (l)
		p->r->stats.fwd_spliced_bytes += replica_link_get_stats(l)->spliced_bytes;
	unflushed_to_dirty(p);
	replica_link_close(l);	/* pending halves complete with -ECANCELED */
}

static void start_resync(struct primary *p);

static void link_connected(void *arg, int err, const char *msg)
{
	struct primary *p = arg;
	struct replica *r = p->r;
	enum pending_op op = p->pending;
	struct replica_opts tried;

	p->pending = PENDING_NONE;
	if (err) {
		replica_set_error(r, err, "cannot connect to the secondary %s export '%s': %s",
				  r->opts.addr, r->opts.export_name, msg);
		close_link(p);
		tried = r->opts;
		/* Before the answer, which may run the next queued operation. */
		if (op == PENDING_START)
			r->opts = p->start_saved;
		replica_op_done(r, err, "%s failed: cannot connect to the secondary %s export '%s': %s",
				op == PENDING_RESYNC ? "resync" : "start", tried.addr,
				tried.export_name, msg);
		return;
	}
	p->link_up = true;
	p->r->stats.link_tls = replica_link_tls(p->link);
	if (op == PENDING_RESYNC) {
		start_resync(p);
		return;
	}
	if (p->start_from == REPLICA_STATE_DONE || p->need_full || replica_chunkset_count(&p->dirty)) {
		replica_set_state(r, REPLICA_STATE_BROKEN);
		if (p->start_from == REPLICA_STATE_DONE)
			replica_op_done(r, 0, "connected to %s; replication was stopped, so the secondary must be brought up to date: run resync full (or resync incremental if it is the same secondary)",
					r->opts.addr);
		else if (p->need_full)
			replica_op_done(r, 0, "connected to %s; the secondary needs a full copy: run resync full",
					r->opts.addr);
		else
			replica_op_done(r, 0, "connected to %s; %" PRIu64 " bytes changed that the secondary lacks: run resync incremental (or resync full for a new secondary)",
					r->opts.addr, r->stats.dirty_bytes);
		return;
	}
	/* Replicating again: the last error is history, as when a resync starts. */
	r->error = 0;
	r->error_msg[0] = '\0';
	replica_set_state(r, REPLICA_STATE_RUNNING);
	replica_op_done(r, 0, "replicating to %s export '%s'", r->opts.addr, r->opts.export_name);
}

static void link_broken(void *arg, int err, const char *msg)
{
	struct primary *p = arg;
	char m[1024];

	p->r->stats.link_errors++;
	snprintf(m, sizeof(m), "link to %s: %s; link dropped, changes are tracked for resync",
		 p->r->opts.addr, msg);
	/* Before the pending halves complete: their ranges become dirty, not forwarded. */
	close_link(p);
	primary_break(p, err, m);
}

static const struct replica_link_cbs link_cbs = {
	.connected = link_connected,
	.broken = link_broken,
};

/* Opens a link with the current options; reports through link_connected. */
static int open_link(struct primary *p, char *msg, size_t msglen)
{
	struct replica *r = p->r;
	struct replica_link_config cfg = {
		.addr = r->opts.addr,
		.export_name = r->opts.export_name,
		.timeout_ms = r->opts.timeout_ms,
		.client = r->opts.client_libnbd ? REPLICA_LINK_LIBNBD : REPLICA_LINK_NATIVE,
		.no_zerocopy = r->opts.no_zerocopy,
		.expect_size = bytes(p->size_secs),
		.tls = r->opts.tls,
		.tls_psk = r->opts.tls_psk,
		.tls_certificates = r->opts.tls_certificates,
		.tls_username = r->opts.tls_username,
		.tls_no_verify = r->opts.tls_no_verify,
	};

	if (!r->opts.addr[0]) {
		snprintf(msg, msglen, "no secondary address: give addr=tcp:HOST:PORT or addr=unix:PATH");
		return -EINVAL;
	}
	return replica_link_open(&p->link, r->img->loop, &cfg, &link_cbs, p, msg, msglen);
}

/* ------------------------------------------------------------- writes */

static void checkpoint_check(struct primary *p);

static void pw_drop_copy(struct pwrite *pw)
{
	struct primary *p = pw->p;

	if (!pw->copy)
		return;
	p->copy_bytes -= pw->copy_len;
	if (pw->copy_zeroes)
		free(pw->copy);
	else
		tdr_bufpool_put(&p->local_bufs, pw->copy, pw->copy_len);
	pw->copy = NULL;
}

static void pw_finish(struct pwrite *pw)
{
	struct primary *p = pw->p;

	if (!pw->local_done || pw->remote_active || !pw->guest_done)
		return;
	if (pw->granted) {
		if (p->closing)
			replica_rlock_forget(&p->lock, &pw->range);	/* nobody waits any more */
		else
			replica_rlock_release(&p->lock, &pw->range);
	}
	pw_drop_copy(pw);
	free(pw);
}

static void pw_complete_guest(struct pwrite *pw)
{
	if (pw->guest_done || !pw->local_done || (pw->wait_remote && pw->remote_active))
		return;
	pw->guest_done = true;
	td_complete_request(pw->req, pw->local_err);
}

static void pw_remote_done(struct replica_link_req *lr, int err)
{
	struct pwrite *pw = lr->arg;
	struct primary *p = pw->p;

	pw->remote_active = false;
	tdr_list_del(&pw->entry);
	if (!pw->wait_remote)
		p->ahead_reqs--;
	pw_drop_copy(pw);
	if (err) {
		/* The link broke (link_broken ran first): the secondary may lack this range. */
		mark_dirty(p, pw->sec, pw->secs);
	}
	if (!p->closing)
		checkpoint_check(p);
	pw_complete_guest(pw);
	pw_finish(pw);
}

static void pw_send_remote(struct pwrite *pw)
{
	struct primary *p = pw->p;
	struct td_request *req = pw->req;
	const void *buf = req->buf;	/* req is still the guest's: it has not completed */
	uint64_t len = bytes(pw->secs), off = bytes(pw->sec);

	pw->seq = p->next_seq++;
	tdr_list_add_tail(&pw->entry, &p->rinflight);
	mark_unflushed(p, pw->sec, pw->secs);
	pw->remote_active = true;
	p->r->stats.fwd_reqs++;
	p->r->stats.fwd_bytes += len;
	pw->wait_remote = true;
	if (p->r->opts.sync != REPLICA_SYNC_LOCAL || p->ahead_reqs >= REPLICA_LOCAL_AHEAD_REQS) {
		/* The guest waits for the secondary. */
	} else if (pw->op == TD_OP_WRITE && p->copy_bytes + len <= REPLICA_LOCAL_AHEAD_BYTES) {
		/* The guest's buffer goes back to it at the local completion: send a copy. */
		pw->copy = tdr_bufpool_get(&p->local_bufs, len);
		if (pw->copy) {
			memcpy(pw->copy, req->buf, len);
			pw->copy_len = len;
			p->copy_bytes += len;
			buf = pw->copy;
			pw->wait_remote = false;
		}
	} else if (pw->op != TD_OP_WRITE) {
		pw->wait_remote = false;	/* no buffer to keep */
	}
	if (!pw->wait_remote)
		p->ahead_reqs++;
	if (pw->op == TD_OP_WRITE) {
		replica_link_pwrite(p->link, &pw->lr, buf, len, off, pw_remote_done, pw);
	} else if (replica_link_can_zero(p->link)) {
		replica_link_zero(p->link, &pw->lr, len, off, pw->flags & TD_REQ_NO_HOLE,
				  pw_remote_done, pw);
	} else {
		/* A secondary that cannot zero gets zeroes written; calloc(),
		 * not the pool: up to a whole disk of them, on the zero page. */
		pw->copy = calloc(1, len);
		if (pw->copy) {
			pw->copy_zeroes = true;
			pw->copy_len = len;
			p->copy_bytes += len;
		}
		replica_link_pwrite(p->link, &pw->lr, pw->copy, pw->copy ? len : 0, off,
				    pw_remote_done, pw);
		if (!pw->copy) {
			mark_dirty(p, req->sec, req->secs);
			primary_break(p, -ENOMEM, "out of memory zeroing a range on the secondary; run resync incremental");
		}
	}
}

static void pw_local_done(struct td_request *lreq, int err, void *arg)
{
	struct pwrite *pw = arg;
	struct primary *p = pw->p;

	(void)lreq;
	pw->local_done = true;
	pw->local_err = err;
	if (err && pw->remote_after_local && (err == -ENOTSUP || err == -EOPNOTSUPP)) {
		/* Not cheap locally: nothing changed, and the secondary was not asked. */
	} else if (err) {
		/*
		 * The local image failed; the secondary may have taken the write,
		 * and a failed write leaves the local range undefined.  The two
		 * may now differ there.
		 */
		mark_dirty(p, pw->sec, pw->secs);
		if (replicating(p)) {
			char m[512];

			snprintf(m, sizeof(m), "the local image failed a write of %" PRIu64 " bytes at offset %" PRIu64 " (%s); the secondary may differ there: run resync incremental",
				 bytes(pw->secs), bytes(pw->sec), strerror(-err));
			primary_break(p, err, m);
		}
	} else if (pw->remote_after_local) {
		if (replicating(p))
			pw_send_remote(pw);
		else
			mark_dirty(p, pw->sec, pw->secs);
	}
	pw_complete_guest(pw);
	pw_finish(pw);
}

static void pw_granted(struct replica_range *rr, void *arg)
{
	struct pwrite *pw = arg;
	struct primary *p = pw->p;
	struct td_request *req = pw->req;

	(void)rr;
	pw->granted = true;
	td_request_init(&pw->lreq, pw->op, req->sec, req->secs, req->buf, pw_local_done, pw);
	pw->lreq.flags = pw->flags;
	if (replicating(p)) {
		if (!pw->remote_after_local)
			pw_send_remote(pw);
	} else {
		mark_dirty(p, req->sec, req->secs);
		pw->remote_after_local = false;
	}
	td_forward_request(p->r->img, &pw->lreq);
}

static void primary_queue_write(struct replica *r, struct td_request *req)
{
	struct primary *p = r->mode_priv;
	struct pwrite *pw;
	enum td_op op = req->op;
	unsigned flags = req->flags;

	if (op == TD_OP_DISCARD) {
		/*
		 * A discard leaves contents unspecified, which two disks would
		 * fill differently.  Zeroing both (holes allowed) keeps them
		 * equal; a local image that cannot zero cheaply keeps its data
		 * on both sides instead, which a discard also allows.
		 */
		if (!p->local->info_discard) {
			td_complete_request(req, 0);
			return;
		}
		op = TD_OP_WRITE_ZEROES;
		flags &= ~(TD_REQ_NO_HOLE | TD_REQ_FAST_ZERO);
	}
	pw = calloc(1, sizeof(*pw));
	if (!pw) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	pw->p = p;
	pw->req = req;
	pw->sec = req->sec;
	pw->secs = req->secs;
	pw->op = op;
	pw->flags = flags;
	pw->remote_after_local = op == TD_OP_WRITE_ZEROES && (flags & TD_REQ_FAST_ZERO);
	tdr_list_init(&pw->entry);
	replica_rlock_acquire(&p->lock, &pw->range, req->sec, req->sec + req->secs, true,
			      pw_granted, pw);
}

static void primary_queue_read(struct replica *r, struct td_request *req)
{
	td_forward_request(r->img, req);
}

static void primary_queue_other(struct replica *r, struct td_request *req)
{
	switch (req->op) {
	case TD_OP_DISCARD:
	case TD_OP_WRITE_ZEROES:
		primary_queue_write(r, req);
		return;
	default:
		/* FLUSH is local: the checkpoint barrier flushes the secondary. */
		td_forward_request(r->img, req);
		return;
	}
}

/* ---------------------------------------------------------- checkpoint */

static void checkpoint_flushed(struct replica_link_req *lr, int err)
{
	struct primary *p = lr->arg;
	struct replica *r = p->r;
	uint64_t ns = tdr_now_ns() - p->ckpt_t0;

	if (p->pending != PENDING_CHECKPOINT)
		return;
	p->pending = PENDING_NONE;
	p->flush_sent = false;
	if (err) {
		replica_op_done(r, err, "checkpoint failed: the secondary did not flush: %s; run resync when it is back",
				r->error ? r->error_msg : strerror(-err));
		return;
	}
	replica_chunkset_clear_all(&p->unflushed[p->uf_cur ^ 1]);
	r->stats.checkpoints++;
	r->stats.ckpt_last_ns = ns;
	r->stats.ckpt_total_ns += ns;
	if (ns > r->stats.ckpt_max_ns)
		r->stats.ckpt_max_ns = ns;
	replica_notify(r);
	replica_op_done(r, 0, "%s", "");
}

/* Sends the FLUSH once every write older than the barrier is acknowledged. */
static void checkpoint_check(struct primary *p)
{
	struct pwrite *head;

	if (p->pending != PENDING_CHECKPOINT || p->flush_sent)
		return;
	head = tdr_list_first(&p->rinflight, struct pwrite, entry);
	if (head && head->seq < p->barrier_seq)
		return;
	if (!p->link) {
		p->pending = PENDING_NONE;
		replica_op_done(p->r, -ENOTCONN, "checkpoint failed: the link to the secondary is down; run resync first");
		return;
	}
	p->flush_sent = true;
	/* This FLUSH covers what was acknowledged so far; writes in flight start the next set. */
	p->uf_cur ^= 1;
	replica_chunkset_clear_all(&p->unflushed[p->uf_cur]);
	{
		struct tdr_list *pos, *tmp;

		tdr_list_for_each_safe(pos, tmp, &p->rinflight) {
			struct pwrite *pw = tdr_list_entry(pos, struct pwrite, entry);

			mark_unflushed(p, pw->sec, pw->secs);
		}
	}
	replica_link_flush(p->link, &p->ckpt_lr, checkpoint_flushed, p);
}

static void primary_checkpoint(struct replica *r)
{
	struct primary *p = r->mode_priv;

	switch (r->state) {
	case REPLICA_STATE_RUNNING:
		break;
	case REPLICA_STATE_NONE:
		replica_op_done(r, -EINVAL, "checkpoint refused: replication is not started; run start first");
		return;
	case REPLICA_STATE_BROKEN:
		replica_op_done(r, -EINVAL, "checkpoint refused: the primary is in state broken (%s); run resync first",
				r->error ? "get-error says why" : "the secondary lacks changes");
		return;
	case REPLICA_STATE_RESYNC:
		replica_op_done(r, -EBUSY, "checkpoint refused: resync in progress (%" PRIu64 " of %" PRIu64 " bytes); checkpoint when the state is running",
				r->progress_done, r->progress_total);
		return;
	default:
		replica_op_done(r, -EINVAL, "checkpoint refused: the primary is in state %s; run start and resync first",
				replica_state_name(r->state));
		return;
	}
	p->pending = PENDING_CHECKPOINT;
	p->barrier_seq = p->next_seq;
	p->flush_sent = false;
	p->ckpt_t0 = tdr_now_ns();
	checkpoint_check(p);
}

/* ------------------------------------------------------------- resync */

static void rs_progress(struct primary *p)
{
	replica_set_progress(p->r, p->rs.done_bytes, p->rs.total_bytes);
}

static void rjob_free(struct rjob *j)
{
	if (j->p)
		tdr_bufpool_put(&j->p->rs_bufs, j->buf, j->buf_len);
	else
		tdr_bufpool_release(j->buf, j->buf_len);	/* orphaned: the pool is gone */
	free(j);
}

/* The end of one copy, whatever happened. */
static void rjob_end(struct rjob *j)
{
	struct primary *p = j->p;

	if (!p) {
		rjob_free(j);
		return;
	}
	if (p->closing)
		replica_rlock_forget(&p->lock, &j->range);	/* nobody waits any more */
	else
		replica_rlock_release(&p->lock, &j->range);
	p->rs.jobs--;
	rjob_free(j);
	if (!p->closing)
		rs_pump(p);
}

static void rjob_remote_done(struct replica_link_req *lr, int err)
{
	struct rjob *j = lr->arg;
	struct primary *p = j->p;

	if (err) {
		mark_dirty(p, j->sec, j->secs);
	} else {
		p->rs.done_bytes += bytes(j->secs);
		rs_progress(p);
	}
	rjob_end(j);
}

/* Aborted or out of link: the range is still to be copied. */
static void rjob_skip(struct rjob *j)
{
	mark_dirty(j->p, j->sec, j->secs);
	rjob_end(j);
}

static void rjob_read_done(struct td_request *lreq, int err, void *arg)
{
	struct rjob *j = arg;
	struct primary *p = j->p;

	(void)lreq;
	j->local_busy = false;
	if (!p) {
		rjob_free(j);
		return;
	}
	p->rs.local_reads--;
	if (err) {
		char m[512];

		snprintf(m, sizeof(m), "resync: the local image failed a read of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
			 bytes(j->secs), bytes(j->sec), strerror(-err));
		mark_dirty(p, j->sec, j->secs);
		rjob_end(j);
		primary_break(p, err, m);
		return;
	}
	if (p->rs.aborting || !p->link_up) {
		rjob_skip(j);
		return;
	}
	mark_unflushed(p, j->sec, j->secs);
	replica_link_pwrite(p->link, &j->lr, j->buf, bytes(j->secs), bytes(j->sec),
			    rjob_remote_done, j);
}

/* The hole re-checked under the lock: zero what is still a hole, leave the rest to the dirty pass. */
static void rjob_hole_checked(struct td_request *lreq, int err, void *arg)
{
	struct rjob *j = arg;
	struct primary *p = j->p;
	uint32_t h;

	j->local_busy = false;
	if (!p) {
		rjob_free(j);
		return;
	}
	p->rs.local_reads--;
	if (p->rs.aborting || !p->link_up) {
		rjob_skip(j);
		return;
	}
	h = !err && (lreq->bs_flags & TD_BS_ZERO) ? lreq->bs_secs : 0;
	if (h > j->secs)
		h = j->secs;
	if (h < j->secs) {
		/* A guest write landed since the scan: copy that part later. */
		mark_dirty(p, j->sec + h, j->secs - h);
		p->rs.done_bytes += bytes(j->secs - h);
		j->secs = h;
		if (!h) {
			rjob_end(j);
			return;
		}
	}
	mark_unflushed(p, j->sec, j->secs);
	replica_link_zero(p->link, &j->lr, bytes(j->secs), bytes(j->sec), false, rjob_remote_done, j);
}

static void rjob_granted(struct replica_range *rr, void *arg)
{
	struct rjob *j = arg;
	struct primary *p = j->p;

	(void)rr;
	if (p->rs.aborting || !p->link_up) {
		rjob_skip(j);
		return;
	}
	j->local_busy = true;
	p->rs.local_reads++;
	if (j->hole) {
		td_request_init(&j->lreq, TD_OP_BLOCK_STATUS, j->sec, j->secs, NULL,
				rjob_hole_checked, j);
	} else {
		td_request_init(&j->lreq, TD_OP_READ, j->sec, j->secs, j->buf, rjob_read_done, j);
	}
	td_queue_request(p->local, &j->lreq);
}

static int rjob_start(struct primary *p, uint64_t sec, uint32_t secs, bool hole)
{
	struct rjob *j = calloc(1, sizeof(*j));

	if (!j)
		return -ENOMEM;
	if (!hole) {
		j->buf_len = bytes(secs);
		j->buf = tdr_bufpool_get(&p->rs_bufs, j->buf_len);
		if (!j->buf) {
			free(j);
			return -ENOMEM;
		}
	}
	j->p = p;
	j->sec = sec;
	j->secs = secs;
	j->hole = hole;
	p->rs.jobs++;
	replica_rlock_acquire(&p->lock, &j->range, sec, sec + secs, true, rjob_granted, j);
	return 0;
}

static void rs_scan_done(struct td_request *req, int err, void *arg)
{
	struct primary *p = arg;
	struct resync *rs = &p->rs;

	rs->bs_busy = false;
	if (err || req->bs_secs == 0 || req->bs_secs > req->secs) {
		/* No reliable map: copy this stretch as data. */
		rs->run_hole = false;
		rs->run_end = req->sec + req->secs;
	} else {
		/*
		 * Only a range that reads as zeroes may become zeroes on the
		 * secondary.  The link may be gone (stop, a break) while the
		 * query was out: the resync is being abandoned then.
		 */
		rs->run_hole = (req->bs_flags & TD_BS_ZERO) && p->link &&
			       replica_link_can_zero(p->link);
		rs->run_end = req->sec + req->bs_secs;
	}
	rs->run_sec = req->sec;
	if (!p->closing)
		rs_pump(p);
}

/*
 * The next piece to copy, or false when there is none right now (a scan
 * query is out) or none at all (rs->finished).
 */
static bool rs_next(struct primary *p, uint64_t *sec, uint32_t *secs, bool *hole)
{
	struct resync *rs = &p->rs;

	if (rs->full && !rs->scan_done) {
		if (rs->run_sec >= rs->run_end) {
			uint64_t left = p->size_secs - rs->cursor;

			if (!left) {
				rs->scan_done = true;
				rs->cursor = 0;
				/* What the scan left to the dirty pass. */
				rs->total_bytes += replica_chunkset_count(&p->dirty) * bytes(DIRTY_CHUNK_SECS);
				return rs_next(p, sec, secs, hole);
			}
			if (rs->bs_busy)
				return false;
			rs->bs_busy = true;
			td_request_init(&rs->bs_req, TD_OP_BLOCK_STATUS, rs->cursor,
					left < SCAN_SECS ? (uint32_t)left : SCAN_SECS, NULL, rs_scan_done, p);
			td_queue_request(p->local, &rs->bs_req);
			return false;	/* rs_scan_done pumps again, maybe at once */
		}
		uint64_t max = rs->run_hole ? HOLE_MAX_SECS : COPY_SECS;
		uint64_t n = rs->run_end - rs->run_sec < max ? rs->run_end - rs->run_sec : max;

		*sec = rs->run_sec;
		*secs = (uint32_t)n;
		*hole = rs->run_hole;
		rs->run_sec += n;
		rs->cursor = rs->run_sec;
		return true;
	}

	/* The dirty pass: runs of set chunks, up to COPY_SECS, cleared as they are taken. */
	uint64_t c;

	if (!replica_chunkset_next(&p->dirty, rs->cursor, &c)) {
		if (replica_chunkset_count(&p->dirty) && rs->cursor) {
			/* Set behind the cursor meanwhile: another pass from the start. */
			rs->cursor = 0;
			return rs_next(p, sec, secs, hole);
		}
		/*
		 * Done only when nothing is set and no copy is out: a hole
		 * copy that finds data after all (the guest wrote there
		 * meanwhile, rjob_hole_checked) sets its chunks again when it
		 * completes, and the next pump takes them.
		 */
		if (!replica_chunkset_count(&p->dirty) && !rs->jobs)
			rs->finished = true;
		return false;
	}
	uint64_t first = c, n = 0;

	while (n * DIRTY_CHUNK_SECS < COPY_SECS && replica_chunkset_test(&p->dirty, first + n)) {
		replica_chunkset_clear(&p->dirty, first + n);
		n++;
	}
	update_dirty_stats(p);
	rs->cursor = first + n;
	*sec = first * DIRTY_CHUNK_SECS;
	*secs = (uint32_t)(n * DIRTY_CHUNK_SECS);
	if (*sec + *secs > p->size_secs)
		*secs = (uint32_t)(p->size_secs - *sec);
	*hole = false;
	return true;
}

static void rs_finish(struct primary *p)
{
	struct replica *r = p->r;
	struct resync *rs = &p->rs;
	uint64_t ms = (tdr_now_ns() - rs->t0_ns) / 1000000;

	rs->active = false;
	/* Nothing copies until the next resync: give the buffers back. */
	tdr_bufpool_fini(&p->rs_bufs);
	if (rs->aborting) {
		if (rs->full)
			p->need_full = true;
		TDR_WARN("replica primary: resync stopped after %" PRIu64 " of %" PRIu64 " bytes",
			 rs->done_bytes, rs->total_bytes);
		return;
	}
	if (rs->full)
		p->need_full = false;
	rs->done_bytes = rs->total_bytes;
	rs_progress(p);
	TDR_INFO("replica primary: resync %s done: %" PRIu64 " bytes in %" PRIu64 " ms",
		 rs->full ? "full" : "incremental", rs->total_bytes, ms);
	replica_set_state(r, REPLICA_STATE_RUNNING);
}

static void rs_pump(struct primary *p)
{
	struct resync *rs = &p->rs;

	if (!rs->active)
		return;
	if (rs->pumping) {
		rs->repump = true;
		return;
	}
	rs->pumping = true;
	do {
		rs->repump = false;
		while (!rs->aborting && !rs->finished && rs->jobs < RESYNC_DEPTH) {
			uint64_t sec;
			uint32_t secs;
			bool hole;

			if (!rs_next(p, &sec, &secs, &hole))
				break;
			if (rjob_start(p, sec, secs, hole) < 0) {
				mark_dirty(p, sec, secs);
				primary_break(p, -ENOMEM, "resync: out of memory; run resync again");
				break;
			}
		}
	} while (rs->repump);
	rs->pumping = false;
	if ((rs->finished || rs->aborting) && !rs->jobs && !rs->bs_busy)
		rs_finish(p);
}

static void rs_abort(struct primary *p)
{
	p->rs.aborting = true;
	rs_pump(p);
}

static void start_resync(struct primary *p)
{
	struct replica *r = p->r;
	struct resync *rs = &p->rs;
	bool full = p->pending_full;

	memset(rs, 0, sizeof(*rs));
	rs->active = true;
	rs->full = full;
	rs->t0_ns = tdr_now_ns();
	if (full) {
		/* The scan copies everything; what it races with lands in the dirty set again. */
		replica_chunkset_clear_all(&p->dirty);
		update_dirty_stats(p);
		p->need_full = true;
		rs->total_bytes = bytes(p->size_secs);
	} else {
		rs->total_bytes = replica_chunkset_count(&p->dirty) * bytes(DIRTY_CHUNK_SECS);
	}
	r->error = 0;
	r->error_msg[0] = '\0';
	replica_set_state(r, REPLICA_STATE_RESYNC);
	rs_progress(p);
	replica_op_done(r, 0, "resync %s started: up to %" PRIu64 " bytes to copy to %s",
			full ? "full" : "incremental", rs->total_bytes, r->opts.addr);
	rs_pump(p);
}

static void primary_resync(struct replica *r, bool full)
{
	struct primary *p = r->mode_priv;
	char msg[REPLICA_MSG_MAX];
	int err;

	if (r->state == REPLICA_STATE_RESYNC || p->rs.active) {
		replica_op_done(r, -EBUSY, "resync refused: a resync is in progress or winding down (%" PRIu64 " of %" PRIu64 " bytes)",
				r->progress_done, r->progress_total);
		return;
	}
	if (!full && p->need_full) {
		replica_op_done(r, -EINVAL, "resync incremental refused: the secondary needs a full copy (a full resync did not finish); run resync full");
		return;
	}
	p->pending_full = full;
	if (p->link_up) {
		start_resync(p);
		return;
	}
	/* Reconnect first, to the address of the last start (or the spec's). */
	close_link(p);
	p->pending = PENDING_RESYNC;
	err = open_link(p, msg, sizeof(msg));
	if (err < 0) {
		p->pending = PENDING_NONE;
		replica_op_done(r, err, "resync refused: %s", msg);
	}
}

/* ---------------------------------------------------------- start, stop */

static void primary_start(struct replica *r, const struct replica_cmd *cmd)
{
	struct primary *p = r->mode_priv;
	char msg[REPLICA_MSG_MAX];
	int err;

	switch (r->state) {
	case REPLICA_STATE_NONE:
	case REPLICA_STATE_BROKEN:
	case REPLICA_STATE_DONE:
		break;
	case REPLICA_STATE_RUNNING:
		replica_op_done(r, -EINVAL, "start refused: already replicating to %s; run stop first",
				r->opts.addr);
		return;
	case REPLICA_STATE_RESYNC:
		replica_op_done(r, -EBUSY, "start refused: a resync to %s is in progress; run stop first",
				r->opts.addr);
		return;
	default:
		replica_op_done(r, -EINVAL, "start refused: the primary is in state %s",
				replica_state_name(r->state));
		return;
	}
	p->start_saved = r->opts;
	if (cmd->addr[0])
		snprintf(r->opts.addr, sizeof(r->opts.addr), "%s", cmd->addr);
	if (cmd->has_export)
		snprintf(r->opts.export_name, sizeof(r->opts.export_name), "%s", cmd->export_name);
	if (cmd->timeout_ms)
		r->opts.timeout_ms = cmd->timeout_ms;
	if (cmd->sync != REPLICA_SYNC_DEFAULT)
		r->opts.sync = cmd->sync;
	close_link(p);
	p->start_from = r->state;
	p->pending = PENDING_START;
	err = open_link(p, msg, sizeof(msg));
	if (err < 0) {
		p->pending = PENDING_NONE;
		r->opts = p->start_saved;
		replica_op_done(r, err, "start refused: %s", msg);
	}
}

static void primary_stop(struct replica *r, bool failover)
{
	struct primary *p = r->mode_priv;
	const char *what = failover ? "failover" : "stop";

	switch (r->state) {
	case REPLICA_STATE_RUNNING:
	case REPLICA_STATE_BROKEN:
	case REPLICA_STATE_RESYNC:
		break;
	case REPLICA_STATE_NONE:
		replica_op_done(r, -EINVAL, "%s refused: replication is not started", what);
		return;
	case REPLICA_STATE_DONE:
		replica_op_done(r, -EINVAL, "%s refused: replication is already stopped", what);
		return;
	default:
		replica_op_done(r, -EINVAL, "%s refused: the primary is in state %s", what,
				replica_state_name(r->state));
		return;
	}
	/* Done first, so that halves cancelled below are tracked, not forwarded again. */
	replica_set_state(r, REPLICA_STATE_DONE);
	if (p->rs.active)
		rs_abort(p);
	close_link(p);
	TDR_INFO("replica primary: %s: replication stopped; the guest continues on the local image, changes are tracked",
		 what);
	replica_op_done(r, 0, "replication stopped; the guest continues on the local image and changes are tracked for a later resync");
}

/* ---------------------------------------------------------- init, fini */

static int primary_init(struct replica *r)
{
	struct primary *p = calloc(1, sizeof(*p));
	int err;

	if (!p) {
		tdr_set_error("replica: out of memory");
		return -ENOMEM;
	}
	p->r = r;
	p->local = r->img->parent;
	p->size_secs = p->local->size_secs;
	replica_rlock_init(&p->lock);
	tdr_list_init(&p->rinflight);
	tdr_bufpool_init(&p->rs_bufs, (size_t)RESYNC_DEPTH * bytes(COPY_SECS));
	tdr_bufpool_init(&p->local_bufs, REPLICA_LOCAL_AHEAD_BYTES);
	err = replica_chunkset_init(&p->dirty, p->size_secs, DIRTY_CHUNK_SECS);
	if (!err)
		err = replica_chunkset_init(&p->unflushed[0], p->size_secs, DIRTY_CHUNK_SECS);
	if (!err)
		err = replica_chunkset_init(&p->unflushed[1], p->size_secs, DIRTY_CHUNK_SECS);
	if (err < 0) {
		replica_chunkset_free(&p->dirty);
		replica_chunkset_free(&p->unflushed[0]);
		replica_chunkset_free(&p->unflushed[1]);
		tdr_set_error("replica: out of memory for the dirty map of %" PRIu64 " bytes",
			      bytes(p->size_secs));
		free(p);
		return err;
	}
	if (r->opts.addr[0] && strncmp(r->opts.addr, "unix:", 5) && strncmp(r->opts.addr, "tcp:", 4)) {
		tdr_set_error("replica: addr=%s: expected tcp:HOST:PORT or unix:PATH", r->opts.addr);
		replica_chunkset_free(&p->dirty);
		replica_chunkset_free(&p->unflushed[0]);
		replica_chunkset_free(&p->unflushed[1]);
		free(p);
		return -EINVAL;
	}
	r->mode_priv = p;
	return 0;
}

/* Closing: a resync stops (the dirty set keeps what it had left). */
static void primary_quiesce(struct replica *r)
{
	struct primary *p = r->mode_priv;

	if (p && p->rs.active)
		rs_abort(p);
}

/*
 * Only what reads the local image counts: the link's requests are the
 * network's, and close_link() ends them at fini.
 */
static uint64_t primary_busy(struct replica *r)
{
	struct primary *p = r->mode_priv;

	return p ? (uint64_t)p->rs.local_reads + p->rs.bs_busy : 0;
}

static void primary_fini(struct replica *r)
{
	struct primary *p = r->mode_priv;
	struct tdr_list *pos, *tmp;

	if (!p)
		return;
	p->closing = true;
	p->rs.aborting = true;
	close_link(p);
	/* Copies still waiting for the lock will never run; ones reading locally free themselves. */
	tdr_list_for_each_safe(pos, tmp, &p->lock.waiting) {
		struct replica_range *rr = tdr_list_entry(pos, struct replica_range, entry);

		if (rr->granted_cb == rjob_granted) {
			replica_rlock_forget(&p->lock, rr);
			rjob_free(rr->arg);
		}
	}
	tdr_list_for_each_safe(pos, tmp, &p->lock.held) {
		struct replica_range *rr = tdr_list_entry(pos, struct replica_range, entry);

		if (rr->granted_cb == rjob_granted) {
			struct rjob *j = rr->arg;

			replica_rlock_forget(&p->lock, rr);
			if (j->local_busy)
				j->p = NULL;
			else
				rjob_free(j);
		}
	}
	if (p->rs.bs_busy)
		TDR_WARN("replica primary: closed with a block-status query in flight");
	tdr_bufpool_fini(&p->rs_bufs);
	tdr_bufpool_fini(&p->local_bufs);
	replica_chunkset_free(&p->dirty);
	replica_chunkset_free(&p->unflushed[0]);
	replica_chunkset_free(&p->unflushed[1]);
	free(p);
	r->mode_priv = NULL;
}

/* The open link's share of fwd_spliced_bytes; close_link() adds it for good. */
static void primary_live_stats(struct replica *r, struct replica_stats *st)
{
	struct primary *p = r->mode_priv;

	if (p && p->link)
		st->fwd_spliced_bytes += replica_link_get_stats(p->link)->spliced_bytes;
}

static void primary_debug(struct replica *r, FILE *out)
{
	struct primary *p = r->mode_priv;
	const struct replica_link_stats *ls = p->link ? replica_link_get_stats(p->link) : NULL;

	fprintf(out, "    primary: addr=%s export=%s timeout=%ums sync=%s link=%s inflight=%u dirty_chunks=%" PRIu64 " need_full=%d\n",
		r->opts.addr, r->opts.export_name, r->opts.timeout_ms,
		r->opts.sync == REPLICA_SYNC_LOCAL ? "local" : "both",
		p->link_up ? "up" : p->link ? "connecting" : "down", replica_link_inflight(p->link),
		replica_chunkset_count(&p->dirty), p->need_full);
	if (ls)
		fprintf(out, "    link: write_cmds=%" PRIu64 " write_bytes=%" PRIu64 " spliced_bytes=%" PRIu64 " zero_cmds=%" PRIu64 " zero_bytes=%" PRIu64 " flush_cmds=%" PRIu64 "\n",
			ls->write_cmds, ls->write_bytes, ls->spliced_bytes, ls->zero_cmds,
			ls->zero_bytes, ls->flush_cmds);
	if (p->rs.active)
		fprintf(out, "    resync: %s %" PRIu64 "/%" PRIu64 " bytes, %u copies in flight\n",
			p->rs.full ? "full" : "incremental", p->rs.done_bytes, p->rs.total_bytes,
			p->rs.jobs);
}

const struct replica_mode_ops replica_primary_ops = {
	.name = "primary",
	.init = primary_init,
	.fini = primary_fini,
	.queue_read = primary_queue_read,
	.queue_write = primary_queue_write,
	.queue_other = primary_queue_other,
	.start = primary_start,
	.checkpoint = primary_checkpoint,
	.stop = primary_stop,
	.resync = primary_resync,
	.quiesce = primary_quiesce,
	.busy = primary_busy,
	.debug = primary_debug,
	.live_stats = primary_live_stats,
};
