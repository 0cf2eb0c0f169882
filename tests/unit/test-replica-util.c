/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The replica driver's range lock, against a brute-force model: granted
 * ranges never conflict, a waiter waits only for a holder or an earlier
 * waiter it overlaps, and ranges are found across bucket boundaries, bucket
 * aliasing and the list of big ranges.  Its chunk set, against a bool
 * array.
 */
#include <check.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/log.h"
#include "replica-int.h"
#include "check-run.h"

#define NR 256

struct slot {
	struct replica_range rr;
	bool used;		/* acquired and not released */
	bool granted;		/* the callback ran */
	unsigned order;		/* arrival order among waiters */
};

static struct slot slots[NR];
static unsigned arrivals;

static void granted(struct replica_range *rr, void *arg)
{
	struct slot *s = arg;

	ck_assert_ptr_eq(&s->rr, rr);
	ck_assert(!s->granted);
	s->granted = true;
}

static bool conflict(const struct replica_range *a, const struct replica_range *b)
{
	return a->sec < b->end && b->sec < a->end && (a->exclusive || b->exclusive);
}

static void acquire(struct replica_rlock *l, unsigned i, uint64_t sec, uint64_t end, bool excl)
{
	ck_assert(!slots[i].used);
	slots[i].used = true;
	slots[i].granted = false;
	slots[i].order = arrivals++;
	replica_rlock_acquire(l, &slots[i].rr, sec, end, excl, granted, &slots[i]);
}

static void release(struct replica_rlock *l, unsigned i)
{
	ck_assert(slots[i].used && slots[i].granted);
	slots[i].used = false;
	slots[i].granted = false;
	replica_rlock_release(l, &slots[i].rr);
}

/* The model: what must hold after every step. */
static void check_model(void)
{
	for (unsigned i = 0; i < NR; i++) {
		if (!slots[i].used)
			continue;
		if (slots[i].granted) {
			for (unsigned j = i + 1; j < NR; j++)
				if (slots[j].used && slots[j].granted)
					ck_assert_msg(!conflict(&slots[i].rr, &slots[j].rr),
						      "granted %u and %u conflict", i, j);
			continue;
		}
		/* A waiter must be blocked by a holder or an earlier waiter. */
		bool blocked = false;

		for (unsigned j = 0; j < NR && !blocked; j++) {
			if (j == i || !slots[j].used || !conflict(&slots[i].rr, &slots[j].rr))
				continue;
			if (slots[j].granted || slots[j].order < slots[i].order)
				blocked = true;
		}
		ck_assert_msg(blocked, "waiter %u [%llu, %llu) could go", i,
			      (unsigned long long)slots[i].rr.sec, (unsigned long long)slots[i].rr.end);
	}
}

static void reset(struct replica_rlock *l)
{
	memset(slots, 0, sizeof(slots));
	arrivals = 0;
	replica_rlock_init(l);
}

START_TEST(basic_rules)
{
	struct replica_rlock l;

	reset(&l);
	acquire(&l, 0, 0, 128, false);
	acquire(&l, 1, 64, 192, false);		/* shared with shared: goes */
	ck_assert(slots[0].granted && slots[1].granted);
	acquire(&l, 2, 100, 170, true);		/* exclusive: waits for both */
	ck_assert(!slots[2].granted);
	acquire(&l, 3, 150, 160, false);	/* shared, but behind a waiting writer it overlaps */
	ck_assert(!slots[3].granted);
	acquire(&l, 4, 500, 600, true);		/* elsewhere: goes */
	ck_assert(slots[4].granted);
	release(&l, 0);
	ck_assert(!slots[2].granted);
	release(&l, 1);
	ck_assert(slots[2].granted);
	ck_assert(!slots[3].granted);		/* now behind the writer that holds */
	check_model();
	release(&l, 2);
	ck_assert(slots[3].granted);
	check_model();
}
END_TEST

/* Neighbours across a bucket boundary, aliased buckets, big ranges. */
START_TEST(buckets_and_big_ranges)
{
	const uint64_t b = 1ull << RLOCK_BUCKET_SHIFT;
	struct replica_rlock l;

	reset(&l);
	acquire(&l, 0, b - 1, b + 1, true);		/* straddles buckets 0 and 1 */
	acquire(&l, 1, b, b + 8, true);			/* starts in bucket 1: conflicts */
	ck_assert(slots[0].granted && !slots[1].granted);
	acquire(&l, 2, RLOCK_BUCKETS * b, RLOCK_BUCKETS * b + 8, true);	/* aliases bucket 0 */
	ck_assert(slots[2].granted);
	acquire(&l, 3, 2 * b - 1, 2 * b, true);		/* ends before bucket 2, no overlap */
	ck_assert(slots[3].granted);
	acquire(&l, 4, 10 * b, 50 * b, true);		/* big */
	ck_assert(slots[4].granted);
	acquire(&l, 5, 50 * b - 1, 50 * b, false);	/* last sector of the big one */
	ck_assert(!slots[5].granted);
	acquire(&l, 6, 50 * b, 50 * b + 1, false);	/* just after it */
	ck_assert(slots[6].granted);
	acquire(&l, 7, 0, 1000 * b, false);		/* huge: overlaps 0, 2, 3, 4 */
	ck_assert(!slots[7].granted);
	check_model();
	release(&l, 0);
	ck_assert(slots[1].granted);
	release(&l, 1);
	release(&l, 2);
	release(&l, 3);
	ck_assert(!slots[7].granted);
	release(&l, 4);
	ck_assert(slots[5].granted);
	ck_assert(slots[7].granted);			/* shared with the shared 5 and 6 */
	check_model();
}
END_TEST

/* Thousands of random acquires and releases, checked after each step. */
START_TEST(randomized_against_model)
{
	const uint64_t lens[] = { 0, 1, 8, 16, 128, 2047, 2048, 2049, 4096, 100000 };
	struct replica_rlock l;

	reset(&l);
	srandom(1234);
	for (int step = 0; step < 20000; step++) {
		unsigned i = (unsigned)random() % NR;

		if (!slots[i].used) {
			uint64_t len = lens[(unsigned)random() % (sizeof(lens) / sizeof(lens[0]))];
			/* a small space, so that ranges meet often */
			uint64_t sec = (uint64_t)random() % (64ull << RLOCK_BUCKET_SHIFT);

			if (random() % 8 == 0)
				sec += (uint64_t)RLOCK_BUCKETS << RLOCK_BUCKET_SHIFT;	/* aliasing */
			acquire(&l, i, sec, sec + len, random() % 3 != 0);
		} else if (slots[i].granted) {
			release(&l, i);
		}
		if (step % 25 == 0 || step > 19900)
			check_model();
	}
	/* Release everything: every waiter must get its turn. */
	for (int round = 0; round < NR; round++) {
		bool any = false;

		for (unsigned i = 0; i < NR; i++)
			if (slots[i].used && slots[i].granted) {
				release(&l, i);
				any = true;
			}
		if (!any)
			break;
	}
	for (unsigned i = 0; i < NR; i++)
		ck_assert(!slots[i].used);
	ck_assert(tdr_list_empty(&l.held));
	ck_assert(tdr_list_empty(&l.waiting));
	ck_assert(tdr_list_empty(&l.big));
}
END_TEST

/* ------------------------------------------------------------ chunkset */

/* The set against a plain bool array: test, count, next, in every mode. */
static void chunkset_check(const struct replica_chunkset *cs, const bool *model, uint64_t n)
{
	uint64_t count = 0, c = 0, from = 0;

	for (uint64_t i = 0; i < n; i++) {
		ck_assert_msg(replica_chunkset_test(cs, i) == model[i], "chunk %llu",
			      (unsigned long long)i);
		count += model[i];
	}
	ck_assert_uint_eq(replica_chunkset_count(cs), count);
	for (uint64_t i = 0; i < n; i++) {
		if (!model[i])
			continue;
		ck_assert(replica_chunkset_next(cs, from, &c));
		ck_assert_uint_eq(c, i);
		from = c + 1;
	}
	ck_assert(!replica_chunkset_next(cs, from, &c));
	ck_assert(!replica_chunkset_test(cs, n));	/* past the end */
}

/*
 * Random sets, ranges, clears and clear_alls on a set of 100,003 chunks
 * (1,563 bitmap words): a few entries keep the list, tens of thousands
 * give it up for the bitmap alone, and clear_all must clear both ways.
 */
START_TEST(chunkset_against_model)
{
	const uint64_t n = 100003;
	const uint32_t chunk_secs = 128;
	struct replica_chunkset cs;
	bool *model = calloc(n, sizeof(*model));
	bool overflowed = false, listed = false;

	ck_assert_ptr_nonnull(model);
	ck_assert_int_eq(replica_chunkset_init(&cs, n * chunk_secs - 5, chunk_secs), 0);
	ck_assert_uint_eq(cs.nchunks, n);
	srandom(77);
	for (int round = 0; round < 12; round++) {
		/* Rounds alternate between a few marks and very many. */
		unsigned marks = round % 2 ? 30000 : 200;

		for (unsigned k = 0; k < marks; k++) {
			uint64_t c = (uint64_t)random() % (n + 10);	/* some past the end */

			switch (random() % 4) {
			case 0: {
				uint64_t secs = (uint64_t)random() % (4 * chunk_secs) + 1;
				uint64_t sec = c * chunk_secs + (uint64_t)random() % chunk_secs;

				if (sec + secs > n * chunk_secs)
					break;
				replica_chunkset_set_range(&cs, sec, secs);
				for (uint64_t i = sec / chunk_secs; i <= (sec + secs - 1) / chunk_secs; i++)
					model[i] = true;
				break;
			}
			case 1:
				replica_chunkset_clear(&cs, c);
				if (c < n)
					model[c] = false;
				break;
			default:
				replica_chunkset_set(&cs, c);
				if (c < n)
					model[c] = true;
				break;
			}
		}
		if (cs.nset == UINT64_MAX)
			overflowed = true;
		else if (cs.nset)
			listed = true;
		chunkset_check(&cs, model, n);
		/* The list never outgrows the bitmap by more than its doubling. */
		ck_assert_uint_le(cs.set_cap, 2 * ((n + 63) / 64));
		if (round % 3 == 2) {
			replica_chunkset_clear_all(&cs);
			memset(model, 0, n * sizeof(*model));
			chunkset_check(&cs, model, n);
			ck_assert_uint_eq(cs.nset, 0);
		}
	}
	ck_assert(overflowed);
	ck_assert(listed);
	replica_chunkset_free(&cs);
	free(model);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("replica-util");
	TCase *tc = tcase_create("rlock");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, basic_rules);
	tcase_add_test(tc, buckets_and_big_ranges);
	tcase_add_test(tc, randomized_against_model);
	suite_add_tcase(s, tc);
	tc = tcase_create("chunkset");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, chunkset_against_model);
	suite_add_tcase(s, tc);
	tdr_log_init("test-replica-util", false, TDR_LOG_WARN);
	return check_run(s, CHECK_RUN_FORK);
}
