/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * One NBD connection: non-blocking input parsing, the output queue, flow
 * control and teardown.  The protocol itself lives in nbd-handshake.c and
 * nbd-transmission.c; this file only cuts the input into headers and
 * payloads and hands them over.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nbd-int.h"
#include "tdr/log.h"

#define NBD_RBUF_SIZE		(64u << 10)
/* Payload reads this large go straight into the request's buffer. */
#define NBD_DIRECT_READ_MIN	4096u
/* recv() calls per wakeup, so one busy client cannot starve the others. */
#define NBD_READ_BUDGET		32
/* Stop reading options while this much option output is unsent. */
#define NBD_HS_OUT_HIGH		(1u << 20)

/* Stop reading requests while their buffers hold this much. */
#define NBD_REQ_BYTES_HIGH	(256ull << 20)
#define NBD_IOV_BATCH		64
/*
 * Idle request buffers a connection keeps for reuse.  Enough for the
 * replies of a queue of 1 MiB requests to free their buffers in a burst
 * before the next requests take them; freed with the connection.
 */
#define NBD_BUF_CACHE_BYTES	(32u << 20)

static void conn_read(struct nbd_conn *c);
static void conn_flush(struct nbd_conn *c);

static uint64_t hs_limit_ns = NBD_HANDSHAKE_TIMEOUT_DEFAULT * 1000000000ull;

void nbd_set_handshake_timeout(unsigned seconds)
{
	hs_limit_ns = (uint64_t)seconds * 1000000000ull;
}

static void hs_timeout(struct tdr_timer *t, void *arg)
{
	struct nbd_conn *c = arg;

	(void)t;
	if (c->dead || c->phase == NBD_PH_TRANSMISSION)
		return;
	TDR_WARN("nbd: connection %u: handshake not finished within %llu s; closing it",
		 c->id, (unsigned long long)(hs_limit_ns / 1000000000ull));
	nbd_conn_kill(c, "handshake timeout");
}

void nbd_conn_handshake_done(struct nbd_conn *c)
{
	tdr_timer_cancel(&c->hs_timer);
}

static void conn_free(struct nbd_conn *c)
{
	if (c->srv)
		nbd_server_conn_gone(c->srv, c);
	TDR_DEBUG("nbd: connection %u: %llu request buffers reused, %llu allocated", c->id,
		  (unsigned long long)c->bufs.hits, (unsigned long long)c->bufs.misses);
	tdr_bufpool_fini(&c->bufs);
	free(c->optdata);
	free(c->rbuf);
	free(c);
}

void nbd_conn_get(struct nbd_conn *c)
{
	c->busy++;
}

void nbd_conn_put(struct nbd_conn *c)
{
	if (--c->busy)
		return;
	if (c->dead && c->nreqs == 0)
		conn_free(c);
}

static size_t conn_hdr_size(const struct nbd_conn *c)
{
	switch (c->phase) {
	case NBD_PH_CLIENT_FLAGS:
		return 4;
	case NBD_PH_OPTIONS:
		return NBD_OPT_HDR_SIZE;
	default:
		return NBD_REQUEST_SIZE;
	}
}

/* Backpressure: only checked between messages, never inside a payload. */
static bool conn_paused(const struct nbd_conn *c)
{
	if (c->tls_switch)
		return true;	/* nothing is read in the clear after STARTTLS */
	if (c->phase == NBD_PH_TRANSMISSION)
		return c->nreqs >= c->max_inflight || c->req_bytes >= NBD_REQ_BYTES_HIGH;
	return c->out_bytes >= NBD_HS_OUT_HIGH;
}

static bool conn_wants_input(const struct nbd_conn *c)
{
	if (c->dead || c->read_eof)
		return false;
	return c->in_payload || !conn_paused(c);
}

static void conn_update_events(struct nbd_conn *c)
{
	uint32_t ev = 0;

	if (c->dead || !c->watching)
		return;
	if (conn_wants_input(c))
		ev |= EPOLLIN;
	if (!tdr_list_empty(&c->outq))
		ev |= EPOLLOUT;
	if (ev == c->events)
		return;
	if (tdr_loop_update_fd(&c->watch, ev) < 0) {
		nbd_conn_kill(c, "cannot update the event loop");
		return;
	}
	c->events = ev;
}

static void conn_maybe_close(struct nbd_conn *c)
{
	if (!c->dead && c->closing && c->nreqs == 0 && tdr_list_empty(&c->outq))
		nbd_conn_kill(c, NULL);
}

void nbd_conn_kill(struct nbd_conn *c, const char *why)
{
	if (c->dead)
		return;
	nbd_conn_get(c);
	if (why)
		TDR_DEBUG("nbd: connection %u closed: %s", c->id, why);
	else
		TDR_DEBUG("nbd: connection %u closed", c->id);
	c->dead = true;
	c->read_eof = true;
	tdr_timer_cancel(&c->hs_timer);
	tdr_loop_cancel_defer(c->loop, &c->defer);
	if (c->watching) {
		tdr_loop_unwatch_fd(&c->watch);
		c->watching = false;
	}
	c->tr.ops->close(&c->tr);
	while (!tdr_list_empty(&c->outq)) {
		struct nbd_out *o = tdr_list_first(&c->outq, struct nbd_out, entry);

		tdr_list_del(&o->entry);
		o->done(o, false);
	}
	c->out_bytes = 0;
	c->in_payload = false;
	if (c->preq) {
		struct nbd_req *r = c->preq;

		c->preq = NULL;
		nbd_req_free(r);
	}
	nbd_conn_put(c);
}

void nbd_conn_finish(struct nbd_conn *c)
{
	if (c->dead)
		return;
	nbd_conn_get(c);
	c->read_eof = true;
	c->closing = true;
	/* A payload cut short will never complete: drop its request. */
	if (c->in_payload) {
		c->in_payload = false;
		if (c->preq) {
			struct nbd_req *r = c->preq;

			c->preq = NULL;
			nbd_req_free(r);
		}
	}
	conn_update_events(c);
	conn_maybe_close(c);
	nbd_conn_put(c);
}

void nbd_conn_queue(struct nbd_conn *c, struct nbd_out *o)
{
	size_t bytes = 0;
	int i;

	if (c->dead) {
		o->done(o, false);
		return;
	}
	for (i = 0; i < o->iovcnt; i++)
		bytes += o->iov[i].iov_len;
	o->bytes = bytes;
	tdr_list_add_tail(&o->entry, &c->outq);
	c->out_bytes += bytes;
	/* Deferred so that replies completed in one loop iteration share one
	 * writev. */
	tdr_loop_defer(c->loop, &c->defer);
}

void nbd_conn_kick(struct nbd_conn *c)
{
	if (!c->dead)
		tdr_loop_defer(c->loop, &c->defer);
}

void nbd_conn_expect_payload(struct nbd_conn *c, char *dst, uint64_t len, nbd_payload_done_t done)
{
	if (len == 0) {
		done(c);
		return;
	}
	c->in_payload = true;
	c->pdst = dst;
	c->premain = len;
	c->pdone = done;
}

static void conn_eof(struct nbd_conn *c)
{
	if (c->in_payload || c->rstart != c->rend)
		TDR_DEBUG("nbd: connection %u: client closed in the middle of a message", c->id);
	if (c->phase != NBD_PH_TRANSMISSION) {
		nbd_conn_kill(c, "client closed during the handshake");
		return;
	}
	/* Answer what was already asked (the client may have only shut down
	 * its sending side), then close. */
	nbd_conn_finish(c);
}

/* Hands complete headers and payload bytes from rbuf to the protocol. */
static void conn_process(struct nbd_conn *c)
{
	while (!c->dead && !c->read_eof) {
		size_t avail = c->rend - c->rstart;
		const unsigned char *p;
		size_t need;

		if (c->in_payload) {
			size_t n = avail < c->premain ? avail : (size_t)c->premain;

			if (n) {
				if (c->pdst) {
					memcpy(c->pdst, c->rbuf + c->rstart, n);
					c->pdst += n;
				}
				c->rstart += n;
				c->premain -= n;
			}
			if (c->premain)
				return;
			c->in_payload = false;
			c->pdone(c);
			continue;
		}
		if (conn_paused(c))
			return;
		need = conn_hdr_size(c);
		if (avail < need)
			return;
		p = c->rbuf + c->rstart;
		c->rstart += need;
		switch (c->phase) {
		case NBD_PH_CLIENT_FLAGS:
			nbd_hs_client_flags(c, p);
			break;
		case NBD_PH_OPTIONS:
			nbd_hs_option_header(c, p);
			break;
		case NBD_PH_TRANSMISSION:
			nbd_tx_request_header(c, p);
			break;
		}
	}
}

static void conn_read(struct nbd_conn *c)
{
	int budget = NBD_READ_BUDGET;
	ssize_t n;

	c->need_read = false;
	for (;;) {
		conn_process(c);
		if (!conn_wants_input(c)) {
			/* Paused with input maybe still buffered: resume from
			 * nbd_conn_kick(), not only from EPOLLIN. */
			c->need_read = !c->dead && !c->read_eof;
			break;
		}
		if (budget-- == 0) {
			c->need_read = true;
			tdr_loop_defer(c->loop, &c->defer);
			break;
		}
		if (c->in_payload && c->pdst && c->rstart == c->rend &&
		    c->premain >= NBD_DIRECT_READ_MIN) {
			n = c->tr.ops->recv(&c->tr, c->pdst, (size_t)c->premain);
			if (n > 0) {
				c->pdst += n;
				c->premain -= (uint64_t)n;
				continue;
			}
		} else {
			if (c->rstart == c->rend) {
				c->rstart = c->rend = 0;
			} else if (c->rend > NBD_RBUF_SIZE / 2) {
				memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
				c->rend -= c->rstart;
				c->rstart = 0;
			}
			n = c->tr.ops->recv(&c->tr, c->rbuf + c->rend, NBD_RBUF_SIZE - c->rend);
			if (n > 0) {
				c->rend += (size_t)n;
				continue;
			}
		}
		if (n == -EAGAIN) {
			if (c->tr.ops->pending && c->tr.ops->pending(&c->tr))
				continue;
			break;
		}
		if (n == 0)
			conn_eof(c);
		else
			nbd_conn_kill(c, "read error");
		break;
	}
	conn_update_events(c);
}

/*
 * STARTTLS was acknowledged and the ACK is out: the transport becomes TLS
 * and the handshake starts with the next read.  A client that sent
 * anything after STARTTLS before our ACK broke the protocol: those bytes
 * would be read in the clear.
 */
static void conn_start_tls(struct nbd_conn *c)
{
	c->tls_switch = false;
	if (c->rstart != c->rend) {
		nbd_conn_kill(c, "data after NBD_OPT_STARTTLS before the server's reply");
		return;
	}
	if (!c->srv || nbd_tls_wrap(&c->tr, c->srv->tls, c->id) < 0) {
		nbd_conn_kill(c, "cannot start TLS");
		return;
	}
	c->tls_on = true;
	c->need_read = true;
	tdr_loop_defer(c->loop, &c->defer);
}

static void conn_flush(struct nbd_conn *c)
{
	while (!c->dead && !tdr_list_empty(&c->outq)) {
		struct iovec iov[NBD_IOV_BATCH];
		struct tdr_list *pos;
		size_t left;
		ssize_t w;
		int n = 0, i;

		for (pos = c->outq.next; pos != &c->outq && n <= NBD_IOV_BATCH - 3; pos = pos->next) {
			struct nbd_out *o = tdr_list_entry(pos, struct nbd_out, entry);

			for (i = 0; i < o->iovcnt; i++)
				if (o->iov[i].iov_len)
					iov[n++] = o->iov[i];
		}
		w = c->tr.ops->sendv(&c->tr, iov, n);
		if (w == -EAGAIN)
			break;
		if (w < 0) {
			nbd_conn_kill(c, "write error");
			return;
		}
		left = (size_t)w;
		c->out_bytes -= left;
		while (!tdr_list_empty(&c->outq)) {
			struct nbd_out *o = tdr_list_first(&c->outq, struct nbd_out, entry);

			for (i = 0; i < o->iovcnt && left; i++) {
				size_t take = o->iov[i].iov_len < left ? o->iov[i].iov_len : left;

				o->iov[i].iov_base = (char *)o->iov[i].iov_base + take;
				o->iov[i].iov_len -= take;
				o->bytes -= take;
				left -= take;
			}
			if (o->bytes)
				break;
			tdr_list_del(&o->entry);
			o->done(o, true);
		}
	}
	if (!c->dead && c->tls_switch && tdr_list_empty(&c->outq))
		conn_start_tls(c);
	conn_update_events(c);
	conn_maybe_close(c);
}

static void conn_deferred(void *arg)
{
	struct nbd_conn *c = arg;

	nbd_conn_get(c);
	conn_flush(c);
	if (!c->dead && c->need_read && conn_wants_input(c))
		conn_read(c);
	if (!c->dead) {
		conn_update_events(c);
		conn_maybe_close(c);
	}
	nbd_conn_put(c);
}

static void conn_event(struct tdr_fd_watch *w, uint32_t events, void *arg)
{
	struct nbd_conn *c = arg;

	nbd_conn_get(c);
	if (events & EPOLLERR) {
		nbd_conn_kill(c, "socket error");
		goto out;
	}
	if (events & EPOLLOUT) {
		conn_flush(c);
		/*
		 * The flush may lift the pause on input already read (rbuf,
		 * or a record inside TLS): the socket will not say so again.
		 */
		if (!c->dead && c->need_read && conn_wants_input(c))
			nbd_conn_kick(c);
	}
	if (c->dead)
		goto out;
	if (events & (EPOLLIN | EPOLLHUP)) {
		if (conn_wants_input(c))
			conn_read(c);
		else if (events & EPOLLHUP)
			/* Not reading and the peer is gone: nobody to answer. */
			nbd_conn_kill(c, "client hung up");
	}
out:
	nbd_conn_put(c);
}

void nbd_conn_shutdown(struct nbd_conn *c)
{
	if (c->dead)
		return;
	nbd_conn_get(c);
	if (c->phase == NBD_PH_TRANSMISSION)
		nbd_conn_finish(c);
	else if (c->phase == NBD_PH_OPTIONS && !c->fixed_newstyle)
		/* It cannot be told why: option errors are fixed newstyle. */
		nbd_conn_kill(c, "server shutting down");
	/*
	 * Else still negotiating.  proto.md: the server SHOULD error its
	 * further options with NBD_REP_ERR_SHUTDOWN (opt_dispatch does), and
	 * the client MUST then disconnect; the server's shutdown grace period
	 * closes it if it does not.
	 */
	nbd_conn_put(c);
}

struct nbd_conn *nbd_conn_new(struct nbd_server *srv, int fd)
{
	struct nbd_conn *c;

	c = calloc(1, sizeof(*c));
	if (!c)
		goto fail;
	c->rbuf = malloc(NBD_RBUF_SIZE);
	if (!c->rbuf)
		goto fail;
	nbd_transport_plain_init(&c->tr, fd);
	c->srv = srv;
	c->loop = srv->loop;
	c->id = ++srv->next_id;
	c->max_inflight = srv->max_inflight;
	c->phase = NBD_PH_CLIENT_FLAGS;
	tdr_list_init(&c->outq);
	tdr_list_init(&c->entry);
	tdr_bufpool_init(&c->bufs, NBD_BUF_CACHE_BYTES);
	tdr_defer_init(&c->defer, conn_deferred, c);
	tdr_timer_init(&c->hs_timer, srv->loop, hs_timeout, c);
	if (tdr_loop_watch_fd(srv->loop, &c->watch, fd, EPOLLIN, conn_event, c) < 0)
		goto fail;
	if (hs_limit_ns)
		tdr_timer_arm(&c->hs_timer, hs_limit_ns);
	c->watching = true;
	c->events = EPOLLIN;
	tdr_list_add_tail(&c->entry, &srv->conns);
	srv->nconns++;
	TDR_DEBUG("nbd: connection %u opened", c->id);
	nbd_hs_start(c);
	return c;
fail:
	if (c)
		free(c->rbuf);
	free(c);
	close(fd);
	return NULL;
}
