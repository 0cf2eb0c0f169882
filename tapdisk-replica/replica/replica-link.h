/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The primary's link to its secondary: an NBD client driven by our event
 * loop, our own (the default) or libnbd's asynchronous API (client=libnbd).
 *
 * Guarantees the primary relies on:
 *  - Nothing blocks.  Connecting uses numeric addresses only (a name lookup
 *    would block the loop); the handshake, every command and the close run
 *    on the loop.  A link whose peer is frozen is abandoned by closing its
 *    socket, without a word to the server.
 *  - Every request's done callback runs exactly once, never from inside
 *    the call that queued it and never from inside a client's callback (so a
 *    done callback may queue more requests or close the link).
 *  - Every request completes within the timeout: when the oldest request
 *    has waited that long, or any request fails, or the connection dies,
 *    the link breaks.  It then tells its owner once (broken), closes the
 *    handle and completes everything still pending with the error; from
 *    then on new requests fail at once (-ENOTCONN).  A link never recovers:
 *    the owner opens a new one.
 *  - When a request's done callback runs, the client no longer references
 *    its buffer.
 */
#ifndef TDR_REPLICA_LINK_H
#define TDR_REPLICA_LINK_H

#include <stdbool.h>
#include <stdint.h>

#include "tdr/list.h"
#include "tdr/loop.h"
#include "tdr/nbd.h"

struct replica_link;
struct replica_link_req;

typedef void (*replica_link_done_fn)(struct replica_link_req *lr, int err);

/* Embedded in the caller's structure; valid until done runs. */
struct replica_link_req {
	/* --- private to the link --- */
	struct tdr_list entry;		/* pending, then done, list */
	struct replica_link *link;
	uint64_t deadline_ns;
	unsigned pieces;		/* NBD commands outstanding */
	int err;
	bool queued_done;
	replica_link_done_fn done;
	void *arg;			/* for the caller */
};

struct replica_link_cbs {
	/*
	 * The connection is ready (err 0) or could not be made (msg says why).
	 * Called once, from the loop.  After a failure the link is dead; the
	 * owner closes it.
	 */
	void (*connected)(void *arg, int err, const char *msg);
	/*
	 * A ready link broke: msg describes the first error.  Called once,
	 * before the pending requests complete with err.
	 */
	void (*broken)(void *arg, int err, const char *msg);
};

enum replica_link_client {
	REPLICA_LINK_NATIVE = 0,	/* replica-link-native.c */
	REPLICA_LINK_LIBNBD,		/* replica-link-libnbd.c */
};

struct replica_link_config {
	const char *addr;		/* tcp:HOST:PORT or unix:PATH */
	const char *export_name;
	uint32_t timeout_ms;		/* per request, and for the whole handshake */
	uint64_t expect_size;		/* bytes; the export must have this size */
	enum replica_link_client client;
	/*
	 * client=native: send large WRITE payloads by reference (vmsplice()
	 * into a pipe, splice() into the socket) instead of copying them.
	 * The secondary may then read a payload's pages until it replies;
	 * see replica-link-native.c.  libnbd always copies.
	 */
	bool no_zerocopy;
	/*
	 * TLS (client=libnbd only), with libnbd's gnutls: a pre-shared key file (psktool's
	 * "username:hexkey" lines, as nbdkit reads), or a directory of X.509
	 * files (ca-cert.pem, client-cert.pem, client-key.pem), or libnbd's
	 * default directories when neither is given.  NULL or "": not set.
	 * The strings are copied.
	 */
	enum nbd_tls_mode tls;		/* on: TLS if the server offers it; require: no TLS, no link */
	const char *tls_psk;
	const char *tls_certificates;
	const char *tls_username;
	bool tls_no_verify;		/* X.509: do not verify the server's certificate */
};

struct replica_link_stats {
	uint64_t write_cmds, write_bytes;	/* payload bytes sent in NBD_CMD_WRITE */
	uint64_t spliced_bytes;			/* of those, handed over by reference */
	uint64_t zero_cmds, zero_bytes;		/* ranges zeroed (no payload) */
	uint64_t flush_cmds;
};

/*
 * Starts connecting; cbs->connected reports the outcome.  Returns 0, or
 * -errno with *msg (msglen bytes) set for errors found at once (a bad
 * address).
 */
int replica_link_open(struct replica_link **out, struct tdr_loop *loop,
		      const struct replica_link_config *cfg, const struct replica_link_cbs *cbs,
		      void *arg, char *msg, size_t msglen);

/*
 * Closes the link at once without waiting for the peer; pending requests
 * complete with -ECANCELED (possibly before this returns), the callbacks
 * are not called again.  NULL is a no-op.
 */
void replica_link_close(struct replica_link *l);

/* True once connected and not broken. */
bool replica_link_ready(const struct replica_link *l);
/* Requests pending. */
unsigned replica_link_inflight(const struct replica_link *l);
const struct replica_link_stats *replica_link_get_stats(const struct replica_link *l);
/* Whether the server supports FLUSH / WRITE_ZEROES (valid once ready). */
bool replica_link_can_flush(const struct replica_link *l);
bool replica_link_can_zero(const struct replica_link *l);
/* Whether the connection runs over TLS (valid once ready). */
bool replica_link_tls(const struct replica_link *l);

/* buf must stay valid until done runs.  Large writes are split as the server requires. */
void replica_link_pwrite(struct replica_link *l, struct replica_link_req *lr, const void *buf,
			 uint64_t len, uint64_t off, replica_link_done_fn done, void *arg);
/* Zeroes the range; no_hole keeps it allocated (NBD_CMD_FLAG_NO_HOLE). */
void replica_link_zero(struct replica_link *l, struct replica_link_req *lr, uint64_t len,
		       uint64_t off, bool no_hole, replica_link_done_fn done, void *arg);
/* NBD_CMD_FLUSH, or nothing if the server cannot flush (every write is then already stable). */
void replica_link_flush(struct replica_link *l, struct replica_link_req *lr,
			replica_link_done_fn done, void *arg);

#endif
