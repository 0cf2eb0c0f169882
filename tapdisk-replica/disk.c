/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Disks: opening a stack of images from a spec, following each image's
 * parents, and the entry point for requests (range checks, in-flight
 * accounting, drain).
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/filelock.h"
#include "tdr/image.h"
#include "tdr/log.h"

/* Deeper chains are almost certainly a loop the path check missed. */
#define MAX_CHAIN_DEPTH 64

static void image_free(struct td_image *img)
{
	if (!img)
		return;
	free(img->priv);
	free(img->params);
	free(img);
}

static void image_close(struct td_image *img)
{
	img->drv->close(img);
	image_free(img);
}

static int image_open(struct td_disk *disk, const struct td_driver *drv, const char *params,
		      struct td_image *parent, struct td_image **out)
{
	struct td_image *img = calloc(1, sizeof(*img));
	int r;

	if (!img)
		return -ENOMEM;
	img->drv = drv;
	img->flags = disk->flags;
	img->disk = disk;
	img->loop = disk->loop;
	img->io = disk->io;
	img->parent = parent;
	img->params = strdup(params);
	if (drv->priv_size)
		img->priv = calloc(1, drv->priv_size);
	if (!img->params || (drv->priv_size && !img->priv)) {
		image_free(img);
		return -ENOMEM;
	}
	tdr_clear_error();
	r = drv->open(img, params, disk->flags);
	if (r < 0) {
		if (!*tdr_last_error())
			tdr_set_error("%s:%s: cannot open: %s", drv->name, params, strerror(-r));
		image_free(img);
		return r;
	}
	*out = img;
	return 0;
}

/* Closes the stack from the top down, the reverse of opening. */
static void disk_close_images(struct td_disk *disk)
{
	struct td_image *img = disk->top;

	while (img) {
		struct td_image *parent = img->parent;

		image_close(img);
		img = parent;
	}
	disk->top = disk->bottom = NULL;
}

/*
 * Whether path is already in the chain, whatever driver serves it there: a
 * raw parent (served by aio) whose locators lead back to a VHD of the chain
 * is as much a loop as a VHD that is its own ancestor.
 */
static bool chain_has_path(struct td_image *img, const char *path)
{
	char a[PATH_MAX], b[PATH_MAX];

	if (!realpath(path, a))
		return false;
	for (; img; img = img->child)
		if (realpath(img->params, b) && strcmp(a, b) == 0)
			return true;
	return false;
}

/*
 * Opens the image entry and, below it, every parent it names.  On success
 * *top is the image and *bottom the last parent; links child/parent are set.
 */
static int open_image_chain(struct td_disk *disk, const struct td_driver *drv, const char *params,
			    struct td_image **top, struct td_image **bottom)
{
	struct td_image *img = NULL, *cur;
	int depth = 0, r;

	r = image_open(disk, drv, params, NULL, &img);
	if (r < 0)
		return r;
	cur = img;
	for (;;) {
		struct td_parent_id id;
		const struct td_driver *pdrv;
		struct td_image *parent = NULL;

		if (!cur->drv->get_parent_id)
			break;
		memset(&id, 0, sizeof(id));
		tdr_clear_error();
		r = cur->drv->get_parent_id(cur, &id);
		if (r == TD_NO_PARENT)
			break;
		if (r < 0) {
			if (!*tdr_last_error())
				tdr_set_error("%s: cannot find its parent image: %s",
					      cur->params, strerror(-r));
			goto fail;
		}
		if (++depth > MAX_CHAIN_DEPTH) {
			tdr_set_error("%s: parent chain deeper than %d images; is it a loop?",
				      params, MAX_CHAIN_DEPTH);
			r = -ELOOP;
			goto fail;
		}
		if (chain_has_path(cur, id.path)) {
			tdr_set_error("%s: parent chain loops: %s is already in the chain; 'vhd-util query -n FILE -p' shows each file's parent: restore the file whose locators point back into the chain from a backup",
				      cur->params, id.path);
			r = -ELOOP;
			goto fail;
		}
		pdrv = td_driver_find(id.drv);
		if (!pdrv) {
			tdr_set_error("%s: parent %s has unknown image type '%s'",
				      cur->params, id.path, id.drv);
			r = -EINVAL;
			goto fail;
		}
		r = image_open(disk, pdrv, id.path, NULL, &parent);
		if (r < 0)
			goto fail;
		cur->parent = parent;
		parent->child = cur;
		if (cur->drv->validate_parent) {
			tdr_clear_error();
			r = cur->drv->validate_parent(cur, parent);
			if (r < 0) {
				if (!*tdr_last_error())
					tdr_set_error("%s: parent %s does not match: %s",
						      cur->params, id.path, strerror(-r));
				goto fail;
			}
		}
		cur = parent;
	}
	*top = img;
	*bottom = cur;
	return 0;

fail:
	while (img) {
		struct td_image *parent = img->parent;

		image_close(img);
		img = parent;
	}
	return r;
}

int td_disk_open(struct td_disk **out, const char *spec, unsigned flags,
		 struct tdr_loop *loop, struct tdr_io_ctx *io)
{
	struct td_disk *disk = NULL;
	char *copy = NULL, *entries[16];
	int n = 0, r;

	*out = NULL;
	tdr_clear_error();
	if (!spec || !*spec) {
		tdr_set_error("empty disk spec; write TYPE:PARAMS, e.g. aio:/path/disk.img");
		return -EINVAL;
	}
	disk = calloc(1, sizeof(*disk));
	copy = strdup(spec);
	if (!disk || !copy) {
		r = -ENOMEM;
		goto fail;
	}
	disk->flags = flags;
	disk->loop = loop;
	disk->io = io;
	tdr_list_init(&disk->drain_waiters);
	disk->spec = strdup(spec);
	if (!disk->spec) {
		r = -ENOMEM;
		goto fail;
	}

	for (char *save = NULL, *tok = strtok_r(copy, "|", &save); tok;
	     tok = strtok_r(NULL, "|", &save)) {
		if (n == (int)(sizeof(entries) / sizeof(entries[0]))) {
			tdr_set_error("disk spec '%s' stacks too many entries", spec);
			r = -E2BIG;
			goto fail;
		}
		entries[n++] = tok;
	}
	if (n == 0) {
		tdr_set_error("empty disk spec; write TYPE:PARAMS, e.g. aio:/path/disk.img");
		r = -EINVAL;
		goto fail;
	}

	/* Check every entry before opening anything. */
	const struct td_driver *drvs[16];
	const char *params[16];

	for (int i = 0; i < n; i++) {
		char type[32];

		r = td_spec_split_entry(entries[i], type, sizeof(type), &params[i]);
		if (r < 0)
			goto fail;
		drvs[i] = td_driver_find(type);
		if (!drvs[i]) {
			tdr_set_error("unknown image type '%s' in '%s'; known types: %s",
				      type, spec, td_driver_names());
			r = -EINVAL;
			goto fail;
		}
		if (i < n - 1 && !drvs[i]->is_filter) {
			tdr_set_error("'%s' is an image, not a filter: only filters (like replica:) may stand left of '|'",
				      entries[i]);
			r = -EINVAL;
			goto fail;
		}
		if (i == n - 1 && drvs[i]->is_filter) {
			tdr_set_error("'%s' is a filter and needs an image below it, e.g. %s|vhd:/path/disk.vhd",
				      entries[i], entries[i]);
			r = -EINVAL;
			goto fail;
		}
	}

	/* The image and its parents first: filters look at the chain when they open. */
	r = open_image_chain(disk, drvs[n - 1], params[n - 1], &disk->top, &disk->bottom);
	if (r < 0)
		goto fail;
	for (int i = n - 2; i >= 0; i--) {
		struct td_image *img = NULL;

		r = image_open(disk, drvs[i], params[i], disk->top, &img);
		if (r < 0)
			goto fail;
		disk->top->child = img;
		disk->top = img;
	}
	disk->size_secs = disk->top->size_secs;
	if (disk->size_secs == 0) {
		tdr_set_error("%s: the disk has a size of 0 bytes; give the image a size (e.g. truncate -s 1G FILE)",
			      spec);
		r = -EINVAL;
		goto fail;
	}
	free(copy);
	*out = disk;
	return 0;

fail:
	if (disk) {
		disk_close_images(disk);
		free(disk->spec);
		free(disk);
	}
	free(copy);
	return r;
}

int td_disk_wrap(struct td_disk **out, struct td_image *top, const char *name)
{
	struct td_disk *disk = calloc(1, sizeof(*disk));

	if (!disk || !(disk->spec = strdup(name))) {
		free(disk);
		return -ENOMEM;
	}
	disk->top = top;
	for (disk->bottom = top; disk->bottom->parent; disk->bottom = disk->bottom->parent)
		;
	disk->size_secs = top->size_secs;
	disk->flags = top->flags;
	disk->loop = top->loop;
	disk->io = top->io;
	disk->borrowed = true;
	tdr_list_init(&disk->drain_waiters);
	*out = disk;
	return 0;
}

void td_disk_close(struct td_disk *disk)
{
	struct tdr_list *pos, *tmp;

	if (!disk)
		return;
	/* Waiters never called: their scheduled calls must not reach a freed disk. */
	tdr_list_for_each_safe(pos, tmp, &disk->drain_waiters) {
		struct td_drain_waiter *w = tdr_list_entry(pos, struct td_drain_waiter, entry);

		tdr_loop_cancel_defer(disk->loop, &w->defer);
		tdr_list_del(&w->entry);
	}
	if (!disk->borrowed)
		disk_close_images(disk);
	free(disk->spec);
	free(disk);
}

static void disk_drain_deferred(void *arg)
{
	struct td_drain_waiter *w = arg;
	struct td_disk *disk = w->disk;

	/* Busy again since it was scheduled: the next drain schedules it again. */
	if (disk->inflight)
		return;
	tdr_list_del(&w->entry);
	w->cb(disk, w->arg);
}

/* Nothing in flight: schedule every waiter (see td_disk_drain). */
static void disk_check_drained(struct td_disk *disk)
{
	struct tdr_list *pos, *tmp;

	if (disk->inflight)
		return;
	tdr_list_for_each_safe(pos, tmp, &disk->drain_waiters)
		tdr_loop_defer(disk->loop, &tdr_list_entry(pos, struct td_drain_waiter, entry)->defer);
}

static void disk_request_done(struct td_request *req, int err, void *arg)
{
	struct td_disk *disk = arg;
	td_request_cb_t cb = req->disk_cb;
	void *cb_arg = req->disk_cb_arg;

	req->cb = cb;
	req->cb_arg = cb_arg;
	cb(req, err, cb_arg);
	disk->inflight--;
	disk_check_drained(disk);
}

static bool op_writes(enum td_op op)
{
	return op == TD_OP_WRITE || op == TD_OP_DISCARD || op == TD_OP_WRITE_ZEROES;
}

void td_disk_submit(struct td_disk *disk, struct td_request *req)
{
	int err = 0;

	req->disk = disk;
	req->disk_cb = req->cb;
	req->disk_cb_arg = req->cb_arg;
	req->cb = disk_request_done;
	req->cb_arg = disk;
	req->split_parent = NULL;
	disk->inflight++;

	if ((disk->flags & TD_OPEN_RDONLY) && op_writes(req->op))
		err = -EPERM;
	else if (req->op != TD_OP_FLUSH &&
		 (req->sec > disk->size_secs || req->secs > disk->size_secs - req->sec))
		err = op_writes(req->op) ? -ENOSPC : -EINVAL;
	if (err) {
		req->image = NULL;
		td_complete_request(req, err);
		return;
	}
	if (req->secs == 0 && req->op != TD_OP_FLUSH) {
		req->image = NULL;
		td_complete_request(req, 0);
		return;
	}
	td_queue_request(disk->top, req);
}

void td_disk_drain(struct td_disk *disk, struct td_drain_waiter *w)
{
	w->disk = disk;
	tdr_defer_init(&w->defer, disk_drain_deferred, w);
	tdr_list_add_tail(&w->entry, &disk->drain_waiters);
	disk_check_drained(disk);
}

uint64_t td_disk_busy(struct td_disk *disk, struct td_image **who)
{
	uint64_t n = disk->inflight;

	if (who)
		*who = NULL;
	for (struct td_image *img = disk->top; img; img = img->parent) {
		uint64_t b = img->drv->busy ? img->drv->busy(img) : 0;

		if (b && who && !*who)
			*who = img;
		n += b;
	}
	return n;
}

/*
 * Polled rather than signalled: the images' own work ends in many places
 * (a copy, a flush, a connection closing), a close is rare, and a 1 ms
 * poll costs nothing next to the I/O it waits for.
 */
#define QUIESCE_POLL_NS (1000 * 1000ull)

static void quiesce_poll(struct tdr_timer *t, void *arg)
{
	struct td_quiesce *q = arg;
	struct td_image *who;
	uint64_t now, n = td_disk_busy(q->disk, &who);

	(void)t;
	if (!n) {
		q->cb(q->disk, q->arg);
		return;
	}
	now = tdr_now_ns();
	if (now - q->warn_ns >= (q->warn_every_ns ? q->warn_every_ns : TD_QUIESCE_WARN_NS)) {
		q->warn_ns = now;
		TDR_WARN("%s: closing: still waiting after %llu s for %llu requests in flight (%s%s%s); the storage below may be stuck",
			 q->disk->spec, (unsigned long long)((now - q->start_ns) / 1000000000ull),
			 (unsigned long long)n, who ? who->drv->name : "guest requests",
			 who ? ":" : "", who ? who->params : "");
	}
	tdr_timer_arm(&q->timer, QUIESCE_POLL_NS);
}

void td_disk_quiesce(struct td_disk *disk, struct td_quiesce *q,
		     void (*cb)(struct td_disk *disk, void *arg), void *arg)
{
	q->disk = disk;
	q->cb = cb;
	q->arg = arg;
	q->start_ns = q->warn_ns = tdr_now_ns();
	tdr_timer_init(&q->timer, disk->loop, quiesce_poll, q);
	if (!disk->quiesced) {
		disk->quiesced = true;
		for (struct td_image *img = disk->top; img; img = img->parent)
			if (img->drv->quiesce)
				img->drv->quiesce(img);
	}
	tdr_timer_arm(&q->timer, 0);
}

void td_disk_quiesce_cancel(struct td_quiesce *q)
{
	if (q->disk)
		tdr_timer_cancel(&q->timer);
}

struct td_image *td_disk_find_image(struct td_disk *disk, const char *drv)
{
	for (struct td_image *img = disk->top; img; img = img->parent)
		if (strcmp(img->drv->name, drv) == 0)
			return img;
	return NULL;
}

void td_disk_debug(struct td_disk *disk, FILE *out)
{
	fprintf(out, "disk %s: %llu sectors, %llu in flight\n", disk->spec,
		(unsigned long long)disk->size_secs, (unsigned long long)disk->inflight);
	for (struct td_image *img = disk->top; img; img = img->parent) {
		const struct td_image_stats *st = &img->stats;

		fprintf(out, "  image %s:%s size=%llu rd=%llu/%llu wr=%llu/%llu flush=%llu discard=%llu zero=%llu status=%llu fwd=%llu err=%llu\n",
			img->drv->name, img->params, (unsigned long long)img->size_secs,
			(unsigned long long)st->rd_reqs, (unsigned long long)st->rd_secs,
			(unsigned long long)st->wr_reqs, (unsigned long long)st->wr_secs,
			(unsigned long long)st->flush_reqs, (unsigned long long)st->discard_reqs,
			(unsigned long long)st->zero_reqs, (unsigned long long)st->status_reqs,
			(unsigned long long)st->forwarded, (unsigned long long)st->errors);
		if (img->drv->debug)
			img->drv->debug(img, out);
		if (img->drv->stats)
			img->drv->stats(img, out);
	}
}

int td_image_lock_file(int fd, const char *name)
{
	int r = tdr_file_lock(fd, TDR_LOCK_SHARED);

	if (r < 0)
		tdr_set_error("%s: %s", name, r == -EBUSY ? TDR_LOCK_BUSY_HINT : strerror(-r));
	return r;
}
