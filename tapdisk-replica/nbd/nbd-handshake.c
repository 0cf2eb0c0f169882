/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Fixed newstyle handshake: greeting, client flags and option haggling.
 * Options are answered synchronously (nothing here touches the disk).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbd-int.h"
#include "tdr/log.h"

static void out_free(struct nbd_out *o, bool sent)
{
	free(o);
}

/* Queues a copy of data as raw output.  false if the connection died. */
static bool queue_raw(struct nbd_conn *c, const void *data, size_t len)
{
	struct nbd_out *o = malloc(sizeof(*o) + len);

	if (!o) {
		nbd_conn_kill(c, "out of memory");
		return false;
	}
	memcpy(o + 1, data, len);
	o->iov[0].iov_base = o + 1;
	o->iov[0].iov_len = len;
	o->iovcnt = 1;
	o->done = out_free;
	nbd_conn_queue(c, o);
	return !c->dead;
}

/* One option reply: header plus a and b (either may be empty). */
static bool opt_reply2(struct nbd_conn *c, uint32_t type, const void *a, uint32_t alen,
		       const void *b, uint32_t blen)
{
	struct nbd_out *o = malloc(sizeof(*o) + NBD_OPT_REPLY_HDR_SIZE + alen + blen);
	unsigned char *p;

	if (!o) {
		nbd_conn_kill(c, "out of memory");
		return false;
	}
	p = (unsigned char *)(o + 1);
	nbd_encode_opt_reply_hdr(p, c->opt.opt, type, alen + blen);
	if (alen)
		memcpy(p + NBD_OPT_REPLY_HDR_SIZE, a, alen);
	if (blen)
		memcpy(p + NBD_OPT_REPLY_HDR_SIZE + alen, b, blen);
	o->iov[0].iov_base = p;
	o->iov[0].iov_len = NBD_OPT_REPLY_HDR_SIZE + alen + blen;
	o->iovcnt = 1;
	o->done = out_free;
	nbd_conn_queue(c, o);
	return !c->dead;
}

static bool opt_reply(struct nbd_conn *c, uint32_t type, const void *data, uint32_t len)
{
	return opt_reply2(c, type, data, len, NULL, 0);
}

/* Error replies carry a message for the human at the client. */
static void opt_error(struct nbd_conn *c, uint32_t type, const char *msg)
{
	TDR_DEBUG("nbd: connection %u: option %s: %s", c->id, nbd_opt_name(c->opt.opt), msg);
	opt_reply(c, type, msg, (uint32_t)strlen(msg));
}

void nbd_hs_start(struct nbd_conn *c)
{
	unsigned char g[NBD_GREETING_SIZE];

	nbd_encode_greeting(g, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	queue_raw(c, g, sizeof(g));
}

void nbd_hs_client_flags(struct nbd_conn *c, const unsigned char *p)
{
	uint32_t flags = nbd_get32(p);

	/* proto.md: unknown client flags MUST drop the connection. */
	if (flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
		nbd_conn_kill(c, "unknown client flags");
		return;
	}
	c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
	c->fixed_newstyle = flags & NBD_FLAG_C_FIXED_NEWSTYLE;
	c->phase = NBD_PH_OPTIONS;
}

static void enter_transmission(struct nbd_conn *c, struct nbd_export *e)
{
	c->exp = e;
	c->phase = NBD_PH_TRANSMISSION;
	nbd_conn_handshake_done(c);
	/* Block status needs contexts set for the export actually chosen. */
	if (c->meta_exp != e)
		c->meta = false;
	TDR_DEBUG("nbd: connection %u: serving export '%s'%s", c->id, e->name,
		  c->structured ? " (structured replies)" : "");
}

static uint64_t export_size(const struct nbd_export *e)
{
	return e->disk->size_secs << TD_SECTOR_SHIFT;
}

static void opt_export_name(struct nbd_conn *c, const unsigned char *d, uint32_t len)
{
	unsigned char buf[10 + NBD_EXPORT_NAME_ZEROES];
	struct nbd_export *e = nbd_server_find_export(c->srv, (const char *)d, len);

	if (!e) {
		/* No way to report an error to EXPORT_NAME: hard disconnect. */
		nbd_conn_kill(c, "EXPORT_NAME of an unknown export");
		return;
	}
	memset(buf, 0, sizeof(buf));
	nbd_put64(buf, export_size(e));
	nbd_put16(buf + 8, nbd_export_tx_flags(e->readonly, c->structured));
	if (!queue_raw(c, buf, c->no_zeroes ? 10 : sizeof(buf)))
		return;
	enter_transmission(c, e);
}

static void opt_list(struct nbd_conn *c, uint32_t len)
{
	struct tdr_list *pos;

	if (len) {
		opt_error(c, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
		return;
	}
	for (pos = c->srv->exports.next; pos != &c->srv->exports; pos = pos->next) {
		struct nbd_export *e = tdr_list_entry(pos, struct nbd_export, entry);
		uint32_t nlen = (uint32_t)strlen(e->name);
		const char *desc = e->description ? e->description : "";
		unsigned char *tmp = malloc(4 + nlen);
		bool ok;

		if (!tmp) {
			nbd_conn_kill(c, "out of memory");
			return;
		}
		nbd_put32(tmp, nlen);
		memcpy(tmp + 4, e->name, nlen);
		ok = opt_reply2(c, NBD_REP_SERVER, tmp, 4 + nlen, desc, (uint32_t)strlen(desc));
		free(tmp);
		if (!ok)
			return;
	}
	opt_reply(c, NBD_REP_ACK, NULL, 0);
}

static bool info_string(struct nbd_conn *c, uint16_t type, const char *s)
{
	unsigned char t[2];

	nbd_put16(t, type);
	return opt_reply2(c, NBD_REP_INFO, t, 2, s, (uint32_t)strlen(s));
}

static void opt_info_go(struct nbd_conn *c, const unsigned char *d, uint32_t len, bool go)
{
	struct nbd_info_req ir;
	struct nbd_export *e;
	unsigned char buf[14];
	bool want_name = false, want_desc = false;
	uint16_t i;

	if (nbd_parse_info_req(d, len, &ir) < 0) {
		opt_error(c, NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
		return;
	}
	e = nbd_server_find_export(c->srv, ir.name, ir.namelen);
	if (!e) {
		opt_error(c, NBD_REP_ERR_UNKNOWN, "no such export");
		return;
	}
	for (i = 0; i < ir.ninfos; i++) {
		uint16_t t = nbd_get16(ir.infos + 2 * i);

		if (t == NBD_INFO_NAME)
			want_name = true;
		else if (t == NBD_INFO_DESCRIPTION)
			want_desc = true;
	}

	nbd_put16(buf, NBD_INFO_EXPORT);
	nbd_put64(buf + 2, export_size(e));
	nbd_put16(buf + 10, nbd_export_tx_flags(e->readonly, c->structured));
	if (!opt_reply(c, NBD_REP_INFO, buf, 12))
		return;

	/* Sent even when not requested (proto.md allows it): we enforce a
	 * 512-byte minimum, which is not the default. */
	nbd_put16(buf, NBD_INFO_BLOCK_SIZE);
	nbd_put32(buf + 2, NBD_MIN_BLOCK_SIZE);
	nbd_put32(buf + 6, NBD_PREF_BLOCK_SIZE);
	nbd_put32(buf + 10, NBD_MAX_BLOCK_SIZE);
	if (!opt_reply(c, NBD_REP_INFO, buf, 14))
		return;

	if (want_name && !info_string(c, NBD_INFO_NAME, e->name))
		return;
	if (want_desc && e->description && !info_string(c, NBD_INFO_DESCRIPTION, e->description))
		return;
	if (!opt_reply(c, NBD_REP_ACK, NULL, 0))
		return;
	if (go)
		enter_transmission(c, e);
}

struct meta_query {
	bool list;
	bool match;
};

static int meta_query_cb(const char *q, uint32_t qlen, void *arg)
{
	static const char base[] = "base:";
	static const char leaf[] = "allocation";
	struct meta_query *mq = arg;
	const char *colon = memchr(q, ':', qlen);

	/* A query must start with a namespace and a colon. */
	if (!colon || colon == q)
		return -EINVAL;
	if (qlen < sizeof(base) - 1 || memcmp(q, base, sizeof(base) - 1))
		return 0;	/* another namespace: ignored, as proto.md says */
	q += sizeof(base) - 1;
	qlen -= (uint32_t)(sizeof(base) - 1);
	if (qlen == 0) {
		/* "base:" lists everything in base: but selects nothing. */
		if (mq->list)
			mq->match = true;
	} else if (qlen == sizeof(leaf) - 1 && !memcmp(q, leaf, qlen)) {
		mq->match = true;
	}
	return 0;
}

static void opt_meta(struct nbd_conn *c, const unsigned char *d, uint32_t len, bool list)
{
	struct meta_query mq = { .list = list, .match = false };
	struct nbd_export *e;
	const char *name;
	uint32_t namelen, nq;
	unsigned char id[4];

	if (!list) {
		/* SET replaces the selection even when it fails. */
		c->meta = false;
		c->meta_exp = NULL;
		if (!c->structured) {
			opt_error(c, NBD_REP_ERR_INVALID,
				  "NBD_OPT_SET_META_CONTEXT needs structured replies first");
			return;
		}
	}
	if (nbd_parse_meta_req(d, len, &name, &namelen, &nq, meta_query_cb, &mq) < 0) {
		opt_error(c, NBD_REP_ERR_INVALID, "malformed meta context request");
		return;
	}
	e = nbd_server_find_export(c->srv, name, namelen);
	if (!e) {
		opt_error(c, NBD_REP_ERR_UNKNOWN, "no such export");
		return;
	}
	if (list && nq == 0)
		mq.match = true;
	if (mq.match) {
		nbd_put32(id, list ? 0 : NBD_META_ID_BASE_ALLOCATION);
		if (!opt_reply2(c, NBD_REP_META_CONTEXT, id, 4, NBD_META_BASE_ALLOCATION,
				sizeof(NBD_META_BASE_ALLOCATION) - 1))
			return;
		if (!list) {
			c->meta = true;
			c->meta_exp = e;
		}
	}
	opt_reply(c, NBD_REP_ACK, NULL, 0);
}

static void opt_dispatch(struct nbd_conn *c)
{
	const unsigned char *d = c->optdata;
	uint32_t len = c->opt.len;

	if ((!c->srv || c->srv->shutting_down) && c->opt.opt != NBD_OPT_ABORT) {
		if (c->opt.opt == NBD_OPT_EXPORT_NAME || !c->fixed_newstyle)
			/* No error reply exists for these: all we can do is hang up. */
			nbd_conn_kill(c, "server shutting down");
		else
			opt_error(c, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
		goto out;
	}
	/* tls=require: nothing but STARTTLS and ABORT in the clear. */
	if (c->srv && nbd_tls_mode(c->srv->tls) == NBD_TLS_REQUIRE && !c->tls_on &&
	    c->opt.opt != NBD_OPT_STARTTLS && c->opt.opt != NBD_OPT_ABORT) {
		if (c->opt.opt == NBD_OPT_EXPORT_NAME)
			/* It has no error reply: all a server can do is hang up. */
			nbd_conn_kill(c, "NBD_OPT_EXPORT_NAME without TLS, which this server requires");
		else
			opt_error(c, NBD_REP_ERR_TLS_REQD,
				  "this server requires TLS: send NBD_OPT_STARTTLS first");
		goto out;
	}
	switch (c->opt.opt) {
	case NBD_OPT_EXPORT_NAME:
		opt_export_name(c, d, len);
		break;
	case NBD_OPT_ABORT:
		/* Data is ignored, as proto.md asks. */
		if (opt_reply(c, NBD_REP_ACK, NULL, 0))
			nbd_conn_finish(c);
		break;
	case NBD_OPT_LIST:
		opt_list(c, len);
		break;
	case NBD_OPT_STARTTLS:
		if (len)
			opt_error(c, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
		else if (!c->srv->tls)
			opt_error(c, NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
		else if (!c->fixed_newstyle)
			/* proto.md: NOTLS mode unless the client set FIXED_NEWSTYLE. */
			opt_error(c, NBD_REP_ERR_POLICY,
				  "TLS needs a fixed-newstyle client (NBD_FLAG_C_FIXED_NEWSTYLE)");
		else if (c->tls_on)
			opt_error(c, NBD_REP_ERR_INVALID, "TLS is already on");
		else if (opt_reply(c, NBD_REP_ACK, NULL, 0)) {
			/*
			 * proto.md: nothing negotiated in the clear survives
			 * STARTTLS; a man in the middle could have added it.
			 */
			c->structured = false;
			c->meta = false;
			c->meta_exp = NULL;
			c->tls_switch = true;	/* nbd-conn.c switches once the ACK is out */
		}
		break;
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		opt_info_go(c, d, len, c->opt.opt == NBD_OPT_GO);
		break;
	case NBD_OPT_STRUCTURED_REPLY:
		if (len) {
			opt_error(c, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
			break;
		}
		c->structured = true;
		opt_reply(c, NBD_REP_ACK, NULL, 0);
		break;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		opt_meta(c, d, len, c->opt.opt == NBD_OPT_LIST_META_CONTEXT);
		break;
	default:
		opt_error(c, NBD_REP_ERR_UNSUP, "option not supported");
		break;
	}
out:
	free(c->optdata);
	c->optdata = NULL;
}

static void opt_too_big(struct nbd_conn *c)
{
	opt_error(c, NBD_REP_ERR_TOO_BIG, "option data too large");
}

void nbd_hs_option_header(struct nbd_conn *c, const unsigned char *p)
{
	if (nbd_decode_opt_hdr(p, &c->opt) < 0) {
		nbd_conn_kill(c, "bad option magic");
		return;
	}
	TDR_DEBUG("nbd: connection %u: option %s, %u bytes", c->id, nbd_opt_name(c->opt.opt),
		  c->opt.len);
	if (c->opt.opt == NBD_OPT_EXPORT_NAME && c->opt.len > NBD_MAX_STRING) {
		nbd_conn_kill(c, "EXPORT_NAME longer than 4096 bytes");
		return;
	}
	if (c->opt.len > NBD_MAX_OPTION_LEN) {
		/* Skipped without buffering, then refused. */
		nbd_conn_expect_payload(c, NULL, c->opt.len, opt_too_big);
		return;
	}
	if (c->opt.len) {
		c->optdata = malloc(c->opt.len);
		if (!c->optdata) {
			nbd_conn_kill(c, "out of memory");
			return;
		}
	}
	nbd_conn_expect_payload(c, (char *)c->optdata, c->opt.len, opt_dispatch);
}
