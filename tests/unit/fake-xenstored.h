/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * An in-memory xenstored for unit tests: speaks the wire protocol on a UNIX
 * socket from the test's own event loop (READ, WRITE, MKDIR, RM, DIRECTORY,
 * GET_PERMS, SET_PERMS, WATCH, UNWATCH), so that the control protocol runs
 * unchanged against it, and can be frozen (like SIGSTOP), restarted (with or
 * without losing its contents) or taken away.  Debian's xenstored cannot run
 * without a hypervisor, hence this.
 */
#ifndef TDR_FAKE_XENSTORED_H
#define TDR_FAKE_XENSTORED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tdr/loop.h"

struct fake_xs;

struct fake_xs *fake_xs_new(struct tdr_loop *loop, const char *sock_path);
void fake_xs_free(struct fake_xs *f);

/* The toolstack's side: changes fire watches like a client's would. */
int fake_xs_write(struct fake_xs *f, const char *path, const char *val);
int fake_xs_write_len(struct fake_xs *f, const char *path, const char *val, size_t len);
int fake_xs_rm(struct fake_xs *f, const char *path);
/* The value (malloc'd, NUL-terminated) or NULL if there is no such node. */
char *fake_xs_read(struct fake_xs *f, const char *path);
/* Permissions as "n0" or "n0,r5"; malloc'd, or NULL. */
char *fake_xs_perms(struct fake_xs *f, const char *path);
/* Number of direct children of path. */
/* As another domain's toolstack would have left them: "b5", "n0,r5". */
int fake_xs_set_perms(struct fake_xs *f, const char *path, const char *perms);
size_t fake_xs_count_children(struct fake_xs *f, const char *path);

/* Frozen: reads nothing, answers nothing, accepts nothing (SIGSTOP). */
void fake_xs_freeze(struct fake_xs *f, bool frozen);
/* Closes every connection and the socket; lose: forget the contents too. */
void fake_xs_stop(struct fake_xs *f, bool lose);
/* Listens again after fake_xs_stop(). */
int fake_xs_start(struct fake_xs *f);

unsigned fake_xs_connections(const struct fake_xs *f);
uint64_t fake_xs_messages(const struct fake_xs *f);

#endif
