/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Read-ahead for sequential streams on an O_DIRECT file (tdr/readahead.h).
 *
 * Chunk k covers [k * TDR_RA_CHUNK, (k + 1) * TDR_RA_CHUNK) and lives in
 * slot k % nslots of a ring.  While a stream runs, `pos` is the end of the
 * furthest read seen and every chunk up to `window` bytes beyond it is
 * being read or has been; `next_key` is the first chunk not yet asked for.
 * A chunk whose slot is still held by an older one that is being read
 * waits (the ring is full: clients are that far behind); a slot holding an
 * older chunk that has been read is simply taken over.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/io.h"
#include "tdr/log.h"
#include "tdr/readahead.h"

enum ra_state { RA_FREE, RA_READING, RA_READY };

struct ra_slot {
	struct tdr_iocb io;	/* first: the completion's arg is the slot */
	struct tdr_ra *ra;
	uint64_t key;
	enum ra_state state;
	bool stale;		/* a write overlapped it while it was being read */
	bool used;		/* served at least one read */
	size_t want;		/* bytes of the file in this chunk */
	char *buf;
	struct tdr_ra_wait *waiters;
};

struct tdr_ra {
	struct tdr_loop *loop;
	struct tdr_io_ctx *io;	/* created with the first stream */
	int fd;
	uint64_t size;
	size_t window;
	unsigned ahead;		/* window / chunk */
	unsigned nslots;
	unsigned reading;	/* slots in RA_READING */
	struct ra_slot *slots;

	unsigned in_cb;		/* inside waiters' callbacks */
	bool dying;		/* tdr_ra_free() was called from one of them */
	bool broken;		/* no libaio context could be had: off for good */
	struct tdr_defer free_defer;

	bool streaming;
	unsigned probe_left;	/* reads still watched before deciding */
	uint64_t probe_max;	/* most bytes of reads in flight seen meanwhile */
	bool deep;		/* the client is deep enough: no read-ahead */
	unsigned seq;		/* sequential reads in a row, before a stream */
	uint64_t last_end;	/* end of the last read, before a stream */
	uint64_t pos;		/* end of the furthest read, in a stream */
	uint64_t next_key;

	struct tdr_ra_stats st;
};

static struct ra_slot *ra_slot(struct tdr_ra *ra, uint64_t key)
{
	return &ra->slots[key % ra->nslots];
}

int tdr_ra_new(struct tdr_ra **out, struct tdr_loop *loop, int fd, uint64_t size, size_t window)
{
	struct tdr_ra *ra;

	*out = NULL;
	if (!window || window % TDR_RA_CHUNK || window > TDR_RA_MAX_WINDOW)
		return -EINVAL;
	ra = calloc(1, sizeof(*ra));
	if (!ra)
		return -ENOMEM;
	ra->loop = loop;
	ra->fd = fd;
	ra->size = size;
	ra->window = window;
	ra->ahead = (unsigned)(window / TDR_RA_CHUNK);
	ra->nslots = ra->ahead * TDR_RA_SLOTS_PER_WINDOW;
	ra->slots = calloc(ra->nslots, sizeof(*ra->slots));
	if (!ra->slots) {
		free(ra);
		return -ENOMEM;
	}
	for (unsigned i = 0; i < ra->nslots; i++)
		ra->slots[i].ra = ra;
	*out = ra;
	return 0;
}

/* Frees slot s for another chunk, counting a chunk no read used. */
static void ra_drop(struct tdr_ra *ra, struct ra_slot *s)
{
	if (s->state != RA_FREE && !s->used)
		ra->st.unused++;
	s->state = RA_FREE;
}

static void ra_destroy(struct tdr_ra *ra)
{
	/* Waits for the chunks in the kernel; their buffers are freed after. */
	tdr_io_ctx_free(ra->io);
	for (unsigned i = 0; i < ra->nslots; i++)
		free(ra->slots[i].buf);
	free(ra->slots);
	free(ra);
}

static void ra_destroy_deferred(void *arg)
{
	ra_destroy(arg);
}

void tdr_ra_free(struct tdr_ra *ra)
{
	if (!ra)
		return;
	if (ra->in_cb) {
		/*
		 * Closed from a read's completion, inside our own context's
		 * completion loop: that context must outlive the loop.
		 */
		ra->dying = true;
		return;
	}
	ra_destroy(ra);
}

/* Copies the part of slot s that rd wants. */
static void ra_copy(const struct ra_slot *s, struct tdr_ra_read *rd)
{
	uint64_t start = s->key * TDR_RA_CHUNK;
	uint64_t from = rd->off > start ? rd->off : start;
	uint64_t end = rd->off + rd->len;
	uint64_t to = end < start + TDR_RA_CHUNK ? end : start + TDR_RA_CHUNK;

	memcpy(rd->buf + (from - rd->off), s->buf + (from - start), (size_t)(to - from));
}

static void ra_prefetch(struct tdr_ra *ra);

static void ra_chunk_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct ra_slot *s = arg;
	struct tdr_ra *ra = s->ra;
	struct tdr_ra_wait *w = s->waiters, *next, *ready = NULL;
	bool ok = res >= 0 && (size_t)res >= s->want;

	(void)io;
	ra->reading--;
	if (ra->dying) {
		s->state = RA_FREE;	/* closed: nobody waits any more */
		return;
	}
	s->waiters = NULL;
	if (ok && s->want < TDR_RA_CHUNK)
		memset(s->buf + s->want, 0, TDR_RA_CHUNK - s->want);
	/* Copy for every waiter before anyone's callback can touch the ring. */
	for (; w; w = next) {
		struct tdr_ra_read *rd = w->rd;

		next = w->next;
		if (ok)
			ra_copy(s, rd);
		else
			rd->failed = true;
		if (--rd->waiting == 0) {
			w->next = ready;
			ready = w;
		}
	}
	if (ok && !s->stale)
		s->state = RA_READY;
	else
		ra_drop(ra, s);
	s->stale = false;
	ra_prefetch(ra);
	ra->in_cb++;
	for (w = ready; w && !ra->dying; w = next) {
		next = w->next;
		w->rd->done(w->rd, !w->rd->failed);
	}
	if (--ra->in_cb == 0 && ra->dying) {
		tdr_defer_init(&ra->free_defer, ra_destroy_deferred, ra);
		tdr_loop_defer(ra->loop, &ra->free_defer);
	}
}

static bool ra_start_chunk(struct tdr_ra *ra, struct ra_slot *s, uint64_t key)
{
	uint64_t start = key * TDR_RA_CHUNK;
	size_t want = ra->size - start < TDR_RA_CHUNK ? (size_t)(ra->size - start) : TDR_RA_CHUNK;
	size_t len = (want + TDR_IO_ALIGN - 1) & ~(size_t)(TDR_IO_ALIGN - 1);

	if (!s->buf && !(s->buf = tdr_io_alloc(TDR_RA_CHUNK)))
		return false;
	s->key = key;
	s->state = RA_READING;
	s->stale = false;
	s->used = false;
	s->want = want;
	ra->reading++;
	ra->st.chunks++;
	tdr_io_pread(ra->io, &s->io, ra->fd, s->buf, len, start, ra_chunk_done, s);
	return true;
}

/* Asks for every chunk up to window bytes beyond pos that the ring can hold. */
static void ra_prefetch(struct tdr_ra *ra)
{
	uint64_t last = ra->size ? (ra->size - 1) / TDR_RA_CHUNK : 0;
	uint64_t hi = (ra->pos + ra->window + TDR_RA_CHUNK - 1) / TDR_RA_CHUNK;

	if (!ra->streaming || ra->probe_left || ra->deep)
		return;
	if (hi > last + 1)
		hi = last + 1;
	while (ra->next_key < hi) {
		struct ra_slot *s = ra_slot(ra, ra->next_key);

		if (s->state == RA_READING)
			break;		/* an older chunk still has its slot */
		ra_drop(ra, s);
		if (!ra_start_chunk(ra, s, ra->next_key))
			break;
		ra->next_key++;
	}
}

static void ra_stop_stream(struct tdr_ra *ra)
{
	ra->streaming = false;
	ra->seq = 0;
	for (unsigned i = 0; i < ra->nslots; i++) {
		struct ra_slot *s = &ra->slots[i];

		/* Chunks in flight finish on their own (and serve their waiters). */
		if (s->state == RA_READING) {
			s->stale = true;
			continue;
		}
		ra_drop(ra, s);
		free(s->buf);
		s->buf = NULL;
	}
}

static bool ra_start_stream(struct tdr_ra *ra, uint64_t end, uint64_t busy)
{
	if (!ra->io) {
		ra->io = tdr_io_ctx_new(ra->loop, ra->nslots);
		if (!ra->io) {
			/* Once: every later stream would fail the same way. */
			TDR_WARN("read-ahead turned off: %s", tdr_last_error());
			ra->broken = true;
			return false;
		}
	}
	ra->streaming = true;
	ra->st.streams++;
	ra->pos = end;
	ra->deep = false;
	ra->probe_left = TDR_RA_PROBE;
	ra->probe_max = busy;
	return true;
}

/* Serves rd from chunks k0..k1 if every one is there; false otherwise. */
static bool ra_serve(struct tdr_ra *ra, struct tdr_ra_read *rd, uint64_t k0, uint64_t k1)
{
	struct ra_slot *s[2];
	unsigned n = (unsigned)(k1 - k0 + 1), i;

	for (i = 0; i < n; i++) {
		s[i] = ra_slot(ra, k0 + i);
		if (s[i]->key != k0 + i || s[i]->state == RA_FREE || s[i]->stale)
			return false;
	}
	rd->waiting = 0;
	rd->failed = false;
	for (i = 0; i < n; i++) {
		s[i]->used = true;
		if (s[i]->state == RA_READY) {
			ra_copy(s[i], rd);
			continue;
		}
		rd->w[i].rd = rd;
		rd->w[i].next = s[i]->waiters;
		s[i]->waiters = &rd->w[i];
		rd->waiting++;
	}
	return true;
}

bool tdr_ra_read(struct tdr_ra *ra, struct tdr_ra_read *rd, uint64_t busy)
{
	uint64_t end = rd->off + rd->len, k0, k1;
	bool served;

	if (ra->broken)
		return false;
	if (!rd->len || rd->len > TDR_RA_CHUNK || end > ra->size) {
		if (ra->streaming)
			ra_stop_stream(ra);
		return false;
	}
	if (!ra->streaming) {
		ra->seq = rd->off == ra->last_end ? ra->seq + 1 : 0;
		ra->last_end = end;
		if (ra->seq >= TDR_RA_TRIGGER)
			ra_start_stream(ra, end, busy);
		return false;
	}
	/* In the stream: not beyond a chunk past pos, not behind the ring. */
	if (rd->off > ra->pos + TDR_RA_CHUNK ||
	    end + (uint64_t)ra->nslots * TDR_RA_CHUNK < ra->pos) {
		ra_stop_stream(ra);
		ra->last_end = end;
		return false;
	}
	if (end > ra->pos)
		ra->pos = end;
	/*
	 * Watch the client first.  One that keeps a window's worth of reads
	 * in flight keeps the disk as busy as we would, and a read-ahead
	 * would add nothing but a copy of every byte (which costs as much as
	 * sending it: measured, docs/benchmarks.md).  Reads served from
	 * chunks complete at once, so this cannot be judged later.
	 */
	if (ra->probe_left) {
		if (busy > ra->probe_max)
			ra->probe_max = busy;
		if (--ra->probe_left == 0) {
			ra->deep = ra->probe_max >= ra->window;
			ra->next_key = ra->pos / TDR_RA_CHUNK;
			if (!ra->deep)
				ra_prefetch(ra);
		}
		return false;
	}
	/* A client that grew deep later (waiting for our chunks, say). */
	if (busy >= ra->window)
		ra->deep = true;
	k0 = rd->off / TDR_RA_CHUNK;
	k1 = (end - 1) / TDR_RA_CHUNK;
	served = ra_serve(ra, rd, k0, k1);
	if (served)
		ra->st.hits++;
	else if (ra->deep)
		ra->st.deep++;
	else
		ra->st.misses++;
	/* What the caller reads itself is not read again. */
	if (!served && ra->next_key <= k1)
		ra->next_key = k1 + 1;
	ra_prefetch(ra);
	if (served && rd->waiting == 0)
		rd->done(rd, true);
	return served;
}

void tdr_ra_invalidate(struct tdr_ra *ra, uint64_t off, uint64_t len)
{
	uint64_t end = off + len;

	if (!ra || !len)
		return;
	for (unsigned i = 0; i < ra->nslots; i++) {
		struct ra_slot *s = &ra->slots[i];
		uint64_t start = s->key * TDR_RA_CHUNK;

		if (s->state == RA_FREE || end <= start || off >= start + TDR_RA_CHUNK)
			continue;
		ra->st.invalidated++;
		if (s->state == RA_READING)
			s->stale = true;
		else
			ra_drop(ra, s);
	}
}

void tdr_ra_get_stats(const struct tdr_ra *ra, struct tdr_ra_stats *st)
{
	*st = ra->st;
	st->reading = ra->reading;
}

size_t tdr_ra_memory(const struct tdr_ra *ra)
{
	size_t n = 0;

	for (unsigned i = 0; i < ra->nslots; i++)
		if (ra->slots[i].buf)
			n += TDR_RA_CHUNK;
	return n;
}

int tdr_ra_parse_window(const char *s, size_t *window)
{
	unsigned long long v;
	char *end;
	int shift = 10;

	if (!s || !*s || *s == '-')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case '\0':
		break;
	case 'k': case 'K':
		end++;
		break;
	case 'm': case 'M':
		shift = 20;
		end++;
		break;
	case 'g': case 'G':
		shift = 30;
		end++;
		break;
	default:
		return -EINVAL;
	}
	if (*end)
		return -EINVAL;
	if (v > (unsigned long long)(TDR_RA_MAX_WINDOW >> shift))
		return -ERANGE;
	v <<= shift;
	if (v % TDR_RA_CHUNK)
		return -EDOM;
	*window = (size_t)v;
	return 0;
}
