/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * A non-blocking xenstore client on the event loop, speaking the xenstore
 * wire protocol (struct xsd_sockmsg + payload, docs/misc/xenstore.txt in
 * Xen) directly over xenstored's UNIX socket or /dev/xen/xenbus.
 *
 * Why not libxenstore: its calls are synchronous round trips (xs_read waits
 * for the reply), so a frozen xenstored would freeze our event loop and with
 * it every disk request; and once a watch is set it routes every reply
 * through a reader thread.  Here requests are queued and sent without
 * waiting, replies and watch events arrive through the loop, several
 * requests may be in flight (xenstored answers each connection's requests in
 * order, which the control protocol relies on), and a lost connection (a
 * xenstored restart) is retried with backoff and reported so that the user
 * re-registers its watches and republishes.
 */
#ifndef TDR_XS_CONN_H
#define TDR_XS_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tdr/loop.h"

struct xs_conn;

/*
 * A reply: err 0 with the payload (data[len] is a NUL the payload does not
 * count), or -errno from an XS_ERROR reply ("ENOENT" -> -ENOENT), or
 * -ECONNRESET when the connection went away before the reply came.
 */
typedef void (*xs_reply_fn)(void *arg, int err, const char *data, size_t len);

struct xs_conn_ops {
	/* The connection is up: (re)register watches, (re)publish. */
	void (*connected)(void *arg);
	/* It went down (after every pending reply got -ECONNRESET). */
	void (*disconnected)(void *arg, int err);
	void (*watch_event)(void *arg, const char *path, const char *token);
};

/*
 * path: xenstored's socket, or a device such as /dev/xen/xenbus; NULL picks
 * $XENSTORED_PATH, then /run/xenstored/socket, then /dev/xen/xenbus (the
 * order libxenstore uses).  Connecting starts at once and is retried until
 * it works.  Returns NULL with errno set on allocation failure.
 */
struct xs_conn *xs_conn_new(struct tdr_loop *loop, const char *path,
			    const struct xs_conn_ops *ops, void *arg);
void xs_conn_free(struct xs_conn *c);
bool xs_conn_connected(const struct xs_conn *c);
const char *xs_conn_path(const struct xs_conn *c);
/* Bytes queued and not yet taken by the kernel. */
size_t xs_conn_queued(const struct xs_conn *c);

/*
 * Sends one request whose payload is the concatenation of parts (each part
 * is sent as given: include the NULs the message type wants).  fn (may be
 * NULL) gets the reply.  0, -ENOTCONN when not connected, -EMSGSIZE when
 * the payload is over XENSTORE_PAYLOAD_MAX, -ENOBUFS when too much is
 * queued, -ENOMEM.
 */
int xs_conn_send(struct xs_conn *c, uint32_t type, const void *const *parts,
		 const size_t *lens, unsigned nparts, xs_reply_fn fn, void *arg);

int xs_conn_read(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg);
int xs_conn_write(struct xs_conn *c, const char *path, const char *val, xs_reply_fn fn,
		  void *arg);
int xs_conn_mkdir(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg);
int xs_conn_rm(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg);
int xs_conn_directory(struct xs_conn *c, const char *path, xs_reply_fn fn, void *arg);
/*
 * XS_DIRECTORY_PART (Xen 4.9 and later), for a listing longer than one
 * reply: the names from byte offset of the list on; the reply is
 * "<generation>\0" then names, an empty name after the last one.
 */
int xs_conn_directory_part(struct xs_conn *c, const char *path, size_t offset, xs_reply_fn fn,
			   void *arg);
/* perms: e.g. "n0" (owner dom0, nobody else may read or write). */
int xs_conn_set_perms(struct xs_conn *c, const char *path, const char *perms, xs_reply_fn fn,
		      void *arg);
int xs_conn_watch(struct xs_conn *c, const char *path, const char *token, xs_reply_fn fn,
		  void *arg);

/* Drops the connection as if xenstored had closed it (tests, protocol errors). */
void xs_conn_reset(struct xs_conn *c, int err);

/* "ENOENT" -> -ENOENT; unknown names -> -EIO. */
int xs_errno_from_name(const char *name);

#endif
