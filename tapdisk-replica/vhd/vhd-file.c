/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Synchronous VHD files: open (with the whole chain if asked), create,
 * snapshot, read through the chain, write with crash-safe allocation.  Used
 * by vhd-util and the tests; the daemon uses drivers/drv-vhd.c.
 *
 * Allocation order (the same as the driver's), so that a crash at any write
 * leaves a file that passes check and loses no acknowledged write:
 *   1. the footer is written at the new end of the file and made durable
 *      (the old one, now inside the new block's area, stays valid until
 *      then);
 *   2. the bitmap and data are written in the new block;
 *   3. fdatasync;
 *   4. the BAT sector that points at the block is written.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/filelock.h"
#include "tdr/vhd.h"

#define MAX_CHAIN 64

/* The power-cut tests' journal (vhd_sync_set_journal); NULL in production. */
static vhd_sync_journal_fn sync_journal;
static void *sync_journal_arg;

void vhd_sync_set_journal(vhd_sync_journal_fn fn, void *arg)
{
	sync_journal = fn;
	sync_journal_arg = arg;
}

static void journal(enum vhd_sync_op op, int fd, const void *buf, size_t len, uint64_t off)
{
	if (sync_journal)
		sync_journal(sync_journal_arg, op, fd, buf, len, off);
}

int vhd_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		journal(VHD_SYNC_WRITE, fd, (const char *)buf + done, (size_t)n, off + done);
		done += (size_t)n;
	}
	return 0;
}

int vhd_fdatasync(int fd)
{
	if (fdatasync(fd) < 0)
		return -1;
	journal(VHD_SYNC_DATASYNC, fd, NULL, 0, 0);
	return 0;
}

int vhd_fsync(int fd)
{
	if (fsync(fd) < 0)
		return -1;
	journal(VHD_SYNC_FSYNC, fd, NULL, 0, 0);
	return 0;
}

int vhd_ftruncate(int fd, uint64_t len)
{
	if (ftruncate(fd, (off_t)len) < 0)
		return -1;
	journal(VHD_SYNC_TRUNCATE, fd, NULL, 0, len);
	return 0;
}

int vhd_file_end_at(int fd, const uint8_t fb[VHD_FOOTER_SIZE], uint64_t end)
{
	int r = vhd_pwrite_all(fd, fb, VHD_FOOTER_SIZE, end);

	/*
	 * The footer's data before the new length: a file system may commit
	 * the truncate before an overwrite in place, and a file cut first
	 * would end with whatever the footer's sectors held before.
	 */
	if (!r && vhd_fdatasync(fd) < 0)
		r = -errno;
	if (!r && vhd_ftruncate(fd, end + VHD_FOOTER_SIZE) < 0)
		r = -errno;
	if (!r && vhd_fsync(fd) < 0)
		r = -errno;
	return r;
}

static int full_pread(int fd, void *buf, size_t len, uint64_t off)
{
	return vhd_src_fd_pread((void *)(intptr_t)fd, buf, len, off);
}

struct visited {
	dev_t dev[MAX_CHAIN];
	ino_t ino[MAX_CHAIN];
	int n;
};

/* Records a file of the chain; -ELOOP if it is there already or the chain is too deep. */
static int visit(struct visited *seen, const struct stat *st, const char *path,
		 struct vhd_error *err)
{
	if (!seen)
		return 0;
	for (int i = 0; i < seen->n; i++)
		if (seen->dev[i] == st->st_dev && seen->ino[i] == st->st_ino)
			return vhd_fail(err, VHD_ERR_PARENT_LOOP,
					"%s: the parent chain loops back to this file", path);
	if (seen->n == MAX_CHAIN)
		return vhd_fail(err, VHD_ERR_PARENT_LOOP, "%s: the parent chain is deeper than %d",
				path, MAX_CHAIN);
	seen->dev[seen->n] = st->st_dev;
	seen->ino[seen->n] = st->st_ino;
	seen->n++;
	return 0;
}

/* Whether the 512 bytes at off are a VHD footer with a good checksum. */
static bool valid_footer_at(int fd, uint64_t off)
{
	uint8_t b[VHD_FOOTER_SIZE];
	struct vhd_footer f;

	if (full_pread(fd, b, sizeof(b), off) < 0)
		return false;
	vhd_footer_decode(&f, b);
	return memcmp(f.cookie, VHD_COOKIE, 8) == 0 && f.checksum == vhd_footer_checksum(&f);
}

/* vhd_raw_probe for a caller that has fstat'ed fd already (st). */
static int raw_probe_stat(int fd, const struct stat *st, const char *path, uint64_t *size,
			  struct vhd_error *err)
{
	if (S_ISBLK(st->st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, size) < 0)
			return vhd_fail(err, VHD_ERR_IO, "%s: cannot read the block device's size: %s",
					path, strerror(errno));
	} else if (S_ISREG(st->st_mode)) {
		*size = (uint64_t)st->st_size;
	} else {
		return vhd_fail(err, VHD_ERR_IO,
				"%s: not a regular file or block device; a raw image must be one", path);
	}
	if (*size == 0 || *size % VHD_SECTOR_SIZE)
		return vhd_fail(err, VHD_ERR_PARENT_SIZE,
				"%s: raw image of %llu bytes; it must be a non-zero whole number of 512-byte sectors",
				path, (unsigned long long)*size);
	if (*size > VHD_MAX_DISK_SIZE)
		return vhd_fail(err, VHD_ERR_PARENT_SIZE,
				"%s: raw image of %llu bytes, over the %llu bytes a VHD can describe",
				path, (unsigned long long)*size, (unsigned long long)VHD_MAX_DISK_SIZE);
	/*
	 * Nothing else tells a raw parent from a VHD put where it was, or a
	 * VHD given to snapshot -m by mistake: reading a VHD's metadata as
	 * disk data would go unnoticed (a sparse VHD is small enough for any
	 * child), so a valid footer at either end refuses it.
	 */
	if (valid_footer_at(fd, *size - VHD_FOOTER_SIZE) || valid_footer_at(fd, 0))
		return vhd_fail(err, VHD_ERR_PARENT_UUID,
				"%s: a VHD (it holds a valid VHD footer), not a raw image; a child made with snapshot -m (a nil parent UUID) must sit over a raw image, and a child of a VHD is made without -m",
				path);
	return 0;
}

int vhd_raw_probe(int fd, const char *path, uint64_t *size, struct vhd_error *err)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
	return raw_probe_stat(fd, &st, path, size, err);
}

/* A new vhd_file with path opened (read-only or read-write); nothing loaded yet. */
static int file_open_fd(struct vhd_file **out, const char *path, bool rdonly,
			struct vhd_error *err)
{
	struct vhd_file *vf = calloc(1, sizeof(*vf));
	int r;

	*out = NULL;
	if (!vf)
		return vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", path);
	vf->fd = -1;
	vf->rdonly = rdonly;
	vf->path = strdup(path);
	if (!vf->path) {
		r = vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", path);
		goto fail;
	}
	vf->fd = open(path, (rdonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (vf->fd < 0) {
		int e = errno;

		vhd_fail(err, e == ENOENT ? VHD_ERR_PARENT_MISSING : VHD_ERR_IO,
			 "%s: cannot open: %s", path, strerror(e));
		/* the open's errno, not the defect's: EACCES stays EACCES */
		r = -e;
		goto fail;
	}
	*out = vf;
	return 0;

fail:
	vhd_file_close(vf);
	return r;
}

static int open_raw_internal(struct vhd_file **out, const char *path, unsigned flags,
			     struct vhd_error *err, struct visited *seen)
{
	struct vhd_file *vf;
	struct stat st;
	uint64_t size;
	int r;

	*out = NULL;
	r = file_open_fd(&vf, path, (flags & VHD_FILE_RDONLY) != 0, err);
	if (r < 0)
		return r;
	vf->raw = true;
	if (fstat(vf->fd, &st) < 0) {
		r = vhd_fail(err, VHD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
		goto fail;
	}
	r = visit(seen, &st, path, err);
	if (r < 0)
		goto fail;
	r = raw_probe_stat(vf->fd, &st, path, &size, err);
	if (r < 0)
		goto fail;
	r = (flags & VHD_FILE_NO_LOCK) ? 0 : vhd_lock_fd(vf->fd, !vf->rdonly, path, err);
	if (r < 0)
		goto fail;
	vf->m.footer.type = VHD_TYPE_NONE;
	vf->m.footer.current_size = size;
	vf->m.file_size = size;
	*out = vf;
	return 0;

fail:
	vhd_file_close(vf);
	return r;
}

int vhd_file_open_raw(struct vhd_file **out, const char *path, unsigned flags,
		      struct vhd_error *err)
{
	vhd_error_clear(err);
	return open_raw_internal(out, path, flags, err, NULL);
}

/*
 * Readers share the file with tapdisk-replica processes serving it (which
 * hold shared locks too); a writer must have it alone.
 */
int vhd_lock_fd(int fd, bool writer, const char *path, struct vhd_error *err)
{
	int r = tdr_file_lock(fd, writer ? TDR_LOCK_EXCLUSIVE : TDR_LOCK_SHARED);

	if (r == -EBUSY && !writer)
		return vhd_fail(err, VHD_ERR_BUSY, "%s: " TDR_LOCK_BUSY_HINT, path);
	if (r == -EBUSY)
		return vhd_fail(err, VHD_ERR_BUSY,
				"%s: in use: a tapdisk-replica serves it or a disk stacked on it (or another program has it open); close that disk first ('tdr-ctl list' shows each daemon's disks), then try again",
				path);
	if (r < 0)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot lock: %s", path, strerror(-r));
	return 0;
}

int vhd_file_check_parent(const struct vhd_file *child, const struct vhd_file *parent,
			  int64_t parent_mtime, unsigned flags, struct vhd_error *err)
{
	if (parent->raw)
		return vhd_check_raw_parent(&child->m, child->path, parent->m.footer.current_size,
					    parent->path, parent_mtime, flags, err);
	return vhd_check_parent(&child->m, child->path, &parent->m, parent->path, parent_mtime,
				flags, err);
}

static int open_internal(struct vhd_file **out, const char *path, unsigned flags,
			 struct vhd_error *err, struct visited *seen)
{
	struct vhd_file *vf;
	struct vhd_src src;
	struct stat st;
	int r;

	*out = NULL;
	r = file_open_fd(&vf, path,
			 (flags & (VHD_FILE_RDONLY | VHD_FILE_USE_BACKUP | VHD_FILE_IGNORE_BACKUP |
				   VHD_FILE_IGNORE_PARENT_UUID)) != 0, err);
	if (r < 0)
		return r;
	if (fstat(vf->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		/*
		 * A block device's size is not st_size, and a VHD in one
		 * ends where its data ends, not at the device's end: not
		 * supported, so say so rather than call it truncated.
		 */
		r = vhd_fail(err, VHD_ERR_IO, "%s: not a regular file%s; VHDs are files here", path,
			     S_ISBLK(st.st_mode) ? " (block devices are not supported)" : "");
		goto fail;
	}
	r = visit(seen, &st, path, err);
	if (r < 0)
		goto fail;
	/* After the loop check: a chain that comes back to a locked file is a loop. */
	r = (flags & VHD_FILE_NO_LOCK) ? 0 : vhd_lock_fd(vf->fd, !vf->rdonly, path, err);
	if (r < 0)
		goto fail;
	src.pread = vhd_src_fd_pread;
	src.ctx = (void *)(intptr_t)vf->fd;
	src.size = (uint64_t)st.st_size;
	src.name = path;
	r = vhd_meta_load(&vf->m, &src,
			  ((flags & VHD_FILE_USE_BACKUP) ? VHD_LOAD_USE_BACKUP : 0) |
			  ((flags & VHD_FILE_IGNORE_BACKUP) ? VHD_LOAD_IGNORE_BACKUP : 0), err);
	if (r < 0)
		goto fail;
	if (vhd_meta_dynamic(&vf->m)) {
		uint64_t from = vf->m.data_end;

		if (vf->m.footer_off > from)
			from = vf->m.footer_off;
		vf->next_free = vhd_block_place(from, vf->m.bm_secs);
	}

	if ((flags & VHD_FILE_CHAIN) && vf->m.footer.type == VHD_TYPE_DIFF) {
		char ppath[PATH_MAX];
		struct vhd_error perr;
		struct stat pst;

		r = vhd_resolve_parent(&vf->m, path, ppath, sizeof(ppath), err);
		if (r < 0)
			goto fail;
		if (vhd_meta_parent_raw(&vf->m))
			r = open_raw_internal(&vf->parent, ppath, VHD_FILE_RDONLY, err, seen);
		else
			r = open_internal(&vf->parent, ppath,
					  (flags | VHD_FILE_RDONLY) & ~(VHD_FILE_USE_BACKUP | VHD_FILE_IGNORE_BACKUP | VHD_FILE_NO_LOCK),
					  err, seen);
		if (r < 0) {
			if (err && err->code != VHD_ERR_PARENT_LOOP && err->code != VHD_ERR_PARENT_MISSING &&
			    err->code != VHD_ERR_PARENT_UUID && err->code != VHD_ERR_PARENT_INVALID &&
			    err->code != VHD_ERR_PARENT_SIZE && err->code != VHD_ERR_PARENT_TIMESTAMP &&
			    err->code != VHD_ERR_BUSY) {
				char inner[sizeof(err->msg)];

				snprintf(inner, sizeof(inner), "%s", err->msg);
				vhd_fail(err, VHD_ERR_PARENT_INVALID, "%s: its parent is invalid: %s",
					 path, inner);
			}
			goto fail;
		}
		if (stat(ppath, &pst) < 0)
			pst.st_mtime = 0;
		r = vhd_file_check_parent(vf, vf->parent, (int64_t)pst.st_mtime,
					  ((flags & VHD_FILE_STRICT_TIME) ? VHD_PARENT_STRICT_TIME : 0) |
					  ((flags & VHD_FILE_IGNORE_PARENT_UUID) ? VHD_PARENT_IGNORE_UUID : 0),
					  &perr);
		if (r < 0) {
			if (err)
				*err = perr;
			goto fail;
		}
		/* Pass a warning up unless a deeper one is there; a UUID
		 * mismatch (-I) outranks a timestamp warning. */
		if (err && perr.code != VHD_OK &&
		    (err->code == VHD_OK ||
		     (perr.code == VHD_ERR_PARENT_UUID && err->code == VHD_ERR_PARENT_TIMESTAMP)))
			*err = perr;
	}
	*out = vf;
	return 0;

fail:
	vhd_file_close(vf);
	return r;
}

int vhd_file_open(struct vhd_file **out, const char *path, unsigned flags,
		  struct vhd_error *err)
{
	struct visited seen = { .n = 0 };

	vhd_error_clear(err);
	return open_internal(out, path, flags, err, &seen);
}

void vhd_file_close(struct vhd_file *vf)
{
	while (vf) {
		struct vhd_file *p = vf->parent;

		if (vf->fd >= 0)
			close(vf->fd);
		vhd_meta_free(&vf->m);
		free(vf->path);
		free(vf);
		vf = p;
	}
}

uint64_t vhd_file_phys_size(const struct vhd_file *vf)
{
	return vf->m.file_size;
}

int vhd_file_check(const char *path, unsigned flags, struct vhd_error *err)
{
	struct vhd_file *vf;
	int r;

	r = vhd_file_open(&vf, path, flags | VHD_FILE_RDONLY, err);
	if (r == 0)
		vhd_file_close(vf);
	return r;
}

/* ------------------------------------------------------------------ */
/* Creation */

static int write_footer_at(int fd, const struct vhd_footer *f, uint64_t off)
{
	uint8_t b[VHD_FOOTER_SIZE];

	vhd_footer_encode(f, b);
	return vhd_pwrite_all(fd, b, sizeof(b), off);
}

static int create_fd(const char *path, struct vhd_error *err)
{
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);

	if (fd < 0)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot create: %s%s", path, strerror(errno),
				errno == EEXIST ? "; remove it first or pick another name" : "");
	return fd;
}

/*
 * Writes a dynamic or differencing file: footer copy, header, empty BAT,
 * locator data (loc_data[i] for header->loc[i]), footer.
 */
static int write_dynamic(const char *path, struct vhd_footer *f, struct vhd_header *h,
			 uint8_t *const *loc_data, struct vhd_error *err)
{
	uint64_t bat_bytes = ((uint64_t)h->max_bat_entries * 4 + 511) & ~511ull;
	uint64_t end = h->table_offset + bat_bytes;
	uint8_t hb[VHD_HEADER_SIZE], *bat = NULL;
	int fd, r, i;

	for (i = 0; i < VHD_MAX_LOCATORS; i++)
		if (h->loc[i].code != VHD_PLAT_NONE && h->loc[i].data_offset + h->loc[i].data_space > end)
			end = h->loc[i].data_offset + h->loc[i].data_space;
	vhd_footer_seal(f);
	vhd_header_seal(h);
	fd = create_fd(path, err);
	if (fd < 0)
		return fd;
	bat = malloc(bat_bytes);
	if (!bat) {
		r = vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", path);
		goto out;
	}
	memset(bat, 0xFF, bat_bytes);
	vhd_header_encode(h, hb);
	if ((r = write_footer_at(fd, f, 0)) < 0 ||
	    (r = vhd_pwrite_all(fd, hb, sizeof(hb), f->data_offset)) < 0 ||
	    (r = vhd_pwrite_all(fd, bat, bat_bytes, h->table_offset)) < 0)
		goto io;
	for (i = 0; i < VHD_MAX_LOCATORS; i++) {
		if (h->loc[i].code == VHD_PLAT_NONE)
			continue;
		r = vhd_pwrite_all(fd, loc_data[i], h->loc[i].data_space, h->loc[i].data_offset);
		if (r < 0)
			goto io;
	}
	if ((r = write_footer_at(fd, f, end)) < 0)
		goto io;
	if (vhd_fsync(fd) < 0) {
		r = -errno;
		goto io;
	}
	r = 0;
	goto out;
io:
	vhd_fail(err, VHD_ERR_IO, "%s: cannot write: %s", path, strerror(-r));
	unlink(path);
out:
	free(bat);
	close(fd);
	return r;
}

int vhd_file_create(const char *path, uint64_t size, uint32_t type, uint32_t block_size,
		    struct vhd_error *err)
{
	return vhd_file_create_max(path, size, 0, type, block_size, err);
}

/*
 * A dynamic header whose BAT holds max_size bytes (create -S, snapshot
 * -S); refused past what 32-bit BAT entries can address.
 */
static int header_for_max(struct vhd_header *h, const char *path, uint64_t max_size,
			  uint32_t block_size, struct vhd_error *err)
{
	if (max_size > VHD_MAX_DISK_SIZE)
		return vhd_fail(err, VHD_ERR_FOOTER_SIZE,
				"%s: %llu bytes is more than a VHD can hold (2040 GiB)", path,
				(unsigned long long)max_size);
	vhd_header_init(h, VHD_FOOTER_SIZE + VHD_HEADER_SIZE,
			(uint32_t)((max_size + block_size - 1) / block_size), block_size);
	return 0;
}

int vhd_file_create_max(const char *path, uint64_t size, uint64_t max_size, uint32_t type,
			uint32_t block_size, struct vhd_error *err)
{
	struct vhd_footer f;
	struct vhd_header h;
	uint8_t *none[VHD_MAX_LOCATORS] = { NULL };
	int fd, r;

	if (!block_size)
		block_size = VHD_BLOCK_SIZE_DEFAULT;
	if (size == 0 || size % VHD_SECTOR_SIZE)
		return vhd_fail(err, VHD_ERR_FOOTER_SIZE,
				"%s: size %llu is not a positive multiple of 512 bytes", path,
				(unsigned long long)size);
	if (max_size < size)
		max_size = size;
	if (type == VHD_TYPE_FIXED && max_size > size)
		return vhd_fail(err, VHD_ERR_FOOTER_TYPE,
				"%s: a fixed disk has no BAT to make room in; give no maximum size",
				path);
	if (type == VHD_TYPE_FIXED) {
		vhd_footer_init(&f, VHD_TYPE_FIXED, size);
		fd = create_fd(path, err);
		if (fd < 0)
			return fd;
		r = vhd_ftruncate(fd, size) < 0 ? -errno : 0;
		if (!r)
			r = write_footer_at(fd, &f, size);
		if (!r && vhd_fsync(fd) < 0)
			r = -errno;
		close(fd);
		if (r < 0) {
			unlink(path);
			return vhd_fail(err, VHD_ERR_IO, "%s: cannot write: %s", path, strerror(-r));
		}
		return 0;
	}
	if (type != VHD_TYPE_DYNAMIC)
		return vhd_fail(err, VHD_ERR_FOOTER_TYPE, "%s: cannot create a disk of type %u",
				path, type);
	if (block_size < VHD_BLOCK_SIZE_MIN || block_size > VHD_BLOCK_SIZE_MAX ||
	    (block_size & (block_size - 1)))
		return vhd_fail(err, VHD_ERR_BLOCK_SIZE,
				"%s: bad block size %u (must be a power of two from %u bytes to %u MiB; 2 MiB if not given)",
				path, block_size, VHD_BLOCK_SIZE_MIN, VHD_BLOCK_SIZE_MAX >> 20);
	r = header_for_max(&h, path, max_size, block_size, err);
	if (r < 0)
		return r;
	vhd_footer_init(&f, VHD_TYPE_DYNAMIC, size);
	return write_dynamic(path, &f, &h, none, err);
}

/* Relative path from directory from_dir to file to (both absolute). */
static int relative_path(const char *from_dir, const char *to, char *out, size_t len)
{
	size_t common = 0, i, n = 0;
	int ups = 0;

	for (i = 0; from_dir[i] && to[i] && from_dir[i] == to[i]; i++)
		if (from_dir[i] == '/')
			common = i + 1;
	if (!from_dir[i] && to[i] == '/')
		common = i + 1;
	/* Directories left in from_dir after the common prefix. */
	if (common < strlen(from_dir) && from_dir[common]) {
		ups = 1;
		for (i = common; from_dir[i]; i++)
			if (from_dir[i] == '/' && from_dir[i + 1])
				ups++;
	}
	if (ups == 0)
		n = (size_t)snprintf(out, len, "./");
	while (ups-- > 0 && n < len)
		n += (size_t)snprintf(out + n, len - n, "../");
	if (n < len)
		n += (size_t)snprintf(out + n, len - n, "%s", to + common);
	return n < len ? 0 : -ENAMETOOLONG;
}

static int snapshot(const char *path, const char *parent, uint64_t max_size, bool raw,
		    struct vhd_error *err)
{
	struct vhd_file *pf = NULL;
	struct vhd_footer f;
	struct vhd_header h;
	uint8_t *loc_data[VHD_MAX_LOCATORS] = { NULL };
	char pabs[PATH_MAX], cdir[PATH_MAX], rel[PATH_MAX], tmp[PATH_MAX + 8], *slash;
	uint32_t block_size;
	uint64_t off;
	struct stat st;
	const char *base;
	bool blockdev;
	int r, i;

	if (raw)
		r = vhd_file_open_raw(&pf, parent, VHD_FILE_RDONLY, err);
	else
		r = vhd_file_open(&pf, parent, VHD_FILE_RDONLY, err);
	if (r < 0)
		return r;
	if (!realpath(parent, pabs) || stat(pabs, &st) < 0) {
		r = vhd_fail(err, VHD_ERR_IO, "%s: cannot resolve: %s", parent, strerror(errno));
		goto out;
	}
	/*
	 * A block device is named by the path given, absolute but with its
	 * symbolic links kept: /dev/vg0/lv stays that volume across reboots,
	 * the /dev/dm-N it points to need not, and a raw parent has no UUID
	 * to catch the wrong one.  For the same reason no relative locator,
	 * and the whole path as parent name: nothing is looked for beside the
	 * child.
	 */
	blockdev = raw && S_ISBLK(st.st_mode);
	if (blockdev) {
		char cwd[PATH_MAX];
		int n;

		if (parent[0] == '/')
			n = snprintf(pabs, sizeof(pabs), "%s", parent);
		else if (getcwd(cwd, sizeof(cwd)))
			n = snprintf(pabs, sizeof(pabs), "%s/%s", cwd, parent);
		else
			n = -1;
		if (n < 0 || (size_t)n >= sizeof(pabs)) {
			r = vhd_fail(err, VHD_ERR_LOCATOR, "%s: parent path %s too long", path, parent);
			goto out;
		}
	}
	/* The child's directory, absolute. */
	snprintf(tmp, sizeof(tmp), "%s", path);
	slash = strrchr(tmp, '/');
	if (slash)
		*(slash == tmp ? slash + 1 : slash) = '\0';
	else
		strcpy(tmp, ".");
	if (!realpath(tmp, cdir)) {
		r = vhd_fail(err, VHD_ERR_IO, "%s: cannot resolve its directory: %s", path,
			     strerror(errno));
		goto out;
	}
	if (relative_path(cdir, pabs, rel, sizeof(rel)) < 0) {
		r = vhd_fail(err, VHD_ERR_LOCATOR, "%s: parent path too long", path);
		goto out;
	}

	block_size = vhd_meta_dynamic(&pf->m) ? pf->m.header.block_size : VHD_BLOCK_SIZE_DEFAULT;
	vhd_footer_init(&f, VHD_TYPE_DIFF, pf->m.footer.current_size);
	if (max_size < f.current_size)
		max_size = f.current_size;
	r = header_for_max(&h, path, max_size, block_size, err);
	if (r < 0)
		goto out;
	/* A raw parent has none: its nil UUID is what marks it raw. */
	if (!raw)
		memcpy(h.parent_uuid, pf->m.footer.uuid, 16);
	h.parent_timestamp = vhd_time_from_unix((int64_t)st.st_mtime);
	base = strrchr(pabs, '/') && !blockdev ? strrchr(pabs, '/') + 1 : pabs;
	if (vhd_utf16_encode(base, h.parent_name, sizeof(h.parent_name), true) < 0) {
		/* Fails for bad UTF-8 too: a name that fits when unbounded is not UTF-8. */
		uint8_t wide[4 * NAME_MAX + 4];
		bool utf8 = vhd_utf16_encode(base, wide, sizeof(wide), true) >= 0;

		r = vhd_fail(err, VHD_ERR_NO_PARENT,
			     utf8 ? "%s: parent name %s is too long for the header (255 UTF-16 units)"
				  : "%s: parent name %s is not UTF-8, which a VHD's UTF-16 name needs; rename the parent",
			     path, base);
		goto out;
	}

	/* Locators after the BAT: MacX and W2ku absolute, W2ru relative (not for a device). */
	off = h.table_offset + (((uint64_t)h.max_bat_entries * 4 + 511) & ~511ull);
	for (i = 0; i < (blockdev ? 2 : 3); i++) {
		static const uint32_t codes[3] = { VHD_PLAT_MACX, VHD_PLAT_W2KU, VHD_PLAT_W2RU };
		uint8_t enc[2 * PATH_MAX + 16];
		ssize_t len;
		uint32_t space;

		if (codes[i] == VHD_PLAT_MACX) {
			snprintf(tmp, sizeof(tmp), "file://%s", pabs);
			len = (ssize_t)strlen(tmp);
			memcpy(enc, tmp, (size_t)len);
		} else {
			char *s;

			snprintf(tmp, sizeof(tmp), "%s", codes[i] == VHD_PLAT_W2KU ? pabs : rel);
			for (s = tmp; *s; s++)
				if (*s == '/')
					*s = '\\';
			len = vhd_utf16_encode(tmp, enc, sizeof(enc), false);
		}
		if (len <= 0 || (size_t)len > VHD_LOCATOR_MAX) {
			r = vhd_fail(err, VHD_ERR_LOCATOR, "%s: cannot encode the parent path %s",
				     path, pabs);
			goto out;
		}
		/* Like Windows and blktap: the space in bytes, whole sectors. */
		space = (uint32_t)(((size_t)len + 511) & ~(size_t)511);
		loc_data[i] = calloc(1, space);
		if (!loc_data[i]) {
			r = vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", path);
			goto out;
		}
		memcpy(loc_data[i], enc, (size_t)len);
		h.loc[i].code = codes[i];
		h.loc[i].data_space = space;
		h.loc[i].data_len = (uint32_t)len;
		h.loc[i].data_offset = off;
		off += space;
	}
	r = write_dynamic(path, &f, &h, loc_data, err);
out:
	for (i = 0; i < VHD_MAX_LOCATORS; i++)
		free(loc_data[i]);
	vhd_file_close(pf);
	return r;
}

int vhd_file_snapshot(const char *path, const char *parent, struct vhd_error *err)
{
	return vhd_file_snapshot_max(path, parent, 0, err);
}

int vhd_file_snapshot_max(const char *path, const char *parent, uint64_t max_size,
			  struct vhd_error *err)
{
	return snapshot(path, parent, max_size, false, err);
}

int vhd_file_snapshot_raw(const char *path, const char *parent, uint64_t max_size,
			  struct vhd_error *err)
{
	return snapshot(path, parent, max_size, true, err);
}

/* ------------------------------------------------------------------ */
/* I/O */

int vhd_file_read_bitmap(struct vhd_file *vf, uint32_t b, uint8_t *map)
{
	if (!vhd_meta_dynamic(&vf->m) || b >= vf->m.bat_entries)
		return -EINVAL;
	if (vf->m.bat[b] == VHD_BAT_UNUSED)
		return -ENOENT;
	return full_pread(vf->fd, map, (size_t)vf->m.bm_secs * VHD_SECTOR_SIZE,
			  vhd_meta_block_off(&vf->m, b));
}

int vhd_file_sector_present(struct vhd_file *vf, uint64_t sec, bool *present)
{
	uint8_t map[VHD_SECTOR_SIZE * 8];
	uint32_t b;
	int r;

	*present = false;
	if (sec >= vf->m.footer.current_size >> VHD_SECTOR_SHIFT)
		return -ERANGE;
	if (!vhd_meta_dynamic(&vf->m)) {
		*present = true;
		return 0;
	}
	b = (uint32_t)(sec / vf->m.spb);
	if (vf->m.bat[b] == VHD_BAT_UNUSED)
		return 0;
	if (vf->m.bm_secs > 8) {
		uint8_t *big = malloc((size_t)vf->m.bm_secs * VHD_SECTOR_SIZE);

		if (!big)
			return -ENOMEM;
		r = vhd_file_read_bitmap(vf, b, big);
		if (!r)
			*present = vhd_bitmap_test(big, (uint32_t)(sec % vf->m.spb));
		free(big);
		return r;
	}
	r = vhd_file_read_bitmap(vf, b, map);
	if (!r)
		*present = vhd_bitmap_test(map, (uint32_t)(sec % vf->m.spb));
	return r;
}

/* Reads from the parent, or zeroes past its end or without one. */
static int read_below(struct vhd_file *vf, uint64_t sec, uint32_t secs, char *buf)
{
	struct vhd_file *p = vf->parent;
	uint64_t psecs;
	uint32_t n;

	if (!p || vf->m.footer.type != VHD_TYPE_DIFF) {
		memset(buf, 0, (size_t)secs << VHD_SECTOR_SHIFT);
		return 0;
	}
	psecs = p->m.footer.current_size >> VHD_SECTOR_SHIFT;
	n = sec >= psecs ? 0 : (uint32_t)(psecs - sec < secs ? psecs - sec : secs);
	memset(buf + ((size_t)n << VHD_SECTOR_SHIFT), 0, (size_t)(secs - n) << VHD_SECTOR_SHIFT);
	return n ? vhd_file_read(p, sec, n, buf) : 0;
}

int vhd_file_read(struct vhd_file *vf, uint64_t sec, uint32_t secs, void *vbuf)
{
	uint64_t total = vf->m.footer.current_size >> VHD_SECTOR_SHIFT;
	char *buf = vbuf;
	uint8_t *map = NULL;
	int r = 0;

	if (sec > total || secs > total - sec)
		return -ERANGE;
	if (!vhd_meta_dynamic(&vf->m))
		return full_pread(vf->fd, buf, (size_t)secs << VHD_SECTOR_SHIFT,
				  sec << VHD_SECTOR_SHIFT);
	map = malloc((size_t)vf->m.bm_secs * VHD_SECTOR_SIZE);
	if (!map)
		return -ENOMEM;
	while (secs) {
		uint32_t b = (uint32_t)(sec / vf->m.spb), in = (uint32_t)(sec % vf->m.spb);
		uint32_t n = vf->m.spb - in < secs ? vf->m.spb - in : secs;

		if (vf->m.bat[b] == VHD_BAT_UNUSED) {
			r = read_below(vf, sec, n, buf);
		} else {
			uint64_t data = vhd_meta_block_off(&vf->m, b) +
					((uint64_t)vf->m.bm_secs << VHD_SECTOR_SHIFT);
			uint32_t i = 0;

			r = vhd_file_read_bitmap(vf, b, map);
			while (!r && i < n) {
				bool set;
				uint32_t run = vhd_bitmap_run(map, in + i, n - i, &set);
				char *dst = buf + ((size_t)i << VHD_SECTOR_SHIFT);

				if (set)
					r = full_pread(vf->fd, dst, (size_t)run << VHD_SECTOR_SHIFT,
						       data + ((uint64_t)(in + i) << VHD_SECTOR_SHIFT));
				else
					r = read_below(vf, sec + i, run, dst);
				i += run;
			}
		}
		if (r)
			break;
		sec += n;
		secs -= n;
		buf += (size_t)n << VHD_SECTOR_SHIFT;
	}
	free(map);
	return r;
}

static int write_bat_entry(struct vhd_file *vf, uint32_t b)
{
	uint8_t sector[VHD_SECTOR_SIZE];
	uint32_t idx = b / (VHD_SECTOR_SIZE / 4);

	vhd_bat_sector(vf->m.bat, vf->m.bat_entries, idx, sector);
	return vhd_pwrite_all(vf->fd, sector, sizeof(sector),
			      vf->m.header.table_offset + (uint64_t)idx * VHD_SECTOR_SIZE);
}

static int allocate_block(struct vhd_file *vf, uint32_t b, uint32_t in, uint32_t n,
			  const char *buf)
{
	size_t bm_bytes = (size_t)vf->m.bm_secs * VHD_SECTOR_SIZE;
	uint64_t start = vf->next_free;
	uint64_t end = start + bm_bytes + vf->m.header.block_size;
	uint8_t *map;
	int r;

	if ((start >> VHD_SECTOR_SHIFT) >= VHD_BAT_UNUSED)
		return -EFBIG;
	map = calloc(1, bm_bytes);
	if (!map)
		return -ENOMEM;
	vhd_bitmap_set_range(map, in, n);
	if (end > vf->m.footer_off) {
		r = write_footer_at(vf->fd, &vf->m.footer, end);
		/* durable before the block overwrites the old footer */
		if (!r && vhd_fdatasync(vf->fd) < 0)
			r = -errno;
		if (r)
			goto out;
		vf->m.footer_off = end;
		vf->m.file_size = end + VHD_FOOTER_SIZE;
	}
	r = vhd_pwrite_all(vf->fd, buf, (size_t)n << VHD_SECTOR_SHIFT,
			   start + bm_bytes + ((uint64_t)in << VHD_SECTOR_SHIFT));
	if (!r)
		r = vhd_pwrite_all(vf->fd, map, bm_bytes, start);
	if (!r && vhd_fdatasync(vf->fd) < 0)
		r = -errno;
	if (r)
		goto out;
	vf->m.bat[b] = (uint32_t)(start >> VHD_SECTOR_SHIFT);
	r = write_bat_entry(vf, b);
	if (r) {
		vf->m.bat[b] = VHD_BAT_UNUSED;
		goto out;
	}
	vf->m.allocated++;
	if (end > vf->m.data_end)
		vf->m.data_end = end;
	vf->next_free = vhd_block_place(end, vf->m.bm_secs);
out:
	free(map);
	return r;
}

int vhd_file_write(struct vhd_file *vf, uint64_t sec, uint32_t secs, const void *vbuf)
{
	uint64_t total = vf->m.footer.current_size >> VHD_SECTOR_SHIFT;
	const char *buf = vbuf;
	uint8_t *map = NULL;
	int r = 0;

	if (vf->rdonly)
		return -EROFS;
	if (sec > total || secs > total - sec)
		return -ERANGE;
	if (!vhd_meta_dynamic(&vf->m))
		return vhd_pwrite_all(vf->fd, buf, (size_t)secs << VHD_SECTOR_SHIFT,
				      sec << VHD_SECTOR_SHIFT);
	map = malloc((size_t)vf->m.bm_secs * VHD_SECTOR_SIZE);
	if (!map)
		return -ENOMEM;
	while (secs) {
		uint32_t b = (uint32_t)(sec / vf->m.spb), in = (uint32_t)(sec % vf->m.spb);
		uint32_t n = vf->m.spb - in < secs ? vf->m.spb - in : secs;

		if (vf->m.bat[b] == VHD_BAT_UNUSED) {
			r = allocate_block(vf, b, in, n, buf);
		} else {
			uint64_t blk = vhd_meta_block_off(&vf->m, b);
			bool set;

			r = vhd_pwrite_all(vf->fd, buf, (size_t)n << VHD_SECTOR_SHIFT,
					   blk + ((uint64_t)(vf->m.bm_secs + in) << VHD_SECTOR_SHIFT));
			if (!r)
				r = vhd_file_read_bitmap(vf, b, map);
			if (!r && (vhd_bitmap_run(map, in, n, &set) < n || !set)) {
				/* Data durable before the bit that exposes it. */
				if (vhd_fdatasync(vf->fd) < 0)
					r = -errno;
				vhd_bitmap_set_range(map, in, n);
				if (!r)
					r = vhd_pwrite_all(vf->fd, map,
							   (size_t)vf->m.bm_secs * VHD_SECTOR_SIZE, blk);
			}
		}
		if (r)
			break;
		sec += n;
		secs -= n;
		buf += (size_t)n << VHD_SECTOR_SHIFT;
	}
	free(map);
	return r;
}
