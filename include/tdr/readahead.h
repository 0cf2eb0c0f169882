/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Read-ahead for sequential streams on an O_DIRECT file.
 *
 * With O_DIRECT there is no page cache and so no kernel read-ahead: a
 * client that reads a file front to back keeps only its own requests in
 * flight at the disk (a guest's one or few).  This module notices a
 * sequential stream of reads, watches TDR_RA_PROBE more of them, and if
 * the client kept less than `window` bytes of reads in flight meanwhile,
 * keeps `window` bytes beyond the furthest request already being read, in
 * chunks of TDR_RA_CHUNK, into buffers of its own.  A request that falls
 * in chunks being read or already read is served from them (a memcpy);
 * anything else is the caller's to read.  A deep client (fio at iodepth
 * 32 with 1 MiB reads) is left alone: it keeps the disk busy itself, and
 * the copy would cost as much CPU as sending the data.
 *
 * Correctness rules:
 * - A write (or discard, write-zeroes) must be reported with
 *   tdr_ra_invalidate() when it is queued and again when it completes: a
 *   chunk read while the write was in flight may hold old data.  Reads
 *   already waiting for a chunk when a write arrives may still get the old
 *   data; NBD and the block layer leave overlapping concurrent requests
 *   unordered.
 * - Writes by other processes straight into the file are not seen by
 *   chunks read before them (as with any cache): --readahead 0 for files
 *   others write while they are served.
 * - Chunks are read through a libaio context of the module's own, so that
 *   closing can wait for them without running anyone else's callbacks.
 *
 * Memory: buffers are allocated while a stream runs, at most
 * TDR_RA_SLOTS_PER_WINDOW * window bytes, and given back when the stream
 * ends (a read elsewhere) or the file is closed.
 */
#ifndef TDR_READAHEAD_H
#define TDR_READAHEAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "tdr/loop.h"

#define TDR_RA_CHUNK ((size_t)1 << 20)
/* Ring capacity in windows: chunks ahead plus those clients still wait for. */
#define TDR_RA_SLOTS_PER_WINDOW 4
/* Largest window accepted (and by the --readahead options). */
#define TDR_RA_MAX_WINDOW ((size_t)256 << 20)
/* Sequential reads in a row (after the first) that start a stream. */
#define TDR_RA_TRIGGER 2
/* Reads of a new stream watched (and read by the caller) before deciding. */
#define TDR_RA_PROBE 8

struct tdr_ra;
struct tdr_ra_read;

/* ok false: the read-ahead could not serve it after all; read it directly. */
typedef void (*tdr_ra_done_fn)(struct tdr_ra_read *rd, bool ok);

struct tdr_ra_wait {
	struct tdr_ra_wait *next;
	struct tdr_ra_read *rd;
};

/* Embedded in the caller's per-request state. */
struct tdr_ra_read {
	char *buf;
	uint64_t off;
	size_t len;
	tdr_ra_done_fn done;
	/* --- private --- */
	unsigned waiting;		/* chunks still being read */
	bool failed;
	struct tdr_ra_wait w[2];	/* a read of at most one chunk spans at most two */
};

struct tdr_ra_stats {
	uint64_t streams;	/* sequential streams detected */
	uint64_t hits;		/* reads served from read-ahead chunks */
	uint64_t misses;	/* reads in a stream the caller had to do itself */
	uint64_t deep;		/* reads of streams left to a client deep enough on its own */
	uint64_t chunks;	/* chunks read ahead */
	uint64_t unused;	/* chunks dropped without serving a read */
	uint64_t invalidated;	/* chunks dropped because of a write */
	uint64_t reading;	/* chunks being read now */
};

/*
 * A read-ahead for fd (opened with O_DIRECT) of size bytes, `window`
 * bytes ahead (a multiple of TDR_RA_CHUNK, at most TDR_RA_MAX_WINDOW).
 * 0 or -errno.
 */
int tdr_ra_new(struct tdr_ra **out, struct tdr_loop *loop, int fd, uint64_t size, size_t window);
/* Waits for chunks still being read (their waiters are not called). */
void tdr_ra_free(struct tdr_ra *ra);

/*
 * Offers a read to the read-ahead.  true: rd->done will be called, maybe
 * before this returns.  false: the caller reads it itself (the read still
 * counts towards detecting a stream).  busy: bytes of other reads the
 * caller has in flight, which tells a deep client from a shallow one.
 */
bool tdr_ra_read(struct tdr_ra *ra, struct tdr_ra_read *rd, uint64_t busy);
/* A write to [off, off + len) was queued or has completed. */
void tdr_ra_invalidate(struct tdr_ra *ra, uint64_t off, uint64_t len);

void tdr_ra_get_stats(const struct tdr_ra *ra, struct tdr_ra_stats *st);
/* Chunk buffers currently allocated, in bytes (for tests and stats). */
size_t tdr_ra_memory(const struct tdr_ra *ra);

/* Parses a --readahead argument: bytes with an optional K, M or G suffix (KiB without). */
int tdr_ra_parse_window(const char *s, size_t *window);
/* The usage error for a bad --readahead (one %s: the argument). */
#define TDR_RA_WINDOW_ERROR \
	"bad --readahead '%s'; give whole MiB up to 256M, e.g. 8M or 32M, or 0 to turn it off"

#endif
