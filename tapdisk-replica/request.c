/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Request flow down an image chain: dispatch to drivers, forwarding to
 * parents, completion, and splitting into pieces.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/image.h"
#include "tdr/log.h"

void td_request_init(struct td_request *req, enum td_op op, uint64_t sec, uint32_t secs,
		     char *buf, td_request_cb_t cb, void *cb_arg)
{
	memset(req, 0, sizeof(*req));
	req->op = op;
	req->sec = sec;
	req->secs = secs;
	req->buf = buf;
	req->cb = cb;
	req->cb_arg = cb_arg;
	tdr_list_init(&req->entry);
}

void td_complete_request(struct td_request *req, int err)
{
	if (err && req->image)
		req->image->stats.errors++;
	req->cb(req, err, req->cb_arg);
}

static void count_request(struct td_image *img, const struct td_request *req)
{
	struct td_image_stats *st = &img->stats;

	switch (req->op) {
	case TD_OP_READ:
		st->rd_reqs++;
		st->rd_secs += req->secs;
		break;
	case TD_OP_WRITE:
		st->wr_reqs++;
		st->wr_secs += req->secs;
		break;
	case TD_OP_FLUSH:
		st->flush_reqs++;
		break;
	case TD_OP_DISCARD:
		st->discard_reqs++;
		break;
	case TD_OP_WRITE_ZEROES:
		st->zero_reqs++;
		break;
	case TD_OP_BLOCK_STATUS:
		st->status_reqs++;
		break;
	}
}

void td_queue_request(struct td_image *img, struct td_request *req)
{
	const struct td_driver *drv = img->drv;

	req->image = img;
	count_request(img, req);

	switch (req->op) {
	case TD_OP_READ:
		drv->queue_read(img, req);
		return;
	case TD_OP_WRITE:
		drv->queue_write(img, req);
		return;
	case TD_OP_FLUSH:
		if (drv->queue_flush)
			drv->queue_flush(img, req);
		else
			td_forward_request(img, req);
		return;
	case TD_OP_DISCARD:
	case TD_OP_WRITE_ZEROES:
		if (drv->queue_discard)
			drv->queue_discard(img, req);
		else if (drv->is_filter)
			td_forward_request(img, req);
		else if (req->op == TD_OP_WRITE_ZEROES)
			td_emulate_write_zeroes(img, req);
		else
			td_complete_request(req, 0);	/* TRIM is only a hint */
		return;
	case TD_OP_BLOCK_STATUS:
		if (drv->queue_block_status) {
			drv->queue_block_status(img, req);
		} else if (drv->is_filter) {
			td_forward_request(img, req);
		} else {
			req->bs_secs = req->secs;
			req->bs_flags = 0;
			td_complete_request(req, 0);
		}
		return;
	}
	td_complete_request(req, -EINVAL);
}

void td_forward_request(struct td_image *img, struct td_request *req)
{
	if (img->parent) {
		img->stats.forwarded++;
		td_queue_request(img->parent, req);
		return;
	}
	switch (req->op) {
	case TD_OP_READ:
		memset(req->buf, 0, (size_t)req->secs << TD_SECTOR_SHIFT);
		td_complete_request(req, 0);
		break;
	case TD_OP_BLOCK_STATUS:
		req->bs_secs = req->secs;
		req->bs_flags = TD_BS_HOLE | TD_BS_ZERO;
		td_complete_request(req, 0);
		break;
	case TD_OP_FLUSH:
		td_complete_request(req, 0);
		break;
	default:
		/* Writes must be owned by some image of the chain. */
		td_complete_request(req, -EIO);
		break;
	}
}

/* ------------------------------------------------------------ splitting */

static void split_put(struct td_request *req)
{
	if (--req->split_pending == 0)
		td_complete_request(req, req->split_error);
}

static void split_piece_done(struct td_request *sub, int err, void *arg)
{
	struct td_request *req = arg;

	if (err && !req->split_error)
		req->split_error = err;
	if (req->op == TD_OP_BLOCK_STATUS && sub->sec == req->sec) {
		req->bs_secs = sub->bs_secs;
		req->bs_flags = sub->bs_flags;
	}
	free(sub);
	split_put(req);
}

void td_request_split_begin(struct td_request *req)
{
	req->split_pending = 1;	/* held until split_end, so no piece completes req early */
	req->split_error = 0;
}

struct td_request *td_request_sub(struct td_request *req, uint64_t sec, uint32_t secs)
{
	struct td_request *sub = malloc(sizeof(*sub));

	if (!sub) {
		if (!req->split_error)
			req->split_error = -ENOMEM;
		return NULL;
	}
	td_request_init(sub, req->op, sec, secs,
			req->buf ? req->buf + ((sec - req->sec) << TD_SECTOR_SHIFT) : NULL,
			split_piece_done, req);
	sub->flags = req->flags;
	sub->split_parent = req;
	req->split_pending++;
	return sub;
}

void td_request_split_end(struct td_request *req)
{
	split_put(req);
}

/* ------------------------------------------------- write-zeroes emulation */

#define ZERO_CHUNK_SECS 2048u	/* 1 MiB of zeroes per write */

static char *zero_buf;

static const char *zero_buffer(void)
{
	/* One read-only buffer serves every emulated write (single thread). */
	if (!zero_buf) {
		zero_buf = tdr_io_alloc((size_t)ZERO_CHUNK_SECS << TD_SECTOR_SHIFT);
		if (zero_buf)
			memset(zero_buf, 0, (size_t)ZERO_CHUNK_SECS << TD_SECTOR_SHIFT);
	}
	return zero_buf;
}

void td_emulate_write_zeroes(struct td_image *img, struct td_request *req)
{
	const char *zeroes;

	if (req->flags & TD_REQ_FAST_ZERO) {
		td_complete_request(req, -ENOTSUP);
		return;
	}
	zeroes = zero_buffer();
	if (!zeroes) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	td_request_split_begin(req);
	for (uint64_t s = req->sec; s < req->sec + req->secs; s += ZERO_CHUNK_SECS) {
		uint64_t left = req->sec + req->secs - s;
		uint32_t n = left < ZERO_CHUNK_SECS ? (uint32_t)left : ZERO_CHUNK_SECS;
		struct td_request *sub = td_request_sub(req, s, n);

		if (!sub)
			break;
		sub->op = TD_OP_WRITE;
		sub->flags &= TD_REQ_FUA;
		sub->buf = (char *)zeroes;	/* writes only read their buffer */
		td_queue_request(img, sub);
	}
	td_request_split_end(req);
}
