/* SPDX-License-Identifier: BSD-3-Clause */
/* Advisory image-file locks; see include/tdr/filelock.h. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>

#include "tdr/filelock.h"

/* 2^62: no image gets there, and QEMU locks bytes 100-299. */
#define TDR_LOCK_BYTE ((off_t)1 << 62)

int tdr_file_lock(int fd, enum tdr_lock_kind kind)
{
	struct flock fl;

	memset(&fl, 0, sizeof(fl));
	fl.l_type = kind == TDR_LOCK_EXCLUSIVE ? F_WRLCK : F_RDLCK;
	fl.l_whence = SEEK_SET;
	fl.l_start = TDR_LOCK_BYTE;
	fl.l_len = 1;
	if (fcntl(fd, F_OFD_SETLK, &fl) == 0)
		return 0;
	if (errno == EAGAIN || errno == EACCES)
		return -EBUSY;
	/* EINVAL: a kernel before 3.15, without OFD locks. */
	if (errno == ENOLCK || errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)
		return 0;
	return -errno;
}
