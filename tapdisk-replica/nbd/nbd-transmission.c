/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Transmission phase: NBD requests become td_requests on the export's disk,
 * and their completions become simple or structured replies, in whatever
 * order the disk completes them.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbd-int.h"
#include "tdr/io.h"
#include "tdr/log.h"

/* The write-zeroes fallback writes zeroes in pieces this large. */
#define NBD_ZERO_CHUNK (1u << 20)

static void req_run(struct nbd_req *r);

/* The memory r's buffer really takes, for the flow control's bound. */
static size_t req_buf_bytes(const struct nbd_req *r)
{
	return r->buf ? tdr_bufpool_size(r->buflen) : 0;
}

void nbd_req_free(struct nbd_req *r)
{
	struct nbd_conn *c = r->conn;

	c->nreqs--;
	c->req_bytes -= req_buf_bytes(r);
	tdr_bufpool_put(&c->bufs, r->buf, r->buflen);
	free(r->extents);
	free(r);
	/* One fewer in flight: reading may resume. */
	nbd_conn_kick(c);
}

static struct nbd_req *req_new(struct nbd_conn *c, const struct nbd_request *hdr, size_t buflen)
{
	struct nbd_req *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	if (buflen) {
		r->buf = tdr_bufpool_get(&c->bufs, buflen);
		if (!r->buf) {
			free(r);
			return NULL;
		}
		r->buflen = buflen;
	}
	r->conn = c;
	r->r = *hdr;
	c->nreqs++;
	c->req_bytes += req_buf_bytes(r);
	return r;
}

static const char *nbd_error_message(uint32_t err)
{
	switch (err) {
	case NBD_EPERM: return "operation not permitted";
	case NBD_EIO: return "input/output error";
	case NBD_ENOMEM: return "out of memory";
	case NBD_EINVAL: return "invalid argument";
	case NBD_ENOSPC: return "no space left on device";
	case NBD_EOVERFLOW: return "value too large";
	case NBD_ENOTSUP: return "operation not supported";
	case NBD_ESHUTDOWN: return "server is shutting down";
	default: return "error";
	}
}

static void reply_done(struct nbd_out *o, bool sent)
{
	nbd_req_free(tdr_container_of(o, struct nbd_req, out));
}

static void req_reply(struct nbd_req *r)
{
	struct nbd_conn *c = r->conn;
	struct nbd_out *o = &r->out;
	uint64_t handle = r->r.handle;

	if (c->dead) {
		nbd_req_free(r);
		return;
	}
	if (r->error)
		TDR_DEBUG("nbd: connection %u: %s %llu+%u failed: %s", c->id,
			  nbd_cmd_name(r->r.type), (unsigned long long)r->r.offset, r->r.len,
			  r->why ? r->why : nbd_error_message(r->error));
	o->done = reply_done;
	o->iovcnt = 1;
	o->iov[0].iov_base = r->hdr;
	if (!c->structured) {
		nbd_encode_simple_reply(r->hdr, r->error, handle);
		o->iov[0].iov_len = NBD_SIMPLE_REPLY_SIZE;
		if (r->r.type == NBD_CMD_READ && !r->error && r->r.len) {
			o->iov[1].iov_base = r->buf;
			o->iov[1].iov_len = r->r.len;
			o->iovcnt = 2;
		}
	} else if (r->error) {
		const char *msg = r->why ? r->why : nbd_error_message(r->error);
		size_t mlen = strlen(msg);

		nbd_encode_structured_hdr(r->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, handle,
					  (uint32_t)(6 + mlen));
		nbd_put32(r->hdr + NBD_STRUCTURED_HDR_SIZE, r->error);
		nbd_put16(r->hdr + NBD_STRUCTURED_HDR_SIZE + 4, (uint16_t)mlen);
		o->iov[0].iov_len = NBD_STRUCTURED_HDR_SIZE + 6;
		o->iov[1].iov_base = (void *)msg;
		o->iov[1].iov_len = mlen;
		o->iovcnt = 2;
	} else if (r->r.type == NBD_CMD_READ) {
		if (r->r.len == 0) {
			nbd_encode_structured_hdr(r->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
						  handle, 0);
			o->iov[0].iov_len = NBD_STRUCTURED_HDR_SIZE;
		} else {
			/* One chunk: also satisfies NBD_CMD_FLAG_DF. */
			nbd_encode_structured_hdr(r->hdr, NBD_REPLY_FLAG_DONE,
						  NBD_REPLY_TYPE_OFFSET_DATA, handle, 8 + r->r.len);
			nbd_put64(r->hdr + NBD_STRUCTURED_HDR_SIZE, r->r.offset);
			o->iov[0].iov_len = NBD_STRUCTURED_HDR_SIZE + 8;
			o->iov[1].iov_base = r->buf;
			o->iov[1].iov_len = r->r.len;
			o->iovcnt = 2;
		}
	} else if (r->r.type == NBD_CMD_BLOCK_STATUS) {
		uint32_t plen = 4 + 8 * r->nextents;

		nbd_encode_structured_hdr(r->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
					  handle, plen);
		o->iov[0].iov_len = NBD_STRUCTURED_HDR_SIZE;
		o->iov[1].iov_base = r->extents;
		o->iov[1].iov_len = plen;
		o->iovcnt = 2;
	} else {
		/* proto.md allows simple replies without payload here. */
		nbd_encode_simple_reply(r->hdr, 0, handle);
		o->iov[0].iov_len = NBD_SIMPLE_REPLY_SIZE;
	}
	nbd_conn_queue(c, o);
}

static void req_fail(struct nbd_req *r, uint32_t err, const char *why)
{
	r->error = err;
	r->why = why;
	req_reply(r);
}

/* Sets up r->td for the next step of r. */
static void req_prepare(struct nbd_req *r)
{
	const struct nbd_request *h = &r->r;
	uint64_t sec = h->offset >> TD_SECTOR_SHIFT;
	uint32_t secs = h->len >> TD_SECTOR_SHIFT;
	enum td_op op = TD_OP_READ;
	unsigned flags = 0;
	char *buf = NULL;

	switch (h->type) {
	case NBD_CMD_READ:
		op = TD_OP_READ;
		buf = r->buf;
		break;
	case NBD_CMD_WRITE:
		op = TD_OP_WRITE;
		buf = r->buf;
		if (h->flags & NBD_CMD_FLAG_FUA)
			flags |= TD_REQ_FUA;
		break;
	case NBD_CMD_FLUSH:
		op = TD_OP_FLUSH;
		sec = 0;
		secs = 0;
		break;
	case NBD_CMD_TRIM:
		op = TD_OP_DISCARD;
		if (h->flags & NBD_CMD_FLAG_FUA)
			flags |= TD_REQ_FUA;
		break;
	case NBD_CMD_WRITE_ZEROES:
		if (h->flags & NBD_CMD_FLAG_FUA)
			flags |= TD_REQ_FUA;
		if (r->zero_fallback) {
			uint64_t left = r->end - r->pos;

			op = TD_OP_WRITE;
			buf = r->buf;
			sec = r->pos >> TD_SECTOR_SHIFT;
			secs = (uint32_t)((left < r->buflen ? left : r->buflen) >> TD_SECTOR_SHIFT);
			break;
		}
		op = TD_OP_WRITE_ZEROES;
		if (h->flags & NBD_CMD_FLAG_NO_HOLE)
			flags |= TD_REQ_NO_HOLE;
		if (h->flags & NBD_CMD_FLAG_FAST_ZERO)
			flags |= TD_REQ_FAST_ZERO;
		break;
	case NBD_CMD_BLOCK_STATUS:
		op = TD_OP_BLOCK_STATUS;
		sec = r->pos >> TD_SECTOR_SHIFT;
		secs = (uint32_t)((r->end - r->pos) >> TD_SECTOR_SHIFT);
		break;
	}
	td_request_init(&r->td, op, sec, secs, buf, NULL, r);
	r->td.flags = flags;
}

/*
 * Adds the run just reported to the extent list.  Returns true if another
 * run is wanted.  Runs with equal flags are merged; we stop at the end of
 * the range, at NBD_MAX_EXTENTS, or after one extent with REQ_ONE.
 */
static bool bs_add(struct nbd_req *r)
{
	uint32_t asked = r->td.secs;
	uint32_t run = r->td.bs_secs;
	uint32_t flags = r->td.bs_flags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
	uint32_t cap = (r->r.flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
	unsigned char *d;

	/* A driver reporting nothing must not make us loop forever: status 0
	 * ("data") is always a safe answer. */
	if (run == 0 || run > asked) {
		run = asked;
		flags = 0;
	}
	if (r->nextents && r->last_flags == flags) {
		d = r->extents + 4 + 8 * (r->nextents - 1);
		nbd_put32(d, nbd_get32(d) + (run << TD_SECTOR_SHIFT));
	} else if (r->nextents < cap) {
		d = r->extents + 4 + 8 * r->nextents;
		nbd_put32(d, run << TD_SECTOR_SHIFT);
		nbd_put32(d + 4, flags);
		r->nextents++;
		r->last_flags = flags;
	} else {
		return false;	/* full, and this run would need a new extent */
	}
	r->pos += (uint64_t)run << TD_SECTOR_SHIFT;
	return r->pos < r->end;
}

/*
 * Handles the completion of r->td (status in r->td_err).  Returns true if
 * r needs another td_request; otherwise r has been replied to (or freed).
 */
static bool req_step_done(struct nbd_req *r)
{
	struct nbd_conn *c = r->conn;
	int err = r->td_err;
	uint32_t nerr;

	if (c->dead) {
		nbd_req_free(r);
		return false;
	}
	switch (r->r.type) {
	case NBD_CMD_TRIM:
		/* TRIM is advisory: an image that cannot discard just keeps
		 * the data. */
		if (err == -EOPNOTSUPP)
			err = 0;
		break;
	case NBD_CMD_WRITE_ZEROES:
		if (!r->zero_fallback) {
			if (err == -EOPNOTSUPP && !(r->r.flags & NBD_CMD_FLAG_FAST_ZERO)) {
				/* proto.md forbids ENOTSUP without FAST_ZERO:
				 * write real zeroes instead. */
				size_t len = r->r.len < NBD_ZERO_CHUNK ? r->r.len : NBD_ZERO_CHUNK;

				r->buf = tdr_bufpool_get(&c->bufs, len);
				if (!r->buf) {
					err = -ENOMEM;
					break;
				}
				memset(r->buf, 0, len);
				r->buflen = len;
				c->req_bytes += req_buf_bytes(r);
				r->zero_fallback = true;
				r->pos = r->r.offset;
				r->end = r->r.offset + r->r.len;
				return true;
			}
			break;
		}
		if (!err) {
			r->pos += (uint64_t)r->td.secs << TD_SECTOR_SHIFT;
			if (r->pos < r->end)
				return true;
		}
		break;
	case NBD_CMD_BLOCK_STATUS:
		if (!err && bs_add(r))
			return true;
		break;
	}
	if (!err) {
		req_reply(r);
		return false;
	}
	nerr = nbd_errno_to_nbd(err);
	/* proto.md: ENOTSUP only for FAST_ZERO write zeroes. */
	if (nerr == NBD_ENOTSUP &&
	    !(r->r.type == NBD_CMD_WRITE_ZEROES && (r->r.flags & NBD_CMD_FLAG_FAST_ZERO)))
		nerr = NBD_EINVAL;
	/* A block status that found some extents before failing still
	 * answers with what it has. */
	if (r->r.type == NBD_CMD_BLOCK_STATUS && r->nextents) {
		req_reply(r);
		return false;
	}
	req_fail(r, nerr, NULL);
	return false;
}

static void req_td_cb(struct td_request *td, int err, void *arg)
{
	struct nbd_req *r = arg;
	struct nbd_conn *c = r->conn;

	r->td_err = err;
	/* Completed inside td_disk_submit(): let req_run() loop instead of
	 * recursing (a block status may take many steps). */
	if (r->in_submit) {
		r->inline_done = true;
		return;
	}
	nbd_conn_get(c);
	if (req_step_done(r))
		req_run(r);
	nbd_conn_put(c);
}

static void req_run(struct nbd_req *r)
{
	for (;;) {
		req_prepare(r);
		r->td.cb = req_td_cb;
		r->td.cb_arg = r;
		r->in_submit = true;
		r->inline_done = false;
		td_disk_submit(r->conn->exp->disk, &r->td);
		r->in_submit = false;
		if (!r->inline_done)
			return;
		if (!req_step_done(r))
			return;
	}
}

static void req_start(struct nbd_req *r)
{
	const struct nbd_request *h = &r->r;

	if (h->len == 0 && h->type != NBD_CMD_FLUSH) {
		/* Unspecified by proto.md; succeeding is the harmless choice. */
		req_reply(r);
		return;
	}
	if (h->type == NBD_CMD_BLOCK_STATUS) {
		r->extents = malloc(4 + 8 * NBD_MAX_EXTENTS);
		if (!r->extents) {
			req_fail(r, NBD_ENOMEM, NULL);
			return;
		}
		nbd_put32(r->extents, NBD_META_ID_BASE_ALLOCATION);
		r->pos = h->offset;
		r->end = h->offset + h->len;
	}
	req_run(r);
}

static void write_payload_done(struct nbd_conn *c)
{
	struct nbd_req *r = c->preq;

	c->preq = NULL;
	if (r->error)
		req_reply(r);
	else
		req_start(r);
}

void nbd_tx_request_header(struct nbd_conn *c, const unsigned char *p)
{
	struct nbd_req_limits lim;
	struct nbd_request h;
	struct nbd_req *r;
	const char *why;
	uint32_t err;
	size_t buflen;

	if (nbd_decode_request(p, &h) < 0) {
		nbd_conn_kill(c, "bad request magic");
		return;
	}
	if (h.type == NBD_CMD_DISC) {
		/* Answer everything in flight, then close. */
		nbd_conn_finish(c);
		return;
	}
	lim.size = c->exp->disk->size_secs << TD_SECTOR_SHIFT;
	lim.readonly = c->exp->readonly;
	lim.structured = c->structured;
	lim.meta = c->meta;
	err = nbd_check_request(&h, &lim, &why);

	/* Only valid reads and writes get a buffer (at most 32 MiB: checked
	 * above), so a bogus length never makes us allocate. */
	buflen = 0;
	if (!err && (h.type == NBD_CMD_READ || h.type == NBD_CMD_WRITE))
		buflen = h.len;
	r = req_new(c, &h, buflen);
	if (!r && buflen) {
		r = req_new(c, &h, 0);
		err = NBD_ENOMEM;
		why = NULL;
	}
	if (!r) {
		nbd_conn_kill(c, "out of memory");
		return;
	}
	r->error = err;
	r->why = why;
	if (h.type == NBD_CMD_WRITE) {
		/* The payload follows even when we refuse the write: skip it
		 * (without buffering) to stay in sync with the client. */
		c->preq = r;
		nbd_conn_expect_payload(c, err ? NULL : r->buf, h.len, write_payload_done);
		return;
	}
	if (err) {
		req_reply(r);
		return;
	}
	req_start(r);
}
