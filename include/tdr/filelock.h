/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Advisory locks on image files, so that an offline tool never rewrites a
 * file that a tapdisk-replica process is serving.
 *
 * Every image the daemon opens (aio and vhd drivers, parents included)
 * holds a shared lock; vhd-util's read-only commands do the same, and its
 * modifying commands (modify, coalesce into a parent, repair) ask for an
 * exclusive one, which is refused while anyone holds the file.  Two
 * daemons may share a read-only parent, and query/check may look at a file
 * in use, as administrators expect from blktap's vhd-util.
 *
 * The locks are open-file-description locks (F_OFD_SETLK) on one byte far
 * beyond any image's end: they go away with the descriptor, never block,
 * and do not clash with QEMU's own image locks (bytes 100-299).
 */
#ifndef TDR_FILELOCK_H
#define TDR_FILELOCK_H

enum tdr_lock_kind {
	TDR_LOCK_SHARED,
	TDR_LOCK_EXCLUSIVE,
};

/*
 * Takes the lock on fd without waiting.  Returns 0; -EBUSY when another
 * descriptor holds a lock that conflicts (in this process or another);
 * another negative errno when locking itself failed.  No lock support (a
 * file system's ENOLCK or EOPNOTSUPP, an old kernel's EINVAL) counts as
 * success: the lock is a safety net, not a requirement for serving.
 */
int tdr_file_lock(int fd, enum tdr_lock_kind kind);

/* What a reader tells the user when its shared lock is refused. */
#define TDR_LOCK_BUSY_HINT \
	"another program is changing it (vhd-util modify, coalesce or repair); try again when it has finished"

#endif
