/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The control directory of a disk: requests go to the disk's replica filter
 * through the replica_* operations, the same ones the control socket uses.
 * Kept apart from xs-ctl.c so that the protocol's unit tests can drive it
 * with a fake backend.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tdr/image.h"
#include "tdr/log.h"
#include "tdr/replica.h"
#include "tdr/xenstore.h"

struct disk_backend {
	struct td_image *img;	/* the replica filter, or NULL */
	char spec[256];
};

static int be_parse(void *arg, const char *line, struct replica_cmd *cmd, char *msg,
		    size_t msglen)
{
	(void)arg;
	return replica_parse(line, cmd, msg, msglen);
}

static void be_execute(void *arg, const struct replica_cmd *cmd, replica_done_fn done,
		       void *done_arg)
{
	struct disk_backend *b = arg;
	char msg[512];

	if (!b->img) {
		/* A request for a replica this disk does not have. */
		snprintf(msg, sizeof(msg),
			 "this disk (%s) has no replica filter; serve a replica:...|IMAGE spec to replicate it",
			 b->spec);
		done(done_arg, -ENODEV, msg);
		return;
	}
	replica_execute(b->img, cmd, done, done_arg);
}

static void be_status(void *arg, FILE *out)
{
	struct disk_backend *b = arg;
	struct replica_status st;

	if (!b->img)
		return;
	replica_get_status(b->img, &st);
	replica_format_status(&st, out);
}

static void be_set_observer(void *arg, void (*changed)(void *), void *cb_arg)
{
	struct disk_backend *b = arg;

	if (b->img)
		replica_set_observer(b->img, changed, cb_arg);
}

static void be_free(void *arg)
{
	free(arg);
}

static const struct tdr_xs_backend disk_backend_ops = {
	.parse = be_parse,
	.execute = be_execute,
	.status = be_status,
	.set_observer = be_set_observer,
	.free = be_free,
};

int tdr_xs_ctl_new_disk(struct tdr_xs_ctl **out, struct tdr_loop *loop,
			const struct tdr_xs_opts *o, struct td_disk *disk)
{
	struct disk_backend *b = calloc(1, sizeof(*b));
	int ret;

	*out = NULL;
	if (!b) {
		tdr_set_error("out of memory setting up the xenstore control directory %s", o->dir);
		return -ENOMEM;
	}
	b->img = replica_find(disk);
	snprintf(b->spec, sizeof(b->spec), "%s", disk->spec ? disk->spec : "?");
	ret = tdr_xs_ctl_new(out, loop, o, &disk_backend_ops, b);
	if (ret < 0)
		free(b);
	return ret;
}
