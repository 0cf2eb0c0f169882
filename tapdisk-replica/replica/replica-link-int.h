/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Inside the primary's link: the common part (replica-link.c: addresses,
 * the pending list, timeouts, completion, the owner's callbacks) and two
 * NBD clients behind struct link_ops:
 *
 *   replica-link-native.c  our own client: writes only, simple replies,
 *                          every command queued in a loop turn sent in one
 *                          sendmsg() (the default);
 *   replica-link-libnbd.c  libnbd's asynchronous API (client=libnbd).
 *
 * A client moves bytes; the common part decides what a failure means.
 */
#ifndef TDR_REPLICA_LINK_INT_H
#define TDR_REPLICA_LINK_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "replica-link.h"

/* Without the server's block size constraints, 32 MiB is what the NBD protocol promises. */
#define LINK_DEFAULT_MAX_PAYLOAD (32u << 20)

enum link_state {
	LINK_CONNECTING,
	LINK_READY,
	LINK_DEAD,
};

enum link_op {
	LOP_WRITE,
	LOP_ZERO,
	LOP_FLUSH,
};

/*
 * One NBD command.  Allocated by the common part, owned by the client from
 * ops->queue() on (also when queuing fails), which frees it after
 * link_piece_done() or when it drops the connection.
 */
struct link_piece {
	struct replica_link_req *lr;
	enum link_op op;
	uint64_t off, len;
	const void *buf;		/* LOP_WRITE: len bytes */
	bool no_hole;			/* LOP_ZERO */
};

/* What the server said about the export at the end of the handshake. */
struct link_export_info {
	uint64_t size;
	bool read_only, can_flush, can_zero;
	bool tls;			/* TLS was negotiated */
	uint64_t max_payload;		/* 0: the server did not say */
};

struct link_ops {
	const char *name;
	/*
	 * Starts connecting to sa.  0 (a refused connection is reported with
	 * link_fail(), from the loop), or -errno with msg set when the client
	 * cannot even be set up.
	 */
	int (*open)(struct replica_link *l, const struct sockaddr *sa, socklen_t salen,
		    char *msg, size_t msglen);
	/* The socket is ready for what events() asked. */
	void (*on_fd)(struct replica_link *l, uint32_t events);
	/* EPOLLIN / EPOLLOUT the client wants now. */
	uint32_t (*events)(struct replica_link *l);
	/* Queues p (see struct link_piece for ownership); false after link_fail(). */
	bool (*queue)(struct replica_link *l, struct link_piece *p);
	/* Drops the connection at once, without a word to the peer; frees every piece. */
	void (*close)(struct replica_link *l);
};

extern const struct link_ops link_native_ops;
extern const struct link_ops link_libnbd_ops;

struct replica_link {
	struct tdr_loop *loop;
	const struct link_ops *ops;
	void *client;			/* the client's own state */
	enum link_state state;
	char addr[256];
	char export_name[256];
	uint64_t timeout_ns;
	uint64_t expect_size;
	uint64_t connect_deadline_ns;
	uint64_t max_payload;
	bool can_flush, can_zero;
	bool no_zerocopy;		/* from the config */
	bool tls_negotiated;
	/* TLS settings from the config (libnbd client), copies or NULL. */
	enum nbd_tls_mode tls;
	char *tls_psk, *tls_certificates, *tls_username;
	bool tls_no_verify;

	struct replica_link_cbs cbs;
	void *cbs_arg;

	struct tdr_fd_watch watch;
	bool watching;
	uint32_t watch_events;
	struct tdr_timer timer;
	struct tdr_defer defer;

	struct tdr_list pending;	/* submission order: the head is the oldest */
	struct tdr_list done;		/* completed, owner not told yet */
	unsigned npending;

	/* The first failure; the link is abandoned at the next link_process(). */
	int fail_err;
	char fail_msg[512];
	/*
	 * The first error a command reported.  It yields to a connection error
	 * seen in the same event: when a connection dies a client may fail
	 * every command with ENOTCONN, which says less than why it died.
	 */
	int cmd_err;
	char cmd_msg[512];

	bool announce;			/* ready: tell the owner from link_process() */
	bool processing;		/* inside link_process(): defer frees */
	bool close_requested;

	struct replica_link_stats stats;
};

/* For clients. */
void link_fail(struct replica_link *l, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* The client's socket, once per link: watch it (events from ops->events()); failures go to link_fail(). */
void link_watch_fd(struct replica_link *l, int fd);
/* The handshake finished: checks the export and tells the owner. */
void link_handshake_done(struct replica_link *l, const struct link_export_info *info);
/* The server answered p: err is 0 or a positive errno.  Does not free p. */
void link_piece_done(struct link_piece *p, int err);
const char *link_op_name(enum link_op op);

#endif
