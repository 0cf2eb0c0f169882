/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Inside the replica driver: the common part (replica.c: options, state,
 * operation dispatch, observer) and the two modes (replica-primary.c,
 * replica-secondary.c), which implement struct replica_mode_ops.
 */
#ifndef TDR_REPLICA_INT_H
#define TDR_REPLICA_INT_H

#include "tdr/image.h"
#include "tdr/replica.h"
#include "replica-link.h"

#define REPLICA_PATH_MAX 1024

struct replica;

struct replica_opts {
	enum replica_mode mode;
	char addr[REPLICA_ADDR_MAX];		/* primary: the secondary; secondary: where to listen */
	char export_name[REPLICA_NAME_MAX];	/* default "secondary" */
	uint32_t timeout_ms;			/* primary: per-request link timeout, default 5000 */
	enum replica_sync sync;			/* primary: default BOTH */
	uint32_t cbw_secs;			/* secondary: copy-before-write granularity, default 128 (64 KiB) */
	bool scratch_off;			/* secondary: scratch=off, active/hidden always sync */
	bool client_libnbd;			/* primary: the link on libnbd instead of our own client */
	bool client_given;			/* client= was in the spec */
	bool no_zerocopy;			/* primary: zerocopy=off, the native client copies payloads */
	/* primary: TLS on the link (tls=, tls-psk=, tls-certificates=, tls-username=, tls-verify=) */
	enum nbd_tls_mode tls;
	char tls_psk[REPLICA_PATH_MAX];
	char tls_certificates[REPLICA_PATH_MAX];
	char tls_username[REPLICA_NAME_MAX];
	bool tls_no_verify;
};

struct replica_mode_ops {
	const char *name;
	/* At open (after options): 0 or -errno with tdr_set_error(). */
	int (*init)(struct replica *r);
	void (*fini)(struct replica *r);
	/* Guest I/O (PVM or SVM) entering the filter. */
	void (*queue_read)(struct replica *r, struct td_request *req);
	void (*queue_write)(struct replica *r, struct td_request *req);
	/* FLUSH, DISCARD, WRITE_ZEROES, BLOCK_STATUS; NULL: forward to the local image. */
	void (*queue_other)(struct replica *r, struct td_request *req);
	/*
	 * Operations, already checked for syntax; the mode checks the state.
	 * Each calls replica_op_done() exactly once.
	 */
	void (*start)(struct replica *r, const struct replica_cmd *cmd);
	void (*checkpoint)(struct replica *r);
	void (*stop)(struct replica *r, bool failover);
	void (*resync)(struct replica *r, bool full);
	/*
	 * The disk is closing (or the mode is being replaced): start no more
	 * work of the mode's own; busy() counts what is still in flight into
	 * the images below.  Both optional.
	 */
	void (*quiesce)(struct replica *r);
	uint64_t (*busy)(struct replica *r);
	void (*debug)(struct replica *r, FILE *out);
	/* Adds what lives elsewhere (the link's counters) to a copy of the stats.  Optional. */
	void (*live_stats)(struct replica *r, struct replica_stats *st);
};

struct replica {
	struct td_image *img;		/* the filter image */
	/*
	 * The image guest I/O goes to: img->parent at first; the secondary disk
	 * (the chain's bottom) once a secondary's failover is done, which is
	 * also the local image if that secondary is then started as a primary.
	 * Modes send guest requests there with td_queue_request(r->local, req).
	 */
	struct td_image *local;
	struct replica_opts opts;
	const struct replica_mode_ops *ops;
	void *mode_priv;		/* the mode's own state */

	enum replica_state state;
	int error;
	char error_msg[REPLICA_MSG_MAX];
	uint64_t progress_done, progress_total;
	struct replica_stats stats;

	/* The operation in progress (one at a time). */
	bool op_busy;
	replica_done_fn op_done;
	void *op_arg;

	bool closing;			/* quiesced: operations are refused */
	/* A start that changes mode waits until the old mode is idle. */
	struct replica_cmd switch_cmd;
	struct tdr_timer switch_timer;
	bool switching;

	void (*observer)(void *arg);
	void *observer_arg;
	struct tdr_defer notify;
};

extern const struct replica_mode_ops replica_primary_ops;
extern const struct replica_mode_ops replica_secondary_ops;

/* Completes the operation in progress. */
void replica_op_done(struct replica *r, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Changes state and tells the observer. */
void replica_set_state(struct replica *r, enum replica_state s);
/* Records an error for get-error (and logs it) and tells the observer. */
void replica_set_error(struct replica *r, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Progress of a long operation, in bytes; tells the observer (rate-limited by the loop). */
void replica_set_progress(struct replica *r, uint64_t done, uint64_t total);
/* Tells the observer that something changed (stats, say). */
void replica_notify(struct replica *r);

/*
 * A range lock over sectors, for ordering requests that must not overlap in
 * flight (primary writes against SVM reads on a secondary, in-flight
 * checkpoints against new writes on a primary).  Two holders conflict when
 * their ranges overlap and at least one of them is exclusive.  Waiters are
 * granted in arrival order, so overlapping writes keep their order.
 */
struct replica_range {
	uint64_t sec, end;		/* [sec, end) */
	bool exclusive;
	bool granted;
	void (*granted_cb)(struct replica_range *rr, void *arg);
	void *arg;
	struct tdr_list entry;		/* in held or waiting */
	struct tdr_list bentry;		/* held: in its bucket, or in big */
};

/*
 * Granted ranges are also indexed by where they start, so that a request
 * checks the few ranges near it, not every range in flight (a primary with
 * sync=local keeps thousands of writes in flight to the secondary).
 */
#define RLOCK_BUCKET_SHIFT 11u		/* 1 MiB of sectors per bucket */
#define RLOCK_BUCKETS 256u

struct replica_rlock {
	struct tdr_list held;		/* every granted range */
	struct tdr_list waiting;
	struct tdr_list big;		/* granted ranges longer than a bucket */
	struct tdr_list bucket[RLOCK_BUCKETS];	/* the others, by their first sector */
};

void replica_rlock_init(struct replica_rlock *l);
/* Calls rr->granted_cb (possibly at once) when the range is free. */
void replica_rlock_acquire(struct replica_rlock *l, struct replica_range *rr, uint64_t sec,
			   uint64_t end, bool exclusive,
			   void (*granted_cb)(struct replica_range *rr, void *arg), void *arg);
void replica_rlock_release(struct replica_rlock *l, struct replica_range *rr);
/* Drops a granted range without waking anyone (the owner is closing). */
void replica_rlock_forget(struct replica_rlock *l, struct replica_range *rr);

/*
 * A sparse set of fixed-size chunks (copy-before-write map, dirty maps):
 * a bitmap plus the list of set chunks, so that clearing costs what was set,
 * not the disk's size.
 */
struct replica_chunkset {
	uint64_t nchunks;
	uint32_t chunk_secs;
	uint64_t *bits;
	uint64_t count;			/* bits set */
	/*
	 * Chunks set since the last clear_all; may hold stale or repeated
	 * entries.  nset UINT64_MAX: the list was given up until clear_all.
	 */
	uint64_t *set_list;
	uint64_t nset, set_cap;
};

int replica_chunkset_init(struct replica_chunkset *cs, uint64_t disk_secs, uint32_t chunk_secs);
void replica_chunkset_free(struct replica_chunkset *cs);
bool replica_chunkset_test(const struct replica_chunkset *cs, uint64_t chunk);
/*
 * Never fails: when the list cannot grow (or would outgrow the bitmap),
 * the set keeps the bitmap alone and clear_all clears all of it.
 */
void replica_chunkset_set(struct replica_chunkset *cs, uint64_t chunk);
/* Marks every chunk that [sec, sec+secs) touches. */
void replica_chunkset_set_range(struct replica_chunkset *cs, uint64_t sec, uint64_t secs);
/* Clears one chunk. */
void replica_chunkset_clear(struct replica_chunkset *cs, uint64_t chunk);
/* Clears everything, in time proportional to what was set. */
void replica_chunkset_clear_all(struct replica_chunkset *cs);
uint64_t replica_chunkset_count(const struct replica_chunkset *cs);
/* The first set chunk >= from, in *chunk; false if none (a scan of the bitmap). */
bool replica_chunkset_next(const struct replica_chunkset *cs, uint64_t from, uint64_t *chunk);

#endif
