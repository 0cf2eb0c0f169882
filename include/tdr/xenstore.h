/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The xenstore control interface of a replicated disk (docs/xenstore.md).
 *
 * A control directory (by default
 * /local/domain/0/backend/tapdisk-replica/<domid>/<devid>) where the
 * toolstack queues requests, request/<id> = "<request line>" (the grammar
 * of tdr/replica.h), and the daemon answers each one exactly once at
 * response/<id> = "ok[ <info>]" or "error <ERRNO-NAME> <message>", and
 * publishes the replica's mode, state, last error, progress and statistics.
 *
 * It runs on the event loop without ever waiting for xenstored (see
 * xenstore/xs-conn.h), survives xenstored restarts (reconnects, re-registers
 * its watch, republishes) and daemon restarts (last-id and executing keys:
 * no request is executed twice).
 */
#ifndef TDR_XENSTORE_H
#define TDR_XENSTORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "tdr/loop.h"
#include "tdr/replica.h"

struct td_disk;
struct tdr_xs_ctl;

/* What a control directory drives: a disk's replica filter, or a fake in tests. */
struct tdr_xs_backend {
	/* replica_parse(): 0, or -EINVAL with msg saying why. */
	int (*parse)(void *arg, const char *line, struct replica_cmd *cmd, char *msg,
		     size_t msglen);
	/* replica_execute(): done exactly once, possibly before it returns. */
	void (*execute)(void *arg, const struct replica_cmd *cmd, replica_done_fn done,
			void *done_arg);
	/* The status as key=value lines (replica_format_status()); may be NULL. */
	void (*status)(void *arg, FILE *out);
	/* Registers (or, with NULL, removes) the change observer; may be NULL. */
	void (*set_observer)(void *arg, void (*changed)(void *), void *cb_arg);
	/* Called by tdr_xs_ctl_free(); may be NULL. */
	void (*free)(void *arg);
};

struct tdr_xs_opts {
	const char *dir;	/* absolute control directory */
	const char *xs_path;	/* xenstored socket or device; NULL: the default */
	uint32_t stats_ms;	/* statistics publishing period; 0: 1000 */
};

/* The default control directory of a guest's disk. 0 or -ENAMETOOLONG. */
int tdr_xs_default_dir(char *buf, size_t len, unsigned domid, unsigned devid);

/* Checks a control directory path; 0, or -EINVAL with tdr_set_error(). */
int tdr_xs_check_dir(const char *dir);

/* 0 (connecting in the background), or -errno with tdr_set_error(). */
int tdr_xs_ctl_new(struct tdr_xs_ctl **out, struct tdr_loop *loop, const struct tdr_xs_opts *o,
		   const struct tdr_xs_backend *be, void *be_arg);

/*
 * The control directory of a disk: requests go to its replica filter; a disk
 * without one answers every request with ENODEV.
 */
int tdr_xs_ctl_new_disk(struct tdr_xs_ctl **out, struct tdr_loop *loop,
			const struct tdr_xs_opts *o, struct td_disk *disk);

void tdr_xs_ctl_free(struct tdr_xs_ctl *x);

struct tdr_xs_ctl_info {
	bool connected;		/* to xenstored */
	bool ready;		/* directory set up, watch registered */
	bool busy;		/* a request is executing */
	uint64_t last_id;	/* highest request id answered */
	uint64_t executed;	/* requests passed to the backend */
	uint64_t answered;	/* responses written (ok or error) */
	uint64_t connects;	/* successful (re)connections */
	size_t queued;		/* bytes not yet taken by xenstored's socket */
};

void tdr_xs_ctl_get_info(const struct tdr_xs_ctl *x, struct tdr_xs_ctl_info *info);

#endif
