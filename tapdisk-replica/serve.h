/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The `serve` command: one disk, served over NBD in the foreground until
 * SIGTERM or SIGINT.  Kept apart from argument parsing so that the future
 * `daemon` command (many disks, managed over a control socket) can reuse
 * the same pieces.
 */
#ifndef TDR_SERVE_H
#define TDR_SERVE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tdr/nbd.h"

struct tdr_serve_opts {
	const char *spec;		/* image spec, e.g. "aio:/srv/disk.img" */
	const char *socket_path;	/* UNIX socket, or NULL */
	const char *tcp;		/* HOST:PORT, [V6ADDR]:PORT, :PORT or PORT; or NULL */
	const char *export_name;	/* NULL: "" */
	bool readonly;
	const char *pid_file;		/* or NULL */
	const char *control_path;	/* control socket (file or directory), or NULL */
	const char *xs_dir;		/* xenstore control directory, or NULL */
	const char *xs_path;		/* xenstored socket or device; NULL: the default */
	struct nbd_tls_config tls;	/* --tls, --tls-psk, --tls-certificates, --tls-verify-peer */
	uint64_t poll_max_ns;		/* --poll-max-us: the event loop's adaptive polling; 0: off */
};

/*
 * Splits a --tcp argument into host ("" for loopback) and port.  0, or
 * -EINVAL with tdr_set_error() saying what is wrong.
 */
int tdr_parse_hostport(const char *s, char *host, size_t hostlen, char *port, size_t portlen);

/*
 * Opens the disk, listens, serves until SIGTERM/SIGINT, then drains, flushes
 * and closes.  0, or -errno with tdr_last_error() set to the one line to
 * show the user (nothing else is printed on failure).
 */
int tdr_serve(const struct tdr_serve_opts *o);

#endif
