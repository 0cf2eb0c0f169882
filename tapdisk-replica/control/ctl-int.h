/* SPDX-License-Identifier: BSD-3-Clause */
/* Inside the control server: shared by ctl-server.c, ctl-stats.c, ctl-replica.c. */
#ifndef TDR_CTL_INT_H
#define TDR_CTL_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "tdr/ctl-message.h"
#include "tdr/ctl-server.h"
#include "tdr/image.h"
#include "tdr/list.h"
#include "tdr/loop.h"
#include "tdr/replica.h"

struct ctl_conn;

enum ctl_minor_state {
	CTL_MINOR_RUNNING = 0,
	CTL_MINOR_PAUSING,	/* holding new requests, waiting for those in flight */
	CTL_MINOR_PAUSED,
	CTL_MINOR_CLOSING,	/* holding, draining, then the close hook */
};

/* Lets a close hook finish after the minor (or the server) is gone. */
struct ctl_close_ticket {
	struct ctl_minor *m;	/* NULL once the minor was freed */
};

struct ctl_minor {
	struct tdr_list entry;		/* srv->minors, sorted by minor */
	struct ctl_server *srv;
	int minor;
	struct td_disk *disk;		/* NULL: attached, no image */
	char *params;			/* the spec LIST shows */
	bool rdonly;
	enum ctl_minor_state state;

	/* The hold filter, on top of disk while holding. */
	struct td_image hold;
	char hold_name[32];
	bool holding;
	struct tdr_list held;		/* td_request.entry */
	uint64_t nheld;

	struct tdr_timer drain_timer;
	struct tdr_list waiters;	/* ctl_conn.wait_entry: PAUSE and CLOSE requests */
	struct ctl_close_ticket *close_ticket;
	unsigned rops;			/* replica operations in progress */
};

/* A replica operation in progress; outlives its connection if need be. */
struct ctl_rop {
	struct tdr_list entry;		/* srv->rops */
	struct ctl_server *srv;		/* NULL once the server is gone */
	struct ctl_conn *conn;		/* NULL once the client is gone */
	struct ctl_minor *m;
	uint16_t cookie;
	enum replica_op op;
	bool executing;			/* inside replica_execute() */
	bool completed;
	int err;
	char msg[REPLICA_MSG_MAX];
};

struct ctl_conn {
	struct tdr_list entry;		/* srv->conns */
	struct ctl_server *srv;
	int fd;
	struct tdr_fd_watch watch;
	struct tdr_timer timer;		/* a client mid-message or not reading */
	struct tdr_defer kick;
	bool progress;			/* bytes moved since the timer was armed */

	struct tdr_ctl_msg req;		/* the request being read or served */
	size_t in_len;
	size_t skip;			/* trailer bytes still to discard */

	char *out;
	size_t out_len, out_off, out_cap;

	bool busy;			/* a request waits for something */
	bool closing;			/* close once the output is sent */
	bool dead;			/* close now */

	struct tdr_list wait_entry;	/* waiting_on->waiters */
	struct ctl_minor *waiting_on;
	struct ctl_rop *rop;
};

struct ctl_server {
	struct tdr_loop *loop;
	char *path;
	int lfd;
	struct tdr_fd_watch lwatch;
	struct tdr_timer accept_retry;
	dev_t sock_dev;
	ino_t sock_ino;
	bool shut;

	struct ctl_hooks hooks;
	struct tdr_list minors;
	struct tdr_list conns;
	unsigned nconns;
	struct tdr_list rops;
};

extern const struct td_driver ctl_hold_driver;

struct ctl_minor *ctl_minor_find(const struct ctl_server *srv, unsigned minor);
/* blktap VBD state bits for LIST and STATS. */
int ctl_minor_state_bits(const struct ctl_minor *m);

/* Appends a message (and extra bytes after it) to the output.  0 or -ENOMEM (connection dropped). */
int ctl_conn_queue(struct ctl_conn *c, const struct tdr_ctl_msg *msg, const void *extra,
		   size_t extra_len);
/* Queues a TAPDISK_MESSAGE_ERROR for the current request. */
void ctl_conn_error(struct ctl_conn *c, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Continues a connection from the loop (after an asynchronous answer). */
void ctl_conn_kick(struct ctl_conn *c);

void ctl_dispatch(struct ctl_conn *c);
void ctl_do_stats(struct ctl_conn *c);
void ctl_do_replica(struct ctl_conn *c);

/* Writes s as a JSON string (with quotes). */
void ctl_json_string(FILE *out, const char *s);

#endif
