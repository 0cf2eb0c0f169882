/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Driver "aio": raw image files and block devices, through the libaio
 * backend with O_DIRECT where the filesystem allows it.
 *
 * TRIM and WRITE_ZEROES use fallocate() (files) or BLKDISCARD/BLKZEROOUT
 * (devices).  Those are synchronous system calls, but they only change
 * metadata on files and are short; when a filesystem cannot punch holes,
 * WRITE_ZEROES falls back to asynchronous writes of zeroes.
 *
 * Sequential reads get a read-ahead of their own (tdr/readahead.h): with
 * O_DIRECT there is no page cache to do it.  Every write, discard and
 * write-zeroes tells it the range, when queued and when done.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/readahead.h"

struct aio_priv {
	int fd;
	bool direct;
	bool blockdev;
	bool can_punch;
	uint64_t size;		/* bytes */
	struct aio_op *free_ops;	/* per-request state, recycled */
	unsigned ops_live;
	uint64_t short_io_retries;
	struct tdr_ra *ra;	/* NULL: no read-ahead */
	uint64_t rd_bytes_live;	/* reads queued here and not completed */
};

static size_t aio_readahead = TD_READAHEAD_DEFAULT;

void td_set_readahead(size_t window)
{
	aio_readahead = window;
}

/* The state of one request at the file. */
struct aio_op {
	struct tdr_iocb io;
	struct td_request *req;
	struct td_image *img;
	size_t done;		/* bytes transferred so far */
	size_t len;
	struct aio_op *next_free;
	struct tdr_ra_read ra;
};

static struct aio_op *aio_op_get(struct td_image *img, struct td_request *req)
{
	struct aio_priv *p = img->priv;
	struct aio_op *op = p->free_ops;

	if (op)
		p->free_ops = op->next_free;
	else if (!(op = malloc(sizeof(*op))))
		return NULL;
	memset(op, 0, sizeof(*op));
	op->req = req;
	op->img = img;
	op->len = (size_t)req->secs << TD_SECTOR_SHIFT;
	p->ops_live++;
	return op;
}

static void aio_op_put(struct aio_op *op)
{
	struct aio_priv *p = op->img->priv;

	op->next_free = p->free_ops;
	p->free_ops = op;
	p->ops_live--;
}

static void aio_finish(struct aio_op *op, int err)
{
	struct td_request *req = op->req;
	struct aio_priv *p = op->img->priv;

	if (req->op != TD_OP_READ)
		tdr_ra_invalidate(p->ra, req->sec << TD_SECTOR_SHIFT, op->len);
	else
		p->rd_bytes_live -= op->len;

	aio_op_put(op);
	td_complete_request(req, err);
}

static void aio_submit_rw(struct aio_op *op);

static void aio_rw_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct aio_op *op = arg;
	struct aio_priv *p = op->img->priv;
	struct td_request *req = op->req;

	if (res < 0) {
		aio_finish(op, (int)res);
		return;
	}
	op->done += (size_t)res;
	if (op->done >= op->len) {
		aio_finish(op, 0);
		return;
	}
	if (res == 0) {
		/* End of file: a read there sees zeroes; a write cannot progress. */
		if (req->op == TD_OP_READ) {
			memset(req->buf + op->done, 0, op->len - op->done);
			aio_finish(op, 0);
		} else {
			aio_finish(op, -EIO);
		}
		return;
	}
	p->short_io_retries++;
	aio_submit_rw(op);
}

static void aio_submit_rw(struct aio_op *op)
{
	struct td_image *img = op->img;
	struct aio_priv *p = img->priv;
	struct td_request *req = op->req;
	uint64_t off = (req->sec << TD_SECTOR_SHIFT) + op->done;
	char *buf = req->buf + op->done;
	size_t len = op->len - op->done;

	if (req->op == TD_OP_READ)
		tdr_io_pread(img->io, &op->io, p->fd, buf, len, off, aio_rw_done, op);
	else if (req->flags & TD_REQ_FUA)
		tdr_io_pwrite_dsync(img->io, &op->io, p->fd, buf, len, off, aio_rw_done, op);
	else
		tdr_io_pwrite(img->io, &op->io, p->fd, buf, len, off, aio_rw_done, op);
}

static void aio_ra_done(struct tdr_ra_read *rd, bool ok)
{
	struct aio_op *op = tdr_container_of(rd, struct aio_op, ra);

	if (ok)
		aio_finish(op, 0);
	else
		aio_submit_rw(op);	/* the read-ahead failed: read it ourselves */
}

static void aio_queue_rw(struct td_image *img, struct td_request *req)
{
	struct aio_priv *p = img->priv;
	struct aio_op *op = aio_op_get(img, req);

	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	if (req->op != TD_OP_READ) {
		tdr_ra_invalidate(p->ra, req->sec << TD_SECTOR_SHIFT, op->len);
	} else {
		p->rd_bytes_live += op->len;
		if (p->ra) {
			op->ra.buf = req->buf;
			op->ra.off = req->sec << TD_SECTOR_SHIFT;
			op->ra.len = op->len;
			op->ra.done = aio_ra_done;
			/* May complete op before it returns; busy is the other reads. */
			if (tdr_ra_read(p->ra, &op->ra, p->rd_bytes_live - op->len))
				return;
		}
	}
	aio_submit_rw(op);
}

static void aio_flush_done(struct tdr_iocb *io, ssize_t res, void *arg)
{
	struct aio_op *op = arg;

	aio_finish(op, res < 0 ? (int)res : 0);
}

static void aio_queue_flush(struct td_image *img, struct td_request *req)
{
	struct aio_priv *p = img->priv;
	struct aio_op *op = aio_op_get(img, req);

	if (!op) {
		td_complete_request(req, -ENOMEM);
		return;
	}
	tdr_io_fdsync(img->io, &op->io, p->fd, aio_flush_done, op);
}

static int aio_blkdev_range(struct aio_priv *p, unsigned long cmd, uint64_t off, uint64_t len)
{
	uint64_t range[2] = { off, len };

	return ioctl(p->fd, cmd, range) < 0 ? -errno : 0;
}

static void aio_queue_discard(struct td_image *img, struct td_request *req)
{
	struct aio_priv *p = img->priv;
	off_t off = (off_t)(req->sec << TD_SECTOR_SHIFT);
	off_t len = (off_t)((uint64_t)req->secs << TD_SECTOR_SHIFT);
	int r;

	/*
	 * fallocate and the ioctls complete before they return, so one
	 * invalidation covers both ends; the emulated write-zeroes goes
	 * through queue_write, which does its own.
	 */
	tdr_ra_invalidate(p->ra, (uint64_t)off, (uint64_t)len);
	if (req->op == TD_OP_DISCARD) {
		if (p->blockdev)
			r = aio_blkdev_range(p, BLKDISCARD, (uint64_t)off, (uint64_t)len);
		else if (p->can_punch)
			r = fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0
				? -errno : 0;
		else
			r = 0;
		/* TRIM is advisory: a device or filesystem that cannot is not an error. */
		td_complete_request(req, r == -EOPNOTSUPP || r == -ENOTTY ? 0 : r);
		return;
	}

	if (p->blockdev) {
		r = aio_blkdev_range(p, BLKZEROOUT, (uint64_t)off, (uint64_t)len);
	} else {
		int mode = (req->flags & TD_REQ_NO_HOLE) ? FALLOC_FL_ZERO_RANGE
			: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

		r = fallocate(p->fd, mode | ((req->flags & TD_REQ_NO_HOLE) ? FALLOC_FL_KEEP_SIZE : 0),
			      off, len) < 0 ? -errno : 0;
		if (r == -EOPNOTSUPP && mode != FALLOC_FL_ZERO_RANGE)
			p->can_punch = false;
	}
	if (r == -EOPNOTSUPP || r == -ENOTTY) {
		td_emulate_write_zeroes(img, req);
		return;
	}
	td_complete_request(req, r);
}

static void aio_queue_block_status(struct td_image *img, struct td_request *req)
{
	struct aio_priv *p = img->priv;
	off_t off = (off_t)(req->sec << TD_SECTOR_SHIFT);
	off_t end = off + (off_t)((uint64_t)req->secs << TD_SECTOR_SHIFT);
	off_t data, hole;
	uint64_t run;

	req->bs_secs = req->secs;
	req->bs_flags = 0;
	if (p->blockdev) {
		td_complete_request(req, 0);
		return;
	}
	data = lseek(p->fd, off, SEEK_DATA);
	if (data < 0 && errno == ENXIO) {
		data = end;	/* only a hole until the end of the file */
	} else if (data < 0) {
		td_complete_request(req, 0);	/* no SEEK_DATA: call it all data */
		return;
	}
	if (data > off) {
		run = (uint64_t)((data < end ? data : end) - off);
		req->bs_flags = TD_BS_HOLE | TD_BS_ZERO;
	} else {
		hole = lseek(p->fd, off, SEEK_HOLE);
		if (hole < 0)
			hole = end;
		run = (uint64_t)((hole < end ? hole : end) - off);
	}
	/* Report whole sectors; a partial data sector counts as data. */
	if (req->bs_flags)
		run &= ~(uint64_t)(TD_SECTOR_SIZE - 1);
	else
		run = (run + TD_SECTOR_SIZE - 1) & ~(uint64_t)(TD_SECTOR_SIZE - 1);
	if (run == 0) {
		run = TD_SECTOR_SIZE;
		req->bs_flags = 0;
	}
	req->bs_secs = (uint32_t)(run >> TD_SECTOR_SHIFT);
	if (req->bs_secs > req->secs)
		req->bs_secs = req->secs;
	td_complete_request(req, 0);
}

static int aio_open(struct td_image *img, const char *params, unsigned flags)
{
	struct aio_priv *p = img->priv;
	struct stat st;
	int r;

	p->fd = -1;
	if (!*params) {
		tdr_set_error("aio: no file name; use aio:/path/to/disk.img");
		return -EINVAL;
	}
	if (flags & TD_OPEN_NO_O_DIRECT) {
		r = open(params, ((flags & TD_OPEN_RDONLY) ? O_RDONLY : O_RDWR) | O_CLOEXEC);
		if (r < 0)
			r = -errno;
	} else {
		r = tdr_io_open(params, (flags & TD_OPEN_RDONLY) ? O_RDONLY : O_RDWR, 0, &p->direct);
	}
	if (r < 0) {
		if (r == -ENOENT)
			tdr_set_error("%s: no such file; create it first (e.g. truncate -s 1G %s)",
				      params, params);
		else if (r == -EISDIR)
			tdr_set_error("%s: is a directory, not a disk image; give the path of an image file or block device",
				      params);
		else if (r == -EACCES || r == -EPERM || r == -EROFS)
			tdr_set_error("%s: cannot open for %s: %s; check its permissions or use --read-only",
				      params, (flags & TD_OPEN_RDONLY) ? "reading" : "writing",
				      strerror(-r));
		else
			tdr_set_error("%s: cannot open: %s", params, strerror(-r));
		return r;
	}
	p->fd = r;
	r = td_image_lock_file(p->fd, params);
	if (r < 0)
		goto fail;
	if (fstat(p->fd, &st) < 0) {
		r = -errno;
		tdr_set_error("%s: cannot stat: %s", params, strerror(-r));
		goto fail;
	}
	if (S_ISBLK(st.st_mode)) {
		p->blockdev = true;
		if (ioctl(p->fd, BLKGETSIZE64, &p->size) < 0) {
			r = -errno;
			tdr_set_error("%s: cannot read the block device's size: %s", params, strerror(-r));
			goto fail;
		}
	} else if (S_ISREG(st.st_mode)) {
		p->size = (uint64_t)st.st_size;
		p->can_punch = true;
	} else {
		tdr_set_error("%s: not a regular file or block device; give the path of a disk image",
			      params);
		r = -EINVAL;
		goto fail;
	}
	if (p->size < TD_SECTOR_SIZE) {
		tdr_set_error("%s: the image is empty (%llu bytes); give it a size first (e.g. truncate -s 1G %s)",
			      params, (unsigned long long)p->size, params);
		r = -EINVAL;
		goto fail;
	}
	if (p->size % TD_SECTOR_SIZE)
		TDR_WARN("%s: size %llu is not a multiple of 512; the last %llu bytes are not served",
			 params, (unsigned long long)p->size,
			 (unsigned long long)(p->size % TD_SECTOR_SIZE));
	img->size_secs = p->size >> TD_SECTOR_SHIFT;
	img->info_discard = true;
	/* Buffered I/O has the kernel's read-ahead already. */
	if (p->direct && !(flags & TD_OPEN_NO_O_DIRECT) && aio_readahead) {
		r = tdr_ra_new(&p->ra, img->loop, p->fd, img->size_secs << TD_SECTOR_SHIFT,
			       aio_readahead);
		if (r < 0)
			TDR_WARN("%s: no read-ahead: %s", params, strerror(-r));
	}
	return 0;

fail:
	close(p->fd);
	p->fd = -1;
	return r;
}

static uint64_t aio_busy(struct td_image *img)
{
	struct aio_priv *p = img->priv;

	/* Read-ahead chunks run on their own context, which waits for them. */
	return p->ops_live;
}

static void aio_close(struct td_image *img)
{
	struct aio_priv *p = img->priv;

	if (p->ops_live)
		TDR_WARN("%s: closed with %u requests in flight", img->params, p->ops_live);
	tdr_ra_free(p->ra);
	p->ra = NULL;
	while (p->free_ops) {
		struct aio_op *op = p->free_ops;

		p->free_ops = op->next_free;
		free(op);
	}
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
}

static void aio_debug(struct td_image *img, FILE *out)
{
	struct aio_priv *p = img->priv;

	fprintf(out, "    aio: fd=%d %s %s size=%llu in_flight=%u\n", p->fd,
		p->blockdev ? "blockdev" : "file", p->direct ? "O_DIRECT" : "buffered",
		(unsigned long long)p->size, p->ops_live);
}

static void aio_stats(struct td_image *img, FILE *out)
{
	struct aio_priv *p = img->priv;

	fprintf(out, "    short_io_retries=%llu\n", (unsigned long long)p->short_io_retries);
	if (p->ra) {
		struct tdr_ra_stats st;

		tdr_ra_get_stats(p->ra, &st);
		/* One key=value per line: tdr-ctl stats makes each a JSON member. */
		fprintf(out, "    readahead_streams=%llu\n    readahead_hits=%llu\n"
			"    readahead_misses=%llu\n    readahead_deep=%llu\n"
			"    readahead_chunks=%llu\n    readahead_unused=%llu\n"
			"    readahead_invalidated=%llu\n    readahead_reading=%llu\n"
			"    readahead_memory=%zu\n",
			(unsigned long long)st.streams, (unsigned long long)st.hits,
			(unsigned long long)st.misses, (unsigned long long)st.deep,
			(unsigned long long)st.chunks,
			(unsigned long long)st.unused, (unsigned long long)st.invalidated,
			(unsigned long long)st.reading, tdr_ra_memory(p->ra));
	}
}

const struct td_driver td_drv_aio = {
	.name = "aio",
	.priv_size = sizeof(struct aio_priv),
	.open = aio_open,
	.close = aio_close,
	.queue_read = aio_queue_rw,
	.queue_write = aio_queue_rw,
	.queue_flush = aio_queue_flush,
	.queue_discard = aio_queue_discard,
	.queue_block_status = aio_queue_block_status,
	.busy = aio_busy,
	.debug = aio_debug,
	.stats = aio_stats,
};
