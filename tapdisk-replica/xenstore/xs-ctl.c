/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The xenstore control protocol of a replicated disk: see docs/xenstore.md
 * for the keys and tdr/xenstore.h for the interface.
 *
 * Exactly once.  The toolstack queues request/<id>; ids only increase.  For
 * each id above last-id, in increasing order, we send in one batch
 *     READ request/<id>   and   WRITE executing = <id>
 * and execute only when xenstored has acknowledged the claim, so a daemon
 * that dies at any point after executing has left "executing" above
 * "last-id".  When the request completes we send, in this order,
 *     WRITE response/<id>, WRITE last-id = <id>, RM request/<id>.
 * xenstored processes one connection's messages in order, so the response
 * exists whenever last-id names it.  A new daemon that finds executing >
 * last-id either finds the response (it only has to finish the bookkeeping)
 * or answers the request with EINTR: it may have taken effect in the
 * previous process, and it is never run a second time.  Ids at or below
 * last-id get EALREADY.  The same reasoning holds across xenstored
 * restarts, with our own memory (last id, the request in progress, the
 * responses not yet acknowledged) standing in for what xenstored forgot.
 *
 * Nothing here waits for xenstored: replies come back through the loop, and
 * while xenstored is frozen the published values coalesce in a table (one
 * write in flight per key) instead of queueing.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/image.h"
#include "tdr/list.h"
#include "tdr/log.h"
#include "tdr/xenstore.h"
#include "xs-conn.h"

#define REQ_LINE_MAX 1024u	/* longest request line accepted */
#define RESP_KEEP 64u		/* responses kept before the oldest is removed */
#define PEND_MAX 4096u		/* request ids remembered from watch events */
#define SELF_RM 8u		/* our own removals whose watch events we expect */
#define WATCH_TOKEN "tdr-request"
/* xenstored's longest absolute path (XENSTORE_ABS_PATH_MAX), with room to spare */
#define REQ_PATH_MAX 3200
#define PERMS "n0"		/* owner dom0; other domains: no access */

/* Status keys published at the top of the directory; the rest go to stats/. */
static const char *const main_keys[] = {
	"mode", "state", "error", "error_msg", "progress_done", "progress_total",
};

/* A published key: the value we want, and what xenstored has or is getting. */
struct kv {
	struct tdr_xs_ctl *x;
	char *key;		/* relative to the directory */
	char *want;
	bool dirty;
	bool inflight;
	bool warned;		/* a failed write is logged once */
	bool perms_sent;	/* its permissions set on this connection */
};

/*
 * The bookkeeping of an answered request: response/<name> (unless resp is
 * NULL), last-id (if advance) and the removal of request/<name>, sent in
 * that order and resent after a reconnection until all are acknowledged.
 */
struct completion {
	struct tdr_list entry;
	struct tdr_xs_ctl *x;
	uint64_t id;
	bool advance;
	char *resp;
	unsigned acks;		/* replies outstanding */
	bool sent;
	bool lost;		/* a reply was -ECONNRESET: send again */
	char name[];		/* whole: a bad name is answered under itself */
};

/* The execution of a request; outlives the ctl if it is freed meanwhile. */
struct exec_ctx {
	struct tdr_xs_ctl *x;
};

/* A read that checks whether request/<name> still exists before answering it. */
struct check_ctx {
	struct tdr_list entry;		/* in the ctl's checks: freed with it */
	struct tdr_xs_ctl *x;
	uint64_t id;
	bool valid_id;
	char name[];
};

enum phase { PH_DOWN, PH_LOADING, PH_READY };
enum rq_state { RQ_IDLE, RQ_CLAIM, RQ_EXEC };

struct tdr_xs_ctl {
	struct tdr_loop *loop;
	struct xs_conn *conn;
	char *dir;
	size_t dirlen;
	const struct tdr_xs_backend *be;
	void *be_arg;
	uint32_t stats_ms;

	enum phase phase;
	unsigned load_left;
	uint64_t store_last_id, store_executing;
	bool have_executing;

	uint64_t last_id;
	uint64_t executed, answered, connects;

	/* Request ids seen in events or listings, sorted ascending. */
	uint64_t *pend;
	size_t npend;
	bool scan_inflight, scan_again;
	/*
	 * The lowest id the full queue had to forget (UINT64_MAX: none):
	 * nothing above it is claimed before a listing brings it back, or
	 * it would be refused as older than an id already answered.
	 */
	uint64_t dropped_min;
	/* A listing too long for one reply, read in parts (XS_DIRECTORY_PART). */
	char *part_buf;
	size_t part_len, part_cap;
	char part_gen[32];

	enum rq_state rq;
	uint64_t cur_id;
	int cur_read_err;
	char *cur_line;
	size_t cur_len;
	struct exec_ctx *cur_exec;

	struct tdr_list completions;
	struct tdr_list checks;

	struct kv **kv;
	size_t nkv;

	uint64_t resp_ids[RESP_KEEP];
	size_t resp_head, nresp;

	/* request/<id> we removed: their watch events need no read. */
	uint64_t self_rm[SELF_RM];
	unsigned self_rm_next;

	struct tdr_timer stats_timer;
	struct tdr_defer kick_defer;
	struct tdr_defer publish_defer;
};

/* ------------------------------------------------------------- helpers */

/* dir + "/" + rel, in buf; false if it does not fit (never happens for our keys). */
static bool mkpath(const struct tdr_xs_ctl *x, char *buf, size_t len, const char *rel)
{
	int n = snprintf(buf, len, "%s/%s", x->dir, rel);

	return n > 0 && (size_t)n < len;
}

/* A request id: decimal, 1 to 2^64-1, no sign, no leading zero. */
static bool parse_id(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	const char *p;

	if (!*s || *s == '0')
		return false;
	for (p = s; *p; p++) {
		unsigned d;

		if (*p < '0' || *p > '9')
			return false;
		d = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - d) / 10)
			return false;
		v = v * 10 + d;
	}
	*out = v;
	return true;
}

/* Keeps a message on one printable line: it ends up in a xenstore value. */
static void sanitize(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
			*s = ' ';
}

static void kick(struct tdr_xs_ctl *x)
{
	tdr_loop_defer(x->loop, &x->kick_defer);
}

/* ------------------------------------------------------------ published keys */

static void kv_send(struct tdr_xs_ctl *x, struct kv *e);

static void kv_reply(void *arg, int err, const char *data, size_t len)
{
	struct kv *e = arg;
	struct tdr_xs_ctl *x;

	(void)data;
	(void)len;
	e->inflight = false;
	if (err == -ECONNRESET) {
		e->dirty = true;	/* republished after reconnection */
		return;
	}
	if (err && !(err == -ENOENT && !e->want) && !e->warned) {
		TDR_WARN("xenstore: cannot publish %s: %s", e->key, strerror(-err));
		e->warned = true;
	}
	/* Changed again while in flight: send the newer value. */
	x = e->x;
	if (e->dirty && x->phase == PH_READY)
		kv_send(x, e);
}

static void kv_flush(struct tdr_xs_ctl *x)
{
	size_t i;

	if (x->phase != PH_READY)
		return;
	for (i = 0; i < x->nkv; i++)
		if (x->kv[i]->dirty && !x->kv[i]->inflight)
			kv_send(x, x->kv[i]);
}

/*
 * The reply to a best-effort message of ours (arg: what it did, as "cannot
 * ..." goes on): permissions of a key that may not exist (ENOENT is fine,
 * a node made later inherits the directory's), or a key put back after a
 * reconnection.  A lost connection does it again on the next.
 */
static void best_effort_reply(void *arg, int err, const char *data, size_t len)
{
	const char *what = arg;

	(void)data;
	(void)len;
	if (err && err != -ENOENT && err != -ECONNRESET)
		TDR_WARN("xenstore: cannot %s: %s", what, strerror(-err));
}

/*
 * A write keeps the permissions of a node that exists: one made by
 * someone else before (a guest, when the directory was not dom0-only)
 * would stay theirs.  So each key's first write on a connection is
 * followed by setting them.
 */
static void kv_send(struct tdr_xs_ctl *x, struct kv *e)
{
	char path[512];
	int ret;

	if (!mkpath(x, path, sizeof(path), e->key))
		return;
	if (e->want)
		ret = xs_conn_write(x->conn, path, e->want, kv_reply, e);
	else
		ret = xs_conn_rm(x->conn, path, kv_reply, e);
	if (ret == 0) {
		e->dirty = false;
		e->inflight = true;
		if (e->want && !e->perms_sent &&
		    xs_conn_set_perms(x->conn, path, PERMS, best_effort_reply,
				      "make a published key dom0-only") == 0)
			e->perms_sent = true;
	}
}

static void kv_set(struct tdr_xs_ctl *x, const char *key, const char *val)
{
	struct kv *e = NULL, **nkv;
	size_t i;

	for (i = 0; i < x->nkv; i++) {
		if (strcmp(x->kv[i]->key, key) == 0) {
			e = x->kv[i];
			break;
		}
	}
	if (e && e->want && val && strcmp(e->want, val) == 0)
		return;
	if (!e) {
		nkv = realloc(x->kv, (x->nkv + 1) * sizeof(*nkv));
		if (!nkv)
			return;
		x->kv = nkv;
		e = calloc(1, sizeof(*e));
		if (!e)
			return;
		e->x = x;
		e->key = strdup(key);
		if (!e->key) {
			free(e);
			return;
		}
		x->kv[x->nkv++] = e;
	}
	free(e->want);
	e->want = val ? strdup(val) : NULL;
	e->dirty = true;
	e->warned = false;
}

static bool is_main_key(const char *k)
{
	size_t i;

	for (i = 0; i < sizeof(main_keys) / sizeof(main_keys[0]); i++)
		if (strcmp(k, main_keys[i]) == 0)
			return true;
	return false;
}

/* Publishes the backend's status lines; the statistics only if all. */
static void publish(struct tdr_xs_ctl *x, bool all)
{
	char *buf = NULL, *line, *save = NULL;
	size_t len = 0;
	FILE *f;

	if (!x->be->status)
		return;
	f = open_memstream(&buf, &len);
	if (!f)
		return;
	x->be->status(x->be_arg, f);
	if (fclose(f) != 0 || !buf) {
		free(buf);
		return;
	}
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *eq = strchr(line, '='), key[128];
		bool main_key;

		if (!eq || eq == line || (size_t)(eq - line) >= 64)
			continue;
		*eq = '\0';
		sanitize(eq + 1);
		main_key = is_main_key(line);
		if (!main_key && !all)
			continue;
		snprintf(key, sizeof(key), "%s%s", main_key ? "" : "stats/", line);
		kv_set(x, key, eq + 1);
	}
	free(buf);
	kv_flush(x);
}

static void on_publish_defer(void *arg)
{
	publish(arg, false);
}

static void on_changed(void *arg)
{
	struct tdr_xs_ctl *x = arg;

	/* Coalesces bursts of changes into one publication per loop turn. */
	tdr_loop_defer(x->loop, &x->publish_defer);
}

static void on_stats_timer(struct tdr_timer *t, void *arg)
{
	struct tdr_xs_ctl *x = arg;

	publish(x, true);
	tdr_timer_arm(t, (uint64_t)x->stats_ms * 1000000ull);
}

/* ------------------------------------------------------------ completions */

static void resp_remember(struct tdr_xs_ctl *x, uint64_t id);

static void completion_reply(void *arg, int err, const char *data, size_t len)
{
	struct completion *c = arg;

	(void)data;
	(void)len;
	if (err == -ECONNRESET)
		c->lost = true;
	else if (err && err != -ENOENT)
		TDR_WARN("xenstore: bookkeeping of request %s failed: %s", c->name,
			 strerror(-err));
	if (--c->acks)
		return;
	if (c->lost) {
		c->sent = false;
		c->lost = false;
		return;		/* sent again when the connection is back */
	}
	tdr_list_del(&c->entry);
	free(c->resp);
	free(c);
}

static void completion_send(struct tdr_xs_ctl *x, struct completion *c)
{
	char path[REQ_PATH_MAX], idbuf[24];
	unsigned n = 0;

	if (x->phase != PH_READY || c->sent)
		return;
	/* Order matters (see the top of this file): response, last-id, rm. */
	if (c->resp) {
		snprintf(path, sizeof(path), "%s/response/%s", x->dir, c->name);
		if (xs_conn_write(x->conn, path, c->resp, completion_reply, c) < 0)
			goto fail;
		n++;
	}
	if (c->advance) {
		snprintf(path, sizeof(path), "%s/last-id", x->dir);
		snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)c->id);
		if (xs_conn_write(x->conn, path, idbuf, completion_reply, c) < 0)
			goto fail;
		n++;
	}
	snprintf(path, sizeof(path), "%s/request/%s", x->dir, c->name);
	if (xs_conn_rm(x->conn, path, completion_reply, c) < 0)
		goto fail;
	n++;
	/* Its watch event comes back to us: saves a read per request. */
	if (c->id) {
		x->self_rm[x->self_rm_next] = c->id;
		x->self_rm_next = (x->self_rm_next + 1) % SELF_RM;
	}
	c->acks = n;
	c->sent = true;
	return;
fail:
	/* Not connected any more: the replies of what was sent come back as
	 * -ECONNRESET and the whole batch is sent again. */
	c->acks = n;
	c->sent = n > 0;
	c->lost = n > 0;
}

/*
 * Answers request <name>: resp NULL writes no response (a request that
 * vanished), advance consumes the id.
 */
static void complete(struct tdr_xs_ctl *x, const char *name, uint64_t id, bool advance,
		     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void complete(struct tdr_xs_ctl *x, const char *name, uint64_t id, bool advance,
		     const char *fmt, ...)
{
	struct completion *c = calloc(1, sizeof(*c) + strlen(name) + 1);
	va_list ap;

	if (!c) {
		TDR_ERR("xenstore: out of memory answering request %s", name);
		return;
	}
	c->x = x;
	strcpy(c->name, name);
	c->id = id;
	c->advance = advance;
	if (fmt) {
		va_start(ap, fmt);
		if (vasprintf(&c->resp, fmt, ap) < 0)
			c->resp = NULL;
		va_end(ap);
		if (!c->resp) {
			free(c);
			TDR_ERR("xenstore: out of memory answering request %s", name);
			return;
		}
		sanitize(c->resp);
		if (strlen(c->resp) > 2048)
			c->resp[2048] = '\0';
		x->answered++;
	}
	if (advance && id > x->last_id)
		x->last_id = id;
	tdr_list_add_tail(&c->entry, &x->completions);
	if (c->resp && advance)
		resp_remember(x, id);
	completion_send(x, c);
}

/* Keeps the last RESP_KEEP responses; removes the oldest beyond that. */
static void resp_remember(struct tdr_xs_ctl *x, uint64_t id)
{
	char path[512];

	if (x->nresp == RESP_KEEP) {
		uint64_t old = x->resp_ids[x->resp_head];

		snprintf(path, sizeof(path), "%s/response/%llu", x->dir, (unsigned long long)old);
		/* Best effort: a leftover is removed by the next daemon's listing. */
		if (x->phase != PH_DOWN)
			xs_conn_rm(x->conn, path, NULL, NULL);
		x->resp_ids[x->resp_head] = id;
		x->resp_head = (x->resp_head + 1) % RESP_KEEP;
	} else {
		x->resp_ids[(x->resp_head + x->nresp) % RESP_KEEP] = id;
		x->nresp++;
	}
}

/* ------------------------------------------------------------ pending ids */

/* Whether id is queued; *at: its place, or where it would go (sorted). */
static bool pend_find(const struct tdr_xs_ctl *x, uint64_t id, size_t *at)
{
	size_t lo = 0, hi = x->npend;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (x->pend[mid] == id) {
			*at = mid;
			return true;
		}
		if (x->pend[mid] < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	*at = lo;
	return false;
}

static void pend_add(struct tdr_xs_ctl *x, uint64_t id)
{
	size_t lo;

	if (pend_find(x, id, &lo))
		return;
	if (x->npend == PEND_MAX) {
		/*
		 * Too many at once: forget the newest; a listing finds them
		 * again (on_kick lists once the queue is empty).
		 */
		x->scan_again = true;
		if (lo == x->npend) {
			if (id < x->dropped_min)
				x->dropped_min = id;
			return;
		}
		if (x->pend[x->npend - 1] < x->dropped_min)
			x->dropped_min = x->pend[x->npend - 1];
		x->npend--;
	}
	memmove(&x->pend[lo + 1], &x->pend[lo], (x->npend - lo) * sizeof(x->pend[0]));
	x->pend[lo] = id;
	x->npend++;
}

static bool pend_pop(struct tdr_xs_ctl *x, uint64_t *id)
{
	if (!x->npend)
		return false;
	*id = x->pend[0];
	memmove(&x->pend[0], &x->pend[1], (x->npend - 1) * sizeof(x->pend[0]));
	x->npend--;
	return true;
}

/* --------------------------------------------------------- request checks */

static void check_reply(void *arg, int err, const char *data, size_t len)
{
	struct check_ctx *k = arg;
	struct tdr_xs_ctl *x = k->x;

	(void)data;
	(void)len;
	if (err == 0) {
		if (k->valid_id)
			complete(x, k->name, k->id, false,
				 "error EALREADY request id %s was already used (the last id answered is %llu); nothing done, write the request again with a higher id",
				 k->name, (unsigned long long)x->last_id);
		else
			complete(x, k->name, 0, false,
				 "error EINVAL bad request id '%s': ids are decimal numbers from 1 to 18446744073709551615 without leading zeros; nothing done",
				 k->name);
	}
	/* ENOENT: our own removal (its watch event) or the toolstack took it back. */
	tdr_list_del(&k->entry);
	free(k);
}

/* request/<name> is a duplicate or has a bad name: answer it if it exists. */
static void check_request(struct tdr_xs_ctl *x, const char *name, bool valid_id, uint64_t id)
{
	struct check_ctx *k = calloc(1, sizeof(*k) + strlen(name) + 1);
	char path[REQ_PATH_MAX];

	if (!k)
		return;
	k->x = x;
	strcpy(k->name, name);
	k->valid_id = valid_id;
	k->id = id;
	snprintf(path, sizeof(path), "%s/request/%s", x->dir, name);
	if (xs_conn_read(x->conn, path, check_reply, k) < 0)
		free(k);
	else
		tdr_list_add_tail(&k->entry, &x->checks);
}

/*
 * The event of our own removal of request/<id>: true once per removal.  A
 * request rewritten under the same id at that very moment is removed by our
 * removal anyway, so skipping its read loses nothing.
 */
static bool self_event(struct tdr_xs_ctl *x, uint64_t id)
{
	unsigned i;

	if (id > x->last_id)
		return false;
	for (i = 0; i < SELF_RM; i++) {
		if (x->self_rm[i] == id) {
			x->self_rm[i] = 0;
			return true;
		}
	}
	return false;
}

static void request_name(struct tdr_xs_ctl *x, const char *name, bool from_event)
{
	uint64_t id;

	if (parse_id(name, &id)) {
		if (!(from_event && self_event(x, id)))
			pend_add(x, id);
	} else if (x->phase == PH_READY) {
		check_request(x, name, false, 0);
	}
}

static void scan(struct tdr_xs_ctl *x);

/* A whole listing of request/: take every name in it. */
static void scan_names(struct tdr_xs_ctl *x, const char *data, size_t len)
{
	size_t off = 0;

	x->scan_inflight = false;
	/* Whatever was forgotten is in this listing (or forgotten again now). */
	x->dropped_min = UINT64_MAX;
	while (off < len) {
		const char *name = data + off;
		size_t n = strnlen(name, len - off);

		if (n)
			request_name(x, name, false);
		off += n + 1;
	}
	/* Listing again, if asked meanwhile, waits for the queue (on_kick). */
	kick(x);
}

static void scan_part(struct tdr_xs_ctl *x);

static void scan_part_end(struct tdr_xs_ctl *x)
{
	free(x->part_buf);
	x->part_buf = NULL;
	x->part_len = x->part_cap = 0;
	x->part_gen[0] = '\0';
}

/* The listing in parts is given up: nothing of it is taken. */
static void scan_part_abandon(struct tdr_xs_ctl *x)
{
	scan_part_end(x);
	x->scan_inflight = false;
}

/*
 * A part: "<generation>\0" and names, each with its NUL, after the first
 * part_len bytes of the list; an empty name ends the list.  A generation
 * that changed means the directory did meanwhile (our own removals of
 * answered requests do it all the time): starting over could go on as
 * long as requests are answered, so the parts are taken as they come and
 * the directory is listed once more afterwards.  A name listed that is
 * gone by then is read and found gone; one that the shift made us skip
 * is in the next listing.
 */
static void scan_part_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;
	size_t glen, off;

	if (err) {
		if (err != -ECONNRESET && err != -ENOENT)
			TDR_WARN("xenstore: cannot list %s/request in parts: %s", x->dir,
				 strerror(-err));
		scan_part_abandon(x);
		return;
	}
	glen = strnlen(data, len);
	if (glen == len || glen >= sizeof(x->part_gen)) {
		TDR_WARN("xenstore: a malformed part of the listing of %s/request; listing again",
			 x->dir);
		scan_part_abandon(x);
		x->scan_again = true;
		kick(x);
		return;
	}
	if (x->part_gen[0] && strcmp(x->part_gen, data) != 0)
		x->scan_again = true;
	memcpy(x->part_gen, data, glen + 1);
	for (off = glen + 1; off < len;) {
		size_t n = strnlen(data + off, len - off);

		if (n == 0) {
			char *buf = x->part_buf;
			size_t blen = x->part_len;

			x->part_buf = NULL;
			scan_part_end(x);
			scan_names(x, buf, blen);
			free(buf);
			return;
		}
		if (x->part_len + n + 1 > x->part_cap) {
			size_t cap = x->part_cap ? x->part_cap * 2 : 8192;
			char *nb;

			while (cap < x->part_len + n + 1)
				cap *= 2;
			nb = realloc(x->part_buf, cap);
			if (!nb) {
				TDR_ERR("xenstore: out of memory listing %s/request", x->dir);
				scan_part_abandon(x);
				return;
			}
			x->part_buf = nb;
			x->part_cap = cap;
		}
		memcpy(x->part_buf + x->part_len, data + off, n + 1);
		x->part_len += n + 1;
		off += n + 1;
	}
	scan_part(x);
}

static void scan_part(struct tdr_xs_ctl *x)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/request", x->dir);
	if (xs_conn_directory_part(x->conn, path, x->part_len, scan_part_reply, x) < 0) {
		scan_part_abandon(x);
	}
}

static void scan_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;

	if (err == -E2BIG) {
		/* More names than one reply holds (4096 bytes): in parts. */
		scan_part_end(x);
		scan_part(x);
		return;
	}
	if (err) {
		x->scan_inflight = false;
		if (err != -ECONNRESET && err != -ENOENT)
			TDR_WARN("xenstore: cannot list %s/request: %s", x->dir, strerror(-err));
		return;
	}
	scan_names(x, data, len);
}

static void scan(struct tdr_xs_ctl *x)
{
	char path[512];

	if (x->phase == PH_DOWN)
		return;
	if (x->scan_inflight) {
		x->scan_again = true;
		return;
	}
	snprintf(path, sizeof(path), "%s/request", x->dir);
	if (xs_conn_directory(x->conn, path, scan_reply, x) == 0)
		x->scan_inflight = true;
}

/* ------------------------------------------------------------ execution */

static void exec_done(void *arg, int err, const char *msg)
{
	struct exec_ctx *e = arg;
	struct tdr_xs_ctl *x = e->x;
	char name[24];

	free(e);
	if (!x)
		return;		/* the ctl was freed meanwhile */
	x->cur_exec = NULL;
	snprintf(name, sizeof(name), "%llu", (unsigned long long)x->cur_id);
	if (err)
		complete(x, name, x->cur_id, true, "error %s %s", tdr_errno_name(err),
			 msg && *msg ? msg : strerror(-err));
	else if (msg && *msg)
		complete(x, name, x->cur_id, true, "ok %s", msg);
	else
		complete(x, name, x->cur_id, true, "ok");
	/* One line per operation: enough to follow what the toolstack did. */
	TDR_INFO("xenstore: request %s (%s): %s%s%s", name, x->cur_line,
		 err ? tdr_errno_name(err) : "ok", msg && *msg ? ": " : "", msg ? msg : "");
	x->rq = RQ_IDLE;
	/* The operation may have changed the state: publish before the next. */
	publish(x, false);
	kick(x);
}

/* The claim is acknowledged: the request is ours to execute (or refuse). */
static void start_request(struct tdr_xs_ctl *x)
{
	char name[24], msg[REPLICA_MSG_MAX + 64];
	struct replica_cmd cmd;
	size_t i;
	int err;

	snprintf(name, sizeof(name), "%llu", (unsigned long long)x->cur_id);
	x->rq = RQ_IDLE;
	if (x->cur_read_err == -ENOENT) {
		/* Taken back by the toolstack before we read it: consume the id,
		 * there is nobody to answer. */
		complete(x, name, x->cur_id, true, NULL);
		goto out;
	}
	if (x->cur_read_err) {
		complete(x, name, x->cur_id, true, "error %s cannot read the request: %s",
			 tdr_errno_name(x->cur_read_err), strerror(-x->cur_read_err));
		goto out;
	}
	if (x->cur_len == 0) {
		complete(x, name, x->cur_id, true,
			 "error EINVAL empty request; write the request line (e.g. \"checkpoint\") in one write; nothing done");
		goto out;
	}
	if (x->cur_len > REQ_LINE_MAX) {
		complete(x, name, x->cur_id, true,
			 "error EINVAL request of %zu bytes (at most %u); nothing done", x->cur_len,
			 REQ_LINE_MAX);
		goto out;
	}
	for (i = 0; i < x->cur_len; i++) {
		unsigned char ch = (unsigned char)x->cur_line[i];

		if (ch < 0x20 || ch > 0x7e) {
			complete(x, name, x->cur_id, true,
				 "error EINVAL request has a non-printable byte 0x%02x at offset %zu; nothing done",
				 ch, i);
			goto out;
		}
	}
	msg[0] = '\0';
	err = x->be->parse(x->be_arg, x->cur_line, &cmd, msg, sizeof(msg));
	if (err < 0) {
		complete(x, name, x->cur_id, true, "error %s %s; nothing done", tdr_errno_name(err),
			 *msg ? msg : strerror(-err));
		goto out;
	}
	x->cur_exec = calloc(1, sizeof(*x->cur_exec));
	if (!x->cur_exec) {
		complete(x, name, x->cur_id, true, "error ENOMEM out of memory; nothing done");
		goto out;
	}
	x->cur_exec->x = x;
	x->rq = RQ_EXEC;
	x->executed++;
	TDR_DEBUG("xenstore: request %s: %s", name, x->cur_line);
	x->be->execute(x->be_arg, &cmd, exec_done, x->cur_exec);
	return;
out:
	kick(x);
}

static void claim_read_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;

	x->cur_read_err = err;
	free(x->cur_line);
	x->cur_line = NULL;
	x->cur_len = 0;
	if (err == 0) {
		x->cur_line = malloc(len + 1);
		if (!x->cur_line) {
			x->cur_read_err = -ENOMEM;
			return;
		}
		memcpy(x->cur_line, data, len);
		x->cur_line[len] = '\0';
		x->cur_len = len;
		/* A NUL inside the value is caught as a non-printable byte. */
		for (size_t i = 0; i < len; i++)
			if (!data[i])
				x->cur_line[i] = '\x01';
	}
}

static void claim_write_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;

	(void)data;
	(void)len;
	if (err == -ECONNRESET || x->cur_read_err == -ECONNRESET) {
		/* Not executed: claimed again after the reconnection. */
		x->rq = RQ_IDLE;
		pend_add(x, x->cur_id);
		return;
	}
	if (err) {
		char name[24];

		snprintf(name, sizeof(name), "%llu", (unsigned long long)x->cur_id);
		x->rq = RQ_IDLE;
		complete(x, name, x->cur_id, true,
			 "error %s cannot record the request as executing: %s; nothing done",
			 tdr_errno_name(err), strerror(-err));
		kick(x);
		return;
	}
	start_request(x);
}

static void on_kick(void *arg)
{
	struct tdr_xs_ctl *x = arg;
	char path[512], idbuf[24];
	uint64_t id;
	int ret;

	if (x->phase != PH_READY)
		return;
	kv_flush(x);
	while (x->rq == RQ_IDLE && x->npend && x->pend[0] <= x->dropped_min && pend_pop(x, &id)) {
		snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)id);
		if (id <= x->last_id) {
			check_request(x, idbuf, true, id);
			continue;
		}
		x->cur_id = id;
		x->cur_read_err = 0;
		snprintf(path, sizeof(path), "%s/request/%s", x->dir, idbuf);
		if (xs_conn_read(x->conn, path, claim_read_reply, x) < 0) {
			pend_add(x, id);
			return;
		}
		x->rq = RQ_CLAIM;
		/* Sent together: one round trip for both. */
		snprintf(path, sizeof(path), "%s/executing", x->dir);
		ret = xs_conn_write(x->conn, path, idbuf, claim_write_reply, x);
		if (ret < 0) {
			/* Read sent, claim not: start over on a new connection
			 * (the read's reply then comes back as -ECONNRESET). */
			x->rq = RQ_IDLE;
			pend_add(x, id);
			xs_conn_reset(x->conn, ret);
			return;
		}
	}
	/*
	 * Listed again once the queue is empty: what a listing added (up to
	 * 4096 ids) is done first, and a listing that costs a pass over every
	 * name is not repeated per request while thousands wait.
	 */
	if (x->scan_again && !x->scan_inflight && x->rq == RQ_IDLE &&
	    (!x->npend || x->pend[0] > x->dropped_min)) {
		x->scan_again = false;
		scan(x);
	}
}

/* ------------------------------------------------------------ connection */

static void load_done(struct tdr_xs_ctl *x);

static void load_step(struct tdr_xs_ctl *x)
{
	if (x->load_left && --x->load_left == 0)
		load_done(x);
}

static void load_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;

	(void)data;
	(void)len;
	if (err == -ECONNRESET)
		return;
	if (err)
		TDR_WARN("xenstore: setting up %s: %s", x->dir, strerror(-err));
	load_step(x);
}

static void last_id_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;
	uint64_t v;

	(void)len;
	if (err == -ECONNRESET)
		return;
	x->store_last_id = 0;
	if (err == 0 && *data) {
		if (parse_id(data, &v))
			x->store_last_id = v;
		else
			TDR_WARN("xenstore: %s/last-id is '%s', not an id; ignored", x->dir, data);
	}
	if (x->store_last_id > x->last_id)
		x->last_id = x->store_last_id;
	load_step(x);
}

static void recover_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;
	uint64_t e = x->store_executing;
	char name[24];

	(void)data;
	(void)len;
	if (err == -ECONNRESET)
		return;
	snprintf(name, sizeof(name), "%llu", (unsigned long long)e);
	x->have_executing = false;
	/* Queued now, sent once ready, before anything new. */
	if (err == 0) {
		/* Answered, and the bookkeeping after it was cut short. */
		TDR_INFO("xenstore: request %s was answered by a previous daemon; finishing its bookkeeping",
			 name);
		complete(x, name, e, true, NULL);
	} else {
		TDR_WARN("xenstore: request %s was executing when the previous daemon stopped; answering EINTR, not executing it again",
			 name);
		complete(x, name, e, true,
			 "error EINTR the daemon restarted while this request was executing; it may or may not have taken effect and is not executed again; check state and error, then send a new request");
	}
	load_step(x);
}

/* Whether id is ours: executing or answered and not yet acknowledged. */
static bool id_in_hand(const struct tdr_xs_ctl *x, uint64_t id)
{
	const struct tdr_list *pos;

	if (x->rq != RQ_IDLE && x->cur_id == id)
		return true;
	for (pos = x->completions.next; pos != &x->completions; pos = pos->next)
		if (tdr_list_entry(pos, struct completion, entry)->id == id)
			return true;
	return false;
}

static void executing_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;
	char path[512];
	uint64_t v = 0;
	size_t at;

	(void)len;
	if (err == -ECONNRESET)
		return;
	x->have_executing = false;
	if (err == 0 && parse_id(data, &v)) {
		x->store_executing = v;
		x->have_executing = true;
	}
	/*
	 * Claimed above last-id and not ours: a previous daemon's.  One in
	 * our queue is ours, claimed on the lost connection whose reply never
	 * came: not executed, and claimed again (claim_write_reply).
	 */
	if (x->have_executing && v > x->last_id && !id_in_hand(x, v) && !pend_find(x, v, &at)) {
		snprintf(path, sizeof(path), "%s/response/%llu", x->dir, (unsigned long long)v);
		if (xs_conn_read(x->conn, path, recover_reply, x) == 0)
			x->load_left++;
	}
	load_step(x);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void resp_dir_reply(void *arg, int err, const char *data, size_t len)
{
	struct tdr_xs_ctl *x = arg;
	uint64_t *ids = NULL, id;
	size_t n = 0, cap = 0, off = 0, i, j;
	char path[REQ_PATH_MAX];

	if (err == -ECONNRESET)
		return;
	if (err == 0) {
		while (off < len) {
			const char *name = data + off;
			size_t l = strnlen(name, len - off);

			off += l + 1;
			if (!parse_id(name, &id))
				continue;
			/* We write it again if its id comes back: it must be ours. */
			if (snprintf(path, sizeof(path), "%s/response/%s", x->dir, name) <
			    (int)sizeof(path))
				xs_conn_set_perms(x->conn, path, PERMS, best_effort_reply,
						  "make a response dom0-only");
			if (n == cap) {
				uint64_t *nid;

				cap = cap ? cap * 2 : 64;
				nid = realloc(ids, cap * sizeof(*ids));
				if (!nid)
					break;
				ids = nid;
			}
			ids[n++] = id;
		}
		if (n)
			qsort(ids, n, sizeof(*ids), cmp_u64);
		/* Rebuild the ring from what the store holds (ours may be gone). */
		x->nresp = 0;
		x->resp_head = 0;
		for (i = 0; i < n; i++) {
			bool known = false;

			for (j = 0; j < x->nresp; j++)
				if (x->resp_ids[(x->resp_head + j) % RESP_KEEP] == ids[i])
					known = true;
			if (!known)
				resp_remember(x, ids[i]);
		}
	}
	free(ids);
	load_step(x);
}

static void load_done(struct tdr_xs_ctl *x)
{
	struct tdr_list *pos, *tmp;
	char path[512], idbuf[24];
	size_t i;

	x->phase = PH_READY;
	TDR_INFO("xenstore: control directory %s ready (last id %llu)", x->dir,
		 (unsigned long long)x->last_id);
	/* Bookkeeping first: it must reach xenstored before anything new. */
	tdr_list_for_each_safe(pos, tmp, &x->completions)
		completion_send(x, tdr_list_entry(pos, struct completion, entry));
	/*
	 * A xenstored that restarted without its contents lost last-id and
	 * executing: put back what we know, so that the toolstack sees which
	 * ids are used and a daemon started after us refuses them too.
	 */
	if (x->last_id > x->store_last_id) {
		snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)x->last_id);
		snprintf(path, sizeof(path), "%s/last-id", x->dir);
		xs_conn_write(x->conn, path, idbuf, best_effort_reply, "rewrite last-id");
	}
	if (x->rq == RQ_EXEC && (!x->have_executing || x->store_executing != x->cur_id)) {
		snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)x->cur_id);
		snprintf(path, sizeof(path), "%s/executing", x->dir);
		xs_conn_write(x->conn, path, idbuf, best_effort_reply, "rewrite executing");
	}
	for (i = 0; i < x->nkv; i++) {
		x->kv[i]->dirty = true;
		x->kv[i]->perms_sent = false;
	}
	publish(x, true);
	scan(x);
	kick(x);
}

static void on_connected(void *arg)
{
	struct tdr_xs_ctl *x = arg;
	static const char *const dirs[] = { "", "/request", "/response" };
	/* Keys of ours that may exist already, made by someone else. */
	static const struct {
		const char *key, *why;
	} own[] = {
		{ "last-id", "make last-id dom0-only" },
		{ "executing", "make executing dom0-only" },
		{ "stats", "make stats dom0-only" },
	};
	char path[512];
	size_t i;
	int ret = 0;

	x->connects++;
	x->phase = PH_LOADING;
	/* Events of removals sent on the old connection will not come. */
	memset(x->self_rm, 0, sizeof(x->self_rm));
	x->load_left = 1;	/* released at the end, so replies cannot finish early */
	for (i = 0; i < 3 && ret == 0; i++) {
		snprintf(path, sizeof(path), "%s%s", x->dir, dirs[i]);
		ret = xs_conn_mkdir(x->conn, path, load_reply, x);
		if (ret == 0) {
			x->load_left++;
			/* Dom0 only: the toolstack runs there, guests must not
			 * see or forge requests. */
			ret = xs_conn_set_perms(x->conn, path, PERMS, load_reply, x);
			if (ret == 0)
				x->load_left++;
		}
	}
	for (i = 0; i < sizeof(own) / sizeof(own[0]) && ret == 0; i++) {
		snprintf(path, sizeof(path), "%s/%s", x->dir, own[i].key);
		ret = xs_conn_set_perms(x->conn, path, PERMS, best_effort_reply, (void *)own[i].why);
	}
	if (ret == 0) {
		snprintf(path, sizeof(path), "%s/last-id", x->dir);
		ret = xs_conn_read(x->conn, path, last_id_reply, x);
		if (ret == 0)
			x->load_left++;
	}
	if (ret == 0) {
		snprintf(path, sizeof(path), "%s/executing", x->dir);
		ret = xs_conn_read(x->conn, path, executing_reply, x);
		if (ret == 0)
			x->load_left++;
	}
	if (ret == 0) {
		snprintf(path, sizeof(path), "%s/response", x->dir);
		ret = xs_conn_directory(x->conn, path, resp_dir_reply, x);
		if (ret == 0)
			x->load_left++;
	}
	if (ret == 0) {
		/* Its first event (xenstored fires every new watch once) comes
		 * after this reply, so the first listing happens when ready. */
		snprintf(path, sizeof(path), "%s/request", x->dir);
		ret = xs_conn_watch(x->conn, path, WATCH_TOKEN, load_reply, x);
		if (ret == 0)
			x->load_left++;
	}
	if (ret < 0) {
		TDR_WARN("xenstore: setting up %s: %s; retrying", x->dir, strerror(-ret));
		xs_conn_reset(x->conn, ret);
		return;
	}
	load_step(x);
}

static void on_disconnected(void *arg, int err)
{
	struct tdr_xs_ctl *x = arg;

	(void)err;
	x->phase = PH_DOWN;
	x->load_left = 0;
	x->scan_inflight = false;
	scan_part_end(x);
}

static void on_watch_event(void *arg, const char *path, const char *token)
{
	struct tdr_xs_ctl *x = arg;
	char name[256];
	const char *rest, *slash;
	size_t n;

	if (strcmp(token, WATCH_TOKEN) != 0)
		return;
	if (strncmp(path, x->dir, x->dirlen) != 0 || strncmp(path + x->dirlen, "/request", 8) != 0)
		return;
	rest = path + x->dirlen + 8;
	if (*rest == '\0') {
		scan(x);	/* the directory itself: initial event, or mkdir/rm */
		return;
	}
	if (*rest != '/')
		return;
	rest++;
	slash = strchr(rest, '/');
	n = slash ? (size_t)(slash - rest) : strlen(rest);
	if (n == 0 || n >= sizeof(name))
		return;
	memcpy(name, rest, n);
	name[n] = '\0';
	request_name(x, name, true);
	kick(x);
}

static const struct xs_conn_ops conn_ops = {
	.connected = on_connected,
	.disconnected = on_disconnected,
	.watch_event = on_watch_event,
};

/* ------------------------------------------------------------ public */

int tdr_xs_default_dir(char *buf, size_t len, unsigned domid, unsigned devid)
{
	int n = snprintf(buf, len, "/local/domain/0/backend/tapdisk-replica/%u/%u", domid, devid);

	return n > 0 && (size_t)n < len ? 0 : -ENAMETOOLONG;
}

int tdr_xs_check_dir(const char *dir)
{
	size_t len = strlen(dir), i;

	if (dir[0] != '/' || len < 2 || dir[len - 1] == '/' || strstr(dir, "//")) {
		tdr_set_error("xenstore directory '%s': expected an absolute path without a trailing or double '/', e.g. /local/domain/0/backend/tapdisk-replica/5/51712",
			      dir);
		return -EINVAL;
	}
	/* Leaves room for our longest key below it. */
	if (len > 256) {
		tdr_set_error("xenstore directory '%s': longer than 256 bytes; use a shorter path",
			      dir);
		return -EINVAL;
	}
	for (i = 0; i < len; i++) {
		char c = dir[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '/' || c == '-' || c == '_' || c == '@')) {
			tdr_set_error("xenstore directory '%s': '%c' is not allowed in a xenstore path; use letters, digits, '-', '_', '@' and '/'",
				      dir, c);
			return -EINVAL;
		}
	}
	return 0;
}

int tdr_xs_ctl_new(struct tdr_xs_ctl **out, struct tdr_loop *loop, const struct tdr_xs_opts *o,
		   const struct tdr_xs_backend *be, void *be_arg)
{
	struct tdr_xs_ctl *x;
	int ret;

	*out = NULL;
	ret = tdr_xs_check_dir(o->dir);
	if (ret < 0)
		return ret;
	x = calloc(1, sizeof(*x));
	if (!x)
		goto nomem;
	x->pend = calloc(PEND_MAX, sizeof(*x->pend));
	x->dropped_min = UINT64_MAX;
	x->dir = strdup(o->dir);
	if (!x->pend || !x->dir)
		goto nomem;
	x->dirlen = strlen(x->dir);
	x->loop = loop;
	x->be = be;
	x->be_arg = be_arg;
	x->stats_ms = o->stats_ms ? o->stats_ms : 1000;
	tdr_list_init(&x->completions);
	tdr_list_init(&x->checks);
	tdr_timer_init(&x->stats_timer, loop, on_stats_timer, x);
	tdr_defer_init(&x->kick_defer, on_kick, x);
	tdr_defer_init(&x->publish_defer, on_publish_defer, x);
	x->conn = xs_conn_new(loop, o->xs_path, &conn_ops, x);
	if (!x->conn)
		goto nomem;
	if (be->set_observer)
		be->set_observer(be_arg, on_changed, x);
	tdr_timer_arm(&x->stats_timer, (uint64_t)x->stats_ms * 1000000ull);
	*out = x;
	return 0;
nomem:
	if (x) {
		free(x->pend);
		free(x->dir);
		free(x);
	}
	tdr_set_error("out of memory setting up the xenstore control directory %s", o->dir);
	return -ENOMEM;
}

void tdr_xs_ctl_free(struct tdr_xs_ctl *x)
{
	struct tdr_list *pos, *tmp;
	size_t i;

	if (!x)
		return;
	/* First: no callback of ours runs after this. */
	xs_conn_free(x->conn);
	if (x->be->set_observer)
		x->be->set_observer(x->be_arg, NULL, NULL);
	if (x->cur_exec)
		x->cur_exec->x = NULL;	/* freed by exec_done whenever it comes */
	tdr_timer_cancel(&x->stats_timer);
	tdr_loop_cancel_defer(x->loop, &x->kick_defer);
	tdr_loop_cancel_defer(x->loop, &x->publish_defer);
	tdr_list_for_each_safe(pos, tmp, &x->completions) {
		struct completion *c = tdr_list_entry(pos, struct completion, entry);

		tdr_list_del(&c->entry);
		free(c->resp);
		free(c);
	}
	tdr_list_for_each_safe(pos, tmp, &x->checks) {
		tdr_list_del(pos);
		free(tdr_list_entry(pos, struct check_ctx, entry));
	}
	free(x->part_buf);
	for (i = 0; i < x->nkv; i++) {
		free(x->kv[i]->key);
		free(x->kv[i]->want);
		free(x->kv[i]);
	}
	free(x->kv);
	free(x->pend);
	free(x->cur_line);
	if (x->be->free)
		x->be->free(x->be_arg);
	free(x->dir);
	free(x);
}

void tdr_xs_ctl_get_info(const struct tdr_xs_ctl *x, struct tdr_xs_ctl_info *info)
{
	memset(info, 0, sizeof(*info));
	info->connected = xs_conn_connected(x->conn);
	info->ready = x->phase == PH_READY;
	info->busy = x->rq == RQ_EXEC;
	info->last_id = x->last_id;
	info->executed = x->executed;
	info->answered = x->answered;
	info->connects = x->connects;
	info->queued = xs_conn_queued(x->conn);
}
