/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The tapdisk request and driver model.
 *
 * A disk is a stack of images opened from a spec such as
 *     replica:mode=secondary|vhd:/srv/active.vhd
 * Entries left of '|' are filters stacked over the entry to their right; the
 * rightmost entry is an image whose own parents (a VHD's backing file, say)
 * are found with its driver's get_parent_id() and opened below it.  So every
 * image but the bottom one has a parent, and requests flow downwards:
 *
 *     td_disk_submit()  ->  top image's driver  -> td_forward_request()
 *                                               -> parent's driver ...
 *
 * and complete upwards through each request's callback.  A driver may serve
 * part of a request itself and forward the rest: it splits the request into
 * sub-requests with td_request_sub(), and the original completes when the last
 * piece does (see "Splitting" below).
 *
 * Everything runs on the process's one event loop; drivers never block.
 */
#ifndef TDR_IMAGE_H
#define TDR_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "tdr/io.h"
#include "tdr/list.h"
#include "tdr/loop.h"

#define TD_SECTOR_SHIFT 9
#define TD_SECTOR_SIZE  512u

enum td_op {
	TD_OP_READ = 0,
	TD_OP_WRITE,
	TD_OP_FLUSH,		/* make every completed write durable */
	TD_OP_DISCARD,		/* TRIM: contents become unspecified (we keep zeroes or old data) */
	TD_OP_WRITE_ZEROES,	/* contents become zero */
	TD_OP_BLOCK_STATUS,	/* allocation status of the range; see td_request.bs_* */
};

/* td_request.flags */
#define TD_REQ_FUA        (1u << 0)	/* write: durable before completion */
#define TD_REQ_NO_HOLE    (1u << 1)	/* write-zeroes: keep the range allocated */
#define TD_REQ_FAST_ZERO  (1u << 2)	/* write-zeroes: fail with -ENOTSUP unless cheap */

/* td_request.bs_flags: the NBD base:allocation bits, same values. */
#define TD_BS_HOLE (1u << 0)
#define TD_BS_ZERO (1u << 1)

struct td_request;
struct td_image;
struct td_disk;

typedef void (*td_request_cb_t)(struct td_request *req, int err, void *arg);

struct td_request {
	enum td_op op;
	unsigned flags;
	uint64_t sec;		/* first 512-byte sector */
	uint32_t secs;		/* number of sectors; 0 only for FLUSH */
	char *buf;		/* secs * 512 bytes for READ and WRITE */

	/* Set by whoever issues the request; called exactly once. */
	td_request_cb_t cb;
	void *cb_arg;

	/*
	 * BLOCK_STATUS result: the status of the run of sectors starting at
	 * sec, bs_secs long (1 <= bs_secs <= secs), all with bs_flags.
	 */
	uint32_t bs_secs;
	unsigned bs_flags;

	/* --- owned by the chain machinery and the driver that holds it --- */
	struct td_image *image;		/* image it was last queued to */
	struct td_request *split_parent;	/* non-NULL for a sub-request */
	int split_pending;		/* sub-requests outstanding (+1 while splitting) */
	int split_error;		/* first error of a sub-request */
	struct tdr_list entry;		/* free for the current owner's queues */
	void *drv_priv;			/* free for the current owner */
	uint64_t drv_u64;		/* free for the current owner */

	/* --- owned by td_disk_submit() --- */
	struct td_disk *disk;
	td_request_cb_t disk_cb;
	void *disk_cb_arg;
};

/* open() flags */
#define TD_OPEN_RDONLY   (1u << 0)
#define TD_OPEN_QUIET    (1u << 1)	/* do not log, only tdr_set_error() */
#define TD_OPEN_NO_O_DIRECT (1u << 2)

/* Identity of a parent image, returned by get_parent_id(). */
struct td_parent_id {
	char drv[16];		/* driver name, e.g. "vhd" or "aio" */
	char path[4096];	/* absolute path */
};

/* get_parent_id() returns this when the image has no parent. */
#define TD_NO_PARENT 1

struct td_image_stats {
	uint64_t rd_reqs, rd_secs, wr_reqs, wr_secs;
	uint64_t flush_reqs, discard_reqs, zero_reqs, status_reqs;
	uint64_t errors;
	uint64_t forwarded;	/* requests (or pieces) passed to the parent */
};

struct td_driver {
	const char *name;	/* the spec's type, e.g. "aio" */
	size_t priv_size;	/* bytes zero-allocated at image->priv */
	bool is_filter;		/* stacks over the next spec entry ("x|y") */

	/*
	 * params: the spec entry after "type:".  Sets image->size_secs (and
	 * image->info_* if it wants).  On failure: tdr_set_error() and -errno,
	 * with everything it opened closed again.
	 */
	int (*open)(struct td_image *img, const char *params, unsigned flags);
	void (*close)(struct td_image *img);

	void (*queue_read)(struct td_image *img, struct td_request *req);
	void (*queue_write)(struct td_image *img, struct td_request *req);
	/* Optional; NULL forwards to the parent (or completes if none). */
	void (*queue_flush)(struct td_image *img, struct td_request *req);
	/* Optional; handles DISCARD and WRITE_ZEROES.  NULL: -EOPNOTSUPP. */
	void (*queue_discard)(struct td_image *img, struct td_request *req);
	/* Optional; NULL: the whole range is data. */
	void (*queue_block_status)(struct td_image *img, struct td_request *req);

	/* 0 with *id filled, TD_NO_PARENT, or -errno.  NULL: no parent. */
	int (*get_parent_id)(struct td_image *img, struct td_parent_id *id);
	/* Checks that parent is the image this one was made over; 0 or -errno. */
	int (*validate_parent)(struct td_image *img, struct td_image *parent);

	/*
	 * Optional: the disk is about to close.  Start no more work of your
	 * own (a background copy, an export of your own) and let what is in
	 * flight finish; guest requests are already drained.  Called once.
	 */
	void (*quiesce)(struct td_image *img);
	/*
	 * Optional: how many requests or I/Os of this image are still in
	 * flight, whoever issued them (its own included).  The disk closes
	 * only when every image says 0: a driver's state must not be freed
	 * under an I/O the kernel still writes into.  NULL: never busy.
	 */
	uint64_t (*busy)(struct td_image *img);

	/* Human-readable state for diagnostics. */
	void (*debug)(struct td_image *img, FILE *out);
	/* Driver-specific statistics as "key=value" lines. */
	void (*stats)(struct td_image *img, FILE *out);
};

struct td_image {
	const struct td_driver *drv;
	char *params;		/* the spec entry's parameters (e.g. the path) */
	unsigned flags;		/* TD_OPEN_* */
	uint64_t size_secs;	/* virtual size in sectors */
	bool info_discard;	/* supports DISCARD / WRITE_ZEROES itself */

	struct td_image *parent;	/* next image down, NULL at the bottom */
	struct td_image *child;		/* next image up, NULL at the top */
	struct td_disk *disk;

	struct tdr_loop *loop;
	struct tdr_io_ctx *io;

	void *priv;		/* drv->priv_size bytes, zeroed */
	struct td_image_stats stats;
};

/* ------------------------------------------------------------------ */
/* Driver table */

/* Looks up a driver by name; NULL if unknown. */
const struct td_driver *td_driver_find(const char *name);
/* Registers an extra driver (used by the replica filter and tests). */
int td_driver_register(const struct td_driver *drv);
/* Comma-separated list of known driver names, for error messages. */
const char *td_driver_names(void);

/*
 * Read-ahead window of the aio driver for sequential reads of O_DIRECT
 * images (tdr/readahead.h), in bytes: 0 turns it off.  Applies to images
 * opened afterwards; set from --readahead before any disk is opened.
 */
#define TD_READAHEAD_DEFAULT ((size_t)8 << 20)
void td_set_readahead(size_t window);

/* ------------------------------------------------------------------ */
/* Request flow */

/* Initialises a request for submission (zeroes the private fields). */
void td_request_init(struct td_request *req, enum td_op op, uint64_t sec, uint32_t secs,
		     char *buf, td_request_cb_t cb, void *cb_arg);

/* Dispatches req to img's driver, by op.  Range checks are the caller's. */
void td_queue_request(struct td_image *img, struct td_request *req);

/*
 * Passes req to img's parent.  With no parent: READ fills zeroes,
 * BLOCK_STATUS reports a zero hole, FLUSH succeeds, WRITE/DISCARD/
 * WRITE_ZEROES fail with -EIO (a chain's bottom must own its writes).
 */
void td_forward_request(struct td_image *img, struct td_request *req);

/*
 * Completes req: calls req->cb exactly once.  err is 0 or -errno.
 * Completion may happen before the call that queued the request returns
 * (a read below the bottom of a chain completes at once): issuers must be
 * ready for their callback to run inside td_disk_submit().
 */
void td_complete_request(struct td_request *req, int err);

/*
 * Splitting.  To serve req in pieces:
 *
 *     td_request_split_begin(req);
 *     for each piece:
 *         sub = td_request_sub(req, sec, secs);   // NULL: out of memory
 *         td_queue_request(..., sub) or td_forward_request(img, sub) or
 *         serve it and td_complete_request(sub, err);
 *     td_request_split_end(req);
 *
 * req completes (once) after split_end and every piece, with the first
 * error of any piece.  Pieces are heap-allocated and freed after their
 * completion; their buf points into req->buf.  A sub-request of a
 * BLOCK_STATUS copies its result into the parent only if it starts at
 * the parent's sec (the usual case: only the first run matters).
 */
void td_request_split_begin(struct td_request *req);
/* On allocation failure returns NULL and records -ENOMEM as req's error. */
struct td_request *td_request_sub(struct td_request *req, uint64_t sec, uint32_t secs);
void td_request_split_end(struct td_request *req);

/*
 * Serves WRITE_ZEROES by writing zeroes through img's own queue_write, in
 * pieces (for drivers with no cheaper way).  Fails with -ENOTSUP when the
 * request has TD_REQ_FAST_ZERO.
 */
void td_emulate_write_zeroes(struct td_image *img, struct td_request *req);

/*
 * A driver's shared lock (tdr/filelock.h) on the file of the image it
 * opens, name as in the spec: 0, or -errno with tdr_set_error() saying why.
 */
int td_image_lock_file(int fd, const char *name);

/* ------------------------------------------------------------------ */
/* Disks */

struct td_disk {
	struct td_image *top;		/* where requests enter */
	struct td_image *bottom;	/* the last parent */
	uint64_t size_secs;
	unsigned flags;
	char *spec;

	struct tdr_loop *loop;
	struct tdr_io_ctx *io;

	/* Requests submitted and not yet completed. */
	uint64_t inflight;
	bool borrowed;			/* td_disk_wrap(): images not ours to close */
	bool quiesced;			/* td_disk_quiesce() told the images */
	/* Drain waiters, called when inflight drops to 0. */
	struct tdr_list drain_waiters;
};

struct td_drain_waiter {
	struct tdr_list entry;
	struct tdr_defer defer;		/* private */
	struct td_disk *disk;		/* private */
	void (*cb)(struct td_disk *disk, void *arg);
	void *arg;
};

/*
 * Opens the stack described by spec ("type:params|type:params...") and each
 * image's parents.  On failure returns -errno with tdr_last_error() set to one
 * line naming the failing entry; nothing stays open.
 */
int td_disk_open(struct td_disk **out, const char *spec, unsigned flags,
		 struct tdr_loop *loop, struct tdr_io_ctx *io);
void td_disk_close(struct td_disk *disk);

/*
 * A disk around an image someone else owns (a driver's extra export):
 * requests enter at top; td_disk_close() frees only the disk object.
 */
int td_disk_wrap(struct td_disk **out, struct td_image *top, const char *name);

/*
 * Submits a request at the top of the stack.  Requests past the end fail
 * with -ENOSPC (writes) or -EINVAL; writes to a read-only disk with -EPERM.
 * The disk counts it in flight until its callback returns.
 */
void td_disk_submit(struct td_disk *disk, struct td_request *req);

/*
 * Calls w->cb once nothing is in flight, always from the event loop: never
 * inside td_disk_drain(), nor inside the completion that drained the disk
 * (the drivers may still be unwinding it, and w->cb may close the disk).
 */
void td_disk_drain(struct td_disk *disk, struct td_drain_waiter *w);

/*
 * Requests in flight in the disk, guest requests and the images' own
 * (their busy() hooks) together: td_disk_close() is safe at 0.  *who, if
 * not NULL, names the first busy image (NULL when only guest requests are).
 */
uint64_t td_disk_busy(struct td_disk *disk, struct td_image **who);

/*
 * The stop before a close: calls every image's quiesce() (top first),
 * then q->cb once td_disk_busy() is 0 (never from inside this call).  The
 * caller must have stopped sending requests.  A wait longer than
 * TD_QUIESCE_WARN_NS (or q->warn_every_ns) is logged, naming what is still
 * busy, and logged again at that interval; it never gives up (closing
 * under an I/O would let the kernel write into freed memory).
 */
#define TD_QUIESCE_WARN_NS (10ull * 1000 * 1000 * 1000)
struct td_quiesce {
	uint64_t warn_every_ns;		/* set before the call; 0: TD_QUIESCE_WARN_NS */
	struct td_disk *disk;		/* private from here on */
	struct tdr_timer timer;
	uint64_t start_ns, warn_ns;
	void (*cb)(struct td_disk *disk, void *arg);
	void *arg;
};
void td_disk_quiesce(struct td_disk *disk, struct td_quiesce *q,
		     void (*cb)(struct td_disk *disk, void *arg), void *arg);
/* Stops waiting (the callback will not run); the images stay quiesced. */
void td_disk_quiesce_cancel(struct td_quiesce *q);

/* Finds the first image in the stack with driver name drv, or NULL. */
struct td_image *td_disk_find_image(struct td_disk *disk, const char *drv);

/* Writes every image's debug() output and stats. */
void td_disk_debug(struct td_disk *disk, FILE *out);

/* ------------------------------------------------------------------ */
/* Spec parsing helpers (pure; used by td_disk_open and unit tests) */

/*
 * Splits "type:params" into its parts.  Returns 0, or -EINVAL with
 * tdr_last_error() set.  type must fit in typelen bytes.
 */
int td_spec_split_entry(const char *entry, char *type, size_t typelen, const char **params);

/*
 * Parses a comma-separated "key=value,key=value" option string into calls of
 * cb(key, value, arg) (value is "" for a bare key).  Stops at the first
 * non-zero return of cb and returns it.
 */
int td_parse_options(const char *opts, int (*cb)(const char *key, const char *value, void *arg),
		     void *arg);

#endif
