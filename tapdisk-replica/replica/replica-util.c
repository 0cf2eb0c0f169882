/* SPDX-License-Identifier: BSD-3-Clause */
/* The replica driver's range lock and sparse chunk sets. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "replica-int.h"

/* ---------------------------------------------------------- range lock */

void replica_rlock_init(struct replica_rlock *l)
{
	tdr_list_init(&l->held);
	tdr_list_init(&l->waiting);
	tdr_list_init(&l->big);
	for (unsigned i = 0; i < RLOCK_BUCKETS; i++)
		tdr_list_init(&l->bucket[i]);
}

static bool ranges_conflict(const struct replica_range *a, const struct replica_range *b)
{
	return a->sec < b->end && b->sec < a->end && (a->exclusive || b->exclusive);
}

static bool range_is_big(const struct replica_range *rr)
{
	return rr->end > rr->sec && rr->end - rr->sec > (1ull << RLOCK_BUCKET_SHIFT);
}

static bool list_conflicts(const struct tdr_list *head, const struct replica_range *rr)
{
	const struct tdr_list *pos;

	for (pos = head->next; pos != head; pos = pos->next)
		if (ranges_conflict(tdr_list_entry(pos, struct replica_range, bentry), rr))
			return true;
	return false;
}

/*
 * Whether a granted range conflicts with rr.  A small granted range (at
 * most one bucket long) that overlaps rr starts less than a bucket before
 * rr, so only the buckets from the one before rr's start to the one of its
 * end need a look; the big ones are always checked.
 */
static bool held_conflicts(struct replica_rlock *l, const struct replica_range *rr)
{
	uint64_t first = rr->sec >> RLOCK_BUCKET_SHIFT;
	uint64_t last = (rr->end > rr->sec ? rr->end - 1 : rr->sec) >> RLOCK_BUCKET_SHIFT;

	if (first)
		first--;
	if (last - first + 1 >= RLOCK_BUCKETS) {
		first = 0;
		last = RLOCK_BUCKETS - 1;
	}
	for (uint64_t b = first; b <= last; b++)
		if (list_conflicts(&l->bucket[b % RLOCK_BUCKETS], rr))
			return true;
	return list_conflicts(&l->big, rr);
}

/*
 * A waiter may go when it conflicts with no holder and with no earlier
 * waiter: the second rule keeps overlapping requests in arrival order.
 */
static bool range_may_go(struct replica_rlock *l, struct replica_range *rr)
{
	struct tdr_list *pos, *tmp;

	if (held_conflicts(l, rr))
		return false;
	tdr_list_for_each_safe(pos, tmp, &l->waiting) {
		struct replica_range *w = tdr_list_entry(pos, struct replica_range, entry);

		if (w == rr)
			break;
		if (ranges_conflict(w, rr))
			return false;
	}
	return true;
}

static void range_grant(struct replica_rlock *l, struct replica_range *rr)
{
	tdr_list_del(&rr->entry);
	tdr_list_add_tail(&rr->entry, &l->held);
	if (range_is_big(rr))
		tdr_list_add_tail(&rr->bentry, &l->big);
	else
		tdr_list_add_tail(&rr->bentry,
				  &l->bucket[(rr->sec >> RLOCK_BUCKET_SHIFT) % RLOCK_BUCKETS]);
	rr->granted = true;
	rr->granted_cb(rr, rr->arg);
}

void replica_rlock_acquire(struct replica_rlock *l, struct replica_range *rr, uint64_t sec,
			   uint64_t end, bool exclusive,
			   void (*granted_cb)(struct replica_range *rr, void *arg), void *arg)
{
	rr->sec = sec;
	rr->end = end;
	rr->exclusive = exclusive;
	rr->granted = false;
	rr->granted_cb = granted_cb;
	rr->arg = arg;
	tdr_list_add_tail(&rr->entry, &l->waiting);
	if (range_may_go(l, rr))
		range_grant(l, rr);
}

/*
 * Grants every waiter that may now go, one at a time and rescanning after
 * each, because a granted callback may acquire or release ranges itself.
 */
static void rlock_wake(struct replica_rlock *l)
{
	struct tdr_list *pos, *tmp;

restart:
	tdr_list_for_each_safe(pos, tmp, &l->waiting) {
		struct replica_range *w = tdr_list_entry(pos, struct replica_range, entry);

		if (range_may_go(l, w)) {
			range_grant(l, w);
			goto restart;
		}
	}
}

void replica_rlock_forget(struct replica_rlock *l, struct replica_range *rr)
{
	(void)l;
	tdr_list_del(&rr->entry);
	if (rr->granted)
		tdr_list_del(&rr->bentry);
	rr->granted = false;
}

void replica_rlock_release(struct replica_rlock *l, struct replica_range *rr)
{
	replica_rlock_forget(l, rr);
	if (!tdr_list_empty(&l->waiting))
		rlock_wake(l);
}

/* ------------------------------------------------------------ chunkset */

int replica_chunkset_init(struct replica_chunkset *cs, uint64_t disk_secs, uint32_t chunk_secs)
{
	memset(cs, 0, sizeof(*cs));
	cs->chunk_secs = chunk_secs;
	cs->nchunks = (disk_secs + chunk_secs - 1) / chunk_secs;
	cs->bits = calloc((cs->nchunks + 63) / 64 ? (cs->nchunks + 63) / 64 : 1, sizeof(uint64_t));
	return cs->bits ? 0 : -ENOMEM;
}

void replica_chunkset_free(struct replica_chunkset *cs)
{
	free(cs->bits);
	free(cs->set_list);
	memset(cs, 0, sizeof(*cs));
}

bool replica_chunkset_test(const struct replica_chunkset *cs, uint64_t chunk)
{
	return chunk < cs->nchunks && (cs->bits[chunk / 64] >> (chunk % 64)) & 1;
}

void replica_chunkset_set(struct replica_chunkset *cs, uint64_t chunk)
{
	if (chunk >= cs->nchunks || replica_chunkset_test(cs, chunk))
		return;
	if (cs->nset != UINT64_MAX && cs->nset == cs->set_cap) {
		uint64_t words = (cs->nchunks + 63) / 64;
		uint64_t cap = cs->set_cap ? cs->set_cap * 2 : 256;
		uint64_t *l = NULL;

		/*
		 * Past as many entries as the bitmap has words, the list costs
		 * more to keep than clear_all's memset of the bitmap saves.
		 * Out of memory, the same: the list is an accelerator, the bit
		 * is what counts, and losing one would lose a write's tracking.
		 */
		if (cs->set_cap < words)
			l = realloc(cs->set_list, cap * sizeof(*l));
		if (l) {
			cs->set_list = l;
			cs->set_cap = cap;
		} else {
			cs->nset = UINT64_MAX;
		}
	}
	if (cs->nset != UINT64_MAX)
		cs->set_list[cs->nset++] = chunk;
	cs->bits[chunk / 64] |= 1ull << (chunk % 64);
	cs->count++;
}

void replica_chunkset_set_range(struct replica_chunkset *cs, uint64_t sec, uint64_t secs)
{
	if (!secs)
		return;
	for (uint64_t c = sec / cs->chunk_secs; c <= (sec + secs - 1) / cs->chunk_secs; c++)
		replica_chunkset_set(cs, c);
}

void replica_chunkset_clear(struct replica_chunkset *cs, uint64_t chunk)
{
	if (!replica_chunkset_test(cs, chunk))
		return;
	cs->bits[chunk / 64] &= ~(1ull << (chunk % 64));
	cs->count--;
}

void replica_chunkset_clear_all(struct replica_chunkset *cs)
{
	if (cs->nset == UINT64_MAX) {
		/* The list overflowed: more was set than a list is worth. */
		memset(cs->bits, 0, ((cs->nchunks + 63) / 64) * sizeof(uint64_t));
	} else {
		for (uint64_t i = 0; i < cs->nset; i++)
			cs->bits[cs->set_list[i] / 64] &= ~(1ull << (cs->set_list[i] % 64));
	}
	cs->nset = 0;
	cs->count = 0;
}

uint64_t replica_chunkset_count(const struct replica_chunkset *cs)
{
	return cs->count;
}

bool replica_chunkset_next(const struct replica_chunkset *cs, uint64_t from, uint64_t *chunk)
{
	uint64_t w = from / 64;

	if (from >= cs->nchunks)
		return false;
	uint64_t word = cs->bits[w] & (~0ull << (from % 64));

	for (;;) {
		if (word) {
			uint64_t c = w * 64 + (uint64_t)__builtin_ctzll(word);

			if (c >= cs->nchunks)
				return false;
			*chunk = c;
			return true;
		}
		if (++w >= (cs->nchunks + 63) / 64)
			return false;
		word = cs->bits[w];
	}
}
