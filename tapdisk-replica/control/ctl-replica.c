/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * TDR_MESSAGE_REPLICA: a replica request line for a minor, parsed and run
 * by the replica module; the answer is REPLICA_DATA chunks (for "status")
 * and one REPLICA_RSP.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl-int.h"
#include "tdr/log.h"

static void replica_rsp(struct ctl_conn *c, uint16_t cookie, int err, const char *msg)
{
	struct tdr_ctl_msg rsp;

	tdr_ctl_msg_init(&rsp, TDR_MESSAGE_REPLICA_RSP, cookie);
	rsp.u.response.error = err < 0 ? -err : err;
	snprintf(rsp.u.response.message, sizeof(rsp.u.response.message), "%s", msg ? msg : "");
	ctl_conn_queue(c, &rsp, NULL, 0);
}

/* Sends text as REPLICA_DATA chunks of at most TDR_CTL_DATA_CHUNK bytes. */
static void replica_data(struct ctl_conn *c, uint16_t cookie, const char *text, size_t len)
{
	struct tdr_ctl_msg d;

	while (len) {
		size_t n = len < TDR_CTL_DATA_CHUNK ? len : TDR_CTL_DATA_CHUNK;

		tdr_ctl_msg_init(&d, TDR_MESSAGE_REPLICA_DATA, cookie);
		memcpy(d.u.string.text, text, n);
		if (ctl_conn_queue(c, &d, NULL, 0) < 0)
			return;
		text += n;
		len -= n;
	}
}

static void send_status(struct ctl_conn *c, struct ctl_minor *m, uint16_t cookie)
{
	struct td_image *img = m && m->disk ? replica_find(m->disk) : NULL;
	struct replica_status st;
	char *buf = NULL;
	size_t len = 0;
	FILE *out;

	if (!img)
		return;
	out = open_memstream(&buf, &len);
	if (!out)
		return;
	replica_get_status(img, &st);
	replica_format_status(&st, out);
	if (fclose(out) == 0 && buf)
		replica_data(c, cookie, buf, len);
	free(buf);
}

/* Answers the client (if still there) and forgets the operation. */
static void rop_finish(struct ctl_rop *r)
{
	struct ctl_conn *c = r->conn;

	if (r->srv) {
		tdr_list_del(&r->entry);
		if (r->m)
			r->m->rops--;
	}
	if (c) {
		if (r->op == REPLICA_OP_STATUS && !r->err)
			send_status(c, r->m, r->cookie);
		replica_rsp(c, r->cookie, r->err, r->msg);
		c->rop = NULL;
		c->busy = false;
		if (!r->executing)
			ctl_conn_kick(c);
	}
	TDR_DEBUG("control: replica request on minor %u done: %s%s%s", r->cookie,
		  r->err ? tdr_errno_name(r->err) : "ok", r->msg[0] ? ": " : "", r->msg);
	free(r);
}

static void rop_done(void *arg, int err, const char *msg)
{
	struct ctl_rop *r = arg;

	r->err = err;
	snprintf(r->msg, sizeof(r->msg), "%s", msg ? msg : "");
	r->completed = true;
	/* Inside replica_execute() the caller finishes once it returns. */
	if (!r->executing)
		rop_finish(r);
}

void ctl_do_replica(struct ctl_conn *c)
{
	const char *line = c->req.u.string.text;
	uint16_t cookie = c->req.cookie;
	struct ctl_minor *m;
	struct td_image *img;
	struct replica_cmd cmd;
	char msg[REPLICA_MSG_MAX] = "";
	struct ctl_rop *r;

	if (!tdr_ctl_string_ok(line, sizeof(c->req.u.string.text))) {
		replica_rsp(c, cookie, EINVAL, "replica request not NUL-terminated within 256 bytes");
		return;
	}
	m = ctl_minor_find(c->srv, cookie);
	if (!m || !m->disk) {
		snprintf(msg, sizeof(msg), "no %s %u in this daemon; see tdr-ctl list",
			 m ? "image open on minor" : "minor", cookie);
		replica_rsp(c, cookie, ENODEV, msg);
		return;
	}
	if (m->state == CTL_MINOR_CLOSING) {
		snprintf(msg, sizeof(msg), "minor %u is closing", cookie);
		replica_rsp(c, cookie, EBUSY, msg);
		return;
	}
	if (replica_parse(line, &cmd, msg, sizeof(msg)) < 0) {
		replica_rsp(c, cookie, EINVAL, msg);
		return;
	}
	img = replica_find(m->disk);
	if (!img) {
		snprintf(msg, sizeof(msg),
			 "minor %u (%.160s) has no replica filter; open it with a spec like replica:mode=secondary|aio:/path",
			 cookie, m->params ? m->params : "");
		replica_rsp(c, cookie, EOPNOTSUPP, msg);
		return;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		replica_rsp(c, cookie, ENOMEM, "out of memory");
		return;
	}
	r->srv = c->srv;
	r->conn = c;
	r->m = m;
	r->cookie = cookie;
	r->op = cmd.op;
	r->executing = true;
	tdr_list_add_tail(&r->entry, &c->srv->rops);
	m->rops++;
	c->rop = r;
	c->busy = true;
	replica_execute(img, &cmd, rop_done, r);
	r->executing = false;
	if (r->completed)
		rop_finish(r);
}
