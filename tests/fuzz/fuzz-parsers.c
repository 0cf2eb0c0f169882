/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libFuzzer harness: the daemon's text parsers, each against an oracle.
 *
 * Other harnesses reach these parsers only with what survives the path in
 * front of them (ctl-server: request lines for a primary over "mem:",
 * specs the harness agrees to open).  Here the whole input goes to one
 * parser: its first byte picks which, the rest (up to 4 KiB, cut at the
 * first NUL) is the text:
 *   0  replica_parse(): a control request line, as tdr-ctl, tap-ctl and
 *      the xenstore control keys send it;
 *   1  td_spec_split_entry() then td_parse_options() on its params: one
 *      entry of a disk spec ("replica:mode=secondary,...");
 *   2  tdr_parse_hostport(): serve --tcp;
 *   3  tdr_ra_parse_window(): serve --readahead;
 *   4  tdr_log_parse_level(): --log-level.
 *
 * Besides what the sanitizers catch, the harness traps when:
 *   - a parser returns anything but 0 or a negative errno, or a refusal
 *     leaves no message (replica_parse's msg, tdr_last_error());
 *   - the same text parses differently twice (state kept between calls);
 *   - replica_parse accepts a line and gives an operation, mode or sync
 *     out of range, or strings not terminated inside their arrays;
 *   - td_spec_split_entry's type and params are not exactly the text
 *     before and after the first ':', or it accepts an empty or too long
 *     type, or refuses a good one;
 *   - td_parse_options's calls differ from an independent tokenizer's
 *     (non-empty pieces between commas, each split at its first '='), or
 *     a callback's non-zero return does not stop it and come back;
 *   - tdr_parse_hostport accepts HOST and PORT that do not parse back to
 *     themselves once written as HOST:PORT (or [HOST]:PORT), or a port
 *     that is not a number up to 65535;
 *   - tdr_ra_parse_window accepts a window that is not a whole number of
 *     chunks up to TDR_RA_MAX_WINDOW;
 *   - tdr_log_parse_level accepts a word that is not a level's name.
 *
 * Built by tests/fuzz/run-fuzz.sh, seeded from tests/fuzz/corpus-parsers
 * (tests/fuzz/make-corpus.py writes it).
 */
#include "config.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/readahead.h"
#include "tdr/replica.h"
#include "serve.h"

#define TEXT_MAX 4096
#define CHECK(c) do { if (!(c)) __builtin_trap(); } while (0)

static bool terminated(const char *s, size_t len)
{
	return memchr(s, '\0', len) != NULL;
}

static bool is_errno(int r)
{
	return r == 0 || (r < 0 && r > -4096);
}

/* ---------------------------------------------------------------- 0 */

static void fuzz_replica_parse(const char *text)
{
	struct replica_cmd a, b;
	char msg[256], msg2[256];
	int r, r2;

	memset(msg, 0x5a, sizeof(msg));
	r = replica_parse(text, &a, msg, sizeof(msg));
	CHECK(is_errno(r));
	if (r < 0) {
		CHECK(terminated(msg, sizeof(msg)) && msg[0]);
	} else {
		CHECK((int)a.op >= (int)REPLICA_OP_START && (int)a.op <= (int)REPLICA_OP_STATUS);
		CHECK((int)a.mode >= 0 && (int)a.mode <= (int)REPLICA_MODE_SECONDARY);
		CHECK((int)a.sync >= 0 && (int)a.sync <= (int)REPLICA_SYNC_LOCAL);
		CHECK(terminated(a.addr, sizeof(a.addr)));
		CHECK(terminated(a.export_name, sizeof(a.export_name)));
	}
	r2 = replica_parse(text, &b, msg2, sizeof(msg2));
	CHECK(r2 == r);
	if (r == 0)
		CHECK(memcmp(&a, &b, sizeof(a)) == 0);
	else
		CHECK(strcmp(msg, msg2) == 0);
}

/* ---------------------------------------------------------------- 1 */

#define OPT_MAX (TEXT_MAX / 2 + 1)	/* "a,a,a,...": every other byte a key */

struct opts {
	unsigned n, stop_at;	/* stop_at: the call that returns non-zero (1-based), 0: none */
	char *kv[OPT_MAX][2];
};

static int opt_cb(const char *key, const char *value, void *arg)
{
	struct opts *o = arg;

	CHECK(o->n < OPT_MAX);
	CHECK(key && value);
	o->kv[o->n][0] = strdup(key);
	o->kv[o->n][1] = strdup(value);
	CHECK(o->kv[o->n][0] && o->kv[o->n][1]);
	o->n++;
	return o->n == o->stop_at ? -E2BIG : 0;
}

static void opts_free(struct opts *o)
{
	for (unsigned i = 0; i < o->n; i++) {
		free(o->kv[i][0]);
		free(o->kv[i][1]);
	}
	o->n = 0;
}

/* The oracle: every non-empty piece between commas, split at its first '='. */
static unsigned oracle_options(const char *opts, struct opts *o)
{
	const char *p = opts;

	o->n = 0;
	while (*p) {
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);

		if (len) {
			const char *eq = memchr(p, '=', len);
			size_t klen = eq ? (size_t)(eq - p) : len;

			CHECK(o->n < OPT_MAX);
			o->kv[o->n][0] = strndup(p, klen);
			o->kv[o->n][1] = eq ? strndup(eq + 1, len - klen - 1) : strdup("");
			CHECK(o->kv[o->n][0] && o->kv[o->n][1]);
			o->n++;
		}
		p += len;
		if (*p == ',')
			p++;
	}
	return o->n;
}

static struct opts got, want;

static void fuzz_spec_entry(const char *text)
{
	char type[32];
	const char *params = NULL;
	const char *colon = strchr(text, ':');
	int r = td_spec_split_entry(text, type, sizeof(type), &params);

	CHECK(is_errno(r));
	if (!colon || colon == text || (size_t)(colon - text) >= sizeof(type)) {
		CHECK(r == -EINVAL && tdr_last_error()[0]);
		return;
	}
	CHECK(r == 0);
	CHECK(strlen(type) == (size_t)(colon - text) && memcmp(type, text, strlen(type)) == 0);
	CHECK(params == colon + 1);

	unsigned n = oracle_options(params, &want);

	/* Every call, in order, and the return of the last one. */
	got.n = 0;
	got.stop_at = 0;
	CHECK(td_parse_options(params, opt_cb, &got) == 0);
	CHECK(got.n == n);
	for (unsigned i = 0; i < n; i++) {
		CHECK(strcmp(got.kv[i][0], want.kv[i][0]) == 0);
		CHECK(strcmp(got.kv[i][1], want.kv[i][1]) == 0);
	}
	opts_free(&got);
	/* A callback that refuses the middle option stops the parse there. */
	if (n) {
		got.stop_at = n / 2 + 1;
		CHECK(td_parse_options(params, opt_cb, &got) == -E2BIG);
		CHECK(got.n == got.stop_at);
		opts_free(&got);
	}
	opts_free(&want);
}

/* ---------------------------------------------------------------- 2 */

static void fuzz_hostport(const char *text)
{
	char host[64], port[8], host2[64], port2[8], again[TEXT_MAX + 16];
	int r = tdr_parse_hostport(text, host, sizeof(host), port, sizeof(port));

	CHECK(is_errno(r));
	if (r < 0) {
		CHECK(r == -EINVAL && tdr_last_error()[0]);
		return;
	}
	CHECK(terminated(host, sizeof(host)) && terminated(port, sizeof(port)));
	CHECK(port[0] && strspn(port, "0123456789") == strlen(port) && atoi(port) <= 65535);
	/* Written back as the documented forms, it parses to the same parts. */
	if (strchr(host, ':') || host[0] == '[')
		snprintf(again, sizeof(again), "[%s]:%s", host, port);
	else
		snprintf(again, sizeof(again), "%s:%s", host, port);
	CHECK(tdr_parse_hostport(again, host2, sizeof(host2), port2, sizeof(port2)) == 0);
	CHECK(strcmp(host, host2) == 0 && strcmp(port, port2) == 0);
}

/* ---------------------------------------------------------------- 3, 4 */

static void fuzz_window(const char *text)
{
	size_t w = 1, w2 = 2;
	int r = tdr_ra_parse_window(text, &w);

	CHECK(is_errno(r));
	CHECK(tdr_ra_parse_window(text, &w2) == r);
	if (r < 0)
		return;
	CHECK(w == w2);
	CHECK(w % TDR_RA_CHUNK == 0 && w <= TDR_RA_MAX_WINDOW);
}

static void fuzz_level(const char *text)
{
	static const char *const names[] = { "err", "warn", "info", "debug" };
	enum tdr_log_level lv;
	int r = tdr_log_parse_level(text, &lv);
	bool named = false;

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcmp(text, names[i]) == 0) {
			named = true;
			CHECK(r == 0 && (size_t)lv == i);
		}
	if (!named)
		CHECK(r == -EINVAL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static bool init;
	char text[TEXT_MAX + 1];
	size_t n;

	if (!init) {
		tdr_log_init("fuzz-parsers", false, TDR_LOG_ERR);
		init = true;
	}
	if (size < 1)
		return 0;
	n = size - 1 < TEXT_MAX ? size - 1 : TEXT_MAX;
	memcpy(text, data + 1, n);
	text[n] = '\0';
	switch (data[0] % 5) {
	case 0:
		fuzz_replica_parse(text);
		break;
	case 1:
		fuzz_spec_entry(text);
		break;
	case 2:
		fuzz_hostport(text);
		break;
	case 3:
		fuzz_window(text);
		break;
	case 4:
		fuzz_level(text);
		break;
	}
	return 0;
}
