/* SPDX-License-Identifier: BSD-3-Clause */
/* The in-memory driver of the fuzz harnesses (fuzz-mem.h). */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/loop.h"
#include "fuzz-mem.h"

struct mem_state {
	char *buf;
};

struct mem_done {
	struct tdr_defer defer;
	struct td_request *req;
	int err;
};

static void mem_complete(void *arg)
{
	struct mem_done *d = arg;
	struct td_request *req = d->req;
	int err = d->err;

	free(d);
	td_complete_request(req, err);
}

static void mem_finish(struct td_image *img, struct td_request *req)
{
	int err = req->sec % 61 == 7 ? -EIO : 0;
	struct mem_done *d;

	if (req->sec % 5 == 0) {
		td_complete_request(req, err);
		return;
	}
	d = malloc(sizeof(*d));
	if (!d) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	d->req = req;
	d->err = err;
	tdr_defer_init(&d->defer, mem_complete, d);
	tdr_loop_defer(img->loop, &d->defer);
}

static int mem_open(struct td_image *img, const char *params, unsigned flags)
{
	struct mem_state *s = img->priv;

	(void)params;
	(void)flags;
	s->buf = calloc(1, FUZZ_MEM_SIZE);
	if (!s->buf)
		return -ENOMEM;
	img->size_secs = FUZZ_MEM_SIZE >> TD_SECTOR_SHIFT;
	img->info_discard = true;
	return 0;
}

static void mem_close(struct td_image *img)
{
	struct mem_state *s = img->priv;

	free(s->buf);
}

static void mem_read(struct td_image *img, struct td_request *req)
{
	struct mem_state *s = img->priv;

	memcpy(req->buf, s->buf + (req->sec << TD_SECTOR_SHIFT),
	       (size_t)req->secs << TD_SECTOR_SHIFT);
	mem_finish(img, req);
}

static void mem_write(struct td_image *img, struct td_request *req)
{
	struct mem_state *s = img->priv;

	memcpy(s->buf + (req->sec << TD_SECTOR_SHIFT), req->buf,
	       (size_t)req->secs << TD_SECTOR_SHIFT);
	mem_finish(img, req);
}

static void mem_discard(struct td_image *img, struct td_request *req)
{
	struct mem_state *s = img->priv;

	memset(s->buf + (req->sec << TD_SECTOR_SHIFT), 0, (size_t)req->secs << TD_SECTOR_SHIFT);
	mem_finish(img, req);
}

/* Runs of 8 sectors, data and hole by turns: replies with several extents. */
static void mem_block_status(struct td_image *img, struct td_request *req)
{
	req->bs_secs = 8 - (uint32_t)(req->sec % 8);
	if (req->bs_secs > req->secs)
		req->bs_secs = req->secs;
	req->bs_flags = (req->sec / 8) % 2 ? TD_BS_HOLE | TD_BS_ZERO : 0;
	mem_finish(img, req);
}

static void mem_flush(struct td_image *img, struct td_request *req)
{
	mem_finish(img, req);
}

const struct td_driver fuzz_mem_driver = {
	.name = "mem",
	.priv_size = sizeof(struct mem_state),
	.open = mem_open,
	.close = mem_close,
	.queue_read = mem_read,
	.queue_write = mem_write,
	.queue_flush = mem_flush,
	.queue_discard = mem_discard,
	.queue_block_status = mem_block_status,
};
