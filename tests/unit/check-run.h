/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The end of every unit test's main(): run the suite and turn its failures
 * into the exit status that automake's test driver reads.  Also the seed
 * the randomized model tests share.
 */
#ifndef TDR_CHECK_RUN_H
#define TDR_CHECK_RUN_H

#include <check.h>
#include <stdlib.h>

enum check_run_mode {
	CHECK_RUN_FORK,		/* Check's default: each test in a child (or as CK_FORK says) */
	CHECK_RUN_NOFORK,	/* in this process: the tests share a loop, and ASan sees them */
};

/*
 * The seed of a randomized model test: TDR_MODEL_SEED picks another
 * sequence (tests/unit/soak-model runs many); 12345 is the one make check
 * runs.
 */
static inline unsigned model_seed(void)
{
	const char *e = getenv("TDR_MODEL_SEED");

	return e && *e ? (unsigned)strtoul(e, NULL, 0) : 12345u;
}

static inline int check_run(Suite *s, enum check_run_mode mode)
{
	SRunner *sr = srunner_create(s);
	int failed;

	if (mode == CHECK_RUN_NOFORK)
		srunner_set_fork_status(sr, CK_NOFORK);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
