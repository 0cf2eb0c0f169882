/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * NBD server internals shared by the files of tapdisk-replica/nbd/.
 *
 * Lifetime rules:
 *  - A connection (nbd_conn) is "dead" once its transport is closed.  It is
 *    freed only when it is dead, has no request (nbd_req) alive and no
 *    callback of it is on the stack (busy == 0): td_requests in flight point
 *    into nbd_req, which points at the connection.
 *  - An nbd_req lives from its header until its reply is written (or the
 *    connection dies and its td_request, if any, has completed).
 */
#ifndef TDR_NBD_INT_H
#define TDR_NBD_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "tdr/image.h"
#include "tdr/list.h"
#include "tdr/loop.h"
#include "tdr/nbd.h"

/* ------------------------------------------------------------------ */
/* Transport: how a connection moves bytes: plain sockets (nbd-transport.c),
 * or TLS after NBD_OPT_STARTTLS (nbd-tls.c, which uses priv). */

struct nbd_transport;

struct nbd_transport_ops {
	const char *name;
	/* > 0 bytes read, 0 at end of stream, -EAGAIN, or -errno. */
	ssize_t (*recv)(struct nbd_transport *t, void *buf, size_t len);
	/* >= 0 bytes written, -EAGAIN, or -errno. */
	ssize_t (*sendv)(struct nbd_transport *t, const struct iovec *iov, int iovcnt);
	/* true if bytes are buffered inside the transport (TLS records) that
	 * epoll cannot see; NULL means never. */
	bool (*pending)(struct nbd_transport *t);
	void (*close)(struct nbd_transport *t);
};

struct nbd_transport {
	const struct nbd_transport_ops *ops;
	int fd;
	void *priv;
};

/* Wraps a connected, non-blocking socket; always succeeds. */
void nbd_transport_plain_init(struct nbd_transport *t, int fd);

/* nbd-tls.c: a server's TLS credentials, and the TLS transport. */
struct nbd_tls;
/* *out NULL for mode off.  0 or -errno with tdr_set_error(). */
int nbd_tls_new(struct nbd_tls **out, const struct nbd_tls_config *cfg);
void nbd_tls_free(struct nbd_tls *tls);
enum nbd_tls_mode nbd_tls_mode(const struct nbd_tls *tls);
/* Switches t (plain, connected) to TLS as the server; the handshake runs in recv. */
int nbd_tls_wrap(struct nbd_transport *t, const struct nbd_tls *tls, unsigned id);

/* ------------------------------------------------------------------ */

struct nbd_export {
	struct tdr_list entry;
	char *name;
	char *description;
	struct td_disk *disk;
	bool readonly;
};

struct nbd_listener {
	struct tdr_list entry;
	struct nbd_server *srv;
	int fd;
	bool tcp;
	struct tdr_fd_watch watch;
	bool watching;
	struct tdr_timer retry;	/* re-enables accept after EMFILE */
	char *unix_path;	/* unlinked at close if still ours */
	dev_t dev;
	ino_t ino;
	char desc[128];
};

struct nbd_server {
	struct tdr_loop *loop;
	struct tdr_list exports;
	struct tdr_list listeners;
	struct tdr_list conns;
	unsigned nconns;
	unsigned next_id;
	unsigned max_inflight;

	struct nbd_tls *tls;		/* NULL: no TLS */

	bool shutting_down;
	void (*done)(void *arg);
	void *done_arg;
	struct tdr_defer done_defer;
	struct tdr_timer shutdown_timer;
};

/* An output buffer: iov[] is consumed in place as it is written. */
struct nbd_out {
	struct tdr_list entry;
	struct iovec iov[3];
	int iovcnt;
	size_t bytes;		/* left to write */
	/* Called once: after the last byte is written, or with sent false
	 * when the connection dies first.  Frees the buffer. */
	void (*done)(struct nbd_out *o, bool sent);
};

enum nbd_phase {
	NBD_PH_CLIENT_FLAGS,
	NBD_PH_OPTIONS,
	NBD_PH_TRANSMISSION,
};

struct nbd_conn;
typedef void (*nbd_payload_done_t)(struct nbd_conn *c);

struct nbd_conn {
	struct nbd_server *srv;		/* NULL once the server is freed */
	struct tdr_list entry;		/* srv->conns */
	struct tdr_loop *loop;
	unsigned id;
	struct nbd_transport tr;
	struct tdr_fd_watch watch;
	bool watching;
	uint32_t events;
	struct tdr_defer defer;		/* flush output, resume input */
	struct tdr_timer hs_timer;	/* the handshake's deadline */

	enum nbd_phase phase;
	bool tls_switch;		/* STARTTLS acknowledged: switch once it is sent */
	bool tls_on;			/* the transport is TLS */
	bool no_zeroes;
	bool fixed_newstyle;		/* the client set NBD_FLAG_C_FIXED_NEWSTYLE */
	bool structured;
	bool meta;			/* base:allocation selected ... */
	const struct nbd_export *meta_exp;	/* ... for this export */
	struct nbd_export *exp;		/* the export in transmission */
	unsigned max_inflight;

	/* Input: a linear buffer, compacted when needed. */
	unsigned char *rbuf;
	size_t rstart, rend;
	bool in_payload;		/* reading a payload, not a header */
	char *pdst;			/* payload destination; NULL: discard */
	uint64_t premain;		/* payload bytes still to come */
	nbd_payload_done_t pdone;
	struct nbd_opt_hdr opt;		/* option being read */
	unsigned char *optdata;
	struct nbd_req *preq;		/* request whose payload is being read */

	bool read_eof;			/* no more input wanted */
	bool need_read;			/* input stopped early; resume on kick */
	bool closing;			/* close once output and requests drain */
	bool dead;			/* transport closed */
	unsigned busy;			/* callbacks of ours on the stack */

	struct tdr_list outq;
	size_t out_bytes;
	unsigned nreqs;			/* nbd_req alive */
	uint64_t req_bytes;		/* their buffers */
	/* Their buffers come from here: per connection, so one client's
	 * stale data never reaches another. */
	struct tdr_bufpool bufs;
};

struct nbd_req {
	struct nbd_conn *conn;
	struct nbd_request r;
	struct td_request td;
	char *buf;			/* READ/WRITE data, zeroes for fallback */
	size_t buflen;
	uint32_t error;			/* NBD error for the reply, 0 if none */
	const char *why;		/* message for a structured error reply */

	/* multi-step commands (BLOCK_STATUS, WRITE_ZEROES fallback) */
	bool in_submit;
	bool inline_done;
	int td_err;
	bool zero_fallback;
	uint64_t pos, end;		/* bytes */
	unsigned char *extents;		/* context id + descriptors */
	uint32_t nextents;
	uint32_t last_flags;

	struct nbd_out out;
	unsigned char hdr[40];
};

/* nbd-conn.c */
struct nbd_conn *nbd_conn_new(struct nbd_server *srv, int fd);
void nbd_conn_get(struct nbd_conn *c);
void nbd_conn_put(struct nbd_conn *c);
/* Closes the transport now, dropping unsent output. */
void nbd_conn_kill(struct nbd_conn *c, const char *why);
/* No more input; close once everything in flight is answered. */
void nbd_conn_finish(struct nbd_conn *c);
/* Queues o and arranges for the output to be written. */
void nbd_conn_queue(struct nbd_conn *c, struct nbd_out *o);
/* Reads len payload bytes into dst (NULL: discard), then calls done. */
void nbd_conn_expect_payload(struct nbd_conn *c, char *dst, uint64_t len, nbd_payload_done_t done);
/* Re-evaluates flow control (after a request is freed, say). */
void nbd_conn_kick(struct nbd_conn *c);
/* Transmission reached: the handshake deadline is off. */
void nbd_conn_handshake_done(struct nbd_conn *c);
/* Called when the server shuts down. */
void nbd_conn_shutdown(struct nbd_conn *c);

/* nbd-handshake.c */
void nbd_hs_start(struct nbd_conn *c);
void nbd_hs_client_flags(struct nbd_conn *c, const unsigned char *p);
void nbd_hs_option_header(struct nbd_conn *c, const unsigned char *p);

/* nbd-transmission.c */
void nbd_tx_request_header(struct nbd_conn *c, const unsigned char *p);
/* Frees a request and its buffers, and lets its connection read again. */
void nbd_req_free(struct nbd_req *r);

/* nbd-server.c */
struct nbd_export *nbd_server_find_export(struct nbd_server *srv, const char *name, size_t len);
void nbd_server_conn_gone(struct nbd_server *srv, struct nbd_conn *c);

#endif
