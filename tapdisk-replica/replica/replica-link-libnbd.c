/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The link's client on libnbd's asynchronous API (client=libnbd).
 *
 * libnbd runs its state machine only when we call it: after every command
 * we queue (it sends what the socket takes) and when the loop reports the
 * socket readable or writable (nbd_aio_notify_read/write).  Its completion
 * callbacks run inside those calls with the handle locked, so they only do
 * bookkeeping (link_piece_done); the owner's callbacks run afterwards, from
 * the common part's link_process().
 *
 * libnbd sends each command as it is queued (header and payload in separate
 * send() calls), reads each reply with its own recv() and changes its
 * read/write direction about every other request (an epoll_ctl): about 3.5
 * system calls and one or two wake-ups of the server per command
 * (docs/benchmarks.md).  The native client batches them; this one stays for
 * what libnbd brings (it is tested against every server) and as the peer
 * the benchmark compares with.
 */
#include <errno.h>
#include <inttypes.h>
#include <libnbd.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "replica-link-int.h"
#include "tdr/nbd.h"

/* libnbd's error for the call that just failed, as -errno (never 0). */
static int nbd_err(void)
{
	int e = nbd_get_errno();

	return e > 0 ? -e : -EIO;
}

static const char *nbd_msg(void)
{
	const char *m = nbd_get_error();

	return m ? m : "unknown libnbd error";
}

/*
 * TLS settings on a fresh handle.  libnbd runs the TLS handshake inside
 * its state machine (STARTTLS after the first option), on the same
 * non-blocking socket our loop watches, so nothing else changes.  How an
 * X.509 server's certificate gets checked: nbd_connect_any() below.
 */
static int lnbd_set_tls(struct replica_link *l, struct nbd_handle *h, char *msg, size_t msglen)
{
	const char *what = "tls";
	int err;

	if (l->tls == NBD_TLS_OFF)
		return 0;	/* libnbd's default */
	if (nbd_supports_tls(h) != 1) {
		snprintf(msg, msglen, "this libnbd was built without TLS support; use tls=off or a libnbd with GnuTLS");
		return -ENOTSUP;
	}
	if (nbd_set_tls(h, l->tls == NBD_TLS_REQUIRE ? LIBNBD_TLS_REQUIRE : LIBNBD_TLS_ALLOW) == -1)
		goto fail;
	what = "tls-psk";
	if (l->tls_psk && nbd_set_tls_psk_file(h, l->tls_psk) == -1)
		goto fail;
	what = "tls-certificates";
	if (l->tls_certificates && nbd_set_tls_certificates(h, l->tls_certificates) == -1)
		goto fail;
	what = "tls-username";
	if (l->tls_username && nbd_set_tls_username(h, l->tls_username) == -1)
		goto fail;
	what = "tls-verify";
	if (nbd_set_tls_verify_peer(h, !l->tls_no_verify) == -1)
		goto fail;
	return 0;
fail:
	err = nbd_err();
	snprintf(msg, msglen, "%s: %s", what, nbd_msg());
	return err;
}

#define REPLICA_LINK_ERR_MAX 512

/* Errors of the connection itself, before any byte of NBD or TLS. */
static bool is_connect_errno(int err)
{
	switch (-err) {
	case ECONNREFUSED: case ENOENT: case EACCES: case EHOSTUNREACH:
	case ENETUNREACH: case EADDRNOTAVAIL: case ETIMEDOUT:
		return true;
	default:
		return false;
	}
}

/* A connection that failed before the link was ready: what failed, in a line. */
static void lnbd_connect_failed(struct replica_link *l, struct nbd_handle *h, int err, const char *what)
{
	/* A copy: libnbd's message lives only until its next call (nbd_get_tls_negotiated below). */
	char buf[REPLICA_LINK_ERR_MAX];
	const char *m = buf;

	snprintf(buf, sizeof(buf), "%s", what);
	/* libnbd names its own entry point first ("nbd_aio_notify_read: "): of no use here. */
	if (strncmp(m, "nbd_", 4) == 0 && strstr(m, ": "))
		m = strstr(m, ": ") + 2;
	if (is_connect_errno(err))
		link_fail(l, err, "cannot connect: %s", m);
	else if (l->tls != NBD_TLS_OFF && nbd_get_tls_negotiated(h) != 1 && err != -ENOTSUP)
		/* gnutls names the symptom (the server hung up), not the cause. */
		link_fail(l, err, "TLS handshake failed: %s%s", m,
			  strstr(m, "gnutls_handshake") ? " (wrong key or certificate?)" : "");
	else
		link_fail(l, err, "NBD handshake failed: %s", m);
}

/*
 * libnbd checks an X.509 server's certificate only against a host name it
 * knows, and it knows one only from nbd_aio_connect_tcp(): through a bare
 * socket address it would accept any certificate.  So a TLS link to a TCP
 * address connects by name, the address as numeric text (no lookup, as
 * addr= is numeric), and the certificate must name that address.
 */
static int nbd_connect_any(struct replica_link *l, struct nbd_handle *h, const struct sockaddr *sa,
			   socklen_t salen)
{
	char host[NI_MAXHOST], port[NI_MAXSERV];

	if (l->tls == NBD_TLS_OFF || sa->sa_family == AF_UNIX ||
	    getnameinfo(sa, salen, host, sizeof(host), port, sizeof(port),
			NI_NUMERICHOST | NI_NUMERICSERV) != 0)
		return nbd_aio_connect(h, sa, salen);
	return nbd_aio_connect_tcp(h, host, port);
}

static int lnbd_open(struct replica_link *l, const struct sockaddr *sa, socklen_t salen,
		     char *msg, size_t msglen)
{
	struct nbd_handle *h;
	int fd, err;

	h = nbd_create();
	if (!h) {
		snprintf(msg, msglen, "cannot create an NBD handle: %s", nbd_msg());
		return nbd_err();
	}
	if (nbd_set_export_name(h, l->export_name) == -1 ||
	    nbd_set_request_structured_replies(h, true) == -1 ||
	    nbd_set_request_block_size(h, true) == -1) {
		err = nbd_err();
		snprintf(msg, msglen, "cannot configure the NBD handle: %s", nbd_msg());
		nbd_close(h);
		return err;
	}
	if (l->tls != NBD_TLS_OFF && sa->sa_family == AF_UNIX && !l->tls_psk &&
	    !l->tls_no_verify) {
		snprintf(msg, msglen, "TLS with certificates over a UNIX socket: libnbd cannot verify the server's certificate there; use addr=tcp:..., tls-psk=, or tls-verify=off to accept any certificate");
		nbd_close(h);
		return -EINVAL;
	}
	err = lnbd_set_tls(l, h, msg, msglen);
	if (err < 0) {
		nbd_close(h);
		return err;
	}
	l->client = h;
	if (nbd_connect_any(l, h, sa, salen) == -1) {
		/*
		 * An immediate refusal, or (loopback, TLS) a handshake that
		 * already ran and failed: reported from the loop, like any other.
		 */
		lnbd_connect_failed(l, h, nbd_err(), nbd_msg());
		return 0;
	}
	fd = nbd_aio_get_fd(h);
	if (fd < 0) {
		link_fail(l, nbd_err(), "no socket after connecting: %s", nbd_msg());
		return 0;
	}
	/* The same socket options as the native client's. */
	nbd_socket_tune(fd, sa->sa_family != AF_UNIX);
	link_watch_fd(l, fd);
	return 0;
}

static uint32_t lnbd_events(struct replica_link *l)
{
	uint32_t ev = 0;
	int dir;

	if (!l->client)
		return 0;
	dir = nbd_aio_get_direction(l->client);
	if (dir & LIBNBD_AIO_DIRECTION_READ)
		ev |= EPOLLIN;
	if (dir & LIBNBD_AIO_DIRECTION_WRITE)
		ev |= EPOLLOUT;
	return ev;
}

static void lnbd_handshake_done(struct replica_link *l)
{
	struct nbd_handle *h = l->client;
	struct link_export_info info = { 0 };
	int64_t size, max;

	size = nbd_get_size(h);
	if (size < 0) {
		link_fail(l, nbd_err(), "cannot read the export's size: %s", nbd_msg());
		return;
	}
	info.size = (uint64_t)size;
	info.read_only = nbd_is_read_only(h) == 1;
	info.can_flush = nbd_can_flush(h) == 1;
	info.can_zero = nbd_can_zero(h) == 1;
	info.tls = nbd_get_tls_negotiated(h) == 1;
	max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	info.max_payload = max > 0 ? (uint64_t)max : 0;
	link_handshake_done(l, &info);
}

static void lnbd_on_fd(struct replica_link *l, uint32_t events)
{
	struct nbd_handle *h = l->client;
	int dir, r = 0;

	if (!h)
		return;
	dir = nbd_aio_get_direction(h);
	/* Both ready: reading first, as libnbd advises (a reply may change what to write). */
	if ((dir & LIBNBD_AIO_DIRECTION_READ) && (events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		r = nbd_aio_notify_read(h);
	else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)))
		r = nbd_aio_notify_write(h);
	if (r == -1 || nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) {
		/* libnbd gives no errno for a server breaking the protocol. */
		int err = r == -1 ? (nbd_get_errno() > 0 ? -nbd_get_errno() : -EPROTO) : -ECONNRESET;
		const char *m = r == -1 ? nbd_msg() : "the connection was closed";

		if (l->state == LINK_CONNECTING)
			lnbd_connect_failed(l, h, err, m);
		else
			link_fail(l, err, "connection lost: %s", m);
		return;
	}
	if (l->state == LINK_CONNECTING && nbd_aio_is_ready(h) == 1)
		lnbd_handshake_done(l);
}

/* libnbd's completion callback: runs with the handle locked, so only bookkeeping. */
static int lnbd_piece_done(void *user_data, int *error)
{
	link_piece_done(user_data, *error);
	return 1;	/* retire the command: we never ask for it again */
}

static bool lnbd_queue(struct replica_link *l, struct link_piece *p)
{
	nbd_completion_callback cb = { .callback = lnbd_piece_done, .user_data = p, .free = free };
	enum link_op op = p->op;	/* p is freed if queuing fails */
	uint64_t len = p->len, off = p->off;
	int64_t cookie;

	switch (p->op) {
	case LOP_WRITE:
		cookie = nbd_aio_pwrite(l->client, p->buf, p->len, p->off, cb, 0);
		break;
	case LOP_ZERO:
		cookie = nbd_aio_zero(l->client, p->len, p->off, cb,
				      p->no_hole ? LIBNBD_CMD_FLAG_NO_HOLE : 0);
		break;
	default:
		cookie = nbd_aio_flush(l->client, cb, 0);
		break;
	}
	if (cookie == -1) {
		/* The free callback has run (p is gone); the completion callback has not. */
		link_fail(l, nbd_err(), "cannot queue a %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
			  link_op_name(op), len, off, nbd_msg());
		return false;
	}
	return true;
}

/*
 * nbd_close() frees the commands (their completion callbacks do not run;
 * the free callbacks do) and closes the socket without sending anything,
 * so a frozen peer cannot hold us up.
 */
static void lnbd_close(struct replica_link *l)
{
	if (l->client) {
		nbd_close(l->client);
		l->client = NULL;
	}
}

const struct link_ops link_libnbd_ops = {
	.name = "libnbd",
	.open = lnbd_open,
	.on_fd = lnbd_on_fd,
	.events = lnbd_events,
	.queue = lnbd_queue,
	.close = lnbd_close,
};
