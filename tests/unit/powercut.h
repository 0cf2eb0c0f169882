/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * A power-cut model for crash tests.
 *
 * A process killed mid-run (tdr_io_set_fault) loses nothing the kernel
 * took: every completed write is in the page cache or the disk's cache.
 * A power cut loses more.  A disk with a volatile write cache keeps, of
 * the writes to a file, those that completed before a sync of the file
 * was issued and that sync completed, and those written with RWF_DSYNC
 * that completed; any other write the kernel took may be there or not,
 * whole or in part (sector by sector), and in any mix.
 *
 * pc_start() hooks tdr_io's journal and logs every write and sync to one
 * file (pc_start_files: a few, such as an image chain), with its data, in
 * the order the kernel took and finished them; the test adds its own
 * points to the same history with pc_mark() (a guest request
 * acknowledged).  Afterwards pc_for_each_cut() rebuilds the files as
 * they could be after a power cut at every point of the history,
 * each time in several versions (none of the undecided writes, all of
 * them, each alone, all but each, random mixes of whole writes and of
 * sectors), and calls the test's check on each.
 */
#ifndef TDR_TEST_POWERCUT_H
#define TDR_TEST_POWERCUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "tdr/io.h"

/* One write, sync or truncate of a file, as the kernel saw it. */
struct pc_io {
	unsigned file;		/* index into pc_log.files */
	bool sync;
	bool full_sync;		/* an fsync (also makes a truncate durable), not an fdatasync */
	bool trunc;		/* a truncate to off (len 0) */
	bool dsync;		/* a write with RWF_DSYNC */
	uint64_t off;
	size_t len;
	char *data;
	size_t submit;		/* event numbers */
	size_t done;		/* PC_NEVER while in flight */
	ssize_t res;
	const struct tdr_iocb *iocb;	/* the request, while in flight */
};

#define PC_NEVER ((size_t)-1)
#define PC_MAX_FILES 4

struct pc_logged_file {
	char path[4096];
	dev_t dev;
	ino_t ino;
	char *before;		/* the file when the log started */
	size_t before_len;
};

struct pc_log {
	struct pc_logged_file files[PC_MAX_FILES];
	unsigned nfiles;
	struct pc_io *ios;
	size_t n, cap;
	size_t events;		/* journal events and marks so far */
	size_t others;		/* writes to other files (not modelled) */
};

/* A version of the files after a cut, as pc_for_each_cut() built it. */
struct pc_cut {
	size_t at;		/* the cut follows this many events */
	const char *how;	/* which undecided writes it holds, in words */
	size_t durable;		/* writes that had to be there */
	size_t undecided;	/* writes that might have been */
};

typedef void (*pc_check_fn)(void *arg, const struct pc_cut *cut);

/*
 * Starts logging writes to path (or to the n files at paths; a sync
 * covers its own file only).  Their content now is the "before" state,
 * taken as durable: drain or flush what came before if that matters.
 */
void pc_start(struct pc_log *log, const char *path, struct tdr_io_ctx *io);
void pc_start_files(struct pc_log *log, const char *const *paths, unsigned n,
		    struct tdr_io_ctx *io);
void pc_stop(struct pc_log *log, struct tdr_io_ctx *io);
/*
 * The same for the synchronous VHD library (vhd_sync_set_journal: what
 * vhd-util runs).  Each call is logged as it returns, taken and finished
 * at once.  A truncate may reach the disk at any time after it returned
 * (a file system commits its metadata when it likes) and surely has after
 * an fsync that follows it; an fdatasync is not taken to cover it.
 */
void pc_start_sync_files(struct pc_log *log, const char *const *paths, unsigned n);
void pc_stop_sync(struct pc_log *log);
void pc_free(struct pc_log *log);

/* Adds a point of the test's to the history; returns its event number. */
size_t pc_mark(struct pc_log *log);

/* Whether write i must be / may be on disk after a cut after `at` events. */
bool pc_durable(const struct pc_log *log, size_t i, size_t at);
bool pc_undecided(const struct pc_log *log, size_t i, size_t at);

/*
 * For every cut from 0 to log->events events, rebuilds the logged files
 * in every version and calls check, which must not change them (the next
 * version is built from them).  Returns the number of versions checked.
 */
size_t pc_for_each_cut(const struct pc_log *log, pc_check_fn check, void *arg);

#endif
