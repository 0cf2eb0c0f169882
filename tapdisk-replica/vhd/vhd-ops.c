/* SPDX-License-Identifier: BSD-3-Clause */
/* Synchronous maintenance operations: make-empty, coalesce, scrub, repair. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tdr/vhd.h"

int vhd_meta_clear_batmap(int fd, const struct vhd_meta *m)
{
	uint64_t len = m->batmap_len - VHD_SECTOR_SIZE;
	uint8_t hdr[VHD_SECTOR_SIZE];
	uint8_t *zero;
	int r;

	if (!m->batmap_len)
		return 0;
	r = vhd_src_fd_pread((void *)(intptr_t)fd, hdr, sizeof(hdr), m->batmap_off);
	if (r)
		return r;
	zero = calloc(1, len);
	if (!zero)
		return -ENOMEM;
	r = vhd_pwrite_all(fd, zero, len, m->batmap_off + VHD_SECTOR_SIZE);
	free(zero);
	if (r)
		return r;
	/* checksum (offset 24) = one's complement of the byte sum of the map */
	hdr[24] = hdr[25] = hdr[26] = hdr[27] = 0xFF;
	return vhd_pwrite_all(fd, hdr, sizeof(hdr), m->batmap_off);
}

int vhd_file_make_empty(struct vhd_file *vf, struct vhd_error *err)
{
	struct vhd_meta *m = &vf->m;
	uint8_t sector[VHD_SECTOR_SIZE], fb[VHD_FOOTER_SIZE];
	uint32_t b, last_idx = UINT32_MAX;
	uint64_t end;
	int r = 0;

	if (vf->rdonly)
		return vhd_fail(err, VHD_ERR_IO, "%s: opened read-only", vf->path);
	if (!vhd_meta_dynamic(m))
		return vhd_fail(err, VHD_ERR_FOOTER_TYPE,
				"%s: a fixed disk cannot be made empty; only dynamic and differencing disks",
				vf->path);
	/*
	 * Clear every allocated entry and write each BAT sector that changed
	 * once; the BAT must be durable before the blocks go away.
	 */
	for (b = 0; b < m->bat_entries && !r; b++) {
		uint32_t idx = b / (VHD_SECTOR_SIZE / 4);

		if (m->bat[b] == VHD_BAT_UNUSED)
			continue;
		m->bat[b] = VHD_BAT_UNUSED;
		if (idx != last_idx && last_idx != UINT32_MAX) {
			vhd_bat_sector(m->bat, m->bat_entries, last_idx, sector);
			r = vhd_pwrite_all(vf->fd, sector, sizeof(sector),
					   m->header.table_offset + (uint64_t)last_idx * VHD_SECTOR_SIZE);
		}
		last_idx = idx;
	}
	if (!r && last_idx != UINT32_MAX) {
		vhd_bat_sector(m->bat, m->bat_entries, last_idx, sector);
		r = vhd_pwrite_all(vf->fd, sector, sizeof(sector),
				   m->header.table_offset + (uint64_t)last_idx * VHD_SECTOR_SIZE);
	}
	if (!r)
		r = vhd_meta_clear_batmap(vf->fd, m);
	if (!r && vhd_fdatasync(vf->fd) < 0)
		r = -errno;
	if (r)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot write the BAT: %s", vf->path,
				strerror(-r));

	end = (m->meta_end + VHD_SECTOR_SIZE - 1) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
	vhd_footer_encode(&m->footer, fb);
	r = vhd_file_end_at(vf->fd, fb, end);
	if (r)
		return vhd_fail(err, VHD_ERR_IO, "%s: cannot truncate: %s", vf->path, strerror(-r));
	m->allocated = 0;
	m->data_end = m->meta_end;
	m->footer_off = end;
	m->file_size = end + VHD_FOOTER_SIZE;
	vf->next_free = vhd_block_place(end, m->bm_secs);
	return 0;
}

int vhd_file_coalesce(const char *child, vhd_progress_fn progress, void *arg,
		      struct vhd_error *err)
{
	struct vhd_file *cf = NULL, *pf = NULL;
	char ppath[PATH_MAX];
	struct vhd_error perr;
	struct stat st, cst;
	uint8_t *map = NULL;
	char *buf = NULL;
	uint64_t done = 0;
	uint32_t b;
	int r;

	r = vhd_file_open(&cf, child, VHD_FILE_RDONLY, err);
	if (r < 0)
		return r;
	if (cf->m.footer.type != VHD_TYPE_DIFF) {
		r = vhd_fail(err, VHD_ERR_NO_PARENT,
			     "%s: a %s disk has no parent to coalesce into", child,
			     vhd_type_name(cf->m.footer.type));
		goto out;
	}
	r = vhd_resolve_parent(&cf->m, child, ppath, sizeof(ppath), err);
	if (r < 0)
		goto out;
	/* Its own parent: a loop, not a lock conflict with our own cf. */
	if (stat(ppath, &st) == 0 && fstat(cf->fd, &cst) == 0 && st.st_dev == cst.st_dev &&
	    st.st_ino == cst.st_ino) {
		r = vhd_fail(err, VHD_ERR_PARENT_LOOP, "%s: the parent chain loops back to this file",
			     child);
		goto out;
	}
	/* The parent is written: it and its chain must be valid first. */
	if (vhd_meta_parent_raw(&cf->m))
		r = vhd_file_open_raw(&pf, ppath, 0, err);
	else
		r = vhd_file_open(&pf, ppath, VHD_FILE_CHAIN, err);
	if (r < 0)
		goto out;
	if (stat(ppath, &st) < 0)
		st.st_mtime = 0;
	r = vhd_file_check_parent(cf, pf, (int64_t)st.st_mtime, 0, &perr);
	if (r < 0) {
		if (err)
			*err = perr;
		goto out;
	}
	/*
	 * A child may be larger than its parent (grown after the snapshot),
	 * but its sectors past the parent's end have nowhere to go: refuse
	 * before anything is written, not halfway through.
	 */
	if (cf->m.footer.current_size > pf->m.footer.current_size) {
		r = vhd_fail(err, VHD_ERR_PARENT_SIZE,
			     "%s: %llu bytes, larger than its parent %s (%llu bytes): nothing coalesced; resize the parent first",
			     child, (unsigned long long)cf->m.footer.current_size, ppath,
			     (unsigned long long)pf->m.footer.current_size);
		goto out;
	}
	map = malloc((size_t)cf->m.bm_secs * VHD_SECTOR_SIZE);
	buf = malloc(cf->m.header.block_size);
	if (!map || !buf) {
		r = vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", child);
		goto out;
	}
	for (b = 0; b < cf->m.blocks; b++) {
		uint64_t base = (uint64_t)b * cf->m.spb;
		uint64_t total = cf->m.footer.current_size >> VHD_SECTOR_SHIFT;
		uint32_t n = total - base < cf->m.spb ? (uint32_t)(total - base) : cf->m.spb;
		uint32_t i = 0;

		if (cf->m.bat[b] == VHD_BAT_UNUSED)
			continue;
		r = vhd_file_read_bitmap(cf, b, map);
		while (!r && i < n) {
			bool set;
			uint32_t run = vhd_bitmap_run(map, i, n - i, &set);

			if (set) {
				r = vhd_src_fd_pread((void *)(intptr_t)cf->fd, buf,
						     (size_t)run << VHD_SECTOR_SHIFT,
						     vhd_meta_block_off(&cf->m, b) +
						     ((uint64_t)(cf->m.bm_secs + i) << VHD_SECTOR_SHIFT));
				if (!r)
					r = vhd_file_write(pf, base + i, run, buf);
			}
			i += run;
		}
		if (r) {
			vhd_fail(err, VHD_ERR_IO, "%s: coalescing block %u into %s failed: %s",
				 child, b, ppath, strerror(-r));
			goto out;
		}
		done++;
		if (progress)
			progress(arg, done, cf->m.allocated);
	}
	if (vhd_fsync(pf->fd) < 0) {
		r = vhd_fail(err, VHD_ERR_IO, "%s: cannot sync: %s", ppath, strerror(errno));
		goto out;
	}
	r = 0;
out:
	free(map);
	free(buf);
	vhd_file_close(pf);
	vhd_file_close(cf);
	return r;
}

/* The scrub reads (and zeroes) at most this much at a time. */
#define SCRUB_CHUNK (1u << 20)

/*
 * One run of clear bits [i, i + run) of block b (run at most SCRUB_CHUNK
 * bytes): count the non-zero sectors and, with zero (fix), zero each run of
 * them.
 */
static int scrub_run(struct vhd_file *vf, uint32_t b, uint32_t i, uint32_t run,
		     uint8_t *buf, const uint8_t *zero, struct vhd_scrub *out, bool *stale)
{
	uint64_t data = vhd_meta_block_off(&vf->m, b) + ((uint64_t)vf->m.bm_secs << VHD_SECTOR_SHIFT);
	uint32_t k = 0, bad;
	int r;

	r = vhd_src_fd_pread((void *)(intptr_t)vf->fd, buf, (size_t)run << VHD_SECTOR_SHIFT,
			     data + ((uint64_t)i << VHD_SECTOR_SHIFT));
	while (!r && k < run) {
		if (vhd_all_zero(buf + ((size_t)k << VHD_SECTOR_SHIFT), VHD_SECTOR_SIZE)) {
			k++;
			continue;
		}
		for (bad = 1; k + bad < run &&
		     !vhd_all_zero(buf + ((size_t)(k + bad) << VHD_SECTOR_SHIFT), VHD_SECTOR_SIZE); bad++)
			;
		if (!out->stale_sectors) {
			out->first_block = b;
			out->first_sector = i + k;
		}
		out->stale_sectors += bad;
		*stale = true;
		if (zero)
			r = vhd_pwrite_all(vf->fd, zero, (size_t)bad << VHD_SECTOR_SHIFT,
					   data + ((uint64_t)(i + k) << VHD_SECTOR_SHIFT));
		k += bad;
	}
	return r;
}

int vhd_file_scrub(struct vhd_file *vf, bool fix, struct vhd_scrub *out,
		   vhd_progress_fn progress, void *arg, struct vhd_error *err)
{
	uint64_t total = vf->m.footer.current_size >> VHD_SECTOR_SHIFT;
	uint32_t max = SCRUB_CHUNK >> VHD_SECTOR_SHIFT;
	uint8_t *map = NULL, *buf = NULL, *zero = NULL;
	uint32_t b;
	int r = 0;

	memset(out, 0, sizeof(*out));
	if (vf->m.footer.type != VHD_TYPE_DYNAMIC)
		return vhd_fail(err, VHD_ERR_FOOTER_TYPE,
				"%s: a %s disk has no data under clear bits to look for (only dynamic disks; "
				"in a differencing disk a clear bit means the parent's data)",
				vf->path, vhd_type_name(vf->m.footer.type));
	if (fix && vf->rdonly)
		return vhd_fail(err, VHD_ERR_IO, "%s: opened read-only", vf->path);
	map = malloc((size_t)vf->m.bm_secs * VHD_SECTOR_SIZE);
	buf = malloc(SCRUB_CHUNK);
	zero = fix ? calloc(1, SCRUB_CHUNK) : NULL;
	if (!map || !buf || (fix && !zero)) {
		r = vhd_fail(err, VHD_ERR_NOMEM, "%s: out of memory", vf->path);
		goto out;
	}
	for (b = 0; b < vf->m.blocks; b++) {
		uint64_t base = (uint64_t)b * vf->m.spb;
		uint32_t n = total - base < vf->m.spb ? (uint32_t)(total - base) : vf->m.spb;
		uint32_t i = 0;
		bool stale = false;

		if (vf->m.bat[b] == VHD_BAT_UNUSED)
			continue;
		r = vhd_file_read_bitmap(vf, b, map);
		while (!r && i < n) {
			bool set;
			uint32_t run = vhd_bitmap_run(map, i, n - i < max ? n - i : max, &set);

			if (!set)
				r = scrub_run(vf, b, i, run, buf, zero, out, &stale);
			i += run;
		}
		if (r) {
			r = vhd_fail(err, VHD_ERR_IO, "%s: block %u: %s", vf->path, b, strerror(-r));
			goto out;
		}
		out->blocks++;
		out->stale_blocks += stale;
		if (progress)
			progress(arg, out->blocks, vf->m.allocated);
	}
	if (fix && out->stale_sectors && vhd_fdatasync(vf->fd) < 0)
		r = vhd_fail(err, VHD_ERR_IO, "%s: cannot sync: %s", vf->path, strerror(errno));
out:
	free(map);
	free(buf);
	free(zero);
	return r;
}

int vhd_file_repair(const char *path, struct vhd_error *err)
{
	struct vhd_file *vf = NULL;
	struct vhd_error first;
	uint8_t fb[VHD_FOOTER_SIZE];
	uint64_t end;
	int r, fd;

	/*
	 * The exclusive lock first, held to the end: a file a daemon is
	 * growing can look broken for a moment, and must not be "repaired".
	 * It comes from a bare descriptor, because a writable vhd_file_open
	 * of an invalid file fails validation and lets its lock go.
	 */
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0 && (errno == EACCES || errno == EROFS)) {
		/* Unwritable: fine if there is nothing to repair. */
		int e = errno;

		r = vhd_file_open(&vf, path, VHD_FILE_RDONLY, err);
		vhd_file_close(vf);
		if (r == 0)
			return 0;
		errno = e;
	}
	if (fd < 0)
		return vhd_fail(err, errno == ENOENT ? VHD_ERR_PARENT_MISSING : VHD_ERR_IO,
				"%s: cannot open for writing: %s", path, strerror(errno));
	r = vhd_lock_fd(fd, true, path, err);
	if (r < 0)
		goto out;
	/* Nothing to do for a valid file. */
	r = vhd_file_open(&vf, path, VHD_FILE_RDONLY | VHD_FILE_NO_LOCK, &first);
	if (r == 0)
		goto out;
	/*
	 * The footer at the end is valid but its copy at offset 0 is not,
	 * or differs: the end's wins (blktap's repair rewrites both from it).
	 */
	if (first.code == VHD_ERR_BACKUP_FOOTER || first.code == VHD_ERR_FOOTER_MISMATCH) {
		r = vhd_file_open(&vf, path, VHD_FILE_IGNORE_BACKUP | VHD_FILE_NO_LOCK, err);
		if (r < 0)
			goto out;
		vhd_footer_encode(&vf->m.footer, fb);
		vhd_file_close(vf);
		vf = NULL;
		r = vhd_pwrite_all(fd, fb, sizeof(fb), 0);
		if (!r && vhd_fdatasync(fd) < 0)
			r = -errno;
		if (r) {
			vhd_fail(err, VHD_ERR_IO, "%s: cannot write the footer copy: %s", path,
				 strerror(-r));
			goto out;
		}
		r = vhd_file_open(&vf, path, VHD_FILE_RDONLY | VHD_FILE_NO_LOCK, err);
		goto out;
	}
	r = vhd_file_open(&vf, path, VHD_FILE_USE_BACKUP | VHD_FILE_NO_LOCK, err);
	if (r < 0)
		goto out;
	if (!vf->m.used_backup) {
		/* The footer is fine: the defect is elsewhere and not ours to guess. */
		if (err)
			*err = first;
		r = -EINVAL;
		goto out;
	}
	end = vf->m.data_end > vf->m.meta_end ? vf->m.data_end : vf->m.meta_end;
	end = (end + VHD_SECTOR_SIZE - 1) & ~(uint64_t)(VHD_SECTOR_SIZE - 1);
	vhd_footer_encode(&vf->m.footer, fb);
	vhd_file_close(vf);
	vf = NULL;
	r = vhd_file_end_at(fd, fb, end);
	if (r) {
		vhd_fail(err, VHD_ERR_IO, "%s: cannot write the footer: %s", path, strerror(-r));
		goto out;
	}
	r = vhd_file_open(&vf, path, VHD_FILE_RDONLY | VHD_FILE_NO_LOCK, err);
out:
	vhd_file_close(vf);
	close(fd);
	return r;
}
