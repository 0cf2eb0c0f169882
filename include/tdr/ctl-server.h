/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The control server: one UNIX socket (mode 0600) per daemon, speaking the
 * blktap3 tapdisk control protocol (include/tdr/ctl-message.h) plus our
 * replica messages, on the process's event loop.
 *
 * Disks are "minors" (blktap's name; the cookie of a message).  A minor is
 * either given by the daemon (ctl_server_add_minor: the disk of `serve`) or
 * opened by an OPEN message through the daemon's open hook (`daemon`).
 *
 * What each request does:
 *   PID      PID_RSP with getpid().
 *   LIST     one LIST_RSP per minor (count N..1, minor, state, path = the
 *            spec), then LIST_RSP count 0 minor -1.  Minors go out in
 *            descending order: tap-ctl prepends each, so it shows them
 *            ascending.
 *   STATS    STATS_RSP + JSON for one minor, or a JSON array of all minors
 *            when the cookie is 0xffff.
 *   ATTACH   creates an empty minor (there is no kernel blktap device here:
 *            nothing else to do); EEXIST if it exists.
 *   DETACH   removes an empty minor; EBUSY while it has a disk.
 *   OPEN     params.path "type:/path" (a disk spec), flags RDONLY and
 *            NO_O_DIRECT; attaches the minor if needed, calls the open
 *            hook; OPEN_RSP with the size.  req_timeout is ignored.
 *   PAUSE    holds new requests of the minor and waits until nothing is in
 *            flight, then PAUSE_RSP.  Held requests wait until RESUME.
 *   RESUME   releases the held requests in order; RESUME_RSP.  A
 *            params.path naming another image is refused (close and open
 *            instead).
 *   CLOSE, FORCE_SHUTDOWN
 *            holds new requests, waits for those in flight, fails the held
 *            ones with EIO, calls the close hook; CLOSE_RSP when it is done.
 *   DISK_INFO  DISK_INFO_RSP with the size.
 *   EXIT, LIST_MINORS  refused with EINVAL, as blktap's tapdisk does.
 *   XENBLKIF_*, COMMIT, *_COMMIT_JOB  refused with EOPNOTSUPP.
 *   TDR_MESSAGE_REPLICA  see ctl-message.h: replica_parse() then
 *            replica_execute() on the minor's replica filter.  "status"
 *            answers with the status's key=value lines as REPLICA_DATA.
 *
 * Holding: while a minor is paused or closing, a small pass-through filter
 * image ("ctl-hold") sits on top of its disk and queues every request that
 * enters; it is removed again on resume.  This works for any front end
 * (NBD, tests) without their help.
 *
 * Each connection is served one message at a time, with partial reads and
 * writes.  A message that cannot be parsed gets a TAPDISK_MESSAGE_ERROR with
 * an errno value and a one-line reason; a connection that sends only part of
 * a message and stops (10 s) or hangs up mid-message gets an error and is
 * closed.  Nothing a client sends stops the server.
 */
#ifndef TDR_CTL_SERVER_H
#define TDR_CTL_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include "tdr/ctl-message.h"

struct ctl_server;
struct td_disk;
struct tdr_loop;

/* Completion of a close hook: err 0 or -errno, msg "" or why. */
typedef void (*ctl_done_fn)(void *done_arg, int err, const char *msg);

struct ctl_hooks {
	/*
	 * OPEN: open spec (td_flags: TD_OPEN_*) as minor and make it
	 * reachable (an NBD export).  0 with *disk set, or -errno with msg
	 * (msglen bytes) saying why.  NULL: OPEN is refused with EOPNOTSUPP.
	 */
	int (*open)(void *arg, int minor, const char *spec, unsigned td_flags,
		    struct td_disk **disk, char *msg, size_t msglen);
	/*
	 * CLOSE: nothing is in flight on disk and anything submitted now is
	 * held and failed by the server.  Stop the front end, close the disk,
	 * then call done (possibly before returning).  NULL: CLOSE is refused
	 * with EOPNOTSUPP.
	 */
	void (*close)(void *arg, int minor, struct td_disk *disk, ctl_done_fn done, void *done_arg);
	void *arg;
};

/*
 * Listens on path, or serves no socket when path is NULL (tests add
 * connections with ctl_server_add_connection()).  If path is an existing
 * directory, the socket is "<path>/ctl<pid>", the name tap-ctl looks for.
 * A missing parent directory is created (mode 0755).  A live socket at the
 * path is refused (-EADDRINUSE), a stale one replaced, any other file left
 * alone (-EEXIST).  NULL on failure, with tdr_set_error() and errno set.
 */
struct ctl_server *ctl_server_new(struct tdr_loop *loop, const char *path);

void ctl_server_set_hooks(struct ctl_server *srv, const struct ctl_hooks *hooks);

/* The socket's path ("" without one). */
const char *ctl_server_path(const struct ctl_server *srv);

/*
 * Makes disk reachable as minor (0..65534); params is what LIST shows
 * ("type:/path").  0, -EEXIST, -EINVAL or -ENOMEM.  The disk stays the
 * caller's; CLOSE goes through the close hook.
 */
int ctl_server_add_minor(struct ctl_server *srv, int minor, struct td_disk *disk, const char *params);

/*
 * Forgets a minor at once: held requests are released (a paused disk
 * resumes), waiting clients get an error, a replica operation in progress
 * answers without status.  Call it before closing the disk.  0 or -ENOENT.
 */
int ctl_server_remove_minor(struct ctl_server *srv, int minor);

/* Whether minor is paused (PAUSE answered, no RESUME yet). */
bool ctl_server_minor_paused(const struct ctl_server *srv, int minor);

/* Serves an already connected socket; the server owns fd, also on failure. 0 or -errno. */
int ctl_server_add_connection(struct ctl_server *srv, int fd);

/* Open connections (for tests). */
unsigned ctl_server_connections(const struct ctl_server *srv);

/*
 * For a daemon that is stopping: stops accepting connections and releases
 * every held request (paused minors resume), so that the front ends can
 * drain.  Connections stay until ctl_server_free().
 */
void ctl_server_shutdown(struct ctl_server *srv);

/*
 * Sends what is pending (best effort, without waiting), closes every
 * connection, releases held requests, removes the socket file and frees.
 * Call it before closing the disks.
 */
void ctl_server_free(struct ctl_server *srv);

/*
 * The `tapdisk-replica daemon` command (ctl-daemon.c): argv[0] is "daemon".
 * Returns the exit status.
 */
int tdr_daemon_main(int argc, char **argv, const char *prog);

#endif
