/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The replica operations: the one module that the control socket, the
 * command line tool and the xenstore interface all call.
 *
 * A request is a line of words, the same on every interface:
 *
 *     start [mode=primary|secondary] [addr=ADDR] [export=NAME] [timeout=MS] [sync=both|local]
 *     checkpoint
 *     stop [failover]
 *     failover
 *     resync [full|incremental]
 *     get-error
 *     status
 *
 * ADDR is tcp:HOST:PORT or unix:PATH (the secondary's NBD export, for a
 * primary).  Words the driver's spec already gave need not be repeated.
 * replica_parse() turns the line into a struct replica_cmd, refusing
 * unknown words, missing or extra arguments and values out of range with a
 * precise message, before anything changes.
 */
#ifndef TDR_REPLICA_H
#define TDR_REPLICA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct td_image;
struct td_disk;

enum replica_mode {
	REPLICA_MODE_UNSET = 0,
	REPLICA_MODE_PRIMARY,
	REPLICA_MODE_SECONDARY,
};

/*
 * States.  Secondary: none -> running -> (failover -> done | failover-failed).
 * Primary: none -> running <-> broken (link lost, changes tracked) -> resync
 * -> running; stop/failover -> done (unreplicated, changes tracked).
 */
enum replica_state {
	REPLICA_STATE_NONE = 0,
	REPLICA_STATE_RUNNING,
	REPLICA_STATE_FAILOVER,
	REPLICA_STATE_FAILOVER_FAILED,
	REPLICA_STATE_DONE,
	REPLICA_STATE_BROKEN,
	REPLICA_STATE_RESYNC,
};

enum replica_op {
	REPLICA_OP_START = 1,
	REPLICA_OP_CHECKPOINT,
	REPLICA_OP_STOP,
	REPLICA_OP_FAILOVER,
	REPLICA_OP_RESYNC,
	REPLICA_OP_GET_ERROR,
	REPLICA_OP_STATUS,
};

enum replica_sync {
	REPLICA_SYNC_DEFAULT = 0,
	REPLICA_SYNC_BOTH,	/* a guest write completes when local and remote are done */
	REPLICA_SYNC_LOCAL,	/* completes at the local write; checkpoint waits for the rest */
};

/* sync=local: how far the guest may run ahead of the secondary (then it waits again). */
#define REPLICA_LOCAL_AHEAD_BYTES (16ull << 20)
#define REPLICA_LOCAL_AHEAD_REQS  256u

#define REPLICA_ADDR_MAX 256
#define REPLICA_NAME_MAX 256
#define REPLICA_MSG_MAX  256

struct replica_cmd {
	enum replica_op op;
	enum replica_mode mode;		/* start: UNSET keeps the spec's */
	char addr[REPLICA_ADDR_MAX];	/* start: "" keeps the spec's */
	char export_name[REPLICA_NAME_MAX];
	bool has_export;
	uint32_t timeout_ms;		/* start: 0 keeps the spec's */
	enum replica_sync sync;
	bool failover;			/* stop failover */
	bool full;			/* resync full */
};

/* Parses a request line.  0, or -EINVAL with msg (msglen bytes) saying why. */
int replica_parse(const char *line, struct replica_cmd *cmd, char *msg, size_t msglen);

const char *replica_state_name(enum replica_state s);
const char *replica_mode_name(enum replica_mode m);

struct replica_stats {
	uint64_t svm_reqs, svm_bytes;		/* guest (PVM or SVM) requests */
	uint64_t export_reqs, export_bytes;	/* secondary: writes from the primary */
	uint64_t cbw_count, cbw_bytes;		/* secondary: copy-before-write */
	uint64_t fwd_reqs, fwd_bytes;		/* primary: writes sent to the secondary */
	uint64_t fwd_spliced_bytes;		/* primary: payload bytes the link sent without a copy */
	uint64_t checkpoints;
	uint64_t ckpt_last_ns, ckpt_max_ns, ckpt_total_ns;
	uint64_t dirty_bytes;			/* primary: changes not yet on the secondary */
	uint64_t link_errors;
	uint64_t link_tls;			/* primary: 1 while the link runs over TLS */
	uint64_t fo_hold_ns;			/* secondary: SVM writes held by the last failover */
	uint64_t fo_flushes;			/* secondary: the last failover's background flushes */
	uint64_t fo_svm_peak_bytes;		/* secondary: its most copy bytes in flight, SVM busy */
	uint64_t run_flushes;			/* secondary, scratch mode: background flushes while running */
};

/* Every counter of struct replica_stats by name, for the interfaces that list them. */
struct replica_stat_field {
	const char *name;
	size_t offset;
};

extern const struct replica_stat_field replica_stat_fields[];
extern const size_t replica_n_stat_fields;

static inline uint64_t replica_stat_value(const struct replica_stats *s,
					  const struct replica_stat_field *f)
{
	return *(const uint64_t *)(const void *)((const char *)s + f->offset);
}

struct replica_status {
	enum replica_mode mode;
	enum replica_state state;
	int error;				/* last error (negative errno) or 0 */
	char error_msg[REPLICA_MSG_MAX];
	uint64_t progress_done, progress_total;	/* failover commit or resync, bytes */
	struct replica_stats stats;
};

/* Completion of an operation: err 0 or -errno, msg a one-line explanation ("" on success). */
typedef void (*replica_done_fn)(void *arg, int err, const char *msg);

/* The replica filter of a disk, or NULL if it has none. */
struct td_image *replica_find(struct td_disk *disk);

/*
 * Executes cmd on the replica image.  done runs exactly once, possibly before
 * replica_execute returns (refusals, get-error, status) or later from the loop
 * (checkpoint drains, failover commits in the background and completes when
 * the failover has started; watch the state for its end).
 */
void replica_execute(struct td_image *img, const struct replica_cmd *cmd,
		     replica_done_fn done, void *arg);

void replica_get_status(struct td_image *img, struct replica_status *st);

/*
 * A secondary's writable export of the secondary disk (where the primary's
 * writes go, with copy-before-write while running), or NULL for a primary.
 * The driver serves it itself when its spec has addr=; otherwise the daemon
 * may serve it next to the main export.
 */
struct td_disk *replica_export_disk(struct td_image *img);
/* The export's name (export= in the spec, default "secondary"). */
const char *replica_export_name(struct td_image *img);

/* Writes the status as "key=value" lines (the same keys xenstore publishes). */
void replica_format_status(const struct replica_status *st, FILE *out);

/*
 * Observer: called (from the loop) after any change of state, error or
 * progress, so that xenstore can republish.  One observer per image.
 */
void replica_set_observer(struct td_image *img, void (*changed)(void *arg), void *arg);

#endif
